"""The emulated VT-d unit on its own: translation, faults and their recording, the caches and invalidation
(registers and queued), and what a guest programming garbage gets (Intel VT-d specification)."""

from __future__ import annotations

import struct

import pytest

from kvmlet.devices.iommu import regs as r
from kvmlet.devices.iommu.regs import FaultReason
from kvmlet.devices.iommu.vtd import DmaFault, VtdUnit
from kvmlet.memory import GuestMemory, MiB
from tests.support.vtd import PAGE, Tables, clear_faults, enable, fault_records, gcmd, read32, write64

SID = 0x0008     # 00:01.0
SID2 = 0x0010    # 00:02.0


@pytest.fixture
def memory() -> GuestMemory:
    mem = GuestMemory.with_size(64 * MiB)
    yield mem
    mem.close()


class Msi:
    def __init__(self) -> None:
        self.sent: list[tuple[int, int]] = []

    def __call__(self, address: int, data: int) -> None:
        self.sent.append((address, data))


def unit_with(memory: GuestMemory, levels: int = 4) -> tuple[VtdUnit, Tables, Msi]:
    msi = Msi()
    unit = VtdUnit(memory, msi)
    tables = Tables(memory)
    tables.context(SID, 1, levels=levels)
    enable(unit, tables)
    return unit, tables, msi


def test_registers_report_what_is_built(memory: GuestMemory) -> None:
    unit = VtdUnit(memory)
    assert read32(unit, r.VER) == 0x10
    cap = unit.bus_read(r.CAP, 8)
    assert cap >> 8 & 0x1F == 0b00110                # 39- and 48-bit tables
    assert (cap >> 16 & 0x3F) + 1 == 48
    assert (cap >> 24 & 0x3FF) * 16 == r.FAULT_REGS and (cap >> 40 & 0xFF) + 1 == 8
    assert cap >> 34 & 0xF == 0b11 and cap & r.CAP_PSI
    ecap = unit.bus_read(r.ECAP, 8)
    assert ecap & r.ECAP_QI and ecap & r.ECAP_PT and not ecap & r.ECAP_IR and not ecap & r.ECAP_DT
    assert (ecap >> 8 & 0x3FF) * 16 == r.IOTLB_REGS
    assert unit.bus_read(r.CAP, 4) == cap & 0xFFFF_FFFF and unit.bus_read(r.CAP + 4, 4) == cap >> 32
    assert read32(unit, r.FECTL) == r.CTL_IM           # masked at reset
    # byte and misaligned accesses are ignored
    assert unit.bus_read(r.VER, 1) == 0 and unit.bus_read(r.CAP + 2, 4) == 0
    unit.bus_write(r.GCMD, 2, 0xFFFF)
    assert read32(unit, r.GSTS) == 0 and unit.stats.bad_accesses == 3


def test_untranslated_until_enabled_then_translated(memory: GuestMemory) -> None:
    unit = VtdUnit(memory)
    assert unit.translate(SID, 0x1234, True) is None          # TE clear: pass-through
    tables = Tables(memory)
    tables.context(SID, 1)
    tables.map(1, 0x40_0000_0000, 0x10_0000)
    enable(unit, tables)
    assert read32(unit, r.GSTS) & r.GSTS_TES | r.GSTS_RTPS
    entry = unit.translate(SID, 0x40_0000_0123, False)
    assert entry is not None and entry.gpa == 0x10_0000 and entry.size == PAGE and entry.iova == 0x40_0000_0000
    gcmd(unit, r.Gcmd.TE, on=False)
    assert unit.translate(SID, 0x40_0000_0123, False) is None


@pytest.mark.parametrize("levels", [3, 4])
def test_page_sizes_and_levels(memory: GuestMemory, levels: int) -> None:
    unit, tables, _ = unit_with(memory, levels)
    tables.map(1, 0x4000_0000, 0x20_0000, 2 << 20)
    tables.map(1, 0x8000_0000, 0, 1 << 30)
    entry = unit.translate(SID, 0x4000_0000 + 0x12345, True)
    assert entry is not None and (entry.gpa, entry.size) == (0x20_0000, 2 << 20)
    entry = unit.translate(SID, 0x8000_0000 + 0x3456789, False)
    assert entry is not None and (entry.gpa, entry.size) == (0, 1 << 30)
    if levels == 3:   # 39 bits: 2**39 and above fault with reason 4
        with pytest.raises(DmaFault) as info:
            unit.translate(SID, 1 << 39, False)
        assert info.value.reason is FaultReason.ADDRESS_BEYOND_WIDTH


