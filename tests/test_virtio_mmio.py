"""The virtio-mmio transport (version 2): registers, the device status state machine, feature
negotiation, queue configuration, notifications and interrupts; guest mistakes are refused or make the
device need a reset, never more."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest

from kvmlet.devices.irq import NullInterrupt
from kvmlet.devices.virtio.constants import (
    MMIO_MAGIC,
    MMIO_VENDOR_ID,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    DeviceStatus,
    DeviceType,
    MmioRegister,
    feature_bit,
)
from kvmlet.devices.virtio.mmio import MmioTransport
from kvmlet.devices.virtio.rng import VirtioRng
from kvmlet.memory import GuestMemory
from tests.support.virtq import DriverRing, MmioDriver

R = MmioRegister
S = DeviceStatus
VERSION_1 = feature_bit(VIRTIO_F_VERSION_1)


class FakeScheduler:
    def __init__(self) -> None:
        self.calls: list[tuple[float, Callable[[], None]]] = []

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        self.calls.append((delay, callback))


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    with GuestMemory([(0, 1 << 20)], hugepages=False) as mem:
        yield mem


@pytest.fixture
def irq() -> NullInterrupt:
    return NullInterrupt()


@pytest.fixture
def transport(memory: GuestMemory, irq: NullInterrupt) -> Iterator[MmioTransport]:
    t = MmioTransport(VirtioRng(), memory, irq, FakeScheduler())
    yield t
    t.close()


@pytest.fixture
def driver(transport: MmioTransport) -> MmioDriver:
    return MmioDriver(transport)


def _rng_request(ring: DriverRing, length: int = 32) -> tuple[int, int]:
    buf = ring.buffer(length)
    head = ring.add_chain([(*buf, True)])
    ring.publish(head)
    return head, buf[0]


def test_identification_registers(driver: MmioDriver) -> None:
    assert driver.read(R.MAGIC_VALUE) == MMIO_MAGIC
    assert driver.read(R.VERSION) == 2
    assert driver.read(R.DEVICE_ID) == DeviceType.ENTROPY
    assert driver.read(R.VENDOR_ID) == MMIO_VENDOR_ID
    features = driver.device_features()
    assert features & VERSION_1 and features & feature_bit(VIRTIO_F_EVENT_IDX)
    driver.write(R.DEVICE_FEATURES_SEL, 7)
    assert driver.read(R.DEVICE_FEATURES) == 0
    driver.write(R.QUEUE_SEL, 0)
    assert driver.read(R.QUEUE_NUM_MAX) == 256
    driver.write(R.QUEUE_SEL, 1)
    assert driver.read(R.QUEUE_NUM_MAX) == 0  # no such queue
    assert driver.read(R.SHM_LEN_LOW) == 0xFFFFFFFF and driver.read(R.SHM_BASE_HIGH) == 0xFFFFFFFF
    assert driver.read(R.CONFIG_GENERATION) == 0


def test_full_initialization_and_a_request(driver: MmioDriver, transport: MmioTransport,
                                           memory: GuestMemory, irq: NullInterrupt) -> None:
    ring = DriverRing(memory)
    driver.start(ring)
    assert transport.device.active
    assert driver.status == S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK
    head, gpa = _rng_request(ring)
    assert driver.notify() == 1
    assert ring.take_used() == [(head, 32)]
    assert memory.read(gpa, 32) != bytes(32)
    assert irq.count == 1 and driver.read(R.INTERRUPT_STATUS) == 1
    driver.write(R.INTERRUPT_ACK, 1)
    assert driver.read(R.INTERRUPT_STATUS) == 0


def test_interrupt_ack_does_not_wait_for_queue_processing(driver: MmioDriver, transport: MmioTransport,
                                                         memory: GuestMemory) -> None:
    """A vCPU acknowledging an interrupt while the event-loop thread holds the transport (processing a
    queue) goes on at once; a register that needs the transport waits."""
    driver.start(DriverRing(memory))
    transport.interrupt_status = 1
    holding, release = threading.Event(), threading.Event()

    def process() -> None:
        with transport._lock:
            holding.set()
            release.wait(5)

    processor = threading.Thread(target=process)
    processor.start()
    try:
        assert holding.wait(5)
        acked = threading.Thread(target=driver.write, args=(R.INTERRUPT_ACK, 1))
        acked.start()
        acked.join(2)
        assert not acked.is_alive() and driver.read(R.INTERRUPT_STATUS) == 0
        selected = threading.Thread(target=driver.write, args=(R.QUEUE_SEL, 0))
        selected.start()
        selected.join(0.2)
        assert selected.is_alive()   # waits for the transport, as it should
    finally:
        release.set()
        processor.join()
    selected.join(5)
    assert not selected.is_alive()


def test_negotiated_ring_features_reach_the_queue(driver: MmioDriver, transport: MmioTransport,
                                                   memory: GuestMemory) -> None:
    ring = DriverRing(memory)
    driver.start(ring, VERSION_1 | feature_bit(VIRTIO_F_EVENT_IDX))
    queue = transport.queues[0]
    assert queue.event_idx and not queue.indirect_allowed
    assert transport.device.features == VERSION_1 | feature_bit(VIRTIO_F_EVENT_IDX)


@pytest.mark.parametrize("case", ["never-offered", "high-word", "no-version-1", "before-driver"])
def test_features_ok_is_refused(driver: MmioDriver, transport: MmioTransport, case: str) -> None:
    driver.write(R.STATUS, 0)
    driver.write(R.STATUS, S.ACKNOWLEDGE)
    if case != "before-driver":
        driver.write(R.STATUS, S.ACKNOWLEDGE | S.DRIVER)
    features = driver.device_features()
    if case == "never-offered":
        features |= feature_bit(50)
    elif case == "no-version-1":
        features &= ~VERSION_1
    driver.set_driver_features(features)
    if case == "high-word":
        driver.write(R.DRIVER_FEATURES_SEL, 3)
        driver.write(R.DRIVER_FEATURES, 1)
    driver.write(R.STATUS, driver.status | S.FEATURES_OK)
    assert not driver.status & S.FEATURES_OK
    assert transport.stats.features_refused == 1 and "FEATURES_OK refused" in transport.stats.last_error
    # the driver gives up; a reset lets it try again properly
    driver.write(R.STATUS, driver.status | S.FAILED)
    assert driver.status & S.FAILED
    assert driver.negotiate()


def test_driver_features_are_frozen_after_features_ok(driver: MmioDriver, transport: MmioTransport) -> None:
    assert driver.negotiate(VERSION_1)
    driver.set_driver_features(VERSION_1 | feature_bit(VIRTIO_F_INDIRECT_DESC))
    assert transport.driver_features == VERSION_1
    assert transport.stats.ignored_writes == 2


def test_status_bits_cannot_be_cleared_or_forged(driver: MmioDriver) -> None:
    driver.write(R.STATUS, S.ACKNOWLEDGE | S.DRIVER)
    driver.write(R.STATUS, S.ACKNOWLEDGE)  # tries to clear DRIVER
    assert driver.status == S.ACKNOWLEDGE | S.DRIVER
    driver.write(R.STATUS, S.ACKNOWLEDGE | S.DRIVER | S.DEVICE_NEEDS_RESET)
    assert not driver.status & S.DEVICE_NEEDS_RESET


def test_driver_ok_without_features_ok_needs_reset(driver: MmioDriver, transport: MmioTransport,
                                                   irq: NullInterrupt) -> None:
    driver.write(R.STATUS, S.ACKNOWLEDGE | S.DRIVER)
    driver.write(R.STATUS, S.ACKNOWLEDGE | S.DRIVER | S.DRIVER_OK)
    assert driver.status & S.DEVICE_NEEDS_RESET
    assert not transport.device.active
    assert driver.read(R.INTERRUPT_STATUS) == 2 and irq.count == 1  # configuration change
    driver.write(R.STATUS, 0)
    assert driver.status == 0 and driver.read(R.INTERRUPT_STATUS) == 0


def test_reset_clears_everything(driver: MmioDriver, transport: MmioTransport, memory: GuestMemory) -> None:
    ring = DriverRing(memory)
    driver.start(ring)
    _rng_request(ring)
    driver.notify()
    driver.write(R.QUEUE_SEL, 0)
    assert driver.read(R.QUEUE_READY) == 1
    driver.write(R.STATUS, 0)
    assert driver.status == 0 and driver.read(R.QUEUE_READY) == 0
    assert driver.read(R.INTERRUPT_STATUS) == 0
    assert transport.driver_features == 0 and not transport.device.active
    queue = transport.queues[0]
    assert queue.desc_addr == queue.driver_addr == queue.device_addr == 0 and queue.size == 256
    assert transport.stats.resets >= 2


@pytest.mark.parametrize("size", [0, 3, 100, 512])
def test_bad_queue_size_needs_reset(driver: MmioDriver, transport: MmioTransport, memory: GuestMemory,
                                    size: int) -> None:
    ring = DriverRing(memory)
    assert driver.negotiate()
    driver.setup_queue(0, ring)
    driver.write(R.QUEUE_READY, 0)
    driver.write(R.QUEUE_NUM, size)
    driver.write(R.QUEUE_READY, 1)
    assert driver.read(R.QUEUE_READY) == 0
    assert driver.status & S.DEVICE_NEEDS_RESET
    assert "power of two" in transport.stats.last_error
    driver.driver_ok()
    assert not transport.device.active  # the error stands until a reset


def test_queue_outside_guest_memory_needs_reset(driver: MmioDriver, transport: MmioTransport,
                                                memory: GuestMemory) -> None:
    assert driver.negotiate()
    ring = DriverRing(memory)
    driver.write(R.QUEUE_SEL, 0)
    driver.write(R.QUEUE_NUM, 16)
    driver.write(R.QUEUE_DESC_LOW, ring.desc)
    driver.write(R.QUEUE_DRIVER_LOW, ring.avail)
    driver.write(R.QUEUE_DEVICE_HIGH, 0x10)  # used ring at 64 GiB
    driver.write(R.QUEUE_READY, 1)
    assert driver.status & S.DEVICE_NEEDS_RESET and "not in guest RAM" in transport.stats.last_error


def test_live_queue_configuration_cannot_change(driver: MmioDriver, transport: MmioTransport,
                                                memory: GuestMemory) -> None:
    ring = DriverRing(memory)
    driver.start(ring)
    driver.write(R.QUEUE_SEL, 0)
    driver.write(R.QUEUE_NUM, 4)
    driver.write(R.QUEUE_DESC_LOW, 0x5000)
    assert transport.queues[0].size == ring.size and transport.queues[0].desc_addr == ring.desc
    assert transport.stats.ignored_writes == 2


def test_notify_before_driver_ok_is_ignored_and_counted(driver: MmioDriver, transport: MmioTransport,
                                                        memory: GuestMemory) -> None:
    ring = DriverRing(memory)
    assert driver.negotiate()
    driver.setup_queue(0, ring)
    head, _ = _rng_request(ring)
    assert driver.notify() == 1
    assert transport.stats.notifies_before_driver_ok == 1
    assert ring.used_idx() == 0  # nothing consumed before DRIVER_OK
    driver.driver_ok()
    transport.poll()  # DRIVER_OK kicks the live queues: the buffer is used now
    assert ring.take_used() == [(head, 32)]


def test_notify_for_a_queue_that_does_not_exist(driver: MmioDriver, transport: MmioTransport,
                                               memory: GuestMemory) -> None:
    driver.start(DriverRing(memory))
    driver.write(R.QUEUE_NOTIFY, 5)
    assert transport.stats.notifies_invalid_queue == 1 and transport.poll() == 0


def test_broken_ring_needs_reset_and_signals_config_change(driver: MmioDriver, transport: MmioTransport,
                                                           memory: GuestMemory, irq: NullInterrupt) -> None:
    ring = DriverRing(memory)
    driver.start(ring)
    memory.write_u16(ring.avail + 2, 200)  # the available index jumps past the queue size
    driver.notify()
    assert driver.status & S.DEVICE_NEEDS_RESET
    assert driver.read(R.INTERRUPT_STATUS) & 2 and irq.count == 1
    assert not transport.device.active
    # the driver recovers with a reset and a fresh start
    ring2 = DriverRing(memory)
    driver.start(ring2)
    head, _ = _rng_request(ring2)
    driver.notify()
    assert ring2.take_used() == [(head, 32)]


def test_failed_stops_the_device(driver: MmioDriver, transport: MmioTransport, memory: GuestMemory) -> None:
    ring = DriverRing(memory)
    driver.start(ring)
    driver.write(R.STATUS, driver.status | S.FAILED)
    _rng_request(ring)
    driver.notify()
    assert ring.used_idx() == 0


def test_register_access_width_is_enforced(driver: MmioDriver, transport: MmioTransport) -> None:
    assert transport.bus_read(R.MAGIC_VALUE, 2) == 0
    assert transport.bus_read(R.MAGIC_VALUE + 1, 4) == 0
    transport.bus_write(R.STATUS, 1, 1)
    assert driver.status == 0
    assert driver.read(R.QUEUE_NOTIFY) == 0  # write-only
    assert transport.stats.bad_accesses == 4


def test_config_space_reads(memory: GuestMemory) -> None:
    from kvmlet.devices.virtio.device import VirtioDevice

    class ConfigDevice(VirtioRng):
        def config_space(self) -> bytes:
            return bytes(range(1, 13))

    t = MmioTransport(ConfigDevice(), memory, NullInterrupt())
    try:
        assert t.bus_read(0x100, 1) == 1
        assert t.bus_read(0x101, 2) == 0x0302
        assert t.bus_read(0x104, 4) == 0x08070605
        assert t.bus_read(0x104, 8) == 0x0C0B0A0908070605
        assert t.bus_read(0x10A, 4) == 0x0C0B  # past the end reads as zero
        assert t.bus_read(0x200, 4) == 0
        assert t.bus_read(0x100, 3) == 0 and t.stats.bad_accesses == 1
        assert isinstance(t.device, VirtioDevice)
    finally:
        t.close()


def test_timer_after_a_reset_does_nothing(driver: MmioDriver, transport: MmioTransport,
                                          memory: GuestMemory) -> None:
    ring = DriverRing(memory)
    driver.start(ring)
    transport.schedule_queue(0, 0.5)
    scheduler = transport.scheduler
    assert isinstance(scheduler, FakeScheduler) and len(scheduler.calls) == 1
    driver.write(R.STATUS, 0)
    _rng_request(ring)
    scheduler.calls[0][1]()
    assert ring.used_idx() == 0


def test_device_bug_makes_the_device_need_reset(driver: MmioDriver, transport: MmioTransport,
                                                memory: GuestMemory) -> None:
    ring = DriverRing(memory)
    driver.start(ring)

    def broken(index: int) -> None:
        raise ZeroDivisionError("bug")

    transport.device.process_queue = broken  # type: ignore[method-assign]
    driver.notify()
    assert driver.status & S.DEVICE_NEEDS_RESET and "internal error" in transport.stats.last_error
