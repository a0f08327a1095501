"""virtio-net on a real TAP: transmit, receive, merged buffers, offloads, multiqueue, a TAP that goes away.

The host end of the TAP is a packet socket bound to the interface: what the guest transmits arrives there,
and what is sent through it reaches the guest's receive queue.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Iterator

import pytest

from kvmlet.config.models import RateLimiterConfig, TokenBucketConfig
from kvmlet.devices.virtio.constants import VIRTIO_F_EVENT_IDX, VIRTIO_F_VERSION_1, DeviceStatus, MmioRegister
from kvmlet.devices.virtio.net import (
    NET_HDR,
    OFFLOAD_FEATURES,
    VIRTIO_NET_CTRL_MQ,
    VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
    VIRTIO_NET_ERR,
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_CTRL_VQ,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_ECN,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_STATUS,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_OK,
    VirtioNet,
)
from kvmlet.devices.virtio.ratelimit import RateLimiter
from kvmlet.eventloop import EventLoopThread
from kvmlet.memory import GuestMemory
from kvmlet.net.tap import Tap
from tests.support.netlab import make_frame, packet_socket, receive_matching, run
from tests.support.netrig import GUEST_MAC, HOST_MAC, MEMORY_SIZE, NetRig, bits, make_rig, plain_header

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
                                reason="TAP devices need root and /dev/net/tun")

BASE = bits(VIRTIO_F_VERSION_1, VIRTIO_F_EVENT_IDX, VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS)


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    with GuestMemory([(0, MEMORY_SIZE)], hugepages=False) as mem:
        yield mem


@pytest.fixture
def events() -> Iterator[EventLoopThread]:
    loop = EventLoopThread("test-net-events")
    loop.start()
    yield loop
    loop.stop()


@pytest.fixture
def rig(memory: GuestMemory, events: EventLoopThread) -> Iterator[NetRig]:
    rig = make_rig(memory, events)
    yield rig
    rig.close()


def _ethtool_features(ifname: str) -> dict[str, bool]:
    from pyroute2.ethtool import Ethtool

    ethtool = Ethtool()
    try:
        return {name: bool(value.enable) for name, value in ethtool.get_features(ifname).features.items()}
    finally:
        ethtool.close()


def test_features_and_configuration_space(rig: NetRig) -> None:
    device = rig.device
    offered = device.device_features()
    for bit in (VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_CSUM,
                VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_TSO4,
                VIRTIO_F_VERSION_1, VIRTIO_F_EVENT_IDX):
        assert offered & bits(bit), bit
    assert not offered & bits(VIRTIO_NET_F_MQ, VIRTIO_NET_F_CTRL_VQ)  # one queue pair: no control queue
    assert rig.driver.read(MmioRegister.DEVICE_ID) == 1
    config = bytes(rig.transport.bus_read(MmioRegister.CONFIG + i, 1) for i in range(10))
    assert config[:6] == GUEST_MAC
    status, pairs = struct.unpack("<HH", config[6:10])
    assert status == 1 and pairs == 1
    assert len(device.queue_max_sizes) == 2


def test_offloads_off_offers_none(memory: GuestMemory, events: EventLoopThread) -> None:
    rig = make_rig(memory, events, offloads=False)
    try:
        assert not rig.device.device_features() & OFFLOAD_FEATURES
        features = _ethtool_features(rig.tap_name)
        assert not features["tx-checksum-ip-generic"] and not features["tx-tcp-segmentation"]
    finally:
        rig.close()


def test_transmitted_frame_appears_on_the_tap(rig: NetRig) -> None:
    with packet_socket(rig.tap_name) as sock:
        frames = [make_frame(HOST_MAC, GUEST_MAC, b"hello from the guest" + bytes(40)),
                  make_frame(HOST_MAC, GUEST_MAC, b"second, one descriptor" + bytes(100))]
        heads = [rig.send(0, frames[0]), rig.send(0, frames[1], split=False)]
        assert rig.wait_used(1, 2) == [(heads[0], 0), (heads[1], 0)]
        assert receive_matching(sock, count=2) == frames
    stats = rig.device.stats
    assert stats.tx_frames == 2 and stats.tx_bytes == sum(map(len, frames)) and stats.tx_bad_frames == 0


def test_received_frame_lands_in_guest_buffer_with_header(rig: NetRig) -> None:
    buffers = rig.post_rx(0, 1526, 1526)
    frame = make_frame(GUEST_MAC, HOST_MAC, b"to the guest" + bytes(100))
    with packet_socket(rig.tap_name) as sock:
        sock.send(frame)
        used = rig.wait_used(0)
    assert used == [(buffers[0].head, 12 + len(frame))]
    data = rig.received(0, used)
    flags, gso_type, _, _, _, _, num_buffers = NET_HDR.unpack(data[:12])
    assert (flags, gso_type, num_buffers) == (0, 0, 1)
    assert data[12:] == frame
    assert rig.device.stats.rx_frames == 1 and rig.device.stats.rx_bytes == len(frame)


def test_large_frame_is_merged_over_several_buffers(rig: NetRig) -> None:
    buffers = rig.post_rx(0, 512, 512, 512, 512)
    frame = make_frame(GUEST_MAC, HOST_MAC, bytes(range(256)) * 5)   # 1294 bytes + 12 of header
    with packet_socket(rig.tap_name) as sock:
        sock.send(frame)
        used = rig.wait_used(0, 3)
    assert [head for head, _ in used] == [b.head for b in buffers[:3]]
    assert [length for _, length in used] == [512, 512, 12 + len(frame) - 1024]
    data = rig.received(0, used)
    assert NET_HDR.unpack(data[:12])[6] == 3  # num_buffers
    assert data[12:] == frame
    assert rig.device.stats.rx_merged_buffers == 2
    # The fourth buffer is still the driver's for the next frame.
    small = make_frame(GUEST_MAC, HOST_MAC, b"small" + bytes(50))
    with packet_socket(rig.tap_name) as sock:
        sock.send(small)
        used = rig.wait_used(0)
    assert used == [(buffers[3].head, 12 + len(small))]


def test_without_merged_buffers_a_frame_too_big_is_dropped(memory: GuestMemory, events: EventLoopThread) -> None:
    rig = make_rig(memory, events, features=BASE)
    try:
        buffers = rig.post_rx(0, 300)
        with packet_socket(rig.tap_name) as sock:
            sock.send(make_frame(GUEST_MAC, HOST_MAC, bytes(1000)))
            deadline = time.monotonic() + 5
            while rig.device.stats.rx_dropped == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert rig.device.stats.rx_dropped == 1
            small = make_frame(GUEST_MAC, HOST_MAC, b"fits" + bytes(60))
            sock.send(small)
            used = rig.wait_used(0)
        assert used == [(buffers[0].head, 12 + len(small))]
        assert NET_HDR.unpack(rig.received(0, used)[:12])[6] == 1  # num_buffers is 1 without MRG_RXBUF
    finally:
        rig.close()


def test_tap_is_not_read_while_the_guest_has_no_buffers(rig: NetRig) -> None:
    frame = make_frame(GUEST_MAC, HOST_MAC, b"waits in the kernel" + bytes(40))
    with packet_socket(rig.tap_name) as sock:
        sock.send(frame)
        deadline = time.monotonic() + 5
        while rig.device._pair[0].watching and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not rig.device._pair[0].watching  # stopped watching the TAP: no buffers
        assert rig.device.stats.rx_frames == 0
        buffers = rig.post_rx(0, 1526)  # the notification resumes reading
        used = rig.wait_used(0)
    assert used == [(buffers[0].head, 12 + len(frame))]
    assert rig.received(0, used)[12:] == frame
    assert not rig.device._pair[0].watching  # that was the only buffer
    rig.post_rx(0, 1526)
    assert rig.device._pair[0].watching      # a buffer and nothing to read: wait for the TAP


@pytest.mark.parametrize(("accepted", "expected"), [
    (bits(VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_ECN),
     {"tx-checksum-ip-generic": True, "tx-tcp-segmentation": True, "tx-tcp6-segmentation": True,
      "tx-tcp-ecn-segmentation": True}),
    (bits(VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO6),
     {"tx-checksum-ip-generic": True, "tx-tcp-segmentation": False, "tx-tcp6-segmentation": True}),
    (bits(VIRTIO_NET_F_GUEST_CSUM),
     {"tx-checksum-ip-generic": True, "tx-tcp-segmentation": False, "tx-tcp6-segmentation": False}),
    (bits(VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4),  # transmit offloads only: the TAP needs nothing
     {"tx-checksum-ip-generic": False, "tx-tcp-segmentation": False, "tx-tcp6-segmentation": False}),
])
def test_negotiated_receive_offloads_become_tunsetoffload(memory: GuestMemory, events: EventLoopThread,
                                                          accepted: int, expected: dict[str, bool]) -> None:
    rig = make_rig(memory, events, features=BASE | accepted)
    try:
        features = _ethtool_features(rig.tap_name)
        assert {name: features[name] for name in expected} == expected
        rig.driver.write(MmioRegister.STATUS, 0)  # reset: back to no offloads
        features = _ethtool_features(rig.tap_name)
        assert not features["tx-checksum-ip-generic"] and not features["tx-tcp6-segmentation"]
    finally:
        rig.close()


@pytest.mark.parametrize("bad", [
    bits(VIRTIO_NET_F_GUEST_TSO4),                              # needs GUEST_CSUM
    bits(VIRTIO_NET_F_HOST_TSO4),                               # needs CSUM
    bits(VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN),      # needs a GUEST_TSO
])
def test_features_without_their_dependencies_are_refused(rig: NetRig, bad: int) -> None:
    assert not rig.driver.negotiate(BASE | bad)
    assert "feature combination" in rig.transport.stats.last_error


def _tcp_frame(payload: int) -> bytes:
    ip_total = 20 + 20 + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, ip_total, 1, 0x4000, 64, 6, 0, bytes([10, 213, 9, 2]),
                     bytes([10, 213, 9, 1]))
    tcp = struct.pack("!HHIIBBHHH", 40000, 5001, 1, 0, 5 << 4, 0x18, 65535, 0, 0)
    return HOST_MAC + GUEST_MAC + b"\x08\x00" + ip + tcp + bytes(payload)


def test_tso_frame_from_the_guest_is_taken_by_the_tap(rig: NetRig) -> None:
    frame = _tcp_frame(20000)
    header = plain_header(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, 54, 1448, 34, 16)
    with packet_socket(rig.tap_name) as sock:
        head = rig.send(0, frame, header)
        assert rig.wait_used(1) == [(head, 0)]
        seen = receive_matching(sock, ethertype=0x0800, count=1)
    assert rig.device.stats.tx_frames == 1 and rig.device.stats.tx_bad_frames == 0
    assert seen and len(seen[0]) == len(frame)  # the unsegmented frame entered the host stack


def test_gso_frame_without_the_offload_is_refused(memory: GuestMemory, events: EventLoopThread) -> None:
    rig = make_rig(memory, events, features=BASE | bits(VIRTIO_NET_F_CSUM))
    try:
        header = plain_header(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, 54, 1448, 34, 16)
        head = rig.send(0, _tcp_frame(4000), header)
        assert rig.wait_used(1) == [(head, 0)]
        assert rig.device.stats.tx_bad_frames == 1 and rig.device.stats.tx_frames == 0
    finally:
        rig.close()


def test_malformed_chains_are_returned_and_counted(rig: NetRig) -> None:
    ring = rig.rings[1]
    head = ring.add_chain([(*ring.buffer(plain_header()), False), (*ring.buffer(8), True)])  # writable on tx
    ring.publish(head)
    rig.driver.notify(1)
    runt = rig.send(0, b"\x01\x02")   # shorter than an Ethernet header
    assert rig.wait_used(1, 2) == [(head, 0), (runt, 0)]
    assert rig.device.stats.tx_bad_frames == 2
    rx = rig.rings[0]
    bad = rx.add_chain([(*rx.buffer(64), False)])  # device-readable receive buffer
    rx.publish(bad)
    with packet_socket(rig.tap_name) as sock:
        sock.send(make_frame(GUEST_MAC, HOST_MAC, bytes(50)))
        rig.driver.notify(0)
        assert rig.wait_used(0) == [(bad, 0)]
    assert rig.device.stats.rx_bad_buffers == 1
    assert not rig.transport.status & DeviceStatus.DEVICE_NEEDS_RESET


def test_one_batch_of_plain_and_other_frames_keeps_their_order(rig: NetRig) -> None:
    """Plain one-descriptor frames take the device's short path, the others its full one; in one batch
    they still go out, and come back on the used ring, in the driver's order."""
    ring = rig.rings[1]
    frames = [make_frame(HOST_MAC, GUEST_MAC, bytes([i]) * 60) for i in range(6)]
    layouts = [
        [(*ring.buffer(plain_header() + frames[0]), False)],                    # plain: short path
        [(*ring.buffer(plain_header()), False), (*ring.buffer(frames[1]), False)],   # two descriptors
        [(*ring.buffer(plain_header(num_buffers=3) + frames[2]), False)],       # num_buffers set: full path
        [(*ring.buffer(plain_header(flags=2) + frames[3]), False)],             # a flag that is ignored
        [(*ring.buffer(plain_header() + frames[4]), True)],                     # device-writable: refused
        [(*ring.buffer(plain_header() + frames[5]), False)],                    # plain again
    ]
    heads = [ring.add_chain(parts) for parts in layouts]
    parsed: list[int] = []
    full_path = rig.device._transmit
    rig.device._transmit = lambda pair, chain: parsed.append(chain.head) or full_path(pair, chain)  # type: ignore[method-assign]
    with packet_socket(rig.tap_name) as sock:
        ring.publish(*heads)
        rig.driver.notify(1)
        assert rig.wait_used(1, 6) == [(head, 0) for head in heads]
        assert receive_matching(sock, count=5) == [frames[i] for i in (0, 1, 2, 3, 5)]
    assert parsed == [heads[i] for i in (2, 3, 4)]   # the plain frames never reached the full path
    stats = rig.device.stats
    assert (stats.tx_frames, stats.tx_bad_frames) == (5, 1)
    assert stats.tx_bytes == sum(len(frames[i]) for i in (0, 1, 2, 3, 5))
    assert stats.tx_frames_by_queue == [5]