def test_permissions_are_anded_and_faults_recorded(memory: GuestMemory) -> None:
    unit, tables, msi = unit_with(memory)
    tables.map(1, 0x1000, 0x10_0000, read=True, write=False)
    assert unit.translate(SID, 0x1000, False) is not None
    with pytest.raises(DmaFault) as info:
        unit.translate(SID, 0x1008, True)
    assert info.value.reason is FaultReason.NO_WRITE
    assert fault_records(unit) == [(0x1000, SID, 5, False)]
    fsts = read32(unit, r.FSTS)
    assert fsts & r.FSTS_PPF and fsts >> 8 & 0xFF == 0
    assert msi.sent == []                                    # FECTL.IM is set: held pending
    assert read32(unit, r.FECTL) == r.CTL_IM | r.CTL_IP
    unit.bus_write(r.FEDATA, 4, 0x41)
    unit.bus_write(r.FEADDR, 4, 0xFEE0_0000)
    unit.bus_write(r.FECTL, 4, 0)                            # unmask: the held event goes out
    assert msi.sent == [(0xFEE0_0000, 0x41)] and read32(unit, r.FECTL) == 0
    with pytest.raises(DmaFault):
        unit.translate(SID, 0x1000, True)                    # same source: collapsed into the pending record
    assert len(fault_records(unit)) == 1 and unit.stats.faults_collapsed == 1
    clear_faults(unit)
    assert read32(unit, r.FSTS) == 0
    with pytest.raises(DmaFault) as info:
        unit.translate(SID, 0x9000, False)                   # not present, read: reason 6, T = read
    assert info.value.reason is FaultReason.NO_READ
    assert fault_records(unit) == [(0x9000, SID, 6, True)]
    assert msi.sent[-1] == (0xFEE0_0000, 0x41) and len(msi.sent) == 2


def test_fault_records_overflow(memory: GuestMemory) -> None:
    unit, tables, _ = unit_with(memory)
    for device in range(1, 12):
        tables.context(device << 3, device)
    write64(unit, r.CCMD, r.CCMD_ICC | 1 << r.CCMD_CIRG_SHIFT)
    for device in range(1, 12):
        with pytest.raises(DmaFault):
            unit.translate(device << 3, 0x5000, False)
    records = fault_records(unit)
    assert len(records) == r.FAULT_RECORDS
    assert sorted(sid for _, sid, _, _ in records) == [d << 3 for d in range(1, 9)]
    assert read32(unit, r.FSTS) & r.FSTS_PFO
    assert unit.stats.faults_overflowed == 3
    clear_faults(unit)
    with pytest.raises(DmaFault):
        unit.translate(SID, 0x5000, False)
    assert len(fault_records(unit)) == 1


def _fault_reason(unit: VtdUnit, sid: int = SID, iova: int = 0x1000, write: bool = False) -> FaultReason:
    with pytest.raises(DmaFault) as info:
        unit.translate(sid, iova, write)
    return info.value.reason


