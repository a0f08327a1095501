"""Property-based tests of the virtqueue parser against arbitrary guest memory contents.

Whatever the descriptor table, the available ring and any indirect tables hold, taking and returning
chains: raises nothing but VirtqueueError, ends, yields only buffers inside guest RAM, and writes
nothing outside the used ring.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmlet.devices.virtio.queue import (
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    RingError,
    Virtqueue,
    VirtqueueError,
)
from kvmlet.memory import GuestMemory

REGION_A = (0, 0x10000)
REGION_B = (0x20000, 0x10000)      # a hole between the regions
DESC_ADDR, AVAIL_ADDR, USED_ADDR = 0x1000, 0x3000, 0x4000
SCRATCH = 0x8000                   # where the "indirect tables" of random bytes live
SCRATCH_SIZE = 0x2000


class RecordingMemory(GuestMemory):
    """A GuestMemory that records every range handed out as a view."""

    def __init__(self) -> None:
        super().__init__([REGION_A, REGION_B], hugepages=False)
        self.accessed: list[tuple[int, int]] = []

    def view(self, gpa: int, length: int) -> memoryview:
        result = super().view(gpa, length)  # raises for anything outside RAM
        self.accessed.append((gpa, length))
        return result


def _in_ram(gpa: int, length: int) -> bool:
    return any(base <= gpa and gpa + length <= base + size for base, size in (REGION_A, REGION_B))


@pytest.fixture(scope="module")
def memory() -> Iterator[RecordingMemory]:
    mem = RecordingMemory()
    yield mem
    mem.close()


_INTERESTING_ADDRS = [0, 8, DESC_ADDR, SCRATCH, SCRATCH + 8, SCRATCH + 3, REGION_A[1] - 16, REGION_A[1] - 1,
                      REGION_A[1], REGION_B[0] - 8, REGION_B[0], REGION_B[0] + REGION_B[1] - 32,
                      REGION_B[0] + REGION_B[1], (1 << 64) - 16, 1 << 40]
_INTERESTING_LENS = [0, 1, 15, 16, 17, 32, 48, 512, 0x1000, 0xFFF0, 0x10000, 0x10001, 0xFFFFFFFF]

addresses = st.one_of(st.sampled_from(_INTERESTING_ADDRS), st.integers(0, (1 << 64) - 1),
                      st.integers(0, REGION_B[0] + REGION_B[1]))
lengths = st.one_of(st.sampled_from(_INTERESTING_LENS), st.integers(0, 0xFFFFFFFF))
descriptor = st.tuples(addresses, lengths, st.integers(0, 0xFFFF) | st.integers(0, 7), st.integers(0, 40))
queue_sizes = st.sampled_from([1, 2, 4, 8, 16, 32])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=queue_sizes, table=st.lists(descriptor, min_size=32, max_size=32),
       ring=st.lists(st.integers(0, 40), min_size=32, max_size=32), avail_idx=st.integers(0, 0xFFFF),
       next_avail=st.integers(0, 0xFFFF), scratch=st.binary(min_size=0, max_size=SCRATCH_SIZE),
       indirect=st.booleans(), event_idx=st.booleans(), used_event=st.integers(0, 0xFFFF),
       avail_flags=st.integers(0, 0xFFFF))
def test_parser_only_raises_its_own_errors_and_stays_in_ram(
        memory: RecordingMemory, size: int, table: list[tuple[int, int, int, int]], ring: list[int],
        avail_idx: int, next_avail: int, scratch: bytes, indirect: bool, event_idx: bool, used_event: int,
        avail_flags: int) -> None:
    memory.fill(0, REGION_A[1])
    for i, (addr, length, flags, nxt) in enumerate(table):
        memory.write(DESC_ADDR + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))
    memory.write_u16(AVAIL_ADDR, avail_flags)
    memory.write_u16(AVAIL_ADDR + 2, avail_idx)
    for i, head in enumerate(ring[:size]):
        memory.write_u16(AVAIL_ADDR + 4 + 2 * i, head)
    memory.write_u16(AVAIL_ADDR + 4 + 2 * size, used_event)
    memory.write(SCRATCH, scratch)
    queue = Virtqueue(memory, 0, max_size=32)
    queue.size, queue.desc_addr, queue.driver_addr, queue.device_addr = size, DESC_ADDR, AVAIL_ADDR, USED_ADDR
    queue.set_features(event_idx=event_idx, indirect=indirect)
    queue.activate()
    queue.next_avail = next_avail
    used_area = (USED_ADDR, 6 + 8 * size)
    before = memory.read(0, REGION_A[1])
    memory.accessed.clear()
    taken = 0
    try:
        for _ in range(size + 1):  # at most `size` chains can be pending
            chain = queue.pop()
            if chain is None:
                break
            taken += 1
            for part in (chain.readable, chain.writable):
                for gpa, length in part.buffers:
                    assert length > 0 and _in_ram(gpa, length)
            queue.push(chain.head, chain.writable.length)
            queue.needs_notification()
        queue.enable_notification()
    except RingError:
        pass
    except VirtqueueError:  # pragma: no cover - ChainError never escapes pop()
        pytest.fail("ChainError escaped pop()")
    assert taken <= size
    assert all(_in_ram(gpa, length) for gpa, length in memory.accessed)
    after = memory.read(0, REGION_A[1])
    start, length = used_area
    assert before[:start] == after[:start] and before[start + length:] == after[start + length:]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(contents=st.binary(min_size=0x400, max_size=0x400), size=queue_sizes, indirect=st.booleans())
def test_raw_bytes_as_rings(memory: RecordingMemory, contents: bytes, size: int, indirect: bool) -> None:
    """The descriptor table and available ring overlap one block of arbitrary bytes."""
    memory.fill(0, REGION_A[1])
    memory.write(DESC_ADDR, contents)
    queue = Virtqueue(memory, 0, max_size=32)
    queue.size, queue.desc_addr, queue.driver_addr = size, DESC_ADDR, DESC_ADDR + 0x200
    queue.device_addr = USED_ADDR
    queue.set_features(event_idx=True, indirect=indirect)
    queue.activate()
    try:
        for _ in range(size + 1):
            chain = queue.pop()
            if chain is None:
                break
            queue.push(chain.head, 0)
    except RingError:
        pass


Buffers = tuple[tuple[int, int], ...]


def _take_all(queue: Virtqueue, *, direct: bool) -> list[tuple[int, Buffers, Buffers] | str]:
    """Every chain taken (head, readable buffers, writable buffers), with pop_direct first if ``direct``."""
    taken: list[tuple[int, Buffers, Buffers] | str] = []
    try:
        for _ in range(queue.size + 1):
            simple = queue.pop_direct() if direct else None
            if simple is not None:
                for buffer in simple.buffers:
                    assert len(buffer.view) > 0 and _in_ram(buffer.gpa, len(buffer.view))
                readable = tuple((b.gpa, len(b.view)) for b in simple.buffers if not b.writable)
                writable = tuple((b.gpa, len(b.view)) for b in simple.buffers if b.writable)
                taken.append((simple.head, readable, writable))
                queue.push(simple.head, 0)
                continue
            chain = queue.pop()
            if chain is None:
                break
            taken.append((chain.head, tuple((gpa, length) for gpa, length in chain.readable.buffers),
                          tuple((gpa, length) for gpa, length in chain.writable.buffers)))
            queue.push(chain.head, 0)
    except RingError as exc:
        taken.append(str(exc))
    return taken


# Mostly what drivers put there (one buffer in RAM, device-readable or -writable), some of anything.
plain_descriptor = st.tuples(st.integers(0, REGION_B[0] + REGION_B[1] - 0x1000), st.integers(1, 0x1000),
                             st.sampled_from([0, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_NEXT,
                                              VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE]), st.integers(0, 40))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=queue_sizes, table=st.lists(plain_descriptor | plain_descriptor | descriptor, min_size=32,
                                        max_size=32),
       ring=st.lists(st.integers(0, 40), min_size=32, max_size=32), avail_idx=st.integers(0, 40),
       indirect=st.booleans())
def test_pop_direct_takes_what_pop_takes(memory: RecordingMemory, size: int,
                                         table: list[tuple[int, int, int, int]], ring: list[int],
                                         avail_idx: int, indirect: bool) -> None:
    """Taking chains with pop_direct where it applies and pop otherwise gives the same chains, in the same
    order, with the same used ring, as pop alone."""
    results = []
    for direct in (False, True):
        memory.fill(0, REGION_A[1])
        for i, (addr, length, flags, nxt) in enumerate(table):
            memory.write(DESC_ADDR + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))
        memory.write_u16(AVAIL_ADDR + 2, avail_idx)
        for i, head in enumerate(ring[:size]):
            memory.write_u16(AVAIL_ADDR + 4 + 2 * i, head)
        queue = Virtqueue(memory, 0, max_size=32)
        queue.size, queue.desc_addr, queue.driver_addr, queue.device_addr = size, DESC_ADDR, AVAIL_ADDR, USED_ADDR
        queue.set_features(event_idx=False, indirect=indirect)
        queue.activate()
        results.append((_take_all(queue, direct=direct), memory.read(USED_ADDR, 4 + 8 * size)))
    assert results[0] == results[1]
