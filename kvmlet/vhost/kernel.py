"""The kernel's vhost-net (``/dev/vhost-net``): the ioctls of ``linux/vhost.h`` and one open device.

Each open of ``/dev/vhost-net`` is one vhost-net instance serving two rings, receive (0) and transmit (1), of one
queue pair, with a kernel worker thread that moves frames between them and the TAP queue given with
``VHOST_NET_SET_BACKEND``. As in QEMU, a device with N queue pairs opens it N times, each with the TAP's
descriptor for that queue. The set-up is the vhost model (:mod:`kvmlet.vhost.common`): ``VHOST_SET_OWNER`` (the
calling process's memory becomes the instance's), features, the memory table (kvmlet's own virtual addresses:
the kernel reads guest memory through kvmlet's mapping, so no file needs to be shared), then per ring its size,
base, addresses, kick and call eventfds and an error eventfd.

The ioctl numbers are computed like the header's ``_IOW``/``_IOR``/``_IOWR`` from the structures' sizes;
tests/test_vhost_net.py compares them with a C program built against ``<linux/vhost.h>``.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from collections.abc import Sequence

from kvmlet.vhost.common import (
    VRING_ADDR,
    VRING_STATE,
    MemoryRegionSpec,
    VhostError,
    VringAddresses,
)

VHOST_NET_DEVICE = "/dev/vhost-net"
VHOST_VIRTIO = 0xAF                              # the ioctl type of every vhost request
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2

U64 = struct.Struct("=Q")                        # __u64
VRING_FILE = struct.Struct("=Ii")                # struct vhost_vring_file: index, fd (-1: unbind)
MEMORY_HEADER = struct.Struct("=II")             # struct vhost_memory: nregions, padding (then the regions)
MEMORY_REGION = struct.Struct("=QQQQ")           # struct vhost_memory_region: guest_phys_addr, memory_size,
#                                                  userspace_addr, flags_padding
VHOST_FILE_UNBIND = -1
MAX_MEMORY_REGIONS = 64                          # vhost's max_mem_regions module parameter, by default
RX_RING, TX_RING = 0, 1                          # the rings of one vhost-net instance (VHOST_NET_VQ_RX/TX)


def _ioc(direction: int, number: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (VHOST_VIRTIO << 8) | number


def _io(number: int) -> int:
    return _ioc(_IOC_NONE, number, 0)


def _ior(number: int, size: int) -> int:
    return _ioc(_IOC_READ, number, size)


def _iow(number: int, size: int) -> int:
    return _ioc(_IOC_WRITE, number, size)


def _iowr(number: int, size: int) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, number, size)


VHOST_GET_FEATURES = _ior(0x00, U64.size)
VHOST_SET_FEATURES = _iow(0x00, U64.size)
VHOST_SET_OWNER = _io(0x01)
VHOST_RESET_OWNER = _io(0x02)
VHOST_SET_MEM_TABLE = _iow(0x03, MEMORY_HEADER.size)          # sizeof(struct vhost_memory): the flexible array is 0
VHOST_SET_LOG_BASE = _iow(0x04, U64.size)
VHOST_SET_LOG_FD = _iow(0x07, struct.calcsize("=i"))
VHOST_SET_VRING_NUM = _iow(0x10, VRING_STATE.size)
VHOST_SET_VRING_ADDR = _iow(0x11, VRING_ADDR.size)
VHOST_SET_VRING_BASE = _iow(0x12, VRING_STATE.size)
VHOST_GET_VRING_BASE = _iowr(0x12, VRING_STATE.size)
VHOST_SET_VRING_KICK = _iow(0x20, VRING_FILE.size)
VHOST_SET_VRING_CALL = _iow(0x21, VRING_FILE.size)
VHOST_SET_VRING_ERR = _iow(0x22, VRING_FILE.size)
VHOST_SET_BACKEND_FEATURES = _iow(0x25, U64.size)
VHOST_GET_BACKEND_FEATURES = _ior(0x26, U64.size)
VHOST_NET_SET_BACKEND = _iow(0x30, VRING_FILE.size)

_NAMES = {VHOST_GET_FEATURES: "VHOST_GET_FEATURES", VHOST_SET_FEATURES: "VHOST_SET_FEATURES",
          VHOST_SET_OWNER: "VHOST_SET_OWNER", VHOST_SET_MEM_TABLE: "VHOST_SET_MEM_TABLE",
          VHOST_SET_VRING_NUM: "VHOST_SET_VRING_NUM", VHOST_SET_VRING_ADDR: "VHOST_SET_VRING_ADDR",
          VHOST_SET_VRING_BASE: "VHOST_SET_VRING_BASE", VHOST_GET_VRING_BASE: "VHOST_GET_VRING_BASE",
          VHOST_SET_VRING_KICK: "VHOST_SET_VRING_KICK", VHOST_SET_VRING_CALL: "VHOST_SET_VRING_CALL",
          VHOST_SET_VRING_ERR: "VHOST_SET_VRING_ERR", VHOST_NET_SET_BACKEND: "VHOST_NET_SET_BACKEND"}


class VhostKernelError(VhostError):
    """``/dev/vhost-net`` is missing, cannot be opened, or refused a request."""


def missing_device_message(path: str = VHOST_NET_DEVICE) -> str:
    """The one line a user sees when vhost-net is asked for on a host without it."""
    return (f"vhost-net (vhost=on) needs {path}, which this host does not have (the vhost_net module is not "
            "loaded or not available: 'modprobe vhost_net'); leave vhost off to use kvmlet's own TAP data path")


def pack_memory_table(regions: Sequence[MemoryRegionSpec]) -> bytes:
    """``struct vhost_memory`` with its regions: guest-physical address, size and kvmlet's virtual address."""
    if not 1 <= len(regions) <= MAX_MEMORY_REGIONS:
        raise VhostKernelError(f"vhost-net: {len(regions)} memory regions (1 to {MAX_MEMORY_REGIONS} fit the "
                               "kernel's table)")
    return MEMORY_HEADER.pack(len(regions), 0) + b"".join(
        MEMORY_REGION.pack(r.guest_address, r.size, r.user_address, 0) for r in regions)


