"""virtio-pci without a VM: the common configuration, queues and notifications, MSI-X (routes, masking, pending
bits, garbage messages), INTx and ISR, bus mastering, the configuration access window, and snapshots."""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmlet.devices.irq import NullInterrupt
from kvmlet.devices.pci.msix import MsixTable
from kvmlet.devices.pci.virtio_pci import COMMON_OFFSET, DEVICE_OFFSET, ISR_OFFSET, MSIX_BAR, PciTransport
from kvmlet.devices.state import DeviceStateError, PciTransportState
from kvmlet.devices.virtio.blk import VirtioBlock
from kvmlet.devices.virtio.blk_backend import BlockBackend
from kvmlet.devices.virtio.constants import VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1, DeviceStatus, feature_bit
from kvmlet.devices.virtio.rng import VirtioRng
from kvmlet.memory import GuestMemory, MiB
from tests.support.pcidriver import (
    CC_MSIX,
    CC_NUMQ,
    CC_Q_MSIX,
    CC_Q_SELECT,
    CC_Q_SIZE,
    NO_VECTOR,
    FakeRouter,
    PciDriver,
)
from tests.support.virtq import DriverRing

SECTORS = 64
BLK_OUT_HEADER = 0   # VIRTIO_BLK_T_IN
BASIC = feature_bit(VIRTIO_F_VERSION_1)   # no EVENT_IDX: every used buffer is signalled


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    mem = GuestMemory.with_size(32 * MiB)
    yield mem
    mem.close()


@pytest.fixture
def router() -> Iterator[FakeRouter]:
    r = FakeRouter()
    yield r
    r.close()


def _image(path: Path) -> Path:
    path.write_bytes(bytes((i * 7 + (i >> 9)) & 0xFF for i in range(SECTORS * 512)))
    return path


def blk_transport(memory: GuestMemory, router: FakeRouter, tmp_path: Path, intx: NullInterrupt | None = None,
                  **kwargs: object) -> PciTransport:
    device = VirtioBlock(BlockBackend.open(str(_image(tmp_path / "disk.img")), readonly=False), drive_id="d0",
                         name="drive:d0")
    return PciTransport(device, memory, router=router, intx=intx or NullInterrupt(), **kwargs)   # type: ignore[arg-type]


def read_request(ring: DriverRing, sector: int, offset: int = 0) -> tuple[int, int, int]:
    """A blk read of one sector: (head, data gpa, status gpa); addresses handed out plus ``offset``."""
    header, _ = ring.buffer(bytes([BLK_OUT_HEADER, 0, 0, 0, 0, 0, 0, 0]) + sector.to_bytes(8, "little"))
    data, _ = ring.buffer(512)
    status, _ = ring.buffer(b"\xff")
    head = ring.add_chain([(header + offset, 16, False), (data + offset, 512, True), (status + offset, 1, True)])
    ring.publish(head)
    return head, data, status


def test_initialization_and_a_request(memory: GuestMemory, router: FakeRouter, tmp_path: Path) -> None:
    transport = blk_transport(memory, router, tmp_path)
    driver = PciDriver(transport)
    assert driver.read(CC_NUMQ, 2) == 1
    driver.write(CC_Q_SELECT, 2, 0)
    assert driver.read(CC_Q_SIZE, 2) == 256                          # the maximum, before the driver sets it
    driver.write(CC_Q_SELECT, 2, 7)
    assert driver.read(CC_Q_SIZE, 2) == 0                            # no such queue
    offered = driver.device_features()
    assert offered & feature_bit(VIRTIO_F_VERSION_1) and not offered & feature_bit(VIRTIO_F_ACCESS_PLATFORM)
    ring = DriverRing(memory)
    driver.start(ring, BASIC)
    _, data, status = read_request(ring, 3)
    driver.notify()
    assert ring.take_used() == [(0, 513)]
    assert memory.read(status, 1) == b"\0"
    assert memory.read(data, 512) == (tmp_path / "disk.img").read_bytes()[3 * 512:4 * 512]
    transport.close()


