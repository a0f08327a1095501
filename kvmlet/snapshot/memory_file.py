"""The memory file of a snapshot: guest RAM, region after region, sparse.

A full snapshot writes what the guest's memory holds and leaves holes where it holds nothing: for a memfd
the kernel knows which pages were ever written (``SEEK_DATA``/``SEEK_HOLE``: a page never touched, or
zeroed by punching a hole, is a hole); for memory mapped copy on write from an earlier snapshot's file it
skips the chunks that read as zeros. A diff snapshot writes only the pages given (those dirtied since the
last snapshot) into a file of the same size, and the state file lists them, so :func:`merge_diff` can lay
them onto the base's memory file without trusting the file system's idea of holes.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from kvmlet.memory import PAGE_SIZE, GuestMemory, MemoryRegion, nonzero_runs
from kvmlet.snapshot.format import MemoryInfo, SnapshotError

ZERO_CHUNK = 1 << 20
_SEEK_DATA = getattr(os, "SEEK_DATA", 3)
_SEEK_HOLE = getattr(os, "SEEK_HOLE", 4)


def _data_extents(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """[begin, end) ranges of ``fd`` between ``start`` and ``end`` that hold data (page aligned)."""
    offset = start
    while offset < end:
        try:
            data = os.lseek(fd, offset, _SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return       # no data after offset
            raise
        if data >= end:
            return
        hole = min(os.lseek(fd, data, _SEEK_HOLE), end)
        yield data // PAGE_SIZE * PAGE_SIZE, -(-hole // PAGE_SIZE) * PAGE_SIZE
        offset = hole


def data_runs(path: Path, memory: GuestMemory) -> list[tuple[int, int]]:
    """(guest-physical address, length) of each part of a memory file that holds data (SEEK_DATA), for a
    background copy that skips the holes; the whole memory if the file system cannot tell."""
    out: list[tuple[int, int]] = []
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return [(region.gpa, region.size) for region in memory.regions]
    try:
        for region in memory.regions:
            for begin, end in _data_extents(fd, region.fd_offset, region.fd_offset + region.size):
                out.append((region.gpa + begin - region.fd_offset, end - begin))
    except OSError:
        return [(region.gpa, region.size) for region in memory.regions]
    finally:
        os.close(fd)
    return out


def _nonzero_chunks(region: MemoryRegion) -> Iterator[tuple[int, int]]:
    """[begin, end) offsets in the region of the chunks that do not read as zeros (memcmp: a memoryview
    comparison is several times slower)."""
    libc = ctypes.CDLL(None)
    libc.memcmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    zeros = ctypes.create_string_buffer(ZERO_CHUNK)
    for begin in range(0, region.size, ZERO_CHUNK):
        end = min(begin + ZERO_CHUNK, region.size)
        if libc.memcmp(region.host_address + begin, zeros, end - begin):
            yield begin, end


def region_data_spans(memory: GuestMemory, region: MemoryRegion) -> Iterator[tuple[int, int]]:
    """[begin, end) offsets within the region that may hold data (the rest reads as zeros), for a full
    snapshot and a migration's first pass: a memfd's data extents, or the non-zero 1 MiB chunks of memory
    mapped copy on write from a file."""
    if memory.private_file is None:
        for begin, end in _data_extents(region.fd, region.fd_offset, region.fd_offset + region.size):
            yield begin - region.fd_offset, end - region.fd_offset
    else:
        yield from _nonzero_chunks(region)


def _merge(runs: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for offset, length in runs:
        if merged and merged[-1][0] + merged[-1][1] == offset:
            merged[-1] = (merged[-1][0], merged[-1][1] + length)
        else:
            merged.append((offset, length))
    return merged


def _write_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        written = os.pwrite(fd, data, offset)
        data = data[written:]
        offset += written


def write_memory_file(path: Path, memory: GuestMemory, *, dirty: list[bytearray] | None = None) -> MemoryInfo:
    """Write guest memory to ``path``: all of it (``dirty`` None) or the pages flagged in ``dirty`` (one
    byte per page per region, as :meth:`GuestMemory.take_dirty` gives); returns what the file holds."""
    runs: list[tuple[int, int]] = []
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise SnapshotError(f"memory file {path}: cannot create it: {exc.strerror}") from None
    try:
        os.ftruncate(fd, memory.size)
        file_offset = 0
        for index, region in enumerate(memory.regions):
            if dirty is None:
                spans = list(region_data_spans(memory, region))
            else:
                spans = [(first * PAGE_SIZE, (first + count) * PAGE_SIZE)
                         for first, count in nonzero_runs(dirty[index])]
            for begin, end in spans:
                _write_all(fd, region.view[begin:end], file_offset + begin)
                runs.append((file_offset + begin, end - begin))
            file_offset += region.size
    except OSError as exc:
        raise SnapshotError(f"memory file {path}: cannot write it: {exc.strerror}") from None
    finally:
        os.close(fd)
    return MemoryInfo(size=memory.size, ranges=[(r.gpa, r.size) for r in memory.regions],
                      snapshot_type="Full" if dirty is None else "Diff", runs=_merge(runs), file_name=str(path))


def check_memory_file(path: Path, info: MemoryInfo) -> None:
    """Refuse a memory file that cannot be the one described (missing, or of the wrong size)."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise SnapshotError(f"memory file {path}: {exc.strerror}") from None
    if size != info.size:
        raise SnapshotError(f"memory file {path} is {size} bytes; the snapshot's guest has {info.size} bytes "
                            "of memory (wrong file?)")


def merge_diff(info: MemoryInfo, diff_path: Path, base_path: Path) -> int:
    """Copy a diff snapshot's pages (``info``: its state file's memory section) onto the base snapshot's
    memory file, which then holds the guest's memory at the diff's moment; returns the bytes copied."""
    if info.snapshot_type != "Diff":
        raise SnapshotError(f"memory file {diff_path}: it belongs to a {info.snapshot_type} snapshot, not a diff")
    check_memory_file(diff_path, info)
    check_memory_file(base_path, info)
    copied = 0
    try:
        with open(diff_path, "rb") as diff, open(base_path, "r+b") as base:
            for offset, length in info.runs:
                done = 0
                while done < length:
                    chunk = os.pread(diff.fileno(), min(length - done, 8 << 20), offset + done)
                    if not chunk:
                        raise SnapshotError(f"memory file {diff_path}: ends inside a dirty run (truncated)")
                    _write_all(base.fileno(), memoryview(chunk), offset + done)
                    done += len(chunk)
                copied += length
    except OSError as exc:
        raise SnapshotError(f"merging {diff_path} onto {base_path}: {exc.strerror}") from None
    return copied
