"""The PVH boot information: ``struct hvm_start_info`` (Xen's arch-x86/hvm/start_info.h).

Version 1 of the structure, as Linux's PVH entry and QEMU use it: the magic, the command line, the
memory map (``hvm_memmap_table_entry``: addr, size, type, reserved) and, with an initrd, one module
(``hvm_modlist_entry``: paddr, size, cmdline_paddr, reserved). Address 0 means "not present".
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from kvmlet.boot.e820 import E820Entry
from kvmlet.boot.errors import BootImageError
from kvmlet.boot.layout import (
    PVH_AREA_END,
    PVH_MEMMAP_ADDR,
    PVH_MEMMAP_MAX_ENTRIES,
    PVH_MODLIST_ADDR,
    PVH_START_INFO_ADDR,
)

XEN_HVM_START_MAGIC = 0x336EC578
HVM_START_INFO_VERSION = 1

# magic, version, flags, nr_modules, modlist_paddr, cmdline_paddr, rsdp_paddr, memmap_paddr,
# memmap_entries, reserved
START_INFO = struct.Struct("<IIIIQQQQII")
MEMMAP_ENTRY = struct.Struct("<QQII")
MODLIST_ENTRY = struct.Struct("<QQQQ")


def build_start_info(
    *, cmdline_addr: int, memmap: Sequence[E820Entry], initrd: tuple[int, int] | None, rsdp_addr: int = 0
) -> bytes:
    """The bytes of the PVH area from PVH_START_INFO_ADDR: start_info, memory map, module list."""
    if len(memmap) > PVH_MEMMAP_MAX_ENTRIES:
        raise BootImageError(
            f"the memory map has {len(memmap)} entries; the PVH start info holds {PVH_MEMMAP_MAX_ENTRIES}"
        )
    area = bytearray(PVH_AREA_END - PVH_START_INFO_ADDR)
    START_INFO.pack_into(
        area,
        0,
        XEN_HVM_START_MAGIC,
        HVM_START_INFO_VERSION,
        0,  # flags
        1 if initrd is not None else 0,
        PVH_MODLIST_ADDR if initrd is not None else 0,
        cmdline_addr,
        rsdp_addr,
        PVH_MEMMAP_ADDR,
        len(memmap),
        0,
    )
    for index, entry in enumerate(memmap):
        MEMMAP_ENTRY.pack_into(
            area,
            PVH_MEMMAP_ADDR - PVH_START_INFO_ADDR + index * MEMMAP_ENTRY.size,
            entry.addr,
            entry.size,
            int(entry.type),
            0,
        )
    if initrd is not None:
        address, size = initrd
        MODLIST_ENTRY.pack_into(area, PVH_MODLIST_ADDR - PVH_START_INFO_ADDR, address, size, 0, 0)
    return bytes(area)
