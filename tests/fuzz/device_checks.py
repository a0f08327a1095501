"""The invariants a device fuzz case checks after every step (see ``fuzz_devices.py``).

A step is: the fuzz driver's own writes to guest memory, then register accesses on the transport, then
the event loop's part (queue notifications, timers, host sockets and TAPs), all on this thread. After it:

* no exception came out of the transport or an event-loop callback, and no device hit the transport's
  safety net ("internal error": an exception other than RingError inside ``process_queue``);
* every byte the device changed in guest memory lies in the used ring of a live queue or in a
  device-writable buffer of a chain the device took (this step, or earlier and not yet given back);
  guest memory itself is reached only through ``GuestMemory`` (its regions are memoryviews of the
  mapping: nothing outside them can be written through it);
* the used ring only receives heads the device took from the available ring (each once per taking),
  with a length no larger than the chain's device-writable bytes, and nothing while the device needs
  a reset; the device never takes more chains than were available;
* the device status is consistent: FEATURES_OK only with features that were offered and
  VIRTIO_F_VERSION_1; a device live after DRIVER_OK is active, one that needs a reset is not; wake-up
  timers stay within one per queue.

The chain walk here is written from the specification (virtio 1.2, 2.7.5 and 2.7.5.3) and is deliberately
permissive: it follows any chain as far as a driver could mean it, so that the writable bytes it finds
are an upper bound of what any correct parser may accept.
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from kvmlet.devices.virtio.constants import VIRTIO_F_VERSION_1, DeviceStatus, feature_bit
from kvmlet.devices.virtio.mmio import MmioTransport
from kvmlet.devices.virtio.queue import Virtqueue
from kvmlet.memory import GuestMemory

DESC = struct.Struct("<QIHH")
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4
MAX_WALK_ENTRIES = 32768
MAX_HELD = 4096          # chains a device may hold per queue (a hostile driver can offer the same head again)
STALE = "a chain taken before a queue reset or re-enable was completed after it"
_NEEDS_RESET = int(DeviceStatus.DEVICE_NEEDS_RESET)
_FAILED = int(DeviceStatus.FAILED)
_DRIVER_OK = int(DeviceStatus.DRIVER_OK)
_FEATURES_OK = int(DeviceStatus.FEATURES_OK)
_DRIVER = int(DeviceStatus.DRIVER)

Interval = tuple[int, int]   # [start, end) in guest-physical addresses


class FuzzFailure(AssertionError):
    """An invariant that did not hold; ``kind`` is a short signature to group failures by."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


class Snapshot:
    """A copy of guest RAM, region by region."""

    def __init__(self, memory: GuestMemory) -> None:
        self.regions = [(region.gpa, region.end, bytes(region.view)) for region in memory.regions]

    def read(self, gpa: int, length: int) -> bytes | None:
        for start, end, data in self.regions:
            if start <= gpa and gpa + length <= end:
                return data[gpa - start:gpa - start + length]
        return None


@dataclass
class ChainView:
    """A chain as the walk found it: the heads it may have been taken as, writable bytes and buffers."""

    heads: frozenset[int]
    writable: int
    buffers: list[Interval]
    read_areas: list[Interval]


