"""A driver side of VT-d for host-side tests: root, context and second-level page tables built by hand in a
GuestMemory, and the register sequences of the Intel VT-d specification played against a VtdUnit."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from kvmlet.devices.iommu import regs as r
from kvmlet.devices.iommu.vtd import VtdUnit
from kvmlet.memory import GuestMemory

PAGE = 4096
_ENTRY = struct.Struct("<QQ")


@dataclass
class Tables:
    """Translation structures in guest memory from ``base`` on (one bump allocator of zeroed pages)."""

    memory: GuestMemory
    base: int = 0x200000
    next_page: int = field(default=0, init=False)
    root: int = field(default=0, init=False)
    context_tables: dict[int, int] = field(default_factory=dict, init=False)
    domains: dict[int, tuple[int, int]] = field(default_factory=dict, init=False)   # did -> (table, levels)

    def __post_init__(self) -> None:
        self.next_page = self.base
        self.root = self.page()

    def page(self) -> int:
        address = self.next_page
        self.next_page += PAGE
        self.memory.fill(address, PAGE)
        return address

    def domain(self, did: int, levels: int = 4) -> int:
        if did not in self.domains:
            self.domains[did] = (self.page(), levels)
        return self.domains[did][0]

    def context(self, source_id: int, did: int, *, levels: int = 4, tt: int = 0, fpd: bool = False,
                present: bool = True, lo_extra: int = 0, hi_extra: int = 0) -> None:
        bus, devfn = source_id >> 8, source_id & 0xFF
        if bus not in self.context_tables:
            self.context_tables[bus] = self.page()
            self.memory.write(self.root + 16 * bus, _ENTRY.pack(self.context_tables[bus] | r.ROOT_P, 0))
        table = self.domain(did, levels) if tt != 2 else 0
        aw = {3: 1, 4: 2}.get(levels, levels)
        lo = table | (tt << 2) | (r.CONTEXT_FPD if fpd else 0) | (r.CONTEXT_P if present else 0) | lo_extra
        hi = aw | did << 8 | hi_extra
        self.memory.write(self.context_tables[bus] + 16 * devfn, _ENTRY.pack(lo, hi))

    def _entry(self, did: int, iova: int, level_to: int) -> int:
        """Address of the entry at ``level_to`` for ``iova`` (intermediate tables made present, R+W)."""
        table, levels = self.domains[did]
        for level in range(levels, level_to, -1):
            slot = table + 8 * (iova >> (12 + 9 * (level - 1)) & 0x1FF)
            entry = self.memory.read_u64(slot)
            if not entry & 3:
                entry = self.page() | r.SL_R | r.SL_W
                self.memory.write_u64(slot, entry)
            table = entry & r.SL_ADDRESS_MASK
        return table + 8 * (iova >> (12 + 9 * (level_to - 1)) & 0x1FF)

    def map(self, did: int, iova: int, gpa: int, size: int = PAGE, *, read: bool = True, write: bool = True,
            extra: int = 0) -> None:
        level = {PAGE: 1, 2 << 20: 2, 1 << 30: 3}[size]
        flags = (r.SL_R if read else 0) | (r.SL_W if write else 0) | (r.SL_PS if level > 1 else 0)
        self.memory.write_u64(self._entry(did, iova, level), gpa | flags | extra)

    def unmap(self, did: int, iova: int, size: int = PAGE) -> None:
        level = {PAGE: 1, 2 << 20: 2, 1 << 30: 3}[size]
        self.memory.write_u64(self._entry(did, iova, level), 0)


def write64(unit: VtdUnit, offset: int, value: int) -> None:
    unit.bus_write(offset, 8, value)


def read32(unit: VtdUnit, offset: int) -> int:
    return unit.bus_read(offset, 4)


def gcmd(unit: VtdUnit, bits: int, on: bool = True) -> None:
    """Read GSTS, set or clear one command, write GCMD (the sequence of section 10.4.4)."""
    status = read32(unit, r.GSTS) & (r.GSTS_TES | r.GSTS_QIES)
    unit.bus_write(r.GCMD, 4, (status | bits) if on else (status & ~bits))


def enable(unit: VtdUnit, tables: Tables) -> None:
    write64(unit, r.RTADDR, tables.root)
    gcmd(unit, r.Gcmd.SRTP)
    write64(unit, r.CCMD, r.CCMD_ICC | 1 << r.CCMD_CIRG_SHIFT)
    write64(unit, r.IOTLB, r.IOTLB_IVT | 1 << r.IOTLB_IIRG_SHIFT)
    gcmd(unit, r.Gcmd.TE)


def fault_records(unit: VtdUnit) -> list[tuple[int, int, int, bool]]:
    """(iova page, source id, reason, read) of each pending record, through the registers."""
    out = []
    for index in range(r.FAULT_RECORDS):
        lo = unit.bus_read(r.FAULT_REGS + 16 * index, 8)
        hi = unit.bus_read(r.FAULT_REGS + 16 * index + 8, 8)
        if hi & r.FRCD_F:
            out.append((lo, hi & 0xFFFF, hi >> 32 & 0xFF, bool(hi & r.FRCD_T)))
    return out


def clear_faults(unit: VtdUnit) -> None:
    for index in range(r.FAULT_RECORDS):
        unit.bus_write(r.FAULT_REGS + 16 * index + 12, 4, 0x8000_0000)
    unit.bus_write(r.FSTS, 4, r.FSTS_PFO | r.FSTS_IQE)