def test_msix_delivery_masking_and_pending_bits(memory: GuestMemory, router: FakeRouter, tmp_path: Path) -> None:
    transport = blk_transport(memory, router, tmp_path)
    driver = PciDriver(transport)
    gsi = transport.msix.vectors[0].gsi
    driver.msix_entry(0, 0xFEE0_0000, 0x51, masked=True)
    driver.msix_enable()
    ring = DriverRing(memory)
    driver.start(ring, BASIC, vector=0)
    assert driver.read(0x1A, 2) == 0                                   # queue_msix_vector kept
    read_request(ring, 0)
    driver.notify()
    assert router.fired(gsi) == 0 and driver.pending(0)                # masked: held pending
    transport.bar_write(MSIX_BAR, 12, 4, 0)                            # unmask: sent, pending cleared
    assert router.fired(gsi) == 1 and not driver.pending(0)
    assert router.routes[gsi] == (0xFEE0_0000, 0x51)
    read_request(ring, 1)
    driver.msix_enable(function_mask=True)                             # the function mask holds it too
    driver.notify()
    assert router.fired(gsi) == 0 and driver.pending(0)
    driver.msix_enable()
    assert router.fired(gsi) == 1
    # a vector beyond the table reads back as NO_VECTOR (the mapping failed); a config change uses its vector
    driver.write(CC_MSIX, 2, 5)
    assert driver.read(CC_MSIX, 2) == NO_VECTOR
    driver.msix_entry(1, 0xFEE0_0000, 0x52)
    driver.write(CC_MSIX, 2, 1)
    transport.signal_config_change()
    assert router.fired(transport.msix.vectors[1].gsi) == 1
    assert transport.bar_read(0, ISR_OFFSET, 1) == 2                   # ISR bit 1 even with MSI-X
    driver.write(CC_Q_SELECT, 2, 0)
    driver.write(CC_Q_MSIX, 2, NO_VECTOR)                               # a live queue's vector can change
    transport.close()


def test_garbage_msix_entries(memory: GuestMemory) -> None:
    writes: list[tuple[int, int]] = []
    router = FakeRouter()
    table = MsixTable(2, router, "t", message_write=lambda address, data: writes.append((address, data)))
    try:
        table.table_write(0, 4, 0x1234_5677)                             # address bits 1:0 are zero
        assert table.table_read(0, 4) == 0x1234_5674
        table.table_write(12, 4, 0xFFFF_FFFF)                            # vector control: only the mask bit
        assert table.table_read(12, 4) == 1
        for offset, size in ((1, 4), (0, 2), (0, 1), (30, 4), (32, 4), (28, 8)):
            table.table_write(offset, size, 0xFFFF_FFFF)
            assert table.table_read(offset, size) == 0
        assert table.stats.bad_accesses == 12
        table.table_write(0, 8, 0x0000_0001_2345_0000)                   # a message to ordinary memory
        table.table_write(8, 4, 0xABCD)
        table.table_write(12, 4, 0)
        table.set_control(0x8000)
        table.notify(0)
        assert writes == [(0x1_2345_0000, 0xABCD)] and router.routes == {}
        table.notify(7)                                                  # no such vector: nothing
        assert table.pba_read(0, 8) == 0 and table.pba_read(8, 8) == 0 and table.stats.bad_accesses == 13
    finally:
        router.close()


def test_intx_and_isr_without_msix(memory: GuestMemory, router: FakeRouter, tmp_path: Path) -> None:
    line = NullInterrupt()
    transport = blk_transport(memory, router, tmp_path, intx=line)
    driver = PciDriver(transport)
    ring = DriverRing(memory)
    driver.start(ring, BASIC)
    transport.function.config_write(0x04, 2, 0x6)                       # INTx enabled (Interrupt Disable clear)
    read_request(ring, 0)
    driver.notify()
    assert line.count == 1
    assert transport.function.config_read(0x06, 2) & 0x8                # Interrupt Status
    transport.intx_resample()                                           # EOI while ISR is set: asserted again
    assert line.count == 2
    assert transport.bar_read(0, ISR_OFFSET, 1) == 1                    # read and cleared
    assert transport.bar_read(0, ISR_OFFSET, 1) == 0
    assert not transport.function.config_read(0x06, 2) & 0x8
    transport.intx_resample()
    assert line.count == 2
    transport.function.config_write(0x04, 2, 0x406)                     # Interrupt Disable: no INTx
    read_request(ring, 1)
    driver.notify()
    assert line.count == 2 and transport.bar_read(0, ISR_OFFSET, 1) == 1
    transport.close()


def test_bus_mastering_gates_dma(memory: GuestMemory, router: FakeRouter, tmp_path: Path) -> None:
    transport = blk_transport(memory, router, tmp_path)
    driver = PciDriver(transport)
    ring = DriverRing(memory)
    driver.start(ring, BASIC)
    transport.function.config_write(0x04, 2, 0x2)                       # memory decoding only
    _, _, status = read_request(ring, 0)
    driver.notify()
    assert ring.take_used() == [] and memory.read(status, 1) == b"\xff"
    transport.function.config_write(0x04, 2, 0x6)
    transport.poll()
    assert ring.take_used() == [(0, 513)]
    transport.close()