def walk_chain(snap: Snapshot, table: int, size: int, head: int) -> tuple[int, list[Interval], list[Interval]]:
    """Device-writable bytes and buffers of the chain at ``head`` (an upper bound, see the module), and the
    descriptor areas read to find them."""
    total = 0
    buffers: list[Interval] = []
    areas: list[Interval] = []
    index, visited, table_size, indirect = head, 0, size, False
    while visited < table_size:
        at = table + 16 * index
        raw = snap.read(at, 16)
        if raw is None:
            break
        areas.append((at, at + 16))
        addr, length, flags, next_index = DESC.unpack(raw)
        visited += 1
        if flags & F_INDIRECT and not indirect:
            entries = min(length // 16, MAX_WALK_ENTRIES)
            if not entries:
                break
            table, table_size, index, visited, indirect = addr, entries, 0, 0, True
            continue
        if flags & F_WRITE and length:
            total += length
            buffers.append((addr, addr + length))
        if not flags & F_NEXT or next_index >= table_size:
            break
        index = next_index
    return total, buffers, areas


def merge(intervals: list[Interval]) -> list[Interval]:
    out: list[Interval] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            if end > out[-1][1]:
                out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out


def uncovered(intervals: list[Interval], start: int, end: int) -> list[Interval]:
    """The parts of ``[start, end)`` outside the merged, sorted ``intervals``."""
    out: list[Interval] = []
    index = max(0, bisect.bisect_right(intervals, (start, 1 << 70)) - 1)
    position = start
    while position < end:
        while index < len(intervals) and intervals[index][1] <= position:
            index += 1
        if index >= len(intervals) or intervals[index][0] >= end:
            out.append((position, end))
            break
        low, high = intervals[index]
        if low > position:
            out.append((position, low))
        position = high
    return out


def changed_ranges(before: bytes, after: bytes, base: int) -> list[Interval]:
    """Byte ranges (guest-physical) where two copies of a region differ."""
    out: list[Interval] = []
    if before == after:
        return out
    size = len(before)
    for block in range(0, size, 1024):
        if before[block:block + 1024] == after[block:block + 1024]:
            continue
        for chunk in range(block, min(block + 1024, size), 32):
            if before[chunk:chunk + 32] == after[chunk:chunk + 32]:
                continue
            for i in range(chunk, min(chunk + 32, size)):
                if before[i] != after[i]:
                    gpa = base + i
                    if out and out[-1][1] == gpa:
                        out[-1] = (out[-1][0], gpa + 1)
                    else:
                        out.append((gpa, gpa + 1))
    return out


def used_ring_area(queue: Virtqueue) -> Interval:
    return queue.device_addr, queue.device_addr + 4 + 8 * queue.size + 2


def avail_area(queue: Virtqueue) -> Interval:
    return queue.driver_addr, queue.driver_addr + 4 + 2 * queue.size + 2


@dataclass
class HeadGroup:
    """The chains the device took under one head and has not all given back. A driver may offer a head
    again while the device holds it, so which of them a used element completes is not known: the group is
    judged as a whole (lengths against its largest chain, writes against all its buffers)."""

    chains: list[ChainView] = field(default_factory=list)
    returned: int = 0

    @property
    def held(self) -> int:
        return len(self.chains) - self.returned


@dataclass
class QueueTrack:
    """What the checker knows of one queue: the chains the device holds and what it did this step."""

    queue: Virtqueue
    epoch: int = 0                     # activations and resets of the queue
    next_avail: int = 0                # the device's next_avail after the last step
    used_buffers: int = 0
    pushes: list[tuple[int, int]] = field(default_factory=list)
    outstanding: dict[int, HeadGroup] = field(default_factory=dict)
    retired: dict[int, HeadGroup] = field(default_factory=dict)   # held when the queue was reset or re-enabled
    mark_epoch: int = 0
    was_ready: bool = False
    mark_area: Interval | None = None


class Checker:
    """Per-case invariant checking around each step; see the module documentation."""

    def __init__(self, transport: MmioTransport, memory: GuestMemory,
                 extra_checks: Callable[[], None] | None = None) -> None:
        self.transport = transport
        self.memory = memory
        self.extra_checks = extra_checks
        self.tracks = [QueueTrack(queue, next_avail=queue.next_avail, used_buffers=queue.stats.used_buffers)
                       for queue in transport.queues]
        for track in self.tracks:
            self._instrument(track)
        self.pre: Snapshot | None = None
        self.status_before = 0
        self.unattributed = 0    # steps whose writes could not be attributed (the device rewrote rings)
        self.steps = 0

    @staticmethod
    def _instrument(track: QueueTrack) -> None:
        """Record the queue's used elements and count its activations and resets (instance attributes)."""
        queue = track.queue
        push, activate, reset = queue.push, queue.activate, queue.reset

        def recording_push(head: int, length: int) -> None:
            track.pushes.append((head, length))
            push(head, length)

        def counting_activate() -> None:
            track.epoch += 1
            activate()

        def counting_reset() -> None:
            track.epoch += 1
            reset()

        setattr(queue, "push", recording_push)  # noqa: B010 - an instance attribute shadows the method
        setattr(queue, "activate", counting_activate)  # noqa: B010
        setattr(queue, "reset", counting_reset)  # noqa: B010

    # -- a step ---------------------------------------------------------------------------------------
    def begin(self) -> None:
        """Before the step's register accesses (after the driver's memory writes)."""
        self.pre = Snapshot(self.memory)
        self.status_before = self.transport.status
        for track in self.tracks:
            track.mark_epoch = track.epoch
            track.was_ready = track.queue.ready
            track.mark_area = used_ring_area(track.queue) if track.queue.ready else None

    def registers_done(self) -> None:
        """After the register accesses, before the event loop runs: nothing may have been processed."""
        for index, track in enumerate(self.tracks):
            queue = track.queue
            if track.pushes:
                raise FuzzFailure("used buffers during a register access", f"queue {index}: {track.pushes[:4]}")
            if track.epoch != track.mark_epoch:
                # Reset or re-enabled: the device must hold nothing of the old ring.
                track.retired = track.outstanding if track.outstanding else track.retired
                track.outstanding = {}
                track.next_avail = queue.next_avail
                track.used_buffers = queue.stats.used_buffers
                track.mark_epoch = track.epoch
            elif queue.next_avail != track.next_avail:
                raise FuzzFailure("chains taken during a register access", f"queue {index}")
        self.status_before = self.transport.status

    def end(self) -> None:
        """After the event loop's part of the step."""
        assert self.pre is not None
        self.steps += 1
        pre, post = self.pre, Snapshot(self.memory)
        status = self.transport.status
        allowed: list[Interval] = []
        read_areas: list[Interval] = []
        retired: list[Interval] = []
        for index, track in enumerate(self.tracks):
            queue = track.queue
            if track.epoch != track.mark_epoch:
                raise FuzzFailure("queue reset while processing", f"queue {index}")
            if track.mark_area is not None:
                allowed.append(track.mark_area)
            if queue.ready:
                allowed.append(used_ring_area(queue))
            self._take_consumed(index, track, pre, post, read_areas)
            for group in track.outstanding.values():   # held from earlier steps or taken in this one
                for chain in group.chains:
                    allowed.extend(chain.buffers)
            for group in track.retired.values():
                for chain in group.chains:
                    retired.extend(chain.buffers)
        writes = merge(allowed)
        for index, track in enumerate(self.tracks):
            self._check_pushes(index, track, status, writes)
        self._check_writes(pre, post, merge(allowed), merge(read_areas), merge(retired))
        self.check_state()
        self.pre = None

    def _take_consumed(self, index: int, track: QueueTrack, pre: Snapshot, post: Snapshot,
                       read_areas: list[Interval]) -> None:
        queue = track.queue
        consumed = (queue.next_avail - track.next_avail) & 0xFFFF
        if not consumed:
            return
        if not track.was_ready and not queue.ready:
            raise FuzzFailure("chains taken from a queue that is not ready", f"queue {index}")
        if consumed > queue.size:
            raise FuzzFailure("more chains taken than were available",
                              f"queue {index}: {consumed} taken, queue size {queue.size}")
        for offset in range(consumed):
            position = (track.next_avail + offset) & 0xFFFF
            entry = queue.driver_addr + 4 + 2 * (position % queue.size)
            heads: set[int] = set()
            writable = 0
            buffers: list[Interval] = []
            areas: list[Interval] = [avail_area(queue)]
            for snap in (pre, post):
                raw = snap.read(entry, 2)
                if raw is None:
                    continue
                head = int.from_bytes(raw, "little")
                heads.add(head)
                total, found, walked = walk_chain(snap, queue.desc_addr, queue.size, head)
                writable = max(writable, total)
                buffers.extend(found)
                areas.extend(walked)
            read_areas.extend(areas)
            chain = ChainView(frozenset(heads), writable, buffers, areas)
            for head in heads:   # two candidates only if the device rewrote the entry (see _check_writes)
                group = track.outstanding.setdefault(head, HeadGroup())
                group.chains.append(chain)
                if len(group.chains) > MAX_HELD:
                    raise FuzzFailure("device holds chains without bound", f"queue {index}: head {head}")
        track.next_avail = queue.next_avail

    def _rewrites_own_rings(self, track: QueueTrack, writes: list[Interval]) -> bool:
        """Whether the device may have changed what it reads of this queue (its available ring, descriptor
        table or an indirect table) by its own writes in this step: a driver can place a used ring or a
        device-writable buffer there. Then neither copy of memory shows what the device read."""
        queue = track.queue
        areas = [avail_area(queue), (queue.desc_addr, queue.desc_addr + 16 * queue.size)]
        for group in track.outstanding.values():
            for chain in group.chains:
                areas.extend(chain.read_areas)
        return any(uncovered(writes, start, end) != [(start, end)] for start, end in areas)

    def _check_pushes(self, index: int, track: QueueTrack, status: int, writes: list[Interval]) -> None:
        queue = track.queue
        pushes, track.pushes = track.pushes, []
        counted = queue.stats.used_buffers - track.used_buffers
        track.used_buffers = queue.stats.used_buffers
        if counted != len(pushes):
            raise FuzzFailure("used ring written around Virtqueue.push",
                              f"queue {index}: {counted} used buffers counted, {len(pushes)} pushed")
        if pushes and self.status_before & _NEEDS_RESET and status & _NEEDS_RESET:
            raise FuzzFailure("used buffers while the device needs a reset", f"queue {index}: {pushes[:4]}")
        for head, length in pushes:
            group = track.outstanding.get(head)
            fits = group is not None and any(length <= chain.writable for chain in group.chains)
            if not fits and head in track.retired and not self._rewrites_own_rings(track, writes):
                raise FuzzFailure(STALE, f"queue {index}: head {head} length {length}")
            if not fits and self._rewrites_own_rings(track, writes):
                self.unattributed += 1
                if group is not None:
                    group.returned += 1
                    if group.held <= 0:
                        del track.outstanding[head]
                continue
            if group is None:
                raise FuzzFailure("used element for a head that was not available",
                                  f"queue {index}: head {head} length {length}; held {sorted(track.outstanding)[:16]}")
            if not fits:
                raise FuzzFailure("used length beyond the chain's writable bytes",
                                  f"queue {index}: head {head} length {length}, writable "
                                  f"{max(chain.writable for chain in group.chains)}")
            group.returned += 1
            if group.held <= 0:
                del track.outstanding[head]

    def _check_writes(self, pre: Snapshot, post: Snapshot, allowed: list[Interval],
                      read_areas: list[Interval], retired: list[Interval]) -> None:
        stray: list[Interval] = []
        changed: list[Interval] = []
        for (base, _, before), (_, _, after) in zip(pre.regions, post.regions, strict=True):
            if before == after:
                continue
            for start, end in changed_ranges(before, after, base):
                changed.append((start, end))
                stray.extend(uncovered(allowed, start, end))
        if not stray:
            return
        # A device that wrote into its own rings (a buffer over a descriptor table or the available ring,
        # which a hostile driver may arrange) may have used descriptors that neither copy shows.
        rings = merge(read_areas + [area for track in self.tracks if track.queue.ready for area in (
            avail_area(track.queue), (track.queue.desc_addr, track.queue.desc_addr + 16 * track.queue.size))])
        if any(uncovered(rings, start, end) != [(start, end)] for start, end in changed) or any(
                self._rewrites_own_rings(track, allowed) for track in self.tracks if track.queue.ready):
            self.unattributed += 1
            return
        shown = ", ".join(f"{start:#x}+{end - start}" for start, end in stray[:6])
        if all(not uncovered(retired, start, end) for start, end in stray):
            raise FuzzFailure(STALE, f"wrote {shown}, buffers of chains taken before")
        raise FuzzFailure("write outside the used rings and the writable buffers of taken chains", shown)

    # -- state ----------------------------------------------------------------------------------------
    def check_state(self) -> None:
        transport = self.transport
        device = transport.device
        status = transport.status
        if status & _FEATURES_OK:
            offered = device.device_features()
            wanted = transport.driver_features
            if wanted & ~offered or not wanted & feature_bit(VIRTIO_F_VERSION_1) or not status & _DRIVER:
                raise FuzzFailure("FEATURES_OK with features that were not acceptable",
                                  f"driver {wanted:#x}, offered {offered:#x}, status {status:#x}")
        live = status & _DRIVER_OK and not status & (_NEEDS_RESET | _FAILED)
        if live and not device.active:
            raise FuzzFailure("device inactive after DRIVER_OK", f"status {status:#x}")
        if status & _NEEDS_RESET and device.active:
            raise FuzzFailure("device active while it needs a reset", f"status {status:#x}")
        if "internal error" in transport.stats.last_error:
            raise FuzzFailure("exception inside a device (the transport's safety net)", transport.stats.last_error)
        pending = getattr(transport.stats, "timers_pending", 0)
        if pending > len(transport.queues):
            raise FuzzFailure("more than one wake-up timer per queue", f"{pending} timers")
        if self.extra_checks is not None:
            self.extra_checks()

