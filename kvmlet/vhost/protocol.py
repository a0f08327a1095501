"""The front-end side of the vhost-user protocol (QEMU's docs/interop/vhost-user.rst), written from that document.

A message is a 12-byte header (request, flags, payload size; all little-endian u32) and a payload; file
descriptors travel as SCM_RIGHTS ancillary data with the message that needs them. Flags: bits 0-1 the version
(1), bit 2 a reply, bit 3 "reply wanted" (with ``VHOST_USER_PROTOCOL_F_REPLY_ACK``, every message the front end
sends without a reply of its own is then acknowledged with a u64: 0 for success).

:class:`VhostUserConnection` is one connection to a back end. Every answer is checked (reply bit, version,
request, payload size) before it is used: a back end that breaks the protocol raises
:class:`VhostUserProtocolError` with a message naming what it did, never a traceback from deep inside, and the
connection is then closed. Nothing here runs per frame.
"""

from __future__ import annotations

import array
import enum
import os
import select
import socket
import struct
import time
from collections.abc import Sequence

from kvmlet.vhost.common import (
    VRING_ADDR,
    VRING_STATE,
    MemoryRegionSpec,
    VhostError,
    VringAddresses,
)

HEADER = struct.Struct("<III")
U64 = struct.Struct("<Q")
MEMORY_REGION = struct.Struct("<QQQQ")       # guest address, size, user (front-end) address, mmap offset
MEMORY_HEADER = struct.Struct("<II")         # number of regions, padding
MAX_MEMORY_REGIONS = 8                       # without VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS
MAX_PAYLOAD = 4096                           # the largest reply kvmlet ever expects (a GET_CONFIG is 256)
VERSION = 0x1
FLAG_REPLY = 1 << 2
FLAG_NEED_REPLY = 1 << 3
VRING_NOFD = 1 << 8                          # in SET_VRING_KICK/CALL: no descriptor (polling / no interrupt)
REPLY_TIMEOUT = 5.0                          # seconds a back end has to answer one message


class Request(enum.IntEnum):
    """Front-end message types (the ones kvmlet sends)."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20


class ProtocolFeature(enum.IntEnum):
    """VHOST_USER_PROTOCOL_F_* bit numbers."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    BACKEND_REQ = 5
    CONFIG = 9


VHOST_USER_F_PROTOCOL_FEATURES = 30          # a virtio feature bit: the back end speaks protocol features
# What kvmlet uses when the back end offers it.
WANTED_PROTOCOL_FEATURES = (1 << ProtocolFeature.MQ) | (1 << ProtocolFeature.REPLY_ACK)


class VhostUserError(VhostError):
    """A vhost-user back end cannot be reached or used."""


class VhostUserProtocolError(VhostUserError):
    """The back end broke the protocol (a malformed or unexpected message): the connection is dropped."""


