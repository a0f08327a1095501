"""UDP segmentation offload (virtio 1.2 USO) end to end over kvmlet's TAP path.

Unit tests drive the device through its MMIO transport (tests/support/netrig.py): USO is offered only when the
TAP takes TUN_F_USO4|USO6, its feature dependencies hold, a UDP_L4 frame is refused unless HOST_USO was
negotiated and taken whole by the TAP when it was, and the receive side turns on the TAP's USO only with both
GUEST_USO4 and GUEST_USO6. The VM test runs the test guest's ``virtio-net-bench`` with ``kvmlet.net_uso=1``
into a UDP receiver in a namespace (tests/support/netlab.py): the bridge's port into the namespace has its
transmit checksum offload turned off, so the kernel segments each large frame and computes every datagram's
checksum in software before the veth, and the receiving stack verifies them.
"""

from __future__ import annotations

import json
import os
import select
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmlet.config import NetworkInterface
from kvmlet.devices.state import DeviceStateError
from kvmlet.devices.virtio.constants import VIRTIO_F_VERSION_1, MmioRegister
from kvmlet.devices.virtio.net import (
    USO_FEATURES,
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_USO4,
    VIRTIO_NET_F_GUEST_USO6,
    VIRTIO_NET_F_HOST_USO,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_STATUS,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_UDP_L4,
    VirtioNet,
    offload_for_features,
)
from kvmlet.eventloop import EventLoopThread
from kvmlet.memory import GuestMemory
from kvmlet.net.tap import USO_OFFLOAD, Offload, Tap
from tests.support.netlab import ETH_P_ALL, PeerNetwork, packet_socket, peer_network, receive_matching
from tests.support.netrig import GUEST_MAC, HOST_MAC, MEMORY_SIZE, NetRig, bits, make_rig, plain_header
from tests.support.vmrun import run_vm

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
                                reason="TAP devices and network namespaces need root")


def _kernel_takes_uso() -> bool:
    """Whether this kernel's TAP takes USO (Linux 6.2 and later)."""
    if os.geteuid() != 0 or not os.path.exists("/dev/net/tun"):
        return False
    tap = Tap.open("auto", 1)
    try:
        return tap.accepts_offload(USO_OFFLOAD)
    finally:
        tap.close()


needs_uso = pytest.mark.skipif(not _kernel_takes_uso(),
                               reason="this kernel's TAP does not take USO (TUN_F_USO4/6: Linux 6.2 and later)")

BASE = bits(VIRTIO_F_VERSION_1, VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS)
SEGMENT = 1472
SEGMENTS_PER_FRAME = 44          # the guest's USO frame: 44 x 1472 = 64768 payload bytes
PAYLOAD = bytes(i & 0xFF for i in range(SEGMENT))   # every datagram of virtio-net-bench


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    with GuestMemory([(0, MEMORY_SIZE)], hugepages=False) as mem:
        yield mem


@pytest.fixture
def events() -> Iterator[EventLoopThread]:
    loop = EventLoopThread("test-net-uso")
    loop.start()
    yield loop
    loop.stop()


def _udp_frame(payload: bytes) -> bytes:
    """A UDP/IPv4 frame with the pseudo-header sum in the checksum field (as with NEEDS_CSUM)."""
    src, dst = bytes([10, 213, 9, 2]), bytes([10, 213, 9, 1])
    udp_len = 8 + len(payload)
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, 1, 0x4000, 64, 17, 0, src, dst))
    struct.pack_into("!H", ip, 10, ~_fold(_sum(bytes(ip))) & 0xFFFF)
    pseudo = _fold(_sum(src + dst + struct.pack("!BBH", 0, 17, udp_len)))
    udp = struct.pack("!HHHH", 40000, 9000, udp_len, pseudo)
    return HOST_MAC + GUEST_MAC + b"\x08\x00" + bytes(ip) + udp + payload


def _sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    return sum(struct.unpack(f"!{len(data) // 2}H", data))


def _fold(total: int) -> int:
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _uso_header(segments: int, gso_type: int = VIRTIO_NET_HDR_GSO_UDP_L4) -> bytes:
    return plain_header(VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type, 42, SEGMENT, 34, 6)


