"""Console back ends for the serial port: where guest output goes and where guest input comes from.

Every back end has ``write(data)`` (called on vCPU threads with the guest's output; it never blocks for long
and never raises), ``start(on_input, events)`` (begin delivering host input to ``on_input``, normally
``Serial8250.enqueue_input``; readers run on the :class:`EventLoopThread`) and ``close()``.

``console_from_spec`` turns a command-line spec into a back end: ``stdio``, ``file:PATH``, ``socket:PATH``
(:class:`kvmlet.devices.legacy.socket_console.SocketConsole`), ``none``.
"""

from __future__ import annotations

import errno
import os
import select
import stat
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any

from kvmlet.devices.legacy.escape import ESCAPE_HELP, EscapeAction, EscapeFilter
from kvmlet.errors import KvmletError

if TYPE_CHECKING:
    from kvmlet.eventloop import EventLoopThread

InputSink = Callable[[bytes], object]
"""Receives host input for the guest (``Serial8250.enqueue_input``)."""

READ_CHUNK = 4096
WRITE_STALL_TIMEOUT = 1.0  # seconds a blocked stdout may hold up a vCPU before output is dropped


class ConsoleError(KvmletError, RuntimeError):
    """A console back end cannot be set up; the message says why."""


class ConsoleSpecError(KvmletError, ValueError):
    """A console spec string is not one of the accepted forms."""


def warn(message: str) -> None:
    """Report a console problem that must not stop the VM (logging is imported only when needed)."""
    import logging

    logging.getLogger("kvmlet.console").warning("%s", message)


PIPE_BUF = 4096  # writes up to this size never block once poll says the fd is writable


def _write_all(fd: int, data: bytes | memoryview, stall_timeout: float, poll_first: bool = False) -> None:
    """Write everything, waiting at most ``stall_timeout`` per stall.

    A non-blocking fd stalls with EAGAIN. A blocking pipe or terminal (``poll_first``) is polled before each
    write of at most PIPE_BUF bytes, so a reader that stops reading can never block the calling vCPU thread.
    """
    view = memoryview(data)
    while view:
        chunk = view[:PIPE_BUF] if poll_first else view
        if poll_first:
            _, writable, _ = select.select([], [fd], [], stall_timeout)
            if not writable:
                raise TimeoutError(errno.ETIMEDOUT, "output stalled")
        try:
            written = os.write(fd, chunk)
        except BlockingIOError:
            _, writable, _ = select.select([], [fd], [], stall_timeout)
            if not writable:
                raise TimeoutError(errno.ETIMEDOUT, "output stalled") from None
            continue
        except InterruptedError:
            continue
        view = view[written:]


def _is_pollable(fd: int) -> bool:
    """Whether epoll accepts ``fd`` (regular files and /dev/null are always ready and are refused)."""
    probe = select.epoll()
    try:
        probe.register(fd, select.EPOLLIN)
    except PermissionError:
        return False
    finally:
        probe.close()
    return True


def run_on_loop(events: EventLoopThread | None, action: Callable[[], None]) -> None:
    """Run ``action`` on the event-loop thread and wait for it (directly if there is no loop)."""
    if events is None:
        action()
    else:
        events.call_and_wait(action)


class Console(ABC):
    """A console back end."""

    @abstractmethod
    def write(self, data: bytes) -> None:
        """Output from the guest (vCPU threads). Never raises: failures drop output and are logged."""

    def start(self, on_input: InputSink, events: EventLoopThread | None = None) -> None:  # noqa: B027
        """Begin delivering host input to ``on_input``. Back ends without input ignore this."""

    def close(self) -> None:  # noqa: B027
        """Stop input, release files and sockets, restore the terminal. Idempotent."""

    def __enter__(self) -> Console:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def require_events(events: EventLoopThread | None, what: str) -> EventLoopThread:
    if events is None:
        raise ConsoleError(f"{what} reads input on the event loop: pass an EventLoopThread to start()")
    return events


class NullConsole(Console):
    """Discards output and never produces input (``none``)."""

    def write(self, data: bytes) -> None:
        pass