class VhostUserConnection:
    """One connected vhost-user socket (front end = client). Not thread-safe: the caller serializes."""

    def __init__(self, sock: socket.socket, path: str) -> None:
        self.sock = sock
        self.path = path
        self.protocol_features = 0       # what both sides agreed to (after :meth:`negotiate_protocol`)
        self.messages = 0

    @classmethod
    def connect(cls, path: str, timeout: float = 0.0) -> VhostUserConnection:
        """Connect to the back end's socket, retrying for up to ``timeout`` seconds (it may be starting)."""
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.connect(path)
                return cls(sock, path)
            except OSError as exc:
                sock.close()
                if time.monotonic() >= deadline:
                    raise VhostUserError(f"vhost-user back end {path}: cannot connect: {exc.strerror or exc}"
                                         " (is the back end running, with its socket in server mode?)") from None
                time.sleep(0.05)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    @property
    def reply_ack(self) -> bool:
        return bool(self.protocol_features & (1 << ProtocolFeature.REPLY_ACK))

    # -- messages -------------------------------------------------------------------------------------
    def _send(self, request: Request, payload: bytes = b"", fds: Sequence[int] = (), need_reply: bool = False) -> None:
        flags = VERSION | (FLAG_NEED_REPLY if need_reply else 0)
        message = HEADER.pack(int(request), flags, len(payload)) + payload
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        try:
            sent = self.sock.sendmsg([message], ancillary)
        except OSError as exc:
            raise VhostUserError(f"vhost-user back end {self.path}: {request.name}: {exc.strerror or exc}") from None
        if sent != len(message):
            raise VhostUserError(f"vhost-user back end {self.path}: {request.name}: short write")
        self.messages += 1

    def _read_exact(self, count: int, request: Request) -> bytes:
        data = bytearray()
        deadline = time.monotonic() + REPLY_TIMEOUT
        while len(data) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self.sock], [], [], remaining)[0]:
                raise VhostUserProtocolError(f"vhost-user back end {self.path} did not answer {request.name} "
                                             f"within {REPLY_TIMEOUT:g} s")
            try:
                chunk = self.sock.recv(count - len(data))
            except OSError as exc:
                raise VhostUserError(f"vhost-user back end {self.path}: {request.name}: "
                                     f"{exc.strerror or exc}") from None
            if not chunk:
                raise VhostUserError(f"vhost-user back end {self.path} closed the connection during "
                                     f"{request.name}")
            data += chunk
        return bytes(data)

    def _reply(self, request: Request, expected_size: int) -> bytes:
        raw = self._read_exact(HEADER.size, request)
        answered, flags, size = HEADER.unpack(raw)
        problem = None
        if flags & 0x3 != VERSION:
            problem = f"version {flags & 0x3} (not {VERSION})"
        elif not flags & FLAG_REPLY:
            problem = "a message without the reply flag"
        elif answered != request:
            problem = f"a reply to request {answered}"
        elif size != expected_size:
            problem = f"a {size}-byte payload (expected {expected_size})"
        if problem is not None:
            raise VhostUserProtocolError(f"vhost-user back end {self.path} broke the protocol: it answered "
                                         f"{request.name} with {problem} (header {raw.hex()})")
        return self._read_exact(size, request) if size else b""

    def _call_u64(self, request: Request) -> int:
        self._send(request)
        return int(U64.unpack(self._reply(request, U64.size))[0])

    def _command(self, request: Request, payload: bytes = b"", fds: Sequence[int] = ()) -> None:
        """A message without a reply of its own; acknowledged when REPLY_ACK was agreed."""
        ack = self.reply_ack
        self._send(request, payload, fds, need_reply=ack)
        if ack:
            status = U64.unpack(self._reply(request, U64.size))[0]
            if status != 0:
                raise VhostUserError(f"vhost-user back end {self.path} refused {request.name} (status {status})")

    # -- the requests kvmlet uses ---------------------------------------------------------------------
    def get_features(self) -> int:
        return self._call_u64(Request.GET_FEATURES)

    def set_features(self, features: int) -> None:
        self._command(Request.SET_FEATURES, U64.pack(features))

    def negotiate_protocol(self, backend_features: int) -> int:
        """GET/SET_PROTOCOL_FEATURES if the back end offers them; returns the agreed protocol features."""
        if not backend_features & (1 << VHOST_USER_F_PROTOCOL_FEATURES):
            self.protocol_features = 0
            return 0
        offered = self._call_u64(Request.GET_PROTOCOL_FEATURES)
        agreed = offered & WANTED_PROTOCOL_FEATURES
        self._send(Request.SET_PROTOCOL_FEATURES, U64.pack(agreed))   # never acknowledged (not agreed yet)
        self.protocol_features = agreed
        return agreed

    def get_queue_num(self) -> int:
        return self._call_u64(Request.GET_QUEUE_NUM)

    def set_owner(self) -> None:
        self._command(Request.SET_OWNER)

    def set_mem_table(self, regions: Sequence[MemoryRegionSpec]) -> None:
        if not 1 <= len(regions) <= MAX_MEMORY_REGIONS:
            raise VhostUserError(f"vhost-user: {len(regions)} memory regions (1 to {MAX_MEMORY_REGIONS} fit one "
                                 "SET_MEM_TABLE)")
        payload = MEMORY_HEADER.pack(len(regions), 0) + b"".join(
            MEMORY_REGION.pack(r.guest_address, r.size, r.user_address, r.fd_offset) for r in regions)
        self._command(Request.SET_MEM_TABLE, payload, [r.fd for r in regions])

    def set_vring_num(self, index: int, size: int) -> None:
        self._command(Request.SET_VRING_NUM, VRING_STATE.pack(index, size))

    def set_vring_base(self, index: int, base: int) -> None:
        self._command(Request.SET_VRING_BASE, VRING_STATE.pack(index, base))

    def get_vring_base(self, index: int) -> int:
        """Stop ring ``index`` in the back end; returns the next available index it would have read."""
        self._send(Request.GET_VRING_BASE, VRING_STATE.pack(index, 0))
        got, base = VRING_STATE.unpack(self._reply(Request.GET_VRING_BASE, VRING_STATE.size))
        if got != index:
            raise VhostUserProtocolError(f"vhost-user back end {self.path} broke the protocol: GET_VRING_BASE "
                                         f"for ring {index} answered for ring {got}")
        return int(base)

    def set_vring_addr(self, index: int, addresses: VringAddresses) -> None:
        self._command(Request.SET_VRING_ADDR, VRING_ADDR.pack(index, 0, addresses.descriptor, addresses.used,
                                                               addresses.available, 0))

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        self._vring_fd(Request.SET_VRING_KICK, index, fd)

    def set_vring_call(self, index: int, fd: int | None) -> None:
        self._vring_fd(Request.SET_VRING_CALL, index, fd)

    def _vring_fd(self, request: Request, index: int, fd: int | None) -> None:
        value = index | (VRING_NOFD if fd is None else 0)
        self._command(request, U64.pack(value), [] if fd is None else [fd])

    def set_vring_enable(self, index: int, enable: bool) -> None:
        self._command(Request.SET_VRING_ENABLE, VRING_STATE.pack(index, int(enable)))

    def unsolicited(self) -> str | None:
        """The socket became readable while no request was pending: None if the back end hung up, else a
        description of the unexpected bytes (a protocol violation; the caller drops the connection)."""
        try:
            data = self.sock.recv(64, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return ""
        except OSError:
            return None
        if not data:
            return None
        return f"{len(data)}+ unexpected bytes ({data[:16].hex()})"


def wait_readable(fd: int, timeout: float) -> bool:
    """Whether ``fd`` is readable within ``timeout`` seconds (tests, tools)."""
    return bool(select.select([fd], [], [], timeout)[0])


def closefd(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
