"""Split virtqueue parsing on a real GuestMemory with hand-built rings: good chains, and every kind of
malformed one failing only its own request."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator

import pytest

from kvmlet.devices.virtio.constants import DeviceType
from kvmlet.devices.virtio.device import VirtioDevice
from kvmlet.devices.virtio.queue import (
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    Buffer,
    BufferList,
    DescriptorChain,
    RingError,
    Virtqueue,
    need_event,
    store_u16,
)
from kvmlet.memory import GuestMemory
from tests.support.virtq import DriverRing

MEM_SIZE = 1 << 20


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    with GuestMemory([(0, MEM_SIZE)], hugepages=False) as mem:
        yield mem


def _queue(memory: GuestMemory, ring: DriverRing, *, indirect: bool = False, event_idx: bool = False
           ) -> Virtqueue:
    queue = Virtqueue(memory, 0, max_size=256)
    ring.configure(queue)
    queue.set_features(event_idx=event_idx, indirect=indirect)
    queue.activate()
    return queue


def _digest_outside_used_ring(memory: GuestMemory, ring: DriverRing) -> str:
    used_end = ring.used + 6 + 8 * ring.size
    return hashlib.sha256(memory.read(0, ring.used) + memory.read(used_end, MEM_SIZE - used_end)).hexdigest()


def test_chain_with_readable_and_writable_parts(memory: GuestMemory) -> None:
    ring = DriverRing(memory)
    queue = _queue(memory, ring)
    out1, out2 = ring.buffer(b"hello "), ring.buffer(b"world")
    inb = ring.buffer(8)
    head = ring.add_chain([(*out1, False), (*out2, False), (*inb, True)])
    ring.publish(head)
    chain = queue.pop()
    assert chain is not None and chain.head == head and chain.descriptor_count == 3
    assert chain.readable.buffers == (Buffer(*out1), Buffer(*out2))
    assert chain.readable.read_all() == b"hello world"
    assert chain.writable.length == 8
    assert chain.writable.write(b"0123456789") == 8
    assert memory.read(inb[0], 8) == b"01234567"
    assert queue.pop() is None
    queue.push(chain.head, 8)
    assert ring.take_used() == [(head, 8)]


def test_buffer_list_slicing_crosses_buffers(memory: GuestMemory) -> None:
    memory.write(0x1000, b"abcd")
    memory.write(0x2000, b"efgh")
    stream = BufferList(memory, (Buffer(0x1000, 4), Buffer(0x2000, 4)))
    head, rest = stream.split(3)
    assert head.read_all() == b"abc" and rest.read_all() == b"defgh"
    assert rest.buffers == (Buffer(0x1003, 1), Buffer(0x2000, 4))
    assert stream.read(2, 4) == b"cdef"
    assert stream.write(b"XY", 3) == 2 and stream.read_all() == b"abcXYfgh"
    assert stream.slice(8).length == 0


def test_indirect_table_after_direct_descriptors(memory: GuestMemory) -> None:
    ring = DriverRing(memory)
    queue = _queue(memory, ring, indirect=True)
    hdr = ring.buffer(b"H" * 16)
    data, status = ring.buffer(b"D" * 512), ring.buffer(1)
    indirect = ring.add_indirect([(*data, False), (*status, True)])
    head = ring.next_free % ring.size
    ring.next_free += 1
    ring.write_desc(head, hdr[0], hdr[1], VIRTQ_DESC_F_NEXT, indirect)
    ring.publish(head)
    chain = queue.pop()
    assert chain is not None and chain.indirect
    assert chain.readable.read_all() == b"H" * 16 + b"D" * 512
    assert chain.writable.buffers == (Buffer(*status),)


def test_indirect_write_flag_on_the_table_descriptor_is_ignored(memory: GuestMemory) -> None:
    ring = DriverRing(memory)
    queue = _queue(memory, ring, indirect=True)
    out = ring.buffer(b"x" * 4)
    head = ring.add_indirect([(*out, False)], flags=VIRTQ_DESC_F_WRITE)
    ring.publish(head)
    chain = queue.pop()
    assert chain is not None and chain.readable.read_all() == b"xxxx" and chain.writable.length == 0


def _assert_fails_alone(memory: GuestMemory, ring: DriverRing, queue: Virtqueue, head: int) -> None:
    """The chain at ``head`` is given back with length 0, memory outside the used ring is untouched,
    and a good chain after it still works."""
    ring.publish(head)
    good_out = ring.buffer(b"ok")
    good = ring.add_chain([(*good_out, False)])
    ring.publish(good)
    snapshot = _digest_outside_used_ring(memory, ring)
    chain = queue.pop()
    assert chain is not None and chain.head == good and chain.readable.read_all() == b"ok"
    assert ring.take_used() == [(head, 0)]
    assert queue.stats.malformed_chains == 1 and queue.stats.last_error
    assert _digest_outside_used_ring(memory, ring) == snapshot


def test_descriptor_past_guest_memory_fails_the_request(memory: GuestMemory) -> None:
    ring = DriverRing(memory)
    queue = _queue(memory, ring)
    head = ring.add_chain([(MEM_SIZE - 8, 16, False)])
    _assert_fails_alone(memory, ring, queue, head)


def test_oversized_buffer_fails_the_request(memory: GuestMemory) -> None:
    ring = DriverRing(memory)
    queue = _queue(memory, ring)
    head = ring.add_chain([(0x1000, 0xFFFFFFFF, True)])
    _assert_fails_alone(memory, ring, queue, head)


def test_buffer_across_a_hole_between_regions_fails() -> None:
    with GuestMemory([(0, 0x80000), (0x100000, 0x80000)], hugepages=False) as mem:
        ring = DriverRing(mem)
        queue = Virtqueue(mem, 0, 256)
        ring.configure(queue)
        queue.activate()
        head = ring.add_chain([(0x7F000, 0x2000, False)])
        ring.publish(head)
        assert queue.pop() is None
        assert ring.take_used() == [(head, 0)]


def test_chain_loop_is_cut_at_the_queue_size(memory: GuestMemory) -> None:
    ring = DriverRing(memory, size=8)
    queue = _queue(memory, ring)
    buf = ring.buffer(4)
    ring.write_desc(0, buf[0], buf[1], VIRTQ_DESC_F_NEXT, 1)
    ring.write_desc(1, buf[0], buf[1], VIRTQ_DESC_F_NEXT, 0)  # 0 -> 1 -> 0 -> ...
    ring.next_free = 2
    _assert_fails_alone(memory, ring, queue, 0)
    assert "loop" in queue.stats.last_error


def test_self_loop_in_an_indirect_table(memory: GuestMemory) -> None:
    ring = DriverRing(memory)
    queue = _queue(memory, ring, indirect=True)
    table = ring.alloc(32)
    buf = ring.buffer(4)
    ring.write_desc(0, buf[0], buf[1], VIRTQ_DESC_F_NEXT, 1, table=table)
    ring.write_desc(1, buf[0], buf[1], VIRTQ_DESC_F_NEXT, 1, table=table)
    head = ring.next_free
    ring.next_free += 1
    ring.write_desc(head, table, 32, VIRTQ_DESC_F_INDIRECT)
    _assert_fails_alone(memory, ring, queue, head)


def test_next_index_outside_the_table(memory: GuestMemory) -> None:
    ring = DriverRing(memory, size=8)
    queue = _queue(memory, ring)
    buf = ring.buffer(4)
    ring.write_desc(0, buf[0], buf[1], VIRTQ_DESC_F_NEXT, 9)
    ring.next_free = 1
    _assert_fails_alone(memory, ring, queue, 0)


def test_readable_after_writable_fails(memory: GuestMemory) -> None:
    ring = DriverRing(memory)
    queue = _queue(memory, ring)
    a, b = ring.buffer(4), ring.buffer(4)
    head = ring.add_chain([(*a, True), (*b, False)])
    _assert_fails_alone(memory, ring, queue, head)


@pytest.mark.parametrize("case", ["not-negotiated", "nested", "with-next", "bad-length", "empty",
                                  "misaligned", "outside-memory"])
def test_bad_indirect_descriptors(memory: GuestMemory, case: str) -> None:
    ring = DriverRing(memory)
    queue = _queue(memory, ring, indirect=case != "not-negotiated")
    out = ring.buffer(4)
    table = ring.alloc(64)
    ring.write_desc(0, out[0], out[1], 0, 0, table=table)
    length, flags, addr = 16, VIRTQ_DESC_F_INDIRECT, table
    if case == "nested":
        ring.write_desc(0, table + 32, 16, VIRTQ_DESC_F_INDIRECT, 0, table=table)
    elif case == "with-next":
        flags |= VIRTQ_DESC_F_NEXT
    elif case == "bad-length":
        length = 24
    elif case == "empty":
        length = 0
    elif case == "misaligned":
        addr = table + 4
    elif case == "outside-memory":
        addr = MEM_SIZE - 16
        length = 32
    head = ring.next_free
    ring.next_free += 1
    ring.write_desc(head, addr, length, flags, 1)
    _assert_fails_alone(memory, ring, queue, head)


def test_zero_length_descriptors_carry_no_buffer(memory: GuestMemory) -> None:
    ring = DriverRing(memory)
    queue = _queue(memory, ring)
    out = ring.buffer(b"abc")
    head = ring.add_chain([(MEM_SIZE * 4, 0, False), (*out, False), (0, 0, True)])
    ring.publish(head)
    chain = queue.pop()
    assert chain is not None
    assert chain.readable.buffers == (Buffer(*out),) and chain.writable.length == 0
    assert chain.descriptor_count == 3


def test_available_index_running_ahead_breaks_the_ring(memory: GuestMemory) -> None:
    ring = DriverRing(memory, size=8)
    queue = _queue(memory, ring)
    memory.write_u16(ring.avail + 2, 9)
    with pytest.raises(RingError, match="more than the queue size"):
        queue.pop()


def test_head_index_outside_the_table_breaks_the_ring(memory: GuestMemory) -> None:
    ring = DriverRing(memory, size=8)
    queue = _queue(memory, ring)
    ring.publish(8)
    with pytest.raises(RingError, match="outside the table"):
        queue.pop()


@pytest.mark.parametrize(("size", "desc", "avail", "used", "message"), [
    (12, 0x10000, 0x18000, 0x1C000, "power of two"),
    (0, 0x10000, 0x18000, 0x1C000, "power of two"),
    (512, 0x10000, 0x18000, 0x1C000, "power of two"),
    (16, 0x10008, 0x18000, 0x1C000, "aligned"),
    (16, 0x10000, 0x18001, 0x1C000, "aligned"),
    (16, 0x10000, 0x18000, 0x1C002, "aligned"),
    (16, MEM_SIZE - 16, 0x18000, 0x1C000, "not in guest RAM"),
    (16, 0x10000, MEM_SIZE - 4, 0x1C000, "not in guest RAM"),
    (16, 0x10000, 0x18000, 1 << 40, "not in guest RAM"),
])
def test_queue_configuration_is_validated(memory: GuestMemory, size: int, desc: int, avail: int,
                                          used: int, message: str) -> None:
    queue = Virtqueue(memory, 3, max_size=256)
    queue.size, queue.desc_addr, queue.driver_addr, queue.device_addr = size, desc, avail, used
    with pytest.raises(RingError, match=message):
        queue.validate()


def test_max_size_must_be_a_power_of_two(memory: GuestMemory) -> None:
    with pytest.raises(ValueError):
        Virtqueue(memory, 0, max_size=100)


def test_need_event_rule() -> None:
    assert need_event(0, 1, 0)          # first buffer used, used_event 0
    assert not need_event(5, 3, 0)      # not there yet
    assert need_event(5, 6, 3)          # passed 5 in this batch
    assert not need_event(5, 7, 6)      # already passed before
    assert need_event(0xFFFF, 0, 0xFFFE)  # across the 16-bit wrap


def test_no_interrupt_flag_without_event_idx(memory: GuestMemory) -> None:
    ring = DriverRing(memory)
    queue = _queue(memory, ring)
    buf = ring.buffer(4)
    ring.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT)
    ring.publish(ring.add_chain([(*buf, True)]))
    chain = queue.pop()
    assert chain is not None
    queue.push(chain.head, 0)
    assert not queue.needs_notification()
    ring.set_avail_flags(0)
    ring.publish(ring.add_chain([(*buf, True)]))
    chain = queue.pop()
    assert chain is not None
    queue.push(chain.head, 0)
    assert queue.needs_notification()
    assert not queue.needs_notification()  # nothing new since


def test_event_idx_notifications_and_avail_event(memory: GuestMemory) -> None:
    ring = DriverRing(memory)
    queue = _queue(memory, ring, event_idx=True)
    buf = ring.buffer(4)
    ring.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT)  # must be ignored with EVENT_IDX
    ring.set_used_event(1)  # the driver wants a notification when entry 1 is used
    for _ in range(3):
        ring.publish(ring.add_chain([(*buf, True)]))
    heads = []
    while (chain := queue.pop()) is not None:
        heads.append(chain.head)
    assert not queue.enable_notification()
    assert ring.avail_event() == 3
    queue.push(heads[0], 0)            # used idx 0 -> 1: entry 0 used, not yet entry 1
    assert not queue.needs_notification()
    queue.push(heads[1], 0)            # 1 -> 2: entry 1 (used_event) used
    assert queue.needs_notification()
    queue.push(heads[2], 0)            # 2 -> 3: not wanted
    assert not queue.needs_notification()
    assert queue.stats.notifications_suppressed == 2
    ring.set_used_event(0xFFFF)
    queue.push(heads[0], 0)            # 3 -> 4 does not pass 0xffff
    assert not queue.needs_notification()


def test_enable_notification_reports_late_arrivals(memory: GuestMemory) -> None:
    ring = DriverRing(memory)
    queue = _queue(memory, ring, event_idx=True)
    buf = ring.buffer(4)
    ring.publish(ring.add_chain([(*buf, True)]))
    assert queue.enable_notification()  # one chain is still pending
    assert queue.pop() is not None
    assert not queue.enable_notification()


def test_undo_pop_and_index_wrap(memory: GuestMemory) -> None:
    ring = DriverRing(memory, size=4)
    queue = _queue(memory, ring)
    ring.avail_idx = 0xFFFE
    queue.next_avail = 0xFFFE
    buf = ring.buffer(4)
    heads = [ring.add_chain([(*buf, True)]) for _ in range(3)]
    ring.publish(*heads)
    first = queue.pop()
    assert first is not None and first.head == heads[0]
    queue.undo_pop()
    got = [c.head for c in iter(queue.pop, None)]
    assert got == heads and queue.next_avail == 1


class _Recorder(VirtioDevice):
    """A device whose requests record the used ring's flags while the device drains its queue."""

    device_type = DeviceType.ENTROPY

    def __init__(self, used_flags: Callable[[], int], stop_at: int | None = None) -> None:
        super().__init__([256], "recorder")
        self.used_flags = used_flags
        self.stop_at = stop_at
        self.seen: list[int] = []

    def specific_features(self) -> int:
        return 0

    def process_queue(self, index: int) -> None:
        raise AssertionError("not used")

    def handle(self, queue: Virtqueue, chain: DescriptorChain) -> bool:
        self.seen.append(self.used_flags())
        if len(self.seen) == self.stop_at:
            queue.undo_pop()
            return False
        queue.push(chain.head, 0)
        return True


