"""The hostile virtio driver of the device fuzzer: operations on a transport, and the recovery check.

Each operation is a step (see ``device_checks``): the driver's writes to guest memory first, then its
register accesses, then the event loop's part. ``Driver.probe`` ends a case: reset, a proper
initialization, and one well-formed request that the device must serve.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

from kvmlet.devices.virtio.constants import VIRTIO_F_VERSION_1, DeviceStatus, MmioRegister, feature_bit
from kvmlet.devices.virtio.queue import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from kvmlet.memory import GuestMemory
from tests.fuzz.device_checks import Checker, FuzzFailure
from tests.fuzz.device_inputs import (
    RAM_END,
    REGIONS,
    U32,
    U64,
    Input,
    Part,
    hostile_address,
    hostile_length,
    parts_for,
)
from tests.fuzz.device_rig import GUEST_CID, GUEST_MAC, HOST_MAC, Rig, pump

SLOT = 0x2000                                   # queue q's planned rings: desc, avail +0x1000, used +0x1400
DATA_SPANS = ((0xA000, 0x10000), (0x20000, 0x28000))
MAX_OPS = 40
STATUS_BITS = (1, 2, 4, 8, 64, 128)


@dataclass
class DriverQueue:
    """What the fuzz driver believes it configured for one queue."""

    size: int
    desc: int
    avail: int
    used: int
    avail_idx: int = 0
    next_desc: int = 0
    last_used: int = 0


class Driver:
    """A hostile virtio driver playing an :class:`Input` against a :class:`Rig`."""

    def __init__(self, rig: Rig, memory: GuestMemory, inp: Input, checker: Checker) -> None:
        self.rig = rig
        self.transport = rig.transport
        self.memory = memory
        self.inp = inp
        self.checker = checker
        self.queues: dict[int, DriverQueue] = {}
        self.nq = len(rig.transport.queues)
        self.features = 0
        self.span = 0
        self.cursor = DATA_SPANS[0][0]
        self.begun = False
        # Weights: mostly requests on live queues, with enough register and memory abuse in between.
        self.ops: list[Callable[[], None]] = (
            [self.op_init] * 2 + [self.op_negotiate] + [self.op_setup] * 2 + [self.op_driver_ok] * 2
            + [self.op_chain] * 4 + [self.op_chain_notify] * 10 + [self.op_notify] * 3 + [self.op_register] * 2
            + [self.op_read] + [self.op_config] + [self.op_scribble] * 2 + [self.op_ring_poke] * 2
            + [self.op_host] * 5 + [self.op_time] + [self.op_reset] + [self.op_ack] + [self.op_ready])

    # -- memory and registers -----------------------------------------------------------------------------
    def put(self, gpa: int, data: bytes) -> None:
        """The driver writes guest memory (the parts of the range that are RAM)."""
        assert not self.begun, "the fuzz driver wrote memory after the step began"
        for start, size in REGIONS:
            low, high = max(gpa, start), min(gpa + len(data), start + size)
            if low < high:
                self.memory.write(low, data[low - gpa:high - gpa])

    def get(self, gpa: int, size: int) -> bytes:
        return self.memory.read(gpa, size) if self.memory.contains(gpa, size) else bytes(size)

    def alloc(self, size: int, align: int = 16) -> int:
        """Room for a buffer in the data spans (reused round robin; too big: it runs off the end of RAM)."""
        for _ in range(3):
            end = DATA_SPANS[self.span][1]
            gpa = -(-self.cursor // align) * align
            if gpa + size <= end:
                self.cursor = gpa + size
                return gpa
            self.span = (self.span + 1) % len(DATA_SPANS)
            self.cursor = DATA_SPANS[self.span][0]
        return DATA_SPANS[1][0]

    def begin(self) -> None:
        if not self.begun:
            self.begun = True
            self.checker.begin()

    def write(self, reg: int, value: int, size: int = 4) -> None:
        self.begin()
        try:
            self.transport.bus_write(reg, size, value & ((1 << (8 * size)) - 1))
        except Exception as exc:
            raise FuzzFailure("exception from a register write",
                              f"offset {reg:#x} size {size} value {value:#x}: {exc!r}") from exc

    def read(self, reg: int, size: int = 4) -> int:
        self.begin()
        try:
            return self.transport.bus_read(reg, size)
        except Exception as exc:
            raise FuzzFailure("exception from a register read", f"offset {reg:#x} size {size}: {exc!r}") from exc

    # -- one operation ------------------------------------------------------------------------------------
    def step(self, operation: Callable[[], None]) -> None:
        self.begun = False
        operation()
        self.begin()
        self.checker.registers_done()
        if self.rig.kind == "vsock":
            self.rig.peers.extend(self.rig.host.accept_peers())   # the host's servers take connections at once
        pump(self.rig.loop, self.transport)
        self.checker.end()
        self.begun = False

    def run(self, max_ops: int = MAX_OPS) -> None:
        if self.inp.byte() < 200:
            self.step(self.op_init)
        for _ in range(max_ops):
            if self.inp.exhausted:
                break
            self.step(self.ops[self.inp.below(len(self.ops))])

    # -- initialization -----------------------------------------------------------------------------------
    def offered(self) -> int:
        return self.rig.device.device_features()

    def choose_features(self) -> int:
        offered = self.offered()
        mode = self.inp.byte()
        if mode < 150:
            return offered
        if mode < 200:
            return (offered & self.inp.int(8)) | feature_bit(VIRTIO_F_VERSION_1)
        if mode < 220:
            return offered & ~feature_bit(self.inp.pick([28, 29, 15, 17, 22]))
        if mode < 235:
            return offered | feature_bit(self.inp.pick([34, 35, 38, 40, 63, 3, 60]))
        if mode < 245:
            return offered & ~feature_bit(VIRTIO_F_VERSION_1)
        return self.inp.int(8)

    def placement(self, q: int, size: int, hostile: bool) -> tuple[int, int, int]:
        base = SLOT * (q % 5)
        desc, avail, used = base, base + 0x1000, base + 0x1400
        if not hostile:
            return desc, avail, used
        areas = [desc, avail, used]
        which = self.inp.below(3)
        mode = self.inp.below(8)
        if mode == 0:
            areas[which] = hostile_address(self.inp)
        elif mode == 1:    # across the end of a RAM region
            end = self.inp.pick([0x10000, RAM_END])
            areas[which] = end - self.inp.pick([2, 4, 8, 16, 64, 16 * max(size, 1) // 2])
        elif mode == 2:    # misaligned
            areas[which] += self.inp.pick([1, 2, 3, 8])
        elif mode == 3:    # over another ring (its own or another queue's)
            areas[which] = areas[self.inp.below(3)] + self.inp.pick([0, 4, 16]) + SLOT * self.inp.below(2)
        elif mode == 4:    # anywhere in RAM
            areas = [self.inp.below(RAM_END) & ~15 for _ in range(3)]
        elif mode == 5:    # over the data area
            areas[which] = DATA_SPANS[self.inp.below(2)][0] + (self.inp.below(64) << 4)
        else:              # wrapping
            areas[which] = (U64 - self.inp.pick([0, 1, 15, 0xFFF])) & ~3
        return areas[0], areas[1], areas[2]

    def setup_queue_memory(self, q: int, hostile: bool) -> tuple[int, DriverQueue]:
        maximum = self.transport.queues[q].max_size if q < self.nq else 256
        size = self.inp.pick([maximum, maximum, 16, 8, 1, 2, 64, 0, 3, 1 << 15, maximum * 2]) if hostile else \
            self.inp.pick([maximum, 16, 8, 1, 2, 4, 32])
        size = min(size, maximum * 2) if not hostile else size
        desc, avail, used = self.placement(q, size, hostile)
        dq = DriverQueue(size, desc, avail, used)
        n = min(size, 256)
        for start, length in ((desc, 16 * n), (avail, 6 + 2 * n), (used, 6 + 8 * n)):
            if length <= 0x2000:
                self.put(start, bytes(length))   # a driver zeroes its rings
        return size, dq

    def setup_queue_registers(self, q: int, dq: DriverQueue, ready: int = 1) -> None:
        self.write(MmioRegister.QUEUE_SEL, q)
        self.read(MmioRegister.QUEUE_NUM_MAX)
        self.write(MmioRegister.QUEUE_NUM, dq.size)
        for low, addr in ((MmioRegister.QUEUE_DESC_LOW, dq.desc), (MmioRegister.QUEUE_DRIVER_LOW, dq.avail),
                          (MmioRegister.QUEUE_DEVICE_LOW, dq.used)):
            self.write(low, addr & U32)
            self.write(low + 4, (addr >> 32) & U32)
        if ready:
            self.write(MmioRegister.QUEUE_READY, ready)
        if q < self.nq:
            self.queues[q] = dq

    def negotiate(self, features: int) -> None:
        self.write(MmioRegister.STATUS, 0)
        self.queues.clear()
        self.write(MmioRegister.STATUS, DeviceStatus.ACKNOWLEDGE)
        self.write(MmioRegister.STATUS, DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER)
        for sel in (0, 1):
            self.write(MmioRegister.DEVICE_FEATURES_SEL, sel)
            self.read(MmioRegister.DEVICE_FEATURES)
        for sel in (0, 1):
            self.write(MmioRegister.DRIVER_FEATURES_SEL, sel)
            self.write(MmioRegister.DRIVER_FEATURES, (features >> (32 * sel)) & U32)
        self.write(MmioRegister.STATUS, self.read(MmioRegister.STATUS) | DeviceStatus.FEATURES_OK)
        self.features = features

    def op_init(self) -> None:
        """Reset, negotiate, set up the queues, DRIVER_OK: each part may be skipped or made hostile."""
        control = self.inp.byte()
        features = self.choose_features()
        plans = []
        for q in range(self.nq):
            if self.inp.chance(235):
                plans.append((q, *self.setup_queue_memory(q, hostile=self.inp.chance(20))))
        self.negotiate(features)
        for q, _, dq in plans:
            self.setup_queue_registers(q, dq, 1 if not control & 1 else self.inp.pick([1, 1, 0, 3]))
        if control < 240:
            self.write(MmioRegister.STATUS, self.read(MmioRegister.STATUS) | DeviceStatus.DRIVER_OK)

    def op_negotiate(self) -> None:
        """One step of negotiation, out of order or not."""
        what = self.inp.below(5)
        if what == 0:
            self.write(MmioRegister.DEVICE_FEATURES_SEL, self.inp.pick([0, 1, 2, U32, self.inp.byte()]))
            self.read(MmioRegister.DEVICE_FEATURES)
        elif what == 1:
            self.write(MmioRegister.DRIVER_FEATURES_SEL, self.inp.pick([0, 1, 2, 3, U32]))
            self.write(MmioRegister.DRIVER_FEATURES, self.inp.pick([0, U32, self.inp.int(4),
                                                                    self.offered() & U32, self.offered() >> 32]))
        else:
            bits = 0
            for _ in range(1 + self.inp.below(3)):
                bits |= self.inp.pick(STATUS_BITS)
            if self.inp.chance(40):
                bits = self.inp.byte() | (self.inp.int(3) << 8 if self.inp.chance(30) else 0)
            self.write(MmioRegister.STATUS, self.read(MmioRegister.STATUS) | bits if what < 4 else bits)

    def op_setup(self) -> None:
        q = self.inp.below(self.nq + 1)
        if q == self.nq and self.inp.chance(128):
            q = self.inp.pick([self.nq + 1, 0xFFFF, U32, self.inp.int(4)])
        _, dq = self.setup_queue_memory(min(q, self.nq), hostile=self.inp.chance(128))
        self.setup_queue_registers(q, dq, self.inp.pick([1, 1, 1, 1, 0, 2, 3]))

    def op_driver_ok(self) -> None:
        self.write(MmioRegister.STATUS, self.read(MmioRegister.STATUS) | DeviceStatus.DRIVER_OK)

    def op_reset(self) -> None:
        self.write(MmioRegister.STATUS, 0)
        self.queues.clear()

    def op_ack(self) -> None:
        self.read(MmioRegister.INTERRUPT_STATUS)
        self.write(MmioRegister.INTERRUPT_ACK, self.inp.pick([1, 2, 3, U32, 0]))

    def op_ready(self) -> None:
        """QueueReady written on a live queue (0 stops it; 1 again re-activates it)."""
        q = self.inp.below(self.nq)
        self.write(MmioRegister.QUEUE_SEL, q)
        self.write(MmioRegister.QUEUE_READY, self.inp.pick([0, 1, 0, 2]))

    # -- registers --------------------------------------------------------------------------------------
    def op_register(self) -> None:
        reg = self.inp.pick([int(r) for r in MmioRegister] + [self.inp.int(2) % 0x200, self.inp.byte()])
        value = self.inp.pick([0, 1, 2, 3, 4, 8, 0x40, 0x80, 0xFF, U32, self.inp.int(4), self.inp.byte(), 0x8000,
                               RAM_END, 0x10000])
        size = self.inp.pick([4, 4, 4, 4, 1, 2, 8, 3, 0])
        self.write(reg, value, size if size else 4)
        if reg in (MmioRegister.STATUS,) and value == 0:
            self.queues.clear()

    def op_read(self) -> None:
        reg = self.inp.pick([int(r) for r in MmioRegister] + [self.inp.int(2) % 0x200])
        self.read(reg, self.inp.pick([4, 4, 4, 1, 2, 8, 3]))

    def op_config(self) -> None:
        offset = MmioRegister.CONFIG + self.inp.pick([0, 8, 16, 20, 0x20, 0x3C, 0xFF, 0xF00, self.inp.byte()])
        size = self.inp.pick([1, 2, 4, 8, 3, 16])
        if self.inp.chance(128):
            self.read(offset, size)
        else:
            self.write(offset, self.inp.int(8), size if size <= 8 else 8)

    # -- memory -----------------------------------------------------------------------------------------
    def op_scribble(self) -> None:
        gpa = self.inp.pick([self.inp.below(RAM_END), self.inp.below(0x10000), self.inp.below(0x8000) + 0x20000,
                             hostile_address(self.inp)])
        self.put(gpa, self.inp.take(self.inp.pick([1, 2, 4, 8, 16, 64])))

    def op_ring_poke(self) -> None:
        """The driver changes its rings behind the device's back (and perhaps notifies)."""
        if not self.queues:
            return
        q = self.inp.pick(sorted(self.queues))
        dq = self.queues[q]
        n = max(min(dq.size, 256), 1)
        what = self.inp.below(6)
        if what == 0:
            self.put(dq.avail, struct.pack("<H", self.inp.pick([0, 1, 0xFFFF])))
        elif what == 1:
            dq.avail_idx = (dq.avail_idx + self.inp.pick([1, 0xFFFF, n, n + 1, 0x8000, self.inp.int(2)])) & 0xFFFF
            self.put(dq.avail + 2, struct.pack("<H", dq.avail_idx))
        elif what == 2:
            self.put(dq.avail + 4 + 2 * n, struct.pack("<H", self.inp.int(2)))          # used_event
        elif what == 3:
            self.put(dq.desc + 16 * self.inp.below(n), self.inp.take(16))
        elif what == 4:
            self.put(dq.avail + 4 + 2 * self.inp.below(n), struct.pack("<H", self.inp.pick([0, n - 1, n, 0xFFFF])))
        else:
            self.put(dq.used + self.inp.below(8 * n), self.inp.take(4))
        if self.inp.chance(160):
            self.write(MmioRegister.QUEUE_NOTIFY, q)

    # -- chains -----------------------------------------------------------------------------------------
    def role(self, q: int) -> str:
        kind = self.rig.kind
        if self.inp.chance(12):
            return str(self.inp.below(9))   # a template meant for another queue
        if kind in ("rng", "blk"):
            return kind
        if kind == "vsock":
            return ("vsock_rx", "vsock_tx", "vsock_event")[q] if q < 3 else "vsock_tx"
        control = getattr(self.rig.device, "control_index", None)
        if q == control or (control is None and q == self.nq - 1 and self.nq % 2):
            return "net_ctrl"
        return "net_rx" if q % 2 == 0 else "net_tx"

    def build_chain(self, q: int) -> int | None:
        """Write a chain for queue ``q`` (perhaps damaged) into its descriptor table; returns its head."""
        dq = self.queues.get(q)
        if dq is None or dq.size <= 0:
            return None
        inp = self.inp
        n = min(dq.size, 256)
        parts = parts_for(inp, self.role(q), sorted(getattr(self.rig.device, "connections", {})))
        descriptors: list[list[int]] = []   # [addr, len, flags, next] in chain order
        for content, length, writable in parts:
            gpa = self.alloc(max(length, 1))
            if content and not writable:
                self.put(gpa, content[:length])
            descriptors.append([gpa, length, VIRTQ_DESC_F_WRITE if writable else 0, 0])
        indirect = inp.chance(40 if self.features & feature_bit(28) else 8) and len(descriptors) > 0
        table = 0
        if indirect:
            table = self.alloc(16 * len(descriptors), 16)
            for i, d in enumerate(descriptors):
                if i + 1 < len(descriptors):
                    d[2] |= VIRTQ_DESC_F_NEXT
                    d[3] = i + 1
            main = [[table, 16 * len(descriptors), VIRTQ_DESC_F_INDIRECT, 0]]
        else:
            main = descriptors
        indices = [(dq.next_desc + i) % n for i in range(len(main))]
        dq.next_desc = (dq.next_desc + len(main)) % n
        for i, d in enumerate(main):
            if i + 1 < len(main):
                d[2] |= VIRTQ_DESC_F_NEXT
                d[3] = indices[i + 1]
        self.damage(main, descriptors if indirect else [], indices, n)
        for index, d in zip(indices, main, strict=True):
            self.put(dq.desc + 16 * index, struct.pack("<QIHH", d[0] & U64, d[1] & U32, d[2] & 0xFFFF, d[3] & 0xFFFF))
        if indirect:
            self.put(table, b"".join(struct.pack("<QIHH", d[0] & U64, d[1] & U32, d[2] & 0xFFFF, d[3] & 0xFFFF)
                                     for d in descriptors))
        return indices[0] if indices else None

    def damage(self, main: list[list[int]], table: list[list[int]], indices: list[int], n: int) -> None:
        inp = self.inp
        count = 0 if inp.byte() < 190 else 1 + inp.below(2)
        for _ in range(count):
            target = table if table and inp.chance(128) else main
            if not target:
                continue
            d = target[inp.below(len(target))]
            what = inp.below(9)
            if what == 0:
                d[0] = hostile_address(inp)
            elif what == 1:
                d[1] = hostile_length(inp)
            elif what == 2:
                d[2] ^= inp.below(8)
            elif what == 3:
                d[2] |= VIRTQ_DESC_F_NEXT
                d[3] = inp.pick([indices[0], indices[-1], inp.int(2), n, n - 1, 0])
            elif what == 4:
                d[2] &= ~VIRTQ_DESC_F_NEXT
            elif what == 5 and table:     # the indirect table's length or place
                m = main[0]
                m[1] = inp.pick([m[1] + 8, m[1] - 16, m[1] * 4, 0, 16 * 40000, m[1] + 1])
                if inp.chance(60):
                    m[0] += inp.pick([8, 4, 1])
            elif what == 6:
                d[2] |= VIRTQ_DESC_F_INDIRECT
                if inp.chance(128):
                    d[1] = inp.pick([16, 32, 48, 4096, 17])
            elif what == 7:               # over the rings
                dq_area = self.queues[next(iter(self.queues))] if self.queues else None
                if dq_area is not None:
                    d[0] = inp.pick([dq_area.desc, dq_area.avail, dq_area.used, dq_area.used + 4])
                    d[1] = inp.pick([16, 64, 4096, 2])
            else:
                d[2] |= VIRTQ_DESC_F_WRITE

    def publish(self, q: int, head: int) -> None:
        dq = self.queues[q]
        n = max(min(dq.size, 256), 1)
        mode = self.inp.byte()
        heads = [head]
        if 230 <= mode < 240:
            heads = [self.inp.pick([n, n + 1, 0xFFFF, self.inp.int(2), head ^ 1])]
        elif 240 <= mode < 248:
            heads = [head, head]
        elif mode >= 252:
            return
        for h in heads:
            self.put(dq.avail + 4 + 2 * (dq.avail_idx % n), struct.pack("<H", h & 0xFFFF))
            dq.avail_idx = (dq.avail_idx + 1) & 0xFFFF
        if 248 <= mode < 252:
            dq.avail_idx = (dq.avail_idx + self.inp.int(2)) & 0xFFFF
        self.put(dq.avail + 2, struct.pack("<H", dq.avail_idx))

    def pick_queue(self) -> int | None:
        """A queue the driver set up; half the time the device's request queue (vsock and net: transmit)."""
        if not self.queues:
            return None
        main = 1 if self.rig.kind in ("vsock", "net") else 0
        if main in self.queues and self.inp.chance(128):
            return main
        control = getattr(self.rig.device, "control_index", None)
        if control in self.queues and self.inp.chance(64):
            return int(control)
        return self.inp.pick(sorted(self.queues))

    def op_chain(self) -> None:
        q = self.pick_queue()
        if q is not None and (head := self.build_chain(q)) is not None:
            self.publish(q, head)

    def op_chain_notify(self) -> None:
        q = self.pick_queue()
        if q is None:
            return
        for _ in range(self.inp.pick([1, 1, 1, 2, 4])):
            head = self.build_chain(q)
            if head is not None:
                self.publish(q, head)
        self.write(MmioRegister.QUEUE_NOTIFY, q if self.inp.chance(245) else self.inp.int(4))

    def op_notify(self) -> None:
        self.write(MmioRegister.QUEUE_NOTIFY, self.inp.pick([0, 1, 2, 3, 4, 5, 0xFFFF, 0x10000, U32]))

    # -- host side and time ----------------------------------------------------------------------------
    def op_time(self) -> None:
        self.rig.clock.now += self.inp.pick([1, 50, 300, 2500, 100000]) / 1000.0

    def op_host(self) -> None:
        kind = self.rig.kind
        if kind == "vsock":
            self.vsock_host_event()
        elif kind == "net":
            frame = (GUEST_MAC, b"\xff" * 6, self.inp.take(6))[self.inp.below(3)] + HOST_MAC
            frame += self.inp.pick([0x88B5, 0x0800, 0x86DD]).to_bytes(2, "big")
            frame += bytes([0x24]) * self.inp.pick([46, 0, 1486, 200, 1000])
            for _ in range(self.inp.pick([1, 1, 2, 8])):
                self.rig.host.inject_frame(frame)
        else:
            self.op_time()

    def vsock_host_event(self) -> None:
        rig, inp = self.rig, self.inp
        what = inp.below(7)
        if what <= 1:
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
            rig.peers.append(client)
            try:
                client.connect(rig.host.uds)
                line = f"CONNECT {inp.pick([5000, 5001, 7, inp.int(4), 1 << 32])}\n".encode() if what == 0 else \
                    [b"CONNECT\n", b"HELLO 1\n", b"CONNECT 5000", b"x" * 80, b"CONNECT 5000\nextra"][inp.below(5)]
                client.send(line)
            except OSError:
                pass
        elif what == 2:
            rig.peers.extend(rig.host.accept_peers())
        elif rig.peers:
            peer = rig.peers[inp.below(len(rig.peers))]
            try:
                if what == 3:
                    peer.send(bytes([0x70]) * inp.pick([1, 100, 4096, 300000]))
                elif what == 4:
                    rig.peers.remove(peer)
                    peer.close()
                elif what == 5:
                    peer.shutdown(socket.SHUT_WR)
                else:
                    peer.recv(1 << 16)
            except OSError:
                pass

    # -- the recovery check --------------------------------------------------------------------------------
    def used(self, q: int) -> list[tuple[int, int]]:
        dq = self.queues[q]
        out = []
        idx = int.from_bytes(self.get(dq.used + 2, 2), "little")
        while dq.last_used != idx and len(out) < dq.size:
            elem = dq.used + 4 + 8 * (dq.last_used % dq.size)
            out.append(struct.unpack("<II", self.get(elem, 8)))
            dq.last_used = (dq.last_used + 1) & 0xFFFF
        return out

    def chain_of(self, q: int, parts: list[Part]) -> list[int]:
        """A well-formed chain of ``parts`` published on queue ``q``: its buffers' addresses."""
        dq = self.queues[q]
        head = dq.next_desc
        gpas = []
        for i, (content, length, writable) in enumerate(parts):
            gpa = self.alloc(length)
            gpas.append(gpa)
            if content:
                self.put(gpa, content)
            flags = (VIRTQ_DESC_F_WRITE if writable else 0) | (VIRTQ_DESC_F_NEXT if i + 1 < len(parts) else 0)
            self.put(dq.desc + 16 * (head + i), struct.pack("<QIHH", gpa, length, flags, head + i + 1))
        dq.next_desc += len(parts)
        self.put(dq.avail + 4 + 2 * (dq.avail_idx % dq.size), struct.pack("<H", head))
        dq.avail_idx += 1
        self.put(dq.avail + 2, struct.pack("<H", dq.avail_idx))
        return gpas

    def probe(self) -> None:
        """Reset, initialize properly, and have the device serve a well-formed request."""
        self.rig.clock.now += 3600.0   # whatever the case did to the rate limiters has refilled

        def init() -> None:
            for q in range(self.nq):
                base = SLOT * q
                for start, length in ((base, 256), (base + 0x1000, 38), (base + 0x1400, 134)):
                    self.put(start, bytes(length))
            self.negotiate(self.offered())
            for q in range(self.nq):
                self.setup_queue_registers(q, DriverQueue(16, SLOT * q, SLOT * q + 0x1000, SLOT * q + 0x1400))
            self.write(MmioRegister.STATUS, self.read(MmioRegister.STATUS) | DeviceStatus.DRIVER_OK)

        self.span, self.cursor = 0, DATA_SPANS[0][0]
        self.step(init)
        status = self.transport.status
        if status & 0xCF != 0x0F:
            raise FuzzFailure("device does not start after a reset", f"status {status:#x}, "
                              f"{self.transport.stats.last_error}")
        kind = self.rig.kind
        if kind == "rng":
            self.probe_request(0, [(b"", 32, True)], lambda used: used == [(0, 32)])
        elif kind == "blk":
            header = struct.pack("<IIQ", 8, 0, 0)
            parts: list[Part] = [(header, 16, False), (b"", 20, True), (b"\xff", 1, True)]
            gpas = self.probe_request(0, parts, lambda used: used == [(0, 21)])
            answer = self.get(gpas[1], 20) + self.get(gpas[2], 1)
            if answer != b"fuzz-drive".ljust(20, b"\0") + b"\0":
                raise FuzzFailure("recovery check: wrong GET_ID answer", answer.hex())
        elif kind == "vsock":
            self.probe_vsock()
        else:
            self.probe_net()

    def probe_request(self, q: int, parts: list[Part], good: Callable[[list[tuple[int, int]]], bool]) -> list[int]:
        gpas: list[int] = []

        def submit() -> None:
            gpas.extend(self.chain_of(q, parts))
            self.write(MmioRegister.QUEUE_NOTIFY, q)

        self.step(submit)
        used = self.used(q)
        if not good(used):
            raise FuzzFailure(f"recovery check: {self.rig.kind} does not serve a request after a reset",
                              f"used {used}, status {self.transport.status:#x}, {self.transport.stats.last_error}")
        return gpas

    def probe_vsock(self) -> None:
        def submit() -> None:
            for _ in range(4):
                self.chain_of(0, [(b"", 44 + 256, True)])
            header = struct.pack("<QQIIIHHIII", GUEST_CID, 2, 7, 1024, 0, 1, 1, 0, 65536, 0)
            self.chain_of(1, [(header, 44, False)])
            self.write(MmioRegister.QUEUE_NOTIFY, 0)
            self.write(MmioRegister.QUEUE_NOTIFY, 1)

        self.rig.host.accept_peers()   # room in the listener's backlog (closed: the case is over)
        self.step(submit)
        tx, rx = self.used(1), self.used(0)
        reply = self.get(DATA_SPANS[0][0], 44) if rx else b""
        fields = struct.unpack("<QQIIIHHIII", reply) if reply else ()
        if tx != [(0, 0)] or not rx or fields[6] != 2 or fields[2:4] != (1024, 7):
            raise FuzzFailure("recovery check: vsock does not answer a connection after a reset",
                              f"tx used {tx}, rx used {rx}, first reply {fields}, {self.transport.stats.last_error}")

    def probe_net(self) -> None:
        before = getattr(self.rig.device.stats, "tx_frames", 0)
        frame = bytes(12) + HOST_MAC + GUEST_MAC + b"\x88\xb5" + bytes(46)
        self.probe_request(1, [(frame, len(frame), False)], lambda used: used == [(0, 0)])
        if getattr(self.rig.device.stats, "tx_frames", 0) != before + 1:
            raise FuzzFailure("recovery check: net did not send a frame after a reset",
                              f"{self.rig.device.stats}")

        def post() -> None:
            for _ in range(4):
                self.chain_of(0, [(b"", 1526, True)])
            self.write(MmioRegister.QUEUE_NOTIFY, 0)
            self.rig.host.inject_frame(GUEST_MAC + HOST_MAC + b"\x88\xb5" + bytes(46))

        self.step(post)
        self.step(lambda: None)
        used = self.used(0)
        if not used or not all(12 + 14 <= length <= 1526 for _, length in used):  # the case's frames may come first
            raise FuzzFailure("recovery check: net did not receive a frame after a reset", f"rx used {used}")
