"""One vsock stream connection between the guest and a host Unix socket, its credit accounting, and the
queue of packets without payload waiting for the guest's receive buffers."""

from __future__ import annotations

import collections
import enum
import socket
from dataclasses import dataclass, field

from kvmlet.devices.virtio.vsock_packet import U32, Op

# Bytes of guest data the device takes per connection before the host socket does: the credit it offers
# (buf_alloc). It is also the bound on what the device buffers for one connection (``to_socket``): data
# beyond it is a credit violation and resets the connection. With MAX_CONNECTIONS connections the device
# holds at most MAX_CONNECTIONS x BUF_ALLOC (256 MiB) of guest data, and only while host peers do not read.
BUF_ALLOC = 256 * 1024


class ConnState(enum.Enum):
    REQUESTED = "requested"        # host-initiated: REQUEST sent, waiting for the guest's RESPONSE
    ESTABLISHED = "established"


@dataclass(eq=False)
class Connection:
    """(local port, peer port) on the host side; ``sock`` is the host's Unix stream socket."""

    sock: socket.socket
    local_port: int                # the host's port (CID 2)
    peer_port: int                 # the guest's port
    state: ConnState
    peer_buf_alloc: int = 0        # the guest's receive buffer ...
    peer_fwd_cnt: int = 0          # ... and how much of what we sent it has consumed
    tx_cnt: int = 0                # bytes sent to the guest
    buf_alloc: int = BUF_ALLOC
    fwd_cnt: int = 0               # guest bytes the host socket has taken
    reported_fwd_cnt: int = 0      # the fwd_cnt the guest last heard
    to_socket: bytearray = field(default_factory=bytearray)  # guest bytes the socket has not taken yet
    guest_shut: int = 0            # SHUTDOWN flags received from the guest
    host_eof: bool = False         # the host socket will send no more (SHUTDOWN SEND sent)
    host_write_shut: bool = False  # shutdown(SHUT_WR) done on the host socket
    reading: bool = False          # the socket is watched for input
    writing: bool = False          # the socket is watched for output room
    blocked_on_credit: bool = False
    open: bool = True
    pending: dict[Op, int] = field(default_factory=dict)  # control packets waiting for a receive buffer: op -> flags
    queued: bool = False           # in the device's ReplyQueue (at most once)
    fd: int = -1

    def __post_init__(self) -> None:
        self.fd = self.sock.fileno()

    @property
    def key(self) -> tuple[int, int]:
        return self.local_port, self.peer_port

    def peer_free(self) -> int:
        """How many more bytes the guest can take (its buf_alloc minus what is in flight)."""
        in_flight = (self.tx_cnt - self.peer_fwd_cnt) & U32
        return max(0, self.peer_buf_alloc - in_flight)

    def credit_update_due(self) -> bool:
        """Whether the guest should hear of freed space now (a quarter of the buffer since it last did)."""
        return ((self.fwd_cnt - self.reported_fwd_cnt) & U32) >= self.buf_alloc // 4


@dataclass(eq=False)
class HostClient:
    """A host client that has connected to the listener and not yet sent its CONNECT line."""

    sock: socket.socket
    line: bytearray = field(default_factory=bytearray)   # the part of the line read so far
    fd: int = -1

    def __post_init__(self) -> None:
        self.fd = self.sock.fileno()


@dataclass(frozen=True)
class Outgoing:
    """A packet without payload waiting for a receive buffer."""

    local_port: int
    peer_port: int
    op: Op
    flags: int = 0


class ReplyQueue:
    """Packets without payload waiting for a receive buffer, in the order they were queued.

    Two kinds of entries share one FIFO. A live connection with control packets pending (REQUEST,
    RESPONSE, SHUTDOWN, CREDIT_UPDATE, CREDIT_REQUEST) is in it at most once and holds at most one packet
    of each op: a second CREDIT_UPDATE while one waits is the same packet, since the header's credit
    fields are filled in when it is written. So these entries are bounded by the connection table. A
    reset for a connection that does not exist (a reply to a packet for no connection, or the end of one)
    is an entry of its own: at most ``max_resets`` wait; beyond that :meth:`add_reset` drops it, so a
    driver that posts no receive buffers cannot make the device grow (issue 13).
    """

    def __init__(self, max_resets: int) -> None:
        self.max_resets = max_resets
        self.resets = 0                   # resets waiting
        self._items: collections.deque[Connection | Outgoing] = collections.deque()

    def __bool__(self) -> bool:
        return bool(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def add(self, conn: Connection, op: Op, flags: int = 0) -> bool:
        """Queue ``op`` for ``conn``; False if one was already waiting (merged into it)."""
        if op in conn.pending:
            conn.pending[op] |= flags
            return False
        conn.pending[op] = flags
        if not conn.queued:
            conn.queued = True
            self._items.append(conn)
        return True

    def add_reset(self, local_port: int, peer_port: int) -> bool:
        """Queue a RST from ``local_port`` to the guest's ``peer_port``; False if ``max_resets`` wait already."""
        if self.resets >= self.max_resets:
            return False
        self.resets += 1
        self._items.append(Outgoing(local_port, peer_port, Op.RST))
        return True

    def discard(self, conn: Connection) -> None:
        """Forget ``conn``'s packets (it is closing): a guest opening and closing connections while it posts no
        receive buffers leaves nothing behind."""
        conn.pending.clear()
        if conn.queued:
            conn.queued = False
            self._items.remove(conn)  # at most MAX_CONNECTIONS + max_resets entries to look through

    def pop(self) -> tuple[Outgoing, Connection | None] | None:
        """The next packet and its connection (None for a reset); None when nothing is left to send."""
        while self._items:
            item = self._items.popleft()
            if isinstance(item, Outgoing):
                self.resets -= 1
                return item, None
            item.queued = False
            if not item.pending:
                continue
            op = next(iter(item.pending))
            flags = item.pending.pop(op)
            if item.pending:  # the rest of its packets stay first in line
                item.queued = True
                self._items.appendleft(item)
            return Outgoing(item.local_port, item.peer_port, op, flags), item
        return None