def test_access_widths_and_the_configuration_window(memory: GuestMemory, router: FakeRouter,
                                                   tmp_path: Path) -> None:
    transport = blk_transport(memory, router, tmp_path)
    driver = PciDriver(transport)
    assert driver.read(CC_NUMQ, 4) == 0 and transport.stats.bad_accesses == 1   # a 16-bit field read as 32
    driver.write(0x14, 2, 0xFFFF)                                                 # status written as 16 bits
    assert driver.status == 0 and transport.stats.bad_accesses == 2
    assert driver.read(0x40, 4) == 0                                              # past the structure
    capacity = int.from_bytes((SECTORS).to_bytes(8, "little")[:4], "little")
    assert transport.bar_read(0, DEVICE_OFFSET, 4) == capacity
    # VIRTIO_PCI_CAP_PCI_CFG: bar 0, 2 bytes at num_queues, through configuration space
    function = transport.function
    cap = function.pci_cfg
    function.config_write(cap + 4, 1, 0)
    function.config_write(cap + 8, 4, COMMON_OFFSET + CC_NUMQ)
    function.config_write(cap + 12, 4, 2)
    assert function.config_read(cap + 16, 2) == 1
    function.config_write(cap + 8, 4, COMMON_OFFSET + 0x14)             # write the status through it
    function.config_write(cap + 12, 4, 1)
    function.config_write(cap + 16, 1, int(DeviceStatus.ACKNOWLEDGE))
    assert driver.status == DeviceStatus.ACKNOWLEDGE
    function.config_write(cap + 4, 1, 4)                                # a BAR that is not there: nothing
    assert function.config_read(cap + 16, 4) in range(1 << 32)
    transport.close()


def test_translated_transport_requires_access_platform(memory: GuestMemory, router: FakeRouter) -> None:
    transport = PciTransport(VirtioRng(name="rng"), memory, router=router, translated=False)
    assert not PciDriver(transport).device_features() & feature_bit(VIRTIO_F_ACCESS_PLATFORM)
    transport.close()
    from kvmlet.devices.iommu.dma import DmaAddressSpace
    from kvmlet.devices.iommu.vtd import VtdUnit

    space = DmaAddressSpace(memory, VtdUnit(memory), 0x8)
    transport = PciTransport(VirtioRng(name="rng"), space, router=router, translated=True)
    driver = PciDriver(transport)
    offered = driver.device_features()
    assert offered & feature_bit(VIRTIO_F_ACCESS_PLATFORM)
    assert not driver.negotiate(offered & ~feature_bit(VIRTIO_F_ACCESS_PLATFORM))
    assert "required" in transport.stats.last_error
    assert driver.negotiate(offered)
    transport.close()


def test_state_round_trip(memory: GuestMemory, router: FakeRouter, tmp_path: Path) -> None:
    transport = blk_transport(memory, router, tmp_path)
    driver = PciDriver(transport)
    driver.msix_entry(0, 0xFEE0_0000, 0x53)
    driver.msix_enable()
    ring = DriverRing(memory)
    driver.start(ring, BASIC, vector=0)
    read_request(ring, 0)
    driver.notify()
    ring.take_used()
    transport.pause()
    state = transport.save_state()
    assert isinstance(state, PciTransportState) and state.function.msix is not None
    second = FakeRouter()
    try:
        copy = blk_transport(memory, second, tmp_path)
        copy.restore_state(state)
        assert copy.queue_vectors == [0] and copy.msix.enabled
        assert second.routes == {copy.msix.vectors[0].gsi: (0xFEE0_0000, 0x53)}
        _, data, _ = read_request(ring, 5)
        PciDriver(copy).notify()
        assert ring.take_used() == [(3, 513)]
        assert zlib.crc32(memory.read(data, 512)) == zlib.crc32((tmp_path / "disk.img").read_bytes()[2560:3072])
        assert second.fired(copy.msix.vectors[0].gsi) == 1
        rng = PciTransport(VirtioRng(name="rng"), memory, router=second)
        with pytest.raises(DeviceStateError):
            rng.check_state(state)
        rng.close()
        copy.close()
    finally:
        second.close()
        transport.close()
