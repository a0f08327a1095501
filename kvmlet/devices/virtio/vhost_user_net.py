"""virtio-net with its data path in a vhost-user back end (a DPDK switch, Open vSwitch with DPDK, testpmd).

The device model, the ring hand-over and the control queue are :class:`~kvmlet.devices.virtio.vhost_device.
VhostNetDevice`'s (shared with the kernel's vhost-net); this is the vhost-user transport to it: one connection to
the back end's socket carries every ring (``SET_VRING_ENABLE`` says which pairs the driver uses), and guest RAM goes
with ``SET_MEM_TABLE`` as the memfds kvmlet maps shared (a VM whose memory is mapped privately, e.g. restored from
a snapshot file, is refused: the back end would see other pages).

Connection: kvmlet is the client of the back end's socket. The socket is watched on the event loop: when the back
end goes away (a restart) the link is reported down, and kvmlet reconnects every ``RECONNECT_INTERVAL`` seconds;
once connected again the whole set-up is replayed, each ring starting at the used index in guest memory, and the
link comes back up. A back end that sends anything kvmlet did not ask for, or a malformed reply, is disconnected
with a message naming what it sent (``stats.last_error``); the VM keeps running (the device reports link down; a
refusal while the driver starts the device sets DEVICE_NEEDS_RESET).

Snapshots and migration are refused by name: the back end owns the rings' positions and writes guest memory
without kvmlet's dirty log (``VHOST_F_LOG_ALL`` and ``SET_LOG_BASE`` are not implemented).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from kvmlet.devices.virtio.net import QUEUE_SIZE, VIRTIO_NET_F_STATUS
from kvmlet.devices.virtio.vhost_device import VhostNetDevice, VhostStats
from kvmlet.errors import ConfigError
from kvmlet.eventloop import EventLoop
from kvmlet.memory import GuestMemory
from kvmlet.vhost.common import VhostChannel, VhostError
from kvmlet.vhost.protocol import (
    VHOST_USER_F_PROTOCOL_FEATURES,
    ProtocolFeature,
    VhostUserConnection,
    VhostUserError,
)

log = logging.getLogger("kvmlet.vhost")

RECONNECT_INTERVAL = 0.5


@dataclass
class VhostUserStats(VhostStats):
    connects: int = 0
    disconnects: int = 0
    protocol_errors: int = 0
    reconnect_attempts: int = 0


class VhostUserNet(VhostNetDevice):
    """A virtio-net device whose rings a vhost-user back end serves."""

    backend_kind = "vhost-user"
    stats: VhostUserStats

    def __init__(self, socket_path: str, mac: bytes, memory: GuestMemory, watcher: EventLoop, *, pairs: int = 1,
                 mtu: int | None = None, offloads: bool = True, name: str = "virtio-net0",
                 queue_size: int = QUEUE_SIZE, connect_timeout: float = 5.0) -> None:
        if memory.private_file is not None:
            raise ConfigError(f"{name}: vhost-user needs guest memory the back end can share, but this VM's memory "
                              f"is mapped privately (copy on write) from {memory.private_file}, as after a restore "
                              "from a snapshot: its pages are not in the file the back end would map")
        super().__init__(mac, memory, pairs=pairs, mtu=mtu, offloads=offloads, name=name, queue_size=queue_size)
        self.socket_path = socket_path
        self.watcher = watcher
        self.stats = VhostUserStats()
        self._closed = False
        self._reconnect_pending = False
        self._conn: VhostUserConnection | None = None
        try:
            self._connect(connect_timeout)
        except VhostUserError as exc:
            raise ConfigError(f"{name}: {exc}") from None

    # -- the transport (VhostNetDevice) ----------------------------------------------------------------
    @property
    def link_up(self) -> bool:
        return self._conn is not None

    def _backend_ready(self) -> bool:
        return self._conn is not None

    def _channels(self) -> Sequence[VhostChannel]:
        assert self._conn is not None
        return [self._conn]

    def _channel(self, index: int) -> tuple[VhostChannel, int]:
        assert self._conn is not None
        return self._conn, index

    def _extra_backend_features(self) -> int:
        return self.backend_features & (1 << VHOST_USER_F_PROTOCOL_FEATURES)

    def _rings_started(self) -> None:
        assert self._conn is not None
        self._enable_pairs(self._conn)

    def _apply_active_pairs(self) -> None:
        if self._conn is not None:
            try:
                self._enable_pairs(self._conn)
            except VhostUserError as exc:
                self._drop(str(exc), protocol=True)

    def _start_failed(self, exc: VhostError) -> None:
        self._drop(str(exc), protocol=True)

    def _stop_failed(self, exc: VhostError) -> None:
        self._drop(f"stopping the rings: {exc}", protocol=True)

    def _refusal(self) -> str:
        return f"its rings are served by the vhost-user back end {self.socket_path}"

    # -- connection ------------------------------------------------------------------------------------
    def _connect(self, timeout: float) -> None:
        """Connect and do the per-connection part of the set-up (features, owner, queue count)."""
        conn = VhostUserConnection.connect(self.socket_path, timeout)
        try:
            features = conn.get_features()
            conn.negotiate_protocol(features)
            if self.pairs > 1:
                if not conn.protocol_features & (1 << ProtocolFeature.MQ):
                    raise VhostUserError(f"vhost-user back end {self.socket_path} has no multiqueue "
                                         f"(VHOST_USER_PROTOCOL_F_MQ); {self.pairs} queue pairs were asked for")
                queues = conn.get_queue_num()
                if queues < self.pairs:
                    raise VhostUserError(f"vhost-user back end {self.socket_path} serves {queues} queue pairs; "
                                         f"{self.pairs} were asked for (give it queues={self.pairs})")
            conn.set_owner()
        except BaseException:
            conn.close()
            raise
        self.backend_features = features
        self._conn = conn
        self.stats.connects += 1
        self.watcher.watch_read(conn.fileno(), self._socket_readable)

    def _drop(self, reason: str, *, protocol: bool = False) -> None:
        """Forget the connection (the back end went away or misbehaved); reconnect later."""
        conn = self._conn
        if conn is None:
            return
        self._conn = None
        self._started = set()
        self.watcher.unwatch_read(conn.fileno())
        self.watcher.call_soon(conn.close)     # after the loop has forgotten the descriptor
        self.stats.disconnects += 1
        self.stats.protocol_errors += int(protocol)
        self.stats.last_error = reason
        log.warning("%s: %s", self.name, reason)
        self.external_interrupt_status = 0
        if self.active and self.host is not None and self.has_feature(VIRTIO_NET_F_STATUS):
            self.host.signal_config_change()   # link down
        self._schedule_reconnect()

    def _schedule_reconnect(self) -> None:
        if not self._closed and not self._reconnect_pending:
            self._reconnect_pending = True
            self.watcher.call_later(RECONNECT_INTERVAL, self._try_reconnect)

    def _try_reconnect(self) -> None:
        transport_lock = getattr(self.host, "lock", None)   # serializes with a driver's reset / DRIVER_OK
        if transport_lock is None:
            self._reconnect()
            return
        with transport_lock:
            self._reconnect()

    def _reconnect(self) -> None:
        with self._lock:
            self._reconnect_pending = False
            if self._closed or self._conn is not None:
                return
            self.stats.reconnect_attempts += 1
            try:
                self._connect(0.0)
                if self.active:
                    self._start_rings(reconnect=True)
            except VhostError as exc:
                if self.link_up:   # connected, then refused the set-up
                    self._drop(str(exc), protocol=True)
                    return
                self._schedule_reconnect()
                return
            if self.active and self.host is not None and self.has_feature(VIRTIO_NET_F_STATUS):
                self.host.signal_config_change()   # link up again

    def _socket_readable(self) -> None:
        """Event-loop thread: the back end hung up, or sent something nobody asked for."""
        with self._lock:
            conn = self._conn
            if conn is None:
                return
            what = conn.unsolicited()
            if what == "":
                return
            if what is None:
                self._drop(f"vhost-user back end {self.socket_path} closed the connection; the link is down until "
                           "it is back")
            else:
                self._drop(f"vhost-user back end {self.socket_path} broke the protocol: it sent {what} without "
                           "being asked; disconnected", protocol=True)

    def _enable_pairs(self, conn: VhostUserConnection) -> None:
        if not conn.protocol_features and not self.backend_features & (1 << VHOST_USER_F_PROTOCOL_FEATURES):
            return   # without protocol features rings start enabled
        for index in range(2 * self.pairs):
            if self.queues[index].ready:
                conn.set_vring_enable(index, index // 2 < self.active_pairs)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conn, self._conn = self._conn, None
            if conn is not None:
                self.watcher.unwatch_read(conn.fileno())
                self.watcher.call_soon(conn.close)
