"""The host side of a virtio-blk drive: a raw image file or a block device.

Reads and writes go with ``os.preadv`` / ``os.pwritev`` straight between the file and guest memory
(memoryviews of the guest's buffers: no copy). With ``direct=True`` the file is opened with O_DIRECT;
requests whose guest buffers, offset and length are all aligned to the backend's logical block size
still go straight to guest memory, the others through an aligned bounce buffer (reading, or
read-modify-writing, whole blocks).

Every method raises OSError on failure; the device turns that into VIRTIO_BLK_S_IOERR.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import stat
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from kvmlet.devices.virtio.queue import BufferList
from kvmlet.errors import KvmletError

SECTOR_SIZE = 512
BOUNCE_SIZE = 1 << 20
ZERO_CHUNK = 1 << 20

# <linux/fs.h> block device ioctls
BLKSSZGET = 0x1268
BLKDISCARD = 0x1277
BLKZEROOUT = 0x127F
BLKGETSIZE64 = 0x80081272

# <linux/falloc.h>
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.ENOSYS)


class BlockBackendError(KvmletError, RuntimeError):
    """A drive that cannot be opened or used as configured."""


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if libc.fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _consume(views: list[memoryview], count: int) -> list[memoryview]:
    """``views`` without their first ``count`` bytes."""
    while count and views:
        first = views[0]
        if count >= len(first):
            count -= len(first)
            views = views[1:]
        else:
            views = [first[count:], *views[1:]]
            count = 0
    return views


def preadv_full(fd: int, views: list[memoryview], offset: int, iov_max: int = 1024) -> None:
    """Fill every view from ``offset``; end of file before that is an I/O error."""
    if 0 < len(views) <= iov_max:   # the usual case: one call reads everything
        wanted = sum(map(len, views))
        if wanted and os.preadv(fd, views, offset) == wanted:
            return
        # a short read (or nothing to read): the general path below re-reads the rest
    views = [v for v in views if len(v)]
    while views:
        done = os.preadv(fd, views[:iov_max], offset)
        if done == 0:
            raise OSError(errno.EIO, "unexpected end of file")
        offset += done
        views = _consume(views, done)


def pwritev_full(fd: int, views: list[memoryview], offset: int, iov_max: int = 1024) -> None:
    """Write every view at ``offset``."""
    views = [v for v in views if len(v)]
    while views:
        done = os.pwritev(fd, views[:iov_max], offset)
        if done == 0:
            raise OSError(errno.EIO, "write made no progress")
        offset += done
        views = _consume(views, done)


@dataclass
class BlockBackend:
    """An open drive; ``size`` in bytes, ``align`` the O_DIRECT alignment (1 without direct)."""

    path: str
    readonly: bool
    direct: bool
    fd: int
    size: int
    is_block_device: bool
    align: int = 1
    _bounce: mmap.mmap | None = field(default=None, repr=False)

    @classmethod
    def open(cls, path: str, *, readonly: bool = False, direct: bool = False) -> BlockBackend:
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
        if direct:
            flags |= os.O_DIRECT
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            if direct and exc.errno == errno.EINVAL:
                raise BlockBackendError(f"drive {path}: its file system does not support direct=on "
                                        f"(O_DIRECT)") from None
            raise BlockBackendError(f"drive {path}: cannot open: {exc.strerror}") from None
        try:
            info = os.fstat(fd)
            is_block = stat.S_ISBLK(info.st_mode)
            if not is_block and not stat.S_ISREG(info.st_mode):
                raise BlockBackendError(f"drive {path}: not a regular file or a block device")
            size = os.lseek(fd, 0, os.SEEK_END)
            backend = cls(path, readonly, direct, fd, size, is_block)
            if direct:
                backend.align = backend._probe_alignment()
                if size % backend.align:
                    raise BlockBackendError(f"drive {path}: direct=on needs a size that is a multiple of "
                                            f"{backend.align} bytes (it is {size})")
                backend._bounce = mmap.mmap(-1, BOUNCE_SIZE)
        except BaseException:
            os.close(fd)
            raise
        return backend

    def _probe_alignment(self) -> int:
        if self.is_block_device:
            raw = fcntl.ioctl(self.fd, BLKSSZGET, struct.pack("i", 0))
            return max(SECTOR_SIZE, int(struct.unpack("i", raw)[0]))
        probe = mmap.mmap(-1, mmap.PAGESIZE)
        try:
            view = memoryview(probe)
            try:
                for align in (SECTOR_SIZE, 4096):
                    try:
                        os.preadv(self.fd, [view[:align]], 0)
                        return align
                    except OSError as exc:
                        if exc.errno != errno.EINVAL:
                            raise BlockBackendError(f"drive {self.path}: {exc.strerror}") from None
            finally:
                view.release()
        finally:
            probe.close()
        raise BlockBackendError(f"drive {self.path}: O_DIRECT reads fail at every alignment")

    @property
    def logical_block_size(self) -> int:
        return max(SECTOR_SIZE, self.align)

    def aligned(self, buffers: Iterable[tuple[int, int]], offset: int) -> bool:
        """Whether guest buffers ``(gpa, length)`` and a drive offset suit O_DIRECT without bouncing."""
        a = self.align
        return offset % a == 0 and all(gpa % a == 0 and size % a == 0 for gpa, size in buffers)

    # -- data ---------------------------------------------------------------------------------------
    def read_into(self, buffers: BufferList, offset: int) -> None:
        """Fill ``buffers`` with the drive's bytes from ``offset``."""
        if not self.direct or self.aligned(buffers.buffers, offset):
            preadv_full(self.fd, buffers.views(), offset)
        else:
            self._bounced(buffers, offset, write=False)

    def write_from(self, buffers: BufferList, offset: int) -> None:
        """Write ``buffers`` to the drive at ``offset``."""
        if not self.direct or self.aligned(buffers.buffers, offset):
            pwritev_full(self.fd, buffers.views(), offset)
        else:
            self._bounced(buffers, offset, write=True)

    def _bounced(self, buffers: BufferList, offset: int, *, write: bool) -> None:
        assert self._bounce is not None
        a = self.align
        length = buffers.length
        start = offset - offset % a
        end = -(-(offset + length) // a) * a
        bounce = memoryview(self._bounce)
        try:
            pos = start
            while pos < end:
                chunk = min(BOUNCE_SIZE, end - pos)
                lo, hi = max(pos, offset), min(pos + chunk, offset + length)
                window = bounce[:chunk]
                if not write or lo > pos or hi < pos + chunk:
                    preadv_full(self.fd, [window], pos)  # whole blocks (read-modify-write at the edges)
                if write:
                    window[lo - pos:hi - pos] = buffers.read(lo - offset, hi - lo)
                    pwritev_full(self.fd, [window], pos)
                else:
                    buffers.write(window[lo - pos:hi - pos], lo - offset)
                pos += chunk
        finally:
            bounce.release()

    def flush(self) -> None:
        os.fdatasync(self.fd)

    # -- discard and write zeroes -------------------------------------------------------------------
    def discard(self, offset: int, length: int) -> None:
        """Deallocate a range if the backend can; a backend that cannot is not an error (advisory)."""
        try:
            if self.is_block_device:
                fcntl.ioctl(self.fd, BLKDISCARD, struct.pack("QQ", offset, length))
            else:
                _fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED:
                raise

    def write_zeroes(self, offset: int, length: int, *, unmap: bool) -> None:
        """Make a range read back as zeroes (deallocating it if ``unmap`` and the backend can)."""
        attempts: list[int] = []
        if self.is_block_device:
            try:
                fcntl.ioctl(self.fd, BLKZEROOUT, struct.pack("QQ", offset, length))
                return
            except OSError as exc:
                if exc.errno not in _UNSUPPORTED:
                    raise
        else:
            zero_range = FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE
            punch = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
            attempts = [punch, zero_range] if unmap else [zero_range]
        for mode in attempts:
            try:
                _fallocate(self.fd, mode, offset, length)
                return
            except OSError as exc:
                if exc.errno not in _UNSUPPORTED:
                    raise
        self._write_zero_blocks(offset, length)

    def _write_zero_blocks(self, offset: int, length: int) -> None:
        zeros = mmap.mmap(-1, ZERO_CHUNK)  # page aligned, so usable with O_DIRECT
        view = memoryview(zeros)
        try:
            end = offset + length
            while offset < end:
                chunk = min(ZERO_CHUNK, end - offset)
                pwritev_full(self.fd, [view[:chunk]], offset)
                offset += chunk
        finally:
            view.release()
            zeros.close()

    def close(self) -> None:
        if self._bounce is not None:
            self._bounce.close()
            self._bounce = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
