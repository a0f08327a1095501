"""virtio-vsock (virtio 1.2 section 5.10) with a Unix-socket host side, in the manner of Firecracker.

The guest has CID ``guest_cid``; the host is CID 2. Stream sockets only. Queues: rx (device to driver),
tx (driver to device), event (kept, unused: there is no transport reset to report).

Host side, all on Unix stream sockets:

* host to guest: kvmlet listens on ``uds_path``. A client connects and writes ``CONNECT <port>\\n``; the
  device sends the guest a REQUEST from (2, local port) to (guest_cid, port) and, once the guest answers
  RESPONSE, writes ``OK <local port>\\n`` to the client; from then on bytes flow both ways. A RST from the
  guest (nobody listening) or no answer within ``CONNECT_TIMEOUT`` closes the client.
* guest to host: a guest connection to (2, P) is connected to the Unix socket ``<uds_path>_<P>``; if
  nothing listens there the guest gets a RST.

Flow control (5.10.6.3): every packet carries the sender's ``buf_alloc`` and ``fwd_cnt``. The device
offers ``BUF_ALLOC`` bytes per connection for guest data the host socket has not taken yet (it buffers what
the socket refuses and counts ``fwd_cnt`` as the socket takes it), sends CREDIT_UPDATE when it has
freed a quarter of that, and sends the guest no more than the guest's advertised free space.

Packets the device cannot accept (short header, unknown op or type, length beyond the buffer, data for
no connection, credit overrun) are counted and answered with RST; none of them stops the device.

Locking: queue processing runs under the transport's lock; socket callbacks (event-loop thread) change
the connection table under the device's own lock and then ask the transport to run the rx queue.
"""

from __future__ import annotations

import collections
import errno
import functools
import os
import socket
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path

from kvmlet.devices.virtio.constants import DeviceType, feature_bit
from kvmlet.devices.virtio.device import VirtioDevice
from kvmlet.devices.virtio.queue import DescriptorChain
from kvmlet.devices.virtio.vsock_connection import Connection, ConnState, HostClient, Outgoing
from kvmlet.devices.virtio.vsock_packet import (
    HDR_SIZE,
    HOST_CID,
    MAX_PAYLOAD,
    SHUTDOWN_RCV,
    SHUTDOWN_SEND,
    TYPE_STREAM,
    U32,
    Op,
    VsockHeader,
)
from kvmlet.errors import KvmletError
from kvmlet.eventloop import EventLoop

RX_QUEUE, TX_QUEUE, EVENT_QUEUE = 0, 1, 2
VIRTIO_VSOCK_F_STREAM = 0      # named in virtio 1.3; without it (1.2, Linux) streams are implied
QUEUE_SIZE = 256
CONNECT_TIMEOUT = 2.0            # seconds the guest has to answer a host-initiated REQUEST
FIRST_LOCAL_PORT = 1 << 30       # local ports for host-initiated connections
MAX_CONNECT_LINE = 64
MAX_CONNECTIONS = 1024
_KNOWN_OPS = frozenset(int(op) for op in Op if op is not Op.INVALID)


class VsockError(KvmletError, RuntimeError):
    """The host side cannot be set up (socket path problems)."""


@dataclass
class VsockStats:
    tx_packets: int = 0               # driver to device
    rx_packets: int = 0               # device to driver
    tx_bytes: int = 0                 # payload forwarded to host sockets
    rx_bytes: int = 0                 # payload given to the guest
    malformed: int = 0
    resets_sent: int = 0
    guest_connections: int = 0
    host_connections: int = 0
    connect_failures: int = 0
    credit_violations: int = 0
    bad_rx_buffers: int = 0
    last_error: str = ""


@dataclass
class _Tables:
    connections: dict[tuple[int, int], Connection] = field(default_factory=dict)  # (local, peer port)
    outgoing: collections.deque[Outgoing] = field(default_factory=collections.deque)
    readable: collections.deque[Connection] = field(default_factory=collections.deque)


