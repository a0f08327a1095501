"""A virtio-vsock device with real Unix sockets, driven through its MMIO transport by a hand-made driver."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from kvmlet.devices.irq import NullInterrupt
from kvmlet.devices.virtio.mmio import MmioTransport
from kvmlet.devices.virtio.vsock import RX_QUEUE, TX_QUEUE, VirtioVsock
from kvmlet.devices.virtio.vsock_packet import HDR_SIZE, HOST_CID, TYPE_STREAM, Op, VsockHeader
from kvmlet.eventloop import EventLoopThread
from kvmlet.memory import GuestMemory
from tests.support.virtq import DriverRing, MmioDriver

GUEST_CID = 3
RING_SIZE = 256
RX_BUFFER = HDR_SIZE + 4096


@dataclass
class Packet:
    hdr: VsockHeader
    payload: bytes


@dataclass
class VsockRig:
    memory: GuestMemory
    device: VirtioVsock
    transport: MmioTransport
    driver: MmioDriver
    rings: list[DriverRing]
    rx_gpa: dict[int, int] = field(default_factory=dict)
    guest_buf_alloc: int = 64 * 1024
    guest_fwd_cnt: int = 0

    def header(self, op: Op, src_port: int, dst_port: int, length: int = 0, flags: int = 0, *,
               dst_cid: int = HOST_CID, type_: int = TYPE_STREAM, src_cid: int = GUEST_CID) -> VsockHeader:
        return VsockHeader(src_cid, dst_cid, src_port, dst_port, length, type_, op, flags, self.guest_buf_alloc,
                           self.guest_fwd_cnt)

    def send_raw(self, data: bytes) -> None:
        ring = self.rings[TX_QUEUE]
        head = ring.add_chain([(*ring.buffer(data), False)])
        ring.publish(head)
        self.driver.notify(TX_QUEUE)

    def send(self, op: Op, src_port: int, dst_port: int, payload: bytes = b"", flags: int = 0) -> None:
        self.send_raw(self.header(op, src_port, dst_port, len(payload), flags).pack() + payload)

    def post_rx(self, count: int = 8) -> None:
        ring = self.rings[RX_QUEUE]
        for _ in range(count):
            gpa, length = ring.buffer(RX_BUFFER)
            head = ring.add_chain([(gpa, length, True)])
            self.rx_gpa[head] = gpa
            ring.publish(head)
        self.driver.notify(RX_QUEUE)

    def receive(self, count: int = 1, timeout: float = 5.0) -> list[Packet]:
        """Packets the device put on the rx queue (waits for ``count``)."""
        ring = self.rings[RX_QUEUE]
        packets: list[Packet] = []
        deadline = time.monotonic() + timeout
        while len(packets) < count and time.monotonic() < deadline:
            for head, length in ring.take_used():
                raw = self.memory.read(self.rx_gpa[head], length)
                packets.append(Packet(VsockHeader.unpack(raw[:HDR_SIZE]), raw[HDR_SIZE:]))
            if len(packets) < count:
                time.sleep(0.005)
        return packets

    def close(self) -> None:
        self.transport.close()


def make_vsock_rig(memory: GuestMemory, events: EventLoopThread, uds: Path) -> VsockRig:
    device = VirtioVsock(GUEST_CID, uds, events)
    transport = MmioTransport(device, memory, NullInterrupt(), events)
    driver = MmioDriver(transport)
    rings = []
    try:
        assert driver.negotiate(), transport.stats.last_error
        for index in range(3):
            base = 0x100000 + index * 0x200000
            ring = DriverRing(memory, size=RING_SIZE, desc=base, avail=base + 0x1000, used=base + 0x3000,
                              data=base + 0x10000)
            driver.setup_queue(index, ring)
            rings.append(ring)
        driver.driver_ok()
        transport.poll()
    except BaseException:
        transport.close()
        raise
    return VsockRig(memory, device, transport, driver, rings)
