"""The Linux zero page (``struct boot_params``, 4096 bytes) for the 64-bit boot protocol.

Offsets are those of Documentation/arch/x86/zero-page.rst and boot.rst. For a bzImage the setup
header (0x1f1 to its end) is copied from the image; for a vmlinux ELF, which has none, the fields a
kernel reads are synthesized. Either way the loader then fills in what a boot loader must:
type_of_loader, loadflags.CAN_USE_HEAP, heap_end_ptr, the command line, the initrd and the e820 map.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from kvmlet.boot.bzimage import BOOT_FLAG, HEADER_MAGIC, SETUP_HEADER_OFFSET, LoadFlags
from kvmlet.boot.e820 import E820_ENTRY, E820Entry
from kvmlet.boot.errors import BootImageError
from kvmlet.boot.layout import ZERO_PAGE_SIZE

# struct boot_params (zero-page.rst).
EXT_RAMDISK_IMAGE = 0x0C0
EXT_RAMDISK_SIZE = 0x0C4
EXT_CMD_LINE_PTR = 0x0C8
E820_ENTRIES = 0x1E8
SENTINEL = 0x1EF
E820_TABLE = 0x2D0
E820_MAX_ENTRIES = 128

# struct setup_header (boot.rst), at the same offsets as in a bzImage.
BOOT_FLAG_FIELD = 0x1FE
HEADER = 0x202
VERSION = 0x206
TYPE_OF_LOADER = 0x210
LOADFLAGS = 0x211
RAMDISK_IMAGE = 0x218
RAMDISK_SIZE = 0x21C
HEAP_END_PTR = 0x224
CMD_LINE_PTR = 0x228
INITRD_ADDR_MAX = 0x22C
KERNEL_ALIGNMENT = 0x230
CMDLINE_SIZE = 0x238

SYNTHETIC_PROTOCOL = 0x020F
TYPE_OF_LOADER_UNDEFINED = 0xFF
SYNTHETIC_KERNEL_ALIGNMENT = 0x1000000
SYNTHETIC_INITRD_ADDR_MAX = 0x7FFFFFFF
# The setup heap ends here, counted from the real-mode code's start; the 64-bit entry ignores the
# heap, but a loader that sets CAN_USE_HEAP must give it (boot.rst suggests 0xe000 - 0x200 and up).
HEAP_END = 0xFE00


def synthetic_setup_header(page: bytearray, cmdline_size: int) -> None:
    """Fill the setup header fields a vmlinux kernel reads, as a bzImage would carry them."""
    struct.pack_into("<H", page, BOOT_FLAG_FIELD, BOOT_FLAG)
    page[HEADER : HEADER + 4] = HEADER_MAGIC
    struct.pack_into("<H", page, VERSION, SYNTHETIC_PROTOCOL)
    page[LOADFLAGS] = LoadFlags.LOADED_HIGH
    struct.pack_into("<I", page, INITRD_ADDR_MAX, SYNTHETIC_INITRD_ADDR_MAX)
    struct.pack_into("<I", page, KERNEL_ALIGNMENT, SYNTHETIC_KERNEL_ALIGNMENT)
    struct.pack_into("<I", page, CMDLINE_SIZE, cmdline_size)


ACPI_RSDP_ADDR = 0x070  # boot protocol 2.14: where the boot loader says the RSDP is


def build_zero_page(
    *,
    setup_header: bytes | None,
    cmdline_addr: int,
    cmdline_size: int,
    initrd: tuple[int, int] | None,
    e820: Sequence[E820Entry],
    acpi_rsdp_addr: int = 0,
) -> bytes:
    """The 4096-byte zero page.

    ``setup_header`` is the bzImage's header (bytes from 0x1f1), or None for a vmlinux; then
    ``cmdline_size`` (the longest command line, without the NUL) goes into the synthesized header.
    ``initrd`` is (address, size).
    """
    if len(e820) > E820_MAX_ENTRIES:
        raise BootImageError(
            f"the memory map has {len(e820)} entries; the zero page holds {E820_MAX_ENTRIES}"
        )
    page = bytearray(ZERO_PAGE_SIZE)
    if setup_header is None:
        synthetic_setup_header(page, cmdline_size)
    else:
        page[SETUP_HEADER_OFFSET : SETUP_HEADER_OFFSET + len(setup_header)] = setup_header
    page[TYPE_OF_LOADER] = TYPE_OF_LOADER_UNDEFINED
    page[LOADFLAGS] |= LoadFlags.CAN_USE_HEAP
    struct.pack_into("<H", page, HEAP_END_PTR, HEAP_END)
    struct.pack_into("<I", page, CMD_LINE_PTR, cmdline_addr & 0xFFFFFFFF)
    struct.pack_into("<I", page, EXT_CMD_LINE_PTR, cmdline_addr >> 32)
    if initrd is not None:
        address, size = initrd
        struct.pack_into("<I", page, RAMDISK_IMAGE, address & 0xFFFFFFFF)
        struct.pack_into("<I", page, RAMDISK_SIZE, size & 0xFFFFFFFF)
        struct.pack_into("<I", page, EXT_RAMDISK_IMAGE, address >> 32)
        struct.pack_into("<I", page, EXT_RAMDISK_SIZE, size >> 32)
    struct.pack_into("<Q", page, ACPI_RSDP_ADDR, acpi_rsdp_addr)
    page[E820_ENTRIES] = len(e820)
    for index, entry in enumerate(e820):
        E820_ENTRY.pack_into(
            page, E820_TABLE + index * E820_ENTRY.size, entry.addr, entry.size, int(entry.type)
        )
    page[SENTINEL] = 0
    return bytes(page)
