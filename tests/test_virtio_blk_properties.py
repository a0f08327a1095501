"""Property-based test of virtio-blk: any request (type, sector, how the parts are split, their
directions and sizes) is answered exactly once (a status, or given back unanswered), never raises,
and never changes the image outside what a successful write or zeroing covers."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmlet.devices.irq import NullInterrupt
from kvmlet.devices.virtio.blk import RequestType, Status, VirtioBlock
from kvmlet.devices.virtio.blk_backend import BlockBackend
from kvmlet.devices.virtio.mmio import MmioTransport
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
