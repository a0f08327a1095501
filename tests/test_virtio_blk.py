"""virtio-blk requests through a real queue and transport on a temporary image file: every request type,
read-only drives, direct I/O, rate limiting, and malformed or failing requests answered with
IOERR / UNSUPP (or given back unanswered) while the VMM carries on."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kvmlet.config.models import RateLimiterConfig, TokenBucketConfig
from kvmlet.devices.irq import NullInterrupt
from kvmlet.devices.virtio.blk import (
    CONFIG,
    SEG_MAX,
    SIZE_MAX,
    VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_WRITE_ZEROES,
    RequestType,
    Status,
    VirtioBlock,
)
from kvmlet.devices.virtio.blk_backend import SECTOR_SIZE, BlockBackend
from kvmlet.devices.virtio.constants import (
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    feature_bit,
)
from kvmlet.devices.virtio.mmio import MmioTransport
from kvmlet.devices.virtio.ratelimit import RateLimiter
from kvmlet.memory import GuestMemory
from tests.support.virtq import DriverRing, MmioDriver

SECTORS = 64
ALL = None  # negotiate everything offered


def _pattern(sector: int) -> bytes:
    return bytes((sector * 7 + i) & 0xFF for i in range(SECTOR_SIZE))


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(b"".join(_pattern(s) for s in range(SECTORS)))
    return path


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    with GuestMemory([(0, 4 << 20)], hugepages=False) as mem:
        yield mem


@dataclass
class Blk:
    memory: GuestMemory
    device: VirtioBlock
    transport: MmioTransport
    driver: MmioDriver
    ring: DriverRing
    scheduled: list[tuple[float, Callable[[], None]]]

    def submit(self, kind: int, sector: int = 0, *, out: bytes = b"", in_len: int = 0,
               status: bool = True, segment: int | None = None) -> tuple[int, int, int]:
        """Queue a request (header, data, status); returns (head, data-in gpa, status gpa)."""
        hdr = self.ring.buffer(struct.pack("<IIQ", kind, 0, sector))
        parts = [(*hdr, False)]
        step = segment or max(len(out), 1)
        for i in range(0, len(out), step):
            parts.append((*self.ring.buffer(out[i:i + step]), False))
        data_gpa = self.ring.alloc(in_len, 512) if in_len else 0
        step = segment or max(in_len, 1)
        for i in range(0, in_len, step):
            parts.append((data_gpa + i, min(step, in_len - i), True))
        status_gpa = self.ring.alloc(1)
        self.memory.write(status_gpa, b"\xff")
        if status:
            parts.append((status_gpa, 1, True))
        head = self.ring.add_chain(parts)
        self.ring.publish(head)
        return head, data_gpa, status_gpa

    def run(self, kind: int, sector: int = 0, **kwargs: object) -> tuple[int, bytes, int]:
        """Submit, notify, and return (status, data read, used length)."""
        head, data_gpa, status_gpa = self.submit(kind, sector, **kwargs)  # type: ignore[arg-type]
        self.driver.notify()
        used = self.ring.take_used()
        assert [h for h, _ in used] == [head]
        in_len = int(kwargs.get("in_len", 0))  # type: ignore[call-overload]
        data = self.memory.read(data_gpa, in_len) if in_len else b""
        return self.memory.read(status_gpa, 1)[0], data, used[0][1]


def make_blk(memory: GuestMemory, path: Path, *, readonly: bool = False, direct: bool = False,
             features: int | None = ALL, limiter: RateLimiter | None = None,
             queue_size: int = 256) -> Blk:
    backend = BlockBackend.open(str(path), readonly=readonly, direct=direct)
    device = VirtioBlock(backend, drive_id="test-disk-0", rate_limiter=limiter)
    scheduled: list[tuple[float, Callable[[], None]]] = []

    class Scheduler:
        def call_later(self, delay: float, callback: Callable[[], None]) -> None:
            scheduled.append((delay, callback))

    transport = MmioTransport(device, memory, NullInterrupt(), Scheduler())
    driver = MmioDriver(transport)
    ring = DriverRing(memory, size=queue_size)
    driver.start(ring, features)
    return Blk(memory, device, transport, driver, ring, scheduled)


@pytest.fixture
def blk(memory: GuestMemory, image: Path) -> Iterator[Blk]:
    b = make_blk(memory, image)
    yield b
    b.transport.close()


def test_config_space_and_features(blk: Blk) -> None:
    config = CONFIG.unpack(blk.device.config_space())
    assert CONFIG.size == 72
    assert config[0] == SECTORS and config[1] == SIZE_MAX and config[2] == SEG_MAX
    assert config[6] == 512  # blk_size
    offered = blk.driver.device_features()
    for bit in (VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES):
        assert offered & feature_bit(bit)
    assert not offered & feature_bit(VIRTIO_BLK_F_RO)
    assert blk.transport.bus_read(0x100, 8) == SECTORS


def test_read_write_and_read_back(blk: Blk, image: Path) -> None:
    status, data, used = blk.run(RequestType.IN, 3, in_len=2 * SECTOR_SIZE)
    assert status == Status.OK and data == _pattern(3) + _pattern(4) and used == 2 * SECTOR_SIZE + 1
    new = b"\xab" * SECTOR_SIZE + b"\xcd" * SECTOR_SIZE
    status, _, used = blk.run(RequestType.OUT, 10, out=new, segment=256)
    assert status == Status.OK and used == 1
    assert image.read_bytes()[10 * SECTOR_SIZE:12 * SECTOR_SIZE] == new
    status, data, _ = blk.run(RequestType.IN, 10, in_len=2 * SECTOR_SIZE, segment=512)
    assert status == Status.OK and data == new
    assert blk.device.stats.bytes_written == 1024 and blk.device.stats.reads == 2


def test_flush_and_writeback_mode(blk: Blk, monkeypatch: pytest.MonkeyPatch) -> None:
    syncs: list[int] = []
    monkeypatch.setattr(os, "fdatasync", lambda fd: syncs.append(fd))
    assert blk.device.writeback  # FLUSH negotiated: writes are not synced one by one
    blk.run(RequestType.OUT, 0, out=bytes(SECTOR_SIZE))
    assert syncs == []
    status, _, _ = blk.run(RequestType.FLUSH)
    assert status == Status.OK and len(syncs) == 1


def test_writethrough_without_flush_feature(memory: GuestMemory, image: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    b = make_blk(memory, image, features=feature_bit(VIRTIO_F_VERSION_1))
    try:
        syncs: list[int] = []
        monkeypatch.setattr(os, "fdatasync", lambda fd: syncs.append(fd))
        status, _, _ = b.run(RequestType.OUT, 1, out=bytes(SECTOR_SIZE))
        assert status == Status.OK and len(syncs) == 1  # stable before it completes
    finally:
        b.transport.close()


def test_get_id(blk: Blk) -> None:
    status, data, used = blk.run(RequestType.GET_ID, in_len=20)
    assert status == Status.OK and data == b"test-disk-0".ljust(20, b"\0") and used == 21


def test_discard_and_write_zeroes(blk: Blk, image: Path) -> None:
    seg = struct.pack("<QII", 8, 8, 0)  # sectors 8-15: 4 KiB aligned, so a hole can be punched
    status, _, _ = blk.run(RequestType.DISCARD, out=seg)
    assert status == Status.OK and blk.device.stats.discards == 1
    status, _, _ = blk.run(RequestType.WRITE_ZEROES, out=struct.pack("<QII", 20, 3, 0))
    assert status == Status.OK
    status, _, _ = blk.run(RequestType.WRITE_ZEROES, out=struct.pack("<QII", 30, 2, 1))  # unmap
    assert status == Status.OK
    content = image.read_bytes()
    assert content[20 * 512:23 * 512] == bytes(3 * 512) and content[30 * 512:32 * 512] == bytes(1024)
    assert content[23 * 512:24 * 512] == _pattern(23)


@pytest.mark.parametrize(("kind", "segments", "expected"), [
    (RequestType.DISCARD, struct.pack("<QII", 0, 1, 1), Status.UNSUPP),       # unmap flag on discard
    (RequestType.WRITE_ZEROES, struct.pack("<QII", 0, 1, 2), Status.UNSUPP),  # unknown flag
    (RequestType.DISCARD, struct.pack("<QII", SECTORS - 1, 2, 0), Status.IOERR),  # beyond capacity
    (RequestType.DISCARD, struct.pack("<QII", 0, 1, 0) * 2, Status.IOERR),  # more than max_discard_seg
    (RequestType.WRITE_ZEROES, b"\0" * 15, Status.IOERR),                    # not whole segments
])
def test_bad_discard_and_write_zeroes(blk: Blk, kind: RequestType, segments: bytes, expected: Status) -> None:
    status, _, _ = blk.run(kind, out=segments)
    assert status == expected


def test_discard_not_negotiated_is_unsupported(memory: GuestMemory, image: Path) -> None:
    b = make_blk(memory, image, features=feature_bit(VIRTIO_F_VERSION_1) | feature_bit(VIRTIO_BLK_F_FLUSH))
    try:
        status, _, _ = b.run(RequestType.DISCARD, out=struct.pack("<QII", 0, 1, 0))
        assert status == Status.UNSUPP
    finally:
        b.transport.close()


def test_unknown_request_type_is_unsupported(blk: Blk) -> None:
    status, _, _ = blk.run(99)
    assert status == Status.UNSUPP and blk.device.stats.unsupported == 1
    status, _, _ = blk.run(RequestType.GET_LIFETIME, in_len=8)
    assert status == Status.UNSUPP


def test_read_only_drive_refuses_writes(memory: GuestMemory, image: Path) -> None:
    before = image.read_bytes()
    b = make_blk(memory, image, readonly=True)
    try:
        assert b.driver.device_features() & feature_bit(VIRTIO_BLK_F_RO)
        assert not b.driver.device_features() & feature_bit(VIRTIO_BLK_F_DISCARD)
        status, _, _ = b.run(RequestType.OUT, 0, out=b"\x11" * SECTOR_SIZE)
        assert status == Status.IOERR
        status, data, _ = b.run(RequestType.IN, 0, in_len=SECTOR_SIZE)
        assert status == Status.OK and data == _pattern(0)
        status, _, _ = b.run(RequestType.FLUSH)
        assert status == Status.OK
    finally:
        b.transport.close()
    assert image.read_bytes() == before


@pytest.mark.parametrize(("sector", "sectors"), [(SECTORS, 1), (SECTORS - 1, 2), (2**63, 1), (2**64 - 1, 1)])
def test_out_of_range_is_an_io_error(blk: Blk, sector: int, sectors: int) -> None:
    status, _, _ = blk.run(RequestType.IN, sector, in_len=sectors * SECTOR_SIZE)
    assert status == Status.IOERR
    status, _, _ = blk.run(RequestType.OUT, sector, out=bytes(sectors * SECTOR_SIZE))
    assert status == Status.IOERR


def test_write_error_on_the_host_is_an_io_error(blk: Blk) -> None:
    full = os.open("/dev/full", os.O_WRONLY)
    os.dup2(full, blk.device.backend.fd)  # the image's fd now points at /dev/full: ENOSPC
    os.close(full)
    status, _, _ = blk.run(RequestType.OUT, 0, out=bytes(SECTOR_SIZE))
    assert status == Status.IOERR and "No space left" in blk.device.stats.last_error
    status, _, _ = blk.run(RequestType.FLUSH)  # fdatasync on a character device fails too
    assert status == Status.IOERR
    assert blk.device.stats.io_errors == 2


def test_read_error_on_the_host_is_an_io_error(blk: Blk) -> None:
    write_only = os.open("/dev/null", os.O_WRONLY)
    os.dup2(write_only, blk.device.backend.fd)  # EBADF on read
    os.close(write_only)
    status, _, _ = blk.run(RequestType.IN, 0, in_len=SECTOR_SIZE)
    assert status == Status.IOERR


def test_file_shrinking_under_the_drive(blk: Blk, image: Path) -> None:
    os.truncate(image, 4 * SECTOR_SIZE)  # capacity still says 64 sectors
    status, _, _ = blk.run(RequestType.IN, 10, in_len=SECTOR_SIZE)
    assert status == Status.IOERR and "end of file" in blk.device.stats.last_error


def test_data_in_the_wrong_direction_fails(blk: Blk, image: Path) -> None:
    before = image.read_bytes()
    # a write whose data the device would have to write into
    status, _, _ = blk.run(RequestType.OUT, 0, in_len=SECTOR_SIZE)
    assert status == Status.IOERR
    # a read whose data buffer is device-readable
    status, _, _ = blk.run(RequestType.IN, 0, out=bytes(SECTOR_SIZE))
    assert status == Status.IOERR
    assert image.read_bytes() == before


def test_partial_sectors_fail(blk: Blk) -> None:
    status, _, _ = blk.run(RequestType.IN, 0, in_len=100)
    assert status == Status.IOERR
    status, _, _ = blk.run(RequestType.OUT, 0, out=bytes(700))
    assert status == Status.IOERR


def test_request_without_status_byte_is_given_back_unanswered(blk: Blk) -> None:
    head, _, _ = blk.submit(RequestType.IN, 0, status=False)
    blk.driver.notify()
    assert blk.ring.take_used() == [(head, 0)]
    assert blk.device.stats.unanswerable == 1
    status, _, _ = blk.run(RequestType.IN, 0, in_len=SECTOR_SIZE)  # the device still works
    assert status == Status.OK


def test_short_header_fails(blk: Blk, memory: GuestMemory) -> None:
    hdr = blk.ring.buffer(b"\0" * 8)
    status_buf = blk.ring.buffer(b"\xff")
    head = blk.ring.add_chain([(*hdr, False), (*status_buf, True)])
    blk.ring.publish(head)
    blk.driver.notify()
    assert blk.ring.take_used() == [(head, 1)]
    assert memory.read(status_buf[0], 1) == bytes([Status.IOERR])


def test_zero_length_read_is_fine(blk: Blk) -> None:
    status, _, used = blk.run(RequestType.IN, 0)
    assert status == Status.OK and used == 1


def test_too_many_segments(memory: GuestMemory, image: Path) -> None:
    """seg_max is the queue size less two (header and status), and a chain is at most the queue size
    (virtio 1.2, 2.7.5.3.1): one more segment fits only with the header sharing the first data buffer."""
    b = make_blk(memory, image, features=ALL)
    try:
        ring = b.ring
        first = ring.buffer(struct.pack("<IIQ", RequestType.OUT, 0, 0) + bytes(512))   # header + segment 1
        data = ring.alloc(512 * 2)
        parts = [(*first, False)] + [(data + (i % 2) * 512, 512, False) for i in range(SEG_MAX)]
        status_gpa = ring.alloc(1)
        parts.append((status_gpa, 1, True))
        assert len(parts) == b.ring.size
        head = ring.add_indirect(parts)
        ring.publish(head)
        assert b.transport.driver_features & feature_bit(VIRTIO_F_INDIRECT_DESC)
        b.driver.notify()
        assert ring.take_used()[0][0] == head
        assert memory.read(status_gpa, 1) == bytes([Status.IOERR]) and "seg_max" in b.device.stats.last_error
    finally:
        b.transport.close()


def test_a_chain_longer_than_the_queue_is_refused_before_the_device_sees_it(memory: GuestMemory,
                                                                             image: Path) -> None:
    """seg_max + 1 data segments with their own header and status make a chain longer than the queue: it
    comes back with used length 0 and the status byte untouched (before the chain bound, the device
    answered IOERR for its seg_max)."""
    b = make_blk(memory, image, features=ALL)
    try:
        ring = b.ring
        hdr = ring.buffer(struct.pack("<IIQ", RequestType.IN, 0, 0))
        data = ring.alloc(512 * 2)
        parts = [(*hdr, False)] + [(data + (i % 2) * 512, 512, True) for i in range(SEG_MAX + 1)]
        status_gpa = ring.buffer(b"\xee")[0]
        parts.append((status_gpa, 1, True))
        head = ring.add_indirect(parts)
        ring.publish(head)
        b.driver.notify()
        assert ring.take_used() == [(head, 0)]
        assert memory.read(status_gpa, 1) == b"\xee" and b.transport.stats.chains_too_long == 1
    finally:
        b.transport.close()


def test_segment_larger_than_size_max(tmp_path: Path, memory: GuestMemory) -> None:
    path = tmp_path / "big.img"
    path.write_bytes(bytes(2 * SIZE_MAX))
    b = make_blk(memory, path)
    try:
        status, _, _ = b.run(RequestType.IN, 0, in_len=SIZE_MAX + SECTOR_SIZE)
        assert status == Status.IOERR and "size_max" in b.device.stats.last_error
        status, _, _ = b.run(RequestType.IN, 0, in_len=SIZE_MAX)
        assert status == Status.OK
    finally:
        b.transport.close()


def test_direct_io_aligned_and_bounced(memory: GuestMemory, image: Path) -> None:
    b = make_blk(memory, image, direct=True)
    try:
        backend = b.device.backend
        assert backend.direct and backend.align in (512, 4096)
        status, data, _ = b.run(RequestType.IN, 1, in_len=3 * SECTOR_SIZE)
        assert status == Status.OK and data == _pattern(1) + _pattern(2) + _pattern(3)
        # unaligned guest buffers (7 bytes into a sector-aligned allocation) go through the bounce buffer
        b.ring.alloc(7, 1)
        payload = bytes(range(256)) * 2 * 3
        status, _, _ = b.run(RequestType.OUT, 5, out=payload, segment=500)
        assert status == Status.OK
        assert image.read_bytes()[5 * 512:8 * 512] == payload
        assert image.read_bytes()[4 * 512:5 * 512] == _pattern(4)
        assert image.read_bytes()[8 * 512:9 * 512] == _pattern(8)
        status, data, _ = b.run(RequestType.IN, 5, in_len=3 * SECTOR_SIZE, segment=300)
        assert status == Status.OK and data == payload
    finally:
        b.transport.close()


def test_rate_limited_requests_resume_from_the_timer(memory: GuestMemory, image: Path) -> None:
    now = [0.0]
    limiter = RateLimiter(RateLimiterConfig(ops=TokenBucketConfig(size=1, refill_time=100)),
                          clock=lambda: now[0])
    b = make_blk(memory, image, limiter=limiter)
    try:
        h1, _, s1 = b.submit(RequestType.IN, 0, in_len=SECTOR_SIZE)
        h2, _, s2 = b.submit(RequestType.IN, 1, in_len=SECTOR_SIZE)
        b.driver.notify()
        assert b.ring.take_used() == [(h1, SECTOR_SIZE + 1)]
        assert len(b.scheduled) == 1 and b.scheduled[0][0] == pytest.approx(0.1)
        assert b.device.stats.throttled == 1
        b.driver.notify()  # a new notification while throttled: still throttled, nothing used
        assert b.ring.take_used() == []
        now[0] = 0.2
        b.scheduled[-1][1]()  # the timer fires on the event loop
        assert b.ring.take_used() == [(h2, SECTOR_SIZE + 1)]
        assert memory.read(s1, 1) == memory.read(s2, 1) == bytes([Status.OK])
    finally:
        b.transport.close()


def test_direct_on_a_file_size_not_block_aligned(tmp_path: Path) -> None:
    from kvmlet.devices.virtio.blk_backend import BlockBackendError

    path = tmp_path / "odd.img"
    path.write_bytes(bytes(1000))
    try:
        backend = BlockBackend.open(str(path), direct=True)
    except BlockBackendError as exc:
        assert "multiple of" in str(exc) or "O_DIRECT" in str(exc)
    else:
        backend.close()
        pytest.fail("an image of 1000 bytes was accepted with direct=on")


def test_capacity_ignores_a_partial_last_sector(tmp_path: Path, memory: GuestMemory) -> None:
    path = tmp_path / "odd.img"
    path.write_bytes(bytes(3 * SECTOR_SIZE + 100))
    b = make_blk(memory, path)
    try:
        assert b.device.capacity == 3
        status, _, _ = b.run(RequestType.IN, 3, in_len=SECTOR_SIZE)
        assert status == Status.IOERR
    finally:
        b.transport.close()
