"""virtio-net (virtio 1.2 section 5.1) on a TAP device, with offloads, merged buffers and multiqueue.

Queues: receiveq1, transmitq1, ..., receiveqN, transmitqN, then the control queue (2N, or 2 when the driver
did not take VIRTIO_NET_F_MQ). Each queue pair has its own TAP queue (file descriptor).

Receive (host to guest): the TAP's descriptor is watched on the event-loop thread; when readable, frames
are read with ``readv`` straight into the guest's receive buffers (the TAP writes the 12-byte virtio
header itself), with a scratch buffer at the end to catch the part of a frame that does not fit. With
VIRTIO_NET_F_MRG_RXBUF a frame spreads over as many buffers as it needs and ``num_buffers`` says how many;
without it a frame larger than one buffer is dropped. When the receive queue has no buffers the TAP is
no longer watched (frames wait in the kernel); the driver's next notification of that queue resumes.
A rate-limited frame stays in the buffers it was read into until the limiter admits it.

Transmit (guest to host): on a notification the chains are written with ``writev`` (header + frame from
guest memory) to the TAP. The header is checked against the negotiated offloads first.

Offloads (the I/OAT idea: protocol work done once, where it is cheapest): the device offers checksum and
TSO in both directions; what the driver accepts for receive (GUEST_CSUM, GUEST_TSO4/6, GUEST_ECN) becomes
the TAP's TUNSETOFFLOAD, so the kernel hands the guest only what it can take. Transmit offloads (CSUM,
HOST_TSO4/6) need nothing from the TAP: it always accepts partial checksums and GSO frames. UDP segmentation
(virtio 1.2 USO: HOST_USO, GUEST_USO4/6, GSO type UDP_L4) is offered only when the TAP's kernel takes
TUN_F_USO4|TUN_F_USO6 (Linux 6.2, probed once per device; the same kernels accept UDP_L4 frames written to a
TAP); the TAP receives large UDP frames for the guest only when it accepted both GUEST_USO4 and GUEST_USO6
(the kernel sets the two together), and segments them itself otherwise. A segmentation type that was not
negotiated is a bad frame in either direction.

A TAP that disappears (``ip link del``) makes reads and writes fail: the device counts the error, reports
link down in its configuration (VIRTIO_NET_F_STATUS) and drops what the guest sends; the VM runs on.
"""

from __future__ import annotations

import collections
import errno
import functools
import os
import struct
from dataclasses import dataclass, field

from kvmlet.devices.state import (
    DeviceStateError,
    NetFrameState,
    NetRxState,
    NetState,
    VirtioDeviceState,
    expect_state,
)
from kvmlet.devices.virtio.constants import DeviceType, feature_bit
from kvmlet.devices.virtio.device import VirtioDevice
from kvmlet.devices.virtio.queue import ChainError, DescriptorChain, DirectChain, Virtqueue
from kvmlet.devices.virtio.ratelimit import (
    RateLimiter,
    check_rate_limiter,
    restore_rate_limiter,
    save_rate_limiter,
)
from kvmlet.eventloop import EventLoop
from kvmlet.net.tap import USO_OFFLOAD, VNET_HDR_SIZE, Offload, Tap, TapError

# Feature bits (5.1.3).
VIRTIO_NET_F_CSUM = 0
VIRTIO_NET_F_GUEST_CSUM = 1
VIRTIO_NET_F_MTU = 3
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_GUEST_TSO4 = 7
VIRTIO_NET_F_GUEST_TSO6 = 8
VIRTIO_NET_F_GUEST_ECN = 9
VIRTIO_NET_F_GUEST_UFO = 10
VIRTIO_NET_F_HOST_TSO4 = 11
VIRTIO_NET_F_HOST_TSO6 = 12
VIRTIO_NET_F_HOST_ECN = 13
VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_NET_F_STATUS = 16
VIRTIO_NET_F_CTRL_VQ = 17
VIRTIO_NET_F_MQ = 22
VIRTIO_NET_F_GUEST_USO4 = 54
VIRTIO_NET_F_GUEST_USO6 = 55
VIRTIO_NET_F_HOST_USO = 56

VIRTIO_NET_S_LINK_UP = 1

# struct virtio_net_hdr (5.1.6): flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers.
NET_HDR = struct.Struct("<BBHHHHH")
assert NET_HDR.size == VNET_HDR_SIZE
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_F_DATA_VALID = 2
VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_UDP = 3
VIRTIO_NET_HDR_GSO_TCPV6 = 4
VIRTIO_NET_HDR_GSO_UDP_L4 = 5           # USO (virtio 1.2): UDP datagrams of gso_size payload bytes each
VIRTIO_NET_HDR_GSO_ECN = 0x80