def test_garbage_structures_fault_with_the_right_reason(memory: GuestMemory) -> None:
    unit = VtdUnit(memory)
    tables = Tables(memory)
    enable(unit, tables)
    assert _fault_reason(unit) is FaultReason.ROOT_NOT_PRESENT
    memory.write(tables.root + 16 * 0, struct.pack("<QQ", 0x1000 | 0x100 | 1, 0))      # reserved bit 8
    assert _fault_reason(unit) is FaultReason.ROOT_RESERVED
    memory.write(tables.root, struct.pack("<QQ", 0x1000 | 1, 1))                       # upper half reserved
    assert _fault_reason(unit) is FaultReason.ROOT_RESERVED
    memory.write(tables.root, struct.pack("<QQ", 0xE000_0000 | 1, 0))                  # context table in the hole
    assert _fault_reason(unit) is FaultReason.CONTEXT_TABLE_ACCESS
    memory.write(tables.root, struct.pack("<QQ", 0, 0))
    tables.context_tables.clear()
    cases = [
        (dict(present=False), FaultReason.CONTEXT_NOT_PRESENT),
        (dict(lo_extra=0x10), FaultReason.CONTEXT_RESERVED),
        (dict(hi_extra=0x80), FaultReason.CONTEXT_RESERVED),
        (dict(hi_extra=1 << 40), FaultReason.CONTEXT_RESERVED),
        (dict(tt=1), FaultReason.CONTEXT_INVALID),
        (dict(tt=3), FaultReason.CONTEXT_INVALID),
        (dict(levels=5), FaultReason.CONTEXT_INVALID),     # AW 5 (5-level) is not in SAGAW
        (dict(levels=0), FaultReason.CONTEXT_INVALID),
    ]
    for kwargs, reason in cases:
        tables.context(SID, 7, **kwargs)       # type: ignore[arg-type]
        write64(unit, r.CCMD, r.CCMD_ICC | 1 << r.CCMD_CIRG_SHIFT)
        assert _fault_reason(unit) is reason, kwargs
    # the root table pointer beyond RAM
    write64(unit, r.RTADDR, 0x7F_0000_0000)
    gcmd(unit, r.Gcmd.SRTP)
    write64(unit, r.CCMD, r.CCMD_ICC | 1 << r.CCMD_CIRG_SHIFT)
    assert _fault_reason(unit) is FaultReason.ROOT_TABLE_ACCESS
    assert unit.stats.faults >= 10


def test_garbage_page_tables(memory: GuestMemory) -> None:
    unit, tables, _ = unit_with(memory)
    table = tables.domain(1)
    memory.write_u64(table, 0x7FFF_0000_0000 | 3)                    # PML4E to a table beyond RAM
    assert _fault_reason(unit, iova=0x1000) is FaultReason.PAGING_ENTRY_ACCESS
    memory.write_u64(table, tables.page() | 3 | r.SL_PS)             # PS in a PML4E is reserved
    assert _fault_reason(unit, iova=0x1000) is FaultReason.PAGING_ENTRY_RESERVED
    memory.write_u64(table, 0)
    tables.map(1, 0x1000, 0x10_0000, extra=r.SL_SNP)                 # SNP without ECAP.SC
    assert _fault_reason(unit, iova=0x1000) is FaultReason.PAGING_ENTRY_RESERVED
    tables.map(1, 0x1000, 0x10_0000, extra=1 << 62)                  # TM without device-TLBs
    assert _fault_reason(unit, iova=0x1000) is FaultReason.PAGING_ENTRY_RESERVED
    tables.map(1, 0x1000, 0x10_0000 | 1 << 50)                       # a frame beyond the host address width
    assert _fault_reason(unit, iova=0x1000) is FaultReason.PAGING_ENTRY_RESERVED
    tables.map(1, 0x1000, 0x10_0000, extra=1 << 55)                  # ignored bits are ignored
    assert unit.translate(SID, 0x1000, True) is not None
    tables.map(1, 0x40_0000, 0x30_1000, 2 << 20)                     # a 2 MiB page with bits 20:12 set
    assert _fault_reason(unit, iova=0x40_0000) is FaultReason.PAGING_ENTRY_RESERVED


def test_page_table_loop_is_bounded(memory: GuestMemory) -> None:
    """Tables pointing at themselves: the walk reads one entry per level and ends in the table page itself."""
    unit, tables, _ = unit_with(memory)
    table = tables.domain(1)
    memory.write_u64(table, table | 3)        # PML4[0] -> itself: PDPT, PD and PT are the same page
    entry = unit.translate(SID, 0, False)
    assert entry is not None and entry.gpa == table and entry.size == PAGE


def test_fpd_suppresses_recording(memory: GuestMemory) -> None:
    unit = VtdUnit(memory)
    tables = Tables(memory)
    tables.context(SID, 1, fpd=True)
    enable(unit, tables)
    assert _fault_reason(unit) is FaultReason.NO_READ
    assert fault_records(unit) == [] and unit.stats.faults_suppressed == 1


def test_pass_through_context(memory: GuestMemory) -> None:
    unit = VtdUnit(memory)
    tables = Tables(memory)
    tables.context(SID, 1, tt=2)
    enable(unit, tables)
    assert unit.translate(SID, 0x1234_5000, True) is None