def test_two_queue_pairs_use_two_tap_queues(memory: GuestMemory, events: EventLoopThread) -> None:
    rig = make_rig(memory, events, queues=2)
    try:
        device = rig.device
        assert len(device.tap.fds) == 2 and device.tap.multi_queue
        assert device.device_features() & bits(VIRTIO_NET_F_MQ, VIRTIO_NET_F_CTRL_VQ)
        assert len(device.queue_max_sizes) == 5 and device.control_index == 4
        pairs = struct.unpack("<H", bytes(rig.transport.bus_read(MmioRegister.CONFIG + 8 + i, 1)
                                          for i in range(2)))[0]
        assert pairs == 2
        assert device.tap.attached == [True, False]   # one pair until the driver asks for more
        assert "numqueues 1 numdisabled 1" in run("ip", "-d", "link", "show", rig.tap_name).stdout
        command = bytes([VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET])
        assert rig.control(command + struct.pack("<H", 3)) == VIRTIO_NET_ERR
        assert rig.control(command + struct.pack("<H", 2)) == VIRTIO_NET_OK
        assert device.active_pairs == 2 and device.tap.attached == [True, True]
        assert "numqueues 2 numdisabled 0" in run("ip", "-d", "link", "show", rig.tap_name).stdout

        with packet_socket(rig.tap_name) as sock:
            frame = make_frame(HOST_MAC, GUEST_MAC, b"through pair 1" + bytes(50))
            head = rig.send(1, frame)
            assert rig.wait_used(3) == [(head, 0)]
            assert receive_matching(sock) == [frame]
            assert device.stats.tx_frames_by_queue == [0, 1]

            rig.post_rx(0, *[1526] * 40)
            rig.post_rx(1, *[1526] * 40)
            for port in range(32):  # different flows: the kernel spreads them over both queues
                udp = struct.pack("!HHHH", 1000 + port, 2000, 8 + 20, 0) + bytes(20)
                ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), port, 0, 64, 17, 0,
                                 bytes([10, 213, 9, 1]), bytes([10, 213, 9, 2]))
                sock.send(GUEST_MAC + HOST_MAC + b"\x08\x00" + ip + udp)
            deadline = time.monotonic() + 5
            while device.stats.rx_frames < 32 and time.monotonic() < deadline:
                time.sleep(0.01)
        assert device.stats.rx_frames == 32
        assert all(count > 0 for count in device.stats.rx_frames_by_queue), device.stats.rx_frames_by_queue
    finally:
        rig.close()


