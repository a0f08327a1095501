"""The migration stream: a versioned preamble, then frames, each with two CRC-32s, over TCP or a Unix socket,
optionally in TLS.

Each side starts with a preamble, the source first::

    "KVMLETMG" | stream version u32 | flags u32 (0)

A side that reads another version answers with its own preamble and closes: the other side names both
versions. Then frames, little-endian::

    sequence u32 | meta length u32 | data length u32 | CRC-32 of meta + data u32 | CRC-32 of the first 16 bytes u32
    meta (msgpack: one message, a tagged union) | data (raw bytes: the pages of a Pages message)

The header's own CRC catches a damaged length before anything is read on its strength; the body's CRC
(zlib's CRC-32, the one of zip and PNG) catches damaged pages or messages. A frame that fails either, or whose
sequence number is not the next one, ends the migration on that side (the source keeps its VM; the
destination discards everything).
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import ssl
import struct
import time
import zlib
from collections.abc import Sequence
from typing import Any

import msgspec

from kvmlet.errors import KvmletError
from kvmlet.kvm.cpuid import CpuidEntry
from kvmlet.migration.params import Address, MigrationTls

MAGIC = b"KVMLETMG"
STREAM_VERSION = 1
PREAMBLE = struct.Struct("<8sII")
HEADER = struct.Struct("<IIIII")
MAX_META = 16 << 20
MAX_DATA = 64 << 20
Buffer = bytes | bytearray | memoryview


class MigrationError(KvmletError):
    """A migration that cannot go on; the message says what happened and where."""


class StreamError(MigrationError):
    """The stream is broken: closed, stalled, corrupted, or another protocol. ``gone``: the connection itself
    failed or was closed (nothing more can be said on it)."""

    def __init__(self, message: str, *, gone: bool = False) -> None:
        super().__init__(message)
        self.gone = gone


# -- messages ----------------------------------------------------------------------------------------------
class CpuOffer(msgspec.Struct, forbid_unknown_fields=True):
    """The CPU the VM's vCPUs were given (the table kvmlet set, not a read-back) and its features."""

    name: str
    vendor: str
    cpuid: list[CpuidEntry]
    msrs: dict[int, int]
    features: list[str]


class Hello(msgspec.Struct, tag=True):
    """Source -> destination, first: what is coming. Nothing of the guest's memory has moved yet."""

    kvmlet_version: str
    vm_id: str
    config: dict[str, Any]              # the VM's configuration, as GET /vm/config shows it
    memory: list[tuple[int, int]]       # (guest-physical address, size) of each RAM region
    cpu: CpuOffer
    verify_memory: bool = False


class Accept(msgspec.Struct, tag=True):
    """Destination: this host can run the VM, and its machine is built (paused, empty)."""

    kvmlet_version: str
    host: str


class Refuse(msgspec.Struct, tag=True):
    """Destination: it will not take the VM (the CPU gate, a drive it cannot open...)."""

    reason: str
    missing: list[str] = msgspec.field(default_factory=list)   # CPU features this host lacks


class Pages(msgspec.Struct, tag=True):
    """Runs of pages: (page frame number, count, kind); the frame's data holds the DATA runs' pages in order."""

    round: int
    runs: list[tuple[int, int, int]]


class State(msgspec.Struct, tag=True):
    """Source, paused: every device's, the VM's and each vCPU's state (a snapshot's sections)."""

    sections: dict[str, bytes]


class Complete(msgspec.Struct, tag=True):
    """Source: all memory and state sent; restore it and say when ready."""

    resume: bool                       # the VM was running: run it once told to go
    memory_sha256: str | None = None   # of all guest memory at the switchover (verify_memory)


class Ready(msgspec.Struct, tag=True):
    """Destination: the VM is restored and paused; it runs on Go."""

    restore_ms: float
    memory_sha256: str | None = None


class Go(msgspec.Struct, tag=True):
    """Source: the destination owns the VM now (the source will not resume it)."""


class Running(msgspec.Struct, tag=True):
    """Destination: the VM runs here (or stays paused, as it was on the source)."""


class Cancel(msgspec.Struct, tag=True):
    reason: str


class Error(msgspec.Struct, tag=True):
    reason: str


Message = Hello | Accept | Refuse | Pages | State | Complete | Ready | Go | Running | Cancel | Error


