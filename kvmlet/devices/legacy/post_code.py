"""The POST-code port 0x80: writes are accepted and counted, reads return 0xff.

Guests (and firmware) write progress codes here, and an ``out`` to port 0x80 is also the cheapest user-space
exit a guest can make, which is what the PIO round-trip benchmarks measure.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from kvmlet.devices.legacy.ports import PortClaim, all_ones
from kvmlet.devices.state import PostCodeState, expect_state

POST_CODE_PORT = 0x80


@dataclass(frozen=True)
class PostCodeStats:
    writes: int
    reads: int
    last_code: int | None


class PostCode:
    """Port 0x80 (one byte)."""

    def __init__(self, *, base: int = POST_CODE_PORT) -> None:
        self.base = base
        self._lock = threading.Lock()
        self._writes = 0
        self._reads = 0
        self._last_code: int | None = None

    def bus_claims(self) -> list[PortClaim]:
        return [PortClaim(self.base, 1, self, "post-code")]

    def bus_read(self, offset: int, size: int) -> int:
        with self._lock:
            self._reads += 1
        return all_ones(size)

    def bus_write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            self._writes += 1
            self._last_code = value & all_ones(size)

    @property
    def writes(self) -> int:
        with self._lock:
            return self._writes

    @property
    def last_code(self) -> int | None:
        with self._lock:
            return self._last_code

    def stats(self) -> PostCodeStats:
        with self._lock:
            return PostCodeStats(self._writes, self._reads, self._last_code)

    def save_state(self) -> PostCodeState:
        with self._lock:
            return PostCodeState(writes=self._writes, reads=self._reads, last_code=self._last_code)

    def check_state(self, state: object) -> PostCodeState:
        return expect_state(state, PostCodeState, "post-code")

    def restore_state(self, state: object) -> None:
        saved = self.check_state(state)
        with self._lock:
            self._writes, self._reads, self._last_code = saved.writes, saved.reads, saved.last_code
