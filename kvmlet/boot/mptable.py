"""Intel MultiProcessor Specification 1.4 tables: the floating pointer in the EBDA at 0x9fc00, the
configuration table in the BIOS area at 0xf8000.

The MP floating pointer structure (16 bytes, "_MP_") points to the MP configuration table ("PCMP"): one
processor entry per vCPU, an ISA bus, one I/O APIC, the ISA interrupts routed to the I/O APIC and the two
local interrupts (ExtINT on LINT0, NMI on LINT1). An OS finds the floating pointer by scanning the last
KiB of base memory (639-640 KiB) or the EBDA, whose segment the BIOS data area at 0x40e holds; the
configuration table may be anywhere (section 4), and in the BIOS area (reserved in the e820 map) it has
room for every vCPU the format can describe.

ISA IRQ 0 (the PIT) is routed to I/O APIC pin 2, as on a PC; IRQ 2 (the PIC cascade) is not listed.
The VMM's interrupt routing must match: GSI 0 -> I/O APIC pin 2 (KVM's default routing sends GSI 0
to pin 0; QEMU installs this override with KVM_SET_GSI_ROUTING).

The configuration table takes 44 + 20 per CPU + 152 bytes of other entries; its 32 KiB hold the most
the format allows: 254 vCPUs (APIC ids are 8-bit, the I/O APIC takes id = number of CPUs and 0xff is
the broadcast id).
"""

from __future__ import annotations

import enum
import struct

from kvmlet.boot.errors import BootImageError
from kvmlet.boot.layout import (
    BDA_BASE_MEMORY_KIB,
    BDA_EBDA_SEGMENT,
    BIOS_AREA_END,
    EBDA_END,
    EBDA_START,
    MP_CONFIG_ADDR,
    MPTABLE_ADDR,
)
from kvmlet.memory import GuestMemory

SPEC_REVISION = 4  # 1.4
LOCAL_APIC_ADDR = 0xFEE00000
LOCAL_APIC_VERSION = 0x14
IO_APIC_ADDR = 0xFEC00000
IO_APIC_VERSION = 0x11
OEM_ID = b"KVMLET  "
PRODUCT_ID = b"KVMLET VM   "
ISA_BUS_ID = 0
ISA_IRQS = 16
ISA_IRQ0_IOAPIC_PIN = 2
ISA_CASCADE_IRQ = 2
APIC_ID_BROADCAST = 0xFF
FORMAT_MAX_CPUS = 254  # APIC ids 0..253; the I/O APIC gets the next id

# CPU signature: family 6, model 15, stepping 11; feature flags: FPU, TSC, MSR, PAE, CX8, APIC.
CPU_SIGNATURE = (6 << 8) | (15 << 4) | 11
CPU_FEATURES = (1 << 0) | (1 << 4) | (1 << 5) | (1 << 6) | (1 << 8) | (1 << 9)

FLOATING_POINTER = struct.Struct("<4sIBBBB4s")  # 16 bytes
CONFIG_HEADER = struct.Struct("<4sHBB8s12sIHHIHBx")  # 44 bytes
PROCESSOR_ENTRY = struct.Struct("<BBBBII8x")  # 20 bytes
BUS_ENTRY = struct.Struct("<BB6s")  # 8 bytes
IO_APIC_ENTRY = struct.Struct("<BBBBI")  # 8 bytes
INTERRUPT_ENTRY = struct.Struct("<BBHBBBB")  # 8 bytes, I/O and local interrupt assignment


class EntryType(enum.IntEnum):
    PROCESSOR = 0
    BUS = 1
    IO_APIC = 2
    IO_INTERRUPT = 3
    LOCAL_INTERRUPT = 4


class InterruptType(enum.IntEnum):
    INT = 0
    NMI = 1
    SMI = 2
    EXTINT = 3


class CpuFlags(enum.IntFlag):
    ENABLED = 1 << 0
    BOOT_PROCESSOR = 1 << 1


IO_APIC_ENABLED = 1
INTERRUPT_FLAGS_CONFORM = 0  # polarity and trigger mode conform to the bus (ISA: edge, active high)

_FIXED_ENTRIES_SIZE = BUS_ENTRY.size + IO_APIC_ENTRY.size + INTERRUPT_ENTRY.size * (ISA_IRQS - 1 + 2)


def mptable_size(cpus: int) -> int:
    """Bytes the configuration table takes for ``cpus`` vCPUs."""
    return CONFIG_HEADER.size + PROCESSOR_ENTRY.size * cpus + _FIXED_ENTRIES_SIZE


