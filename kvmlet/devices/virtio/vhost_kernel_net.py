"""virtio-net on a TAP with its data path in the kernel's vhost-net (``/dev/vhost-net``), as QEMU's ``vhost=on``.

The device model, the ring hand-over and the control queue are :class:`~kvmlet.devices.virtio.vhost_device.
VhostNetDevice`'s (shared with vhost-user); this is the kernel transport to it:

* one ``/dev/vhost-net`` instance per queue pair (as QEMU opens them), each given that pair's receive and transmit
  rings and, with ``VHOST_NET_SET_BACKEND``, that pair's queue of the (multi-queue) TAP: a kernel thread moves frames
  between the rings and the TAP; kvmlet does no work per frame and never reads the TAP;
* the memory table holds kvmlet's own virtual addresses of guest RAM (the kernel works in kvmlet's address space),
  so a privately mapped memory (restored from a snapshot file) is as good as a memfd;
* the TAP is opened with ``IFF_VNET_HDR`` and a 12-byte header (``TUNSETVNETHDRSZ``, virtio 1.x): vhost-net passes
  the header through (``VHOST_NET_F_VIRTIO_NET_HDR`` is not negotiated). Offloads come from the TAP, not from
  vhost: the device offers checksum and TSO, and what the driver accepts for receive becomes ``TUNSETOFFLOAD``, as
  on kvmlet's own TAP path;
* the driver's ``VIRTIO_NET_CTRL_MQ`` attaches and detaches TAP queues (``TUNSETQUEUE``), as QEMU does;
* each ring's error eventfd (``VHOST_SET_VRING_ERR``) is watched: the kernel signals it when a ring cannot be used
  (a bad descriptor or address); it is counted in ``stats.ring_errors``.

Snapshots and migration are refused by name (the kernel holds the rings' positions and writes guest memory without
kvmlet's dirty log; ``VHOST_F_LOG_ALL`` and ``VHOST_SET_LOG_BASE`` are not implemented).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

from kvmlet.devices.virtio.constants import COMMON_FEATURES, feature_bit
from kvmlet.devices.virtio.net import OFFLOAD_FEATURES, QUEUE_SIZE, VIRTIO_NET_F_MRG_RXBUF, offload_for_features
from kvmlet.devices.virtio.vhost_device import VhostNetDevice, VhostStats
from kvmlet.eventloop import EventLoop
from kvmlet.memory import GuestMemory
from kvmlet.net.tap import Offload, Tap, TapError
from kvmlet.vhost.common import VhostChannel
from kvmlet.vhost.kernel import VHOST_NET_DEVICE, VhostNetFd

log = logging.getLogger("kvmlet.vhost")

# Ring features vhost-net may serve (offloads are the TAP's, so not among them).
_RING_FEATURES = COMMON_FEATURES | feature_bit(VIRTIO_NET_F_MRG_RXBUF)


@dataclass
class VhostKernelStats(VhostStats):
    ring_errors: int = 0             # the kernel signalled a ring's error eventfd
    tap_errors: int = 0


def open_vhost_net(pairs: int, path: str = VHOST_NET_DEVICE) -> list[VhostNetFd]:
    """One vhost-net instance per queue pair (VhostKernelError, naming the device, if there is none)."""
    opened: list[VhostNetFd] = []
    try:
        for _ in range(pairs):
            opened.append(VhostNetFd.open(path))
    except BaseException:
        for channel in opened:
            channel.close()
        raise
    return opened


class VhostKernelNet(VhostNetDevice):
    """A virtio-net device on a TAP whose rings the kernel's vhost-net serves (one instance per queue pair)."""

    backend_kind = "vhost-net"
    stats: VhostKernelStats

    def __init__(self, tap: Tap, channels: Sequence[VhostNetFd], mac: bytes, memory: GuestMemory, watcher: EventLoop,
                 *, mtu: int | None = None, offloads: bool = True, name: str = "virtio-net0",
                 queue_size: int = QUEUE_SIZE) -> None:
        if len(channels) != tap.queues:
            raise ValueError(f"{len(channels)} vhost-net instances for a TAP with {tap.queues} queues")
        super().__init__(mac, memory, pairs=tap.queues, mtu=mtu, offloads=offloads, name=name,
                         queue_size=queue_size)
        self.tap = tap
        self.vhost = list(channels)
        self.watcher = watcher
        self.stats = VhostKernelStats()
        self.offload = Offload.NONE
        features = -1
        for channel in self.vhost:
            features &= channel.features
        self.backend_features = features if self.vhost else 0
        self._error_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.watcher.watch_read(self._error_fd, self._ring_error)

    # -- the transport (VhostNetDevice) ----------------------------------------------------------------
    @property
    def link_up(self) -> bool:
        return bool(self.tap.fds) and self.tap.exists()

    def _channels(self) -> Sequence[VhostChannel]:
        return self.vhost

    def _channel(self, index: int) -> tuple[VhostChannel, int]:
        pair, ring = divmod(index, 2)
        return self.vhost[pair], ring

    def _data_features(self) -> int:
        return (_RING_FEATURES & self.backend_features) | OFFLOAD_FEATURES

    def _ring_configured(self, channel: VhostChannel, local: int) -> None:
        assert isinstance(channel, VhostNetFd)
        channel.set_vring_err(local, self._error_fd)

    def _rings_started(self) -> None:
        """Receive offloads to the TAP, only pair 0 attached, then each started ring onto its TAP queue."""
        self._set_offload(offload_for_features(self.features))
        self._apply_active_pairs()
        for index in sorted(self._started):
            pair, ring = divmod(index, 2)
            self.vhost[pair].set_backend(ring, self.tap.fds[pair])

    def _before_stop(self, channel: VhostChannel, local: int) -> None:
        assert isinstance(channel, VhostNetFd)
        channel.set_backend(local, None)

    def on_reset(self) -> None:
        super().on_reset()
        if self.tap.fds:
            self._set_offload(Offload.NONE)

    def _apply_active_pairs(self) -> None:
        for pair in range(self.pairs):
            try:
                self.tap.set_queue_attached(pair, pair < self.active_pairs)
            except TapError as exc:
                self._tap_error(exc)

    def _set_offload(self, offload: Offload) -> None:
        try:
            self.tap.set_offload(offload)
            self.offload = offload
        except TapError as exc:
            self._tap_error(exc)

    def _tap_error(self, exc: TapError) -> None:
        self.stats.tap_errors += 1
        self.stats.last_error = str(exc)
        log.warning("%s: %s", self.name, exc)

    def _ring_error(self) -> None:
        """Event-loop thread: the kernel could not use a ring (it stops serving it until the next set-up)."""
        try:
            count = os.eventfd_read(self._error_fd)
        except (BlockingIOError, OSError):
            return
        self.stats.ring_errors += count
        self.stats.last_error = f"vhost-net reported {count} ring error(s): a ring or a descriptor it could not use"
        log.warning("%s: %s", self.name, self.stats.last_error)

    def _refusal(self) -> str:
        return f"its rings are served by the kernel's vhost-net (TAP {self.tap.name})"

    def close(self) -> None:
        with self._lock:
            if self._error_fd < 0:
                return
            self._stop_rings()
            for channel in self.vhost:
                channel.close()
            self.vhost = []
            self.watcher.unwatch_read(self._error_fd)
            error_fd, self._error_fd = self._error_fd, -1
            self.watcher.call_soon(lambda: self._close_fds(error_fd))   # after the loop has forgotten them

    def _close_fds(self, error_fd: int) -> None:
        if error_fd >= 0:
            os.close(error_fd)
        self.tap.close()
