"""virtio-net with its data path in a vhost back end: what the vhost-user and the vhost-net (kernel) devices share.

kvmlet keeps the device model: the transport, feature negotiation, the configuration space (MAC, link status,
queue pairs, MTU) and the control queue (``VIRTIO_NET_CTRL_MQ``: which pairs are enabled). The receive and
transmit rings, and the guest memory they point into, are handed to the back end through a
:class:`~kvmlet.vhost.common.VhostChannel` (one vhost-user connection for every ring, or one ``/dev/vhost-net``
descriptor per queue pair):

* features: what the driver accepted and the back end has a part in (kvmlet keeps MAC, STATUS, CTRL_VQ);
* guest RAM: the memory table, one region per memslot;
* per ring: size, base, the virtual addresses of its parts, the kick eventfd (the one KVM's ioeventfd signals on
  QueueNotify; the device manager does not watch it: ``external_queues``) and the call eventfd (the transport's
  irqfd): a guest notification goes from KVM straight to the back end and the back end interrupts the guest
  through KVM directly. As virtio-mmio has one interrupt line and an InterruptStatus register the back end cannot
  set, the device reports "used buffer" there for as long as it runs (``external_interrupt_status``), as other
  VMMs do for vhost on virtio-mmio; a driver then checks its rings on each interrupt;
* on a reset every started ring is stopped with ``GET_VRING_BASE``;
* kvmlet does no work per frame.

The subclasses say how the rings reach the back end (:meth:`_channel`), what data-path features it has, and what
follows the ring set-up (vhost-user: ``SET_VRING_ENABLE``; vhost-net: the TAP queues with ``VHOST_NET_SET_BACKEND``).
Snapshots and migration are refused by name: the back end owns the rings' positions and writes guest memory
without kvmlet's dirty log (``VHOST_F_LOG_ALL`` and ``SET_LOG_BASE`` are not implemented).
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Sequence
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
    answer_control,
    control_queue_index,
    features_consistent,
    net_config_space,
)
from kvmlet.devices.virtio.queue import DescriptorChain, Virtqueue
from kvmlet.errors import UnsupportedError
from kvmlet.memory import GuestMemory
from kvmlet.vhost.common import (
    VHOST_F_LOG_ALL,
    VHOST_NET_F_VIRTIO_NET_HDR,
    MemoryRegionSpec,
    VhostChannel,
    VhostError,
    VringAddresses,
)

# Features kvmlet serves itself (never passed to a back end), and the vhost-only bits kvmlet never asks for.
KVMLET_ONLY = feature_bit(VIRTIO_NET_F_MAC) | feature_bit(VIRTIO_NET_F_STATUS) | feature_bit(VIRTIO_NET_F_CTRL_VQ)
_NOT_NEGOTIATED = feature_bit(VHOST_F_LOG_ALL) | feature_bit(VHOST_NET_F_VIRTIO_NET_HDR)
# Data-path features: offered only where the back end has them.
DATA_FEATURES = COMMON_FEATURES | OFFLOAD_FEATURES | feature_bit(VIRTIO_NET_F_MRG_RXBUF)


@dataclass
class VhostStats:
    rings_started: int = 0
    control_commands: int = 0
    control_errors: int = 0
    last_error: str = ""


def memory_table(memory: GuestMemory) -> list[MemoryRegionSpec]:
    """One region per memslot, at kvmlet's mapping (and, for a back end that maps it, the memfd)."""
    return [MemoryRegionSpec(r.gpa, r.size, r.host_address, r.fd, r.fd_offset) for r in memory.regions]


def ring_addresses(memory: GuestMemory, queue: Virtqueue) -> VringAddresses:
    """A ring's descriptor table, used ring and available ring as kvmlet's virtual addresses."""
    return VringAddresses(memory.host_address(queue.desc_addr), memory.host_address(queue.device_addr),
                          memory.host_address(queue.driver_addr))


