"""Host-side helpers of the vsock device: its Unix listener, the ``CONNECT <port>`` line host clients send,
and rate-limited warnings for the host's log."""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import time

from kvmlet.devices.virtio.vsock_packet import U32
from kvmlet.errors import KvmletError

LISTEN_BACKLOG = 64


class VsockError(KvmletError, RuntimeError):
    """The host side cannot be set up (socket path problems)."""


class WarningLimiter:
    """Warnings for the host's log, at most one of each kind per ``interval`` seconds, so that a guest cannot
    flood the log; the next warning of a kind says how many were held back meanwhile."""

    def __init__(self, log: logging.Logger, interval: float) -> None:
        self.log = log
        self.interval = interval
        self._last: dict[str, float] = {}   # kind -> when one was last logged (kinds: a few fixed names)
        self._held: dict[str, int] = {}

    def warn(self, kind: str, message: str) -> bool:
        """Log ``message`` unless one of ``kind`` was logged less than ``interval`` ago; True if logged."""
        now = time.monotonic()
        last = self._last.get(kind)
        if last is not None and now - last < self.interval:
            self._held[kind] = self._held.get(kind, 0) + 1
            return False
        self._last[kind] = now
        held = self._held.pop(kind, 0)
        self.log.warning("%s%s", message, f" (and {held} more like it since the last warning)" if held else "")
        return True


def parse_connect(line: bytes) -> int | None:
    """The port of a ``CONNECT <port>`` line (without its newline), or None."""
    parts = line.strip().split()
    if len(parts) != 2 or parts[0] != b"CONNECT" or not parts[1].isdigit():
        return None
    port = int(parts[1])
    return port if port < U32 else None


def listen_unix(path: str) -> socket.socket:
    """A non-blocking Unix listener at ``path`` (a stale socket left there is replaced)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as exc:
        raise VsockError(f"vsock socket {path}: {exc.strerror}") from None
    if mode is not None:
        if not stat.S_ISSOCK(mode):
            raise VsockError(f"vsock socket {path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)  # stale: nobody listens
        except OSError:
            pass
        else:
            raise VsockError(f"vsock socket {path} is in use by another process")
        finally:
            probe.close()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        listener.bind(path)
        listener.listen(LISTEN_BACKLOG)
        listener.setblocking(False)
    except OSError as exc:
        listener.close()
        if exc.errno == errno.ENAMETOOLONG or (exc.errno == errno.EINVAL and len(path) > 100):
            raise VsockError(f"vsock socket path {path} is too long for a Unix socket") from None
        raise VsockError(f"cannot listen on {path}: {exc.strerror or exc}") from None
    return listener
