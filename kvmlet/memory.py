"""Guest memory: memfd-backed regions and the one bounds-checked way to reach them.

Every read or write by guest-physical address (GPA) in kvmlet goes through :class:`GuestMemory`.
A range that is not wholly inside one region raises :class:`GuestMemoryError`; nothing outside the
guest's memory can be reached through it, whatever address a guest or an image supplies.

While dirty tracking is on (diff snapshots, migration) it also remembers each page the VMM writes; KVM's
dirty log covers the pages the guest writes. A restored VM's memory is the snapshot's memory file mapped
copy on write (:meth:`GuestMemory.from_file`).
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
import os
import re
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from kvmlet.errors import KvmletError

PAGE_SIZE = 4096
MiB = 1 << 20
GiB = 1 << 30

# Guest-physical layout of RAM on x86: RAM below the 32-bit MMIO hole, the rest above 4 GiB.
MMIO_HOLE_START = 0xC000_0000
MMIO_HOLE_END = 1 << 32

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class GuestMemoryError(KvmletError, ValueError):
    """A guest-physical range that is not inside the guest's memory."""


@dataclass
class MemoryRegion:
    """One contiguous range of guest RAM, backed by (part of) a memfd mapping."""

    gpa: int
    size: int
    mapping: mmap.mmap
    fd: int
    fd_offset: int
    slot: int
    view: memoryview = field(repr=False)
    host_address: int = 0

    @property
    def end(self) -> int:
        """First GPA after the region."""
        return self.gpa + self.size

    def contains(self, gpa: int, length: int = 1) -> bool:
        return self.gpa <= gpa and gpa + length <= self.end


def ram_layout(size: int) -> list[tuple[int, int]]:
    """Split ``size`` bytes of RAM into (gpa, size) ranges around the 32-bit MMIO hole."""
    if size <= 0:
        raise GuestMemoryError("memory size must be positive")
    if size % PAGE_SIZE:
        raise GuestMemoryError(f"memory size {size} is not a multiple of {PAGE_SIZE} bytes")
    if size <= MMIO_HOLE_START:
        return [(0, size)]
    return [(0, MMIO_HOLE_START), (MMIO_HOLE_END, size - MMIO_HOLE_START)]


_MADV_POPULATE_WRITE = 23   # Linux 5.14
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


def _punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate ``[offset, offset+length)`` of a memfd (it then reads as zeros); False if unsupported."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    return int(libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)) == 0


def nonzero_runs(pages: bytes | bytearray) -> Iterator[tuple[int, int]]:
    """(first page, count) of each run of non-zero bytes in a one-byte-per-page map."""
    for match in re.finditer(rb"[^\x00]+", pages):
        yield match.start(), match.end() - match.start()


def _host_address(mapping: mmap.mmap) -> int:
    buf = (ctypes.c_char * 1).from_buffer(mapping)
    address = ctypes.addressof(buf)
    del buf
    return address