def _ethtool_features(ifname: str) -> dict[str, bool]:
    from pyroute2.ethtool import Ethtool

    ethtool = Ethtool()
    try:
        return {name: bool(value.enable) for name, value in ethtool.get_features(ifname).features.items()}
    finally:
        ethtool.close()


# -- unit: negotiation and the header checks -------------------------------------------------------------
@needs_uso
def test_uso_is_offered_when_the_tap_takes_it(memory: GuestMemory, events: EventLoopThread) -> None:
    rig = make_rig(memory, events, features=BASE)
    try:
        assert rig.device.uso, "this host's kernel (6.2 or later) takes TUN_F_USO4|USO6"
        assert rig.device.device_features() & USO_FEATURES == USO_FEATURES
        assert rig.device.offload == Offload.NONE   # the probe put the TAP back as it was
    finally:
        rig.close()
    rig = make_rig(memory, events, offloads=False, features=BASE)
    try:
        assert not rig.device.uso and not rig.device.device_features() & USO_FEATURES
    finally:
        rig.close()


@needs_uso
@pytest.mark.parametrize("bad", [
    bits(VIRTIO_NET_F_HOST_USO),                                # needs CSUM
    bits(VIRTIO_NET_F_GUEST_USO4),                              # needs GUEST_CSUM
    bits(VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_USO6),           # needs GUEST_CSUM, not CSUM
])
def test_uso_features_without_their_dependencies_are_refused(memory: GuestMemory, events: EventLoopThread,
                                                            bad: int) -> None:
    rig = make_rig(memory, events, features=BASE)
    try:
        assert not rig.driver.negotiate(BASE | bad)
        assert "feature combination" in rig.transport.stats.last_error
    finally:
        rig.close()


def test_udp_l4_frame_without_host_uso_is_refused(memory: GuestMemory, events: EventLoopThread) -> None:
    rig = make_rig(memory, events, features=BASE | bits(VIRTIO_NET_F_CSUM))
    try:
        head = rig.send(0, _udp_frame(PAYLOAD * 4), _uso_header(4))
        assert rig.wait_used(1) == [(head, 0)]
        assert rig.device.stats.tx_bad_frames == 1 and rig.device.stats.tx_frames == 0
        assert "segmentation offload that was not negotiated" in rig.device.stats.last_error
    finally:
        rig.close()


@needs_uso
def test_udp_l4_frame_with_host_uso_enters_the_host_whole(memory: GuestMemory, events: EventLoopThread) -> None:
    rig = make_rig(memory, events, features=BASE | bits(VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_USO))
    try:
        frame = _udp_frame(PAYLOAD * 8)
        with packet_socket(rig.tap_name) as sock:
            head = rig.send(0, frame, _uso_header(8))
            assert rig.wait_used(1) == [(head, 0)]
            seen = receive_matching(sock, ethertype=0x0800, count=1)
        assert rig.device.stats.tx_frames == 1 and rig.device.stats.tx_bad_frames == 0
        assert seen and len(seen[0]) == len(frame)   # one 11.8 KB frame crossed, unsegmented
        # ECN is TCP's: a UDP_L4 frame with it is malformed even with HOST_USO
        head = rig.send(0, frame, _uso_header(8, VIRTIO_NET_HDR_GSO_UDP_L4 | VIRTIO_NET_HDR_GSO_ECN))
        assert rig.wait_used(1) == [(head, 0)]
        assert rig.device.stats.tx_bad_frames == 1
    finally:
        rig.close()


@needs_uso
@pytest.mark.parametrize(("accepted", "uso_on_tap"), [
    (bits(VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_USO4, VIRTIO_NET_F_GUEST_USO6), True),
    (bits(VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_USO4), False),    # the kernel sets USO4 and USO6 together
    (bits(VIRTIO_NET_F_GUEST_CSUM), False),
])
def test_receive_uso_reaches_the_tap_only_with_both_guest_uso(memory: GuestMemory, events: EventLoopThread,
                                                               accepted: int, uso_on_tap: bool) -> None:
    rig = make_rig(memory, events, features=BASE | accepted)
    try:
        assert bool(rig.device.offload & Offload.USO4) == uso_on_tap
        assert rig.device.offload == offload_for_features(BASE | accepted)
        assert _ethtool_features(rig.tap_name)["tx-udp-segmentation"] == uso_on_tap
        rig.driver.write(MmioRegister.STATUS, 0)   # reset: back to no offloads
        assert not _ethtool_features(rig.tap_name)["tx-udp-segmentation"]
    finally:
        rig.close()