# Control queue (5.1.6.5).
VIRTIO_NET_OK = 0
VIRTIO_NET_ERR = 1
VIRTIO_NET_CTRL_MQ = 4
VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET = 0

QUEUE_SIZE = 256
CONTROL_QUEUE_SIZE = 64
ETH_HLEN = 14
ETH_FRAME = 1514                      # the largest untagged frame at MTU 1500
MAX_FRAME = 65536 + 1024              # a 64 KiB GSO frame with its headers
RX_BATCH = 64                         # frames per wake-up, so other queues get their turn
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
_MIN_TX = VNET_HDR_SIZE + ETH_HLEN              # the shortest transmit chain that is a frame
_MAX_TX = VNET_HDR_SIZE + MAX_FRAME
_LINK_GONE = {errno.EBADFD, errno.ENODEV, errno.ENXIO, errno.EIO, errno.EBADF, errno.EPIPE}

OFFLOAD_FEATURES = (feature_bit(VIRTIO_NET_F_CSUM) | feature_bit(VIRTIO_NET_F_GUEST_CSUM)
                    | feature_bit(VIRTIO_NET_F_GUEST_TSO4) | feature_bit(VIRTIO_NET_F_GUEST_TSO6)
                    | feature_bit(VIRTIO_NET_F_GUEST_ECN) | feature_bit(VIRTIO_NET_F_HOST_TSO4)
                    | feature_bit(VIRTIO_NET_F_HOST_TSO6) | feature_bit(VIRTIO_NET_F_HOST_ECN))
# Offered besides OFFLOAD_FEATURES when the TAP takes USO (VirtioNet.uso).
USO_FEATURES = (feature_bit(VIRTIO_NET_F_GUEST_USO4) | feature_bit(VIRTIO_NET_F_GUEST_USO6)
                | feature_bit(VIRTIO_NET_F_HOST_USO))
_GUEST_USO = feature_bit(VIRTIO_NET_F_GUEST_USO4) | feature_bit(VIRTIO_NET_F_GUEST_USO6)

# (feature, what it needs: one of these) from 5.1.3.1.
_DEPENDENCIES = (
    (VIRTIO_NET_F_GUEST_TSO4, (VIRTIO_NET_F_GUEST_CSUM,)),
    (VIRTIO_NET_F_GUEST_TSO6, (VIRTIO_NET_F_GUEST_CSUM,)),
    (VIRTIO_NET_F_GUEST_ECN, (VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6)),
    (VIRTIO_NET_F_HOST_TSO4, (VIRTIO_NET_F_CSUM,)),
    (VIRTIO_NET_F_HOST_TSO6, (VIRTIO_NET_F_CSUM,)),
    (VIRTIO_NET_F_HOST_ECN, (VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6)),
    (VIRTIO_NET_F_GUEST_USO4, (VIRTIO_NET_F_GUEST_CSUM,)),
    (VIRTIO_NET_F_GUEST_USO6, (VIRTIO_NET_F_GUEST_CSUM,)),
    (VIRTIO_NET_F_HOST_USO, (VIRTIO_NET_F_CSUM,)),
    (VIRTIO_NET_F_MQ, (VIRTIO_NET_F_CTRL_VQ,)),
)


def features_consistent(features: int) -> bool:
    """Whether every negotiated feature has the features it depends on (virtio 1.2, 5.1.3.1)."""
    for bit, needs in _DEPENDENCIES:
        if features & feature_bit(bit) and not any(features & feature_bit(need) for need in needs):
            return False
    return True


def net_config_space(mac: bytes, link_up: bool, pairs: int, mtu: int | None) -> bytes:
    """The configuration space: MAC, status, max_virtqueue_pairs, MTU."""
    status = VIRTIO_NET_S_LINK_UP if link_up else 0
    return mac + struct.pack("<HHH", status, pairs, mtu or 1500)


def control_queue_index(features: int, pairs: int) -> int | None:
    """The control queue's index for the negotiated ``features``: after all pairs with MQ, 2 without, none
    without CTRL_VQ."""
    if not features & feature_bit(VIRTIO_NET_F_CTRL_VQ):
        return None
    return 2 * pairs if features & feature_bit(VIRTIO_NET_F_MQ) else 2


def answer_control(queue: Virtqueue, chain: DescriptorChain, ack: int) -> None:
    """Complete a control-queue command with its one-byte ack (returned unanswered if the driver left no room)."""
    if chain.writable.length:
        chain.writable.write(bytes([ack]))
        queue.complete(chain, 1)
    else:
        queue.push(chain.head, 0)


