"""Devices built from the configuration models and placed by the device manager.

The legacy devices every kvmlet VM has (COM1, the i8042, the debug-exit and POST-code ports), then the
virtio devices the configuration asks for, in Firecracker's order: drives (the root device first), the
network interfaces, vsock, entropy. Run-time updates (``PATCH /drives``, ``PATCH /network-interfaces``)
go through :func:`update_drive` and :func:`update_network_interface`.
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvmlet.config.models import (
    Drive,
    DriveUpdate,
    Entropy,
    NetworkInterface,
    NetworkInterfaceUpdate,
    Tpm,
    VmConfig,
    Vsock,
    parse_mac,
)
from kvmlet.devices.legacy.ports import PortClaim
from kvmlet.devices.manager import DeviceManager, ManagedDevice
from kvmlet.errors import ConfigError

if TYPE_CHECKING:
    from kvmlet.devices.legacy.console import Console
    from kvmlet.devices.legacy.debug_exit import DebugExit
    from kvmlet.devices.legacy.i8042 import I8042
    from kvmlet.devices.legacy.post_code import PostCode
    from kvmlet.devices.legacy.serial import Serial8250
    from kvmlet.devices.virtio.device import VirtioDevice


@dataclass
class LegacyDevices:
    serial: Serial8250
    i8042: I8042
    debug_exit: DebugExit
    post_code: PostCode


def add_legacy_devices(manager: DeviceManager, console: Console, *, on_first_byte: Callable[[], None],
                       on_reset: Callable[[], None], on_exit: Callable[[int], None]) -> LegacyDevices:
    from kvmlet.devices.legacy.debug_exit import DebugExit
    from kvmlet.devices.legacy.i8042 import I8042, KEYBOARD_IRQ
    from kvmlet.devices.legacy.post_code import POST_CODE_PORT, PostCode
    from kvmlet.devices.legacy.serial import COM1_IRQ, Serial8250

    serial = Serial8250(manager.interrupt(COM1_IRQ), console, on_first_byte=on_first_byte)
    manager.add_legacy("serial0", serial, serial.bus_claims(), gsi=COM1_IRQ)
    i8042 = I8042(on_reset=on_reset, kbd_irq=manager.interrupt(KEYBOARD_IRQ))
    manager.add_legacy("i8042", i8042, i8042.bus_claims(), gsi=KEYBOARD_IRQ)
    debug_exit = DebugExit(on_exit=on_exit)
    manager.add_legacy("debug-exit", debug_exit, debug_exit.bus_claims())
    post_code = PostCode()
    manager.add_legacy("post-code", post_code, [PortClaim(POST_CODE_PORT, 1, post_code, "post-code")])
    return LegacyDevices(serial, i8042, debug_exit, post_code)


def _attach(manager: DeviceManager, device: VirtioDevice, model: Drive | NetworkInterface | Vsock | Entropy
            ) -> ManagedDevice:
    """On the transport the model names (kvmlet extension ``transport``: virtio-mmio or virtio-pci)."""
    if model.transport == "pci":
        return manager.add_virtio_pci(device, config=model)
    return manager.add_virtio_mmio(device, config=model)


def add_configured_devices(manager: DeviceManager, config: VmConfig) -> None:
    """Every virtio device ``config`` asks for (ConfigError names the one that cannot be set up)."""
    if config.machine_config.iommu != "none" or any(
            part is not None and part.transport == "pci"
            for part in (*config.drives, *config.network_interfaces, config.vsock, config.entropy)):
        manager.enable_pci(iommu=config.machine_config.iommu == "vtd")   # before the devices: restored first
    for drive in config.drives_in_boot_order():
        add_drive(manager, drive)
    for index, net in enumerate(config.network_interfaces):
        add_network_interface(manager, net, index)
    if config.vsock is not None:
        add_vsock(manager, config.vsock)
    if config.entropy is not None:
        add_entropy(manager, config.entropy)
    if config.tpm is not None:
        add_tpm(manager, config.tpm)


def _open_backend(drive: Drive, path: str) -> object:
    from kvmlet.devices.virtio.blk_backend import BlockBackend, BlockBackendError

    try:
        return BlockBackend.open(path, readonly=drive.is_read_only, direct=drive.direct)
    except BlockBackendError as exc:
        raise ConfigError(f"drive {drive.drive_id!r}: {exc}") from None


def add_drive(manager: DeviceManager, drive: Drive) -> ManagedDevice:
    from kvmlet.devices.virtio.blk import VirtioBlock
    from kvmlet.devices.virtio.blk_backend import BlockBackend
    from kvmlet.devices.virtio.ratelimit import make_rate_limiter

    assert drive.path_on_host is not None
    backend = _open_backend(drive, drive.path_on_host)
    assert isinstance(backend, BlockBackend)
    device = VirtioBlock(backend, drive_id=drive.drive_id, name=f"drive:{drive.drive_id}",
                         rate_limiter=make_rate_limiter(drive.rate_limiter))
    return _attach(manager, device, drive)


def _vm_seed() -> str:
    """What identifies this VM for derived MACs: the host and the VMM process (the TAP name is added)."""
    return f"{socket.gethostname()}/{os.getpid()}"


def default_mac(seed: str, index: int) -> bytes:
    """A locally administered unicast MAC derived from the VM and the interface's position."""
    digest = bytearray(hashlib.sha256(f"kvmlet/{seed}/net{index}".encode()).digest()[:6])
    digest[0] = (digest[0] & 0xFC) | 0x02
    return bytes(digest)