@needs_uso
def test_a_saved_guest_using_uso_is_refused_by_a_tap_without_it(memory: GuestMemory,
                                                                 events: EventLoopThread) -> None:
    rig = make_rig(memory, events, features=BASE | bits(VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_USO4,
                                                         VIRTIO_NET_F_GUEST_USO6))
    try:
        state = rig.device.save_state()
        assert state.offloads & Offload.USO4 and state.offloads & Offload.USO6
        rig.device.check_state(state)             # the same TAP: fine
        rig.device.uso = False                    # as on a kernel before 6.2
        with pytest.raises(DeviceStateError, match="UDP segmentation offload"):
            rig.device.check_state(state)
    finally:
        rig.close()


def _host_sends_uso(rig: NetRig, segments: int) -> None:
    """A host socket sends one UDP_SEGMENT write of ``segments`` datagrams through the rig's TAP."""
    from tests.support.netlab import run

    run("ip", "addr", "add", "10.213.9.1/24", "dev", rig.tap_name)
    run("ip", "neigh", "replace", "10.213.9.2", "lladdr", GUEST_MAC.hex(":"), "dev", rig.tap_name, "nud",
        "permanent")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("10.213.9.1", 0))
        sock.setsockopt(socket.SOL_UDP, 103, SEGMENT)   # UDP_SEGMENT
        sock.sendto(PAYLOAD * segments, ("10.213.9.2", 9000))


