"""virtio-blk (virtio 1.2 section 5.2): one request queue on a raw image file or block device.

A request is a chain whose device-readable part starts with the 16-byte header (type, reserved, sector)
and whose device-writable part ends with the status byte; the device reads the parts as byte streams and
makes no assumption about how the driver split them into descriptors. Data follows the header (writes,
discard and write-zeroes segments) or precedes the status byte (reads, GET_ID).

Checks, each failing only that request: data in the wrong direction (a read whose data is
device-readable, a write whose data is device-writable), data that is not whole sectors, more data
segments than ``seg_max`` or one larger than ``size_max``, sectors beyond the capacity, writes to a
read-only drive, I/O errors on the host: all VIRTIO_BLK_S_IOERR. Unknown request types, and discard or
write-zeroes when not negotiated or with flags the device does not support: VIRTIO_BLK_S_UNSUPP. A
chain with no device-writable byte for the status cannot be answered: it is given back with length 0.

Every check runs before the rate limiter is asked, so a refused request costs no token (a guest cannot
put its drive into hours of debt with a 4 GiB request it knows will fail), and a request the host fails
is refunded. The used length is what the device wrote (virtio 1.2, 2.7.8): the data read (or the ID)
and the status byte for a request that succeeded, the status byte alone (1) for one that failed.

Write caching: when the driver negotiated VIRTIO_BLK_F_FLUSH, a write completes once ``pwritev``
returned (it is in the host's page cache) and FLUSH makes everything before it stable with
``fdatasync``. When it did not, every write is made stable before it completes (writethrough), as
section 5.2.6.2 requires of a device that offered FLUSH.
"""

from __future__ import annotations

import enum
import functools
import struct
from dataclasses import dataclass, field

from kvmlet.devices.state import BlockCounters, BlockState, DeviceStateError, VirtioDeviceState, expect_state
from kvmlet.devices.virtio.blk_backend import SECTOR_SIZE, BlockBackend, preadv_full, pwritev_full
from kvmlet.devices.virtio.constants import DeviceType, feature_bit
from kvmlet.devices.virtio.device import VirtioDevice
from kvmlet.devices.virtio.queue import BufferList, DescriptorChain, DirectChain, Virtqueue
from kvmlet.devices.virtio.ratelimit import (
    RateLimiter,
    check_rate_limiter,
    restore_rate_limiter,
    save_rate_limiter,
)

# Feature bits (section 5.2.3)
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14

QUEUE_SIZE = 256
SEG_MAX = QUEUE_SIZE - 2          # data segments in one request (the header and status take two)
SIZE_MAX = 1 << 20                # bytes in one data segment
MAX_DISCARD_SECTORS = 1 << 22     # 2 GiB per segment
MAX_DISCARD_SEG = 1
MAX_WRITE_ZEROES_SECTORS = 1 << 22
MAX_WRITE_ZEROES_SEG = 1
DISCARD_SECTOR_ALIGNMENT = 8      # 4 KiB: what hole punching can deallocate
ID_BYTES = 20

HEADER = struct.Struct("<IIQ")
SEGMENT = struct.Struct("<QII")   # virtio_blk_discard_write_zeroes: sector, num_sectors, flags
SEGMENT_FLAG_UNMAP = 1
CONFIG = struct.Struct("<QIIHBBIBBHIBBHIIIIIB3xIII")


class RequestType(enum.IntEnum):
    IN = 0
    OUT = 1
    FLUSH = 4
    GET_ID = 8
    GET_LIFETIME = 10
    DISCARD = 11
    WRITE_ZEROES = 13
    SECURE_ERASE = 14


class Status(enum.IntEnum):
    OK = 0
    IOERR = 1
    UNSUPP = 2


Segment = tuple[int, int, int]  # a parsed virtio_blk_discard_write_zeroes: sector, sectors, flags


@dataclass
class _Request:
    """A request that passed every check: what it does, where, its data and what it costs."""

    kind: RequestType
    offset: int                   # bytes into the drive (reads and writes)
    data: BufferList              # the data read into or written from, or the ID's buffer
    cost: int                     # bytes charged to the rate limiter
    segments: list[Segment] = field(default_factory=list)  # DISCARD and WRITE_ZEROES


