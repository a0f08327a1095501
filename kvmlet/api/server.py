"""The HTTP API on a Unix socket: HTTP/1.1 parsed by h11, served on kvmlet's event loop.

Each connection is a coroutine on the event loop: it reads a request (refusing a body over the payload
limit as soon as its Content-Length says so, without reading it), then answers queries (GET) on the loop
and runs changes on a worker thread, so a slow change (building a VM, pausing vCPUs) never stops the API
from answering. Connections are kept alive as HTTP/1.1 allows; a client that disconnects mid-request
only loses its own request.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import json
import logging
import os
import socket
import stat
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h11

from kvmlet.api.routes import Route, find_route, invalid_path
from kvmlet.errors import ConfigError, KvmletError

if TYPE_CHECKING:
    from kvmlet.api.controller import Vmm

log = logging.getLogger("kvmlet.api")
DEFAULT_MAX_PAYLOAD = 51200     # bytes, Firecracker's --http-api-max-payload-size default
READ_CHUNK = 65536
WORKERS = 4
PRELOAD_WAIT = 30.0   # seconds a change waits for the server's preload thread (it takes well under one)


def bind_api_socket(path: Path) -> socket.socket:
    """A listening Unix socket at ``path``, readable and writable by its owner only (0600).

    An existing path is refused unless it is a stale socket (nothing accepts on it), which is replaced."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(mode):
            raise ConfigError(f"API socket {path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except ConnectionRefusedError:
            path.unlink()          # stale: left by a process that is gone
        except OSError as exc:
            raise ConfigError(f"API socket {path}: {exc.strerror}") from None
        else:
            raise ConfigError(f"API socket {path} is in use by another process")
        finally:
            probe.close()
    if not path.parent.is_dir():
        raise ConfigError(f"API socket {path}: directory {path.parent} does not exist")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old_umask = os.umask(0o177)
    try:
        listener.bind(str(path))
    except OSError as exc:
        listener.close()
        raise ConfigError(f"API socket {path}: {exc.strerror}") from None
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    listener.listen(128)
    listener.setblocking(False)
    return listener


class ApiServer:
    """Serves the API of one :class:`Vmm` on a listening Unix socket."""

    def __init__(self, vmm: Vmm, listener: socket.socket, *, max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
        self.vmm = vmm
        self.listener = listener
        self.max_payload = max_payload
        self.workers = concurrent.futures.ThreadPoolExecutor(WORKERS, thread_name_prefix="kvmlet-api")
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.connections = 0

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._serve_connection, sock=self.listener)

    async def close(self) -> None:
        """Stop listening and end every open connection (idle keep-alive ones too)."""
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        self.workers.shutdown(wait=False, cancel_futures=True)

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        connection = h11.Connection(h11.SERVER, max_incomplete_event_size=16384)
        try:
            while await self._serve_one(connection, reader, writer):
                connection.start_next_cycle()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass   # the client went away: only its own request is lost
        except h11.RemoteProtocolError as exc:
            await self._send_error(connection, writer, exc.error_status_hint, f"Bad HTTP request: {exc}")
        finally:
            self._writers.discard(writer)
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, OSError):
                pass

    async def _next_event(self, connection: h11.Connection, reader: asyncio.StreamReader) -> Any:
        while True:
            event = connection.next_event()
            if event is not h11.NEED_DATA:
                return event
            data = await reader.read(READ_CHUNK)
            connection.receive_data(data)

    async def _serve_one(self, connection: h11.Connection, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> bool:
        """One request and its response; False when the connection is done."""
        event = await self._next_event(connection, reader)
        if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
            return False
        if not isinstance(event, h11.Request):
            return False
        method = event.method.decode("ascii", "replace")
        target = event.target.decode("ascii", "replace")
        length = next((int(v) for k, v in event.headers if k == b"content-length"), None)
        if length is not None and length > self.max_payload:
            await self._send_error(connection, writer, 400, self._too_large(length))
            return False
        body = bytearray()
        while True:
            part = await self._next_event(connection, reader)
            if isinstance(part, h11.Data):
                body += part.data
                if len(body) > self.max_payload:
                    await self._send_error(connection, writer, 400, self._too_large(len(body)))
                    return False
            elif isinstance(part, h11.EndOfMessage):
                break
            else:
                return False
        status, payload = await self._dispatch(method, target, bytes(body))
        await self._send(connection, writer, status, payload)
        return connection.our_state is h11.DONE and connection.their_state is h11.DONE

    def _too_large(self, size: int) -> str:
        return f"Request payload with size {size} is larger than the limit of {self.max_payload} allowed by server."

    def _change(self, route: Route, body: bytes, ident: str) -> tuple[int, Any]:
        """A mutating request on a worker thread, once the server's preloading is done."""
        self.vmm.preloaded.wait(PRELOAD_WAIT)
        return route.handler(self.vmm, body, ident)

    async def _dispatch(self, method: str, target: str, body: bytes) -> tuple[int, Any]:
        found = find_route(method, target)
        if found is None:
            self.vmm.counters.count(f"{method} invalid", True)
            return 400, {"fault_message": invalid_path(method, target)}
        route, ident = found
        key = f"{method} {route.prefix.rstrip('/') or '/'}"
        try:
            if route.mutating:
                loop = asyncio.get_running_loop()
                status, payload = await loop.run_in_executor(self.workers, self._change, route, body, ident)
            else:
                status, payload = route.handler(self.vmm, body, ident)
        except KvmletError as exc:
            self.vmm.counters.count(key, True)
            log.info("API %s %s refused: %s", method, target, exc)
            return 400, {"fault_message": str(exc)}
        except Exception as exc:   # a bug: say so in one line, log the traceback, keep serving
            self.vmm.counters.count(key, True)
            log.exception("API %s %s failed", method, target)
            return 500, {"fault_message": f"Internal error: {type(exc).__name__}: {exc}"}
        self.vmm.counters.count(key, False)
        return status, payload

    async def _send(self, connection: h11.Connection, writer: asyncio.StreamWriter, status: int,
                    payload: Any) -> None:
        headers: list[tuple[str, str]] = [("Server", "kvmlet")]
        data = b""
        if isinstance(payload, str):
            data = payload.encode()
            headers.append(("Content-Type", "text/plain; version=0.0.4"))
        elif payload is not None:
            data = json.dumps(payload).encode()
            headers.append(("Content-Type", "application/json"))
        if status != 204:
            headers.append(("Content-Length", str(len(data))))
        if connection.their_state is not h11.DONE:
            headers.append(("Connection", "close"))
        try:
            writer.write(connection.send(h11.Response(status_code=status, headers=headers,
                                                      reason=HTTPStatus(status).phrase)))
            if data:
                writer.write(connection.send(h11.Data(data=data)))
            writer.write(connection.send(h11.EndOfMessage()))
            await writer.drain()
        except h11.LocalProtocolError:
            pass

    async def _send_error(self, connection: h11.Connection, writer: asyncio.StreamWriter, status: int,
                          message: str) -> None:
        if connection.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        try:
            await self._send(connection, writer, status, {"fault_message": message})
        except (ConnectionError, OSError) as exc:
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET, None):
                raise
