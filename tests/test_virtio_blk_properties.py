"""Property-based test of virtio-blk: any request (type, sector, how the parts are split, their
directions and sizes) is answered exactly once (a status, or given back unanswered), never raises,
and never changes the image outside what a successful write or zeroing covers."""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmlet.config.models import RateLimiterConfig, TokenBucketConfig
from kvmlet.devices.irq import NullInterrupt
from kvmlet.devices.virtio.blk import RequestType, Status, VirtioBlock
from kvmlet.devices.virtio.blk_backend import BlockBackend, BlockBackendError
from kvmlet.devices.virtio.mmio import MmioTransport
from kvmlet.devices.virtio.ratelimit import RateLimiter
from kvmlet.memory import GuestMemory
from tests.support.virtq import DriverRing, MmioDriver

SECTORS = 32


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GuestMemory, Path]]:
    path = tmp_path_factory.mktemp("blk") / "disk.img"
    path.write_bytes(bytes(range(256)) * 2 * SECTORS)
    with GuestMemory([(0, 4 << 20)], hugepages=False) as memory:
        yield memory, path


kinds = st.one_of(st.sampled_from([int(k) for k in RequestType]), st.integers(0, 0xFFFFFFFF))
sectors = st.one_of(st.integers(0, SECTORS + 2), st.sampled_from([2**63, 2**64 - 1, 2**32]))
part = st.tuples(st.sampled_from([0, 1, 15, 16, 20, 100, 512, 1024, 4096]), st.booleans())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=kinds, sector=sectors, parts=st.lists(part, max_size=6), readonly=st.booleans(),
       header_first=st.booleans())
def test_any_request_is_answered_once(setup: tuple[GuestMemory, Path], kind: int, sector: int,
                                      parts: list[tuple[int, bool]], readonly: bool, header_first: bool) -> None:
    memory, path = setup
    before = path.read_bytes()
    device = VirtioBlock(BlockBackend.open(str(path), readonly=readonly))
    transport = MmioTransport(device, memory, NullInterrupt())
    try:
        ring = DriverRing(memory)
        MmioDriver(transport).start(ring)
        chain: list[tuple[int, int, bool]] = []
        if header_first:
            chain.append((*ring.buffer(struct.pack("<IIQ", kind, 0, sector)), False))
        for length, writes in parts:
            chain.append((*ring.buffer(length), writes))
        if not chain:
            chain.append((*ring.buffer(0), False))
        head = ring.add_chain(chain)
        ring.publish(head)
        MmioDriver(transport).notify()
        used = ring.take_used()
        assert len(used) == 1 and used[0][0] == head
        writable = [(gpa, n) for gpa, n, w in chain if w and n]
        if used[0][1] and writable:
            gpa, n = writable[-1]
            assert memory.read(gpa + n - 1, 1)[0] in (Status.OK, Status.IOERR, Status.UNSUPP)
        if readonly:
            assert path.read_bytes() == before
        assert len(path.read_bytes()) == len(before)
    finally:
        transport.close()
    path.write_bytes(before)


common_kinds = st.sampled_from([int(RequestType.IN), int(RequestType.OUT), int(RequestType.FLUSH),
                                int(RequestType.GET_ID), 99])
data_part = st.tuples(st.sampled_from([1, 100, 512, 1024, 4096]), st.booleans())
request = st.tuples(common_kinds, st.integers(0, SECTORS + 2), st.lists(data_part, max_size=3),
                    st.booleans(), st.integers(0, 255))