MAX_CPUS = min(FORMAT_MAX_CPUS,
               (BIOS_AREA_END - MP_CONFIG_ADDR - CONFIG_HEADER.size - _FIXED_ENTRIES_SIZE) // PROCESSOR_ENTRY.size)


def check_cpu_count(cpus: int) -> None:
    """Raise BootImageError unless an MP table for ``cpus`` vCPUs can be built."""
    if cpus < 1:
        raise BootImageError(f"the VM needs at least one vCPU (got {cpus})")
    if cpus > MAX_CPUS:
        raise BootImageError(
            f"{cpus} vCPUs is more than the MP table can describe ({MAX_CPUS}: 8-bit APIC ids, "
            f"one taken by the I/O APIC)"
        )


def _checksum(data: bytes | bytearray) -> int:
    """The byte that makes ``data`` (with it in place of a zero) sum to 0 mod 256."""
    return (-sum(data)) & 0xFF


def build_mptable(cpus: int, config_base: int = MP_CONFIG_ADDR) -> tuple[bytes, bytes]:
    """The floating pointer and the configuration table, the latter to be placed at ``config_base``."""
    check_cpu_count(cpus)
    entries = bytearray()
    for cpu in range(cpus):
        flags = CpuFlags.ENABLED | (CpuFlags.BOOT_PROCESSOR if cpu == 0 else 0)
        entries += PROCESSOR_ENTRY.pack(
            EntryType.PROCESSOR, cpu, LOCAL_APIC_VERSION, flags, CPU_SIGNATURE, CPU_FEATURES
        )
    entries += BUS_ENTRY.pack(EntryType.BUS, ISA_BUS_ID, b"ISA   ")
    io_apic_id = cpus
    entries += IO_APIC_ENTRY.pack(
        EntryType.IO_APIC, io_apic_id, IO_APIC_VERSION, IO_APIC_ENABLED, IO_APIC_ADDR
    )
    for irq in range(ISA_IRQS):
        if irq == ISA_CASCADE_IRQ:
            continue
        pin = ISA_IRQ0_IOAPIC_PIN if irq == 0 else irq
        entries += INTERRUPT_ENTRY.pack(
            EntryType.IO_INTERRUPT,
            InterruptType.INT,
            INTERRUPT_FLAGS_CONFORM,
            ISA_BUS_ID,
            irq,
            io_apic_id,
            pin,
        )
    for lint, kind in ((0, InterruptType.EXTINT), (1, InterruptType.NMI)):
        entries += INTERRUPT_ENTRY.pack(
            EntryType.LOCAL_INTERRUPT, kind, INTERRUPT_FLAGS_CONFORM, ISA_BUS_ID, 0, APIC_ID_BROADCAST, lint
        )
    entry_count = cpus + 2 + (ISA_IRQS - 1) + 2
    table_length = CONFIG_HEADER.size + len(entries)
    header = bytearray(
        CONFIG_HEADER.pack(
            b"PCMP",
            table_length,
            SPEC_REVISION,
            0,
            OEM_ID,
            PRODUCT_ID,
            0,
            0,  # OEM table pointer and size
            entry_count,
            LOCAL_APIC_ADDR,
            0,
            0,  # extended table length and checksum: no extended entries
        )
    )
    header[7] = _checksum(header + entries)
    config = bytes(header) + bytes(entries)

    pointer = bytearray(
        FLOATING_POINTER.pack(
            b"_MP_",
            config_base,
            1,
            SPEC_REVISION,
            0,
            0,  # feature byte 1: 0 = a configuration table is present
            bytes(4),  # feature bytes 2-5: IMCR absent (virtual wire mode)
        )
    )
    pointer[10] = _checksum(pointer)
    return bytes(pointer), config


def write_mptable(memory: GuestMemory, cpus: int) -> None:
    """Write the floating pointer into the EBDA and the configuration table into the BIOS area, and
    point the BIOS data area at the EBDA."""
    pointer, config = build_mptable(cpus, MP_CONFIG_ADDR)
    memory.write(EBDA_START, bytes(MPTABLE_ADDR - EBDA_START) + pointer
                 + bytes(EBDA_END - MPTABLE_ADDR - len(pointer)))
    memory.write(MP_CONFIG_ADDR, config + bytes(BIOS_AREA_END - MP_CONFIG_ADDR - len(config)))
    memory.write_u16(BDA_EBDA_SEGMENT, EBDA_START >> 4)
    memory.write_u16(BDA_BASE_MEMORY_KIB, EBDA_START >> 10)
