"""Reading a VT-d unit's translation structures from guest memory (legacy mode): root entry by bus, context
entry by device and function, then the domain's second-level page table (Intel VT-d specification, sections
3.4-3.7 and chapter 9).

Everything here is a pure function of guest memory: every table entry is read with
:meth:`~kvmlet.memory.GuestMemory.read` at an address checked to lie in guest RAM, so a root table outside RAM, a
page-table pointer into the MMIO hole or beyond the host address width, reserved bits or a "loop" of tables that
point at each other give the fault the specification names (:class:`Fault`), never an access outside the guest's
memory. A walk reads at most one entry per level (3 or 4), whatever the tables contain.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from kvmlet.devices.iommu import regs as r
from kvmlet.devices.iommu.regs import FaultReason, TranslationType
from kvmlet.memory import GuestMemory

_ENTRY = struct.Struct("<QQ")
_PTE = struct.Struct("<Q")
_LEVEL_SHIFT = {1: 12, 2: 21, 3: 30, 4: 39}


class Fault(Exception):
    """A request the unit refuses: the fault reason, and whether the context entry asked for faults not to be
    recorded (FPD)."""

    def __init__(self, reason: FaultReason, detail: str, *, recordable: bool = True) -> None:
        super().__init__(f"{detail} (fault reason {int(reason):#x}, {reason.name})")
        self.reason = reason
        self.detail = detail
        self.recordable = recordable


@dataclass(frozen=True)
class Context:
    """What a present, well-formed context entry says about one source ID."""

    domain: int
    translation: TranslationType
    table: int              # second-level page table (PML4 or PDPT) address
    levels: int             # 3 or 4
    width: int              # 39 or 48 (the AGAW): input addresses at or above 2**width fault
    fault_processing_disabled: bool


@dataclass(frozen=True)
class Translation:
    """One leaf of a second-level page table: ``size`` bytes from ``iova`` map to ``gpa``."""

    iova: int               # the page's input address (aligned to size)
    gpa: int
    size: int               # 4 KiB, 2 MiB or 1 GiB
    readable: bool
    writable: bool


def _read_entry(memory: GuestMemory, address: int, size: int) -> bytes | None:
    if address >= 1 << r.HAW or not memory.contains(address, size):
        return None
    return memory.read(address, size)


def read_context(memory: GuestMemory, root_table: int, source_id: int) -> Context:
    """The context of ``source_id`` (bus << 8 | devfn) under the root table at ``root_table``; Fault otherwise."""
    bus, devfn = source_id >> 8 & 0xFF, source_id & 0xFF
    raw = _read_entry(memory, root_table + 16 * bus, 16)
    if raw is None:
        raise Fault(FaultReason.ROOT_TABLE_ACCESS, f"root entry {bus} at {root_table + 16 * bus:#x} is not in memory")
    lo, hi = _ENTRY.unpack(raw)
    if not lo & r.ROOT_P:
        raise Fault(FaultReason.ROOT_NOT_PRESENT, f"root entry {bus} is not present")
    if lo & r.ROOT_LO_RESERVED or hi & r.ROOT_HI_RESERVED:
        raise Fault(FaultReason.ROOT_RESERVED, f"root entry {bus} has reserved bits set ({hi:#x}:{lo:#x})")
    context_table = lo & r.ROOT_CTP_MASK
    raw = _read_entry(memory, context_table + 16 * devfn, 16)
    if raw is None:
        raise Fault(FaultReason.CONTEXT_TABLE_ACCESS,
                    f"context entry {devfn:#x} at {context_table + 16 * devfn:#x} is not in memory")
    lo, hi = _ENTRY.unpack(raw)
    if not lo & r.CONTEXT_P:
        raise Fault(FaultReason.CONTEXT_NOT_PRESENT, f"context entry {bus:02x}:{devfn >> 3:02x}.{devfn & 7} is not "
                    "present")
    fpd = bool(lo & r.CONTEXT_FPD)
    if lo & r.CONTEXT_LO_RESERVED or hi & r.CONTEXT_HI_RESERVED:
        raise Fault(FaultReason.CONTEXT_RESERVED, f"context entry {devfn:#x} has reserved bits set "
                    f"({hi:#x}:{lo:#x})", recordable=not fpd)
    translation = TranslationType((lo & r.CONTEXT_TT_MASK) >> r.CONTEXT_TT_SHIFT)
    domain = (hi >> r.CONTEXT_DID_SHIFT) & ((1 << r.DOMAIN_BITS) - 1)
    if translation is TranslationType.PASS_THROUGH:
        return Context(domain, translation, 0, 0, r.HAW, fpd)
    if translation is not TranslationType.UNTRANSLATED:
        raise Fault(FaultReason.CONTEXT_INVALID, f"context entry {devfn:#x}: translation type {int(translation)} is "
                    "not supported (no device-TLBs)", recordable=not fpd)
    shape = r.ADDRESS_WIDTHS.get(hi & r.CONTEXT_AW_MASK)
    if shape is None:
        raise Fault(FaultReason.CONTEXT_INVALID, f"context entry {devfn:#x}: address width {hi & 7} is not "
                    "supported (1: 39-bit, 2: 48-bit)", recordable=not fpd)
    levels, width = shape
    return Context(domain, translation, lo & r.CONTEXT_SLPTPTR_MASK, levels, width, fpd)


def walk(memory: GuestMemory, context: Context, iova: int, write: bool) -> Translation:
    """The leaf mapping ``iova`` in ``context``'s second-level table, with the access checked; Fault otherwise.

    Permissions are the AND of every level's R and W (section 3.7); an entry with neither is not present, which
    faults as a missing permission for the request's kind (reason 5 for a write, 6 for a read)."""
    recordable = not context.fault_processing_disabled
    if iova >= 1 << context.width or iova < 0:
        raise Fault(FaultReason.ADDRESS_BEYOND_WIDTH, f"address {iova:#x} is beyond the domain's "
                    f"{context.width}-bit address width", recordable=recordable)
    table = context.table
    readable = writable = True
    for level in range(context.levels, 0, -1):
        shift = _LEVEL_SHIFT[level]
        address = table + 8 * (iova >> shift & 0x1FF)
        raw = _read_entry(memory, address, 8)
        if raw is None:
            raise Fault(FaultReason.PAGING_ENTRY_ACCESS, f"level-{level} entry at {address:#x} is not in memory",
                        recordable=recordable)
        entry = _PTE.unpack(raw)[0]
        if not entry & (r.SL_R | r.SL_W):
            raise Fault(FaultReason.NO_WRITE if write else FaultReason.NO_READ,
                        f"address {iova:#x}: level-{level} entry is not present", recordable=recordable)
        large = level in (2, 3) and bool(entry & r.SL_PS)
        reserved = r.SL_RESERVED_LARGE[level] if large else r.SL_RESERVED[level]
        if entry & reserved:
            raise Fault(FaultReason.PAGING_ENTRY_RESERVED, f"address {iova:#x}: level-{level} entry {entry:#x} has "
                        "reserved bits set", recordable=recordable)
        readable &= bool(entry & r.SL_R)
        writable &= bool(entry & r.SL_W)
        if level == 1 or large:
            size = 1 << shift
            if not (writable if write else readable):
                raise Fault(FaultReason.NO_WRITE if write else FaultReason.NO_READ,
                            f"address {iova:#x}: no {'write' if write else 'read'} permission",
                            recordable=recordable)
            frame = entry & r.SL_ADDRESS_MASK & ~(size - 1)
            return Translation(iova & ~(size - 1), frame, size, readable, writable)
        table = entry & r.SL_ADDRESS_MASK
    raise AssertionError("unreachable: level 1 is always a leaf")
