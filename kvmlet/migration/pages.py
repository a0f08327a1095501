"""Which guest pages travel, and how: data, zero markers, unchanged markers.

The source copies the pages it sends out of guest memory first (the guest may write a page while it is on
its way; the copy is what the checksum covers and what the destination gets: a page written meanwhile is
dirty again and goes in a later round). A page of zeros travels as a marker, and so does a page that is
dirty but holds what was last sent (its SHA-256 matches the one recorded then): runs of them cost a few
bytes whatever their length. The first pass skips what the memory's backing knows to be empty (a memfd's
holes) without reading it. Hashes are recorded only from the second round on (the first pass would pay
about 3 us a page for pages that are mostly never written again).

The destination writes data pages into its memory, zeroes pages sent as zero markers after the first pass
(its memory starts as zeros), and leaves unchanged pages alone.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from kvmlet.memory import PAGE_SIZE, GuestMemory

DATA, ZERO, SAME = 0, 1, 2
KINDS = ("data", "zero", "unchanged")
PAGE_SHIFT = 12
ZERO_PAGE = bytes(PAGE_SIZE)
DIGEST = 16                                  # bytes of SHA-256 kept per page
UNKNOWN = bytes(DIGEST)
ZERO_DIGEST = hashlib.sha256(ZERO_PAGE).digest()[:DIGEST]
SCAN_PAGES = 256                             # pages copied and classified at a time (1 MiB)
FRAME_DATA = 1 << 20                         # data bytes per frame, at most (about)
FRAME_RUNS = 4096                            # runs per frame, at most
ZERO_CHUNK = memoryview(bytes(SCAN_PAGES * PAGE_SIZE))

Run = tuple[int, int, int]                   # (page frame number, count, kind)
Emit = Callable[[list[Run], list[memoryview]], None]


@dataclass
class PageCounts:
    """Pages sent (or received) by kind."""

    data: int = 0
    zero: int = 0
    same: int = 0

    def add(self, kind: int, count: int) -> None:
        if kind == DATA:
            self.data += count
        elif kind == ZERO:
            self.zero += count
        else:
            self.same += count

    @property
    def total(self) -> int:
        return self.data + self.zero + self.same


class PageSender:
    """Turns spans of guest pages into frames of runs (``emit(runs, pieces)``: each frame's runs and the
    copies of its data pages, in order)."""

    def __init__(self, memory: GuestMemory, emit: Emit) -> None:
        self.memory = memory
        self.emit = emit
        self.counts = PageCounts()
        self._digests = [bytearray(DIGEST * (region.size // PAGE_SIZE)) for region in memory.regions]
        self._runs: list[Run] = []
        self._pieces: list[memoryview] = []
        self._data = 0

    # -- what to send --
    def first_pass(self, spans: Callable[[int], Iterable[tuple[int, int]]]) -> None:
        """Every page of every region: ``spans(region_index)`` gives the [begin, end) byte offsets that may
        hold data; the rest goes as zero markers without being read."""
        for index, region in enumerate(self.memory.regions):
            pages = region.size // PAGE_SIZE
            at = 0
            for begin, end in spans(index):
                first, last = begin // PAGE_SIZE, -(-end // PAGE_SIZE)
                if first > at:
                    self._add(index, at, first - at, ZERO, None)
                if last > max(first, at):
                    self.send_pages(index, max(first, at), last - max(first, at), hashed=False)
                at = max(at, last)
            if pages > at:
                self._add(index, at, pages - at, ZERO, None)
        self.flush()

    def send_dirty(self, dirty: list[bytearray], *, hashed: bool = True) -> None:
        """The pages flagged in a dirty map (one byte per page per region); ``hashed``: recognize pages that
        hold what was last sent (about 3 us a page of SHA-256) and record what is sent for the next round."""
        for index, pages in enumerate(dirty):
            for first, count in dirty_runs(pages):
                self.send_pages(index, first, count, hashed=hashed)
        self.flush()

    def send_pages(self, index: int, first: int, count: int, *, hashed: bool) -> None:
        """Pages [first, first + count) of region ``index``, copied and classified ``SCAN_PAGES`` at a time."""
        region = self.memory.regions[index]
        digests = self._digests[index]
        while count > 0:
            n = min(count, SCAN_PAGES)
            base = first * PAGE_SIZE
            if region.view[base:base + n * PAGE_SIZE] == ZERO_CHUNK[:n * PAGE_SIZE]:   # in place: no copy
                self._add(index, first, n, ZERO, None)
                digests[first * DIGEST:(first + n) * DIGEST] = ZERO_DIGEST * n
            else:
                self._classify(index, first, memoryview(bytes(region.view[base:base + n * PAGE_SIZE])), digests,
                               hashed)
            first += n
            count -= n

    def _classify(self, index: int, first: int, copy: memoryview, digests: bytearray, hashed: bool) -> None:
        run_start, run_kind = 0, -1
        n = len(copy) // PAGE_SIZE
        for i in range(n):
            page = copy[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]
            slot = (first + i) * DIGEST
            if page == ZERO_PAGE:
                kind = ZERO
                digests[slot:slot + DIGEST] = ZERO_DIGEST
            elif hashed:
                digest = hashlib.sha256(page).digest()[:DIGEST]
                if digests[slot:slot + DIGEST] == digest:
                    kind = SAME
                else:
                    kind = DATA
                    digests[slot:slot + DIGEST] = digest
            else:
                kind = DATA
                digests[slot:slot + DIGEST] = UNKNOWN
            if kind != run_kind:
                if run_kind >= 0:
                    self._add_run(index, first, copy, run_start, i, run_kind)
                run_start, run_kind = i, kind
        self._add_run(index, first, copy, run_start, n, run_kind)

    def _add_run(self, index: int, first: int, copy: memoryview, start: int, end: int, kind: int) -> None:
        piece = copy[start * PAGE_SIZE:end * PAGE_SIZE] if kind == DATA else None
        self._add(index, first + start, end - start, kind, piece)

    def _add(self, index: int, first: int, count: int, kind: int, piece: memoryview | None) -> None:
        pfn = (self.memory.regions[index].gpa >> PAGE_SHIFT) + first
        self.counts.add(kind, count)
        runs = self._runs
        if runs and runs[-1][2] == kind and runs[-1][0] + runs[-1][1] == pfn:
            runs[-1] = (runs[-1][0], runs[-1][1] + count, kind)
        else:
            runs.append((pfn, count, kind))
        if piece is not None:
            self._pieces.append(piece)
            self._data += len(piece)
        if self._data >= FRAME_DATA or len(runs) >= FRAME_RUNS:
            self.flush()

    def flush(self) -> None:
        if self._runs:
            runs, pieces = self._runs, self._pieces
            self._runs, self._pieces, self._data = [], [], 0
            self.emit(runs, pieces)

    def forget(self) -> None:
        """Drop every recorded hash (e.g. before a new migration of the same memory)."""
        for digests in self._digests:
            digests[:] = bytes(len(digests))


def dirty_runs(pages: bytearray | bytes) -> Iterator[tuple[int, int]]:
    """(first page, count) of each run of flagged pages in a dirty map whose bytes are 0 or 1 (as
    :meth:`GuestMemory.take_dirty` and KVM's log merged into it give): two ``find`` calls (memchr) per run,
    so a map that is nearly all clean costs next to nothing."""
    end = len(pages)
    at = pages.find(1)
    while at >= 0:
        stop = pages.find(0, at)
        if stop < 0:
            stop = end
        yield at, stop - at
        at = pages.find(1, stop)


def merge_dirty(into: list[bytearray], more: list[bytearray]) -> None:
    """Flag in ``into`` every page flagged in ``more``."""
    for target, extra in zip(into, more, strict=True):
        for first, count in dirty_runs(extra):
            target[first:first + count] = b"\1" * count


def apply_pages(memory: GuestMemory, runs: list[Run], data: memoryview, first_pass: bool) -> PageCounts:
    """Lay a frame's runs onto the destination's memory; ValueError for runs outside it or data that does not
    add up."""
    counts = PageCounts()
    at = 0
    for pfn, count, kind in runs:
        if count <= 0 or pfn < 0 or kind not in (DATA, ZERO, SAME):
            raise ValueError(f"a run of {count} pages of kind {kind} at page {pfn} is not one kvmlet sends")
        gpa, length = pfn << PAGE_SHIFT, count << PAGE_SHIFT
        if kind == DATA:
            if at + length > len(data):
                raise ValueError(f"the data ends inside the run at page {pfn:#x}")
            memory.view(gpa, length)[:] = data[at:at + length]
            at += length
        elif kind == ZERO:
            if not first_pass:         # the destination's memory starts as zeros
                memory.fill(gpa, length, 0)
            else:
                memory.region_of(gpa, length)
        else:
            memory.region_of(gpa, length)
        counts.add(kind, count)
    if at != len(data):
        raise ValueError(f"{len(data) - at} bytes of data belong to no run")
    return counts


DIGEST_CHUNK = 1 << 20


def memory_digest(memory: GuestMemory) -> str:
    """A SHA-256 of all guest memory's contents, 1 MiB at a time: a chunk that reads as zeros counts as one
    byte, so two memories with the same contents have the same digest however their zeros are stored, and
    what the backing knows to be empty (a memfd's holes) is neither read nor allocated."""
    from kvmlet.snapshot.memory_file import region_data_spans

    digest = hashlib.sha256()
    zeros = memoryview(bytes(DIGEST_CHUNK))
    for region in memory.regions:
        spans = list(region_data_spans(memory, region))
        span = 0
        for begin in range(0, region.size, DIGEST_CHUNK):
            end = min(begin + DIGEST_CHUNK, region.size)
            while span < len(spans) and spans[span][1] <= begin:
                span += 1
            chunk = region.view[begin:end]
            if span >= len(spans) or spans[span][0] >= end or chunk == zeros[:end - begin]:
                digest.update(b"\0")
            else:
                digest.update(b"\1")
                digest.update(chunk)
    return digest.hexdigest()
