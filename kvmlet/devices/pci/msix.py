"""MSI-X (PCI Local Bus 3.0 section 6.8.2, PCI Express Base 4.0 section 6.1.4): a function's table of interrupt
messages and its pending bits, delivered through KVM.

Each vector has a GSI of its own and an eventfd registered as an irqfd on it; the GSI's routing entry is an MSI
route (KVM_SET_GSI_ROUTING) with the vector's address and data, set when the vector can fire (MSI-X enabled, the
function and the vector unmasked) and its message changed. Sending a message is one eventfd write: the kernel
delivers it to the local APIC.

What the specification says, as done here:

* a masked vector (its own mask bit, or the function mask, or bus mastering off: a function that may not
  master the bus sends no memory write, and a message is one) does not send: its pending bit is set, and the
  message goes when it is unmasked;
* a table entry is 16 bytes read and written as dwords or qwords; the low two address bits are zero; the vector
  control's bits other than the mask are reserved (read 0); other access sizes are ignored and read 0; the
  pending bit array is read-only;
* a message whose address is not in the interrupt range (0xFEE00000-0xFEEFFFFF) is not an interrupt but a plain
  memory write of the data: it goes through the function's DMA path (so through the IOMMU when there is one),
  never to a KVM route.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from kvmlet.devices.state import MsixState, expect_state

ENTRY_SIZE = 16
MAX_VECTORS = 2048
CONTROL_TABLE_SIZE_MASK = 0x7FF
CONTROL_FUNCTION_MASK = 1 << 14
CONTROL_ENABLE = 1 << 15
VECTOR_MASKED = 1
INTERRUPT_RANGE = (0xFEE0_0000, 0xFEF0_0000)
_ENTRY = struct.Struct("<IIII")


class MsiRouter(Protocol):
    """What gives vectors their GSIs, eventfds (irqfds) and KVM MSI routes (the device manager)."""

    def allocate_vector(self, what: str) -> tuple[int, int]:
        """A new (GSI, eventfd) pair, the eventfd registered as an irqfd on the GSI."""
        ...

    def set_msi_route(self, gsi: int, address: int, data: int) -> None: ...

    def clear_msi_route(self, gsi: int) -> None: ...


@dataclass
class Vector:
    gsi: int
    fd: int
    address: int = 0
    data: int = 0
    control: int = VECTOR_MASKED
    routed: tuple[int, int] | None = None    # (address, data) of the KVM route, if any
    pending: bool = False

    @property
    def masked(self) -> bool:
        return bool(self.control & VECTOR_MASKED)


@dataclass
class MsixStats:
    sent: int = 0
    held: int = 0                 # messages held pending (masked)
    memory_writes: int = 0        # messages outside the interrupt range, written to memory
    route_updates: int = 0
    bad_accesses: int = 0


def is_interrupt_address(address: int) -> bool:
    return INTERRUPT_RANGE[0] <= address < INTERRUPT_RANGE[1]


class MsixTable:
    """The MSI-X table and pending bits of one function."""

    def __init__(self, count: int, router: MsiRouter | None, name: str,
                 message_write: Callable[[int, int], None] | None = None) -> None:
        if not 1 <= count <= MAX_VECTORS:
            raise ValueError(f"MSI-X table of {count} vectors")
        self.router = router
        self.name = name
        self.message_write = message_write   # a message outside the interrupt range: (address, data) DMA write
        self.stats = MsixStats()
        self.enabled = False
        self.function_mask = False
        self.bus_master = True               # the function's command register says whether it may send
        self._lock = threading.Lock()
        self.vectors: list[Vector] = []
        for index in range(count):
            gsi, fd = router.allocate_vector(f"{name} MSI-X vector {index}") if router is not None else (-1, -1)
            self.vectors.append(Vector(gsi, fd))

    @property
    def count(self) -> int:
        return len(self.vectors)

    @property
    def table_bytes(self) -> int:
        return ENTRY_SIZE * self.count

    @property
    def pba_bytes(self) -> int:
        return 8 * ((self.count + 63) // 64)

    # -- capability ------------------------------------------------------------------------------------
    def control(self) -> int:
        return ((self.count - 1) | (CONTROL_FUNCTION_MASK if self.function_mask else 0)
                | (CONTROL_ENABLE if self.enabled else 0))

    def set_control(self, control: int) -> None:
        """Message control written (the capability's enable and function mask bits)."""
        with self._lock:
            self.enabled = bool(control & CONTROL_ENABLE)
            self.function_mask = bool(control & CONTROL_FUNCTION_MASK)
            self._update_all()

    def set_bus_master(self, enabled: bool) -> None:
        with self._lock:
            self.bus_master = enabled
            self._update_all()

    # -- table and PBA ---------------------------------------------------------------------------------
    def table_read(self, offset: int, size: int) -> int:
        if size not in (4, 8) or offset % size or offset + size > self.table_bytes:
            self.stats.bad_accesses += 1
            return 0
        with self._lock:
            vector = self.vectors[offset // ENTRY_SIZE]
            entry = _ENTRY.pack(vector.address & 0xFFFF_FFFF, vector.address >> 32, vector.data, vector.control)
        start = offset % ENTRY_SIZE
        return int.from_bytes(entry[start:start + size], "little")

    def table_write(self, offset: int, size: int, value: int) -> None:
        if size not in (4, 8) or offset % size or offset + size > self.table_bytes:
            self.stats.bad_accesses += 1
            return
        with self._lock:
            vector = self.vectors[offset // ENTRY_SIZE]
            for dword in range(size // 4):
                part = value >> (32 * dword) & 0xFFFF_FFFF
                field = (offset % ENTRY_SIZE) // 4 + dword
                if field == 0:
                    vector.address = (vector.address & ~0xFFFF_FFFF) | (part & 0xFFFF_FFFC)
                elif field == 1:
                    vector.address = (vector.address & 0xFFFF_FFFF) | part << 32
                elif field == 2:
                    vector.data = part
                else:
                    vector.control = part & VECTOR_MASKED
            self._update(vector)

    def pba_read(self, offset: int, size: int) -> int:
        if size not in (4, 8) or offset % size or offset + size > self.pba_bytes:
            self.stats.bad_accesses += 1
            return 0
        with self._lock:
            bits = sum(1 << index for index, vector in enumerate(self.vectors) if vector.pending)
        return bits >> (8 * offset) & ((1 << (8 * size)) - 1)

    # -- sending ----------------------------------------------------------------------------------------
    def _can_send(self, vector: Vector) -> bool:
        return self.enabled and self.bus_master and not self.function_mask and not vector.masked

    def _update(self, vector: Vector) -> None:
        """After a change (lock held): keep the route current and send what was held."""
        if not self._can_send(vector):
            return
        self._route(vector)
        if vector.pending:
            vector.pending = False
            self._deliver(vector)

    def _update_all(self) -> None:
        for vector in self.vectors:
            self._update(vector)

    def _route(self, vector: Vector) -> None:
        message = (vector.address, vector.data)
        if vector.routed == message or self.router is None or vector.gsi < 0:
            return
        if is_interrupt_address(vector.address):
            self.router.set_msi_route(vector.gsi, vector.address, vector.data)
        elif vector.routed is not None:
            self.router.clear_msi_route(vector.gsi)
        vector.routed = message
        self.stats.route_updates += 1

    def _deliver(self, vector: Vector) -> None:
        if is_interrupt_address(vector.address):
            self.stats.sent += 1
            if vector.fd >= 0:
                try:
                    os.eventfd_write(vector.fd, 1)
                except (BlockingIOError, OSError):
                    pass   # saturated (one is pending anyway) or closed
            return
        self.stats.memory_writes += 1
        if self.message_write is not None:
            self.message_write(vector.address, vector.data)

    def notify(self, index: int) -> None:
        """Send vector ``index`` (any thread), or hold it pending if it may not be sent now."""
        if not 0 <= index < len(self.vectors):
            return
        with self._lock:
            vector = self.vectors[index]
            if not self._can_send(vector):
                vector.pending = True
                self.stats.held += 1
                return
            self._route(vector)
            self._deliver(vector)

    # -- snapshots --------------------------------------------------------------------------------------
    def save_state(self) -> MsixState:
        with self._lock:
            return MsixState(enabled=self.enabled, function_mask=self.function_mask,
                             entries=[(v.address & 0xFFFF_FFFF, v.address >> 32, v.data, v.control)
                                      for v in self.vectors],
                             pending=sum(1 << i for i, v in enumerate(self.vectors) if v.pending))

    def restore_state(self, state: object, name: str) -> None:
        saved = expect_state(state, MsixState, f"{name} MSI-X")
        if len(saved.entries) != len(self.vectors):
            from kvmlet.devices.state import DeviceStateError

            raise DeviceStateError(f"{name}: the saved MSI-X table has {len(saved.entries)} vectors; this one "
                                   f"has {len(self.vectors)}")
        with self._lock:
            self.enabled, self.function_mask = saved.enabled, saved.function_mask
            for index, (vector, (low, high, data, control)) in enumerate(zip(self.vectors, saved.entries,
                                                                             strict=True)):
                vector.address = (high & 0xFFFF_FFFF) << 32 | (low & 0xFFFF_FFFC)
                vector.data = data & 0xFFFF_FFFF
                vector.control = control & VECTOR_MASKED
                vector.routed = None
                vector.pending = bool(saved.pending >> index & 1)
            self._update_all()
