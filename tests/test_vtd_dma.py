"""DMA isolation without a VM: a virtio-blk device behind the VT-d unit, driven with I/O virtual addresses.

Every access of the device (rings, descriptors, buffers) goes through its DMA address space: mapped pages work,
an unmapped, read-only or other domain's page fails the request with the fault recorded and memory unchanged,
an invalidation drops the views the queue kept, and nothing outside guest RAM is ever reached."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmlet.devices.iommu import regs as r
from kvmlet.devices.iommu.dma import DmaAddressSpace, DmaScatteredError, DmaTargetError
from kvmlet.devices.iommu.vtd import DmaFault, VtdUnit
from kvmlet.devices.pci.virtio_pci import PciTransport
from kvmlet.devices.virtio.blk import VirtioBlock
from kvmlet.devices.virtio.blk_backend import BlockBackend
from kvmlet.devices.virtio.constants import VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1, DeviceStatus, feature_bit
from kvmlet.memory import GuestMemory, MiB
from tests.support.pcidriver import FakeRouter, PciDriver
from tests.support.virtq import DATA_ADDR, DriverRing
from tests.support.vtd import PAGE, Tables, enable, fault_records, write64

SID = 0x08
OFFSET = 0x40_0000_0000     # IOVA = GPA + OFFSET for what the tests map
SECTORS = 64
FEATURES = feature_bit(VIRTIO_F_VERSION_1) | feature_bit(VIRTIO_F_ACCESS_PLATFORM)


class Rig:
    def __init__(self, memory: GuestMemory, tmp_path: Path, *, translate: bool = True) -> None:
        self.memory = memory
        self.unit = VtdUnit(memory)
        self.tables = Tables(memory, base=0x800000)
        self.tables.context(SID, 1)
        self.space = DmaAddressSpace(memory, self.unit, SID)
        image = tmp_path / "disk.img"
        image.write_bytes(bytes((i * 13 + (i >> 9)) & 0xFF for i in range(SECTORS * 512)))
        self.disk = image.read_bytes()
        device = VirtioBlock(BlockBackend.open(str(image), readonly=False), drive_id="d0", name="drive:d0")
        self.router = FakeRouter()
        self.transport = PciTransport(device, self.space, router=self.router, translated=True)
        self.driver = PciDriver(self.transport)
        self.ring = DriverRing(memory)
        if translate:
            for page in range(0, 0x100000, PAGE):       # the first MiB: rings and buffers of DriverRing
                self.tables.map(1, OFFSET + page, page)
            enable(self.unit, self.tables)
        self.driver.start(self.ring, FEATURES, offset=OFFSET if translate else 0)

    def read(self, sector: int, *, data_iova: int | None = None, length: int = 512) -> tuple[int, int, int]:
        """A read of ``length`` bytes into a new buffer (or ``data_iova``): (used length, data gpa, status gpa)."""
        header, _ = self.ring.buffer(bytes(8) + sector.to_bytes(8, "little"))
        data, _ = self.ring.buffer(length) if data_iova is None else (data_iova - OFFSET, length)
        status, _ = self.ring.buffer(b"\xff")
        target = data + OFFSET if data_iova is None else data_iova
        head = self.ring.add_chain([(header + OFFSET, 16, False), (target, length, True),
                                    (status + OFFSET, 1, True)])
        self.ring.publish(head)
        self.driver.notify()
        used = self.ring.take_used()
        assert [h for h, _ in used] == [head]
        return used[0][1], data, status

    def invalidate_page(self, iova: int) -> None:
        write64(self.unit, r.IVA, iova)
        write64(self.unit, r.IOTLB, r.IOTLB_IVT | 3 << r.IOTLB_IIRG_SHIFT | 1 << r.IOTLB_DID_SHIFT)

    def close(self) -> None:
        self.transport.close()
        self.router.close()


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    mem = GuestMemory.with_size(64 * MiB)
    yield mem
    mem.close()


@pytest.fixture
def rig(memory: GuestMemory, tmp_path: Path) -> Iterator[Rig]:
    r_ = Rig(memory, tmp_path)
    yield r_
    r_.close()


def test_requests_through_io_virtual_addresses(rig: Rig) -> None:
    used, data, status = rig.read(2)
    assert used == 513 and rig.memory.read(status, 1) == b"\0"
    assert rig.memory.read(data, 512) == rig.disk[1024:1536]
    stats = rig.unit.stats
    assert stats.translations > 0 and stats.window_hits > 0 and stats.faults == 0


def test_an_unmapped_page_fails_the_request_and_stays_untouched(rig: Rig) -> None:
    page = 0x60000
    rig.memory.fill(page, PAGE, 0xA5)
    used, _, _ = rig.read(0, data_iova=OFFSET + page)                   # mapped: fine
    assert used == 513
    rig.memory.fill(page, PAGE, 0xA5)
    rig.tables.unmap(1, OFFSET + page)
    rig.invalidate_page(OFFSET + page)
    used, _, status = rig.read(1, data_iova=OFFSET + page)
    assert used == 0                                                    # the chain is refused whole
    assert rig.memory.read(status, 1) == b"\xff"
    assert rig.memory.read(page, PAGE) == b"\xa5" * PAGE
    assert fault_records(rig.unit) == [(OFFSET + page, SID, 5, False)]
    assert rig.transport.status & DeviceStatus.DRIVER_OK and not rig.transport.status & DeviceStatus.DEVICE_NEEDS_RESET


def test_permissions_per_direction(rig: Rig) -> None:
    page = 0x70000
    rig.tables.map(1, OFFSET + page, page, write=False)                 # read-only: the device may not write it
    rig.invalidate_page(OFFSET + page)
    used, _, _ = rig.read(0, data_iova=OFFSET + page)
    assert used == 0 and fault_records(rig.unit)[0][2:] == (5, False)


def test_invalidation_drops_the_queues_views(rig: Rig) -> None:
    """The queue keeps the window of its last buffer page; after the guest remaps that page and invalidates, the
    next buffer in it goes to the new page, not the old one."""
    page, other = 0x50000, 0x90000
    used, _, _ = rig.read(0, data_iova=OFFSET + page)
    assert used == 513
    rig.memory.fill(page, PAGE, 0x5A)
    rig.tables.map(1, OFFSET + page, other)
    rig.invalidate_page(OFFSET + page)
    used, _, _ = rig.read(0, data_iova=OFFSET + page)
    assert used == 513
    assert rig.memory.read(page, PAGE) == b"\x5a" * PAGE
    assert rig.memory.read(other, 512) == rig.disk[:512]


def test_scattered_buffer_is_split(rig: Rig) -> None:
    """Two I/O virtual pages in a row that map to guest pages far apart: one descriptor, two pieces."""
    base = OFFSET + 0x200000
    rig.tables.map(1, base, 0xA0000)
    rig.tables.map(1, base + PAGE, 0x30000)
    rig.invalidate_page(base)
    used, _, _ = rig.read(0, data_iova=base, length=2 * PAGE)
    assert used == 2 * PAGE + 1
    assert rig.memory.read(0xA0000, PAGE) == rig.disk[:PAGE]
    assert rig.memory.read(0x30000, PAGE) == rig.disk[PAGE:2 * PAGE]
    with pytest.raises(DmaScatteredError):
        rig.space.region_of(base, 2 * PAGE, write=True)
    assert rig.space.segments(base, 2 * PAGE, True) == [(base, PAGE), (base + PAGE, PAGE)]


def test_translations_into_the_mmio_hole_reach_nothing(rig: Rig) -> None:
    rig.tables.map(1, OFFSET + 0x300000, 0xE000_0000)                   # onto ECAM: not RAM
    rig.invalidate_page(OFFSET + 0x300000)
    used, _, _ = rig.read(0, data_iova=OFFSET + 0x300000)
    assert used == 0 and rig.unit.stats.faults == 0                     # not a remapping fault: nothing there
    with pytest.raises(DmaTargetError):
        rig.space.view(OFFSET + 0x300000, 16)


def test_unmapped_rings_stop_the_device(rig: Rig) -> None:
    rig.tables.unmap(1, OFFSET + (rig.ring.used & ~(PAGE - 1)))
    write64(rig.unit, r.IOTLB, r.IOTLB_IVT | 1 << r.IOTLB_IIRG_SHIFT)
    header, _ = rig.ring.buffer(bytes(16))
    status, _ = rig.ring.buffer(b"\xff")
    rig.ring.publish(rig.ring.add_chain([(header + OFFSET, 16, False), (status + OFFSET, 1, True)]))
    rig.driver.notify()
    assert rig.transport.status & DeviceStatus.DEVICE_NEEDS_RESET
    assert any(record[2] == 5 for record in fault_records(rig.unit))


def test_pass_through_before_translation_is_enabled(memory: GuestMemory, tmp_path: Path) -> None:
    rig = Rig(memory, tmp_path, translate=False)
    try:
        header, _ = rig.ring.buffer(bytes(16))
        data, _ = rig.ring.buffer(512)
        status, _ = rig.ring.buffer(b"\xff")
        rig.ring.publish(rig.ring.add_chain([(header, 16, False), (data, 512, True), (status, 1, True)]))
        rig.driver.notify()
        assert rig.ring.take_used() == [(0, 513)] and memory.read(data, 512) == rig.disk[:512]
        assert rig.unit.stats.translations == 0
    finally:
        rig.close()


def test_dma_space_accessors(rig: Rig) -> None:
    space = rig.space
    space.write(OFFSET + DATA_ADDR, b"hello")
    assert rig.memory.read(DATA_ADDR, 5) == b"hello" and space.read(OFFSET + DATA_ADDR, 5) == b"hello"
    space.fill(OFFSET + DATA_ADDR, 5, 0x41)
    assert bytes(space.view(OFFSET + DATA_ADDR, 5)) == b"AAAAA"
    assert space.contains(OFFSET + DATA_ADDR, PAGE) and not space.contains(OFFSET + 0x5000_0000, 1)
    rig.memory.start_dirty_tracking()
    rig.memory.take_dirty()
    space.mark_dirty(OFFSET + DATA_ADDR, 1)
    assert rig.memory.take_dirty()[0][DATA_ADDR // PAGE]
    with pytest.raises(DmaFault):
        space.read(OFFSET + 0x5000_0000, 1)


def test_kept_windows_end_at_an_invalidation(rig: Rig) -> None:
    """The address space keeps windows between accesses, but none survives an invalidation (or a switch of
    translation): the page is remapped and invalidated, the next access sees the new page."""
    iova = OFFSET + 0x70000
    rig.memory.write(0x70000, b"old page")
    rig.memory.write(0xB0000, b"new page")
    assert rig.space.read(iova, 8) == b"old page"
    hits = rig.unit.stats.window_hits
    assert rig.space.read(iova, 8) == b"old page" and rig.unit.stats.window_hits == hits + 1
    rig.tables.map(1, iova, 0xB0000)
    assert rig.space.read(iova, 8) == b"old page"         # not invalidated yet: the kept translation is allowed
    rig.invalidate_page(iova)
    assert rig.space.read(iova, 8) == b"new page"
    write64(rig.unit, r.GCMD, 0)                           # translation off: guest-physical again
    assert rig.space.read(0x70000, 8) == b"old page"