def test_tap_removed_mid_run_reports_link_down_and_drops(rig: NetRig) -> None:
    rig.post_rx(0, 1526)
    generation = rig.transport.config_generation
    run("ip", "link", "del", rig.tap_name)
    deadline = time.monotonic() + 5  # the reader sees the error (EPOLLERR) and the device notices
    while rig.device.link_up and time.monotonic() < deadline:
        time.sleep(0.01)
    head = rig.send(0, make_frame(HOST_MAC, GUEST_MAC, bytes(60)))
    assert rig.wait_used(1) == [(head, 0)]
    device = rig.device
    assert not device.link_up and device.stats.tap_errors >= 1 and device.stats.tx_dropped == 1
    status = rig.transport.bus_read(MmioRegister.CONFIG + 6, 2)
    assert status == 0  # VIRTIO_NET_S_LINK_UP cleared ...
    assert rig.transport.config_generation > generation  # ... and the driver was told
    assert not rig.transport.status & DeviceStatus.DEVICE_NEEDS_RESET
    rig.post_rx(0, 1526)  # nothing breaks when the driver carries on
    assert rig.device.stats.rx_frames == 0


def test_transmit_rate_limit_delays_but_delivers(memory: GuestMemory, events: EventLoopThread) -> None:
    limiter = RateLimiter(RateLimiterConfig(ops=TokenBucketConfig(size=1, refill_time=100)))
    rig = make_rig(memory, events, tx_rate_limiter=limiter)
    try:
        frames = [make_frame(HOST_MAC, GUEST_MAC, bytes([n]) * 60) for n in range(3)]
        with packet_socket(rig.tap_name) as sock:
            started = time.monotonic()
            for frame in frames:
                rig.send(0, frame)
            assert len(rig.wait_used(1, 3)) == 3
            assert receive_matching(sock, count=3) == frames
        assert time.monotonic() - started >= 0.15
        assert rig.device.stats.tx_throttled >= 1
    finally:
        rig.close()