def test_stale_iotlb_entry_until_page_selective_invalidation(memory: GuestMemory) -> None:
    unit, tables, _ = unit_with(memory)
    tables.map(1, 0x7000, 0x10_0000)
    tables.map(1, 0x9000, 0x12_0000)
    assert unit.translate(SID, 0x7000, True).gpa == 0x10_0000      # type: ignore[union-attr]
    assert unit.translate(SID, 0x9000, True).gpa == 0x12_0000      # type: ignore[union-attr]
    tables.map(1, 0x7000, 0x11_0000)
    tables.map(1, 0x9000, 0x13_0000)
    assert unit.translate(SID, 0x7000, True).gpa == 0x10_0000      # type: ignore[union-attr]  # cached
    write64(unit, r.IVA, 0x7000)                                     # AM 0: that page only
    write64(unit, r.IOTLB, r.IOTLB_IVT | 3 << r.IOTLB_IIRG_SHIFT | 1 << r.IOTLB_DID_SHIFT)
    value = unit.bus_read(r.IOTLB, 8)
    assert not value & r.IOTLB_IVT and value >> r.IOTLB_IAIG_SHIFT & 3 == 3
    assert unit.translate(SID, 0x7000, True).gpa == 0x11_0000      # type: ignore[union-attr]
    assert unit.translate(SID, 0x9000, True).gpa == 0x12_0000      # type: ignore[union-attr]  # still cached
    write64(unit, r.IVA, 0x8000 | 1)                                 # AM 1: 0x8000-0x9fff
    write64(unit, r.IOTLB, r.IOTLB_IVT | 3 << r.IOTLB_IIRG_SHIFT | 1 << r.IOTLB_DID_SHIFT)
    assert unit.translate(SID, 0x9000, True).gpa == 0x13_0000      # type: ignore[union-attr]
    # another domain's invalidation leaves this one's entries
    tables.map(1, 0x9000, 0x14_0000)
    write64(unit, r.IOTLB, r.IOTLB_IVT | 2 << r.IOTLB_IIRG_SHIFT | 2 << r.IOTLB_DID_SHIFT)
    assert unit.translate(SID, 0x9000, True).gpa == 0x13_0000      # type: ignore[union-attr]
    write64(unit, r.IOTLB, r.IOTLB_IVT | 2 << r.IOTLB_IIRG_SHIFT | 1 << r.IOTLB_DID_SHIFT)
    assert unit.translate(SID, 0x9000, True).gpa == 0x14_0000      # type: ignore[union-attr]
    # a page-selective invalidation inside a 2 MiB page drops the whole page
    tables.map(1, 0x20_0000, 0x20_0000, 2 << 20)
    assert unit.translate(SID, 0x30_0000, True).gpa == 0x20_0000   # type: ignore[union-attr]
    tables.map(1, 0x20_0000, 0x40_0000, 2 << 20)
    write64(unit, r.IVA, 0x21_0000)
    write64(unit, r.IOTLB, r.IOTLB_IVT | 3 << r.IOTLB_IIRG_SHIFT | 1 << r.IOTLB_DID_SHIFT)
    assert unit.translate(SID, 0x30_0000, True).gpa == 0x40_0000   # type: ignore[union-attr]
    # reserved granularity: refused (IAIG 0)
    write64(unit, r.IOTLB, r.IOTLB_IVT)
    assert unit.bus_read(r.IOTLB, 8) >> r.IOTLB_IAIG_SHIFT & 3 == 0


def test_domains_are_isolated(memory: GuestMemory) -> None:
    unit, tables, _ = unit_with(memory)
    tables.context(SID2, 2)
    tables.map(1, 0x5000, 0x10_0000)
    tables.map(2, 0x6000, 0x20_0000)
    assert unit.translate(SID, 0x5000, True).gpa == 0x10_0000      # type: ignore[union-attr]
    assert unit.translate(SID2, 0x6000, True).gpa == 0x20_0000     # type: ignore[union-attr]
    with pytest.raises(DmaFault):
        unit.translate(SID, 0x6000, True)                          # domain 2's page from domain 1's device
    with pytest.raises(DmaFault):
        unit.translate(SID2, 0x5000, False)
    assert {(sid, reason) for _, sid, reason, _ in fault_records(unit)} == {(SID, 5), (SID2, 6)}


