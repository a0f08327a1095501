"""One vsock stream connection between the guest and a host Unix socket, and its credit accounting."""

from __future__ import annotations

import enum
import socket
from dataclasses import dataclass, field

from kvmlet.devices.virtio.vsock_packet import U32, Op

BUF_ALLOC = 256 * 1024     # bytes of guest data the device takes per connection before the host socket does


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
