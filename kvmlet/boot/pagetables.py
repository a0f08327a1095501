"""Identity page tables for 0-4 GiB with 2 MiB pages, for entering the kernel in long mode.

PML4[0] -> PDPT; PDPT[0..3] -> four page directories; each PD entry maps a 2 MiB page onto the same
physical address. The 4 GiB include the 32-bit MMIO hole, so the kernel can reach its devices too.
"""

from __future__ import annotations

import enum
import struct

from kvmlet.boot.layout import PAGE_SIZE, PD_ADDR, PD_PAGES, PDPT_ADDR, PML4_ADDR
from kvmlet.memory import GuestMemory

ENTRIES_PER_TABLE = 512
LARGE_PAGE_SIZE = 2 << 20


class PageFlags(enum.IntFlag):
    """Page table entry bits used here."""

    PRESENT = 1 << 0
    WRITABLE = 1 << 1
    PAGE_SIZE = 1 << 7  # in a PD entry: maps a 2 MiB page


TABLE_FLAGS = PageFlags.PRESENT | PageFlags.WRITABLE
LARGE_PAGE_FLAGS = PageFlags.PRESENT | PageFlags.WRITABLE | PageFlags.PAGE_SIZE

_TABLE = struct.Struct(f"<{ENTRIES_PER_TABLE}Q")


def identity_page_tables() -> dict[int, bytes]:
    """The page-table pages, by guest-physical address: PML4, PDPT and the page directories."""
    table_flags, large_flags = int(TABLE_FLAGS), int(LARGE_PAGE_FLAGS)  # plain ints: 2048 entries to build
    pml4 = [0] * ENTRIES_PER_TABLE
    pml4[0] = PDPT_ADDR | table_flags
    pdpt = [0] * ENTRIES_PER_TABLE
    pages: dict[int, bytes] = {PML4_ADDR: _TABLE.pack(*pml4)}
    for directory in range(PD_PAGES):
        pd_addr = PD_ADDR + directory * PAGE_SIZE
        pdpt[directory] = pd_addr | table_flags
        first = directory * ENTRIES_PER_TABLE * LARGE_PAGE_SIZE + large_flags
        pages[pd_addr] = _TABLE.pack(*range(first, first + ENTRIES_PER_TABLE * LARGE_PAGE_SIZE, LARGE_PAGE_SIZE))
    pages[PDPT_ADDR] = _TABLE.pack(*pdpt)
    return pages


def write_identity_page_tables(memory: GuestMemory) -> int:
    """Write the identity page tables and return the value for CR3 (the PML4's address)."""
    for gpa, page in identity_page_tables().items():
        memory.write(gpa, page)
    return PML4_ADDR
