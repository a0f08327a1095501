"""What the two vhost back-end transports share: the kernel's ``/dev/vhost-net`` (:mod:`kvmlet.vhost.kernel`) and a
vhost-user socket (:mod:`kvmlet.vhost.protocol`) speak the same model, from ``linux/vhost.h``.

Both take a memory table (one region per memslot: guest-physical address, size, kvmlet's virtual address), and per
ring its size (``num``), its first available index (``base``), the virtual addresses of its three parts, a kick
eventfd (the one KVM's ioeventfd signals) and a call eventfd (the irqfd KVM injects from); ``GET_VRING_BASE`` stops
a ring and returns its position. A :class:`VhostChannel` is one object those requests go to: one vhost-user
connection (all rings), or one ``/dev/vhost-net`` descriptor (the two rings of one queue pair). The two encodings
of a ring's state and addresses are also the same bytes (``struct vhost_vring_state``, ``struct vhost_vring_addr``).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from kvmlet.errors import KvmletError

VRING_STATE = struct.Struct("<II")           # struct vhost_vring_state: index, num
VRING_ADDR = struct.Struct("<IIQQQQ")        # struct vhost_vring_addr: index, flags, descriptor, used, available, log
VHOST_F_LOG_ALL = 26                         # a virtio feature bit: dirty logging of what the back end writes
VHOST_NET_F_VIRTIO_NET_HDR = 27              # vhost-net adds/strips the virtio-net header itself (kvmlet: the TAP does)


class VhostError(KvmletError):
    """A vhost back end (a vhost-user process or the kernel's vhost-net) cannot be reached or refused a request."""


@dataclass(frozen=True)
class MemoryRegionSpec:
    """One region of guest RAM as the back end sees it: where in the guest, how large, kvmlet's virtual address of
    it, and (for a back end in another process, which maps it) the memfd and the offset in it."""

    guest_address: int
    size: int
    user_address: int          # the front end's (kvmlet's) virtual address of the region
    fd: int
    fd_offset: int


@dataclass(frozen=True)
class VringAddresses:
    """A ring's parts as front-end virtual addresses (the back end translates them with the memory table)."""

    descriptor: int
    used: int
    available: int


class VhostChannel(Protocol):
    """The requests of the vhost model, as both transports take them (``index``: the channel's own ring number)."""

    def set_features(self, features: int) -> None: ...

    def set_mem_table(self, regions: Sequence[MemoryRegionSpec]) -> None: ...

    def set_vring_num(self, index: int, size: int) -> None: ...

    def set_vring_base(self, index: int, base: int) -> None: ...

    def set_vring_addr(self, index: int, addresses: VringAddresses) -> None: ...

    def set_vring_kick(self, index: int, fd: int | None) -> None: ...

    def set_vring_call(self, index: int, fd: int | None) -> None: ...

    def get_vring_base(self, index: int) -> int: ...
