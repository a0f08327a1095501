"""Console back ends: buffer, file, Unix socket (real sockets, real event loop), stdio (pipes and a pty)."""

from __future__ import annotations

import os
import select
import socket
import termios
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kvmlet.devices.irq import NullInterrupt
from kvmlet.devices.legacy.console import (
    BufferConsole,
    ConsoleError,
    ConsoleSpecError,
    FileConsole,
    NullConsole,
    StdioConsole,
    console_from_spec,
)
from kvmlet.devices.legacy.escape import EscapeAction, EscapeFilter
from kvmlet.devices.legacy.serial import Serial8250
from kvmlet.devices.legacy.socket_console import SocketConsole
from kvmlet.eventloop import EventLoopThread

LSR = 5
LSR_DR = 0x01


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


def guest_read(uart: Serial8250) -> bytes:
    data = bytearray()
    while uart.bus_read(LSR, 1) & LSR_DR:
        data.append(uart.bus_read(0, 1))
    return bytes(data)


def guest_write(uart: Serial8250, data: bytes) -> None:
    for byte in data:
        uart.bus_write(0, 1, byte)


def read_from_guest_until(uart: Serial8250, expected: bytes, timeout: float = 5.0) -> bytes:
    received = bytearray()

    def done() -> bool:
        received.extend(guest_read(uart))
        return len(received) >= len(expected)

    wait_until(done, timeout)
    return bytes(received)


@pytest.fixture
def events() -> Iterator[EventLoopThread]:
    thread = EventLoopThread("test-events")
    thread.start()
    yield thread
    thread.stop()


# -- BufferConsole ----------------------------------------------------------------------------------------

def test_buffer_console_collects_output_and_waits_for_a_pattern() -> None:
    console = BufferConsole()
    uart = Serial8250(NullInterrupt(), console)

    def guest() -> None:
        time.sleep(0.05)
        guest_write(uart, b"booting...\r\nTEST serial PASS\r\n")

    thread = threading.Thread(target=guest)
    thread.start()
    assert console.wait_for(b"TEST serial PASS", timeout=5)
    thread.join()
    assert console.output().startswith(b"booting")
    assert not console.wait_for(b"never printed", timeout=0.05)
    assert not console.wait_for(b"booting", timeout=0.01, start=5)
    assert console.wait_for(b"", timeout=0)


def test_buffer_console_feeds_input_held_until_started() -> None:
    console = BufferConsole()
    uart = Serial8250(NullInterrupt(), console)
    console.feed(b"early ")
    console.start(uart.enqueue_input)
    console.feed(b"late")
    assert guest_read(uart) == b"early late"


# -- FileConsole and specs ----------------------------------------------------------------------------------

def test_file_console_appends(tmp_path: Path) -> None:
    path = tmp_path / "console.log"
    path.write_bytes(b"previous run\n")
    with FileConsole(path) as console:
        uart = Serial8250(NullInterrupt(), console)
        guest_write(uart, b"hello\n")
    assert path.read_bytes() == b"previous run\nhello\n"
    console.write(b"after close")  # dropped, not raised
    assert path.read_bytes() == b"previous run\nhello\n"


def test_file_console_reports_an_unwritable_path(tmp_path: Path) -> None:
    with pytest.raises(ConsoleError, match="cannot open console file"):
        FileConsole(tmp_path / "missing-dir" / "log")


def test_console_from_spec(tmp_path: Path) -> None:
    assert isinstance(console_from_spec("none"), NullConsole)
    assert isinstance(console_from_spec("stdio"), StdioConsole)
    file_console = console_from_spec(f"file:{tmp_path / 'out.log'}")
    assert isinstance(file_console, FileConsole)
    file_console.close()
    socket_console = console_from_spec(f"socket:{tmp_path / 'c.sock'}")
    assert isinstance(socket_console, SocketConsole)
    socket_console.close()
    for bad in ("", "tty", "file:", "socket:", "stdio:x", "none:"):
        with pytest.raises(ConsoleSpecError):
            console_from_spec(bad)


# -- SocketConsole -------------------------------------------------------------------------------------

def connect(path: Path) -> socket.socket:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(str(path))
    client.settimeout(5)
    return client


def recv_exactly(client: socket.socket, count: int) -> bytes:
    data = bytearray()
    while len(data) < count:
        chunk = client.recv(count - len(data))
        if not chunk:
            break
        data += chunk
    return bytes(data)


def test_socket_console_output_and_input(tmp_path: Path, events: EventLoopThread) -> None:
    path = tmp_path / "console.sock"
    console = SocketConsole(path)
    uart = Serial8250(NullInterrupt(), console)
    console.start(uart.enqueue_input, events)
    first, second = connect(path), connect(path)
    assert wait_until(lambda: console.client_count == 2)
    guest_write(uart, b"login: ")
    assert recv_exactly(first, 7) == b"login: "
    assert recv_exactly(second, 7) == b"login: "
    first.sendall(b"root\r")
    assert read_from_guest_until(uart, b"root\r") == b"root\r"
    second.close()
    assert wait_until(lambda: console.client_count == 1)
    guest_write(uart, b"# ")
    assert recv_exactly(first, 2) == b"# "
    console.close()
    assert not path.exists()
    assert first.recv(1) == b""  # the server closed the connection
    first.close()