def _shmem_thp_possible() -> bool:
    """Whether the kernel may back memfd (shmem) memory with huge pages after MADV_HUGEPAGE."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/shmem_enabled") as f:
            setting = f.read()
    except OSError:
        return False
    return "[never]" not in setting and "[deny]" not in setting


class GuestMemory:
    """Guest RAM: memfd-backed regions with bounds-checked access by guest-physical address."""

    def __init__(self, ranges: Sequence[tuple[int, int]], *, name: str = "kvmlet-guest",
                 hugepages: bool = True) -> None:
        total = sum(size for _, size in ranges)
        if total <= 0:
            raise GuestMemoryError("guest memory size must be positive")
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        self.regions: list[MemoryRegion] = []
        self.hugepages = False
        try:
            os.ftruncate(self.fd, total)
            offset = 0
            for slot, (gpa, size) in enumerate(sorted(ranges)):
                if gpa % PAGE_SIZE or size % PAGE_SIZE:
                    raise GuestMemoryError(f"region {gpa:#x}+{size:#x} is not page aligned")
                if self.regions and gpa < self.regions[-1].end:
                    raise GuestMemoryError(f"region {gpa:#x}+{size:#x} overlaps another")
                mapping = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED,
                                    prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
                if hugepages and hasattr(mmap, "MADV_HUGEPAGE"):
                    try:
                        mapping.madvise(mmap.MADV_HUGEPAGE)
                        self.hugepages = _shmem_thp_possible()
                    except OSError:
                        pass
                region = MemoryRegion(gpa=gpa, size=size, mapping=mapping, fd=self.fd,
                                      fd_offset=offset, slot=slot, view=memoryview(mapping),
                                      host_address=_host_address(mapping))
                self.regions.append(region)
                offset += size
        except BaseException:
            self.close()
            raise
        self._starts = [r.gpa for r in self.regions]
        self.size = total
        self.private_file: str | None = None      # set by from_file: the file mapped copy-on-write
        self._dirty: list[bytearray] | None = None  # per region, one byte per page the VMM wrote

    @classmethod
    def from_file(cls, path: str, ranges: Sequence[tuple[int, int]], *, shared: bool = False) -> GuestMemory:
        """Guest RAM mapped from a memory file (a snapshot's): privately (copy on write) unless ``shared``.

        The regions are laid out in the file one after another, as :class:`GuestMemory` lays them out in its
        memfd. Nothing is read here: pages come in from the file as the guest (or the VMM) touches them."""
        self = cls.__new__(cls)
        total = sum(size for _, size in ranges)
        flags = os.O_CLOEXEC | (os.O_RDWR if shared else os.O_RDONLY)
        try:
            self.fd = os.open(path, flags)
        except OSError as exc:
            raise GuestMemoryError(f"memory file {path}: {exc.strerror}") from None
        self.regions = []
        self.hugepages = False
        try:
            actual = os.fstat(self.fd).st_size
            if actual != total:
                raise GuestMemoryError(f"memory file {path} is {actual} bytes; the VM has {total} bytes of "
                                       "memory")
            offset = 0
            for slot, (gpa, size) in enumerate(sorted(ranges)):
                mapping = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED if shared else mmap.MAP_PRIVATE,
                                    prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
                self.regions.append(MemoryRegion(gpa=gpa, size=size, mapping=mapping, fd=self.fd,
                                                 fd_offset=offset, slot=slot, view=memoryview(mapping),
                                                 host_address=_host_address(mapping)))
                offset += size
        except BaseException:
            self.close()
            raise
        self._starts = [r.gpa for r in self.regions]
        self.size = total
        self.private_file = None if shared else path
        self._dirty = None
        return self

    def populate(self, ranges: Sequence[tuple[int, int]] | None = None, chunk: int = 2 * MiB,
                 stop: Callable[[], bool] | None = None) -> bool:
        """Fault in the pages of ``ranges`` ((gpa, length); default all memory) for writing
        (``MADV_POPULATE_WRITE``), chunk by chunk: for a copy-on-write mapping this makes each page the VM's
        own copy now instead of at the guest's first write to it. Releases the GIL between chunks (ctypes);
        ``stop()`` ends it early. False if the kernel cannot (before Linux 5.14) or the memory went away."""
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        if ranges is None:
            ranges = [(region.gpa, region.size) for region in self.regions]
        for gpa, length in ranges:
            try:
                region = self.region_of(gpa, length)
            except GuestMemoryError:
                return False
            start = region.host_address + (gpa - region.gpa)
            for offset in range(0, length, chunk):
                if stop is not None and stop():
                    return True
                if libc.madvise(start + offset, min(chunk, length - offset), _MADV_POPULATE_WRITE) != 0:
                    return False
        return True

    # -- pages written by the VMM ------------------------------------------------------------------
    @property
    def dirty_tracking(self) -> bool:
        return self._dirty is not None

    def start_dirty_tracking(self) -> None:
        """From now on remember each page the VMM writes (devices, loaders) until :meth:`take_dirty`."""
        if self._dirty is None:
            self._dirty = [bytearray(region.size // PAGE_SIZE) for region in self.regions]

    def stop_dirty_tracking(self) -> None:
        self._dirty = None

    def mark_dirty(self, gpa: int, length: int) -> None:
        """Note that the VMM wrote ``[gpa, gpa+length)`` (a no-op unless tracking is on)."""
        dirty = self._dirty
        if dirty is None or length <= 0:
            return
        index = bisect.bisect_right(self._starts, gpa) - 1
        if index < 0:
            return
        region = self.regions[index]
        first = (gpa - region.gpa) // PAGE_SIZE
        last = min((gpa - region.gpa + length - 1) // PAGE_SIZE, len(dirty[index]) - 1)
        if last >= first:
            dirty[index][first:last + 1] = b"\1" * (last - first + 1)

    def requeue_dirty(self, pages: list[bytearray]) -> None:
        """Put pages taken by :meth:`take_dirty` (or merged with KVM's log) back, e.g. after a failed save."""
        if self._dirty is None:
            return
        for index, region_pages in enumerate(pages):
            current = self._dirty[index]
            for first, count in nonzero_runs(region_pages):
                current[first:first + count] = b"\1" * count

    def take_dirty(self) -> list[bytearray]:
        """Per region, one byte per page (non-zero: written by the VMM since the last call); clears them."""
        if self._dirty is None:
            return [bytearray(region.size // PAGE_SIZE) for region in self.regions]
        taken = self._dirty
        self._dirty = [bytearray(region.size // PAGE_SIZE) for region in self.regions]
        return taken

    @classmethod
    def with_size(cls, size: int, **kwargs: object) -> GuestMemory:
        """RAM of ``size`` bytes laid out around the 32-bit MMIO hole."""
        return cls(ram_layout(size), **kwargs)  # type: ignore[arg-type]

    # -- lookup -------------------------------------------------------------------------------------
    def region_of(self, gpa: int, length: int = 1) -> MemoryRegion:
        """The region that holds all of ``[gpa, gpa+length)``, or GuestMemoryError."""
        if length < 0 or gpa < 0:
            raise GuestMemoryError(f"invalid guest range {gpa:#x}+{length:#x}")
        index = bisect.bisect_right(self._starts, gpa) - 1
        if index >= 0:
            region = self.regions[index]
            if gpa + length <= region.end:
                return region
        raise GuestMemoryError(f"guest range {gpa:#x}+{length:#x} is outside guest memory")

    def contains(self, gpa: int, length: int = 1) -> bool:
        try:
            self.region_of(gpa, length)
        except GuestMemoryError:
            return False
        return True

    def view(self, gpa: int, length: int) -> memoryview:
        """A writable memoryview of ``[gpa, gpa+length)``; the range must lie in one region.

        Whoever writes guest memory through a view calls :meth:`mark_dirty` for what it wrote (the virtqueue
        does it for every buffer a device completes), so that diff snapshots and migration see the page."""
        region = self.region_of(gpa, length)
        start = gpa - region.gpa
        return region.view[start:start + length]

    # -- access -------------------------------------------------------------------------------------
    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.view(gpa, length))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self.view(gpa, len(data))[:] = data
        if self._dirty is not None:
            self.mark_dirty(gpa, len(data))

    def fill(self, gpa: int, length: int, byte: int = 0) -> None:
        view = self.view(gpa, length)
        if self._dirty is not None:
            self.mark_dirty(gpa, length)
        if byte == 0 and length >= PAGE_SIZE:
            self._zero(gpa, length)
        else:
            view[:] = bytes([byte]) * length

    def _zero(self, gpa: int, length: int) -> None:
        """Zero a range: whole pages by punching a hole in the memfd (no page is touched or allocated,
        so a fresh VM's bss costs neither time nor resident memory), the ragged ends with memset."""
        region = self.region_of(gpa, length)
        offset = gpa - region.gpa
        first = -(-offset // PAGE_SIZE) * PAGE_SIZE
        last = (offset + length) // PAGE_SIZE * PAGE_SIZE
        if last > first and _punch_hole(region.fd, region.fd_offset + first, last - first):
            ctypes.memset(region.host_address + offset, 0, first - offset)
            ctypes.memset(region.host_address + last, 0, offset + length - last)
        else:
            ctypes.memset(self.host_address(gpa), 0, length)

    def read_u16(self, gpa: int) -> int:
        return int(_U16.unpack(self.view(gpa, 2))[0])

    def read_u32(self, gpa: int) -> int:
        return int(_U32.unpack(self.view(gpa, 4))[0])

    def read_u64(self, gpa: int) -> int:
        return int(_U64.unpack(self.view(gpa, 8))[0])

    # Stores go through a typed memoryview: one store of the field's width, so a guest polling the field
    # never sees a torn or zeroed value (struct.pack_into clears the field before writing it). x86 is
    # little-endian, the memoryview's native order.
    def write_u16(self, gpa: int, value: int) -> None:
        self.view(gpa, 2).cast("H")[0] = value
        if self._dirty is not None:
            self.mark_dirty(gpa, 2)

    def write_u32(self, gpa: int, value: int) -> None:
        self.view(gpa, 4).cast("I")[0] = value
        if self._dirty is not None:
            self.mark_dirty(gpa, 4)

    def write_u64(self, gpa: int, value: int) -> None:
        self.view(gpa, 8).cast("Q")[0] = value
        if self._dirty is not None:
            self.mark_dirty(gpa, 8)

    def read_cstring(self, gpa: int, max_length: int) -> bytes:
        """Bytes at ``gpa`` up to a NUL (exclusive), at most ``max_length``, clipped to the region."""
        region = self.region_of(gpa)
        length = min(max_length, region.end - gpa)
        data = bytes(self.view(gpa, length))
        nul = data.find(b"\0")
        return data if nul < 0 else data[:nul]

    def host_address(self, gpa: int) -> int:
        """The host virtual address of ``gpa`` (for the KVM boundary only)."""
        region = self.region_of(gpa)
        return region.host_address + (gpa - region.gpa)

    def ram_ranges(self) -> Iterator[tuple[int, int]]:
        for region in self.regions:
            yield region.gpa, region.size

    @property
    def end(self) -> int:
        """First GPA after the highest region."""
        return self.regions[-1].end if self.regions else 0

    # -- lifetime -----------------------------------------------------------------------------------
    def close(self) -> None:
        """Unmap every region and close the memfd.

        A region still viewed by someone stays mapped until that view is gone (unmapping it would leave the
        view dangling); the memfd is closed regardless and GuestMemoryError says which regions were kept.
        """
        kept = []
        for region in self.regions:
            region.view.release()
            try:
                region.mapping.close()
            except BufferError:
                kept.append(f"{region.gpa:#x}+{region.size:#x}")
        self.regions = []
        self._starts = []
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if kept:
            raise GuestMemoryError(f"guest memory {', '.join(kept)} is still in use (an open view); "
                                   "it is unmapped when the view is released")

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
