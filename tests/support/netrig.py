"""A virtio-net device on a real TAP, driven through its MMIO transport by a hand-made driver."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from kvmlet.devices.irq import NullInterrupt
from kvmlet.devices.virtio.constants import feature_bit
from kvmlet.devices.virtio.mmio import MmioTransport
from kvmlet.devices.virtio.net import NET_HDR, VirtioNet
from kvmlet.devices.virtio.ratelimit import RateLimiter
from kvmlet.eventloop import EventLoopThread
from kvmlet.memory import GuestMemory
from tests.support.netlab import quiet_tap
from tests.support.virtq import DriverRing, MmioDriver

GUEST_MAC = bytes.fromhex("020000aabbcc")
HOST_MAC = bytes.fromhex("02000011aa22")
QUEUE_BASE = 0x100000
QUEUE_STRIDE = 0x100000
RING_SIZE = 64
MEMORY_SIZE = 16 << 20


def bits(*numbers: int) -> int:
    out = 0
    for number in numbers:
        out |= feature_bit(number)
    return out


def plain_header(flags: int = 0, gso_type: int = 0, hdr_len: int = 0, gso_size: int = 0, csum_start: int = 0,
                 csum_offset: int = 0, num_buffers: int = 0) -> bytes:
    return NET_HDR.pack(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers)


@dataclass
class RxBuffer:
    head: int
    gpa: int
    size: int


@dataclass
class NetRig:
    memory: GuestMemory
    device: VirtioNet
    transport: MmioTransport
    driver: MmioDriver
    rings: dict[int, DriverRing]
    irq: NullInterrupt
    rx_buffers: dict[int, dict[int, RxBuffer]] = field(default_factory=dict)

    @property
    def tap_name(self) -> str:
        return self.device.tap.name

    def post_rx(self, pair: int, *sizes: int, notify: bool = True) -> list[RxBuffer]:
        ring = self.rings[2 * pair]
        posted = []
        for size in sizes:
            gpa, length = ring.buffer(size)
            head = ring.add_chain([(gpa, length, True)])
            buffer = RxBuffer(head, gpa, length)
            self.rx_buffers.setdefault(pair, {})[head] = buffer
            posted.append(buffer)
            ring.publish(head)
        if notify:
            self.driver.notify(2 * pair)
        return posted

    def send(self, pair: int, frame: bytes, header: bytes | None = None, *, split: bool = True) -> int:
        """Queue ``frame`` on transmit queue ``pair`` (header and frame in separate descriptors)."""
        ring = self.rings[2 * pair + 1]
        header = plain_header() if header is None else header
        if split:
            parts = [(*ring.buffer(header), False), (*ring.buffer(frame), False)]
        else:
            parts = [(*ring.buffer(header + frame), False)]
        head = ring.add_chain(parts)
        ring.publish(head)
        self.driver.notify(2 * pair + 1)
        return head

    def wait_used(self, index: int, count: int = 1, timeout: float = 5.0) -> list[tuple[int, int]]:
        ring = self.rings[index]
        got: list[tuple[int, int]] = []
        deadline = time.monotonic() + timeout
        while len(got) < count and time.monotonic() < deadline:
            got.extend(ring.take_used())
            if len(got) < count:
                time.sleep(0.005)
        return got

    def received(self, pair: int, used: list[tuple[int, int]]) -> bytes:
        """The bytes of used receive buffers, concatenated (header of the first included)."""
        return b"".join(self.memory.read(self.rx_buffers[pair][head].gpa, length) for head, length in used)

    def control(self, command: bytes) -> int:
        assert self.device.control_index is not None
        index = self.device.control_index
        ring = self.rings[index]
        ack_gpa, _ = ring.buffer(b"\xff")
        head = ring.add_chain([(*ring.buffer(command), False), (ack_gpa, 1, True)])
        ring.publish(head)
        self.driver.notify(index)
        assert self.wait_used(index) == [(head, 1)]
        return self.memory.read(ack_gpa, 1)[0]

    def close(self) -> None:
        self.transport.close()


def make_rig(memory: GuestMemory, events: EventLoopThread, *, queues: int = 1, offloads: bool = True,
             features: int | None = None, rx_rate_limiter: RateLimiter | None = None,
             tx_rate_limiter: RateLimiter | None = None) -> NetRig:
    tap = quiet_tap(queues)
    try:
        device = VirtioNet(tap, GUEST_MAC, events, offloads=offloads,
                           rx_rate_limiter=rx_rate_limiter, tx_rate_limiter=tx_rate_limiter)
    except BaseException:
        tap.close()
        raise
    irq = NullInterrupt()
    transport = MmioTransport(device, memory, irq, events)
    driver = MmioDriver(transport)
    rig = NetRig(memory, device, transport, driver, {}, irq)
    try:
        assert driver.negotiate(features), transport.stats.last_error
        for index in range(len(device.queue_max_sizes)):
            base = QUEUE_BASE + index * QUEUE_STRIDE
            ring = DriverRing(memory, size=RING_SIZE, desc=base, avail=base + 0x1000, used=base + 0x2000,
                              data=base + 0x4000)
            driver.setup_queue(index, ring)
            rig.rings[index] = ring
        driver.driver_ok()
        transport.poll()
    except BaseException:
        rig.close()
        raise
    return rig