def offload_for_features(features: int) -> Offload:
    """The TUNSETOFFLOAD flags matching the receive offloads a driver accepted. USO only with both GUEST_USO4
    and GUEST_USO6 (and GUEST_CSUM): the kernel takes TUN_F_USO4 and TUN_F_USO6 only together."""
    offload = Offload.NONE
    for bit, flag in ((VIRTIO_NET_F_GUEST_CSUM, Offload.CSUM), (VIRTIO_NET_F_GUEST_TSO4, Offload.TSO4),
                      (VIRTIO_NET_F_GUEST_TSO6, Offload.TSO6), (VIRTIO_NET_F_GUEST_ECN, Offload.TSO_ECN)):
        if features & feature_bit(bit):
            offload |= flag
    if features & _GUEST_USO == _GUEST_USO and offload & Offload.CSUM:
        offload |= Offload.USO4 | Offload.USO6
    return offload


@dataclass
class NetStats:
    """What the device counted; guest and host mistakes are counted, never fatal."""

    rx_frames: int = 0
    rx_bytes: int = 0
    rx_merged_buffers: int = 0        # buffers beyond the first used by merged frames
    rx_dropped: int = 0               # did not fit / offload the driver did not accept
    rx_bad_buffers: int = 0           # receive chains the device cannot use
    rx_throttled: int = 0
    tx_frames: int = 0
    tx_bytes: int = 0
    tx_dropped: int = 0               # link down
    tx_bad_frames: int = 0            # malformed chains, offloads not negotiated, rejected by the TAP
    tx_throttled: int = 0
    tap_errors: int = 0
    link_changes: int = 0
    control_commands: int = 0
    control_errors: int = 0
    rx_frames_by_queue: list[int] = field(default_factory=list)
    tx_frames_by_queue: list[int] = field(default_factory=list)
    last_error: str = ""


@dataclass
class _Frame:
    """A received frame held in guest buffers, not yet given to the driver."""

    chains: list[DescriptorChain]
    lengths: list[int]
    size: int                          # header + frame bytes
    rest: bytes = b""                  # what still needs buffers (merged receive)
    admitted: bool = False             # by the rate limiter


@dataclass
class _Pair:
    """Receive state of one queue pair."""

    scratch: bytearray = field(default_factory=lambda: bytearray(MAX_FRAME))
    spare: collections.deque[DescriptorChain] = field(default_factory=collections.deque)
    frame: _Frame | None = None
    watching: bool = False
    expected: int = VNET_HDR_SIZE + ETH_FRAME


