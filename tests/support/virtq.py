"""A minimal driver side of virtio for host-side tests: split rings built by hand in a GuestMemory,
and the MMIO initialization sequence of virtio 1.2 section 3.1.1 played against a transport.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from kvmlet.devices.virtio.constants import DeviceStatus, MmioRegister
from kvmlet.devices.virtio.mmio import MmioTransport
from kvmlet.devices.virtio.queue import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    Virtqueue,
)
from kvmlet.memory import GuestMemory

DESC = struct.Struct("<QIHH")

# Default layout in a test guest's RAM (all well inside the first MiB).
DESC_ADDR = 0x10000
AVAIL_ADDR = 0x18000
USED_ADDR = 0x1C000
DATA_ADDR = 0x40000


@dataclass
class DriverRing:
    """The driver's view of one split virtqueue at fixed addresses."""

    memory: GuestMemory
    size: int = 16
    desc: int = DESC_ADDR
    avail: int = AVAIL_ADDR
    used: int = USED_ADDR
    data: int = DATA_ADDR
    next_free: int = 0           # next descriptor index handed out (no recycling: tests are short)
    avail_idx: int = 0
    last_used: int = 0
    _data_next: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self._data_next = self.data
        for start, length in ((self.desc, 16 * self.size), (self.avail, 6 + 2 * self.size),
                              (self.used, 6 + 8 * self.size)):
            self.memory.fill(start, length)

    def configure(self, queue: Virtqueue) -> None:
        """Point a device-side queue at this ring directly (queue-level tests)."""
        queue.size = self.size
        queue.desc_addr, queue.driver_addr, queue.device_addr = self.desc, self.avail, self.used

    # -- buffers ------------------------------------------------------------------------------------
    def alloc(self, length: int, align: int = 16) -> int:
        gpa = -(-self._data_next // align) * align
        self._data_next = gpa + max(length, 1)
        return gpa

    def buffer(self, content: bytes | int) -> tuple[int, int]:
        """(gpa, length) of a new buffer holding ``content`` (or ``content`` zero bytes)."""
        data = bytes(content) if isinstance(content, int) else content
        gpa = self.alloc(len(data))
        if data:
            self.memory.write(gpa, data)
        return gpa, len(data)

    # -- descriptors --------------------------------------------------------------------------------
    def write_desc(self, index: int, addr: int, length: int, flags: int = 0, next_index: int = 0,
                   table: int | None = None) -> None:
        base = self.desc if table is None else table
        self.memory.write(base + 16 * index, DESC.pack(addr, length, flags, next_index))

    def add_chain(self, parts: list[tuple[int, int, bool]]) -> int:
        """Descriptors for [(gpa, length, device_writes)], chained; returns the head index."""
        head = self.next_free
        for i, (gpa, length, writes) in enumerate(parts):
            index = self.next_free
            self.next_free += 1
            last = i == len(parts) - 1
            flags = (VIRTQ_DESC_F_WRITE if writes else 0) | (0 if last else VIRTQ_DESC_F_NEXT)
            self.write_desc(index % self.size, gpa, length, flags, (index + 1) % self.size)
        return head % self.size

    def add_indirect(self, parts: list[tuple[int, int, bool]], *, flags: int = 0) -> int:
        """One descriptor pointing at an indirect table of ``parts``; returns its index."""
        table = self.alloc(16 * len(parts), 16)
        for i, (gpa, length, writes) in enumerate(parts):
            last = i == len(parts) - 1
            f = (VIRTQ_DESC_F_WRITE if writes else 0) | (0 if last else VIRTQ_DESC_F_NEXT)
            self.write_desc(i, gpa, length, f, i + 1, table=table)
        index = self.next_free % self.size
        self.next_free += 1
        self.write_desc(index, table, 16 * len(parts), VIRTQ_DESC_F_INDIRECT | flags)
        return index

    # -- rings --------------------------------------------------------------------------------------
    def publish(self, *heads: int) -> None:
        for head in heads:
            self.memory.write_u16(self.avail + 4 + 2 * (self.avail_idx % self.size), head)
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.memory.write_u16(self.avail + 2, self.avail_idx)

    def set_avail_flags(self, flags: int) -> None:
        self.memory.write_u16(self.avail, flags)

    def set_used_event(self, value: int) -> None:
        self.memory.write_u16(self.avail + 4 + 2 * self.size, value)

    def avail_event(self) -> int:
        return self.memory.read_u16(self.used + 4 + 8 * self.size)

    def used_idx(self) -> int:
        return self.memory.read_u16(self.used + 2)

    def take_used(self) -> list[tuple[int, int]]:
        """New (id, len) used elements since the last call."""
        out = []
        while self.last_used != self.used_idx():
            elem = self.used + 4 + 8 * (self.last_used % self.size)
            out.append((self.memory.read_u32(elem), self.memory.read_u32(elem + 4)))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out


class MmioDriver:
    """Register-level driver of an :class:`MmioTransport` (32-bit accesses, as the spec requires)."""

    def __init__(self, transport: MmioTransport) -> None:
        self.t = transport

    def read(self, reg: int) -> int:
        return self.t.bus_read(reg, 4)

    def write(self, reg: int, value: int) -> None:
        self.t.bus_write(reg, 4, value)

    @property
    def status(self) -> int:
        return self.read(MmioRegister.STATUS)

    def device_features(self) -> int:
        self.write(MmioRegister.DEVICE_FEATURES_SEL, 0)
        low = self.read(MmioRegister.DEVICE_FEATURES)
        self.write(MmioRegister.DEVICE_FEATURES_SEL, 1)
        return low | self.read(MmioRegister.DEVICE_FEATURES) << 32

    def set_driver_features(self, features: int) -> None:
        for sel in (0, 1):
            self.write(MmioRegister.DRIVER_FEATURES_SEL, sel)
            self.write(MmioRegister.DRIVER_FEATURES, (features >> (32 * sel)) & 0xFFFFFFFF)

    def negotiate(self, features: int | None = None) -> bool:
        """Reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK; True if the device kept FEATURES_OK."""
        self.write(MmioRegister.STATUS, 0)
        self.write(MmioRegister.STATUS, DeviceStatus.ACKNOWLEDGE)
        self.write(MmioRegister.STATUS, DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER)
        self.set_driver_features(self.device_features() if features is None else features)
        self.write(MmioRegister.STATUS, self.status | DeviceStatus.FEATURES_OK)
        return bool(self.status & DeviceStatus.FEATURES_OK)

    def setup_queue(self, index: int, ring: DriverRing) -> None:
        self.write(MmioRegister.QUEUE_SEL, index)
        self.write(MmioRegister.QUEUE_NUM, ring.size)
        for low, addr in ((MmioRegister.QUEUE_DESC_LOW, ring.desc), (MmioRegister.QUEUE_DRIVER_LOW, ring.avail),
                          (MmioRegister.QUEUE_DEVICE_LOW, ring.used)):
            self.write(low, addr & 0xFFFFFFFF)
            self.write(low + 4, addr >> 32)
        self.write(MmioRegister.QUEUE_READY, 1)

    def driver_ok(self) -> None:
        self.write(MmioRegister.STATUS, self.status | DeviceStatus.DRIVER_OK)

    def start(self, ring: DriverRing, features: int | None = None, queue: int = 0) -> None:
        """The whole initialization sequence with one queue."""
        assert self.negotiate(features), self.t.stats.last_error
        self.setup_queue(queue, ring)
        self.driver_ok()
        assert self.status & DeviceStatus.DRIVER_OK
        self.t.poll()  # the activation kick

    def notify(self, queue: int = 0) -> int:
        """QueueNotify as an MMIO exit, then run the event loop's part; returns events handled (a drain
        that used up its time slice continues through its eventfd: those turns run too, uncounted)."""
        self.write(MmioRegister.QUEUE_NOTIFY, queue)
        handled = self.t.poll()
        for _ in range(10_000):
            if not self.t.poll():
                break
        return handled