class VirtioVsock(VirtioDevice):
    """The socket device, host side on Unix sockets."""

    device_type = DeviceType.VSOCK

    def __init__(self, guest_cid: int, uds_path: str | Path, watcher: EventLoop, *,
                 name: str = "virtio-vsock") -> None:
        super().__init__([QUEUE_SIZE] * 3, name)
        if not 3 <= guest_cid < U32:
            raise VsockError(f"guest CID {guest_cid} must be between 3 and {U32 - 1}")
        self.guest_cid = guest_cid
        self.uds_path = str(uds_path)
        self.watcher = watcher
        self.stats = VsockStats()
        self._lock = threading.RLock()
        self._tables = _Tables()
        self._clients: set[HostClient] = set()
        self._next_port = FIRST_LOCAL_PORT
        self._listener = _listen(self.uds_path)
        self.watcher.watch_read(self._listener.fileno(), self._accept)

    # -- configuration -----------------------------------------------------------------------------------
    def specific_features(self) -> int:
        return feature_bit(VIRTIO_VSOCK_F_STREAM)  # stream sockets only (no VIRTIO_VSOCK_F_SEQPACKET)

    def config_space(self) -> bytes:
        return self.guest_cid.to_bytes(8, "little")

    # -- lifecycle -----------------------------------------------------------------------------------------
    def on_reset(self) -> None:
        with self._lock:
            for conn in list(self._tables.connections.values()):
                self._close(conn)
            self._tables = _Tables()

    def close(self) -> None:
        with self._lock:
            self.on_reset()
            for client in list(self._clients):
                self._drop_client(client)
            if self._listener.fileno() >= 0:
                self.watcher.unwatch_read(self._listener.fileno())
                self.watcher.call_soon(self._listener.close)
                try:
                    os.unlink(self.uds_path)
                except OSError:
                    pass

    @property
    def connections(self) -> dict[tuple[int, int], Connection]:
        return self._tables.connections

    # -- queues -------------------------------------------------------------------------------------------
    def process_queue(self, index: int) -> None:
        with self._lock:
            if index == TX_QUEUE:
                self.drain_queue(self.queues[TX_QUEUE], self._handle_tx)
            if index in (RX_QUEUE, TX_QUEUE):
                self._fill_rx()

    def _kick_rx(self) -> None:
        """From a socket callback (device lock not held): have the transport run the rx queue."""
        host = self.host
        if host is not None and self.active:
            host.process_queue(RX_QUEUE)

    # -- driver to device -----------------------------------------------------------------------------------
    def _handle_tx(self, chain: DescriptorChain) -> bool:
        self.queues[TX_QUEUE].push(chain.head, 0)
        self.stats.tx_packets += 1
        if chain.readable.length < HDR_SIZE:
            self._malformed(f"packet of {chain.readable.length} bytes is shorter than the header")
            return True
        hdr = VsockHeader.unpack(chain.readable.read(0, HDR_SIZE))
        if hdr.src_cid != self.guest_cid:
            self._malformed(f"packet from CID {hdr.src_cid}, not the guest's {self.guest_cid}")
            return True
        problem = ""
        if hdr.dst_cid != HOST_CID:
            problem = f"no route to CID {hdr.dst_cid}"
        elif hdr.type != TYPE_STREAM:
            problem = f"socket type {hdr.type} is not supported"
        elif hdr.len > min(chain.readable.length - HDR_SIZE, MAX_PAYLOAD):
            problem = f"{hdr.op_name} length {hdr.len} is more than the packet carries"
        elif hdr.op not in _KNOWN_OPS:
            problem = f"unknown op {hdr.op}"
        if problem:
            self._malformed(problem)
            self._reset_reply(hdr)
            return True
        key = (hdr.dst_port, hdr.src_port)
        conn = self._tables.connections.get(key)
        if hdr.op == Op.REQUEST:
            self._guest_connect(hdr, conn)
            return True
        if conn is None:
            self._reset_reply(hdr)
            return True
        conn.peer_buf_alloc, conn.peer_fwd_cnt = hdr.buf_alloc, hdr.fwd_cnt
        if hdr.op == Op.RST:
            self._close(conn)
        elif hdr.op == Op.RESPONSE:
            self._guest_accepted(conn)
        elif hdr.op == Op.RW:
            self._guest_data(conn, chain, hdr.len)
        elif hdr.op == Op.SHUTDOWN:
            conn.guest_shut |= hdr.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND)
            if conn.guest_shut & SHUTDOWN_RCV:
                self._stop_reading(conn)
            self._flushed(conn)
        elif hdr.op == Op.CREDIT_REQUEST:
            self._send(conn, Op.CREDIT_UPDATE)
        if conn.open and conn.blocked_on_credit and conn.peer_free() > 0:
            conn.blocked_on_credit = False
            self._tables.readable.append(conn)
        return True

    def _malformed(self, message: str) -> None:
        self.stats.malformed += 1
        self.stats.last_error = message

    def _reset_reply(self, hdr: VsockHeader) -> None:
        if hdr.op == Op.RST:
            return  # never answer a reset with a reset
        self.stats.resets_sent += 1
        self._tables.outgoing.append(Outgoing(hdr.dst_port, hdr.src_port, Op.RST))

    def _guest_connect(self, hdr: VsockHeader, existing: Connection | None) -> None:
        if existing is not None or len(self._tables.connections) >= MAX_CONNECTIONS:
            self._reset_reply(hdr)
            return
        path = f"{self.uds_path}_{hdr.dst_port}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            sock.connect(path)
        except OSError as exc:
            sock.close()
            self.stats.connect_failures += 1
            self.stats.last_error = f"guest connection to port {hdr.dst_port}: {path}: {exc.strerror or exc}"
            self._reset_reply(hdr)
            return
        conn = Connection(sock, local_port=hdr.dst_port, peer_port=hdr.src_port, state=ConnState.ESTABLISHED,
                          peer_buf_alloc=hdr.buf_alloc, peer_fwd_cnt=hdr.fwd_cnt)
        self._tables.connections[conn.key] = conn
        self.stats.guest_connections += 1
        self._send(conn, Op.RESPONSE)
        self._start_reading(conn)

    def _guest_accepted(self, conn: Connection) -> None:
        if conn.state is not ConnState.REQUESTED:
            self._close(conn, reset=True)
            return
        try:
            sent = conn.sock.send(f"OK {conn.local_port}\n".encode(), socket.MSG_NOSIGNAL)
        except OSError:
            sent = 0
        if sent == 0:
            self._close(conn, reset=True)
            return
        conn.state = ConnState.ESTABLISHED
        self.stats.host_connections += 1
        self._start_reading(conn)

    def _guest_data(self, conn: Connection, chain: DescriptorChain, length: int) -> None:
        if conn.state is not ConnState.ESTABLISHED or conn.guest_shut & SHUTDOWN_SEND:
            self._malformed(f"data on connection {conn.key} in state {conn.state.value}")
            self._close(conn, reset=True)
            return
        if len(conn.to_socket) + length > conn.buf_alloc:
            self.stats.credit_violations += 1
            self._malformed(f"connection {conn.key}: {length} bytes overrun the credit")
            self._close(conn, reset=True)
            return
        if not length:
            return
        payload = chain.readable.slice(HDR_SIZE, length)
        sent = 0
        if not conn.to_socket:
            views = payload.views()
            try:
                sent = conn.sock.sendmsg(views, [], socket.MSG_NOSIGNAL)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._close(conn, reset=True)
                return
            finally:
                views.clear()
        if sent < length:
            conn.to_socket += payload.read(sent)
            self._watch_write(conn)
        self._forwarded(conn, sent)

    def _forwarded(self, conn: Connection, count: int) -> None:
        """``count`` more bytes reached the host socket: credit them back to the guest when due."""
        conn.fwd_cnt = (conn.fwd_cnt + count) & U32
        self.stats.tx_bytes += count
        if conn.credit_update_due():
            self._send(conn, Op.CREDIT_UPDATE)

    def _flushed(self, conn: Connection) -> None:
        """Apply the guest's shutdowns once everything it sent has reached the socket."""
        if conn.to_socket or not conn.open:
            return
        if conn.guest_shut & SHUTDOWN_SEND and not conn.host_write_shut:
            conn.host_write_shut = True
            try:
                conn.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        both = conn.guest_shut == SHUTDOWN_RCV | SHUTDOWN_SEND
        if both or (conn.guest_shut & SHUTDOWN_SEND and conn.host_eof):
            self._close(conn, reset=True)  # both directions are done: RST ends it (5.10.6.6)

    # -- device to driver -----------------------------------------------------------------------------------
    def _send(self, conn: Connection, op: Op, flags: int = 0) -> None:
        self._tables.outgoing.append(Outgoing(conn.local_port, conn.peer_port, op, flags))

    def _fill_rx(self) -> None:
        if not self.queues or not self.queues[RX_QUEUE].ready:
            return
        queue = self.queues[RX_QUEUE]
        tables = self._tables
        try:
            while tables.outgoing or tables.readable:
                chain = queue.pop()
                if chain is None:
                    if queue.enable_notification():
                        continue
                    break
                if chain.readable.length or chain.writable.length < HDR_SIZE:
                    self.stats.bad_rx_buffers += 1
                    queue.push(chain.head, 0)
                    continue
                used = self._next_packet(chain)
                if used is None:
                    queue.undo_pop()
                    continue
                queue.push(chain.head, used)
                self.stats.rx_packets += 1
        finally:
            self._signal_if_needed(queue)

    def _next_packet(self, chain: DescriptorChain) -> int | None:
        """Write the next control packet or data into ``chain``: bytes used, or None if nothing went."""
        tables = self._tables
        if tables.outgoing:
            out = tables.outgoing.popleft()
            conn = tables.connections.get((out.local_port, out.peer_port))
            chain.writable.write(self._header(out.local_port, out.peer_port, out.op, 0, out.flags, conn))
            return HDR_SIZE
        conn = tables.readable.popleft()
        if not conn.open or conn.state is not ConnState.ESTABLISHED:
            return None
        room = min(conn.peer_free(), chain.writable.length - HDR_SIZE, MAX_PAYLOAD)
        if room <= 0:
            conn.blocked_on_credit = True
            self._send(conn, Op.CREDIT_REQUEST)
            return None
        views = chain.writable.slice(HDR_SIZE, room).views()
        try:
            count = conn.sock.recvmsg_into(views)[0]
        except BlockingIOError:
            self._start_reading(conn)
            return None
        except OSError:
            self._close(conn, reset=True)
            return None
        finally:
            views.clear()
        if count == 0:
            conn.host_eof = True
            self._send(conn, Op.SHUTDOWN, SHUTDOWN_SEND)
            self._flushed(conn)
            return None
        conn.tx_cnt = (conn.tx_cnt + count) & U32
        self.stats.rx_bytes += count
        tables.readable.append(conn)  # more may be waiting: EAGAIN ends it
        chain.writable.write(self._header(conn.local_port, conn.peer_port, Op.RW, count, 0, conn))
        return HDR_SIZE + count

    def _header(self, local_port: int, peer_port: int, op: Op, length: int, flags: int,
                conn: Connection | None) -> bytes:
        buf_alloc, fwd_cnt = (conn.buf_alloc, conn.fwd_cnt) if conn is not None else (0, 0)
        if conn is not None:
            conn.reported_fwd_cnt = fwd_cnt
        return VsockHeader(HOST_CID, self.guest_cid, local_port, peer_port, length, TYPE_STREAM, op, flags,
                           buf_alloc, fwd_cnt).pack()

    # -- host sockets ---------------------------------------------------------------------------------------
    def _start_reading(self, conn: Connection) -> None:
        if conn.open and not conn.reading and not conn.host_eof and not conn.guest_shut & SHUTDOWN_RCV:
            conn.reading = True
            self.watcher.watch_read(conn.fd, lambda: self._socket_readable(conn))

    def _stop_reading(self, conn: Connection) -> None:
        if conn.reading:
            conn.reading = False
            self.watcher.unwatch_read(conn.fd)
        if conn in self._tables.readable:
            self._tables.readable.remove(conn)

    def _socket_readable(self, conn: Connection) -> None:
        with self._lock:
            if conn.reading:
                conn.reading = False
                self.watcher.unwatch_read(conn.fd)
            if not conn.open or self._tables.connections.get(conn.key) is not conn:
                return
            if conn not in self._tables.readable:
                self._tables.readable.append(conn)
        self._kick_rx()

    def _watch_write(self, conn: Connection) -> None:
        if not conn.writing:
            conn.writing = True
            self.watcher.watch_write(conn.fd, lambda: self._socket_writable(conn))

    def _socket_writable(self, conn: Connection) -> None:
        with self._lock:
            if not conn.open:
                self.watcher.unwatch_write(conn.fd)
                return
            try:
                sent = conn.sock.send(conn.to_socket, socket.MSG_NOSIGNAL)
            except BlockingIOError:
                return
            except OSError:
                self._close(conn, reset=True)
                sent = 0
            if conn.open:
                del conn.to_socket[:sent]
                self._forwarded(conn, sent)
                if not conn.to_socket:
                    conn.writing = False
                    self.watcher.unwatch_write(conn.fd)
                    self._flushed(conn)
        self._kick_rx()

    def _close(self, conn: Connection, *, reset: bool = False) -> None:
        if not conn.open:
            return
        if reset:
            self.stats.resets_sent += 1
            self._send(conn, Op.RST)
        self._stop_reading(conn)
        if conn.writing:
            conn.writing = False
            self.watcher.unwatch_write(conn.fd)
        conn.open = False
        self.watcher.call_soon(conn.sock.close)
        if self._tables.connections.get(conn.key) is conn:
            del self._tables.connections[conn.key]

    # -- host-initiated connections -------------------------------------------------------------------------
    def _accept(self) -> None:
        with self._lock:
            while True:
                try:
                    sock, _ = self._listener.accept()
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:
                    self.stats.last_error = f"accept on {self.uds_path}: {exc.strerror or exc}"
                    break
                sock.setblocking(False)
                client = HostClient(sock)
                self._clients.add(client)
                self.watcher.watch_read(client.fd, functools.partial(self._client_readable, client))

    def _drop_client(self, client: HostClient) -> None:
        self._clients.discard(client)
        self.watcher.unwatch_read(client.fd)
        self.watcher.call_soon(client.sock.close)

    def _client_readable(self, client: HostClient) -> None:
        """Read the ``CONNECT <port>`` line (and nothing after it) from a new host client."""
        with self._lock:
            if client not in self._clients:
                return
            try:
                peek = client.sock.recv(MAX_CONNECT_LINE - len(client.line), socket.MSG_PEEK)
            except BlockingIOError:
                return
            except OSError:
                peek = b""
            end = peek.find(b"\n")
            if end < 0:
                if peek:  # all of it belongs to the line: take it (nothing is left to wake us up again)
                    client.line += client.sock.recv(len(peek))
                if not peek or len(client.line) >= MAX_CONNECT_LINE:
                    self._drop_client(client)  # closed, or not a CONNECT line
                return
            client.sock.recv(end + 1)  # the line and nothing after it: the rest is for the guest
            port = _parse_connect(bytes(client.line) + peek[:end])
            self._clients.discard(client)
            self.watcher.unwatch_read(client.fd)
            if port is None or len(self._tables.connections) >= MAX_CONNECTIONS:
                self.watcher.call_soon(client.sock.close)
                return
            conn = Connection(client.sock, local_port=self._allocate_port(port), peer_port=port,
                              state=ConnState.REQUESTED)
            self._tables.connections[conn.key] = conn
            self._send(conn, Op.REQUEST)
            self.watcher.call_later(CONNECT_TIMEOUT, lambda: self._connect_timeout(conn))
        self._kick_rx()

    def _allocate_port(self, peer_port: int) -> int:
        while True:
            port = self._next_port
            self._next_port = FIRST_LOCAL_PORT if self._next_port >= U32 - 1 else self._next_port + 1
            if (port, peer_port) not in self._tables.connections:
                return port

    def _connect_timeout(self, conn: Connection) -> None:
        with self._lock:
            if conn.open and conn.state is ConnState.REQUESTED:
                self.stats.connect_failures += 1
                self.stats.last_error = f"the guest did not answer a connection to port {conn.peer_port}"
                self._close(conn, reset=True)
        self._kick_rx()


def _parse_connect(line: bytes) -> int | None:
    parts = line.strip().split()
    if len(parts) != 2 or parts[0] != b"CONNECT" or not parts[1].isdigit():
        return None
    port = int(parts[1])
    return port if port < U32 else None


def _listen(path: str) -> socket.socket:
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
        listener.listen(64)
        listener.setblocking(False)
    except OSError as exc:
        listener.close()
        if exc.errno == errno.ENAMETOOLONG or (exc.errno == errno.EINVAL and len(path) > 100):
            raise VsockError(f"vsock socket path {path} is too long for a Unix socket") from None
        raise VsockError(f"cannot listen on {path}: {exc.strerror or exc}") from None
    return listener