def test_context_cache_invalidation_granularity(memory: GuestMemory) -> None:
    unit, tables, _ = unit_with(memory)
    tables.context(SID2, 2)
    tables.map(1, 0x5000, 0x10_0000)
    tables.map(2, 0x5000, 0x20_0000)
    assert unit.translate(SID, 0x5000, True) is not None and unit.translate(SID2, 0x5000, True) is not None
    tables.context(SID, 2)                                           # move device 1 into domain 2
    assert unit.translate(SID, 0x5000, True).gpa == 0x10_0000      # type: ignore[union-attr]  # cached context
    write64(unit, r.CCMD, r.CCMD_ICC | 3 << r.CCMD_CIRG_SHIFT | SID2 << r.CCMD_SID_SHIFT)   # another device
    assert unit.translate(SID, 0x5000, True).gpa == 0x10_0000      # type: ignore[union-attr]
    write64(unit, r.CCMD, r.CCMD_ICC | 3 << r.CCMD_CIRG_SHIFT | (SID | 7) << r.CCMD_SID_SHIFT | 3 << 32)  # FM 3
    assert unit.bus_read(r.CCMD, 8) >> r.CCMD_CAIG_SHIFT & 3 == 3
    assert unit.translate(SID, 0x5000, True).gpa == 0x20_0000      # type: ignore[union-attr]


def _qi(unit: VtdUnit, memory: GuestMemory, queue: int, descriptors: list[tuple[int, int]], start: int = 0) -> None:
    for i, (lo, hi) in enumerate(descriptors):
        memory.write(queue + 16 * ((start + i) % 256), struct.pack("<QQ", lo, hi))
    write64(unit, r.IQT, ((start + len(descriptors)) % 256) << 4)


def test_queued_invalidation(memory: GuestMemory) -> None:
    unit, tables, msi = unit_with(memory)
    queue = tables.page()
    status = tables.page()
    write64(unit, r.IQT, 0)
    write64(unit, r.IQA, queue)          # QS 0: 256 descriptors
    gcmd(unit, r.Gcmd.QIE)
    assert read32(unit, r.GSTS) & r.GSTS_QIES and unit.bus_read(r.IQH, 8) == 0
    tables.map(1, 0x7000, 0x10_0000)
    assert unit.translate(SID, 0x7000, True).gpa == 0x10_0000      # type: ignore[union-attr]
    tables.map(1, 0x7000, 0x11_0000)
    unit.bus_write(r.IEDATA, 4, 0x42)
    unit.bus_write(r.IEADDR, 4, 0xFEE0_0000)
    unit.bus_write(r.IECTL, 4, 0)
    _qi(unit, memory, queue, [(2 | 3 << 4 | 1 << 16, 0x7000),                          # page-selective, DID 1
                              (5 | r.WAIT_SW | r.WAIT_IF | 0xABCD << 32, status)])  # wait: status + interrupt
    assert unit.bus_read(r.IQH, 8) == 2 << 4
    assert memory.read_u32(status) == 0xABCD and read32(unit, r.ICS) == 1
    assert msi.sent == [(0xFEE0_0000, 0x42)]
    assert unit.translate(SID, 0x7000, True).gpa == 0x11_0000      # type: ignore[union-attr]
    # register-based invalidation is ignored while queued invalidation is on
    write64(unit, r.IOTLB, r.IOTLB_IVT | 1 << r.IOTLB_IIRG_SHIFT)
    assert unit.stats.ignored_writes >= 1
    # wrap: run the queue up to 254, then 254, 255, 0
    unit.bus_write(r.ICS, 4, 1)
    gcmd(unit, r.Gcmd.QIE, on=False)
    write64(unit, r.IQT, 0)
    gcmd(unit, r.Gcmd.QIE)
    for i in range(254):
        memory.write(queue + 16 * i, struct.pack("<QQ", 2 | 1 << 4, 0))   # global IOTLB invalidations
    write64(unit, r.IQT, 254 << 4)
    assert unit.bus_read(r.IQH, 8) == 254 << 4 and not read32(unit, r.FSTS) & r.FSTS_IQE
    _qi(unit, memory, queue, [(1 | 1 << 4, 0), (2 | 2 << 4 | 1 << 16, 0), (5 | r.WAIT_SW | 7 << 32, status)],
        start=254)
    assert unit.bus_read(r.IQH, 8) == 1 << 4 and memory.read_u32(status) == 7


