"""ACPI tables for kernels built without MP-table support (Debian's cloud kernel among them).

RSDP (revision 2) -> XSDT -> FADT (hardware-reduced, pointing at the DSDT) and MADT (one local APIC
per vCPU, the I/O APIC, the ISA IRQ 0 -> GSI 2 override and LINT1 as NMI). The DSDT describes one
device, the VM generation ID (``\\_SB.VGEN``, see :func:`build_vmgenid_aml`). Laid out from
``ACPI_START`` in the BIOS area, where Linux also scans for the RSDP; the loader passes the RSDP
address in boot_params.acpi_rsdp_addr and in PVH's start_info as well.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from kvmlet.boot.errors import BootImageError
from kvmlet.boot.layout import BIOS_AREA_START, VMGENID_ADDR
from kvmlet.memory import GuestMemory

ACPI_START = BIOS_AREA_START   # the BIOS area, reserved in the e820 map
ACPI_END = VMGENID_ADDR        # then the VM generation ID's page, then the MP configuration table
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
DSDT_REVISION = 2  # 2 or more: AML integers are 64-bit

# AML encoding (ACPI 6.5, chapter 20: "ACPI Machine Language (AML) Specification").
AML_NAME_OP = 0x08           # DefName := NameOp NameString DataRefObject
AML_DWORD_PREFIX = 0x0C      # DWordConst := DWordPrefix DWordData (little-endian)
AML_STRING_PREFIX = 0x0D     # String := StringPrefix AsciiCharList NullChar
AML_SCOPE_OP = 0x10          # DefScope := ScopeOp PkgLength NameString TermList
AML_PACKAGE_OP = 0x12        # DefPackage := PackageOp PkgLength NumElements PackageElementList
AML_EXT_OP_PREFIX = 0x5B
AML_DEVICE_OP = 0x82         # DefDevice := ExtOpPrefix DeviceOp PkgLength NameString TermList
AML_ROOT_CHAR = 0x5C         # '\\'
AML_MAX_PKG_LENGTH = (1 << 28) - 1

# The VM generation ID device. Microsoft's spec asks for a _HID of the platform's own, _CID and _DDN
# "VM_Gen_Counter", and an object ADDR: a package of two integers, the low and the high 32 bits of the
# generation ID's guest-physical address. Linux's drivers/virt/vmgenid.c binds to a device with the ID
# "VMGENCTR" or "VM_GEN_COUNTER" in its _HID or _CID (ACPICA upper-cases _HID and _CID strings when it
# evaluates them). Neither is a well-formed ACPI ID ("VMGENCTR" fails iasl's _HID check: the last four
# characters must be hex digits), so, as Hyper-V does, both are compatible IDs; the _HID is kvmlet's own.
VMGENID_DEVICE = "VGEN"
VMGENID_HID = "KVML0001"
VMGENID_CIDS = ("VMGENCTR", "VM_Gen_Counter")
VMGENID_DDN = "VM_Gen_Counter"


def _checksum(data: bytes | bytearray) -> int:
    return (-sum(data)) & 0xFF


def _table(signature: bytes, revision: int, body: bytes) -> bytes:
    header = _HEADER.pack(signature, _HEADER.size + len(body), revision, 0, OEM_ID, OEM_TABLE_ID, 1,
                          CREATOR_ID, 1)
    table = bytearray(header + body)
    table[9] = _checksum(table)
    return bytes(table)


# -- AML encoders ----------------------------------------------------------------------------------


def aml_pkg_length(content_length: int) -> bytes:
    """The PkgLength of a package whose contents after the PkgLength are ``content_length`` bytes.

    The encoded value counts its own bytes too (ACPI 6.5, 20.2.4). One byte holds 0-63 (bits 5-0).
    Longer: the lead byte's bits 7-6 give the number of bytes that follow (1-3), its bits 3-0 the low
    4 bits of the length, and each following byte the next 8 bits (little-endian), up to 2**28 - 1.
    """
    if content_length < 0:
        raise ValueError(f"negative AML package length {content_length}")
    if content_length + 1 <= 0x3F:
        return bytes([content_length + 1])
    for extra in (1, 2, 3):
        total = content_length + 1 + extra
        if total < 1 << (4 + 8 * extra):
            return bytes([extra << 6 | (total & 0xF)]) + (total >> 4).to_bytes(extra, "little")
    raise BootImageError(f"AML package of {content_length} bytes is longer than PkgLength can encode "
                         f"({AML_MAX_PKG_LENGTH} bytes)")


def aml_name_seg(name: str) -> bytes:
    """A NameSeg: 4 characters, a leading A-Z or '_' then A-Z, 0-9 or '_'; shorter names are padded with '_'."""
    if not 1 <= len(name) <= 4 or not (name[0].isupper() or name[0] == "_") or not all(
            c.isupper() or c.isdigit() or c == "_" for c in name) or not name.isascii():
        raise ValueError(f"invalid AML name segment {name!r}")
    return name.ljust(4, "_").encode("ascii")


def aml_string(text: str) -> bytes:
    """String := 0x0D, the ASCII characters (1-0x7F), NUL."""
    data = text.encode("ascii")
    if 0 in data:
        raise ValueError("an AML string cannot contain NUL")
    return bytes([AML_STRING_PREFIX]) + data + b"\0"


def aml_dword(value: int) -> bytes:
    """DWordConst := 0x0C, 4 bytes little-endian (always this form, so the value's size is fixed)."""
    return bytes([AML_DWORD_PREFIX]) + struct.pack("<I", value)


def aml_name(name: str, value: bytes) -> bytes:
    """Name(name, value) := 0x08 NameSeg DataRefObject."""
    return bytes([AML_NAME_OP]) + aml_name_seg(name) + value


def aml_package(*elements: bytes) -> bytes:
    """Package(){elements} := 0x12 PkgLength NumElements (one byte) the elements."""
    if len(elements) > 255:
        raise ValueError("an AML Package holds at most 255 elements")
    body = bytes([len(elements)]) + b"".join(elements)
    return bytes([AML_PACKAGE_OP]) + aml_pkg_length(len(body)) + body


def aml_scope(path: bytes, terms: bytes) -> bytes:
    """Scope(path){terms} := 0x10 PkgLength NameString terms; ``path`` is an encoded NameString."""
    body = path + terms
    return bytes([AML_SCOPE_OP]) + aml_pkg_length(len(body)) + body


def aml_device(name: str, terms: bytes) -> bytes:
    """Device(name){terms} := 0x5B 0x82 PkgLength NameSeg terms."""
    body = aml_name_seg(name) + terms
    return bytes([AML_EXT_OP_PREFIX, AML_DEVICE_OP]) + aml_pkg_length(len(body)) + body


def build_vmgenid_aml(address: int) -> bytes:
    """``Scope(\\_SB) { Device(VGEN) { _HID, _CID, _DDN, ADDR } }`` for a generation ID at ``address``.

    Encoded (104 bytes for any address: the integers are always DWordConsts)::

        10 47 06                 ScopeOp, PkgLength 0x67 = 103 (two bytes: 0x40 | (103 & 0xF), 103 >> 4)
           5C 5F 53 42 5F        NameString \\_SB_ (RootChar, NameSeg)
           5B 82 4E 05           ExtOpPrefix DeviceOp, PkgLength 0x5E = 94
              56 47 45 4E        NameSeg VGEN
              08 5F 48 49 44 0D "KVML0001" 00        Name(_HID, "KVML0001")
              08 5F 43 49 44     Name(_CID,
                 12 1C 02        PackageOp, PkgLength 28 (one byte), NumElements 2
                 0D "VMGENCTR" 00 0D "VM_Gen_Counter" 00)
              08 5F 44 44 4E 0D "VM_Gen_Counter" 00  Name(_DDN, "VM_Gen_Counter")
              08 41 44 44 52     Name(ADDR,
                 12 0C 02        PackageOp, PkgLength 12, NumElements 2
                 0C <u32 LE>     DWordConst: address bits 31-0
                 0C <u32 LE>     DWordConst: address bits 63-32)

    ``iasl -oa`` (ACPICA 20200925) compiles the same ASL, without errors or warnings, into the same bytes but
    for the integers, which it encodes in the fewest bytes (a zero high half as ``0A 00``).
    """
    if address % 8 or not 0 <= address < 1 << 64:
        raise ValueError(f"VM generation ID address {address:#x} is not 8-byte aligned")
    device = aml_device(VMGENID_DEVICE, b"".join((
        aml_name("_HID", aml_string(VMGENID_HID)),
        aml_name("_CID", aml_package(*(aml_string(cid) for cid in VMGENID_CIDS))),
        aml_name("_DDN", aml_string(VMGENID_DDN)),
        aml_name("ADDR", aml_package(aml_dword(address & 0xFFFF_FFFF), aml_dword(address >> 32))),
    )))
    return aml_scope(bytes([AML_ROOT_CHAR]) + aml_name_seg("_SB_"), device)


# -- the TPM (kvmlet.devices.tpm_tis): a DSDT device and the TPM2 table (TCG ACPI Specification) ----------
AML_BUFFER_OP = 0x11         # DefBuffer := BufferOp PkgLength BufferSize ByteList
AML_BYTE_PREFIX = 0x0A       # ByteConst := BytePrefix ByteData
RESOURCE_MEMORY32_FIXED = 0x86   # large resource item: Fixed Location Memory Range Descriptor (ACPI 6.5, 6.4.3.4)
RESOURCE_END_TAG = 0x79          # small resource item: End Tag
TPM_DEVICE = "TPM_"
TPM_HID = "MSFT0101"             # a TPM 2.0 (Linux's tpm_tis and tpm_crb bind to it)
TPM2_TABLE_REVISION = 4
TPM2_PLATFORM_CLIENT = 0
TPM2_START_METHOD_TIS = 6        # "uses the Memory Mapped I/O interface" (the FIFO / TIS interface)


def aml_buffer(data: bytes) -> bytes:
    """Buffer(){data} := 0x11 PkgLength BufferSize (a ByteConst, or a DWordConst past 255) the bytes."""
    size = bytes([AML_BYTE_PREFIX, len(data)]) if len(data) < 256 else aml_dword(len(data))
    body = size + data
    return bytes([AML_BUFFER_OP]) + aml_pkg_length(len(body)) + body


def resource_memory32_fixed(base: int, length: int, writable: bool = True) -> bytes:
    """Memory32Fixed(ReadWrite|ReadOnly, base, length): 0x86, length 9 (u16), information, base, length."""
    return struct.pack("<BHBII", RESOURCE_MEMORY32_FIXED, 9, 1 if writable else 0, base, length)


def resource_template(*items: bytes) -> bytes:
    """ResourceTemplate(){items}: a Buffer of the descriptors and an End Tag (checksum 0: not checked)."""
    return aml_buffer(b"".join(items) + bytes([RESOURCE_END_TAG, 0]))


def build_tpm_aml(base: int, size: int) -> bytes:
    """``Scope(\\_SB) { Device(TPM_) { _HID "MSFT0101", _UID 1, _STA 0x0F, _CRS Memory32Fixed(base, size) } }``."""
    device = aml_device(TPM_DEVICE, b"".join((
        aml_name("_HID", aml_string(TPM_HID)),
        aml_name("_UID", aml_dword(1)),
        aml_name("_STA", aml_dword(0x0F)),
        aml_name("_CRS", resource_template(resource_memory32_fixed(base, size))),
    )))
    return aml_scope(bytes([AML_ROOT_CHAR]) + aml_name_seg("_SB_"), device)


def build_tpm2_table(log_address: int, log_size: int) -> bytes:
    """The TPM2 table (revision 4) for a TIS interface: platform class, no control area, start method 6,
    12 bytes of start-method parameters, then the event log's minimum length (LAML) and start (LASA)."""
    body = struct.pack("<HHQI12sIQ", TPM2_PLATFORM_CLIENT, 0, 0, TPM2_START_METHOD_TIS, bytes(12), log_size,
                       log_address)
    return _table(b"TPM2", TPM2_TABLE_REVISION, body)


@dataclass(frozen=True)
class AcpiExtras:
    """What devices add to the ACPI tables: more tables (listed in the XSDT after the MADT) and AML
    appended to the DSDT."""

    tables: tuple[bytes, ...] = ()
    dsdt_aml: bytes = b""


def build_dsdt(vmgenid_address: int | None = VMGENID_ADDR, extra_aml: bytes = b"") -> bytes:
    """The DSDT: the VM generation ID device, or nothing (``vmgenid_address`` None), then ``extra_aml``."""
    aml = build_vmgenid_aml(vmgenid_address) if vmgenid_address is not None else b""
    return _table(b"DSDT", DSDT_REVISION, aml + extra_aml)


# -- tables ----------------------------------------------------------------------------------------


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


def build_acpi(cpus: int, base: int = ACPI_START, vmgenid_address: int | None = VMGENID_ADDR,
               extras: AcpiExtras | None = None) -> tuple[bytes, int]:
    """The tables laid out at ``base``; returns (bytes, RSDP address). ``vmgenid_address``: where the
    DSDT says the VM generation ID is (None: no such device); ``extras``: what devices add."""

    def align(n: int) -> int:
        return (n + 15) & ~15

    rsdp_at = base
    xsdt_at = base + 0x40
    extras = extras or AcpiExtras()
    dsdt = build_dsdt(vmgenid_address, extras.dsdt_aml)
    madt = build_madt(cpus)
    dsdt_at = xsdt_at + 0x40 + 8 * len(extras.tables)
    fadt_at = align(dsdt_at + len(dsdt))
    madt_at = align(fadt_at + FADT_LENGTH)
    fadt = build_fadt(dsdt_at)
    end = madt_at + len(madt)
    placed: list[tuple[int, bytes]] = []
    for extra in extras.tables:
        placed.append((align(end), extra))
        end = align(end) + len(extra)
    xsdt = _table(b"XSDT", 1, struct.pack(f"<{2 + len(placed)}Q", fadt_at, madt_at, *(at for at, _ in placed)))
    if end > ACPI_END:
        raise BootImageError(f"ACPI tables for {cpus} vCPUs need {end - base} bytes; "
                             f"only {ACPI_END - base} fit below {ACPI_END:#x}")
    image = bytearray(end - base)
    for at, blob in ((rsdp_at, build_rsdp(xsdt_at)), (xsdt_at, xsdt), (dsdt_at, dsdt),
                     (fadt_at, fadt), (madt_at, madt), *placed):
        image[at - base:at - base + len(blob)] = blob
    return bytes(image), rsdp_at


def write_acpi(memory: GuestMemory, cpus: int, extras: AcpiExtras | None = None) -> int:
    """Write the ACPI tables into guest memory; returns the RSDP's guest-physical address."""
    image, rsdp = build_acpi(cpus, extras=extras)
    memory.write(ACPI_START, image)
    return rsdp