def test_receive_rate_limit_holds_frames_in_guest_buffers(memory: GuestMemory, events: EventLoopThread) -> None:
    limiter = RateLimiter(RateLimiterConfig(ops=TokenBucketConfig(size=1, refill_time=100)))
    rig = make_rig(memory, events, rx_rate_limiter=limiter)
    try:
        rig.post_rx(0, *[1526] * 4)
        frames = [make_frame(GUEST_MAC, HOST_MAC, bytes([n]) * 60) for n in range(3)]
        with packet_socket(rig.tap_name) as sock:
            started = time.monotonic()
            for frame in frames:
                sock.send(frame)
            used = rig.wait_used(0, 3)
        assert len(used) == 3 and time.monotonic() - started >= 0.15
        assert [rig.received(0, [u])[12:] for u in used] == frames
        assert rig.device.stats.rx_throttled >= 1
    finally:
        rig.close()


def test_reset_and_close_release_the_tap(memory: GuestMemory, events: EventLoopThread) -> None:
    rig = make_rig(memory, events, queues=2)
    name = rig.tap_name
    rig.driver.write(MmioRegister.STATUS, 0)
    assert not rig.device.active
    rig.close()
    deadline = time.monotonic() + 5  # the descriptors close on the event loop, after it forgets them
    while os.path.exists(f"/sys/class/net/{name}") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not os.path.exists(f"/sys/class/net/{name}")  # kvmlet created it: it goes with the last fd


