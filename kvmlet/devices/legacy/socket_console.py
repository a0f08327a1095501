"""A console on a Unix stream socket: every connected client sees the guest's output and can type to it."""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import stat
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvmlet.devices.legacy.console import (
    READ_CHUNK,
    Console,
    ConsoleError,
    InputSink,
    require_events,
    run_on_loop,
    warn,
)

if TYPE_CHECKING:
    from kvmlet.eventloop import EventLoopThread

DEFAULT_CLIENT_BACKLOG = 256 * 1024  # bytes queued for a slow client before it is dropped


@dataclass(eq=False)
class _Client:
    sock: socket.socket
    fd: int
    pending: bytearray = field(default_factory=bytearray)
    writer_armed: bool = False


class SocketConsole(Console):
    """A Unix stream socket server at ``path``: output goes to every connected client, input from any
    client goes to the guest.

    Sends never block the vCPU: what a client's socket cannot take at once is queued (up to
    ``client_backlog`` bytes) and flushed from the event loop; a client that falls further behind is
    disconnected. The socket file is created by the constructor (a stale one is replaced) and removed on
    close.
    """

    def __init__(self, path: str | os.PathLike[str], *, client_backlog: int = DEFAULT_CLIENT_BACKLOG) -> None:
        self.path = os.fspath(path)
        self._client_backlog = client_backlog
        self._lock = threading.Lock()
        self._clients: dict[int, _Client] = {}
        self._events: EventLoopThread | None = None
        self._on_input: InputSink | None = None
        self._closed = False
        self.dropped_clients = 0
        self._remove_stale_socket()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(self.path)
            listener.listen(8)
            listener.setblocking(False)
        except OSError as error:
            listener.close()
            raise ConsoleError(f"cannot listen on console socket {self.path}: {error}") from error
        self._listener = listener
        self._inode = os.stat(self.path).st_ino

    def _remove_stale_socket(self) -> None:
        try:
            mode = os.stat(self.path).st_mode
        except FileNotFoundError:
            return
        except OSError as error:
            raise ConsoleError(f"console socket path {self.path}: {error.strerror}") from error
        if not stat.S_ISSOCK(mode):
            raise ConsoleError(f"console socket path {self.path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(self.path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(self.path)  # nobody listens: left over from an earlier run
            return
        except OSError as error:
            raise ConsoleError(f"console socket {self.path}: {error}") from error
        finally:
            probe.close()
        raise ConsoleError(f"console socket {self.path} is in use by another process")

    @property
    def client_count(self) -> int:
        with self._lock:
            return len(self._clients)

    def start(self, on_input: InputSink, events: EventLoopThread | None = None) -> None:
        if self._closed:
            raise ConsoleError(f"console socket {self.path} is closed")
        self._events = require_events(events, "the socket console")
        self._on_input = on_input
        self._events.watch_read(self._listener.fileno(), self._accept)

    # -- event-loop thread ----------------------------------------------------------------------------

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                warn(f"console socket {self.path}: accept failed: {error}")
                return
            sock.setblocking(False)
            client = _Client(sock, sock.fileno())
            with self._lock:
                if self._closed:
                    sock.close()
                    return
                self._clients[client.fd] = client
            assert self._events is not None
            self._events.watch_read(client.fd, functools.partial(self._client_readable, client))

    def _client_readable(self, client: _Client) -> None:
        try:
            data = client.sock.recv(READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(client)
            return
        if self._on_input is not None:
            self._on_input(data)

    def _client_writable(self, client: _Client) -> None:
        with self._lock:
            if self._clients.get(client.fd) is not client:
                return
            try:
                sent = client.sock.send(client.pending, socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                sent = -1
            if sent >= 0:
                del client.pending[:sent]
                if client.pending:
                    return
                client.writer_armed = False
        if sent < 0:
            self._drop(client)
        else:
            assert self._events is not None
            self._events.unwatch_write(client.fd)

    def _arm_writer(self, client: _Client) -> None:
        with self._lock:
            if self._clients.get(client.fd) is not client:
                return
        assert self._events is not None
        self._events.watch_write(client.fd, functools.partial(self._client_writable, client))

    def _release(self, client: _Client) -> None:
        """Unregister and close a client that is no longer in the table (event-loop thread)."""
        if self._events is not None:
            self._events.unwatch_read(client.fd)
            self._events.unwatch_write(client.fd)
        client.sock.close()

    # -- any thread -------------------------------------------------------------------------------------

    def _drop(self, client: _Client) -> None:
        with self._lock:
            if self._clients.get(client.fd) is not client:
                return
            del self._clients[client.fd]
        self._schedule_release(client)

    def _schedule_release(self, client: _Client) -> None:
        events = self._events
        if events is None or not events.running:
            self._release(client)
            return
        try:
            events.call_soon(functools.partial(self._release, client))
        except RuntimeError:  # the loop closed meanwhile: nothing is registered any more
            client.sock.close()

    def write(self, data: bytes) -> None:
        if not data:
            return
        slow: list[_Client] = []
        dead: list[_Client] = []
        with self._lock:
            for client in self._clients.values():
                if client.pending:
                    if len(client.pending) + len(data) > self._client_backlog:
                        dead.append(client)
                    else:
                        client.pending += data
                    continue
                try:
                    sent = client.sock.send(data, socket.MSG_NOSIGNAL)
                except (BlockingIOError, InterruptedError):
                    sent = 0
                except OSError:
                    dead.append(client)
                    continue
                if sent < len(data):
                    if len(data) - sent > self._client_backlog:
                        dead.append(client)
                        continue
                    client.pending += data[sent:]
                    if not client.writer_armed:
                        client.writer_armed = True
                        slow.append(client)
            for client in dead:
                del self._clients[client.fd]
            self.dropped_clients += len(dead)
        events = self._events
        for client in slow:
            if events is not None and not events.loop.is_closed():
                with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: no more flushing
                    events.call_soon(functools.partial(self._arm_writer, client))
        for client in dead:
            warn(f"console socket {self.path}: dropping a client that cannot keep up")
            self._schedule_release(client)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            clients = list(self._clients.values())
            self._clients.clear()
        events = self._events

        def release_all() -> None:
            if events is not None:
                events.unwatch_read(self._listener.fileno())
            for client in clients:
                self._release(client)

        run_on_loop(events, release_all)
        self._listener.close()
        try:
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
