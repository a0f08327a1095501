"""The devices a fuzz case drives, each behind a fresh virtio-mmio transport, and their host side.

Everything runs on the calling thread: :class:`SyncLoop` is an :class:`~kvmlet.eventloop.EventLoop`
whose callbacks run only when the fuzzer pumps it (descriptors polled with a zero timeout, timers on a
virtual clock that the fuzz input advances), so that a case is a deterministic function of its input.
The rate limiters get the same virtual clock.

Host side, per fuzzing process (:class:`HostSide`), kept across cases:

* virtio-blk: a 64 KiB raw image in a temporary directory (opened per case, read-only or read-write,
  with or without O_DIRECT);
* virtio-vsock: the device's Unix socket in that directory, and two listeners for guest-initiated
  connections (ports 1024 and 1025) whose connections the fuzzer accepts and feeds;
* virtio-net: a real multi-queue TAP (root and /dev/net/tun needed; without them net cases are
  skipped and counted), kept by a holder whose own queues are detached; each case attaches a queue of its
  own, and frames for the guest are sent into the TAP through a packet socket;
* virtio-rng: nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import heapq
import os
import select
import shutil
import socket
import tempfile
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kvmlet.config.models import RateLimiterConfig, TokenBucketConfig
from kvmlet.devices.irq import NullInterrupt
from kvmlet.devices.virtio.blk import VirtioBlock
from kvmlet.devices.virtio.blk_backend import BlockBackend
from kvmlet.devices.virtio.device import VirtioDevice
from kvmlet.devices.virtio.mmio import MmioTransport
from kvmlet.devices.virtio.net import VirtioNet
from kvmlet.devices.virtio.ratelimit import RateLimiter
from kvmlet.devices.virtio.rng import VirtioRng
from kvmlet.memory import GuestMemory
from tests.fuzz.device_checks import FuzzFailure

KINDS = ("rng", "blk", "vsock", "net")
IMAGE_SIZE = 64 * 1024
GUEST_CID = 3
VSOCK_PEER_PORTS = (1024, 1025)
GUEST_MAC = bytes.fromhex("020000f0f001")
HOST_MAC = bytes.fromhex("020000f0f002")
PUMP_ROUNDS = 64
PACKET_QDISC_BYPASS = 20
SOL_PACKET = 263


class Clock:
    """Virtual monotonic time (seconds) for timers and rate limiters."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class SyncLoop:
    """An EventLoop run by hand: see the module documentation."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.readers: dict[int, Callable[[], None]] = {}
        self.writers: dict[int, Callable[[], None]] = {}
        self.soon: deque[Callable[[], None]] = deque()
        self.timers: list[tuple[float, int, Callable[[], None]]] = []
        self._sequence = 0
        self.errors: list[str] = []

    # -- the EventLoop interface ----------------------------------------------------------------------
    def watch_read(self, fd: int, callback: Callable[[], None]) -> None:
        self.readers[fd] = callback

    def unwatch_read(self, fd: int) -> None:
        self.readers.pop(fd, None)

    def watch_write(self, fd: int, callback: Callable[[], None]) -> None:
        self.writers[fd] = callback

    def unwatch_write(self, fd: int) -> None:
        self.writers.pop(fd, None)

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        self._sequence += 1
        heapq.heappush(self.timers, (self.clock.now + max(delay, 0.0), self._sequence, callback))

    def call_soon(self, callback: Callable[[], None]) -> None:
        self.soon.append(callback)

    # -- running it -----------------------------------------------------------------------------------
    def _call(self, callback: Callable[[], None]) -> None:
        try:
            callback()
        except FuzzFailure:
            raise
        except Exception:  # what asyncio would log as "Exception in callback"
            self.errors.append(traceback.format_exc())

    def run_once(self) -> bool:
        """Run what is due now: call_soon callbacks, due timers, ready descriptors. True if anything ran."""
        ran = False
        for _ in range(len(self.soon)):
            self._call(self.soon.popleft())
            ran = True
        while self.timers and self.timers[0][0] <= self.clock.now:
            self._call(heapq.heappop(self.timers)[2])
            ran = True
        if self.readers or self.writers:
            poller = select.poll()
            for fd in self.readers:
                poller.register(fd, select.POLLIN)
            for fd in self.writers:
                poller.register(fd, select.POLLOUT | (select.POLLIN if fd in self.readers else 0))
            for fd, events in poller.poll(0):
                if events & select.POLLNVAL:
                    raise FuzzFailure("a watched descriptor was closed while watched", f"fd {fd}")
                if events & (select.POLLIN | select.POLLHUP | select.POLLERR) and fd in self.readers:
                    self._call(self.readers[fd])
                    ran = True
                if events & (select.POLLOUT | select.POLLHUP | select.POLLERR) and fd in self.writers:
                    self._call(self.writers[fd])
                    ran = True
        return ran

    def timers_of(self, owner: object) -> int:
        """Pending timers whose callback is a bound method (or partial of one) of ``owner``."""
        count = 0
        for _, _, callback in self.timers:
            func = getattr(callback, "func", callback)
            if getattr(func, "__self__", None) is owner:
                count += 1
        return count


def pump(loop: SyncLoop, transport: MmioTransport | None) -> None:
    """Run the event loop's part until nothing is left to do now (queue notifications included)."""
    for _ in range(PUMP_ROUNDS):
        handled = 0
        if transport is not None:
            try:
                handled = transport.poll()
            except Exception as exc:
                raise FuzzFailure("exception from the transport's queue processing", repr(exc)) from exc
        if not loop.run_once() and not handled:
            break
    else:
        raise FuzzFailure("the event loop never became idle (busy loop)",
                          f"readers {sorted(loop.readers)} writers {sorted(loop.writers)} soon {len(loop.soon)}")
    if loop.errors:
        raise FuzzFailure("exception in an event-loop callback", loop.errors[0].strip().splitlines()[-1]
                          + "\n" + loop.errors[0])


