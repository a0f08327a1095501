"""ACPI tables for kernels built without MP-table support (Debian's cloud kernel among them).

RSDP (revision 2) -> XSDT -> FADT (hardware-reduced, pointing at an empty DSDT) and MADT (one local
APIC per vCPU, the I/O APIC, the ISA IRQ 0 -> GSI 2 override and LINT1 as NMI). Laid out from
``ACPI_START`` in the BIOS area, where Linux also scans for the RSDP; the loader passes the RSDP
address in boot_params.acpi_rsdp_addr and in PVH's start_info as well.
"""

from __future__ import annotations

import struct

from kvmlet.boot.errors import BootImageError
from kvmlet.boot.layout import BIOS_AREA_START, MP_CONFIG_ADDR
from kvmlet.memory import GuestMemory

ACPI_START = BIOS_AREA_START   # the BIOS area, reserved in the e820 map
ACPI_END = MP_CONFIG_ADDR      # the second half holds the MP configuration table
OEM_ID = b"KVMLET"
OEM_TABLE_ID = b"KVMLETVM"
CREATOR_ID = b"KVML"
LOCAL_APIC_ADDRESS = 0xFEE00000
IO_APIC_ADDRESS = 0xFEC00000

_HEADER = struct.Struct("<4sIBB6s8sI4sI")  # 36 bytes
FADT_LENGTH = 276
FADT_REVISION = 6
FADT_MINOR_REVISION = 5
FADT_FLAG_HW_REDUCED_ACPI = 1 << 20
IAPC_BOOT_ARCH_LEGACY_DEVICES = 1 << 0
IAPC_BOOT_ARCH_8042 = 1 << 1
MADT_FLAG_PCAT_COMPAT = 1 << 0
MADT_LOCAL_APIC = 0
MADT_IO_APIC = 1
MADT_INTERRUPT_OVERRIDE = 2
MADT_LOCAL_APIC_NMI = 4


def _checksum(data: bytes | bytearray) -> int:
    return (-sum(data)) & 0xFF


def _table(signature: bytes, revision: int, body: bytes) -> bytes:
    header = _HEADER.pack(signature, _HEADER.size + len(body), revision, 0, OEM_ID, OEM_TABLE_ID, 1,
                          CREATOR_ID, 1)
    table = bytearray(header + body)
    table[9] = _checksum(table)
    return bytes(table)


def build_madt(cpus: int) -> bytes:
    body = bytearray(struct.pack("<II", LOCAL_APIC_ADDRESS, MADT_FLAG_PCAT_COMPAT))
    for cpu in range(cpus):
        body += struct.pack("<BBBBI", MADT_LOCAL_APIC, 8, cpu, cpu, 1)  # enabled
    body += struct.pack("<BBBBII", MADT_IO_APIC, 12, cpus, 0, IO_APIC_ADDRESS, 0)
    body += struct.pack("<BBBBIH", MADT_INTERRUPT_OVERRIDE, 10, 0, 0, 2, 0)  # ISA IRQ0 -> GSI 2
    body += struct.pack("<BBBHB", MADT_LOCAL_APIC_NMI, 6, 0xFF, 0, 1)       # all CPUs, LINT1
    return _table(b"APIC", 5, bytes(body))


def build_fadt(dsdt_address: int) -> bytes:
    body = bytearray(FADT_LENGTH - _HEADER.size)

    def put(fmt: str, offset: int, value: int) -> None:
        struct.pack_into(fmt, body, offset - _HEADER.size, value)

    put("<I", 40, dsdt_address)
    put("<H", 109, IAPC_BOOT_ARCH_LEGACY_DEVICES | IAPC_BOOT_ARCH_8042)
    put("<I", 112, FADT_FLAG_HW_REDUCED_ACPI)
    put("<B", 131, FADT_MINOR_REVISION)
    put("<Q", 140, dsdt_address)
    body[268 - _HEADER.size:276 - _HEADER.size] = b"KVMLETVM"  # hypervisor vendor identity
    return _table(b"FACP", FADT_REVISION, bytes(body))


def build_rsdp(xsdt_address: int) -> bytes:
    rsdp = bytearray(struct.pack("<8sB6sBIIQB3s", b"RSD PTR ", 0, OEM_ID, 2, 0, 36, xsdt_address, 0,
                                 bytes(3)))
    rsdp[8] = _checksum(rsdp[:20])
    rsdp[32] = _checksum(rsdp)
    return bytes(rsdp)


def build_acpi(cpus: int, base: int = ACPI_START) -> tuple[bytes, int]:
    """The tables laid out at ``base``; returns (bytes, RSDP address)."""

    def align(n: int) -> int:
        return (n + 15) & ~15

    rsdp_at = base
    xsdt_at = base + 0x40
    dsdt = _table(b"DSDT", 2, b"")
    madt = build_madt(cpus)
    dsdt_at = xsdt_at + 0x40
    fadt_at = align(dsdt_at + len(dsdt))
    madt_at = align(fadt_at + FADT_LENGTH)
    fadt = build_fadt(dsdt_at)
    xsdt = _table(b"XSDT", 1, struct.pack("<QQ", fadt_at, madt_at))
    end = madt_at + len(madt)
    if end > ACPI_END:
        raise BootImageError(f"ACPI tables for {cpus} vCPUs need {end - base} bytes; "
                             f"only {ACPI_END - base} fit below {ACPI_END:#x}")
    image = bytearray(end - base)
    for at, blob in ((rsdp_at, build_rsdp(xsdt_at)), (xsdt_at, xsdt), (dsdt_at, dsdt),
                     (fadt_at, fadt), (madt_at, madt)):
        image[at - base:at - base + len(blob)] = blob
    return bytes(image), rsdp_at


def write_acpi(memory: GuestMemory, cpus: int) -> int:
    """Write the ACPI tables into guest memory; returns the RSDP's guest-physical address."""
    image, rsdp = build_acpi(cpus)
    memory.write(ACPI_START, image)
    return rsdp
