"""Split virtqueues, device side (virtio 1.2 section 2.7).

A :class:`Virtqueue` reads the descriptor table and the available ring and writes the used ring, all
through :class:`~kvmlet.memory.GuestMemory`; every value the guest controls is checked before use:

* at ``QueueReady`` (:meth:`Virtqueue.validate`): the size is a power of two no larger than the maximum,
  each of the three areas is aligned as the specification requires and lies wholly in guest RAM;
* per request (:meth:`Virtqueue.pop`): each descriptor's buffer lies in guest RAM, ``next`` is inside the
  table, a chain visits at most queue-size descriptors (so a loop ends it), device-writable descriptors
  come after device-readable ones, the total length fits in 32 bits, and indirect tables are used only
  when VIRTIO_F_INDIRECT_DESC was negotiated, are a whole number of 8-byte aligned 16-byte descriptors,
  are not combined with NEXT and contain no further indirect descriptor;
* a chain is at most queue-size descriptors long, an indirect table's entries included (virtio 1.2,
  2.7.5.3.1: "A driver MUST NOT create a descriptor chain longer than the Queue Size of the device"). The
  table's length says how many entries it claims, so a longer chain is refused when its indirect
  descriptor is read, before a single entry is: the work a chain can cost is bounded by the queue size
  (at most 256 descriptors with kvmlet's devices), whatever the guest writes.

Two kinds of failure: a malformed chain (:class:`ChainError`) fails that request only: ``pop`` gives the
head back to the driver on the used ring with length 0, counts it and goes on (to at most the chains that
were available when it looked: one call of ``pop`` is bounded by the queue size too). A broken ring
(:class:`RingError`: the available index moved by more than the queue size, a head index outside the
table) cannot be answered on the ring at all; ``pop`` raises it and the transport sets
DEVICE_NEEDS_RESET. Nothing else escapes: guest memory access errors become one of the two.

Notification suppression: with VIRTIO_F_EVENT_IDX the device publishes ``avail_event`` and signals
the driver only when the used index passes ``used_event`` (the ``vring_need_event`` rule of section
2.7.10); without it, ``VIRTQ_AVAIL_F_NO_INTERRUPT`` in the available ring's flags suppresses signals.
In the other direction, while a device drains a queue it asks the driver not to notify it
(``disable_notification``: VIRTQ_USED_F_NO_NOTIFY, or with EVENT_IDX an ``avail_event`` left behind)
and re-enables notifications, then looks at the ring once more, before it stops (``enable_notification``).

Dirty tracking: devices write guest memory through views (of chain buffers, of the rings) that
:class:`~kvmlet.memory.GuestMemory` cannot see. While its ``dirty_tracking`` is on, the queue marks what they
wrote: :meth:`Virtqueue.complete` marks every device-writable buffer of the chain it gives back (the whole
buffer: a failed request may have written part of it), and every store into the used ring marks its bytes.
With tracking off this costs one attribute check per completion.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Protocol

from kvmlet.devices.state import QueueState, expect_state
from kvmlet.devices.virtio.chain import Buffer as Buffer
from kvmlet.devices.virtio.chain import BufferList as BufferList
from kvmlet.devices.virtio.chain import DescriptorChain as DescriptorChain
from kvmlet.devices.virtio.chain import DirectBuffer as DirectBuffer
from kvmlet.devices.virtio.chain import DirectChain as DirectChain
from kvmlet.devices.virtio.chain import (
    new_buffer,
    new_buffer_list,
    new_direct_buffer,
    new_direct_chain,
)
from kvmlet.memory import GuestMemoryError

if TYPE_CHECKING:
    from kvmlet.devices.iommu.dma import DeviceMemory

DESCRIPTOR_SIZE = 16
MAX_QUEUE_SIZE = 32768
# Descriptors in one chain, indirect table included: at most the queue's size (virtio 1.2, 2.7.5.3.1), so an
# indirect table holds at most the queue size minus the descriptors before it (a chain longer than that is
# refused as malformed, and counted in QueueStats.chains_too_long). There is no other, larger table limit.
MAX_CHAIN_BYTES = 1 << 32
MAX_DIRECT = 4            # descriptors in a chain that pop_direct takes

# Fairness: one drain of a queue (VirtioDevice.drain_queue) takes at most SLICE_CHAINS chains or runs for
# at most SLICE_SECONDS (checked after each chain), then hands the rest of the queue back to the event
# loop, which runs whatever else is ready (other queues, other devices, other VMs' devices, timers, the
# API) before it comes back. A chain costs at most queue-size descriptors to parse, so one slice lasts at
# most SLICE_SECONDS plus one chain.
SLICE_CHAINS = 256        # a full ring of kvmlet's default queue size
SLICE_SECONDS = 0.002

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4

VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

DESCRIPTOR_TABLE_ALIGN = 16
AVAIL_RING_ALIGN = 2
USED_RING_ALIGN = 4
INDIRECT_TABLE_ALIGN = 8  # the natural alignment of a descriptor's le64 address field

_DESCRIPTOR = struct.Struct("<QIHH")
_NO_VIEW = memoryview(b"")
_USED_ELEM = struct.Struct("<II")
_U16 = struct.Struct("<H")


class VirtqueueError(Exception):
    """Something the guest put in a virtqueue that the device cannot use."""


class ChainError(VirtqueueError):
    """A malformed descriptor chain: the request it carries fails, the queue goes on."""

    def __init__(self, head: int, message: str) -> None:
        super().__init__(f"descriptor chain at head {head}: {message}")
        self.head = head


class RingError(VirtqueueError):
    """A virtqueue that cannot be used any more: the device needs a reset."""


def store_u16(view: memoryview, offset: int, value: int) -> None:
    """Write a little-endian u16 the driver may be polling as one 16-bit store.

    Not with ``struct.pack_into``: it zeroes the field before writing the value (``s_pack_internal``
    starts with a memset), so a driver spinning on the used index could read 0 in between and take a
    used element that is not there. An item of a memoryview cast to ``H`` is stored in one instruction.
    """
    view[offset:offset + 2].cast("H")[0] = value


def is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """True if moving an index from ``old_idx`` to ``new_idx`` passes ``event_idx`` (mod 2**16)."""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


@dataclass
class QueueStats:
    chains: int = 0
    malformed_chains: int = 0
    chains_too_long: int = 0            # refused: longer than the queue size, indirect table included
    slices: int = 0                     # drains cut short to let other work run (SLICE_CHAINS/SECONDS)
    used_buffers: int = 0
    notifications_sent: int = 0
    notifications_suppressed: int = 0
    last_error: str = ""


class LimitCounters(Protocol):
    """Where a queue also counts the limits it enforces (e.g. its transport's published stats)."""

    chains_too_long: int


class _Rings(NamedTuple):
    """Where the three areas of a validated queue are: (view of the guest RAM region, offset in it).

    The views are the regions' own (no new export of guest memory), so the hot path reads and writes
    ring fields with one ``unpack_from`` / ``pack_into`` instead of a region lookup per access.
    """

    desc: memoryview
    desc_at: int
    avail: memoryview
    avail_at: int
    used: memoryview
    used_at: int


class Virtqueue:
    """One split virtqueue: its configuration (written by the driver through the transport) and rings."""

    def __init__(self, memory: DeviceMemory, index: int, max_size: int = 256,
                 counters: LimitCounters | None = None) -> None:
        if not is_power_of_two(max_size) or max_size > MAX_QUEUE_SIZE:
            raise ValueError(f"queue maximum size {max_size} is not a power of two up to {MAX_QUEUE_SIZE}")
        self.memory = memory
        self.index = index
        self.max_size = max_size
        self.stats = QueueStats()
        self.counters = counters      # also told of each limit hit (the transport's stats, published)
        self._fence_lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        """Back to the state after a device reset."""
        self.size = self.max_size
        self.ready = False
        self.desc_addr = 0
        self.driver_addr = 0
        self.device_addr = 0
        self.event_idx = False
        self.indirect_allowed = False
        self.next_avail = 0
        self.next_used = 0
        self._signalled_used = 0  # the used index when the driver was last considered for a signal
        self._rings: _Rings | None = None   # set by activate() (or on first use)
        self._no_notify = False             # VIRTQ_USED_F_NO_NOTIFY is set in the used ring
        self._data_region = (0, 0)          # [start, end) of the RAM region that held the last buffer
        self._data_view = _NO_VIEW          # that region's view (for pop_direct)

    # -- configuration ------------------------------------------------------------------------------
    def set_features(self, *, event_idx: bool, indirect: bool) -> None:
        self.event_idx = event_idx
        self.indirect_allowed = indirect
        self._rings = None

    @property
    def _avail_ring_size(self) -> int:
        return 4 + 2 * self.size + (2 if self.event_idx else 0)  # flags, idx, ring[, used_event]

    @property
    def _used_ring_size(self) -> int:
        return 4 + 8 * self.size + (2 if self.event_idx else 0)  # flags, idx, ring[, avail_event]

    def validate(self) -> None:
        """Check the driver's queue configuration; RingError says what is wrong."""
        if not is_power_of_two(self.size) or self.size > self.max_size:
            raise RingError(f"queue {self.index}: size {self.size} is not a power of two between 1 and "
                            f"{self.max_size}")
        areas = (("descriptor table", self.desc_addr, DESCRIPTOR_SIZE * self.size, DESCRIPTOR_TABLE_ALIGN, False),
                 ("available ring", self.driver_addr, self._avail_ring_size, AVAIL_RING_ALIGN, False),
                 ("used ring", self.device_addr, self._used_ring_size, USED_RING_ALIGN, True))
        for name, address, length, align, written in areas:
            if address % align:
                raise RingError(f"queue {self.index}: {name} at {address:#x} is not {align}-byte aligned")
            if not self._reachable(address, length, written):
                raise RingError(f"queue {self.index}: {name} at {address:#x}+{length:#x} is not in guest RAM")

    def _reachable(self, address: int, length: int, written: bool) -> bool:
        """Whether the device can reach a ring area (``written``: the device writes it)."""
        return self.memory.contains(address, length)

    def activate(self) -> None:
        """Validate and start from the beginning of the rings (the driver zeroed them)."""
        self.validate()
        self.next_avail = 0
        self.next_used = 0
        self._signalled_used = 0
        self._no_notify = False
        self._rings = self._map_rings()

    # -- snapshots ----------------------------------------------------------------------------------
    def save_state(self) -> QueueState:
        return QueueState(max_size=self.max_size, size=self.size, ready=self.ready, desc_addr=self.desc_addr,
                          driver_addr=self.driver_addr, device_addr=self.device_addr, next_avail=self.next_avail,
                          next_used=self.next_used, signalled_used=self._signalled_used, event_idx=self.event_idx,
                          indirect=self.indirect_allowed, no_notify=self._no_notify)

    def restore_state(self, state: QueueState, device: str) -> None:
        """Load a saved queue over rings that guest memory already holds (RingError if they do not fit)."""
        state = expect_state(state, QueueState, f"{device} queue {self.index}")
        self.reset()
        self.size = state.size
        self.desc_addr, self.driver_addr, self.device_addr = state.desc_addr, state.driver_addr, state.device_addr
        self.set_features(event_idx=state.event_idx, indirect=state.indirect)
        if state.ready:
            self.activate()   # validates and maps the rings (and starts the indices from 0: set below)
            self.ready = True
        self.next_avail = state.next_avail & 0xFFFF
        self.next_used = state.next_used & 0xFFFF
        self._signalled_used = state.signalled_used & 0xFFFF
        self._no_notify = state.no_notify

    def _map_rings(self) -> _Rings:
        """The areas' places in guest RAM (checked by validate(); RingError if they are not in RAM)."""
        try:
            desc = self.memory.region_of(self.desc_addr, DESCRIPTOR_SIZE * self.size)
            avail = self.memory.region_of(self.driver_addr, self._avail_ring_size)
            used = self.memory.region_of(self.device_addr, self._used_ring_size)
        except GuestMemoryError as exc:
            raise RingError(f"queue {self.index}: {exc}") from None
        return _Rings(desc.view, self.desc_addr - desc.gpa, avail.view, self.driver_addr - avail.gpa,
                      used.view, self.device_addr - used.gpa)

    def _ring_views(self) -> _Rings:
        rings = self._rings
        if rings is None:
            rings = self._rings = self._map_rings()
        return rings

    # -- ring fields --------------------------------------------------------------------------------
    def _avail_u16(self, offset: int) -> int:
        rings = self._ring_views()
        try:
            return int(_U16.unpack_from(rings.avail, rings.avail_at + offset)[0])
        except ValueError as exc:  # the memory was closed (released views)
            raise RingError(f"queue {self.index}: {exc}") from None

    def avail_flags(self) -> int:
        return self._avail_u16(0)

    def avail_idx(self) -> int:
        return self._avail_u16(2)

    def used_event(self) -> int:
        return self._avail_u16(4 + 2 * self.size)

    def used_idx(self) -> int:
        return self.next_used & 0xFFFF

    def memory_fence(self) -> None:
        """A full memory barrier (a locked instruction) between a store and a later load."""
        self._fence_lock.acquire()
        self._fence_lock.release()

    def pending(self) -> int:
        """How many chains the driver made available that the device has not taken."""
        count = (self.avail_idx() - self.next_avail) & 0xFFFF
        if count > self.size:
            raise RingError(f"queue {self.index}: available index moved by {count}, more than the queue "
                            f"size {self.size}")
        return count

    # -- taking requests ----------------------------------------------------------------------------
    def pop(self) -> DescriptorChain | None:
        """The next well-formed chain, or None when the ring is empty.

        Malformed chains are given back to the driver with used length 0 and counted; RingError means
        the queue is unusable.
        """
        rings = self._ring_views()
        avail, at = rings.avail, rings.avail_at
        unpack = _U16.unpack_from
        try:
            count = (unpack(avail, at + 2)[0] - self.next_avail) & 0xFFFF   # as pending(), inline
        except ValueError as exc:  # the memory was closed (released views)
            raise RingError(f"queue {self.index}: {exc}") from None
        if count > self.size:
            raise RingError(f"queue {self.index}: available index moved by {count}, more than the queue "
                            f"size {self.size}")
        # Only the chains available now: a driver re-posting malformed chains as fast as they come back
        # cannot keep one call going (the caller looks at the ring again, and counts what it took).
        for _ in range(count):
            try:
                head = unpack(avail, at + 4 + 2 * (self.next_avail % self.size))[0]
            except ValueError as exc:
                raise RingError(f"queue {self.index}: {exc}") from None
            if head >= self.size:
                raise RingError(f"queue {self.index}: available ring entry {self.next_avail} names "
                                f"descriptor {head}, outside the table of {self.size}")
            self.next_avail = (self.next_avail + 1) & 0xFFFF
            self.stats.chains += 1
            try:
                return self._parse_chain(head)
            except ChainError as exc:
                self.stats.malformed_chains += 1
                self.stats.last_error = str(exc)
                self.push(head, 0)
            except ValueError as exc:  # the memory was closed (released views)
                raise RingError(f"queue {self.index}: {exc}") from None
        return None

    def pop_direct(self) -> DirectChain | None:
        """The next chain if it is of the commonest kind, taken without the general parser's objects: at
        most ``MAX_DIRECT`` direct descriptors, each a non-empty buffer in guest RAM, device-readable ones
        first (a virtio-net frame, a virtio-blk header, data and status).

        None when the ring is empty or the next chain is any other kind (longer, indirect, with an empty
        or unknown buffer, a broken ring): :meth:`pop` then takes it, with every check and error report.
        Nothing is consumed in that case. What is checked here is what :meth:`pop` checks of such a
        chain, so the two take exactly the same chains (a property test holds them to it).
        """
        rings = self._rings
        if rings is None:
            return None
        data_view = self._data_view
        next_avail = self.next_avail
        size = self.size
        buffers: list[DirectBuffer] = []
        try:
            count = (_U16.unpack_from(rings.avail, rings.avail_at + 2)[0] - next_avail) & 0xFFFF
            if not count or count > size:
                return None
            head = index = _U16.unpack_from(rings.avail, rings.avail_at + 4 + 2 * (next_avail % size))[0]
            if head >= size:
                return None
            start, end = self._data_region
            descriptors, descriptors_at = rings.desc, rings.desc_at
            writable = False
            total = 0
            for _ in range(MAX_DIRECT):
                addr, length, flags, next_index = _DESCRIPTOR.unpack_from(
                    descriptors, descriptors_at + DESCRIPTOR_SIZE * index)
                if flags & VIRTQ_DESC_F_INDIRECT or not length:
                    return None
                if not (start <= addr and addr + length <= end):
                    if not self._in_ram(addr, length, flags & VIRTQ_DESC_F_WRITE):
                        return None
                    start, end = self._data_region
                    if not (start <= addr and addr + length <= end):
                        return None   # reachable, but not as one view (a translated, scattered range)
                    data_view = self._data_view
                if flags & VIRTQ_DESC_F_WRITE:
                    writable = True
                elif writable:
                    return None   # readable after writable: pop() reports it
                total += length
                buffers.append(new_direct_buffer((addr, data_view[addr - start:addr - start + length], writable)))
                if not flags & VIRTQ_DESC_F_NEXT:
                    break
                if next_index >= size:
                    return None
                index = next_index
            else:
                return None       # longer (or a loop): pop() takes it
            if total > MAX_CHAIN_BYTES:
                return None
        except ValueError:        # the memory was closed: pop() reports it
            return None
        self.next_avail = (next_avail + 1) & 0xFFFF
        self.stats.chains += 1
        return new_direct_chain((head, buffers))

    def chain_at(self, head: int) -> DescriptorChain:
        """The chain starting at descriptor ``head``, parsed again (a chain a device took before a snapshot
        and still holds); ChainError if it is not a well-formed chain now."""
        if not 0 <= head < self.size:
            raise ChainError(head, f"head outside the table of {self.size}")
        try:
            return self._parse_chain(head)
        except ValueError as exc:  # the memory was closed
            raise RingError(f"queue {self.index}: {exc}") from None

    def undo_pop(self) -> None:
        """Put the last chain taken back (e.g. when a rate limiter defers it)."""
        self.next_avail = (self.next_avail - 1) & 0xFFFF
        self.stats.chains -= 1

    def _in_ram(self, addr: int, length: int, write: int = 0) -> bool:
        """Whether ``[addr, addr+length)`` lies in one RAM region (the last buffer's region first); ``write``
        (the descriptor's VIRTQ_DESC_F_WRITE) matters to a queue whose addresses an IOMMU translates."""
        start, end = self._data_region
        if start <= addr and addr + length <= end:
            return True
        try:
            region = self.memory.region_of(addr, length)
        except GuestMemoryError:
            return False
        self._data_region = (region.gpa, region.end)
        self._data_view = region.view
        return True

    def _chain_too_long(self, head: int, before: int, entries: int) -> ChainError:
        """Count a chain refused for its length (the caller raises the error returned)."""
        self.stats.chains_too_long += 1
        if self.counters is not None:
            self.counters.chains_too_long += 1
        return ChainError(head, f"{before} descriptors and an indirect table of {entries} make a chain longer "
                                f"than the queue size {self.size}")

    def _parse_chain(self, head: int) -> DescriptorChain:
        readable: list[Buffer] = []
        writable: list[Buffer] = []
        table_size = self.size
        rings = self._ring_views()
        descriptors, descriptors_at = rings.desc, rings.desc_at  # the queue's table (validated)
        unpack_descriptor = _DESCRIPTOR.unpack_from
        data_start, data_end = self._data_region
        index = head
        visited = 0          # descriptors visited in the current table: bounded by its size
        count = 0
        total = 0
        readable_bytes = 0
        in_indirect = False
        while True:
            if visited >= table_size:
                raise ChainError(head, f"longer than the {'indirect table' if in_indirect else 'queue'} "
                                 f"({table_size} descriptors): a loop")
            addr, length, flags, next_index = unpack_descriptor(descriptors, descriptors_at + DESCRIPTOR_SIZE * index)
            visited += 1
            count += 1
            if flags & VIRTQ_DESC_F_INDIRECT:
                if not self.indirect_allowed:
                    raise ChainError(head, "indirect descriptor without VIRTIO_F_INDIRECT_DESC")
                if in_indirect:
                    raise ChainError(head, "indirect descriptor inside an indirect table")
                if flags & VIRTQ_DESC_F_NEXT:
                    raise ChainError(head, "indirect descriptor with NEXT set")
                entries, remainder = divmod(length, DESCRIPTOR_SIZE)
                if remainder or not entries:
                    raise ChainError(head, f"indirect table length {length} is not a whole number of "
                                     f"descriptors of {DESCRIPTOR_SIZE} bytes")
                if count - 1 + entries > self.size:   # checked before any entry is read
                    raise self._chain_too_long(head, count - 1, entries)
                if addr % INDIRECT_TABLE_ALIGN:
                    raise ChainError(head, f"indirect table at {addr:#x} is not "
                                     f"{INDIRECT_TABLE_ALIGN}-byte aligned")
                try:
                    region = self.memory.region_of(addr, length)
                except GuestMemoryError:
                    raise ChainError(head, f"indirect table at {addr:#x}+{length:#x} is not in guest RAM") from None
                descriptors, descriptors_at = region.view, addr - region.gpa   # read in place, as the ring
                table_size, index, visited, in_indirect = entries, 0, 0, True
                continue
            if length:
                if not (data_start <= addr and addr + length <= data_end):
                    if not self._in_ram(addr, length, flags & VIRTQ_DESC_F_WRITE):
                        raise ChainError(head, f"buffer at {addr:#x}+{length:#x} is not in guest RAM")
                    data_start, data_end = self._data_region
                total += length
                if total > MAX_CHAIN_BYTES:
                    raise ChainError(head, "more than 4 GiB of buffers")
            if flags & VIRTQ_DESC_F_WRITE:
                if length:
                    writable.append(new_buffer((addr, length)))
            elif writable:
                raise ChainError(head, "device-readable descriptor after a device-writable one")
            elif length:
                readable.append(new_buffer((addr, length)))
                readable_bytes += length
            if not flags & VIRTQ_DESC_F_NEXT:
                break
            if next_index >= table_size:
                raise ChainError(head, f"next index {next_index} is outside the table of {table_size}")
            index = next_index
        return DescriptorChain(head, new_buffer_list(self.memory, tuple(readable), readable_bytes),
                               new_buffer_list(self.memory, tuple(writable), total - readable_bytes), count,
                               in_indirect)

    # -- giving buffers back ------------------------------------------------------------------------
    def complete(self, chain: DescriptorChain | DirectChain, length: int) -> None:
        """Give ``chain`` back to the driver, ``length`` bytes written: the completion of every chain whose
        device-writable buffers the device may have written (they are marked while dirty tracking is on)."""
        if self.memory.dirty_tracking:
            self.mark_written(chain)
        self.push(chain.head, length)

    def mark_written(self, chain: DescriptorChain | DirectChain) -> None:
        """Mark every device-writable buffer of ``chain`` dirty, whole (for a device that writes into buffers
        it completes later; :meth:`complete` does it for the rest)."""
        mark = self.memory.mark_dirty
        if isinstance(chain, DirectChain):
            for buffer in chain.buffers:
                if buffer.writable:
                    mark(buffer.gpa, len(buffer.view))
        else:
            for gpa, length in chain.writable.buffers:
                mark(gpa, length)

    def push(self, head: int, length: int) -> None:
        """Put a used element (head, bytes written) on the used ring and publish it. Only for a chain the
        device wrote nothing into (a transmitted frame, a refused request): :meth:`complete` for the rest."""
        rings = self._ring_views()
        used, at = rings.used, rings.used_at
        slot = 4 + 8 * (self.next_used % self.size)
        next_used = (self.next_used + 1) & 0xFFFF
        try:
            _USED_ELEM.pack_into(used, at + slot, head, length & 0xFFFFFFFF)
            # Stores are not reordered with stores on x86 (and CPython performs them in program order):
            # the element is visible before the index that publishes it, in one store.
            store_u16(used, at + 2, next_used)
        except ValueError as exc:  # the memory was closed (released views)
            raise RingError(f"queue {self.index}: {exc}") from None
        self.next_used = next_used
        self.stats.used_buffers += 1
        if self.memory.dirty_tracking:
            self.memory.mark_dirty(self.device_addr + slot, _USED_ELEM.size)
            self.memory.mark_dirty(self.device_addr + 2, 2)

    def _write_used_u16(self, offset: int, value: int) -> None:
        rings = self._ring_views()
        try:
            store_u16(rings.used, rings.used_at + offset, value & 0xFFFF)
        except ValueError as exc:
            raise RingError(f"queue {self.index}: {exc}") from None
        if self.memory.dirty_tracking:
            self.memory.mark_dirty(self.device_addr + offset, 2)

    def needs_notification(self) -> bool:
        """Whether the driver wants a used-buffer notification for what was pushed since the last one."""
        new = self.next_used
        old = self._signalled_used
        self._signalled_used = new
        if old == new:
            return False
        self.memory_fence()  # the used index store before the used_event / flags load
        if self.event_idx:
            wanted = need_event(self.used_event(), new, old)
        else:
            wanted = not self.avail_flags() & VIRTQ_AVAIL_F_NO_INTERRUPT
        if wanted:
            self.stats.notifications_sent += 1
        else:
            self.stats.notifications_suppressed += 1
        return wanted

    def disable_notification(self) -> None:
        """Tell the driver that notifications are not needed now (the device is taking chains anyway).

        Without VIRTIO_F_EVENT_IDX this sets VIRTQ_USED_F_NO_NOTIFY (an optimization the driver may
        ignore, section 2.7.7); with it, ``avail_event`` left behind already does the same. Either way
        :meth:`enable_notification` must follow before the device stops looking at the ring.
        """
        if not self.event_idx and not self._no_notify:
            self._write_used_u16(0, VIRTQ_USED_F_NO_NOTIFY)
            self._no_notify = True

    def allow_notification(self) -> None:
        """Clear VIRTQ_USED_F_NO_NOTIFY if :meth:`disable_notification` set it (no check of the ring)."""
        if self._no_notify:
            self._write_used_u16(0, 0)
            self._no_notify = False

    def enable_notification(self) -> bool:
        """Ask the driver to notify for the next available chain; True if chains arrived meanwhile.

        With VIRTIO_F_EVENT_IDX this publishes ``avail_event``; without it, it clears
        VIRTQ_USED_F_NO_NOTIFY (if :meth:`disable_notification` set it). The store comes before the
        available index is read again, so a chain the driver added without notifying is seen here.
        """
        if self.event_idx:
            self._write_used_u16(4 + 8 * self.size, self.next_avail)
            self.memory_fence()  # the avail_event store before the avail idx load
        elif self._no_notify:
            self.allow_notification()
            self.memory_fence()  # the flags store before the avail idx load
        return self.pending() > 0