def drain(loop: SyncLoop) -> None:
    """After a close: run every call_soon callback (the descriptors' closes)."""
    for _ in range(PUMP_ROUNDS):
        if not loop.soon:
            break
        for _ in range(len(loop.soon)):
            loop._call(loop.soon.popleft())


# -- guard areas around guest RAM -------------------------------------------------------------------------
_MAP_SHARED, _MAP_PRIVATE, _MAP_FIXED, _MAP_ANONYMOUS = 0x01, 0x02, 0x10, 0x20
_PROT_READ_WRITE = 0x3


class Canaries:
    """Guard pages, filled with a pattern, right before and right after every guest RAM region.

    Devices reach guest RAM only through GuestMemory, whose regions are memoryviews of their mappings (no
    slice of one reaches past it); a raw-pointer path that ran off a region (GuestMemory's memset of whole
    pages, O_DIRECT I/O) would change a canary. To have the canaries exactly there, each region's memfd
    range is mapped again inside a window of anonymous memory, and the region is pointed at that mapping.
    """

    SIZE = 0x4000
    PATTERN = 0xC5

    def __init__(self, memory: GuestMemory) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        self._munmap = libc.munmap
        self.windows: list[tuple[int, int]] = []
        self.areas: list[int] = []
        self._expected = bytes([self.PATTERN]) * self.SIZE
        failed = ctypes.c_void_p(-1).value
        for region in memory.regions:
            total = region.size + 2 * self.SIZE
            window = libc.mmap(None, total, _PROT_READ_WRITE, _MAP_PRIVATE | _MAP_ANONYMOUS, -1, 0)
            if window in (None, failed):
                raise OSError(ctypes.get_errno(), "cannot map the canary window")
            self.windows.append((window, total))
            inner = window + self.SIZE
            got = libc.mmap(inner, region.size, _PROT_READ_WRITE, _MAP_SHARED | _MAP_FIXED, region.fd,
                            region.fd_offset)
            if got != inner:
                raise OSError(ctypes.get_errno(), "cannot map guest RAM inside the canary window")
            for address in (window, inner + region.size):
                ctypes.memset(address, self.PATTERN, self.SIZE)
                self.areas.append(address)
            region.view.release()
            region.view = memoryview((ctypes.c_ubyte * region.size).from_address(inner)).cast("B")
            region.host_address = inner

    def check(self) -> None:
        for address in self.areas:
            if ctypes.string_at(address, self.SIZE) != self._expected:
                raise FuzzFailure("write beyond a guest RAM mapping (a canary changed)", f"at {address:#x}")

    def close(self) -> None:
        """After the GuestMemory is closed (it releases the views into these windows)."""
        for window, total in self.windows:
            self._munmap(window, total)
        self.windows = []
        self.areas = []