class FileConsole(Console):
    """Appends output to a file (created if missing, mode 0644); no input."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as error:
            raise ConsoleError(f"cannot open console file {self.path}: {error.strerror}") from error
        self.dropped_bytes = 0

    def write(self, data: bytes) -> None:
        if self._fd < 0:
            self.dropped_bytes += len(data)
            return
        try:
            _write_all(self._fd, data, WRITE_STALL_TIMEOUT)
        except OSError as error:
            if not self.dropped_bytes:
                warn(f"console file {self.path}: {error}; guest output is being dropped")
            self.dropped_bytes += len(data)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class StdioConsole(Console):
    """Output to stdout's file descriptor, input from stdin.

    On a TTY, stdin is put in raw mode (no echo, no line editing, no signals: Ctrl-C goes to the guest) and
    restored on close; Ctrl-A x calls ``on_escape`` (stop the VM), Ctrl-A s ``on_snapshot`` (save one),
    Ctrl-A Ctrl-A sends a Ctrl-A, Ctrl-A h prints help.
    Output post-processing is left on, so a guest's bare LF still starts a new line. When
    stdin is not a TTY (a pipe or file) it is read until end of file, without escapes.
    """

    def __init__(self, on_escape: Callable[[], None] | None = None, *, stdin_fd: int = 0,
                 stdout_fd: int = 1, on_snapshot: Callable[[], None] | None = None) -> None:
        self._stdin_fd = stdin_fd
        self._stdout_fd = stdout_fd
        self._on_escape = on_escape
        self._on_snapshot = on_snapshot
        self._escape = EscapeFilter()
        self._saved_termios: list[Any] | None = None  # termios attributes
        self._events: EventLoopThread | None = None
        self._on_input: InputSink | None = None
        self._reading = False
        self._closed = False
        self._stalled = False
        self.dropped_bytes = 0
        try:
            self._poll_before_write = not stat.S_ISREG(os.fstat(stdout_fd).st_mode)
        except OSError:
            self._poll_before_write = True

    @property
    def is_tty(self) -> bool:
        return os.isatty(self._stdin_fd)

    def write(self, data: bytes) -> None:
        try:
            # once stdout has stalled, later output is dropped at once until it drains
            _write_all(self._stdout_fd, data, 0.0 if self._stalled else WRITE_STALL_TIMEOUT,
                       self._poll_before_write)
            self._stalled = False
        except OSError as error:
            self._stalled = isinstance(error, TimeoutError)
            if not self.dropped_bytes:
                warn(f"console stdout: {error}; guest output is being dropped")
            self.dropped_bytes += len(data)

    def start(self, on_input: InputSink, events: EventLoopThread | None = None) -> None:
        if self._on_input is not None:
            raise ConsoleError("the stdio console is already started")
        try:
            os.fstat(self._stdin_fd)
        except OSError:
            return  # stdin is closed: no input
        tty = self.is_tty
        if not tty and not _is_pollable(self._stdin_fd):  # a regular file or /dev/null: a thread reads it
            self._on_input = on_input
            self._reading = True
            threading.Thread(target=self._read_blocking, name="kvmlet-stdin", daemon=True).start()
            return
        self._events = require_events(events, "the stdio console")
        self._on_input = on_input
        if tty:
            self._enter_raw_mode()
        self._reading = True
        self._events.watch_read(self._stdin_fd, self._on_readable)

    def _enter_raw_mode(self) -> None:
        import atexit
        import termios

        fd = self._stdin_fd
        saved = termios.tcgetattr(fd)
        raw = termios.tcgetattr(fd)
        raw[0] &= ~(termios.IGNBRK | termios.BRKINT | termios.PARMRK | termios.ISTRIP | termios.INLCR
                    | termios.IGNCR | termios.ICRNL | termios.IXON)
        raw[2] = (raw[2] & ~(termios.CSIZE | termios.PARENB)) | termios.CS8
        raw[3] &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG | termios.IEXTEN)
        raw[6][termios.VMIN] = 1
        raw[6][termios.VTIME] = 0
        termios.tcsetattr(fd, termios.TCSANOW, raw)
        self._saved_termios = saved
        atexit.register(self._restore_terminal)

    def _restore_terminal(self) -> None:
        if self._saved_termios is None:
            return
        import atexit
        import termios

        try:
            termios.tcsetattr(self._stdin_fd, termios.TCSADRAIN, self._saved_termios)
        except termios.error as error:
            warn(f"cannot restore the terminal settings: {error}")
        self._saved_termios = None
        atexit.unregister(self._restore_terminal)

    def _on_readable(self) -> None:
        try:
            data = os.read(self._stdin_fd, READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:
            warn(f"console stdin: {error}; input stopped")
            data = b""
        if not data:
            self._stop_reading_on_loop()
            return
        self._deliver(data)

    def _read_blocking(self) -> None:
        while self._reading:
            try:
                data = os.read(self._stdin_fd, READ_CHUNK)
            except InterruptedError:
                continue
            except OSError as error:
                warn(f"console stdin: {error}; input stopped")
                return
            if not data or not self._reading:
                return
            self._deliver(data)

    def _deliver(self, data: bytes) -> None:
        if self._saved_termios is not None:
            data, actions = self._escape.feed(data)
            for action in actions:
                self._escape_action(action)
        if data and self._on_input is not None and not self._closed:
            self._on_input(data)

    def _escape_action(self, action: EscapeAction) -> None:
        if action is EscapeAction.HELP:
            self.write(ESCAPE_HELP.replace(b"\n", b"\r\n"))
        elif action is EscapeAction.SNAPSHOT:
            if self._on_snapshot is not None:
                self._on_snapshot()
            else:
                self.write(b"\r\n[kvmlet: no snapshot handler for Ctrl-A s]\r\n")
        elif action is EscapeAction.QUIT:
            if self._on_escape is not None:
                self._on_escape()
            else:
                self.write(b"\r\n[kvmlet: no stop handler for Ctrl-A x]\r\n")

    def _stop_reading_on_loop(self) -> None:
        if self._reading and self._events is not None:
            self._reading = False
            self._events.unwatch_read(self._stdin_fd)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._reading:
            self._reading = False
            if self._events is not None:
                self._events.unwatch_read(self._stdin_fd)
        self._restore_terminal()


class BufferConsole(Console):
    """Keeps output in memory and takes input from ``feed``: for tests and for the Python API."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._changed = threading.Condition()
        self._on_input: InputSink | None = None
        self._early_input = bytearray()

    def write(self, data: bytes) -> None:
        with self._changed:
            self._buffer += data
            self._changed.notify_all()

    def output(self) -> bytes:
        """All output so far."""
        with self._changed:
            return bytes(self._buffer)

    def wait_for(self, pattern: bytes, timeout: float, start: int = 0) -> bool:
        """Wait until ``pattern`` appears in the output at or after offset ``start``; False on timeout."""
        if not pattern:
            return True
        scan_from = start

        def found() -> bool:
            nonlocal scan_from
            if self._buffer.find(pattern, scan_from) >= 0:
                return True
            scan_from = max(start, len(self._buffer) - len(pattern) + 1)
            return False

        with self._changed:
            return self._changed.wait_for(found, timeout)

    def feed(self, data: bytes) -> None:
        """Input for the guest; held until ``start`` if the console is not yet connected."""
        sink = self._on_input
        if sink is None:
            with self._changed:
                if self._on_input is None:
                    self._early_input += data
                    return
                sink = self._on_input
        sink(data)

    def start(self, on_input: InputSink, events: EventLoopThread | None = None) -> None:
        with self._changed:
            self._on_input = on_input
            early = bytes(self._early_input)
            self._early_input.clear()
        if early:
            on_input(early)


CONSOLE_SPECS = "stdio, file:PATH, socket:PATH or none"


def console_from_spec(spec: str, *, on_escape: Callable[[], None] | None = None,
                      on_snapshot: Callable[[], None] | None = None) -> Console:
    """Make the back end a spec names: ``stdio``, ``file:PATH``, ``socket:PATH`` or ``none``.

    ``on_escape`` is what Ctrl-A x does on a stdio TTY (normally: stop the VM), ``on_snapshot`` Ctrl-A s.
    """
    kind, colon, argument = spec.partition(":")
    if kind == "stdio" and not colon:
        return StdioConsole(on_escape, on_snapshot=on_snapshot)
    if kind == "none" and not colon:
        return NullConsole()
    if kind in ("file", "socket") and colon:
        if not argument:
            raise ConsoleSpecError(f"console spec {spec!r} needs a path after '{kind}:'")
        if kind == "file":
            return FileConsole(argument)
        from kvmlet.devices.legacy.socket_console import SocketConsole

        return SocketConsole(argument)
    raise ConsoleSpecError(f"unknown console spec {spec!r}: expected {CONSOLE_SPECS}")