def test_socket_console_drops_a_client_that_does_not_read(tmp_path: Path, events: EventLoopThread) -> None:
    path = tmp_path / "console.sock"
    console = SocketConsole(path, client_backlog=4096)
    uart = Serial8250(NullInterrupt(), console)
    console.start(uart.enqueue_input, events)
    stuck = connect(path)
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    reader = connect(path)
    assert wait_until(lambda: console.client_count == 2)
    received = bytearray()
    chunk = bytes(range(256)) * 16
    started = time.monotonic()
    total = 0
    while console.client_count == 2 and total < 64 * 1024 * 1024:
        console.write(chunk)
        total += len(chunk)
        try:
            reader.setblocking(False)
            while True:
                received += reader.recv(1 << 16)
        except BlockingIOError:
            pass
    assert console.client_count == 1, "the stuck client was never dropped"
    assert console.dropped_clients == 1
    assert time.monotonic() - started < 10  # the writer never blocked on the stuck client
    reader.setblocking(True)
    reader.settimeout(5)
    while len(received) < total:
        received += reader.recv(1 << 16)
    assert bytes(received) == (chunk * (total // len(chunk)))
    console.close()
    stuck.close()
    reader.close()


def test_socket_console_replaces_a_stale_socket_and_refuses_a_live_one(tmp_path: Path) -> None:
    path = tmp_path / "console.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens
    console = SocketConsole(path)
    with pytest.raises(ConsoleError, match="in use"):
        SocketConsole(path)
    console.close()
    assert not path.exists()
    path.write_text("not a socket")
    with pytest.raises(ConsoleError, match="not a socket"):
        SocketConsole(path)


def test_socket_console_needs_an_event_loop(tmp_path: Path) -> None:
    with SocketConsole(tmp_path / "c.sock") as console, pytest.raises(ConsoleError, match="EventLoopThread"):
        console.start(lambda data: None)


# -- StdioConsole --------------------------------------------------------------------------------------

def test_stdio_console_with_pipes(events: EventLoopThread) -> None:
    stdin_read, stdin_write = os.pipe()
    stdout_read, stdout_write = os.pipe()
    console = StdioConsole(stdin_fd=stdin_read, stdout_fd=stdout_write)
    uart = Serial8250(NullInterrupt(), console)
    try:
        assert not console.is_tty
        console.start(uart.enqueue_input, events)
        guest_write(uart, b"out\n")
        assert os.read(stdout_read, 100) == b"out\n"
        os.write(stdin_write, b"in\x01x")  # no escapes on a pipe
        os.close(stdin_write)
        stdin_write = -1
        assert read_from_guest_until(uart, b"in\x01x") == b"in\x01x"
    finally:
        console.close()
        for fd in (stdin_read, stdin_write, stdout_read, stdout_write):
            if fd >= 0:
                os.close(fd)


def test_stdio_console_reads_a_regular_file(tmp_path: Path, events: EventLoopThread) -> None:
    source = tmp_path / "input"
    source.write_bytes(b"scripted input\n")
    devnull = os.open(os.devnull, os.O_WRONLY)
    stdin_fd = os.open(source, os.O_RDONLY)
    console = StdioConsole(stdin_fd=stdin_fd, stdout_fd=devnull)
    uart = Serial8250(NullInterrupt(), console)
    try:
        console.start(uart.enqueue_input, events)
        assert read_from_guest_until(uart, b"scripted input\n") == b"scripted input\n"
    finally:
        console.close()
        os.close(stdin_fd)
        os.close(devnull)


def test_stdio_console_on_a_terminal_uses_raw_mode_and_the_escape(events: EventLoopThread) -> None:
    try:
        master, slave = os.openpty()
    except OSError as error:
        pytest.skip(f"no pseudo-terminals here: {error}")
    before = termios.tcgetattr(slave)
    stopped = threading.Event()
    console = StdioConsole(stopped.set, stdin_fd=slave, stdout_fd=slave)
    uart = Serial8250(NullInterrupt(), console)
    try:
        assert console.is_tty
        console.start(uart.enqueue_input, events)
        raw = termios.tcgetattr(slave)
        assert not raw[3] & (termios.ECHO | termios.ICANON | termios.ISIG)
        assert not raw[0] & termios.ICRNL
        os.write(master, b"ls\r\x03\x01\x01")  # Ctrl-C goes to the guest; Ctrl-A Ctrl-A sends one Ctrl-A
        assert read_from_guest_until(uart, b"ls\r\x03\x01") == b"ls\r\x03\x01"
        os.write(master, b"\x01x")
        assert stopped.wait(5)
        guest_write(uart, b"bye\n")
        seen = bytearray()

        def bye_arrived() -> bool:   # never blocks: a read that would wait fails the test instead of hanging it
            if select.select([master], [], [], 0.05)[0]:
                seen.extend(os.read(master, 100))
            return b"bye" in seen
        assert wait_until(bye_arrived), bytes(seen)
    finally:
        console.close()
    assert termios.tcgetattr(slave) == before
    os.close(master)
    os.close(slave)


def test_escape_filter_keeps_state_across_reads() -> None:
    escape = EscapeFilter()
    assert escape.feed(b"abc") == (b"abc", [])
    assert escape.feed(b"d\x01") == (b"d", [])
    assert escape.feed(b"x") == (b"", [EscapeAction.QUIT])
    assert escape.feed(b"\x01h\x01\x01\x01q") == (b"\x01\x01q", [EscapeAction.HELP])