# -- the host side ---------------------------------------------------------------------------------------
class HostSide:
    """Files, sockets and the TAP shared by every case of a fuzzing process."""

    def __init__(self, with_net: bool = True) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="kvmlet-fuzz-"))
        self.image = self.dir / "disk.img"
        with open(self.image, "wb") as f:
            f.write(bytes(range(256)) * (IMAGE_SIZE // 256))
        self.uds = str(self.dir / "v.sock")
        self.peer_listeners: list[socket.socket] = []
        for port in VSOCK_PEER_PORTS:
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
            listener.bind(f"{self.uds}_{port}")
            listener.listen(128)
            self.peer_listeners.append(listener)
        self.direct_ok = self._probe_direct()
        self.tap_name: str | None = None
        self.net_skip_reason = ""
        self._tap_holder = None
        self.packet: socket.socket | None = None
        if with_net:
            self._open_tap()
        self.files = sorted(os.listdir(self.dir))

    def _probe_direct(self) -> bool:
        try:
            BlockBackend.open(str(self.image), direct=True).close()
        except Exception:
            return False
        return True

    def _open_tap(self) -> None:
        if os.geteuid() != 0 or not os.path.exists("/dev/net/tun"):
            self.net_skip_reason = "virtio-net needs a TAP: root and /dev/net/tun"
            return
        from kvmlet.net.tap import Tap, TapError
        from tests.support.netlab import quiet_tap

        try:
            holder = quiet_tap(2)   # multi-queue: every case attaches a queue of its own
            for queue in range(holder.queues):
                holder.set_queue_attached(queue, False)
        except (TapError, OSError) as exc:
            self.net_skip_reason = f"no TAP: {exc}"
            return
        self._tap_holder = holder
        self.tap_name = holder.name
        assert isinstance(holder, Tap)
        packet = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        with contextlib.suppress(OSError):
            packet.setsockopt(SOL_PACKET, PACKET_QDISC_BYPASS, 1)  # sent at once, not by a softirq
        packet.bind((holder.name, 0))
        packet.setblocking(False)
        self.packet = packet

    def accept_peers(self) -> list[socket.socket]:
        """Connections the devices made to the peer listeners (guest-initiated vsock connections)."""
        out = []
        for listener in self.peer_listeners:
            while True:
                try:
                    sock, _ = listener.accept()
                except (BlockingIOError, InterruptedError):
                    break
                sock.setblocking(False)
                out.append(sock)
        return out

    def inject_frame(self, frame: bytes) -> None:
        if self.packet is not None:
            with contextlib.suppress(OSError):
                self.packet.send(frame)

    def close(self) -> None:
        for listener in self.peer_listeners:
            listener.close()
        if self.packet is not None:
            self.packet.close()
        if self._tap_holder is not None:
            self._tap_holder.close()
        shutil.rmtree(self.dir, ignore_errors=True)


# -- one case's device -------------------------------------------------------------------------------------
@dataclass
class Options:
    """Per-case device options from the input's second byte."""

    limiter: int = 0          # 0 none, 1 bandwidth, 2 operations, 3 both
    readonly: bool = False
    direct: bool = False
    pairs: int = 1
    offloads: bool = True

    @classmethod
    def from_byte(cls, value: int) -> Options:
        return cls(limiter=value & 3, readonly=bool(value & 4), direct=bool(value & 8),
                   pairs=2 if value & 16 else 1, offloads=not value & 32)


def _limiter(kind: int, clock: Clock) -> RateLimiter | None:
    if not kind:
        return None
    bandwidth = TokenBucketConfig(size=4096, refill_time=100) if kind & 1 else None
    ops = TokenBucketConfig(size=2, refill_time=50) if kind & 2 else None
    return RateLimiter(RateLimiterConfig(bandwidth=bandwidth, ops=ops), clock)


@dataclass
class Rig:
    kind: str
    device: VirtioDevice
    transport: MmioTransport
    loop: SyncLoop
    clock: Clock
    host: HostSide
    options: Options
    peers: list[socket.socket] = field(default_factory=list)   # host sockets this case opened or accepted

    def close(self) -> None:
        try:
            self.transport.close()
        finally:
            drain(self.loop)
            for sock in self.peers:
                sock.close()
            self.peers.clear()
            for sock in self.host.accept_peers():
                sock.close()


def make_rig(kind: str, options: Options, host: HostSide, memory: GuestMemory) -> Rig:
    clock = Clock()
    loop = SyncLoop(clock)
    device: VirtioDevice
    if kind == "rng":
        device = VirtioRng(rate_limiter=_limiter(options.limiter, clock))
    elif kind == "blk":
        backend = BlockBackend.open(str(host.image), readonly=options.readonly,
                                    direct=options.direct and host.direct_ok)
        device = VirtioBlock(backend, drive_id="fuzz-drive", rate_limiter=_limiter(options.limiter, clock))
    elif kind == "vsock":
        from kvmlet.devices.virtio.vsock import VirtioVsock  # here: a broken vsock must not stop the others

        device = VirtioVsock(GUEST_CID, host.uds, loop)
    elif kind == "net":
        from kvmlet.net.tap import Tap

        assert host.tap_name is not None
        tap = Tap.open(host.tap_name, options.pairs)
        try:
            device = VirtioNet(tap, GUEST_MAC, loop, offloads=options.offloads,
                               rx_rate_limiter=_limiter(options.limiter & 1, clock),
                               tx_rate_limiter=_limiter(options.limiter & 2, clock))
        except BaseException:
            tap.close()
            raise
    else:
        raise ValueError(kind)
    try:
        transport = MmioTransport(device, memory, NullInterrupt(), loop)
    except BaseException:
        device.close()
        drain(loop)
        raise
    return Rig(kind, device, transport, loop, clock, host, options)
