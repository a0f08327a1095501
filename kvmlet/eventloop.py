"""The event loop: the one way devices, consoles, the API server and the machine reach the loop thread.

:class:`EventLoop` is the interface (watch a descriptor, run a timer, call soon, run a coroutine);
:class:`EventLoopThread` implements it with an asyncio loop on its own thread. It is created by whoever
drives kvmlet (``kvmlet run``, the API server) and passed into the machine, so an API server can run
before any VM exists and outlive it.

The asyncio loop (asyncio is a large import) is created on first use: a VM whose devices never need it
starts without it, which keeps cold start short.

Watching and unwatching work from any thread. On the loop thread itself, or while no thread runs the
loop (before ``start``, after ``stop``), the change is immediate; from another thread (a vCPU thread
resetting a device, with the transport's lock held) it is queued to the loop and not waited for, so a
device can never deadlock against a loop callback waiting for the same lock. A callback may therefore run once after its
``unwatch``, and must check that its owner is still live. A watched descriptor is closed with
``call_soon(close)`` after its unwatch, so its number cannot be reused (and watched) in between.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import asyncio
    import concurrent.futures

log = logging.getLogger(__name__)
STOP_TIMEOUT = 5.0


class EventLoop(Protocol):
    """What a device, a console or the API server needs from the event loop."""

    def watch_read(self, fd: int, callback: Callable[[], None]) -> None: ...

    def unwatch_read(self, fd: int) -> None: ...

    def watch_write(self, fd: int, callback: Callable[[], None]) -> None: ...

    def unwatch_write(self, fd: int) -> None: ...

    def call_later(self, delay: float, callback: Callable[[], None]) -> None: ...

    def call_soon(self, callback: Callable[[], None]) -> None: ...


class EventLoopThread:
    """An :class:`EventLoop`: an asyncio loop running in its own daemon thread; safe from any thread."""

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

    @property
    def running(self) -> bool:
        return self._loop is not None and self._loop.is_running()

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

    def on_loop_thread(self) -> bool:
        return self._thread is not None and threading.current_thread() is self._thread

    def _run_on_loop(self, function: Callable[..., Any], *args: Any, always: bool = False) -> None:
        loop = self.loop
        thread = self._thread
        # immediate only on the loop thread or while no thread runs the loop (not started, or ended):
        # once started, the loop may not have reached run_forever yet, and then the call must wait for it
        if self.on_loop_thread() or not (self._started and thread is not None and thread.is_alive()):
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
        """Call ``callback()`` on the loop thread whenever ``fd`` is readable."""
        self._run_on_loop(self.loop.add_reader, fd, callback)

    def unwatch_read(self, fd: int) -> None:
        self._run_on_loop(self.loop.remove_reader, fd)

    def watch_write(self, fd: int, callback: Callable[[], None]) -> None:
        self._run_on_loop(self.loop.add_writer, fd, callback)

    def unwatch_write(self, fd: int) -> None:
        self._run_on_loop(self.loop.remove_writer, fd)

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        """Run ``callback()`` on the loop thread after ``delay`` seconds."""
        self._run_on_loop(self.loop.call_later, delay, callback)

    def call_soon(self, callback: Callable[[], None]) -> None:
        """Run ``callback()`` on the loop thread (now, if the loop is not running or already closed)."""
        self._run_on_loop(callback, always=True)

    def call_and_wait(self, callback: Callable[[], None], timeout: float = STOP_TIMEOUT) -> None:
        """Run ``callback()`` on the loop thread and wait for it (for teardown: never from a device lock)."""
        if self.on_loop_thread() or not self.running:
            self._run_on_loop(callback)
            return
        done = threading.Event()

        def run() -> None:
            try:
                callback()
            finally:
                done.set()

        self.loop.call_soon_threadsafe(run)
        done.wait(timeout)

    def run_coroutine(self, coro: Any) -> concurrent.futures.Future[Any]:
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
