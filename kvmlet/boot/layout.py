"""The fixed guest-physical layout of the boot structures in the first megabyte.

Everything the loader writes besides the kernel and the initrd lives below 1 MiB, at the addresses
below. None of them overlap (``BOOT_STRUCTURES`` lists them; a test checks it). The kernel and the
initrd go at or above :data:`HIGH_MEMORY_START`.

::

    0x00000-0x003ff  real-mode IVT (left zero)
    0x00400-0x004ff  BIOS data area: the EBDA segment (0x40e) and base memory size (0x413) are set
    0x00500-0x0053f  GDT (up to 8 descriptors; 7 used)
    0x00540-0x00547  IDT (one zero descriptor: no interrupts are expected before the kernel's own)
    0x06000-0x06fff  PVH hvm_start_info, then its memory map, then its module list
    0x07000-0x07fff  Linux zero page (struct boot_params)
    0x08000-0x08fef  boot stack (grows down from 0x8ff0)
    0x09000-0x09fff  PML4
    0x0a000-0x0afff  PDPT
    0x0b000-0x0efff  4 page directories (2 MiB pages): identity map of 0-4 GiB
    0x20000-0x2ffff  kernel command line (the kernel's own limit is usually 2 KiB)
    0x9fc00-0x9ffff  EBDA, holding the Intel MP floating pointer
    0xa0000-0xeffff  legacy VGA / option ROM hole: not reported in the e820 map (with a vTPM, 0xe0000-0xeffff
                     holds its event log, reported reserved)
    0xf0000-0xf6fff  BIOS area (reserved in the e820 map): ACPI tables
    0xf7000-0xf700f  BIOS area: the VM generation ID (16 bytes; the rest of its page is left unused)
    0xf8000-0xfffff  BIOS area: the MP configuration table (up to 254 vCPUs)
    0x100000-        high memory: the kernel, then the initrd at the top of low RAM

Note: the IDT is at 0x540, not 0x520 as in Firecracker's layout, because the GDT here has 7
descriptors (56 bytes: the Linux boot protocol needs ``__BOOT_CS`` at 0x10 and ``__BOOT_DS`` at
0x18, then the TSS at 0x20 and the PVH 32-bit pair at 0x28/0x30), which would run past 0x520.
"""

from __future__ import annotations

from dataclasses import dataclass

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
PAGE_SIZE = 4096

# BIOS data area fields that tell an OS where the EBDA is (Intel MP spec 1.4, section 4).
BDA_EBDA_SEGMENT = 0x40E  # u16: EBDA segment (address >> 4)
BDA_BASE_MEMORY_KIB = 0x413  # u16: base memory size in KiB

GDT_ADDR = 0x500
GDT_MAX_ENTRIES = 8
GDT_SIZE = GDT_MAX_ENTRIES * 8
IDT_ADDR = GDT_ADDR + GDT_SIZE  # 0x540
IDT_SIZE = 8

PVH_START_INFO_ADDR = 0x6000
PVH_START_INFO_SIZE = 56  # struct hvm_start_info, version 1
PVH_MEMMAP_ADDR = 0x6040
PVH_MEMMAP_MAX_ENTRIES = 128
PVH_MEMMAP_ENTRY_SIZE = 24
PVH_MODLIST_ADDR = PVH_MEMMAP_ADDR + PVH_MEMMAP_MAX_ENTRIES * PVH_MEMMAP_ENTRY_SIZE  # 0x6c40
PVH_MODLIST_MAX_ENTRIES = 1
PVH_MODLIST_ENTRY_SIZE = 32
PVH_AREA_END = 0x7000

ZERO_PAGE_ADDR = 0x7000
ZERO_PAGE_SIZE = 4096

BOOT_STACK_BOTTOM = 0x8000
BOOT_STACK_TOP = 0x8FF0

