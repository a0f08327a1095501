"""PIO and MMIO dispatch: vCPU exits are routed to the device that claims the address.

A device claims one or more ranges on a :class:`Bus` and is called with the offset into its range.
Accesses nobody claims are counted and ignored (reads return all ones), as on a real PC bus.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass
from typing import Protocol


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

    def unregister(self, device: BusDevice) -> None:
        with self._lock:
            keep = [r for r in self._ranges if r.device is not device]
            self._ranges = keep
            self._bases = [r.base for r in keep]

    def find(self, address: int) -> BusRange | None:
        index = bisect.bisect_right(self._bases, address) - 1
        if index >= 0:
            entry = self._ranges[index]
            if address < entry.end:
                return entry
        return None

    def read(self, address: int, size: int) -> int:
        entry = self.find(address)
        if entry is None:
            self.unclaimed_reads += 1
            return (1 << (8 * size)) - 1
        return entry.device.bus_read(address - entry.base, size)

    def write(self, address: int, size: int, value: int) -> None:
        entry = self.find(address)
        if entry is None:
            self.unclaimed_writes += 1
            return
        entry.device.bus_write(address - entry.base, size, value)

    def ranges(self) -> list[BusRange]:
        return list(self._ranges)