class RequestError(Exception):
    """A request that fails with the given status."""

    def __init__(self, status: Status, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class BlockStats:
    reads: int = 0
    writes: int = 0
    flushes: int = 0
    discards: int = 0
    write_zeroes: int = 0
    get_ids: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    io_errors: int = 0
    unsupported: int = 0
    unanswerable: int = 0
    throttled: int = 0
    last_error: str = ""


class VirtioBlock(VirtioDevice):
    """A virtio block device on one :class:`BlockBackend`."""

    device_type = DeviceType.BLOCK

    def __init__(self, backend: BlockBackend, *, drive_id: str = "", name: str = "virtio-blk",
                 rate_limiter: RateLimiter | None = None) -> None:
        super().__init__([QUEUE_SIZE], name)
        self.backend = backend
        self.drive_id = drive_id.encode("ascii", "replace")[:ID_BYTES]
        self.rate_limiter = rate_limiter
        self.capacity = backend.size // SECTOR_SIZE  # whole sectors; a partial last one is not exposed
        self.stats = BlockStats()

    def replace_backend(self, backend: BlockBackend) -> None:
        """Serve ``backend`` from now on (a new backing file, PATCH /drives): the capacity follows it and
        the driver is told through a configuration change. Call with the transport's lock held."""
        old, self.backend = self.backend, backend
        self.capacity = backend.size // SECTOR_SIZE
        old.close()
        if self.host is not None:
            self.host.signal_config_change()

    @property
    def readonly(self) -> bool:
        return self.backend.readonly

    def specific_features(self) -> int:
        bits = [VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH]
        if self.readonly:
            bits.append(VIRTIO_BLK_F_RO)
        else:
            bits += [VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES]
        mask = 0
        for bit in bits:
            mask |= feature_bit(bit)
        return mask

    def config_space(self) -> bytes:
        return CONFIG.pack(
            self.capacity, SIZE_MAX, SEG_MAX,
            0, 0, 0,                                  # geometry (not offered)
            self.backend.logical_block_size,
            0, 0, 0, 0,                               # topology (not offered)
            0, 0, 0,                                  # writeback, unused0, num_queues
            MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, DISCARD_SECTOR_ALIGNMENT,
            MAX_WRITE_ZEROES_SECTORS, MAX_WRITE_ZEROES_SEG,
            0 if self.backend.is_block_device else 1,  # write_zeroes_may_unmap (hole punching)
            0, 0, 0)                                  # secure erase (not offered)

    @property
    def writeback(self) -> bool:
        """Whether completed writes may still be volatile (the driver negotiated FLUSH)."""
        return self.has_feature(VIRTIO_BLK_F_FLUSH)

    # -- requests -----------------------------------------------------------------------------------
    def process_queue(self, index: int) -> None:
        queue = self.queues[index]
        direct = None if self.rate_limiter is not None else functools.partial(self._plain_read_write, queue)
        self.drain_queue(queue, self._handle, direct)

    def _plain_read_write(self, queue: Virtqueue, direct: DirectChain) -> bool:
        """The short path for the commonest requests: a read or write laid out as header, one or two data
        buffers and the status byte, each in a descriptor of its own, within the drive, in whole
        sectors (and aligned, with direct I/O). False for anything else: :meth:`_handle` takes it, with
        every check and the error it deserves. An I/O error here is answered as there."""
        head, buffers = direct
        if len(buffers) < 3:
            return False
        header, status = buffers[0], buffers[-1]
        if header.writable or len(header.view) != HEADER.size or len(status.view) != 1 or not status.writable:
            return False
        kind, _, sector = HEADER.unpack(header.view)
        data = buffers[1:-1]
        reading = kind == RequestType.IN
        if not reading and (kind != RequestType.OUT or self.readonly):
            return False
        length = 0
        for buffer in data:
            size = len(buffer.view)
            if buffer.writable != reading or size > SIZE_MAX:
                return False
            length += size
        if length % SECTOR_SIZE or sector + length // SECTOR_SIZE > self.capacity:
            return False
        offset = sector * SECTOR_SIZE
        backend = self.backend
        if backend.direct and not backend.aligned(((buffer.gpa, len(buffer.view)) for buffer in data), offset):
            return False
        views = [buffer.view for buffer in data]
        stats = self.stats
        result = Status.OK
        try:
            if reading:
                stats.reads += 1
                preadv_full(backend.fd, views, offset)
                stats.bytes_read += length
            else:
                stats.writes += 1
                pwritev_full(backend.fd, views, offset)
                if not self.writeback:
                    backend.flush()
                stats.bytes_written += length
        except OSError as exc:
            result = Status.IOERR
            self._host_io_failed(head, exc)
        finally:
            views.clear()
        status.view[0] = result
        queue.complete(direct, length + 1 if reading and result is Status.OK else 1)
        return True

    def _handle(self, chain: DescriptorChain) -> bool:
        queue = self.queues[0]
        writable = chain.writable
        if writable.length == 0 or chain.readable.length < HEADER.size:
            # No status byte to answer in, or no header to act on: a malformed request.
            self.stats.unanswerable += 1
            self.stats.last_error = f"request {chain.head}: no header or no status byte"
            if writable.length:
                writable.write(bytes([Status.IOERR]), writable.length - 1)
            queue.complete(chain, 1 if writable.length else 0)
            return True
        kind, _, sector = HEADER.unpack(chain.readable.read(0, HEADER.size))
        after_header = chain.readable.split(HEADER.size)[1]
        data_in, status_part = writable.split(writable.length - 1)
        try:
            request = self._validate(kind, sector, after_header, data_in)
        except RequestError as exc:
            # Refused before anything is charged or done: no rate-limiter token, only the status byte.
            self._count_failure(exc.status, f"request {chain.head}: {exc}")
            status_part.write(bytes([exc.status]))
            queue.complete(chain, 1)
            return True
        limiter = self.rate_limiter
        if limiter is not None and self.defer_for_rate_limit(queue, limiter, request.cost):
            self.stats.throttled += 1
            return False
        status, used = self._perform(request, chain.head)
        if status is not Status.OK and limiter is not None:
            limiter.refund(request.cost)  # charge what is served: the host failed it
        status_part.write(bytes([status]))
        queue.complete(chain, used)
        return True

    def _validate(self, kind: int, sector: int, after_header: BufferList, data_in: BufferList) -> _Request:
        """Every check a request must pass before it may cost anything (RequestError if it fails)."""
        if kind == RequestType.IN:
            self._check_data(after_header.length == 0, data_in, "read")
            offset = self._check_range(sector, data_in.length // SECTOR_SIZE)
            return _Request(RequestType.IN, offset, data_in, data_in.length)
        if kind == RequestType.OUT:
            self._check_data(data_in.length == 0, after_header, "write")
            if self.readonly:
                raise RequestError(Status.IOERR, "write to a read-only drive")
            offset = self._check_range(sector, after_header.length // SECTOR_SIZE)
            return _Request(RequestType.OUT, offset, after_header, after_header.length)
        if kind == RequestType.FLUSH:
            return _Request(RequestType.FLUSH, 0, data_in, 0)
        if kind == RequestType.GET_ID:
            if after_header.length or data_in.length == 0:
                raise RequestError(Status.IOERR, "GET_ID needs a device-writable buffer for the ID")
            return _Request(RequestType.GET_ID, 0, data_in, 0)
        if kind in (RequestType.DISCARD, RequestType.WRITE_ZEROES):
            request = RequestType(kind)
            return _Request(request, 0, data_in, 0, self._segments(request, after_header, data_in))
        raise RequestError(Status.UNSUPP, f"request type {kind} is not supported")

    def _perform(self, request: _Request, head: int) -> tuple[Status, int]:
        """Carry out a validated request: its status and used length (the bytes the device wrote into the
        driver's buffers: the data read or the ID, and the status byte; only the status byte if it failed)."""
        stats = self.stats
        kind, data = request.kind, request.data
        try:
            if kind is RequestType.IN:
                stats.reads += 1
                self.backend.read_into(data, request.offset)
                stats.bytes_read += data.length
                return Status.OK, data.length + 1
            if kind is RequestType.OUT:
                stats.writes += 1
                self.backend.write_from(data, request.offset)
                if not self.writeback:
                    self.backend.flush()
                stats.bytes_written += data.length
            elif kind is RequestType.FLUSH:
                stats.flushes += 1
                self.backend.flush()
            elif kind is RequestType.GET_ID:
                stats.get_ids += 1
                return Status.OK, data.write(self.drive_id.ljust(ID_BYTES, b"\0")) + 1
            else:
                self._apply_segments(kind, request.segments)
        except OSError as exc:
            self._host_io_failed(head, exc)
            return Status.IOERR, 1
        return Status.OK, 1

    def _host_io_failed(self, head: int, exc: OSError) -> None:
        self._count_failure(Status.IOERR, f"request {head}: {self.backend.path}: {exc.strerror or exc}")

    def _count_failure(self, status: Status, message: str) -> None:
        if status is Status.UNSUPP:
            self.stats.unsupported += 1
        else:
            self.stats.io_errors += 1
        self.stats.last_error = message

    def _check_data(self, direction_ok: bool, data: BufferList, what: str) -> None:
        if not direction_ok:
            raise RequestError(Status.IOERR, f"{what} with data buffers in the wrong direction")
        if data.length % SECTOR_SIZE:
            raise RequestError(Status.IOERR, f"{what} of {data.length} bytes: not whole sectors")
        if len(data) > SEG_MAX:
            raise RequestError(Status.IOERR, f"{what} with {len(data)} segments (seg_max {SEG_MAX})")
        for _, size in data.buffers:
            if size > SIZE_MAX:
                raise RequestError(Status.IOERR, f"{what} with a segment over size_max {SIZE_MAX}")

    def _check_range(self, sector: int, sectors: int) -> int:
        if sector + sectors > self.capacity:
            raise RequestError(Status.IOERR, f"sectors {sector}+{sectors} are beyond the capacity "
                                             f"{self.capacity}")
        return sector * SECTOR_SIZE

    def _segments(self, kind: RequestType, segments: BufferList, data_in: BufferList) -> list[Segment]:
        """The checked segments of a DISCARD or WRITE_ZEROES request."""
        discard = kind is RequestType.DISCARD
        feature = VIRTIO_BLK_F_DISCARD if discard else VIRTIO_BLK_F_WRITE_ZEROES
        if not self.has_feature(feature):
            raise RequestError(Status.UNSUPP, f"{kind.name} was not negotiated")
        if data_in.length:
            raise RequestError(Status.IOERR, f"{kind.name} with device-writable data")
        if self.readonly:
            raise RequestError(Status.IOERR, f"{kind.name} on a read-only drive")
        count, remainder = divmod(segments.length, SEGMENT.size)
        limit_segments = MAX_DISCARD_SEG if discard else MAX_WRITE_ZEROES_SEG
        limit_sectors = MAX_DISCARD_SECTORS if discard else MAX_WRITE_ZEROES_SECTORS
        if remainder or count == 0 or count > limit_segments:
            raise RequestError(Status.IOERR, f"{kind.name} with {segments.length} bytes of segments")
        raw = segments.read_all()
        parsed = [SEGMENT.unpack_from(raw, i * SEGMENT.size) for i in range(count)]
        for sector, sectors, flags in parsed:
            if flags & ~SEGMENT_FLAG_UNMAP or (discard and flags & SEGMENT_FLAG_UNMAP):
                raise RequestError(Status.UNSUPP, f"{kind.name} with unsupported flags {flags:#x}")
            if sectors > limit_sectors:
                raise RequestError(Status.IOERR, f"{kind.name} of {sectors} sectors (max {limit_sectors})")
            self._check_range(sector, sectors)
        return parsed

    def _apply_segments(self, kind: RequestType, segments: list[Segment]) -> None:
        for sector, sectors, flags in segments:
            if kind is RequestType.DISCARD:
                self.stats.discards += 1
                self.backend.discard(sector * SECTOR_SIZE, sectors * SECTOR_SIZE)
            else:
                self.stats.write_zeroes += 1
                self.backend.write_zeroes(sector * SECTOR_SIZE, sectors * SECTOR_SIZE,
                                          unmap=bool(flags & SEGMENT_FLAG_UNMAP))
        if not self.writeback:
            self.backend.flush()

    # -- snapshots ----------------------------------------------------------------------------------
    def save_state(self) -> BlockState:
        counters = {name: getattr(self.stats, name) for name in BlockCounters.__struct_fields__
                    if name != "version"}
        return BlockState(drive_id=self.drive_id.decode("ascii", "replace"), path=self.backend.path,
                          size=self.backend.size, sectors=self.capacity, read_only=self.readonly,
                          counters=BlockCounters(**counters), rate_limiter=save_rate_limiter(self.rate_limiter))

    def check_state(self, state: VirtioDeviceState) -> None:
        """The drive must be what the guest saw: the same size in bytes, read-only or not as it was."""
        saved = expect_state(state, BlockState, self.name)
        path = self.backend.path
        if saved.size != self.backend.size:
            raise DeviceStateError(f"{self.name}: the snapshot's drive was {saved.size} bytes; {path} is "
                                   f"{self.backend.size} bytes")
        if saved.read_only != self.readonly:
            modes = {True: "read-only", False: "writable"}
            raise DeviceStateError(f"{self.name}: the snapshot's drive was {modes[saved.read_only]}; {path} is "
                                   f"opened {modes[self.readonly]}")
        check_rate_limiter(self.rate_limiter, saved.rate_limiter, self.name)

    def restore_state(self, state: VirtioDeviceState) -> None:
        self.check_state(state)
        assert isinstance(state, BlockState)
        for name in BlockCounters.__struct_fields__:
            if name != "version":
                setattr(self.stats, name, getattr(state.counters, name))
        restore_rate_limiter(self.rate_limiter, state.rate_limiter, self.name)

    def close(self) -> None:
        self.backend.close()