PML4_ADDR = 0x9000
PDPT_ADDR = 0xA000
PD_ADDR = 0xB000
PD_PAGES = 4  # one page directory per GiB: 4 x 512 x 2 MiB = 4 GiB
PAGE_TABLES_END = PD_ADDR + PD_PAGES * PAGE_SIZE  # 0xf000
IDENTITY_MAP_END = 4 * GiB

CMDLINE_ADDR = 0x20000
CMDLINE_MAX_SIZE = 0x10000  # including the NUL; the kernel's limit (2048 for Linux) is lower

EBDA_START = 0x9FC00
EBDA_END = 0xA0000
MPTABLE_ADDR = EBDA_START          # the MP floating pointer

VGA_HOLE_START = 0xA0000
BIOS_AREA_START = 0xF0000
BIOS_AREA_END = 0x100000
MP_CONFIG_ADDR = 0xF8000           # the MP configuration table, in the second half of the BIOS area
# The VM generation ID (Microsoft's "Virtual Machine Generation ID" spec; kvmlet.devices.vmgenid): 16 bytes
# in reserved memory, 8-byte aligned and alone in its page (the last page before the MP configuration
# table), so that the guest can map it on its own and a write to it dirties no table.
VMGENID_ADDR = 0xF7000
VMGENID_SIZE = 16

# The vTPM's TCG event log (kvmlet.tpm), only in VMs with a vTPM: 64 KiB in the option-ROM part of the VGA hole,
# which the e820 map then reports reserved; the ACPI TPM2 table's LASA/LAML point here. Not in BOOT_STRUCTURES:
# VMs without a vTPM leave this range alone (and out of the e820 map).
TPM_EVENT_LOG_ADDR = 0xE0000
TPM_EVENT_LOG_SIZE = 0x10000

HIGH_MEMORY_START = 0x100000

# The smallest guest the loader accepts: the first MiB of boot structures plus room for a kernel.
MIN_GUEST_MEMORY = 4 * MiB


@dataclass(frozen=True)
class BootArea:
    """One fixed range of low memory the loader writes."""

    name: str
    start: int
    end: int  # exclusive


BOOT_STRUCTURES: tuple[BootArea, ...] = (
    BootArea("BIOS data area", 0x400, 0x500),
    BootArea("GDT", GDT_ADDR, GDT_ADDR + GDT_SIZE),
    BootArea("IDT", IDT_ADDR, IDT_ADDR + IDT_SIZE),
    BootArea("PVH start info", PVH_START_INFO_ADDR, PVH_AREA_END),
    BootArea("zero page", ZERO_PAGE_ADDR, ZERO_PAGE_ADDR + ZERO_PAGE_SIZE),
    BootArea("boot stack", BOOT_STACK_BOTTOM, BOOT_STACK_TOP),
    BootArea("page tables", PML4_ADDR, PAGE_TABLES_END),
    BootArea("command line", CMDLINE_ADDR, CMDLINE_ADDR + CMDLINE_MAX_SIZE),
    BootArea("EBDA (MP floating pointer)", EBDA_START, EBDA_END),
    BootArea("ACPI tables", BIOS_AREA_START, VMGENID_ADDR),
    BootArea("VM generation ID", VMGENID_ADDR, VMGENID_ADDR + VMGENID_SIZE),
    BootArea("MP configuration table", MP_CONFIG_ADDR, BIOS_AREA_END),
)


def align_up(value: int, alignment: int) -> int:
    """``value`` rounded up to a multiple of ``alignment`` (a power of two)."""
    return (value + alignment - 1) & ~(alignment - 1)


def align_down(value: int, alignment: int) -> int:
    """``value`` rounded down to a multiple of ``alignment`` (a power of two)."""
    return value & ~(alignment - 1)


def mib(size: int) -> str:
    """A size in MiB for messages: ``"64 MiB"``, ``"1.5 MiB"``."""
    value = size / MiB
    return f"{value:.0f} MiB" if value == int(value) else f"{value:.1f} MiB"