@pytest.mark.parametrize("stop_at", [None, 2])
def test_no_notify_while_a_device_drains_and_cleared_when_it_stops(memory: GuestMemory,
                                                                   stop_at: int | None) -> None:
    ring = DriverRing(memory)
    queue = _queue(memory, ring)
    buf = ring.buffer(4)
    ring.publish(*[ring.add_chain([(*buf, True)]) for _ in range(3)])
    device = _Recorder(lambda: memory.read_u16(ring.used), stop_at)
    device.drain_queue(queue, lambda chain: device.handle(queue, chain))
    assert device.seen == [VIRTQ_USED_F_NO_NOTIFY] * (stop_at or 3)
    assert memory.read_u16(ring.used) == 0          # notifications are on again, also after an early stop
    assert len(ring.take_used()) == (3 if stop_at is None else stop_at - 1)


def test_no_notify_flag_is_left_alone_with_event_idx(memory: GuestMemory) -> None:
    ring = DriverRing(memory)
    queue = _queue(memory, ring, event_idx=True)
    buf = ring.buffer(4)
    ring.publish(ring.add_chain([(*buf, True)]))
    device = _Recorder(lambda: memory.read_u16(ring.used))
    device.drain_queue(queue, lambda chain: device.handle(queue, chain))
    assert device.seen == [0] and memory.read_u16(ring.used) == 0
    assert ring.avail_event() == 1                  # EVENT_IDX's own suppression: avail_event


def test_disable_then_enable_notification_sees_a_chain_added_meanwhile(memory: GuestMemory) -> None:
    ring = DriverRing(memory)
    queue = _queue(memory, ring)
    queue.disable_notification()
    assert memory.read_u16(ring.used) == VIRTQ_USED_F_NO_NOTIFY
    ring.publish(ring.add_chain([(*ring.buffer(4), True)]))   # the driver saw NO_NOTIFY: no notification
    assert queue.enable_notification()
    assert memory.read_u16(ring.used) == 0


def test_used_index_store_writes_only_its_two_bytes(memory: GuestMemory) -> None:
    memory.write(0x100, b"\xaa" * 8)
    with memory.view(0x100, 8) as view:
        store_u16(view, 2, 0x1234)
    assert memory.read(0x100, 8) == b"\xaa\xaa\x34\x12" + b"\xaa" * 4
