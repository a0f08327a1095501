"""virtio-vsock (virtio 1.2 section 5.10) with a Unix-socket host side, in the manner of Firecracker.

The guest has CID ``guest_cid``; the host is CID 2. Stream sockets only. Queues: rx (device to driver),
tx (driver to device), event (device to driver: VIRTIO_VSOCK_EVENT_TRANSPORT_RESET after a restore).

Snapshots save the guest's CID and no connection: a restored device has none, and tells the guest so with a
transport reset event (5.10.6.7) as soon as the guest has a buffer on the event queue, as Firecracker does;
the guest then resets its sockets and reads its CID again.

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

A hostile guest (issue 13; docs/security.md): a transmit packet's header and payload are copied out of
guest memory before its buffer goes on the used ring, and everything a guest can make the device hold has
a bound (the MAX_* constants, BUF_ALLOC), enforced and counted in :class:`VsockStats` when hit.

Locking: queue processing runs under the transport's lock; socket callbacks (event-loop thread) change
the connection table under the device's own lock and then ask the transport to run the rx queue.
"""

from __future__ import annotations

import collections
import errno
import functools
import logging
import os
import socket
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path

from kvmlet.devices.state import DeviceStateError, VirtioDeviceState, VsockState, expect_state
from kvmlet.devices.virtio.constants import DeviceType, feature_bit
from kvmlet.devices.virtio.device import VirtioDevice
from kvmlet.devices.virtio.queue import DescriptorChain
from kvmlet.devices.virtio.vsock_connection import Connection, ConnState, HostClient, ReplyQueue
from kvmlet.devices.virtio.vsock_host import VsockError as VsockError  # re-exported: the device's error
from kvmlet.devices.virtio.vsock_host import WarningLimiter, listen_unix, parse_connect
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
from kvmlet.eventloop import EventLoop

RX_QUEUE, TX_QUEUE, EVENT_QUEUE = 0, 1, 2
VIRTIO_VSOCK_F_STREAM = 0      # named in virtio 1.3; without it (1.2, Linux) streams are implied
QUEUE_SIZE = 256
CONNECT_TIMEOUT = 2.0            # seconds the guest has to answer a host-initiated REQUEST
FIRST_LOCAL_PORT = 1 << 30       # local ports for host-initiated connections
MAX_CONNECT_LINE = 64
# Bounds on what a guest (or host clients) can make the device hold (issue 13; docs/security.md); each is
# counted in VsockStats when hit. BUF_ALLOC (vsock_connection) bounds the bytes buffered per connection.
MAX_CONNECTIONS = 1024           # connections, both directions (Firecracker: 1023); a REQUEST beyond: RST
MAX_QUEUED_RESETS = 1024         # resets waiting for a receive buffer (one per connection); more are dropped
MAX_PENDING_HOST_CONNECTS = 64   # host-initiated connections waiting for the guest's RESPONSE; more: closed
MAX_HOST_CLIENTS = 64            # host clients that have not sent their CONNECT line yet; more: closed
WARNING_INTERVAL = 10.0          # seconds: at most one warning of each kind per device (the rest are counted)
ACCEPT_RETRY_DELAY = 0.5         # seconds the listener rests when the host is out of file descriptors
_OUT_OF_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_KNOWN_OPS = frozenset(int(op) for op in Op if op is not Op.INVALID)
EVENT = struct.Struct("<I")              # struct virtio_vsock_event: le32 id
VIRTIO_VSOCK_EVENT_TRANSPORT_RESET = 0
log = logging.getLogger("kvmlet.virtio")


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
    credit_violations: int = 0        # guest data beyond the credit (BUF_ALLOC): connection reset
    bad_rx_buffers: int = 0
    bad_event_buffers: int = 0        # event-queue chains too short for an event (given back unused)
    transport_resets: int = 0         # VIRTIO_VSOCK_EVENT_TRANSPORT_RESET events given to the guest
    connections_refused: int = 0      # guest REQUESTs refused: MAX_CONNECTIONS, or no descriptor on the host
    host_connects_refused: int = 0    # host clients closed: MAX_CONNECTIONS, MAX_PENDING_HOST_CONNECTS, ...
    accept_failures: int = 0          # the listener could not accept (it rests ACCEPT_RETRY_DELAY)
    replies_dropped: int = 0          # resets not queued: MAX_QUEUED_RESETS were waiting for receive buffers
    replies_coalesced: int = 0        # control packets merged into the same one already waiting
    reset_queue_peak: int = 0         # the most resets that ever waited at once (at most MAX_QUEUED_RESETS)
    warnings_suppressed: int = 0      # warnings not logged (one of each kind per WARNING_INTERVAL)
    last_error: str = ""


