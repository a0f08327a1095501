"""virtio-net with its data path in a vhost-user back end (a DPDK switch, Open vSwitch with DPDK, testpmd).

kvmlet keeps the device model: the transport, feature negotiation, the configuration space (MAC, link status,
queue pairs, MTU) and the control queue (``VIRTIO_NET_CTRL_MQ``: which pairs are enabled). The receive and
transmit rings, and the guest memory they point into, are handed to the back end:

* guest RAM: ``SET_MEM_TABLE`` with one region per memslot, each the memfd kvmlet maps shared (a VM whose memory is
  mapped privately, e.g. restored from a snapshot file, is refused: the back end would see other pages);
* kicks: each data queue's eventfd is the one KVM's ioeventfd signals on QueueNotify (the device manager does not
  watch it), passed with ``SET_VRING_KICK``: a guest notification goes from KVM straight to the back end;
* interrupts: the transport's irqfd eventfd, passed with ``SET_VRING_CALL``: the back end interrupts the guest
  through KVM directly. As virtio-mmio has one interrupt line and an InterruptStatus register the back end cannot
  set, the device reports "used buffer" in InterruptStatus for as long as it runs (``external_interrupt_status``),
  as other VMMs do for vhost on virtio-mmio; a driver then checks its rings on each interrupt;
* kvmlet does no work per frame.

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
import struct
import threading
from dataclasses import dataclass

from kvmlet.devices.state import VirtioDeviceState
from kvmlet.devices.virtio.constants import COMMON_FEATURES, DeviceType, InterruptReason, feature_bit
from kvmlet.devices.virtio.device import ActivationError, VirtioDevice
from kvmlet.devices.virtio.net import (
    CONTROL_QUEUE_SIZE,
    OFFLOAD_FEATURES,
    QUEUE_SIZE,
    VIRTIO_NET_CTRL_MQ,
    VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
    VIRTIO_NET_ERR,
    VIRTIO_NET_F_CTRL_VQ,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_MTU,
    VIRTIO_NET_F_STATUS,
    VIRTIO_NET_OK,
    control_queue_index,
    features_consistent,
    net_config_space,
)
from kvmlet.devices.virtio.queue import DescriptorChain, Virtqueue
from kvmlet.errors import ConfigError, UnsupportedError
from kvmlet.eventloop import EventLoop
from kvmlet.memory import GuestMemory
from kvmlet.vhost.protocol import (
    VHOST_USER_F_PROTOCOL_FEATURES,
    MemoryRegionSpec,
    ProtocolFeature,
    VhostUserConnection,
    VhostUserError,
    VringAddresses,
)

log = logging.getLogger("kvmlet.vhost")

RECONNECT_INTERVAL = 0.5
_KVMLET_ONLY = feature_bit(VIRTIO_NET_F_MAC) | feature_bit(VIRTIO_NET_F_STATUS) | feature_bit(VIRTIO_NET_F_CTRL_VQ)
# Data-path features: offered only where the back end has them.
_DATA_FEATURES = COMMON_FEATURES | OFFLOAD_FEATURES | feature_bit(VIRTIO_NET_F_MRG_RXBUF)


@dataclass
class VhostUserStats:
    connects: int = 0
    disconnects: int = 0
    protocol_errors: int = 0
    reconnect_attempts: int = 0
    rings_started: int = 0
    control_commands: int = 0
    control_errors: int = 0
    last_error: str = ""


class VhostUserNet(VirtioDevice):
    """A virtio-net device whose rings a vhost-user back end serves."""

    device_type = DeviceType.NET

    def __init__(self, socket_path: str, mac: bytes, memory: GuestMemory, watcher: EventLoop, *, pairs: int = 1,
                 mtu: int | None = None, offloads: bool = True, name: str = "virtio-net0",
                 queue_size: int = QUEUE_SIZE, connect_timeout: float = 5.0) -> None:
        if len(mac) != 6:
            raise ValueError(f"a MAC address has 6 bytes, not {len(mac)}")
        if memory.private_file is not None:
            raise ConfigError(f"{name}: vhost-user needs guest memory the back end can share, but this VM's memory "
                              f"is mapped privately (copy on write) from {memory.private_file}, as after a restore "
                              "from a snapshot: its pages are not in the file the back end would map")
        sizes = [queue_size] * (2 * pairs) + ([CONTROL_QUEUE_SIZE] if pairs > 1 else [])
        super().__init__(sizes, name)
        self.socket_path = socket_path
        self.mac = bytes(mac)
        self.memory = memory
        self.watcher = watcher
        self.pairs = pairs
        self.mtu = mtu
        self.offloads = offloads
        self.stats = VhostUserStats()
        self.active_pairs = 1
        self.control_index: int | None = None
        self.external_queues = frozenset(range(2 * pairs))   # the device manager leaves their eventfds alone
        self.external_interrupt_status = 0
        self._lock = threading.RLock()
        self._closed = False
        self._reconnect_pending = False
        self._conn: VhostUserConnection | None = None
        self._started: set[int] = set()     # rings the back end serves now
        self.backend_features = 0
        try:
            self._connect(connect_timeout)
        except VhostUserError as exc:
            raise ConfigError(f"{name}: {exc}") from None

    # -- connection ------------------------------------------------------------------------------------
    @property
    def link_up(self) -> bool:
        return self._conn is not None

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
            except VhostUserError as exc:
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

    # -- negotiation and configuration ---------------------------------------------------------------
    def device_features(self) -> int:
        own = feature_bit(VIRTIO_NET_F_MAC) | feature_bit(VIRTIO_NET_F_STATUS)
        if self.mtu is not None:
            own |= feature_bit(VIRTIO_NET_F_MTU)
        if self.pairs > 1:
            own |= feature_bit(VIRTIO_NET_F_CTRL_VQ) | feature_bit(VIRTIO_NET_F_MQ)
        data = _DATA_FEATURES if self.offloads else _DATA_FEATURES & ~OFFLOAD_FEATURES
        return own | (data & self.backend_features)

    def specific_features(self) -> int:
        return self.device_features() & ~COMMON_FEATURES

    def accept_features(self, features: int) -> bool:
        return features_consistent(features)

    def config_space(self) -> bytes:
        return net_config_space(self.mac, self.link_up, self.pairs, self.mtu)

    # -- lifecycle -------------------------------------------------------------------------------------
    def on_activate(self) -> None:
        self.control_index = control_queue_index(self.features, self.pairs)
        self.active_pairs = 1
        with self._lock:
            if self._conn is None:
                return   # the link is down; the rings start when the back end is back
            try:
                self._start_rings(reconnect=False)
            except VhostUserError as exc:
                self._drop(str(exc), protocol=True)
                raise ActivationError(f"the vhost-user back end refused the set-up: {exc}") from None

    def _call_fd(self) -> int | None:
        irq = getattr(self.host, "irq", None)
        fd = getattr(irq, "fd", None)
        return fd if isinstance(fd, int) and fd >= 0 else None

    def _start_rings(self, *, reconnect: bool) -> None:
        """Features, memory table and every live data ring to the back end (lock held, connected)."""
        conn = self._conn
        assert conn is not None
        host = self.host
        kicks: list[int] = list(getattr(host, "queue_eventfds", []))
        if len(kicks) < 2 * self.pairs:
            raise VhostUserError("vhost-user needs a transport with one notification eventfd per queue")
        call = self._call_fd()
        # what the back end has a part in (kvmlet keeps the MAC, the link status and the control queue)
        features = self.features & self.backend_features & ~_KVMLET_ONLY
        if self.backend_features & (1 << VHOST_USER_F_PROTOCOL_FEATURES):
            features |= 1 << VHOST_USER_F_PROTOCOL_FEATURES
        conn.set_features(features)
        conn.set_mem_table([MemoryRegionSpec(r.gpa, r.size, r.host_address, r.fd, r.fd_offset)
                            for r in self.memory.regions])
        for index in range(2 * self.pairs):
            queue = self.queues[index]
            if not queue.ready:
                continue
            base = self.memory.read_u16(queue.device_addr + 2) if reconnect else 0   # used->idx
            conn.set_vring_num(index, queue.size)
            conn.set_vring_base(index, base)
            conn.set_vring_addr(index, VringAddresses(self.memory.host_address(queue.desc_addr),
                                                      self.memory.host_address(queue.device_addr),
                                                      self.memory.host_address(queue.driver_addr)))
            conn.set_vring_kick(index, kicks[index])
            conn.set_vring_call(index, call)
            self._started.add(index)
            self.stats.rings_started += 1
        self._enable_pairs(conn)
        self.external_interrupt_status = int(InterruptReason.USED_BUFFER)

    def _enable_pairs(self, conn: VhostUserConnection) -> None:
        if not conn.protocol_features and not self.backend_features & (1 << VHOST_USER_F_PROTOCOL_FEATURES):
            return   # without protocol features rings start enabled
        for index in range(2 * self.pairs):
            if self.queues[index].ready:
                conn.set_vring_enable(index, index // 2 < self.active_pairs)

    def on_reset(self) -> None:
        self.control_index = None
        self.external_interrupt_status = 0
        with self._lock:
            conn = self._conn
            if conn is None:
                return
            started, self._started = sorted(self._started), set()
            try:
                for index in started:
                    conn.get_vring_base(index)     # stops the ring in the back end
            except VhostUserError as exc:
                self._drop(f"stopping the rings: {exc}", protocol=True)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conn, self._conn = self._conn, None
            if conn is not None:
                self.watcher.unwatch_read(conn.fileno())
                self.watcher.call_soon(conn.close)

    # -- the control queue (kvmlet's) ------------------------------------------------------------------
    def process_queue(self, index: int) -> None:
        if index == self.control_index:
            self.drain_queue(self.queues[index], self._control)

    def _control(self, chain: DescriptorChain) -> bool:
        assert self.control_index is not None
        queue: Virtqueue = self.queues[self.control_index]
        self.stats.control_commands += 1
        ack = VIRTIO_NET_ERR
        command = chain.readable.read(0, 4)
        if len(command) >= 4 and command[0] == VIRTIO_NET_CTRL_MQ and \
                command[1] == VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET and self.has_feature(VIRTIO_NET_F_MQ):
            pairs = struct.unpack_from("<H", command, 2)[0]
            if 1 <= pairs <= self.pairs:
                self.active_pairs = pairs
                ack = VIRTIO_NET_OK
                with self._lock:
                    if self._conn is not None:
                        try:
                            self._enable_pairs(self._conn)
                        except VhostUserError as exc:
                            self._drop(str(exc), protocol=True)
        if ack != VIRTIO_NET_OK:
            self.stats.control_errors += 1
        if chain.writable.length:
            chain.writable.write(bytes([ack]))
            queue.complete(chain, 1)
        else:
            queue.push(chain.head, 0)
        return True

    # -- snapshots -------------------------------------------------------------------------------------
    def save_state(self) -> VirtioDeviceState:
        raise UnsupportedError(
            f"device {self.name} cannot be saved: its rings are served by the vhost-user back end "
            f"{self.socket_path}, which holds their positions and writes guest memory without dirty logging "
            "(VHOST_F_LOG_ALL is not implemented); detach the interface or use a TAP interface to snapshot or "
            "migrate this VM")

    def restore_state(self, state: VirtioDeviceState) -> None:
        raise UnsupportedError(f"device {self.name} cannot be restored (vhost-user interfaces have no saved state)")

