"""The guest's exit-status port at 0x501, compatible with QEMU's ``isa-debug-exit`` (iobase=0x501, iosize=2).

A write of 1, 2 or 4 bytes anywhere in the range reports the written value (masked to the access size) as the
guest's exit status by calling ``on_exit(status)`` on the vCPU thread. kvmlet reports the value itself; QEMU
exits with ``(value << 1) | 1``. Reads return 0, as QEMU's do.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from kvmlet.devices.legacy.ports import PortClaim, all_ones
from kvmlet.devices.state import DebugExitState, expect_state

DEBUG_EXIT_PORT = 0x501
DEBUG_EXIT_SIZE = 2


@dataclass(frozen=True)
class DebugExitStats:
    writes: int
    last_status: int | None


class DebugExit:
    """Calls ``on_exit(status)`` for every write; the VM is expected to stop after the first."""

    def __init__(self, on_exit: Callable[[int], None], *, base: int = DEBUG_EXIT_PORT,
                 size: int = DEBUG_EXIT_SIZE) -> None:
        if size <= 0:
            raise ValueError(f"debug-exit range size must be positive, not {size}")
        self.base = base
        self.size = size
        self._on_exit = on_exit
        self._lock = threading.Lock()
        self._writes = 0
        self._last_status: int | None = None

    def bus_claims(self) -> list[PortClaim]:
        return [PortClaim(self.base, self.size, self, "debug-exit")]

    def bus_read(self, offset: int, size: int) -> int:
        return 0

    def bus_write(self, offset: int, size: int, value: int) -> None:
        status = value & all_ones(size)
        with self._lock:
            self._writes += 1
            self._last_status = status
        self._on_exit(status)

    @property
    def last_status(self) -> int | None:
        """The status of the latest write, or None if the guest has not written one."""
        with self._lock:
            return self._last_status

    def stats(self) -> DebugExitStats:
        with self._lock:
            return DebugExitStats(self._writes, self._last_status)

    def save_state(self) -> DebugExitState:
        with self._lock:
            return DebugExitState(writes=self._writes, last_status=self._last_status)

    def check_state(self, state: object) -> DebugExitState:
        return expect_state(state, DebugExitState, "debug-exit")

    def restore_state(self, state: object) -> None:
        saved = self.check_state(state)
        with self._lock:
            self._writes, self._last_status = saved.writes, saved.last_status
