"""Building a VM's network interfaces (TAP + virtio-net) and its vsock device from the configuration."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvmlet.config import ConfigError
from kvmlet.devices.virtio.fdwatch import LoopFdWatcher
from kvmlet.devices.virtio.net import VirtioNet
from kvmlet.devices.virtio.net_options import NetConfig, vm_seed
from kvmlet.devices.virtio.ratelimit import make_rate_limiter
from kvmlet.devices.virtio.vsock import VirtioVsock, VsockError
from kvmlet.net.tap import Tap, TapError

if TYPE_CHECKING:
    from kvmlet.config import MachineConfig
    from kvmlet.devices.virtio.attach import VirtioDevices


def open_tap(net: NetConfig, label: str) -> Tap:
    """The TAP for ``net``, opened and configured (ConfigError with a one-line reason)."""
    try:
        tap = Tap.open(net.tap, net.queues)
    except TapError as exc:
        raise ConfigError(f"{label}: {exc}") from None
    try:
        tap.configure(net.settings)
    except TapError as exc:
        tap.close()
        raise ConfigError(f"{label}: {exc}") from None
    return tap


def attach_network(config: MachineConfig, devices: VirtioDevices) -> None:
    """Add a virtio-net device per ``config.nets`` entry, then the vsock device, to ``devices``."""
    watcher = LoopFdWatcher(devices.events)
    for index, net in enumerate(config.nets):
        tap = open_tap(net, f"--net tap={net.tap}")
        try:
            mac = net.mac_bytes(index, f"{vm_seed()}/{tap.name}")
            device = VirtioNet(tap, mac, watcher, offloads=net.offload, mtu=net.mtu,
                               name=f"virtio-net{index}",
                               rx_rate_limiter=make_rate_limiter(net.rx_rate_limit),
                               tx_rate_limiter=make_rate_limiter(net.tx_rate_limit))
        except BaseException:
            tap.close()
            raise
        devices.add(device)
    if config.vsock is not None:
        try:
            vsock = VirtioVsock(config.vsock.cid, config.vsock.uds, watcher)
        except VsockError as exc:
            raise ConfigError(f"--vsock: {exc}") from None
        devices.add(vsock)
