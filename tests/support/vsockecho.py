"""The host end of the test guest's vsock check: a Unix socket at Firecracker's ``UDS_PORT`` path that reads one
line from the guest, answers ``PONG``, and keeps the connection until the guest closes it."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def pong_server(path: str) -> Iterator[list[bytes]]:
    """Listens at ``path`` while the block runs; yields the list that receives each line the guest sent."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    server.settimeout(60)
    got: list[bytes] = []

    def serve() -> None:
        try:
            conn, _ = server.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(30)
            data = b""
            while not data.endswith(b"\n"):
                chunk = conn.recv(100)
                if not chunk:
                    break
                data += chunk
            got.append(data)
            conn.sendall(b"PONG\n")
            while conn.recv(100):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield got
    finally:
        server.close()
        thread.join(5)
