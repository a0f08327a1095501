"""The boot GDT and IDT.

Selectors follow the Linux boot protocol, which requires ``__BOOT_CS`` (0x10) and ``__BOOT_DS``
(0x18) to be flat 4 GiB segments; 0x20 is the TSS (KVM needs a usable TR), and 0x28/0x30 are a flat
32-bit code/data pair for the PVH entry (32-bit protected mode). The IDT is one zero descriptor:
the guest runs with interrupts disabled until it loads its own.
"""

from __future__ import annotations

import enum
import struct

from kvmlet.boot.layout import GDT_ADDR, GDT_MAX_ENTRIES, IDT_ADDR, IDT_SIZE
from kvmlet.memory import GuestMemory


class Selector(enum.IntEnum):
    """GDT selectors of the boot GDT."""

    NULL = 0x00
    BOOT_CS = 0x10  # 64-bit code
    BOOT_DS = 0x18  # flat data
    TSS = 0x20
    CODE32 = 0x28  # flat 32-bit code (PVH)
    DATA32 = 0x30  # flat 32-bit data (PVH)


# Access byte bits.
ACCESS_PRESENT = 0x80
ACCESS_CODE_DATA = 0x10  # S: a code or data segment (0: a system segment)
TYPE_CODE_EXEC_READ_ACCESSED = 0xB
TYPE_DATA_READ_WRITE_ACCESSED = 0x3
TYPE_TSS_BUSY = 0xB

# Flags nibble (descriptor bits 52-55).
FLAG_GRANULARITY = 0x8
FLAG_DB = 0x4  # default operation size 32 bits
FLAG_LONG = 0x2
FLAG_AVL = 0x1


def make_descriptor(base: int, limit: int, access: int, flags: int) -> int:
    """A segment descriptor (8 bytes as an integer) from its parts; ``limit`` is the raw 20-bit limit."""
    return (
        (limit & 0xFFFF)
        | (base & 0xFFFFFF) << 16
        | (access & 0xFF) << 40
        | ((limit >> 16) & 0xF) << 48
        | (flags & 0xF) << 52
        | ((base >> 24) & 0xFF) << 56
    )


CODE64_DESCRIPTOR = make_descriptor(
    0, 0xFFFFF, ACCESS_PRESENT | ACCESS_CODE_DATA | TYPE_CODE_EXEC_READ_ACCESSED, FLAG_GRANULARITY | FLAG_LONG
)  # 0x00af9b000000ffff
DATA_DESCRIPTOR = make_descriptor(
    0, 0xFFFFF, ACCESS_PRESENT | ACCESS_CODE_DATA | TYPE_DATA_READ_WRITE_ACCESSED, FLAG_GRANULARITY | FLAG_DB
)  # 0x00cf93000000ffff
TSS_DESCRIPTOR = make_descriptor(
    0, 0xFFFFF, ACCESS_PRESENT | TYPE_TSS_BUSY, FLAG_GRANULARITY
)  # 0x008f8b000000ffff
CODE32_DESCRIPTOR = make_descriptor(
    0, 0xFFFFF, ACCESS_PRESENT | ACCESS_CODE_DATA | TYPE_CODE_EXEC_READ_ACCESSED, FLAG_GRANULARITY | FLAG_DB
)  # 0x00cf9b000000ffff

BOOT_GDT: tuple[int, ...] = (
    0,  # 0x00 null
    0,  # 0x08 null (Linux's GDT_ENTRY_BOOT_CS is 2)
    CODE64_DESCRIPTOR,  # 0x10
    DATA_DESCRIPTOR,  # 0x18
    TSS_DESCRIPTOR,  # 0x20
    CODE32_DESCRIPTOR,  # 0x28
    DATA_DESCRIPTOR,  # 0x30
)
assert len(BOOT_GDT) <= GDT_MAX_ENTRIES

GDT_LIMIT = len(BOOT_GDT) * 8 - 1
IDT_LIMIT = IDT_SIZE - 1


def descriptor_at(selector: int) -> int:
    """The boot GDT's descriptor for ``selector``."""
    return BOOT_GDT[selector >> 3]


def gdt_bytes() -> bytes:
    """The boot GDT as it sits in memory."""
    return struct.pack(f"<{len(BOOT_GDT)}Q", *BOOT_GDT)


def write_gdt_and_idt(memory: GuestMemory) -> None:
    """Write the GDT at GDT_ADDR (zero-filling its unused slots) and a zero IDT at IDT_ADDR."""
    table = gdt_bytes()
    memory.write(GDT_ADDR, table + bytes(GDT_MAX_ENTRIES * 8 - len(table)))
    memory.fill(IDT_ADDR, IDT_SIZE)
