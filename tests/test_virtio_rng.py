"""virtio-rng through a real queue and transport."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from kvmlet.config.models import RateLimiterConfig, TokenBucketConfig
from kvmlet.devices.irq import NullInterrupt
from kvmlet.devices.virtio.constants import DeviceType
from kvmlet.devices.virtio.mmio import MmioTransport
from kvmlet.devices.virtio.ratelimit import RateLimiter
from kvmlet.devices.virtio.rng import MAX_REQUEST_BYTES, VirtioRng
from kvmlet.memory import GuestMemory
from tests.support.virtq import DriverRing, MmioDriver


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    with GuestMemory([(0, 1 << 20)], hugepages=False) as mem:
        yield mem


def _start(memory: GuestMemory, limiter: RateLimiter | None = None
           ) -> tuple[VirtioRng, MmioTransport, MmioDriver, DriverRing, list[Callable[[], None]]]:
    timers: list[Callable[[], None]] = []

    class Scheduler:
        def call_later(self, delay: float, callback: Callable[[], None]) -> None:
            timers.append(callback)

    device = VirtioRng(rate_limiter=limiter)
    transport = MmioTransport(device, memory, NullInterrupt(), Scheduler())
    driver = MmioDriver(transport)
    ring = DriverRing(memory)
    driver.start(ring)
    return device, transport, driver, ring, timers


def test_buffers_are_filled_with_random_bytes(memory: GuestMemory) -> None:
    device, transport, driver, ring, _ = _start(memory)
    try:
        assert driver.read(0x008) == DeviceType.ENTROPY
        a, b = ring.buffer(16), ring.buffer(48)
        head = ring.add_chain([(*a, True), (*b, True)])
        ring.publish(head)
        driver.notify()
        assert ring.take_used() == [(head, 64)]
        data = memory.read(a[0], 16) + memory.read(b[0], 48)
        assert data != bytes(64)
        assert device.stats.bytes == 64
    finally:
        transport.close()


def test_large_buffer_is_partly_filled(memory: GuestMemory) -> None:
    _, transport, driver, ring, _ = _start(memory)
    try:
        big = ring.buffer(MAX_REQUEST_BYTES + 4096)
        head = ring.add_chain([(*big, True)])
        ring.publish(head)
        driver.notify()
        assert ring.take_used() == [(head, MAX_REQUEST_BYTES)]
    finally:
        transport.close()


def test_device_readable_buffers_are_refused(memory: GuestMemory) -> None:
    device, transport, driver, ring, _ = _start(memory)
    try:
        out, inb = ring.buffer(b"x" * 8), ring.buffer(8)
        bad = ring.add_chain([(*out, False), (*inb, True)])
        empty = ring.add_chain([(0, 0, True)])
        good_buf = ring.buffer(8)
        good = ring.add_chain([(*good_buf, True)])
        ring.publish(bad, empty, good)
        driver.notify()
        assert ring.take_used() == [(bad, 0), (empty, 0), (good, 8)]
        assert memory.read(inb[0], 8) == bytes(8) and device.stats.refused == 2
    finally:
        transport.close()


def test_bandwidth_limit(memory: GuestMemory) -> None:
    now = [0.0]
    limiter = RateLimiter(RateLimiterConfig(bandwidth=TokenBucketConfig(size=100, refill_time=1000)),
                          clock=lambda: now[0])
    device, transport, driver, ring, timers = _start(memory, limiter)
    try:
        heads = [ring.add_chain([(*ring.buffer(60), True)]) for _ in range(3)]
        ring.publish(*heads)
        driver.notify()
        assert ring.take_used() == [(heads[0], 60)]  # 40 tokens left: the second waits
        assert len(timers) == 1 and device.stats.throttled == 1
        now[0] = 0.2  # +20 tokens: 60
        timers.pop()()
        assert ring.take_used() == [(heads[1], 60)]
        now[0] = 1.0
        timers.pop()()
        assert ring.take_used() == [(heads[2], 60)]
    finally:
        transport.close()
