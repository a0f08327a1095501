"""TAP devices: the host end of a VM's network interface (Linux ``Documentation/networking/tuntap.rst``).

A :class:`Tap` is one TAP interface opened through ``/dev/net/tun``:

* ``TUNSETIFF`` with ``IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`` (plus ``IFF_MULTI_QUEUE`` for more than one
  queue): every frame read or written carries a virtio-net header first; with N queues there is one file
  descriptor per queue pair, each attached to the same interface;
* ``TUNSETVNETHDRSZ`` 12: the virtio 1.x header (with ``num_buffers``), so frames move between the TAP and
  guest buffers without reshaping the header;
* ``TUNSETOFFLOAD``: which offloads the reader (the guest) handles (``TUN_F_CSUM``, ``TUN_F_TSO4``,
  ``TUN_F_TSO6``, ``TUN_F_TSO_ECN``, and since Linux 6.2 ``TUN_F_USO4``/``TUN_F_USO6``, which the kernel only
  takes together and with ``TUN_F_CSUM``): with them the kernel hands over unchecksummed and unsegmented (up
  to 64 KiB) frames, and protocol work is done once, by whoever ends up needing it. Unknown flags make it fail
  (EINVAL), which is how :meth:`Tap.accepts_offload` probes what this kernel knows;
* ``TUNSETQUEUE`` attaches and detaches queues, so frames are only steered to the queues the guest uses.

The interface itself is configured with pyroute2 over rtnetlink (up, MTU, an address, a bridge to join).
``Tap.open("auto")`` makes a new non-persistent interface named ``kvmlet<N>`` that disappears with the last
file descriptor; any other name attaches to that TAP if it exists (``ip tuntap add ... mode tap``) or
creates it.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

from kvmlet.config.models import MAX_QUEUE_PAIRS, valid_ifname
from kvmlet.errors import KvmletError

TUN_DEVICE = "/dev/net/tun"
VNET_HDR_SIZE = 12          # struct virtio_net_hdr_v1: flags, gso_type, hdr_len, gso_size, csum_*, num_buffers
IFNAMSIZ = 16
AUTO_NAME = "auto"
AUTO_TEMPLATE = "kvmlet%d"
MAX_QUEUES = MAX_QUEUE_PAIRS  # kvmlet's limit (the kernel's is 256)


def _ioc(direction: int, number: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (ord("T") << 8) | number


_IOC_WRITE, _IOC_READ = 1, 2
TUNSETIFF = _ioc(_IOC_WRITE, 202, 4)
TUNGETFEATURES = _ioc(_IOC_READ, 207, 4)
TUNSETOFFLOAD = _ioc(_IOC_WRITE, 208, 4)
TUNGETIFF = _ioc(_IOC_READ, 210, 4)
TUNGETVNETHDRSZ = _ioc(_IOC_READ, 215, 4)
TUNSETVNETHDRSZ = _ioc(_IOC_WRITE, 216, 4)
TUNSETQUEUE = _ioc(_IOC_WRITE, 217, 4)


class TunFlag(enum.IntFlag):
    """``ifr_flags`` of TUNSETIFF / TUNGETIFF / TUNSETQUEUE."""

    TUN = 0x0001
    TAP = 0x0002
    NO_PI = 0x1000
    VNET_HDR = 0x4000
    MULTI_QUEUE = 0x0100
    ATTACH_QUEUE = 0x0200
    DETACH_QUEUE = 0x0400
    PERSIST = 0x0800


class Offload(enum.IntFlag):
    """TUNSETOFFLOAD bits: what the reader of the TAP accepts."""

    NONE = 0
    CSUM = 0x01
    TSO4 = 0x02
    TSO6 = 0x04
    TSO_ECN = 0x08
    UFO = 0x10
    USO4 = 0x20      # UDP segmentation offload (Linux 6.2): only with USO6 and CSUM
    USO6 = 0x40


USO_OFFLOAD = Offload.CSUM | Offload.USO4 | Offload.USO6   # what the kernel needs set at once for USO


_IFREQ = struct.Struct(f"{IFNAMSIZ}sH22x")  # struct ifreq: name, then ifr_flags in the union (40 bytes)


class TapError(KvmletError, RuntimeError):
    """A TAP device that cannot be opened or configured, with what to do about it."""


@dataclass(frozen=True)
class TapSettings:
    """How to configure the interface on the host side (None: leave as it is)."""

    mtu: int | None = None
    address: str | None = None    # "10.0.0.1/24"
    bridge: str | None = None     # a bridge for the TAP to join
    up: bool = True


def _ifreq(name: str, flags: int) -> bytes:
    return _IFREQ.pack(name.encode(), flags)


def tun_flags_of(name: str) -> int | None:
    """The ``tun_flags`` of an existing TUN/TAP interface, or None if ``name`` is not one."""
    try:
        return int(Path(f"/sys/class/net/{name}/tun_flags").read_text().strip(), 16)
    except (OSError, ValueError):
        return None


def interface_exists(name: str) -> bool:
    return Path(f"/sys/class/net/{name}").exists()


class Tap:
    """An open TAP interface: one file descriptor per queue (pair), each non-blocking."""

    def __init__(self, name: str, fds: list[int], created: bool, multi_queue: bool) -> None:
        self.name = name
        self.fds = fds
        self.created = created
        self.multi_queue = multi_queue
        self.attached = [True] * len(fds)
        self.offload = Offload.NONE

    # -- opening ------------------------------------------------------------------------------------
    @classmethod
    def open(cls, name: str = AUTO_NAME, queues: int = 1) -> Tap:
        """Open (or create) TAP ``name`` (``"auto"``: a new ``kvmlet<N>``) with ``queues`` queues."""
        if not 1 <= queues <= MAX_QUEUES:
            raise TapError(f"TAP queues {queues}: choose 1 to {MAX_QUEUES}")
        auto = name in (AUTO_NAME, "")
        if not auto and not valid_ifname(name):
            raise TapError(f"{name!r} is not a valid interface name (1-15 characters, no '/', ':' or spaces)")
        existing = None if auto else tun_flags_of(name)
        if not auto and existing is None and interface_exists(name):
            raise TapError(f"interface {name} exists and is not a TAP device")
        if existing is not None and not existing & TunFlag.TAP:
            raise TapError(f"interface {name} is a TUN (layer 3) device, not a TAP")
        multi_queue = queues > 1
        if existing is not None:
            has_mq = bool(existing & TunFlag.MULTI_QUEUE)
            if queues > 1 and not has_mq:
                raise TapError(f"TAP {name} was created without multi_queue, so it cannot give {queues} queues; "
                               f"recreate it with 'ip tuntap add dev {name} mode tap multi_queue'")
            multi_queue = has_mq
        flags = TunFlag.TAP | TunFlag.NO_PI | TunFlag.VNET_HDR
        if multi_queue:
            flags |= TunFlag.MULTI_QUEUE
        fds: list[int] = []
        actual = AUTO_TEMPLATE if auto else name
        try:
            for _ in range(queues):
                fd = cls._open_queue(actual, flags)
                fds.append(fd)
                actual = cls._name_of(fd)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return cls(actual, fds, created=existing is None, multi_queue=multi_queue)

    @staticmethod
    def _open_queue(name: str, flags: int) -> int:
        try:
            fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise TapError(f"{TUN_DEVICE} is missing: load the tun module ('modprobe tun')") from None
        except PermissionError:
            raise TapError(f"cannot open {TUN_DEVICE}: permission denied (TAP devices need root or "
                           "CAP_NET_ADMIN)") from None
        try:
            try:
                fcntl.ioctl(fd, TUNSETIFF, _ifreq(name, flags))
            except OSError as exc:
                raise TapError(_setiff_error(name, exc)) from None
            try:
                fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_SIZE))
            except OSError as exc:
                raise TapError(f"TAP {name}: TUNSETVNETHDRSZ {VNET_HDR_SIZE}: {exc.strerror}") from None
        except BaseException:
            os.close(fd)
            raise
        return fd

    @staticmethod
    def _name_of(fd: int) -> str:
        raw = fcntl.ioctl(fd, TUNGETIFF, bytes(_IFREQ.size))
        name, _flags = _IFREQ.unpack(raw)
        return bytes(name).rstrip(b"\0").decode()

    # -- queries ------------------------------------------------------------------------------------
    @property
    def queues(self) -> int:
        return len(self.fds)

    def flags(self, queue: int = 0) -> TunFlag:
        """The interface flags as TUNGETIFF reports them (through queue ``queue``'s descriptor)."""
        _name, flags = _IFREQ.unpack(fcntl.ioctl(self.fds[queue], TUNGETIFF, bytes(_IFREQ.size)))
        return TunFlag(flags)

    def vnet_header_size(self) -> int:
        raw = fcntl.ioctl(self.fds[0], TUNGETVNETHDRSZ, bytes(4))
        return int(struct.unpack("i", raw)[0])

    @staticmethod
    def kernel_features() -> TunFlag:
        """The TUNSETIFF flags this kernel's tun driver supports (TUNGETFEATURES)."""
        fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC)
        try:
            return TunFlag(struct.unpack("I", fcntl.ioctl(fd, TUNGETFEATURES, bytes(4)))[0])
        finally:
            os.close(fd)

    def exists(self) -> bool:
        """Whether the interface is still there (someone may have deleted it)."""
        return interface_exists(self.name)

    @property
    def ifindex(self) -> int:
        return socket.if_nametoindex(self.name)

    # -- control ------------------------------------------------------------------------------------
    def set_offload(self, offload: Offload) -> None:
        """Tell the kernel which offloads the reader accepts (TUNSETOFFLOAD, for the whole interface)."""
        fd = self.fds[self.attached.index(True)] if any(self.attached) else self.fds[0]
        try:
            fcntl.ioctl(fd, TUNSETOFFLOAD, int(offload))
        except OSError as exc:
            raise TapError(f"TAP {self.name}: TUNSETOFFLOAD {offload!r}: {exc.strerror}") from None
        self.offload = offload

    def accepts_offload(self, offload: Offload) -> bool:
        """Whether this TAP (its kernel) takes ``offload`` in TUNSETOFFLOAD: tried, then the flags set before
        are put back. False when the TAP has no open queue."""
        if not self.fds:
            return False
        fd = self.fds[self.attached.index(True)] if any(self.attached) else self.fds[0]
        try:
            fcntl.ioctl(fd, TUNSETOFFLOAD, int(offload))
        except OSError:
            return False
        try:
            fcntl.ioctl(fd, TUNSETOFFLOAD, int(self.offload))
        except OSError as exc:
            raise TapError(f"TAP {self.name}: TUNSETOFFLOAD {self.offload!r} (restoring after a probe): "
                           f"{exc.strerror}") from None
        return True

    def set_queue_attached(self, queue: int, attached: bool) -> None:
        """Attach or detach queue ``queue`` (multi-queue TAPs only): detached queues receive nothing."""
        if not self.multi_queue or self.attached[queue] == attached:
            return
        flag = TunFlag.ATTACH_QUEUE if attached else TunFlag.DETACH_QUEUE
        try:
            fcntl.ioctl(self.fds[queue], TUNSETQUEUE, _ifreq("", flag))
        except OSError as exc:
            raise TapError(f"TAP {self.name}: TUNSETQUEUE {flag.name} on queue {queue}: {exc.strerror}") from None
        self.attached[queue] = attached

    def write_fd(self, queue: int) -> int:
        """The descriptor to send queue ``queue``'s frames through (an attached one)."""
        if self.attached[queue]:
            return self.fds[queue]
        return self.fds[self.attached.index(True)] if any(self.attached) else self.fds[queue]

    def configure(self, settings: TapSettings) -> None:
        """Apply MTU, address, bridge and up/down through rtnetlink (pyroute2)."""
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        step = "look up the interface"
        try:
            with IPRoute() as ipr:
                index = self.ifindex
                if settings.mtu is not None:
                    step = f"set mtu {settings.mtu}"
                    ipr.link("set", index=index, mtu=settings.mtu)
                if settings.bridge is not None:
                    step = f"join bridge {settings.bridge}"
                    bridges = ipr.link_lookup(ifname=settings.bridge)
                    if not bridges:
                        raise TapError(f"TAP {self.name}: bridge {settings.bridge} does not exist")
                    ipr.link("set", index=index, master=bridges[0])
                if settings.address is not None:
                    step = f"add address {settings.address}"
                    interface = ipaddress.ip_interface(settings.address)
                    ipr.addr("add", index=index, address=str(interface.ip),
                             prefixlen=interface.network.prefixlen)
                if settings.up:
                    step = "bring the link up"
                    ipr.link("set", index=index, state="up")
        except NetlinkError as exc:
            raise TapError(f"TAP {self.name}: cannot {step}: {os.strerror(exc.code)}") from None
        except OSError as exc:
            raise TapError(f"TAP {self.name}: cannot {step}: {exc.strerror or exc}") from None

    def close(self) -> None:
        """Close every queue (a TAP kvmlet created without persistence disappears)."""
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []
        self.attached = []

    def __enter__(self) -> Tap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _setiff_error(name: str, exc: OSError) -> str:
    what = "a new TAP" if name == AUTO_TEMPLATE else f"TAP {name}"
    if exc.errno == errno.EPERM:
        return f"cannot attach to {what}: permission denied (needs root or CAP_NET_ADMIN, or the TAP's owner)"
    if exc.errno == errno.EBUSY:
        return f"{what} is in use by another process (a single-queue TAP has one user)"
    if exc.errno == errno.EINVAL:
        return (f"cannot attach to {what}: the kernel refused the flags (a multi_queue TAP must be opened "
                "with several queues, a single-queue one with one)")
    return f"cannot attach to {what}: {exc.strerror}"