def add_network_interface(manager: DeviceManager, net: NetworkInterface, index: int) -> ManagedDevice:
    from kvmlet.devices.virtio.net import VirtioNet
    from kvmlet.devices.virtio.ratelimit import make_rate_limiter
    from kvmlet.net.tap import Tap, TapError, TapSettings

    label = f"network interface {net.iface_id!r}"
    if net.vhost_user_socket is not None:
        return add_vhost_user_interface(manager, net, index)
    if net.vhost_net:
        return add_vhost_net_interface(manager, net, index)
    try:
        tap = Tap.open(net.host_dev_name, net.queues)
    except TapError as exc:
        raise ConfigError(f"{label}: {exc}") from None
    try:
        tap.configure(TapSettings(mtu=net.mtu, address=net.address, bridge=net.bridge))
        mac = parse_mac(net.guest_mac, label) if net.guest_mac else default_mac(f"{_vm_seed()}/{tap.name}", index)
        device = VirtioNet(tap, mac, manager.events, offloads=net.offload, mtu=net.mtu,
                           name=f"net:{net.iface_id}",
                           rx_rate_limiter=make_rate_limiter(net.rx_rate_limiter),
                           tx_rate_limiter=make_rate_limiter(net.tx_rate_limiter))
    except TapError as exc:
        tap.close()
        raise ConfigError(f"{label}: {exc}") from None
    except BaseException:
        tap.close()
        raise
    return _attach(manager, device, net)


def add_vhost_net_interface(manager: DeviceManager, net: NetworkInterface, index: int,
                            device_path: str | None = None) -> ManagedDevice:
    """A virtio-net interface on a TAP whose frames the kernel's vhost-net moves: ``/dev/vhost-net`` opened once per
    queue pair (first, so that a host without it is told so before anything else), then the TAP's queues."""
    from kvmlet.devices.virtio.vhost_kernel_net import VhostKernelNet, open_vhost_net
    from kvmlet.net.tap import Tap, TapError, TapSettings
    from kvmlet.vhost.kernel import VHOST_NET_DEVICE, VhostKernelError

    label = f"network interface {net.iface_id!r}"
    try:
        channels = open_vhost_net(net.queues, device_path or VHOST_NET_DEVICE)
    except VhostKernelError as exc:
        raise ConfigError(f"{label}: {exc}") from None
    tap: Tap | None = None
    try:
        tap = Tap.open(net.host_dev_name, net.queues)
        tap.configure(TapSettings(mtu=net.mtu, address=net.address, bridge=net.bridge))
        mac = parse_mac(net.guest_mac, label) if net.guest_mac else default_mac(f"{_vm_seed()}/{tap.name}", index)
        device = VhostKernelNet(tap, channels, mac, manager.memory, manager.events, mtu=net.mtu,
                                offloads=net.offload, name=f"net:{net.iface_id}")
    except BaseException as exc:
        for channel in channels:
            channel.close()
        if tap is not None:
            tap.close()
        if isinstance(exc, TapError):
            raise ConfigError(f"{label}: {exc}") from None
        raise
    return _attach(manager, device, net)


def add_vhost_user_interface(manager: DeviceManager, net: NetworkInterface, index: int) -> ManagedDevice:
    """A virtio-net interface whose data path is a vhost-user back end (kvmlet connects to its socket)."""
    from kvmlet.devices.virtio.vhost_user_net import VhostUserNet

    assert net.vhost_user_socket is not None
    label = f"network interface {net.iface_id!r}"
    mac = parse_mac(net.guest_mac, label) if net.guest_mac else default_mac(
        f"{_vm_seed()}/{net.vhost_user_socket}", index)
    device = VhostUserNet(net.vhost_user_socket, mac, manager.memory, manager.events, pairs=net.queues,
                          mtu=net.mtu, offloads=net.offload, name=f"net:{net.iface_id}")
    return _attach(manager, device, net)


