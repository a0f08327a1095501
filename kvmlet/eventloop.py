"""The event-loop thread that owns device file descriptors (console input, sockets, eventfds)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any


class EventLoopThread:
    """An asyncio loop running in its own daemon thread; safe to call from any thread."""

    def __init__(self, name: str = "kvmlet-events") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._started = False

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()

    def start(self) -> None:
        if not self._started:
            self._started = True
            self._thread.start()

    def call_soon(self, callback: Callable[..., Any], *args: Any) -> None:
        """Run ``callback(*args)`` on the loop thread."""
        self.loop.call_soon_threadsafe(callback, *args)

    def add_reader(self, fd: int, callback: Callable[[], Any]) -> None:
        """Call ``callback()`` on the loop thread whenever ``fd`` is readable."""
        self.call_soon(self.loop.add_reader, fd, callback)

    def remove_reader(self, fd: int) -> None:
        done = threading.Event()

        def remove() -> None:
            self.loop.remove_reader(fd)
            done.set()

        if self._started and self._thread.is_alive() and threading.current_thread() is not self._thread:
            self.call_soon(remove)
            done.wait(5)
        else:
            self.loop.remove_reader(fd)

    def run_coroutine(self, coro: Any) -> Any:
        """Schedule a coroutine on the loop; returns a concurrent.futures.Future."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self) -> None:
        if self._started and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)
        elif not self._started:
            self.loop.close()
