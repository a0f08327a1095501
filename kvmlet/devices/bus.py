"""PIO and MMIO dispatch: vCPU exits are routed to the device that claims the address.

A device claims one or more ranges on a :class:`Bus` and is called with the offset into its range.
Accesses nobody claims are counted and ignored (reads return all ones), as on a real PC bus.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

ReadHandler = Callable[[int, int], int]          # (offset, size) -> value
WriteHandler = Callable[[int, int, int], None]   # (offset, size, value)
MAX_CACHED_UNCLAIMED = 4096  # unclaimed addresses remembered per bus (a guest may probe many)


class BusDevice(Protocol):
    """What a device on the PIO or MMIO bus implements. ``offset`` is relative to its range base."""

    def bus_read(self, offset: int, size: int) -> int:
        """Return the value of a ``size``-byte read at ``offset`` (little-endian)."""
        ...

    def bus_write(self, offset: int, size: int, value: int) -> None:
        """Handle a ``size``-byte write of ``value`` at ``offset``."""
        ...


class BusConflictError(ValueError):
    """Two devices claim overlapping ranges."""


@dataclass(frozen=True)
class BusRange:
    base: int
    size: int
    device: BusDevice
    name: str

    @property
    def end(self) -> int:
        return self.base + self.size


class Bus:
    """An address space (I/O ports or MMIO) of non-overlapping device ranges."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._ranges: list[BusRange] = []
        self._bases: list[int] = []
        self._lock = threading.Lock()
        self.unclaimed_reads = 0
        self.unclaimed_writes = 0
        # address -> (handler, base): what an access at that address calls, with the offset
        # ``address - base``. Filled on first access, emptied in place whenever a range is added or
        # removed, so vCPU threads may keep references to these dicts (the exit fast path does).
        self.read_targets: dict[int, tuple[ReadHandler, int]] = {}
        self.write_targets: dict[int, tuple[WriteHandler, int]] = {}
        self._unclaimed_cached = 0

    def register(self, base: int, size: int, device: BusDevice, name: str = "") -> None:
        if size <= 0:
            raise ValueError(f"{self.name}: range size must be positive")
        label = name or type(device).__name__
        with self._lock:
            index = bisect.bisect_right(self._bases, base)
            for neighbour in self._ranges[max(0, index - 1):index + 1]:
                if base < neighbour.end and neighbour.base < base + size:
                    raise BusConflictError(
                        f"{self.name}: {label} at {base:#x}+{size:#x} overlaps {neighbour.name} "
                        f"at {neighbour.base:#x}+{neighbour.size:#x}")
            self._ranges.insert(index, BusRange(base, size, device, label))
            self._bases.insert(index, base)
            self._forget_targets()

    def unregister(self, device: BusDevice) -> None:
        with self._lock:
            keep = [r for r in self._ranges if r.device is not device]
            self._ranges = keep
            self._bases = [r.base for r in keep]
            self._forget_targets()

    def _forget_targets(self) -> None:
        self.read_targets.clear()
        self.write_targets.clear()
        self._unclaimed_cached = 0

    def find(self, address: int) -> BusRange | None:
        index = bisect.bisect_right(self._bases, address) - 1
        if index >= 0:
            entry = self._ranges[index]
            if address < entry.end:
                return entry
        return None

    def read_target(self, address: int) -> tuple[ReadHandler, int]:
        """What a read at ``address`` calls: ``handler(address - base, size)``; remembered for next time."""
        with self._lock:  # so that a range added meanwhile cannot leave a stale target behind
            entry = self.find(address)
            target: tuple[ReadHandler, int]
            if entry is not None:
                target = (entry.device.bus_read, entry.base)
            else:
                target = (self._unclaimed_read, address)
                if not self._remember_unclaimed():
                    return target
            self.read_targets[address] = target
        return target

    def write_target(self, address: int) -> tuple[WriteHandler, int]:
        """What a write at ``address`` calls: ``handler(address - base, size, value)``; remembered."""
        with self._lock:  # so that a range added meanwhile cannot leave a stale target behind
            entry = self.find(address)
            target: tuple[WriteHandler, int]
            if entry is not None:
                target = (entry.device.bus_write, entry.base)
            else:
                target = (self._unclaimed_write, address)
                if not self._remember_unclaimed():
                    return target
            self.write_targets[address] = target
        return target

    def _remember_unclaimed(self) -> bool:
        self._unclaimed_cached += 1
        return self._unclaimed_cached <= MAX_CACHED_UNCLAIMED

    def _unclaimed_read(self, offset: int, size: int) -> int:
        self.unclaimed_reads += 1
        return (1 << (8 * size)) - 1

    def _unclaimed_write(self, offset: int, size: int, value: int) -> None:
        self.unclaimed_writes += 1

    def read(self, address: int, size: int) -> int:
        target = self.read_targets.get(address) or self.read_target(address)
        return target[0](address - target[1], size)

    def write(self, address: int, size: int, value: int) -> None:
        target = self.write_targets.get(address) or self.write_target(address)
        target[0](address - target[1], size, value)

    def ranges(self) -> list[BusRange]:
        return list(self._ranges)
