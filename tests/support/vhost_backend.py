"""A scripted vhost-user back end for tests: answers the set-up kvmlet does, records what it received, and can be
told to break the protocol (garbage instead of a reply, or unsolicited bytes once the rings are set up)."""

from __future__ import annotations

import array
import contextlib
import os
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

from kvmlet.vhost.protocol import FLAG_NEED_REPLY, FLAG_REPLY, HEADER, VERSION, Request

FEATURES = (1 << 32) | (1 << 30) | (1 << 15) | (1 << 5) | (1 << 16)   # VERSION_1, PROTOCOL_FEATURES, MRG_RXBUF, ...
PROTOCOL_FEATURES = (1 << 0) | (1 << 3)                                  # MQ, REPLY_ACK


@dataclass
class FakeBackend:
    path: str
    queues: int = 4
    garbage_reply_to: Request | None = None     # answer this request with garbage
    garbage_after: Request | None = None        # send unsolicited garbage after acking this request
    received: list[tuple[Request | int, int, int]] = field(default_factory=list)   # (request, flags, fds)
    memory_fds: int = 0
    connections: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def serve(self) -> None:
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        server.bind(self.path)
        server.listen(4)
        server.settimeout(0.2)
        try:
            while not self._stop.is_set():
                try:
                    conn, _ = server.accept()
                except TimeoutError:
                    continue
                self.connections += 1
                with conn, contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self._session(conn)   # kvmlet hangs up on a back end that sends garbage: expected
        finally:
            server.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def _session(self, conn: socket.socket) -> None:
        conn.settimeout(0.2)
        while not self._stop.is_set():
            try:
                header, ancillary, _, _ = conn.recvmsg(HEADER.size, socket.CMSG_SPACE(8 * 4))
            except TimeoutError:
                continue
            except OSError:
                return
            if not header:
                return
            fds = array.array("i")
            for level, kind, data in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
            for fd in fds:
                os.close(fd)
            code, flags, size = HEADER.unpack(header)
            payload = b""
            while len(payload) < size:
                payload += conn.recv(size - len(payload))
            try:
                request: Request | int = Request(code)
            except ValueError:
                request = code
            self.received.append((request, flags, len(fds)))
            if request == Request.SET_MEM_TABLE:
                self.memory_fds += len(fds)
            if request == self.garbage_reply_to:
                conn.sendall(b"\xde\xad\xbe\xef" * 5)
                continue
            answer = {Request.GET_FEATURES: FEATURES, Request.GET_PROTOCOL_FEATURES: PROTOCOL_FEATURES,
                      Request.GET_QUEUE_NUM: self.queues}.get(request)   # type: ignore[call-overload]
            if answer is not None:
                conn.sendall(HEADER.pack(code, VERSION | FLAG_REPLY, 8) + struct.pack("<Q", answer))
            elif request == Request.GET_VRING_BASE:
                conn.sendall(HEADER.pack(code, VERSION | FLAG_REPLY, 8) + payload[:4] + b"\0\0\0\0")
            elif flags & FLAG_NEED_REPLY:
                conn.sendall(HEADER.pack(code, VERSION | FLAG_REPLY, 8) + struct.pack("<Q", 0))
            if request == self.garbage_after:
                conn.sendall(b"garbage from a broken back end")

    def stop(self) -> None:
        self._stop.set()


@contextlib.contextmanager
def fake_backend(path: str, **kwargs: object) -> Iterator[FakeBackend]:
    backend = FakeBackend(path, **kwargs)  # type: ignore[arg-type]
    thread = threading.Thread(target=backend.serve, daemon=True)
    thread.start()
    try:
        for _ in range(100):
            if os.path.exists(path):
                break
            threading.Event().wait(0.01)
        yield backend
    finally:
        backend.stop()
        thread.join(5)