class VirtioNet(VirtioDevice):
    """A network device backed by a (multi-queue) TAP."""

    device_type = DeviceType.NET

    def __init__(self, tap: Tap, mac: bytes, watcher: EventLoop, *, offloads: bool = True,
                 mtu: int | None = None, name: str = "virtio-net0",
                 rx_rate_limiter: RateLimiter | None = None, tx_rate_limiter: RateLimiter | None = None,
                 queue_size: int = QUEUE_SIZE) -> None:
        if len(mac) != 6:
            raise ValueError(f"a MAC address has 6 bytes, not {len(mac)}")
        self.pairs = tap.queues
        sizes = [queue_size] * (2 * self.pairs) + ([CONTROL_QUEUE_SIZE] if self.pairs > 1 else [])
        super().__init__(sizes, name)
        self.tap = tap
        self.mac = bytes(mac)
        self.watcher = watcher
        self.offloads = offloads
        self.mtu = mtu
        self.rx_rate_limiter = rx_rate_limiter
        self.tx_rate_limiter = tx_rate_limiter
        self.stats = NetStats(rx_frames_by_queue=[0] * self.pairs, tx_frames_by_queue=[0] * self.pairs)
        self.link_up = tap.exists()
        self.active_pairs = 1
        self.offload = Offload.NONE        # what TUNSETOFFLOAD last set
        self.uso = offloads and tap.accepts_offload(USO_OFFLOAD)   # offer USO_FEATURES (probed once, here)
        self.control_index: int | None = None
        self._pair = [_Pair() for _ in range(self.pairs)]

    # -- negotiation and configuration ---------------------------------------------------------------
    def specific_features(self) -> int:
        features = (feature_bit(VIRTIO_NET_F_MAC) | feature_bit(VIRTIO_NET_F_STATUS)
                    | feature_bit(VIRTIO_NET_F_MRG_RXBUF))
        if self.offloads:
            features |= OFFLOAD_FEATURES
        if self.uso:
            features |= USO_FEATURES
        if self.mtu is not None:
            features |= feature_bit(VIRTIO_NET_F_MTU)
        if self.pairs > 1:
            features |= feature_bit(VIRTIO_NET_F_CTRL_VQ) | feature_bit(VIRTIO_NET_F_MQ)
        return features

    def accept_features(self, features: int) -> bool:
        return features_consistent(features)

    def config_space(self) -> bytes:
        return net_config_space(self.mac, self.link_up, self.pairs, self.mtu)

    # -- lifecycle -------------------------------------------------------------------------------------
    def on_activate(self) -> None:
        self.control_index = control_queue_index(self.features, self.pairs)
        self._pair = [_Pair() for _ in range(self.pairs)]
        self.link_up = self.tap.exists() and bool(self.tap.fds)
        self._set_active_pairs(1)
        self._set_offload(offload_for_features(self.features))
        self._update_watches()

    def on_reset(self) -> None:
        for pair in range(self.pairs):
            self._set_watch(pair, False)
        self._pair = [_Pair() for _ in range(self.pairs)]
        self.control_index = None
        if self.link_up:
            self._set_offload(Offload.NONE)

    def close(self) -> None:
        for pair in range(self.pairs):
            self._set_watch(pair, False)
        self.link_up = False
        self.watcher.call_soon(self.tap.close)  # after the loop has forgotten the descriptors

    def _set_offload(self, offload: Offload) -> None:
        try:
            self.tap.set_offload(offload)
            self.offload = offload
        except TapError as exc:
            if offload & (Offload.USO4 | Offload.USO6) and not self.tap.accepts_offload(USO_OFFLOAD):
                # a TAP on a kernel without USO (a restore elsewhere): it segments for the guest instead
                self._set_offload(offload & ~(Offload.USO4 | Offload.USO6))
            else:
                self._tap_error(exc, None)

    def _set_active_pairs(self, count: int) -> None:
        self.active_pairs = count
        for pair in range(self.pairs):
            try:
                self.tap.set_queue_attached(pair, pair < count)
            except TapError as exc:
                self._tap_error(exc, None)
        self._update_watches()

    # -- watching the TAP ------------------------------------------------------------------------------
    def _want_watch(self, pair: int) -> bool:
        if not (self.active and self.link_up and pair < self.active_pairs and pair < len(self.tap.fds)):
            return False
        queue = self.queues[2 * pair] if 2 * pair < len(self.queues) else None
        return queue is not None and queue.ready and self._pair[pair].frame is None

    def _update_watches(self) -> None:
        for pair in range(self.pairs):
            self._set_watch(pair, self._want_watch(pair))

    def _set_watch(self, pair: int, on: bool) -> None:
        state = self._pair[pair]
        if state.watching == on or pair >= len(self.tap.fds):
            return
        state.watching = on
        fd = self.tap.fds[pair]
        if on:
            self.watcher.watch_read(fd, lambda: self._tap_readable(pair, fd))
        else:
            self.watcher.unwatch_read(fd)

    def _tap_readable(self, pair: int, fd: int) -> None:
        """Event-loop thread: a TAP queue has frames."""
        host = self.host
        if host is None or not self._want_watch(pair) or self.tap.fds[pair] != fd:
            self.watcher.unwatch_read(fd)  # a callback that outlived its watch
            return
        host.process_queue(2 * pair)

    # -- requests --------------------------------------------------------------------------------------
    def process_queue(self, index: int) -> None:
        if index == self.control_index:
            self.drain_queue(self.queues[index], self._control)
        elif index < 2 * self.pairs:
            pair, transmit = divmod(index, 2)
            if transmit:
                self._transmit_queue(pair)
            elif pair < self.active_pairs:
                self._receive(pair)

    # -- receive ---------------------------------------------------------------------------------------
    def _receive(self, pair: int) -> None:
        queue = self.queues[2 * pair]
        state = self._pair[pair]
        try:
            for _ in range(RX_BATCH):
                if not self.link_up:
                    return
                if state.frame is None:
                    if not self._read_frame(pair, state, queue):
                        return
                    if state.frame is None:
                        continue  # the frame was dropped
                if not self._deliver(pair, state, queue):
                    self._set_watch(pair, False)
                    if state.frame is not None and state.frame.rest and queue.enable_notification():
                        continue  # buffers arrived meanwhile
                    return
            self._set_watch(pair, True)  # more may be waiting: the loop calls again
        finally:
            self._signal_if_needed(queue)

    def _take_chain(self, state: _Pair, queue: Virtqueue) -> DescriptorChain | None:
        if state.spare:
            return state.spare.popleft()
        while (chain := queue.pop()) is not None:
            if chain.readable.length or chain.writable.length < VNET_HDR_SIZE:
                self.stats.rx_bad_buffers += 1
                self.stats.last_error = f"receive chain {chain.head} is not a device-writable buffer of at " \
                                        f"least {VNET_HDR_SIZE} bytes"
                queue.push(chain.head, 0)
                continue
            return chain
        return None

    def _read_frame(self, pair: int, state: _Pair, queue: Virtqueue) -> bool:
        """Read one frame from the TAP into guest buffers (state.frame); False: stop for now."""
        merge = self.has_feature(VIRTIO_NET_F_MRG_RXBUF)
        chains: list[DescriptorChain] = []
        views: list[memoryview] = []
        capacity = 0
        while True:
            while not chains or (merge and capacity < state.expected):
                chain = self._take_chain(state, queue)
                if chain is None:
                    break
                chain_views = chain.writable.views()
                if len(chain_views) >= IOV_MAX:
                    self.stats.rx_bad_buffers += 1
                    queue.push(chain.head, 0)
                    continue
                if len(views) + len(chain_views) >= IOV_MAX:
                    state.spare.appendleft(chain)
                    break
                chains.append(chain)
                views.extend(chain_views)
                capacity += chain.writable.length
            if chains:
                break
            self._set_watch(pair, False)
            if not queue.enable_notification():
                return False  # no buffers: the driver's notification resumes
        scratch = memoryview(state.scratch)
        try:
            size = os.readv(self.tap.fds[pair], [*views, scratch])
        except (BlockingIOError, InterruptedError):
            size = -1
        except OSError as exc:
            size = -1
            self._tap_error(exc, pair)
        finally:
            views.clear()
        if size > 0 and queue.memory.dirty_tracking:
            for chain in chains:   # written now, completed later (or used again for the next frame)
                queue.mark_written(chain)
        if size < 0:
            state.spare.extendleft(reversed(chains))
            if self.link_up:
                self._set_watch(pair, True)
            return False
        if size < VNET_HDR_SIZE + ETH_HLEN:
            state.spare.extendleft(reversed(chains))
            self.stats.rx_dropped += 1
            return True
        state.expected = max(VNET_HDR_SIZE + ETH_FRAME, size)
        if size > capacity and not merge:
            state.spare.extendleft(reversed(chains))
            self.stats.rx_dropped += 1
            self.stats.last_error = f"a {size - VNET_HDR_SIZE}-byte frame does not fit a {capacity}-byte " \
                                    "receive buffer (and merged buffers were not negotiated)"
            return True
        used: list[DescriptorChain] = []
        lengths: list[int] = []
        left = size
        for chain in chains:
            if left <= 0:
                state.spare.append(chain)
                continue
            take = min(left, chain.writable.length)
            used.append(chain)
            lengths.append(take)
            left -= take
        rest = bytes(state.scratch[:left]) if left > 0 else b""
        state.frame = _Frame(used, lengths, size, rest)
        return True

    def _deliver(self, pair: int, state: _Pair, queue: Virtqueue) -> bool:
        """Complete and publish state.frame; False when it waits for buffers or the rate limiter."""
        frame = state.frame
        assert frame is not None
        while frame.rest:
            chain = self._take_chain(state, queue)
            if chain is None:
                return False
            written = chain.writable.write(frame.rest)
            frame.chains.append(chain)
            frame.lengths.append(written)
            frame.rest = frame.rest[written:]
        if not frame.admitted and self.defer_for_rate_limit(queue, self.rx_rate_limiter,
                                                            frame.size - VNET_HDR_SIZE, put_back=False):
            self.stats.rx_throttled += 1
            return False
        frame.admitted = True
        state.frame = None
        first = frame.chains[0].writable
        header = self._rx_header(first.read(0, VNET_HDR_SIZE), len(frame.chains))
        if header is None:
            self.stats.rx_dropped += 1
            self._refund(self.rx_rate_limiter, frame.size - VNET_HDR_SIZE)  # charge only what is delivered
            state.spare.extendleft(reversed(frame.chains))
            return True
        first.write(header)
        for chain, length in zip(frame.chains, frame.lengths, strict=True):
            queue.complete(chain, length)
        self.stats.rx_frames += 1
        self.stats.rx_bytes += frame.size - VNET_HDR_SIZE
        self.stats.rx_merged_buffers += len(frame.chains) - 1
        self.stats.rx_frames_by_queue[pair] += 1
        return True

    def _rx_header(self, raw: bytes, buffers: int) -> bytes | None:
        """The header the driver sees, or None if the frame uses an offload it did not accept."""
        flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, _ = NET_HDR.unpack(raw)
        if not self.has_feature(VIRTIO_NET_F_GUEST_CSUM):
            flags = 0  # 5.1.6.4.1: flags zero, the frame fully checksummed (the TAP does it)
        flags &= VIRTIO_NET_HDR_F_NEEDS_CSUM | VIRTIO_NET_HDR_F_DATA_VALID
        kind = gso_type & ~VIRTIO_NET_HDR_GSO_ECN
        allowed = {VIRTIO_NET_HDR_GSO_NONE: True,
                   VIRTIO_NET_HDR_GSO_TCPV4: self.has_feature(VIRTIO_NET_F_GUEST_TSO4),
                   VIRTIO_NET_HDR_GSO_TCPV6: self.has_feature(VIRTIO_NET_F_GUEST_TSO6),
                   # the TAP sends UDP_L4 only with TUN_F_USO4|USO6, set only when both were accepted
                   VIRTIO_NET_HDR_GSO_UDP_L4: self.features & _GUEST_USO == _GUEST_USO}
        if not allowed.get(kind, False) or (gso_type & VIRTIO_NET_HDR_GSO_ECN and (
                kind == VIRTIO_NET_HDR_GSO_UDP_L4 or not self.has_feature(VIRTIO_NET_F_GUEST_ECN))):
            return None
        return NET_HDR.pack(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, buffers)

    # -- transmit --------------------------------------------------------------------------------------
    def _transmit_queue(self, pair: int) -> None:
        """Send every frame the driver queued on transmitq ``pair``."""
        queue = self.queues[2 * pair + 1]
        direct = None
        if self.tx_rate_limiter is None and self.link_up:
            direct = functools.partial(self._transmit_direct, pair, queue, self.tap.write_fd(pair))
        self.drain_queue(queue, lambda chain: self._transmit(pair, chain), direct)

    def _transmit_direct(self, pair: int, queue: Virtqueue, fd: int, direct: DirectChain) -> bool:
        """The short path for the commonest frames: header and frame in one direct descriptor, or the
        header in one and the frame in the next, with a plain header (no segmentation, no flag beyond
        NEEDS_CSUM). The header is copied once and sent as it is. False for any other frame, and once
        the link is down: :meth:`_transmit` takes those (and a frame the TAP could not take now, which
        it retries and reschedules). Not offered at all while a transmit rate limiter is set."""
        if not self.link_up:   # the link went down during this drain
            return False
        head, buffers = direct
        view = buffers[0].view
        if len(buffers) == 1:
            frame, size = view[VNET_HDR_SIZE:], len(view)
        elif len(buffers) == 2 and len(view) == VNET_HDR_SIZE:
            frame = buffers[1].view
            size = VNET_HDR_SIZE + len(frame)
        else:
            return False
        header = bytes(view[:VNET_HDR_SIZE])  # the guest cannot change this copy
        if (buffers[-1].writable or not _MIN_TX <= size <= _MAX_TX or header[1]
                or header[0] > VIRTIO_NET_HDR_F_NEEDS_CSUM or header[10] or header[11]):
            return False
        try:
            os.writev(fd, (header, frame))
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            self._sent(pair, queue, head, size, exc)
            return True
        finally:
            del view, frame
        self._sent(pair, queue, head, size)
        return True

    def _sent(self, pair: int, queue: Virtqueue, head: int, size: int, error: OSError | None = None) -> None:
        """Give a transmitted chain back and count it: sent, or what the TAP's refusal means."""
        queue.push(head, 0)
        stats = self.stats
        if error is None:
            stats.tx_frames += 1
            stats.tx_bytes += size - VNET_HDR_SIZE
            stats.tx_frames_by_queue[pair] += 1
        elif self._tap_error(error, pair):
            stats.tx_dropped += 1
        else:
            stats.tx_bad_frames += 1  # e.g. a GSO header the kernel refused

    def _transmit(self, pair: int, chain: DescriptorChain) -> bool:
        queue = self.queues[2 * pair + 1]
        frame = chain.readable
        size = frame.length
        if chain.writable.length or not _MIN_TX <= size <= _MAX_TX:
            self.stats.tx_bad_frames += 1
            self.stats.last_error = f"transmit chain {chain.head}: {size} device-readable bytes " \
                                    f"({chain.writable.length} writable) is not a frame"
            queue.push(chain.head, 0)
            return True
        if not self.link_up:
            self.stats.tx_dropped += 1
            queue.push(chain.head, 0)
            return True
        header = self._tx_header(frame.read(0, VNET_HDR_SIZE))
        if header is None:
            self.stats.tx_bad_frames += 1
            self.stats.last_error = "transmit frame uses a segmentation offload that was not negotiated"
            queue.push(chain.head, 0)
            return True
        if self.defer_for_rate_limit(queue, self.tx_rate_limiter, size - VNET_HDR_SIZE):
            self.stats.tx_throttled += 1
            return False
        views = frame.views()
        if len(views[0]) > VNET_HDR_SIZE:     # header and frame in one buffer: cut the header off
            views[0] = views[0][VNET_HDR_SIZE:]
        elif len(views[0]) == VNET_HDR_SIZE:  # the header in a buffer of its own (as Linux sends it)
            del views[0]
        else:
            views = frame.slice(VNET_HDR_SIZE).views()
        # The checked copy of the header goes out, never the guest's (which it could change meanwhile).
        iov: list[bytes | memoryview] = [header, *views] if len(views) < IOV_MAX else [
            header, b"".join(views)]
        try:
            os.writev(self.tap.write_fd(pair), iov)
        except (BlockingIOError, InterruptedError):
            self._refund(self.tx_rate_limiter, size - VNET_HDR_SIZE)  # charged again when it is sent
            queue.undo_pop()
            if self.host is not None:
                self.host.schedule_queue(queue.index, 0.001)
            return False
        except OSError as exc:
            self._refund(self.tx_rate_limiter, size - VNET_HDR_SIZE)  # charge only what is sent
            self._sent(pair, queue, chain.head, size, exc)
            return True
        finally:
            views.clear()
            iov.clear()
        self._sent(pair, queue, chain.head, size)
        return True

    @staticmethod
    def _refund(limiter: RateLimiter | None, nbytes: int) -> None:
        if limiter is not None:
            limiter.refund(nbytes)

    def _tx_header(self, raw: bytes) -> bytes | None:
        flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, _ = NET_HDR.unpack(raw)
        flags &= VIRTIO_NET_HDR_F_NEEDS_CSUM  # 5.1.6.2.2: unknown flag bits are ignored
        kind = gso_type & ~VIRTIO_NET_HDR_GSO_ECN
        if kind == VIRTIO_NET_HDR_GSO_NONE:  # no segmentation: always allowed (ECN bit dropped)
            return NET_HDR.pack(flags, VIRTIO_NET_HDR_GSO_NONE, hdr_len, gso_size, csum_start, csum_offset, 0)
        allowed = {VIRTIO_NET_HDR_GSO_NONE: True,
                   VIRTIO_NET_HDR_GSO_TCPV4: self.has_feature(VIRTIO_NET_F_HOST_TSO4),
                   VIRTIO_NET_HDR_GSO_TCPV6: self.has_feature(VIRTIO_NET_F_HOST_TSO6),
                   VIRTIO_NET_HDR_GSO_UDP_L4: self.has_feature(VIRTIO_NET_F_HOST_USO)}
        if not allowed.get(kind, False):
            return None
        if kind == VIRTIO_NET_HDR_GSO_NONE:
            gso_type = VIRTIO_NET_HDR_GSO_NONE
        elif gso_type & VIRTIO_NET_HDR_GSO_ECN and (kind == VIRTIO_NET_HDR_GSO_UDP_L4
                                                    or not self.has_feature(VIRTIO_NET_F_HOST_ECN)):
            return None   # ECN is TCP's; a UDP_L4 frame with it is malformed
        return NET_HDR.pack(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, 0)

    # -- control queue ---------------------------------------------------------------------------------
    def _control(self, chain: DescriptorChain) -> bool:
        assert self.control_index is not None
        queue = self.queues[self.control_index]
        self.stats.control_commands += 1
        ack = VIRTIO_NET_ERR
        command = chain.readable.read(0, 4)
        if len(command) >= 2 and command[0] == VIRTIO_NET_CTRL_MQ and \
                command[1] == VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET and self.has_feature(VIRTIO_NET_F_MQ):
            pairs = struct.unpack_from("<H", command, 2)[0] if len(command) >= 4 else 0
            if 1 <= pairs <= self.pairs:
                self._set_active_pairs(pairs)
                ack = VIRTIO_NET_OK
        if ack != VIRTIO_NET_OK:
            self.stats.control_errors += 1
            self.stats.last_error = f"control command {command[:2].hex() or '(none)'} refused"
        answer_control(queue, chain, ack)
        return True

    # -- snapshots -------------------------------------------------------------------------------------
    def save_state(self) -> NetState:
        """The guest's view (MAC, link, queue pairs, offloads) and the receive chains the device holds."""
        rx = []
        for pair in self._pair:
            frame = pair.frame
            rx.append(NetRxState(spare=[chain.head for chain in pair.spare], expected=pair.expected, frame=None
                                 if frame is None else NetFrameState(heads=[chain.head for chain in frame.chains],
                                                                     lengths=list(frame.lengths), size=frame.size,
                                                                     rest=frame.rest, admitted=frame.admitted)))
        return NetState(mac=self.mac, tap_name=self.tap.name, offloads=int(self.offload),
                        active_pairs=self.active_pairs, link_up=self.link_up, rx=rx if self.active else [],
                        rx_rate_limiter=save_rate_limiter(self.rx_rate_limiter),
                        tx_rate_limiter=save_rate_limiter(self.tx_rate_limiter))

    def check_state(self, state: VirtioDeviceState) -> None:
        saved = expect_state(state, NetState, self.name)
        if len(saved.mac) != 6:
            raise DeviceStateError(f"{self.name}: the saved MAC address has {len(saved.mac)} bytes, not 6")
        if not 1 <= saved.active_pairs <= self.pairs or len(saved.rx) not in (0, self.pairs):
            raise DeviceStateError(f"{self.name}: the saved device used {max(saved.active_pairs, len(saved.rx))} "
                                   f"queue pairs; this TAP has {self.pairs}")
        check_rate_limiter(self.rx_rate_limiter, saved.rx_rate_limiter, f"{self.name} rx")
        check_rate_limiter(self.tx_rate_limiter, saved.tx_rate_limiter, f"{self.name} tx")
        if saved.offloads & (Offload.USO4 | Offload.USO6) and not self.uso:
            raise DeviceStateError(f"{self.name}: the guest uses UDP segmentation offload (USO), which TAP "
                                   f"{self.tap.name} does not support here (Linux 6.2 or later has it)")

    def restore_state(self, state: VirtioDeviceState) -> None:
        """The guest keeps its MAC; the negotiated offloads go to the new TAP; the receive chains held at the
        snapshot are taken again from the descriptor table (guest memory holds them, and their frames)."""
        self.check_state(state)
        assert isinstance(state, NetState)
        self.mac = bytes(state.mac)
        restore_rate_limiter(self.rx_rate_limiter, state.rx_rate_limiter, f"{self.name} rx")
        restore_rate_limiter(self.tx_rate_limiter, state.tx_rate_limiter, f"{self.name} tx")
        if not self.active:
            return
        if self.has_feature(VIRTIO_NET_F_HOST_USO) and not self.uso:
            raise DeviceStateError(f"{self.name}: the guest negotiated HOST_USO (it sends UDP_L4 frames), which "
                                   f"TAP {self.tap.name} does not take here (Linux 6.2 or later has it)")
        self._set_offload(Offload(state.offloads))
        self._set_active_pairs(state.active_pairs)
        for index, saved in enumerate(state.rx):
            queue = self.queues[2 * index]
            pair = self._pair[index]
            pair.expected = max(saved.expected, VNET_HDR_SIZE + ETH_FRAME)
            pair.spare.extend(self._held_chain(queue, head) for head in saved.spare)
            frame = saved.frame
            if frame is not None:
                pair.frame = _Frame([self._held_chain(queue, head) for head in frame.heads], list(frame.lengths),
                                    frame.size, frame.rest, frame.admitted)
        if self.link_up != state.link_up and self.host is not None and self.has_feature(VIRTIO_NET_F_STATUS):
            self.stats.link_changes += 1
            self.host.signal_config_change()   # the new TAP's link is not what the guest saw
        self._update_watches()

    def _held_chain(self, queue: Virtqueue, head: int) -> DescriptorChain:
        try:
            return queue.chain_at(head)
        except ChainError as exc:
            raise DeviceStateError(f"{self.name}: a receive chain held at the snapshot is not in guest memory: "
                                   f"{exc}") from None

    # -- failures --------------------------------------------------------------------------------------
    def _tap_error(self, exc: OSError | TapError, pair: int | None) -> bool:
        """Count a TAP failure; True if the TAP is gone (the link is then down)."""
        self.stats.tap_errors += 1
        where = f"TAP {self.tap.name}" + (f" queue {pair}" if pair is not None else "")
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        self.stats.last_error = f"{where}: {reason}"
        gone = isinstance(exc, OSError) and exc.errno in _LINK_GONE
        if gone or not self.tap.exists():
            self.set_link(False)
            return True
        return False

    def set_link(self, up: bool) -> None:
        """Report the link up or down to the driver (and stop reading the TAP while down)."""
        if up == self.link_up:
            return
        self.link_up = up
        self.stats.link_changes += 1
        self._update_watches()
        if self.active and self.host is not None and self.has_feature(VIRTIO_NET_F_STATUS):
            self.host.signal_config_change()