def _outcomes(memory: GuestMemory, path: Path, requests: list[tuple[int, int, list[tuple[int, bool]], bool, int]],
              *, short_path: bool, readonly: bool, direct: bool = False) -> tuple[object, ...]:
    """Run the requests as one batch; what the driver and the image see afterwards."""
    unlimited = RateLimiterConfig(ops=TokenBucketConfig(size=10**9, refill_time=1000))
    limiter = None if short_path else RateLimiter(unlimited)
    device = VirtioBlock(BlockBackend.open(str(path), readonly=readonly, direct=direct), rate_limiter=limiter)
    transport = MmioTransport(device, memory, NullInterrupt())
    memory.fill(0, 4 << 20)
    try:
        ring = DriverRing(memory, size=64)
        driver = MmioDriver(transport)
        driver.start(ring)
        heads, writable_parts = [], []
        for kind, sector, parts, with_status, fill in requests:
            chain = [(*ring.buffer(struct.pack("<IIQ", kind, 0, sector)), False)]
            for length, writes in parts:
                if direct and fill % 2 == 0:   # half of them aligned for O_DIRECT: no bounce buffer
                    gpa = ring.alloc(length, 4096)
                    memory.write(gpa, bytes([fill]) * length)
                    chain.append((gpa, length, writes))
                else:
                    chain.append((*ring.buffer(bytes([fill]) * length), writes))
            if with_status:
                chain.append((*ring.buffer(b"\xee"), True))
            heads.append(ring.add_chain(chain))
            writable_parts.append([(gpa, n) for gpa, n, w in chain if w])
        ring.publish(*heads)
        driver.notify()
        used = ring.take_used()
        guest = [b"".join(memory.read(gpa, n) for gpa, n in parts) for parts in writable_parts]
        stats = dataclasses.replace(device.stats, last_error="", throttled=0)
    finally:
        transport.close()
    return used, guest, stats, path.read_bytes()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(requests=st.lists(request, min_size=1, max_size=8), readonly=st.booleans())
def test_short_path_answers_as_the_full_path(setup: tuple[GuestMemory, Path], tmp_path_factory: pytest.TempPathFactory,
                                            requests: list[tuple[int, int, list[tuple[int, bool]], bool, int]],
                                            readonly: bool) -> None:
    """A batch of plain and other requests gives the same used ring, guest buffers, counters and image
    with the device's short path for plain reads and writes as with the full parser alone (a rate
    limiter that never runs out turns the short path off)."""
    memory, path = setup
    before = path.read_bytes()
    results = []
    for short_path in (True, False):
        path.write_bytes(before)
        results.append(_outcomes(memory, path, requests, short_path=short_path, readonly=readonly))
    path.write_bytes(before)
    assert results[0] == results[1]


direct_request = st.tuples(st.sampled_from([int(RequestType.IN), int(RequestType.OUT)]), st.integers(0, SECTORS + 2),
                           st.lists(st.tuples(st.sampled_from([512, 1024, 4096]), st.booleans()), min_size=1,
                                    max_size=2), st.just(True), st.integers(0, 255))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(requests=st.lists(direct_request | request, min_size=1, max_size=8))
def test_short_path_answers_as_the_full_path_with_direct_io(
        setup: tuple[GuestMemory, Path], requests: list[tuple[int, int, list[tuple[int, bool]], bool, int]]) -> None:
    """The same with O_DIRECT: aligned buffers take the short path, the others (DriverRing places buffers
    on 16-byte boundaries) the full path's bounce buffer, with the same answers."""
    memory, path = setup
    try:
        BlockBackend.open(str(path), direct=True).close()
    except BlockBackendError as exc:
        pytest.skip(f"the temporary directory's file system has no O_DIRECT: {exc}")
    before = path.read_bytes()
    results = []
    for short_path in (True, False):
        path.write_bytes(before)
        results.append(_outcomes(memory, path, requests, short_path=short_path, readonly=False, direct=True))
    path.write_bytes(before)
    assert results[0] == results[1]


def test_plain_requests_take_the_short_path(setup: tuple[GuestMemory, Path]) -> None:
    memory, path = setup
    device = VirtioBlock(BlockBackend.open(str(path)))
    parsed: list[int] = []
    full_path = device._handle
    device._handle = lambda chain: parsed.append(chain.head) or full_path(chain)  # type: ignore[method-assign]
    transport = MmioTransport(device, memory, NullInterrupt())
    try:
        ring = DriverRing(memory)
        MmioDriver(transport).start(ring)
        status = ring.alloc(1)
        read = ring.add_chain([(*ring.buffer(struct.pack("<IIQ", RequestType.IN, 0, 1)), False),
                               (ring.alloc(1024), 1024, True), (status, 1, True)])
        flush = ring.add_chain([(*ring.buffer(struct.pack("<IIQ", RequestType.FLUSH, 0, 0)), False),
                                (ring.alloc(1), 1, True)])
        ring.publish(read, flush)
        MmioDriver(transport).notify()
        assert ring.take_used() == [(read, 1025), (flush, 1)]
        assert memory.read(status, 1)[0] == Status.OK
        assert parsed == [flush]        # the read never reached the full parser
    finally:
        transport.close()