def pack_vring_addr(index: int, addresses: VringAddresses) -> bytes:
    """``struct vhost_vring_addr`` (no flags: no used-ring logging)."""
    return VRING_ADDR.pack(index, 0, addresses.descriptor, addresses.used, addresses.available, 0)


class VhostNetFd:
    """One open ``/dev/vhost-net``: the two rings of one queue pair (:class:`~kvmlet.vhost.common.VhostChannel`)."""

    def __init__(self, fd: int, path: str = VHOST_NET_DEVICE) -> None:
        self.fd = fd
        self.path = path
        self.features = 0               # what the kernel offers (VHOST_GET_FEATURES)

    @classmethod
    def open(cls, path: str = VHOST_NET_DEVICE) -> VhostNetFd:
        """Open ``path``, take ownership (VHOST_SET_OWNER) and read the features; a clear error if it is absent."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise VhostKernelError(missing_device_message(path)) from None
        except PermissionError:
            raise VhostKernelError(f"cannot open {path}: permission denied (it needs root or membership of its "
                                   "group, usually kvm)") from None
        except OSError as exc:
            raise VhostKernelError(f"cannot open {path}: {exc.strerror}") from None
        channel = cls(fd, path)
        try:
            channel._ioctl(VHOST_SET_OWNER, 0)
            channel.features = channel.get_features()
        except BaseException:
            channel.close()
            raise
        return channel

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = -1

    def _ioctl(self, request: int, argument: int | bytes | bytearray) -> bytes | int:
        try:
            if isinstance(argument, bytearray):    # no 1024-byte limit for a mutable buffer (a large memory table)
                fcntl.ioctl(self.fd, request, argument, True)
                return bytes(argument)
            return fcntl.ioctl(self.fd, request, argument)
        except OSError as exc:
            name = _NAMES.get(request, hex(request))
            hint = " (the memory table must be set first)" if exc.errno == errno.EFAULT else ""
            raise VhostKernelError(f"{self.path}: {name}: {exc.strerror}{hint}") from None

    # -- the vhost model --------------------------------------------------------------------------------
    def get_features(self) -> int:
        raw = self._ioctl(VHOST_GET_FEATURES, bytes(U64.size))
        assert isinstance(raw, bytes)
        return int(U64.unpack(raw)[0])

    def set_features(self, features: int) -> None:
        self._ioctl(VHOST_SET_FEATURES, U64.pack(features))

    def set_mem_table(self, regions: Sequence[MemoryRegionSpec]) -> None:
        self._ioctl(VHOST_SET_MEM_TABLE, bytearray(pack_memory_table(regions)))

    def set_vring_num(self, index: int, size: int) -> None:
        self._ioctl(VHOST_SET_VRING_NUM, VRING_STATE.pack(index, size))

    def set_vring_base(self, index: int, base: int) -> None:
        self._ioctl(VHOST_SET_VRING_BASE, VRING_STATE.pack(index, base))

    def get_vring_base(self, index: int) -> int:
        raw = self._ioctl(VHOST_GET_VRING_BASE, VRING_STATE.pack(index, 0))
        assert isinstance(raw, bytes)
        return int(VRING_STATE.unpack(raw)[1])

    def set_vring_addr(self, index: int, addresses: VringAddresses) -> None:
        self._ioctl(VHOST_SET_VRING_ADDR, pack_vring_addr(index, addresses))

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        self._ioctl(VHOST_SET_VRING_KICK, VRING_FILE.pack(index, VHOST_FILE_UNBIND if fd is None else fd))

    def set_vring_call(self, index: int, fd: int | None) -> None:
        self._ioctl(VHOST_SET_VRING_CALL, VRING_FILE.pack(index, VHOST_FILE_UNBIND if fd is None else fd))

    def set_vring_err(self, index: int, fd: int | None) -> None:
        self._ioctl(VHOST_SET_VRING_ERR, VRING_FILE.pack(index, VHOST_FILE_UNBIND if fd is None else fd))

    def set_backend(self, index: int, tap_fd: int | None) -> None:
        """VHOST_NET_SET_BACKEND: ring ``index`` moves frames to/from this TAP queue (None: detach, stop)."""
        self._ioctl(VHOST_NET_SET_BACKEND, VRING_FILE.pack(index, VHOST_FILE_UNBIND if tap_fd is None else tap_fd))
