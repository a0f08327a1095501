"""The e820 memory map the guest is told about (zero page ``e820_table``, PVH ``memmap``)."""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from kvmlet.boot.errors import BootImageError
from kvmlet.boot.layout import (
    BIOS_AREA_END,
    BIOS_AREA_START,
    EBDA_END,
    EBDA_START,
    HIGH_MEMORY_START,
    MIN_GUEST_MEMORY,
    mib,
)
from kvmlet.memory import GuestMemory

# struct boot_e820_entry: u64 addr, u64 size, u32 type, packed (20 bytes).
E820_ENTRY = struct.Struct("<QQI")


class E820Type(enum.IntEnum):
    """e820 range types (ACPI address range types; PVH memmap types use the same values)."""

    RAM = 1
    RESERVED = 2
    ACPI = 3
    NVS = 4
    UNUSABLE = 5


@dataclass(frozen=True)
class E820Entry:
    """One range of the guest-physical memory map."""

    addr: int
    size: int
    type: E820Type

    @property
    def end(self) -> int:
        """First address after the range."""
        return self.addr + self.size

    def pack(self) -> bytes:
        """The 20-byte ``boot_e820_entry`` of the zero page."""
        return E820_ENTRY.pack(self.addr, self.size, int(self.type))


def build_e820(memory: GuestMemory) -> list[E820Entry]:
    """The memory map of ``memory``: base RAM, the EBDA and BIOS area reserved, high RAM.

    The region at GPA 0 is split as a PC's is: RAM up to the EBDA, the EBDA (holding the MP floating pointer)
    reserved, the VGA/option-ROM hole left out, the BIOS area reserved, and RAM from 1 MiB to the
    region's end. Every other region (RAM above the 4 GiB hole) is RAM.
    """
    regions = list(memory.ram_ranges())
    if not regions or regions[0][0] != 0:
        raise BootImageError("guest memory does not start at address 0; the boot layout needs low memory")
    base_size = regions[0][1]
    if base_size < MIN_GUEST_MEMORY:
        raise BootImageError(
            f"guest memory below the 4 GiB hole is {mib(base_size)}; kvmlet needs at least "
            f"{mib(MIN_GUEST_MEMORY)} (1 MiB of boot structures plus room for the kernel)"
        )
    entries = [
        E820Entry(0, EBDA_START, E820Type.RAM),
        E820Entry(EBDA_START, EBDA_END - EBDA_START, E820Type.RESERVED),
        E820Entry(BIOS_AREA_START, BIOS_AREA_END - BIOS_AREA_START, E820Type.RESERVED),
        E820Entry(HIGH_MEMORY_START, base_size - HIGH_MEMORY_START, E820Type.RAM),
    ]
    entries.extend(E820Entry(gpa, size, E820Type.RAM) for gpa, size in regions[1:])
    return entries


def pack_e820(entries: list[E820Entry]) -> bytes:
    """The entries as the zero page's packed ``e820_table``."""
    return b"".join(entry.pack() for entry in entries)