def _received_frames(rig: NetRig, used: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """(gso_type, num_buffers, frame length) of each frame in the used receive buffers."""
    frames = []
    at = 0
    while at < len(used):
        header = rig.memory.read(rig.rx_buffers[0][used[at][0]].gpa, 12)
        _, gso_type, _, _, _, _, buffers = struct.unpack("<BBHHHHH", header)
        length = sum(n for _, n in used[at:at + buffers]) - 12
        frames.append((gso_type, buffers, length))
        at += max(buffers, 1)
    return frames


@needs_uso
@pytest.mark.parametrize("guest_uso", [True, False])
def test_host_uso_datagrams_reach_the_guest_whole_only_with_guest_uso(memory: GuestMemory, events: EventLoopThread,
                                                                      guest_uso: bool) -> None:
    accepted = bits(VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_MRG_RXBUF)
    if guest_uso:
        accepted |= bits(VIRTIO_NET_F_GUEST_USO4, VIRTIO_NET_F_GUEST_USO6)
    rig = make_rig(memory, events, features=BASE | accepted)
    try:
        rig.post_rx(0, *[4096] * 48)
        _host_sends_uso(rig, 8)
        used = rig.wait_used(0, 3 if guest_uso else 8)
        time.sleep(0.1)
        used += rig.rings[0].take_used()
        frames = [f for f in _received_frames(rig, used) if f[2] > 1000]   # not ARP or other chatter
        if guest_uso:
            assert frames == [(VIRTIO_NET_HDR_GSO_UDP_L4, 3, 14 + 20 + 8 + 8 * SEGMENT)], frames
        else:
            assert frames == [(0, 1, 14 + 20 + 8 + SEGMENT)] * 8, frames
        assert rig.device.stats.rx_dropped == 0
    finally:
        rig.close()


# -- a real VM: the guest sends with USO, a host socket receives the datagrams -------------------------------
RECEIVER = r"""
import json, select, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, 33, 32 << 20)   # SO_RCVBUFFORCE
s.bind((sys.argv[1], int(sys.argv[2])))
expected = bytes(i & 0xff for i in range(1472))
def udp():
    with open("/proc/net/snmp") as f:
        rows = [line.split() for line in f if line.startswith("Udp:")]
    return dict(zip(rows[0][1:], map(int, rows[1][1:])))
base = udp()
counts = {"datagrams": 0, "bytes": 0, "wrong": 0}
print("READY", flush=True)
while True:
    ready, _, _ = select.select([s, sys.stdin], [], [])
    if s in ready:
        data = s.recv(65536)
        counts["datagrams"] += 1
        counts["bytes"] += len(data)
        counts["wrong"] += data != expected
    if sys.stdin in ready:
        if sys.stdin.readline().strip() != "STATS":
            break
        now = udp()
        print(json.dumps({**counts, **{k: now[k] - base[k] for k in ("InCsumErrors", "RcvbufErrors", "InErrors")}}),
              flush=True)
"""


def _set_tx_checksum(ifname: str, on: bool) -> None:
    from pyroute2.ethtool import Ethtool

    ethtool = Ethtool()
    try:
        features = ethtool.get_features(ifname)
        features.features["tx-checksum-ip-generic"].enable = on
        ethtool.set_features(ifname, features)
    finally:
        ethtool.close()


def _stats(net: PeerNetwork) -> dict[str, int]:
    assert net.server is not None and net.server.stdin is not None and net.server.stdout is not None
    net.server.stdin.write("STATS\n")
    net.server.stdin.flush()
    ready, _, _ = select.select([net.server.stdout], [], [], 10)
    assert ready, "the receiver did not answer"
    parsed: dict[str, int] = json.loads(net.server.stdout.readline())
    return parsed


def _udp_checksum_ok(frame: bytes) -> bool:
    ip = frame[14:34]
    udp = frame[34:14 + struct.unpack("!H", ip[2:4])[0]]
    pseudo = ip[12:20] + struct.pack("!BBH", 0, 17, len(udp))
    return struct.unpack("!H", udp[6:8])[0] != 0 and _fold(_sum(pseudo) + _sum(udp)) == 0xFFFF


@needs_uso
def test_guest_sends_with_uso_and_the_host_receives_every_datagram(guest_elf: Path) -> None:
    full_frames, rest = 20, 7
    loops = full_frames * SEGMENTS_PER_FRAME + rest          # the last frame carries 7 datagrams
    with peer_network(9000, server_program=RECEIVER, stdin=True) as net:
        _set_tx_checksum(net.veth, False)   # segment and checksum in software before the namespace
        capture = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        with capture:
            capture.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)   # SO_RCVBUFFORCE
            capture.bind((net.veth, 0))
            capture.setblocking(False)
            cmdline = (f"console=ttyS0 kvmlet.test=virtio-net-bench kvmlet.net_ip={net.guest_ip} "
                       f"kvmlet.net_peer={net.peer_ip} kvmlet.net_port={net.udp_port} kvmlet.loops={loops} "
                       "kvmlet.net_uso=1 kvmlet.timeout=20")
            vm = run_vm(guest_elf, cmdline, nets=[NetworkInterface(iface_id="net0", bridge=net.bridge)])
            deadline = time.monotonic() + 5
            while (stats := _stats(net))["datagrams"] < loops and time.monotonic() < deadline:
                time.sleep(0.05)
            captured = []
            while True:
                try:
                    data, address = capture.recvfrom(70000)
                except BlockingIOError:
                    break
                if address[2] == socket.PACKET_OUTGOING and data[12:14] == b"\x08\x00" and data[23] == 17:
                    captured.append(data)
    assert vm.passed("virtio-net-bench") and vm.status.code == 0, vm.output
    assert "NET host_uso=1" in vm.output, vm.output
    assert f"NET uso segments_per_frame={SEGMENTS_PER_FRAME} gso_size={SEGMENT} frames={full_frames + 1}" \
        in vm.output
    assert f"BENCH net-udp-tx done ops={loops} bytes={loops * SEGMENT}" in vm.output
    assert f"NET bench tx={full_frames + 1} " in vm.output
    # what crossed the virtio boundary: the USO frames and the ARP request, about 44x fewer than datagrams
    [device] = vm.devices
    assert isinstance(device, VirtioNet)
    assert device.stats.tx_bad_frames == 0 and full_frames + 1 <= device.stats.tx_frames <= full_frames + 3
    assert loops / device.stats.tx_frames > 40
    # what the host received: every datagram, 1472 bytes each, with the bench's content, no checksum error
    assert stats == {"datagrams": loops, "bytes": loops * SEGMENT, "wrong": 0, "InCsumErrors": 0,
                     "RcvbufErrors": 0, "InErrors": 0}, stats
    # and the segments on the wire, checked here too: each a 1514-byte frame with a correct UDP checksum
    assert len(captured) == loops, len(captured)
    assert all(len(frame) == 14 + 20 + 8 + SEGMENT for frame in captured)
    assert all(_udp_checksum_ok(frame) for frame in captured)