@dataclass
class _Tables:
    connections: dict[tuple[int, int], Connection] = field(default_factory=dict)  # (local, peer port)
    replies: ReplyQueue = field(default_factory=lambda: ReplyQueue(MAX_QUEUED_RESETS))
    readable: collections.deque[Connection] = field(default_factory=collections.deque)
    host_connects: int = 0            # connections in the table still REQUESTED (host-initiated)


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
        self._warnings = WarningLimiter(log, WARNING_INTERVAL)
        self._lock = threading.RLock()
        self._tables = _Tables()
        self._clients: set[HostClient] = set()
        self._next_port = FIRST_LOCAL_PORT
        self._closed = False
        self._transport_reset_pending = False   # a restore: the guest must hear of it on the event queue
        self._listener = listen_unix(self.uds_path)
        self.watcher.watch_read(self._listener.fileno(), self._accept)

    # -- configuration -----------------------------------------------------------------------------------
    def specific_features(self) -> int:
        return feature_bit(VIRTIO_VSOCK_F_STREAM)  # stream sockets only (no VIRTIO_VSOCK_F_SEQPACKET)

    def config_space(self) -> bytes:
        return self.guest_cid.to_bytes(8, "little")

    # -- lifecycle -----------------------------------------------------------------------------------------
    def on_reset(self) -> None:
        with self._lock:
            self._transport_reset_pending = False
            for conn in list(self._tables.connections.values()):
                conn.queued = False  # the whole reply queue goes: no need to take each one out
                self._close(conn)
            self._tables = _Tables()

    def close(self) -> None:
        with self._lock:
            self._closed = True
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

    @property
    def queued_replies(self) -> int:
        """Entries waiting for receive buffers (connections with control packets, and resets)."""
        return len(self._tables.replies)

    # -- queues -------------------------------------------------------------------------------------------
    def process_queue(self, index: int) -> None:
        with self._lock:
            if index == TX_QUEUE:
                self.drain_queue(self.queues[TX_QUEUE], self._handle_tx)
            if index in (RX_QUEUE, TX_QUEUE):
                self._fill_rx()
            elif index == EVENT_QUEUE:
                self._send_events()

    def _send_events(self) -> None:
        """Give the guest the transport reset event, if one is due, in its first usable event buffer."""
        queue = self.queues[EVENT_QUEUE]
        if not self._transport_reset_pending or not queue.ready:
            return
        try:
            while True:
                chain = queue.pop()
                if chain is None:
                    if queue.enable_notification():
                        continue
                    return         # the guest's notification of a new buffer comes back here
                if chain.readable.length or chain.writable.length < EVENT.size:
                    self.stats.bad_event_buffers += 1
                    queue.push(chain.head, 0)
                    continue
                chain.writable.write(EVENT.pack(VIRTIO_VSOCK_EVENT_TRANSPORT_RESET))
                queue.complete(chain, EVENT.size)
                self._transport_reset_pending = False
                self.stats.transport_resets += 1
                return
        finally:
            self._signal_if_needed(queue)

    # -- snapshots ------------------------------------------------------------------------------------------
    def save_state(self) -> VsockState:
        return VsockState(guest_cid=self.guest_cid)

    def check_state(self, state: VirtioDeviceState) -> None:
        saved = expect_state(state, VsockState, self.name)
        if not 3 <= saved.guest_cid < U32:
            raise DeviceStateError(f"{self.name}: the saved guest CID {saved.guest_cid} is not between 3 and "
                                   f"{U32 - 1}")

    def restore_state(self, state: VirtioDeviceState) -> None:
        """The guest keeps its CID; its connections are gone, which a transport reset event tells it (sent
        when the transport runs the event queue: at once after a restore, or at resume)."""
        self.check_state(state)
        assert isinstance(state, VsockState)
        self.guest_cid = state.guest_cid
        with self._lock:
            self._transport_reset_pending = self.active

    def _kick_rx(self) -> None:
        """From a socket callback (device lock not held): have the transport run the rx queue."""
        host = self.host
        if host is not None and self.active:
            host.process_queue(RX_QUEUE)

    # -- driver to device -----------------------------------------------------------------------------------
    def _handle_tx(self, chain: DescriptorChain) -> bool:
        readable = chain.readable
        carried = readable.length - HDR_SIZE
        hdr = VsockHeader.unpack(readable.read(0, HDR_SIZE)) if carried >= 0 else None
        payload = b""
        if hdr is not None and hdr.op == Op.RW and 0 < hdr.len <= min(carried, MAX_PAYLOAD):
            payload = readable.read(HDR_SIZE, hdr.len)
        # Header and payload are copies now: the buffer goes back to the driver, which may reuse it as soon
        # as it is used (virtio 1.2, 2.7.14), and nothing below looks at guest memory (issue 13).
        self.queues[TX_QUEUE].push(chain.head, 0)
        self.stats.tx_packets += 1
        if hdr is None:
            self._malformed(f"packet of {readable.length} bytes is shorter than the header")
            return True
        self._handle_packet(hdr, payload, carried)
        return True

    def _handle_packet(self, hdr: VsockHeader, payload: bytes, carried: int) -> None:
        """One packet from the driver (``payload``: a RW packet's data; ``carried``: bytes after the header)."""
        if hdr.src_cid != self.guest_cid:
            self._malformed(f"packet from CID {hdr.src_cid}, not the guest's {self.guest_cid}")
            return
        problem = ""
        if hdr.dst_cid != HOST_CID:
            problem = f"no route to CID {hdr.dst_cid}"
        elif hdr.type != TYPE_STREAM:
            problem = f"socket type {hdr.type} is not supported"
        elif hdr.len > min(carried, MAX_PAYLOAD):
            problem = f"{hdr.op_name} length {hdr.len} is more than the packet carries"
        elif hdr.op not in _KNOWN_OPS:
            problem = f"unknown op {hdr.op}"
        if problem:
            self._malformed(problem)
            self._reset_reply(hdr)
            return
        key = (hdr.dst_port, hdr.src_port)
        conn = self._tables.connections.get(key)
        if hdr.op == Op.REQUEST:
            self._guest_connect(hdr, conn)
            return
        if conn is None:
            self._reset_reply(hdr)
            return
        conn.peer_buf_alloc, conn.peer_fwd_cnt = hdr.buf_alloc, hdr.fwd_cnt
        if hdr.op == Op.RST:
            self._close(conn)
        elif hdr.op == Op.RESPONSE:
            self._guest_accepted(conn)
        elif hdr.op == Op.RW:
            self._guest_data(conn, payload)
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

    def _malformed(self, message: str) -> None:
        self.stats.malformed += 1
        self.stats.last_error = message

    def _reset_reply(self, hdr: VsockHeader) -> None:
        if hdr.op == Op.RST:
            return  # never answer a reset with a reset
        self._queue_reset(hdr.dst_port, hdr.src_port)

    def _queue_reset(self, local_port: int, peer_port: int) -> None:
        replies = self._tables.replies
        if not replies.add_reset(local_port, peer_port):
            self.stats.replies_dropped += 1   # MAX_QUEUED_RESETS wait: the driver posts no receive buffers
            return
        self.stats.resets_sent += 1
        if replies.resets > self.stats.reset_queue_peak:
            self.stats.reset_queue_peak = replies.resets

    def _warn(self, kind: str, message: str) -> None:
        if not self._warnings.warn(kind, message):
            self.stats.warnings_suppressed += 1

    def _refuse(self, hdr: VsockHeader, reason: str) -> None:
        """Refuse a guest REQUEST the host cannot take (RST, a counter, a rate-limited warning)."""
        self.stats.connections_refused += 1
        self.stats.last_error = f"{self.name}: guest connection to port {hdr.dst_port} refused: {reason}"
        self._warn("refused", self.stats.last_error)
        self._reset_reply(hdr)

    def _guest_connect(self, hdr: VsockHeader, existing: Connection | None) -> None:
        if existing is not None:
            self._reset_reply(hdr)
            return
        if len(self._tables.connections) >= MAX_CONNECTIONS:
            self._refuse(hdr, f"{MAX_CONNECTIONS} connections are open (MAX_CONNECTIONS)")
            return
        path = f"{self.uds_path}_{hdr.dst_port}"
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        except OSError as exc:  # EMFILE, ENFILE, ENOBUFS: the host is out of descriptors (or memory)
            self._refuse(hdr, f"no socket on the host: {exc.strerror or exc}")
            return
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
        self._tables.host_connects -= 1
        self.stats.host_connections += 1
        self._start_reading(conn)

    def _guest_data(self, conn: Connection, payload: bytes) -> None:
        length = len(payload)
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
        sent = 0
        if not conn.to_socket:
            try:
                sent = conn.sock.send(payload, socket.MSG_NOSIGNAL)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._close(conn, reset=True)
                return
        if sent < length:
            conn.to_socket += memoryview(payload)[sent:]  # within the credit: at most BUF_ALLOC bytes
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
        if not conn.open:
            return  # closed: its RST (if any) is queued on its own
        if not self._tables.replies.add(conn, op, flags):
            self.stats.replies_coalesced += 1

    def _fill_rx(self) -> None:
        if not self.queues or not self.queues[RX_QUEUE].ready:
            return
        queue = self.queues[RX_QUEUE]
        tables = self._tables
        try:
            while tables.replies or tables.readable:
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
                queue.complete(chain, used)
                self.stats.rx_packets += 1
        finally:
            self._signal_if_needed(queue)

    def _next_packet(self, chain: DescriptorChain) -> int | None:
        """Write the next control packet or data into ``chain``: bytes used, or None if nothing went."""
        tables = self._tables
        if tables.replies:
            entry = tables.replies.pop()
            if entry is None:
                return None
            out, owner = entry
            chain.writable.write(self._header(out.local_port, out.peer_port, out.op, 0, out.flags, owner))
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
        self._tables.replies.discard(conn)  # its control packets: superseded by the RST, or moot
        if reset:
            self._queue_reset(conn.local_port, conn.peer_port)
        if conn.state is ConnState.REQUESTED:
            self._tables.host_connects -= 1
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
            while not self._closed:
                try:
                    sock, _ = self._listener.accept()
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:
                    self._accept_failed(exc)
                    break
                if len(self._clients) >= MAX_HOST_CLIENTS:
                    self._refuse_host(f"{MAX_HOST_CLIENTS} host clients have not sent CONNECT yet (MAX_HOST_CLIENTS)")
                    sock.close()  # never watched: closed at once
                    continue
                sock.setblocking(False)
                client = HostClient(sock)
                self._clients.add(client)
                self.watcher.watch_read(client.fd, functools.partial(self._client_readable, client))

    def _accept_failed(self, exc: OSError) -> None:
        """Out of descriptors, the client stays in the backlog and the listener would be readable at once
        again (a busy loop): it rests ACCEPT_RETRY_DELAY."""
        self.stats.accept_failures += 1
        self.stats.last_error = f"{self.name}: cannot accept on {self.uds_path}: {exc.strerror or exc}"
        if exc.errno not in _OUT_OF_DESCRIPTORS:
            return
        self._warn("accept", self.stats.last_error)
        self.watcher.unwatch_read(self._listener.fileno())
        self.watcher.call_later(ACCEPT_RETRY_DELAY, self._resume_accepting)

    def _resume_accepting(self) -> None:
        with self._lock:
            if not self._closed:
                self.watcher.watch_read(self._listener.fileno(), self._accept)

    def _refuse_host(self, reason: str) -> None:
        self.stats.host_connects_refused += 1
        self.stats.last_error = f"{self.name}: host connection refused: {reason}"
        self._warn("host-refused", self.stats.last_error)

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
            port = parse_connect(bytes(client.line) + peek[:end])
            self._clients.discard(client)
            self.watcher.unwatch_read(client.fd)
            full = len(self._tables.connections) >= MAX_CONNECTIONS
            if port is None or full or self._tables.host_connects >= MAX_PENDING_HOST_CONNECTS:
                if port is not None:
                    self._refuse_host(f"{MAX_CONNECTIONS} connections are open (MAX_CONNECTIONS)" if full else
                                      f"{MAX_PENDING_HOST_CONNECTS} wait for the guest (MAX_PENDING_HOST_CONNECTS)")
                self.watcher.call_soon(client.sock.close)
                return
            conn = Connection(client.sock, local_port=self._allocate_port(port), peer_port=port,
                              state=ConnState.REQUESTED)
            self._tables.connections[conn.key] = conn
            self._tables.host_connects += 1
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