def test_existing_single_queue_tap_refuses_two_queues() -> None:
    name = f"kvt{os.getpid() % 100000}"
    run("ip", "tuntap", "add", "dev", name, "mode", "tap")
    try:
        with pytest.raises(Exception, match="without multi_queue"):
            Tap.open(name, 2)
        with Tap.open(name, 1) as tap:
            assert not tap.created and tap.vnet_header_size() == 12
    finally:
        run("ip", "link", "del", name, check=False)


def test_device_needs_a_six_byte_mac() -> None:
    with pytest.raises(ValueError, match="6 bytes"):
        VirtioNet(None, b"\x02", None)  # type: ignore[arg-type]


def test_random_transmit_headers_and_frames_never_break_the_device(rig: NetRig) -> None:
    import random

    rng = random.Random(99)
    heads = []
    for _ in range(60):
        header = plain_header(rng.randrange(256), rng.choice([0, 1, 3, 4, 0x81, 0x84, 7, 0xFF]),
                              rng.randrange(1 << 16), rng.randrange(1 << 16), rng.randrange(1 << 16),
                              rng.randrange(1 << 16), rng.randrange(1 << 16))
        frame = make_frame(HOST_MAC, GUEST_MAC, rng.randbytes(rng.randrange(0, 300)), rng.randrange(1 << 16))
        heads.append(rig.send(0, frame, header, split=rng.random() < 0.5))
    used = rig.wait_used(1, len(heads))
    assert sorted(used) == sorted((head, 0) for head in heads)
    stats = rig.device.stats
    assert stats.tx_frames + stats.tx_bad_frames == len(heads)
    assert not rig.transport.status & DeviceStatus.DEVICE_NEEDS_RESET
    assert rig.device.link_up
