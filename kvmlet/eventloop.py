"""The event-loop thread that owns device file descriptors (console input, sockets, eventfds).

The asyncio loop (and asyncio itself, a large import) is created on first use: a VM whose devices never
need it (console output only, no input to read) starts without it, which keeps cold start short.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import asyncio

log = logging.getLogger(__name__)
STOP_TIMEOUT = 5.0


class EventLoopThread:
    """An asyncio loop running in its own daemon thread; safe to call from any thread."""

    def __init__(self, name: str = "kvmlet-events") -> None:
        self._name = name
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = False

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop, created on first use; it runs on its thread once :meth:`start` was called."""
        loop = self._loop
        if loop is not None:
            return loop
        with self._lock:
            if self._loop is None:
                import asyncio

                self._loop = asyncio.new_event_loop()
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                if self._started:
                    self._thread.start()
            return self._loop

    @property
    def created(self) -> bool:
        """Whether anything has used the loop yet."""
        return self._loop is not None

    def _run(self) -> None:
        import asyncio

        loop = self.loop
        asyncio.set_event_loop(loop)
        loop.run_forever()
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()

    def start(self) -> None:
        """Run the loop on its thread (now if it exists, else as soon as something uses it)."""
        with self._lock:
            if self._started:
                return
            self._started = True
            if self._thread is not None:
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

        thread = self._thread
        if thread is not None and thread.is_alive() and threading.current_thread() is not thread:
            self.call_soon(remove)
            done.wait(5)
        else:
            self.loop.remove_reader(fd)

    def run_coroutine(self, coro: Any) -> Any:
        """Schedule a coroutine on the loop; returns a concurrent.futures.Future."""
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self) -> None:
        with self._lock:
            loop, thread, started = self._loop, self._thread, self._started
        if loop is None:
            return
        if started and thread is not None and thread.is_alive():
            loop.call_soon_threadsafe(loop.stop)
            thread.join(STOP_TIMEOUT)
            if thread.is_alive():  # a callback is stuck: the loop is still running and cannot be closed
                log.warning("event-loop thread %s did not stop within %g s; it ends with the process",
                            self._name, STOP_TIMEOUT)
                return
        if not loop.is_closed():  # never started, or its thread ended without closing it (an error)
            loop.close()
