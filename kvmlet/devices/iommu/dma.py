"""A device's DMA address space: guest memory as one device sees it through the VT-d unit.

Every device behind the unit gets its own :class:`DmaAddressSpace` (its source ID is its PCI requester ID), with
the interface the virtqueue, its chains and the devices use of :class:`~kvmlet.memory.GuestMemory`
(:class:`DeviceMemory`), so nothing in a device changes: an address it is given is an I/O virtual address (IOVA);
each access is translated and checked by :meth:`~kvmlet.devices.iommu.vtd.VtdUnit.translate`, and a refused one
raises :class:`~kvmlet.devices.iommu.vtd.DmaFault` (a :class:`~kvmlet.memory.GuestMemoryError`) after the unit
recorded the fault. With translation off, or a pass-through context, the addresses are guest-physical and the
space hands out guest memory's own regions (the virtio-mmio fast path, unchanged).

Views: :meth:`DmaAddressSpace.region_of` gives a window (:class:`DmaWindow`) over the guest memory one IOVA range
maps to: the whole leaf page (4 KiB, 2 MiB or 1 GiB) clipped to the RAM region it lies in, so a queue can keep it
for the next buffers. The queue keeps such windows only until the unit tells this space of an invalidation
(:meth:`DmaAddressSpace.on_invalidate`): then they are dropped, under the device's lock, before the guest sees the
invalidation complete. A range that maps to guest memory in pieces is no one view: :meth:`segments` splits it.

The space keeps the windows it translated (at most ``MAX_WINDOWS``, by I/O virtual page, with the permissions of
the leaves they came from): a device-side TLB, so that after the first access to a page an access costs a
dictionary lookup, not a walk. A kept window is used only while the unit's cache generation is the one it was
translated under; every invalidation and every switch of translation bumps it first.

Nothing here reaches outside guest RAM: a translation that leads outside it (the MMIO hole, beyond the end) fails
the access (not a remapping fault: the unit translated it; nothing is there), and every view is a slice of a
RAM region's own view.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Protocol

from kvmlet.devices.iommu.vtd import DmaFault, VtdUnit
from kvmlet.devices.iommu.walk import Translation
from kvmlet.memory import GuestMemory, GuestMemoryError, MemoryRegion

MAX_TRANSLATIONS_PER_RANGE = 16384   # leaf pages one range may cover (64 MiB of 4 KiB pages): more is refused
MAX_WINDOWS = 256                    # windows an address space keeps (by I/O virtual page) between invalidations


class Window(Protocol):
    """What the virtqueue uses of a region: where it starts and ends (device addresses) and its bytes."""

    @property
    def gpa(self) -> int: ...

    @property
    def end(self) -> int: ...

    @property
    def view(self) -> memoryview: ...


class DeviceMemory(Protocol):
    """The memory interface of a device's queues and chains: :class:`GuestMemory` itself (virtio-mmio, no IOMMU)
    or a :class:`DmaAddressSpace`."""

    @property
    def dirty_tracking(self) -> bool: ...

    def mark_dirty(self, gpa: int, length: int) -> None: ...

    def region_of(self, gpa: int, length: int = 1) -> Window: ...

    def contains(self, gpa: int, length: int = 1) -> bool: ...

    def view(self, gpa: int, length: int) -> memoryview: ...

    def read(self, gpa: int, length: int) -> bytes: ...

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None: ...

    def fill(self, gpa: int, length: int, byte: int = 0) -> None: ...


class DmaWindow(NamedTuple):
    """A contiguous IOVA range and the guest memory it maps to (as a region: ``gpa`` is the first IOVA, ``target``
    the guest-physical address it maps to)."""

    gpa: int
    size: int
    view: memoryview
    readable: bool
    writable: bool
    target: int

    @property
    def end(self) -> int:
        return self.gpa + self.size


class DmaScatteredError(GuestMemoryError):
    """A range the device may access that is not one contiguous piece of guest memory (or is too large)."""


class DmaTargetError(GuestMemoryError):
    """A range that translates to something that is not guest RAM."""


class DmaAddressSpace:
    """Guest memory as seen by the device with PCI requester ID ``source_id`` through ``unit``."""

    def __init__(self, memory: GuestMemory, unit: VtdUnit, source_id: int) -> None:
        self.memory = memory
        self.unit = unit
        self.source_id = source_id
        self._listeners: list[Callable[[], None]] = []
        # windows already translated, by I/O virtual page: (the unit's cache generation then, the window). A
        # window is used only while the generation is the unit's current one: any invalidation (or translation
        # switched on or off) bumps it first, so nothing translated before it is used after it.
        self._windows: dict[int, tuple[int, DmaWindow]] = {}
        unit.add_listener(self._invalidated)

    # -- invalidation ---------------------------------------------------------------------------------
    def on_invalidate(self, callback: Callable[[], None]) -> None:
        """``callback()`` runs (on the invalidating vCPU's thread) whenever views taken from here must go."""
        self._listeners.append(callback)

    def _invalidated(self) -> None:
        for callback in list(self._listeners):
            callback()

    def close(self) -> None:
        self.unit.remove_listener(self._invalidated)
        self._listeners.clear()
        self._windows.clear()     # no view of guest memory outlives the device

    # -- dirty tracking -----------------------------------------------------------------------------
    @property
    def dirty_tracking(self) -> bool:
        return self.memory.dirty_tracking

    def mark_dirty(self, gpa: int, length: int) -> None:
        """Mark the guest pages behind ``[iova, iova+length)`` (a range that just translated: no new fault)."""
        if not self.memory.dirty_tracking or length <= 0:
            return
        window = self._cached(gpa, length, True)
        if window is not None:
            self.memory.mark_dirty(window.target + gpa - window.gpa, length)
            return
        try:
            pieces = self._pieces(gpa, length, write=True, record=False)
        except GuestMemoryError:
            return
        for target, size in pieces:
            self.memory.mark_dirty(target, size)

    # -- translation --------------------------------------------------------------------------------
    def _translate(self, iova: int, write: bool, record: bool = True) -> Translation | None:
        return self.unit.translate(self.source_id, iova, write, record)

    def _pieces(self, iova: int, length: int, write: bool, record: bool = True) -> list[tuple[int, int]]:
        """The guest-physical pieces of ``[iova, iova+length)``, merged where contiguous, each in one RAM region."""
        return self._pieces_allowed(iova, length, write, record)[0]

    def _pieces_allowed(self, iova: int, length: int, write: bool,
                        record: bool = True) -> tuple[list[tuple[int, int]], bool, bool]:
        """The pieces, and whether every leaf they came from allows reads, and writes."""
        readable = writable = True
        if length < 0 or iova < 0:
            raise GuestMemoryError(f"invalid DMA range {iova:#x}+{length:#x}")
        pieces: list[tuple[int, int]] = []
        position, remaining, steps = iova, length, 0
        while remaining > 0 or not pieces:
            steps += 1
            if steps > MAX_TRANSLATIONS_PER_RANGE:
                raise DmaScatteredError(f"DMA range {iova:#x}+{length:#x} covers more than "
                                        f"{MAX_TRANSLATIONS_PER_RANGE} pages")
            entry = self._translate(position, write, record)
            if entry is None:
                gpa, take = position, remaining
            else:
                gpa = entry.gpa + (position - entry.iova)
                take = min(remaining, entry.iova + entry.size - position)
                readable &= entry.readable
                writable &= entry.writable
            try:
                region = self.memory.region_of(gpa)
            except GuestMemoryError:
                raise DmaTargetError(f"DMA to {position:#x} by {self.source_id:#06x} translates to {gpa:#x}, "
                                     "which is not guest RAM") from None
            take = min(take, region.end - gpa)
            if take == 0:   # a zero-length range: its first byte still has to be there
                pieces.append((gpa, 0))
                break
            if pieces and pieces[-1][0] + pieces[-1][1] == gpa:
                pieces[-1] = (pieces[-1][0], pieces[-1][1] + take)
            else:
                pieces.append((gpa, take))
            position += take
            remaining -= take
        return pieces, readable, writable

    def _cached(self, iova: int, length: int, write: bool) -> DmaWindow | None:
        entry = self._windows.get(iova >> 12)
        if entry is None:
            return None
        generation, window = entry
        if (generation != self.unit.generation or not window.gpa <= iova or iova + length > window.gpa + window.size
                or not (window.writable if write else window.readable)):
            return None
        self.unit.stats.window_hits += 1
        return window

    def region_of(self, gpa: int, length: int = 1, write: bool = False,
                  record: bool = True) -> MemoryRegion | DmaWindow:
        """A window over the guest memory that ``[iova, iova+length)`` maps to, with the access checked."""
        iova = gpa
        if not self.unit.translating:
            return self.memory.region_of(iova, length)    # untranslated: guest memory's own region
        cached = self._cached(iova, length, write)
        if cached is not None:
            return cached
        generation = self.unit.generation
        window = self._translate_window(iova, length, write, record)
        if isinstance(window, DmaWindow):
            if len(self._windows) >= MAX_WINDOWS:
                self._windows.clear()
            self._windows[iova >> 12] = (generation, window)
        return window

    def _translate_window(self, iova: int, length: int, write: bool, record: bool) -> MemoryRegion | DmaWindow:
        entry = self._translate(iova, write, record)
        if entry is None:
            return self.memory.region_of(iova, length)    # a pass-through context
        if iova + length <= entry.iova + entry.size:
            target = entry.gpa + (iova - entry.iova)
            try:
                region = self.memory.region_of(target, max(length, 1))
            except GuestMemoryError:
                raise DmaTargetError(f"DMA to {iova:#x}+{length:#x} by {self.source_id:#06x} translates to "
                                     f"{target:#x}, which is not guest RAM") from None
            low = max(entry.gpa, region.gpa)
            high = min(entry.gpa + entry.size, region.end)
            view = region.view[low - region.gpa:high - region.gpa]
            return DmaWindow(entry.iova + (low - entry.gpa), high - low, view, entry.readable, entry.writable, low)
        pieces, readable, writable = self._pieces_allowed(iova, length, write, record)
        if len(pieces) != 1:
            raise DmaScatteredError(f"DMA range {iova:#x}+{length:#x} maps to {len(pieces)} pieces of guest memory")
        target, size = pieces[0]
        region = self.memory.region_of(target, size)
        return DmaWindow(iova, size, region.view[target - region.gpa:target - region.gpa + size], readable, writable,
                         target)

    def segments(self, iova: int, length: int, write: bool, record: bool = True) -> list[tuple[int, int]]:
        """``[iova, iova+length)`` cut where the guest memory behind it is not contiguous: (iova, length) pieces,
        each of which :meth:`view` can give as one view."""
        out: list[tuple[int, int]] = []
        position = iova
        for _, size in self._pieces(iova, length, write, record):
            out.append((position, size))
            position += size
        return out

    def contains(self, gpa: int, length: int = 1) -> bool:
        try:
            self._pieces(gpa, length, write=False)
        except GuestMemoryError:
            return False
        return True

    # -- access -------------------------------------------------------------------------------------
    def view(self, gpa: int, length: int) -> memoryview:
        """A view of a range that maps to one piece of guest memory (the device may read or write it: the
        chain's parser checked the direction; here the mapping must still be there)."""
        try:
            window = self.region_of(gpa, length, write=False, record=False)
        except DmaFault:
            window = self.region_of(gpa, length, write=True)   # a write-only page, or a fault to record
        start = gpa - window.gpa
        return window.view[start:start + length]

    def _window(self, iova: int, length: int, write: bool) -> MemoryRegion | DmaWindow | None:
        """One window for the whole range, or None if it is scattered (faults raise)."""
        try:
            return self.region_of(iova, length, write)
        except DmaScatteredError:
            return None

    def read(self, gpa: int, length: int) -> bytes:
        window = self._window(gpa, length, False)
        if window is not None:
            return bytes(window.view[gpa - window.gpa:gpa - window.gpa + length])
        return b"".join(self.memory.read(target, size) for target, size in self._pieces(gpa, length, False))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        source = memoryview(data).cast("B")
        window = self._window(gpa, len(source), True)
        if window is not None:
            start = gpa - window.gpa
            window.view[start:start + len(source)] = source
            if self.memory.dirty_tracking:
                self.memory.mark_dirty(getattr(window, "target", window.gpa) + start, len(source))
            return
        done = 0
        for target, size in self._pieces(gpa, len(source), True):
            self.memory.write(target, source[done:done + size])
            done += size

    def fill(self, gpa: int, length: int, byte: int = 0) -> None:
        for target, size in self._pieces(gpa, length, True):
            if size:
                self.memory.fill(target, size, byte)