def add_vsock(manager: DeviceManager, vsock: Vsock) -> ManagedDevice:
    from kvmlet.devices.virtio.vsock import VirtioVsock, VsockError

    try:
        device = VirtioVsock(vsock.guest_cid, vsock.uds_path, manager.events, name="vsock")
    except VsockError as exc:
        raise ConfigError(f"vsock: {exc}") from None
    return _attach(manager, device, vsock)


def add_entropy(manager: DeviceManager, entropy: Entropy) -> ManagedDevice:
    from kvmlet.devices.virtio.ratelimit import make_rate_limiter
    from kvmlet.devices.virtio.rng import VirtioRng

    device = VirtioRng(name="entropy", rate_limiter=make_rate_limiter(entropy.rate_limiter))
    return _attach(manager, device, entropy)


def add_tpm(manager: DeviceManager, tpm: Tpm) -> ManagedDevice:
    """The vTPM's TIS front end at 0xFED40000; swtpm itself starts with the measured launch (or a restore)."""
    from kvmlet.devices.tpm_tis import TIS_BASE, TIS_SIZE, TpmTis
    from kvmlet.tpm.vtpm import Vtpm

    device = TpmTis(Vtpm(tpm), name="tpm")
    try:
        return manager.add_fixed_mmio("tpm", device, TIS_BASE, TIS_SIZE, config=tpm)
    except BaseException:
        device.close()
        raise


def update_drive(manager: DeviceManager, update: DriveUpdate) -> Drive:
    """A new backing file and/or rate limiter for a running drive; returns the drive's new config."""
    import msgspec

    from kvmlet.devices.virtio.blk import VirtioBlock
    from kvmlet.devices.virtio.blk_backend import BlockBackend
    from kvmlet.devices.virtio.ratelimit import make_rate_limiter

    managed = manager.find(f"drive:{update.drive_id}")
    if managed is None or managed.transport is None or not isinstance(managed.device, VirtioBlock):
        raise ConfigError(f"drive {update.drive_id!r} does not exist")
    drive: Drive = managed.config
    changed = drive
    if update.path_on_host is not None:
        changed = msgspec.structs.replace(changed, path_on_host=update.path_on_host)
        changed.validate()
    if update.rate_limiter is not None:
        update.rate_limiter.validate(f"drive {update.drive_id!r}")
        changed = msgspec.structs.replace(changed, rate_limiter=update.rate_limiter)
    backend = _open_backend(changed, update.path_on_host) if update.path_on_host is not None else None
    with managed.transport.lock:
        if isinstance(backend, BlockBackend):
            managed.device.replace_backend(backend)
        if update.rate_limiter is not None:
            managed.device.rate_limiter = make_rate_limiter(update.rate_limiter)
    managed.config = changed
    return changed


def update_network_interface(manager: DeviceManager, update: NetworkInterfaceUpdate) -> NetworkInterface:
    import msgspec

    from kvmlet.devices.virtio.net import VirtioNet
    from kvmlet.devices.virtio.ratelimit import make_rate_limiter

    managed = manager.find(f"net:{update.iface_id}")
    if managed is not None and getattr(managed.config, "vhost_user_socket", None) is not None:
        raise ConfigError(f"network interface {update.iface_id!r} is a vhost-user interface: its rate limits are "
                          "the back end's (kvmlet net port ... rate=)")
    if managed is not None and getattr(managed.config, "vhost_net", False):
        raise ConfigError(f"network interface {update.iface_id!r} uses vhost-net: the kernel moves its frames, so "
                          "kvmlet cannot rate-limit them")
    if managed is None or managed.transport is None or not isinstance(managed.device, VirtioNet):
        raise ConfigError(f"network interface {update.iface_id!r} does not exist")
    net: NetworkInterface = managed.config
    label = f"network interface {update.iface_id!r}"
    for side, limiter in (("rx", update.rx_rate_limiter), ("tx", update.tx_rate_limiter)):
        if limiter is not None:
            limiter.validate(f"{label} {side}")
    with managed.transport.lock:
        if update.rx_rate_limiter is not None:
            managed.device.rx_rate_limiter = make_rate_limiter(update.rx_rate_limiter)
            net = msgspec.structs.replace(net, rx_rate_limiter=update.rx_rate_limiter)
        if update.tx_rate_limiter is not None:
            managed.device.tx_rate_limiter = make_rate_limiter(update.tx_rate_limiter)
            net = msgspec.structs.replace(net, tx_rate_limiter=update.tx_rate_limiter)
    managed.config = net
    return net

