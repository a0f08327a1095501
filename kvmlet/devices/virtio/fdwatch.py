"""Host file descriptors a device watches on the event-loop thread (a TAP, sockets), and timers.

Devices start and stop watching from any thread: from the event-loop thread itself (while handling a
queue), or while the loop is not running, the change is immediate; from another thread (a vCPU thread
resetting the device, with the transport's lock held) it is queued to the loop and never waited for, so a
device can never deadlock against a loop callback that is waiting for the same transport lock. Callbacks
may therefore run once after ``unwatch`` was asked for, and must check that their device is still live.

A watched descriptor is closed with ``call_soon(close)`` after its ``unwatch``: the close then happens
after the loop has forgotten the descriptor, so its number cannot be reused (and watched) in between.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol

from kvmlet.eventloop import EventLoopThread


class FdWatcher(Protocol):
    """What a device needs from the event loop."""

    def watch_read(self, fd: int, callback: Callable[[], None]) -> None: ...

    def unwatch_read(self, fd: int) -> None: ...

    def watch_write(self, fd: int, callback: Callable[[], None]) -> None: ...

    def unwatch_write(self, fd: int) -> None: ...

    def call_later(self, delay: float, callback: Callable[[], None]) -> None: ...

    def call_soon(self, callback: Callable[[], None]) -> None: ...


class LoopFdWatcher:
    """An :class:`FdWatcher` on kvmlet's :class:`EventLoopThread`."""

    def __init__(self, events: EventLoopThread) -> None:
        self.events = events

    def _on_loop_thread(self) -> bool:
        try:
            return asyncio.get_running_loop() is self.events.loop
        except RuntimeError:
            return False

    def _run(self, function: Callable[..., Any], *args: Any, always: bool = False) -> None:
        loop = self.events.loop
        if self._on_loop_thread() or not loop.is_running():
            try:
                function(*args)
            except RuntimeError:  # a loop method on a closed loop: nothing is watched any more
                pass
            return
        try:
            loop.call_soon_threadsafe(function, *args)
        except RuntimeError:      # the loop closed meanwhile
            if always:
                function(*args)

    def watch_read(self, fd: int, callback: Callable[[], None]) -> None:
        self._run(self.events.loop.add_reader, fd, callback)

    def unwatch_read(self, fd: int) -> None:
        self._run(self.events.loop.remove_reader, fd)

    def watch_write(self, fd: int, callback: Callable[[], None]) -> None:
        self._run(self.events.loop.add_writer, fd, callback)

    def unwatch_write(self, fd: int) -> None:
        self._run(self.events.loop.remove_writer, fd)

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        self._run(self.events.loop.call_later, delay, callback)

    def call_soon(self, callback: Callable[[], None]) -> None:
        self._run(callback, always=True)