class VhostNetDevice(VirtioDevice):
    """A virtio-net device whose data rings a vhost back end serves (subclasses: the transport to it)."""

    device_type = DeviceType.NET
    backend_kind = "vhost"          # how messages name the back end

    def __init__(self, mac: bytes, memory: GuestMemory, *, pairs: int, mtu: int | None, offloads: bool, name: str,
                 queue_size: int = QUEUE_SIZE) -> None:
        if len(mac) != 6:
            raise ValueError(f"a MAC address has 6 bytes, not {len(mac)}")
        sizes = [queue_size] * (2 * pairs) + ([CONTROL_QUEUE_SIZE] if pairs > 1 else [])
        super().__init__(sizes, name)
        self.mac = bytes(mac)
        self.memory = memory
        self.pairs = pairs
        self.mtu = mtu
        self.offloads = offloads
        self.stats: VhostStats = VhostStats()
        self.active_pairs = 1
        self.control_index: int | None = None
        self.external_queues = frozenset(range(2 * pairs))   # the device manager leaves their eventfds alone
        self.external_interrupt_status = 0
        self.backend_features = 0                            # the virtio features the back end offers
        self._lock = threading.RLock()
        self._started: set[int] = set()                      # rings the back end serves now

    # -- what a transport provides ---------------------------------------------------------------------
    @property
    def link_up(self) -> bool:
        raise NotImplementedError

    def _backend_ready(self) -> bool:
        """Whether rings can be handed over now (a vhost-user back end may be away)."""
        return True

    def _channels(self) -> Sequence[VhostChannel]:
        """Every channel, each told the features and the memory table."""
        raise NotImplementedError

    def _channel(self, index: int) -> tuple[VhostChannel, int]:
        """The channel serving ring ``index`` and that ring's number on it."""
        raise NotImplementedError

    def _data_features(self) -> int:
        """The data-path features (offloads, MRG_RXBUF, ring features) this back end can serve."""
        return DATA_FEATURES & self.backend_features

    def _extra_backend_features(self) -> int:
        """Bits the back end is told besides the negotiated ones (vhost-user: PROTOCOL_FEATURES)."""
        return 0

    def _ring_configured(self, channel: VhostChannel, local: int) -> None:
        """After a ring's set-up (vhost-net: its error eventfd)."""

    def _rings_started(self) -> None:
        """After every ring's set-up (vhost-user: enable the active pairs; vhost-net: attach the TAP queues)."""

    def _before_stop(self, channel: VhostChannel, local: int) -> None:
        """Before GET_VRING_BASE stops a ring (vhost-net: detach its TAP queue)."""

    def _apply_active_pairs(self) -> None:
        """The driver changed ``active_pairs`` (control queue)."""

    def _start_failed(self, exc: VhostError) -> None:
        """The back end refused the set-up while the driver started the device (lock held)."""
        self.stats.last_error = str(exc)

    def _stop_failed(self, exc: VhostError) -> None:
        """Stopping the rings failed (lock held)."""
        self.stats.last_error = f"stopping the rings: {exc}"

    def _refusal(self) -> str:
        """Why this device cannot be saved (the back end's name)."""
        return f"its rings are served by a {self.backend_kind} back end"

    # -- negotiation and configuration ---------------------------------------------------------------
    def device_features(self) -> int:
        own = feature_bit(VIRTIO_NET_F_MAC) | feature_bit(VIRTIO_NET_F_STATUS)
        if self.mtu is not None:
            own |= feature_bit(VIRTIO_NET_F_MTU)
        if self.pairs > 1:
            own |= feature_bit(VIRTIO_NET_F_CTRL_VQ) | feature_bit(VIRTIO_NET_F_MQ)
        data = self._data_features()
        if not self.offloads:
            data &= ~OFFLOAD_FEATURES
        return own | data

    def specific_features(self) -> int:
        return self.device_features() & ~COMMON_FEATURES

    def accept_features(self, features: int) -> bool:
        return features_consistent(features)

    def config_space(self) -> bytes:
        return net_config_space(self.mac, self.link_up, self.pairs, self.mtu)

    def negotiated_backend_features(self) -> int:
        """What the back end is told: the accepted features it has a part in."""
        features = self.features & self.backend_features & ~KVMLET_ONLY & ~_NOT_NEGOTIATED
        return features | self._extra_backend_features()

    # -- lifecycle -------------------------------------------------------------------------------------
    def on_activate(self) -> None:
        self.control_index = control_queue_index(self.features, self.pairs)
        self.active_pairs = 1
        with self._lock:
            if not self._backend_ready():
                return   # the link is down; the rings start when the back end is back
            try:
                self._start_rings(reconnect=False)
            except VhostError as exc:
                self._start_failed(exc)
                raise ActivationError(f"the {self.backend_kind} back end refused the set-up: {exc}") from None

    def _call_fd(self) -> int | None:
        irq = getattr(self.host, "irq", None)
        fd = getattr(irq, "fd", None)
        return fd if isinstance(fd, int) and fd >= 0 else None

    def _start_rings(self, *, reconnect: bool) -> None:
        """Features, memory table and every live data ring to the back end (lock held, back end ready).
        ``reconnect``: each ring starts at the used index in guest memory (the back end is a new one)."""
        kicks: list[int] = list(getattr(self.host, "queue_eventfds", []))
        if len(kicks) < 2 * self.pairs:
            raise VhostError(f"{self.backend_kind} needs a transport with one notification eventfd per queue")
        call = self._call_fd()
        features = self.negotiated_backend_features()
        regions = memory_table(self.memory)
        for channel in self._channels():
            channel.set_features(features)
            channel.set_mem_table(regions)
        for index in range(2 * self.pairs):
            queue = self.queues[index]
            if not queue.ready:
                continue
            channel, local = self._channel(index)
            base = self.memory.read_u16(queue.device_addr + 2) if reconnect else 0   # used->idx
            channel.set_vring_num(local, queue.size)
            channel.set_vring_base(local, base)
            channel.set_vring_addr(local, ring_addresses(self.memory, queue))
            channel.set_vring_kick(local, kicks[index])
            channel.set_vring_call(local, call)
            self._ring_configured(channel, local)
            self._started.add(index)
            self.stats.rings_started += 1
        self._rings_started()
        self.external_interrupt_status = int(InterruptReason.USED_BUFFER)

    def _stop_rings(self) -> None:
        """Stop every started ring (lock held, back end ready)."""
        started, self._started = sorted(self._started), set()
        try:
            for index in started:
                channel, local = self._channel(index)
                self._before_stop(channel, local)
                channel.get_vring_base(local)     # stops the ring in the back end
        except VhostError as exc:
            self._stop_failed(exc)

    def on_reset(self) -> None:
        self.control_index = None
        self.external_interrupt_status = 0
        with self._lock:
            if self._backend_ready():
                self._stop_rings()

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
                    self._apply_active_pairs()
        if ack != VIRTIO_NET_OK:
            self.stats.control_errors += 1
        answer_control(queue, chain, ack)
        return True

    # -- snapshots -------------------------------------------------------------------------------------
    def save_refusal(self) -> str:
        """Why this device cannot be saved (asked before a snapshot or migration does any work)."""
        return (f"device {self.name} cannot be saved: {self._refusal()}, which holds their positions and writes "
                "guest memory without dirty logging (VHOST_F_LOG_ALL is not implemented); detach the interface or "
                "use a TAP interface without vhost to snapshot or migrate this VM")

    def save_state(self) -> VirtioDeviceState:
        raise UnsupportedError(self.save_refusal())

    def restore_state(self, state: VirtioDeviceState) -> None:
        raise UnsupportedError(f"device {self.name} cannot be restored ({self.backend_kind} interfaces have no "
                               "saved state)")
