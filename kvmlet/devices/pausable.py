"""The event loop as the device manager gives it to its devices: one that can be paused.

Devices do their work in callbacks on the event loop: a queue's eventfd became readable, a TAP or a vsock
socket has data or room, a timer (a rate limiter's, a connection's timeout) fired. :class:`PausableEventLoop`
stands between the devices and the loop and remembers every descriptor they watch, so that

* :meth:`PausableEventLoop.pause` stops watching all of them (nothing spins on a descriptor that stays
  readable: what arrives waits in the kernel, an eventfd keeps counting) and holds every timer that fires,
  then waits until the loop has finished the callback it may be running;
* :meth:`PausableEventLoop.resume` watches them again (a descriptor that became ready meanwhile is served at
  once: readiness is level-triggered) and runs the held timers.

A callback the loop had already queued when the pause came runs as a no-op (its descriptor is still ready at
resume). ``call_soon`` is not held: devices use it to close descriptors, which must happen paused or not.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable

from kvmlet.errors import StateError
from kvmlet.eventloop import EventLoop

QUIESCE_TIMEOUT = 5.0   # seconds the loop has to finish the device callback it is running


class PausableEventLoop:
    """An :class:`~kvmlet.eventloop.EventLoop` over another, whose watches and timers can be held."""

    def __init__(self, loop: EventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._readers: dict[int, Callable[[], None]] = {}
        self._writers: dict[int, Callable[[], None]] = {}
        self._held: list[Callable[[], None]] = []     # timers that fired while paused
        self._paused = False

    @property
    def paused(self) -> bool:
        return self._paused

    def _gated(self, callback: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            if not self._paused:
                callback()
        return run

    # -- EventLoop ----------------------------------------------------------------------------------
    def watch_read(self, fd: int, callback: Callable[[], None]) -> None:
        with self._lock:
            self._readers[fd] = callback
            if not self._paused:
                self.loop.watch_read(fd, self._gated(callback))

    def unwatch_read(self, fd: int) -> None:
        with self._lock:
            self._readers.pop(fd, None)
            self.loop.unwatch_read(fd)

    def watch_write(self, fd: int, callback: Callable[[], None]) -> None:
        with self._lock:
            self._writers[fd] = callback
            if not self._paused:
                self.loop.watch_write(fd, self._gated(callback))

    def unwatch_write(self, fd: int) -> None:
        with self._lock:
            self._writers.pop(fd, None)
            self.loop.unwatch_write(fd)

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        self.loop.call_later(delay, functools.partial(self._fire, callback))

    def call_soon(self, callback: Callable[[], None]) -> None:
        self.loop.call_soon(callback)

    def _fire(self, callback: Callable[[], None]) -> None:
        with self._lock:
            if self._paused:
                self._held.append(callback)
                return
        callback()

    # -- pausing ------------------------------------------------------------------------------------
    def pause(self, timeout: float = QUIESCE_TIMEOUT) -> None:
        """Stop serving the devices' descriptors and timers; returns once no device callback runs (any
        thread; StateError, and nothing paused, if the loop does not get there within ``timeout``)."""
        with self._lock:
            if self._paused:
                return
            self._paused = True
            for fd in self._readers:
                self.loop.unwatch_read(fd)
            for fd in self._writers:
                self.loop.unwatch_write(fd)
        reached = threading.Event()
        self.loop.call_soon(reached.set)   # runs after the callback the loop is in (at once on the loop thread)
        if not reached.wait(timeout):
            self.resume()
            raise StateError(f"the devices did not pause within {timeout:g} s: the event loop is busy")

    def resume(self) -> None:
        """Serve the descriptors again and run the timers that fired while paused."""
        with self._lock:
            if not self._paused:
                return
            self._paused = False
            for fd, callback in self._readers.items():
                self.loop.watch_read(fd, self._gated(callback))
            for fd, callback in self._writers.items():
                self.loop.watch_write(fd, self._gated(callback))
            held, self._held = self._held, []
        for callback in held:
            self.loop.call_soon(functools.partial(self._fire, callback))

    @property
    def watched(self) -> int:
        """How many descriptors the devices have asked to watch (served or not)."""
        with self._lock:
            return len(self._readers) + len(self._writers)