@pytest.mark.parametrize("descriptor", [
    (0, 0),                                   # type 0
    (3, 0),                                   # device-TLB: no ATS
    (4, 0),                                   # interrupt entry cache: no interrupt remapping
    (6, 0), (7, 0),                           # PASID types: no scalable mode
    (1 | 1 << 4 | 1 << 8, 0),                 # context-cache with a reserved bit
    (1, 0),                                   # context-cache, granularity 0
    (2 | 1 << 4, 0x100),                      # IOTLB with a reserved high bit
    (2 | 3 << 4, 0x1000 | 1),                 # page-selective, address not aligned to its 2 pages
    (5 | 1 << 9, 0),                          # a scalable-mode type
    (5 | r.WAIT_SW, 0xE000_0000),             # status write into the MMIO hole
    (5 | r.WAIT_SW, 0x1001),                  # status address with reserved bits 1:0
])
def test_invalid_descriptors_stop_the_queue(memory: GuestMemory, descriptor: tuple[int, int]) -> None:
    unit, tables, msi = unit_with(memory)
    queue = tables.page()
    unit.bus_write(r.FEADDR, 4, 0xFEE0_0000)
    unit.bus_write(r.FECTL, 4, 0)
    write64(unit, r.IQA, queue)
    gcmd(unit, r.Gcmd.QIE)
    _qi(unit, memory, queue, [(2 | 1 << 4, 0), descriptor, (2 | 1 << 4, 0)])
    assert read32(unit, r.FSTS) & r.FSTS_IQE
    assert unit.bus_read(r.IQH, 8) == 1 << 4            # at the bad descriptor
    assert len(msi.sent) == 1                            # the fault event
    write64(unit, r.IQT, 3 << 4)                         # nothing fetched while IQE is set
    assert unit.bus_read(r.IQH, 8) == 1 << 4
    memory.write(queue + 16, struct.pack("<QQ", 2 | 1 << 4, 0))   # fix it, clear IQE, go on
    unit.bus_write(r.FSTS, 4, r.FSTS_IQE)
    write64(unit, r.IQT, 3 << 4)
    assert unit.bus_read(r.IQH, 8) == 3 << 4 and not read32(unit, r.FSTS) & r.FSTS_IQE


def test_queue_tail_beyond_the_queue(memory: GuestMemory) -> None:
    unit, tables, _ = unit_with(memory)
    write64(unit, r.IQA, tables.page())
    gcmd(unit, r.Gcmd.QIE)
    write64(unit, r.IQT, 300 << 4)          # QS 0: 256 descriptors
    assert read32(unit, r.FSTS) & r.FSTS_IQE and unit.bus_read(r.IQH, 8) == 0
    write64(unit, r.IQA, 0xE000_0000)       # a queue in the MMIO hole
    clear_faults(unit)
    write64(unit, r.IQT, 1 << 4)
    assert read32(unit, r.FSTS) & r.FSTS_IQE


def test_listeners_hear_every_invalidation(memory: GuestMemory) -> None:
    unit, _, _ = unit_with(memory)
    calls: list[int] = []
    unit.add_listener(lambda: calls.append(1))
    write64(unit, r.IOTLB, r.IOTLB_IVT | 1 << r.IOTLB_IIRG_SHIFT)
    write64(unit, r.CCMD, r.CCMD_ICC | 1 << r.CCMD_CIRG_SHIFT)
    gcmd(unit, r.Gcmd.TE, on=False)
    gcmd(unit, r.Gcmd.TE)
    assert len(calls) == 4


def test_state_round_trip(memory: GuestMemory) -> None:
    import msgspec

    from kvmlet.devices.state import VtdState

    unit, tables, _ = unit_with(memory)
    tables.map(1, 0x7000, 0x10_0000)
    with pytest.raises(DmaFault):
        unit.translate(SID, 0x8000, True)
    state = unit.save_state()
    data = msgspec.msgpack.encode(state)
    other = VtdUnit(memory)
    other.restore_state(msgspec.msgpack.decode(data, type=VtdState))
    assert other.translate(SID, 0x7000, False).gpa == 0x10_0000     # type: ignore[union-attr]
    assert fault_records(other) == fault_records(unit)
    assert other.bus_read(r.FSTS, 4) == unit.bus_read(r.FSTS, 4)