# -- the channel -------------------------------------------------------------------------------------------
class Channel:
    """One migration stream over a connected socket: frames out, frames in, each checked."""

    def __init__(self, sock: socket.socket, peer: str, timeout: float) -> None:
        self.sock = sock
        self.peer = peer
        self.timeout = timeout
        self.tls = isinstance(sock, ssl.SSLSocket)
        self.bytes_sent = 0
        self.bytes_received = 0
        self._next_out = 0
        self._next_in = 0
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(Message)
        sock.settimeout(timeout)

    # -- preamble --
    def send_preamble(self) -> None:
        self._send_all([PREAMBLE.pack(MAGIC, STREAM_VERSION, 0)])

    def expect_preamble(self, other: str) -> None:
        """Read the peer's preamble; StreamError if it is not kvmlet's or another version."""
        raw = self._read(PREAMBLE.size, "the stream's preamble")
        magic, version, _ = PREAMBLE.unpack(raw)
        if magic != MAGIC:
            raise StreamError(f"{self.peer} is not a kvmlet migration {other} (it sent {bytes(raw[:8])!r})")
        if version != STREAM_VERSION:
            raise StreamError(f"the {other} at {self.peer} speaks migration stream version {version}; this kvmlet "
                              f"speaks version {STREAM_VERSION}")

    # -- frames --
    def send(self, message: Message, data: Sequence[Buffer] = ()) -> int:
        """Send one frame; returns its size on the wire."""
        meta = self._encoder.encode(message)
        data_length = sum(len(piece) for piece in data)
        crc = zlib.crc32(meta)
        for piece in data:
            crc = zlib.crc32(piece, crc)
        start = struct.pack("<IIII", self._next_out, len(meta), data_length, crc)
        header = start + struct.pack("<I", zlib.crc32(start))
        self._send_all([header, meta, *data])
        self._next_out = (self._next_out + 1) & 0xFFFFFFFF
        size = HEADER.size + len(meta) + data_length
        return size

    def receive(self, timeout: float | None = None) -> tuple[Message, memoryview]:
        """The next frame's message and its data; StreamError if it is damaged or the peer is gone."""
        if timeout is not None:
            self.sock.settimeout(timeout)
        try:
            header = self._read(HEADER.size, "a frame header")
            sequence, meta_length, data_length, crc, header_crc = HEADER.unpack(header)
            if zlib.crc32(header[:16]) != header_crc:
                raise StreamError(f"frame {self._next_in} from {self.peer}: its header does not match its "
                                  "checksum (corrupted on the way)")
            if sequence != self._next_in:
                raise StreamError(f"frame {self._next_in} from {self.peer}: it carries sequence number {sequence}")
            if meta_length > MAX_META or data_length > MAX_DATA:
                raise StreamError(f"frame {sequence} from {self.peer}: {meta_length} + {data_length} bytes is not "
                                  "a frame kvmlet sends")
            body = self._read(meta_length + data_length, f"frame {sequence}")
            if zlib.crc32(body) != crc:
                raise StreamError(f"frame {sequence} from {self.peer}: its contents do not match their checksum "
                                  "(corrupted on the way)")
            try:
                message = self._decoder.decode(body[:meta_length])
            except msgspec.MsgspecError as exc:
                raise StreamError(f"frame {sequence} from {self.peer}: not a message this kvmlet reads ({exc})") \
                    from None
            self._next_in = (self._next_in + 1) & 0xFFFFFFFF
            return message, body[meta_length:]
        finally:
            if timeout is not None:
                self.sock.settimeout(self.timeout)

    def pending(self) -> bool:
        """Whether the peer has sent something that can be read now (e.g. an error while we stream)."""
        if self.tls and self.sock.pending():   # type: ignore[attr-defined]
            return True
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
        except (OSError, ValueError):
            return False
        return bool(readable)

    # -- bytes --
    def _send_all(self, buffers: list[Buffer]) -> None:
        total = sum(len(b) for b in buffers)
        try:
            if self.tls:
                self.sock.sendall(b"".join(buffers))
            else:
                views = [memoryview(b).cast("B") for b in buffers if len(b)]
                deadline = time.monotonic() + self.timeout
                while views:
                    self.sock.settimeout(max(0.001, deadline - time.monotonic()))
                    sent = self.sock.sendmsg(views[:1000])
                    while sent and views:
                        if sent >= len(views[0]):
                            sent -= len(views[0])
                            views.pop(0)
                        else:
                            views[0] = views[0][sent:]
                            sent = 0
                self.sock.settimeout(self.timeout)
        except TimeoutError:
            raise StreamError(f"the connection to {self.peer} stalled: nothing could be sent for "
                              f"{self.timeout:g} s") from None
        except OSError as exc:
            raise StreamError(f"the connection to {self.peer} failed: {exc.strerror or exc}", gone=True) from None
        self.bytes_sent += total

    def _read(self, length: int, what: str) -> memoryview:
        buffer = bytearray(length)
        view = memoryview(buffer)
        done = 0
        try:
            while done < length:
                count = self.sock.recv_into(view[done:], length - done)
                if count == 0:
                    raise StreamError(f"{self.peer} closed the connection (while {what} was expected)", gone=True)
                done += count
        except TimeoutError:
            raise StreamError(f"the connection to {self.peer} stalled: nothing arrived for {self.timeout:g} s "
                              f"(while {what} was expected)") from None
        except OSError as exc:
            raise StreamError(f"the connection to {self.peer} failed: {exc.strerror or exc}", gone=True) from None
        self.bytes_received += length
        return view

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.sock.close()

    def close_gracefully(self, grace: float = 1.0) -> None:
        """Close after sending an error: stop sending, drop what the peer still sends until it closes (or
        ``grace`` s pass), then close. Closing with unread data would reset the connection, and a reset can
        discard the error message before the peer reads it."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + grace
        with contextlib.suppress(OSError):
            self.sock.settimeout(0.05)
            while time.monotonic() < deadline:
                try:
                    if not self.sock.recv(1 << 16):
                        break
                except TimeoutError:
                    continue
        self.close()


# -- connections -----------------------------------------------------------------------------------------
def _tune(sock: socket.socket) -> None:
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def client_context(tls: MigrationTls) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=tls.ca_file)
    if tls.cert_file is not None:
        context.load_cert_chain(tls.cert_file, tls.key_file)
    return context


def connect(address: Address, tls: MigrationTls | None, timeout: float) -> Channel:
    """A channel to the destination, TLS-wrapped and verified if asked; MigrationError if it cannot be had."""
    peer = str(address)
    try:
        if address.kind == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            sock.settimeout(timeout)
            try:
                sock.connect(address.path)
            except BaseException:
                sock.close()
                raise
        else:
            sock = socket.create_connection((address.host, address.port), timeout=timeout)
        _tune(sock)
    except TimeoutError:
        raise MigrationError(f"cannot connect to {peer}: no answer within {timeout:g} s") from None
    except socket.gaierror as exc:
        raise MigrationError(f"cannot connect to {peer}: {exc.strerror}") from None
    except OSError as exc:
        raise MigrationError(f"cannot connect to {peer}: {exc.strerror or exc}") from None
    if tls is not None:
        try:
            context = client_context(tls)
            name = tls.server_name or (address.host if address.kind == "tcp" else None)
            if name is None:
                context.check_hostname = False
            sock = context.wrap_socket(sock, server_hostname=name)
        except (ssl.SSLError, OSError) as exc:
            sock.close()
            raise MigrationError(f"TLS with {peer} failed: {exc}") from None
    return Channel(sock, peer, timeout)


class Listener:
    """A listening socket for incoming migrations (TLS-wrapping what it accepts, if configured)."""

    def __init__(self, address: Address, context: ssl.SSLContext | None, timeout: float) -> None:
        self.address = address
        self.context = context
        self.timeout = timeout
        self._bound_path: str | None = None
        try:
            if address.kind == "unix":
                _clear_stale_socket(address.path)
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
                try:
                    self.sock.bind(address.path)
                except BaseException:
                    self.sock.close()
                    raise
                self._bound_path = address.path
            else:
                family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
                self.sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    self.sock.bind((address.host, address.port))
                except BaseException:
                    self.sock.close()
                    raise
            self.sock.listen(1)
        except OSError as exc:
            raise MigrationError(f"cannot listen on {address}: {exc.strerror or exc}") from None

    @property
    def bound(self) -> Address:
        """The address actually listened on (the port the kernel picked for port 0)."""
        if self.address.kind == "unix":
            return self.address
        host, port = self.sock.getsockname()[:2]
        return Address("tcp", host=self.address.host or host, port=port)

    def accept(self, wait: float) -> Channel | None:
        """A connection within ``wait`` seconds (TLS handshake done), or None."""
        try:
            readable, _, _ = select.select([self.sock], [], [], wait)
        except (OSError, ValueError):
            return None
        if not readable:
            return None
        try:
            sock, peer_address = self.sock.accept()
        except OSError:
            return None
        peer = f"unix:{self.address.path}" if self.address.kind == "unix" else \
            f"tcp:{peer_address[0]}:{peer_address[1]}"
        _tune(sock)
        if self.context is not None:
            sock.settimeout(self.timeout)
            try:
                sock = self.context.wrap_socket(sock, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                sock.close()
                raise MigrationError(f"TLS with {peer} failed: {exc}") from None
        return Channel(sock, peer, self.timeout)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
        if self._bound_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._bound_path)
            self._bound_path = None


def server_context(cert: str, key: str | None, ca: str | None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    if ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(ca)
    return context


def _clear_stale_socket(path: str) -> None:
    """Remove a socket nobody listens on at ``path``; refuse anything else that is there."""
    import stat

    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise MigrationError(f"cannot listen on unix:{path}: a file that is not a socket is there")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)
        return
    finally:
        probe.close()
    raise MigrationError(f"cannot listen on unix:{path}: another process listens there")
