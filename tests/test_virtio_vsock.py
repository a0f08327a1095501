"""virtio-vsock with real Unix sockets: both directions of connection, data, credit, shutdown, bad packets."""

from __future__ import annotations

import dataclasses
import random
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmlet.devices.virtio.constants import DeviceStatus, MmioRegister
from kvmlet.devices.virtio.vsock import FIRST_LOCAL_PORT, TX_QUEUE, VirtioVsock, VsockError
from kvmlet.devices.virtio.vsock_connection import BUF_ALLOC
from kvmlet.devices.virtio.vsock_packet import HDR_SIZE, HOST_CID, SHUTDOWN_RCV, SHUTDOWN_SEND, Op
from kvmlet.eventloop import EventLoopThread
from kvmlet.memory import GuestMemory
from tests.support.vsockrig import GUEST_CID, Packet, VsockRig, make_vsock_rig

GUEST_PORT = 5000


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    with GuestMemory([(0, 8 << 20)], hugepages=False) as mem:
        yield mem


@pytest.fixture
def events() -> Iterator[EventLoopThread]:
    loop = EventLoopThread("test-vsock-events")
    loop.start()
    yield loop
    loop.stop()


@pytest.fixture
def uds(tmp_path: Path) -> Path:
    return tmp_path / "vm.vsock"


@pytest.fixture
def rig(memory: GuestMemory, events: EventLoopThread, uds: Path) -> Iterator[VsockRig]:
    rig = make_vsock_rig(memory, events, uds)
    rig.post_rx(16)
    yield rig
    rig.close()


def _server(uds: Path, port: int) -> socket.socket:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(f"{uds}_{port}")
    server.listen(4)
    server.settimeout(5)
    return server


def _ops(packets: list[Packet]) -> list[Op]:
    return [Op(p.hdr.op) for p in packets]


def _connect_from_guest(rig: VsockRig, uds: Path, port: int) -> tuple[socket.socket, socket.socket]:
    server = _server(uds, port)
    rig.send(Op.REQUEST, GUEST_PORT, port)
    [response] = rig.receive()
    assert response.hdr.op == Op.RESPONSE
    assert (response.hdr.src_cid, response.hdr.dst_cid) == (HOST_CID, GUEST_CID)
    assert (response.hdr.src_port, response.hdr.dst_port) == (port, GUEST_PORT)
    assert response.hdr.buf_alloc == BUF_ALLOC
    peer, _ = server.accept()
    peer.settimeout(5)
    return server, peer


def test_configuration_space_holds_the_guest_cid(rig: VsockRig) -> None:
    assert rig.driver.read(MmioRegister.DEVICE_ID) == 19
    assert rig.transport.bus_read(MmioRegister.CONFIG, 8) == GUEST_CID


def test_guest_connects_to_a_host_unix_socket_and_talks(rig: VsockRig, uds: Path) -> None:
    server, peer = _connect_from_guest(rig, uds, 1234)
    with server, peer:
        rig.send(Op.RW, GUEST_PORT, 1234, b"PING\n")
        assert peer.recv(100) == b"PING\n"
        peer.sendall(b"PONG\n")
        [data] = rig.receive()
        assert data.hdr.op == Op.RW and data.payload == b"PONG\n" and data.hdr.len == 5
        assert data.hdr.fwd_cnt == 5  # the 5 bytes the guest sent reached the socket
        # The guest closes: SHUTDOWN both ways is answered with RST and the host sees end of file.
        rig.send(Op.SHUTDOWN, GUEST_PORT, 1234, flags=SHUTDOWN_RCV | SHUTDOWN_SEND)
        [rst] = rig.receive()
        assert rst.hdr.op == Op.RST
        assert peer.recv(100) == b""
    assert not rig.device.connections
    assert rig.device.stats.guest_connections == 1


def test_guest_connection_to_nobody_is_reset(rig: VsockRig) -> None:
    rig.send(Op.REQUEST, GUEST_PORT, 4321)
    [rst] = rig.receive()
    assert rst.hdr.op == Op.RST and rst.hdr.src_port == 4321 and rst.hdr.dst_port == GUEST_PORT
    assert rig.device.stats.connect_failures == 1


def _host_connect(uds: Path, port: int, rig: VsockRig) -> tuple[socket.socket, Packet]:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(5)
    client.connect(str(uds))
    client.sendall(f"CONNECT {port}\n".encode())
    [request] = rig.receive()
    return client, request


def test_host_connects_to_a_guest_port(rig: VsockRig, uds: Path) -> None:
    client, request = _host_connect(uds, 52, rig)
    with client:
        hdr = request.hdr
        assert hdr.op == Op.REQUEST and hdr.dst_port == 52 and hdr.dst_cid == GUEST_CID
        assert hdr.src_cid == HOST_CID and hdr.src_port >= FIRST_LOCAL_PORT
        rig.send(Op.RESPONSE, 52, hdr.src_port)
        assert client.recv(100) == f"OK {hdr.src_port}\n".encode()
        client.sendall(b"from the host")
        [data] = rig.receive()
        assert data.hdr.op == Op.RW and data.payload == b"from the host"
        rig.send(Op.RW, 52, hdr.src_port, b"from the guest")
        assert client.recv(100) == b"from the guest"
        # The host closes its socket: the guest hears SHUTDOWN (no more data will come).
        client.shutdown(socket.SHUT_WR)
        [shutdown] = rig.receive()
        assert shutdown.hdr.op == Op.SHUTDOWN and shutdown.hdr.flags & SHUTDOWN_SEND
    assert rig.device.stats.host_connections == 1


def test_host_connection_refused_by_the_guest_closes_the_client(rig: VsockRig, uds: Path) -> None:
    client, request = _host_connect(uds, 53, rig)
    with client:
        rig.send(Op.RST, 53, request.hdr.src_port)
        assert client.recv(100) == b""
    assert not rig.device.connections


def test_host_connection_times_out_without_an_answer(rig: VsockRig, uds: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("kvmlet.devices.virtio.vsock.CONNECT_TIMEOUT", 0.2)
    client, request = _host_connect(uds, 54, rig)
    with client:
        assert client.recv(100) == b""
        [rst] = rig.receive()
        assert rst.hdr.op == Op.RST and rst.hdr.src_port == request.hdr.src_port
    assert rig.device.stats.connect_failures == 1


@pytest.mark.parametrize("line", [b"HELLO 5\n", b"CONNECT\n", b"CONNECT -1\n", b"CONNECT 99999999999\n",
                                  b"x" * 100])
def test_bad_connect_lines_close_the_client(rig: VsockRig, uds: Path, line: bytes) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(5)
        client.connect(str(uds))
        client.sendall(line)
        try:
            assert client.recv(100) == b""
        except ConnectionResetError:
            pass  # closed with the line unread
    assert rig.receive(timeout=0.2) == []


def test_data_to_the_guest_respects_its_credit(rig: VsockRig, uds: Path) -> None:
    rig.guest_buf_alloc = 8
    server, peer = _connect_from_guest(rig, uds, 1300)
    with server, peer:
        peer.sendall(b"0123456789abcdefghij")
        packets = rig.receive(2)
        assert _ops(packets) == [Op.RW, Op.CREDIT_REQUEST]  # 8 bytes, then: no credit left
        assert packets[0].payload == b"01234567"
        rig.guest_fwd_cnt = 8  # the guest consumed them
        rig.send(Op.CREDIT_UPDATE, GUEST_PORT, 1300)
        more = rig.receive(2)
        assert _ops(more) == [Op.RW, Op.CREDIT_REQUEST] and more[0].payload == b"89abcdef"


def test_guest_data_beyond_credit_resets_the_connection(rig: VsockRig, uds: Path) -> None:
    server, peer = _connect_from_guest(rig, uds, 1400)
    with server, peer:  # the host never reads: the socket fills, then the device's buffer
        ring = rig.rings[TX_QUEUE]
        chunk = 60000
        gpa, _ = ring.buffer(HDR_SIZE + chunk)
        rig.memory.write(gpa, rig.header(Op.RW, GUEST_PORT, 1400, chunk).pack())
        sent = 0
        while rig.device.connections and sent < 4 * (BUF_ALLOC + 1024 * 1024):
            head = ring.add_chain([(gpa, HDR_SIZE + chunk, False)])
            ring.publish(head)
            rig.driver.notify(TX_QUEUE)
            sent += chunk
        assert not rig.device.connections
        assert rig.device.stats.credit_violations == 1
        assert Op.RST in _ops(rig.receive(3, timeout=1))


def test_data_the_socket_refuses_is_buffered_and_credited_later(rig: VsockRig, uds: Path) -> None:
    server, peer = _connect_from_guest(rig, uds, 1500)
    with server, peer:
        total = 0
        payload = bytes(range(256)) * 200   # 51200 bytes a packet
        for _ in range(8):                   # 400 KiB: more than the socket buffer takes at once
            rig.send(Op.RW, GUEST_PORT, 1500, payload)
            total += len(payload)
            rig.guest_fwd_cnt = 0
        conn = next(iter(rig.device.connections.values()))
        assert conn.to_socket  # the rest waits in the device
        got = 0
        while got < total:
            got += len(peer.recv(1 << 16))
        deadline = time.monotonic() + 5
        while conn.fwd_cnt != total and time.monotonic() < deadline:
            time.sleep(0.01)
        assert conn.fwd_cnt == total
        updates = [p for p in rig.receive(16, timeout=1) if p.hdr.op == Op.CREDIT_UPDATE]
        assert updates and updates[-1].hdr.fwd_cnt >= total - BUF_ALLOC // 4


def test_malformed_packets_are_counted_and_answered_with_reset(rig: VsockRig) -> None:
    rig.send_raw(b"\x01\x02\x03")                                   # shorter than a header
    rig.send(Op(5), GUEST_PORT, 999, b"data for no connection")    # RW to nobody
    rig.send_raw(rig.header(Op.REQUEST, GUEST_PORT, 1, type_=2).pack())          # SEQPACKET
    rig.send_raw(rig.header(Op.REQUEST, GUEST_PORT, 1, dst_cid=7).pack())        # another VM
    rig.send_raw(rig.header(Op.RW, GUEST_PORT, 1, length=500).pack() + b"abc")   # length beyond the packet
    rig.send_raw(dataclasses.replace(rig.header(Op.REQUEST, GUEST_PORT, 1), op=99).pack())  # unknown op
    rig.send(Op.RST, GUEST_PORT, 999)                               # a reset is never answered
    rig.send_raw(rig.header(Op.REQUEST, GUEST_PORT, 1, src_cid=9).pack())        # spoofed source: dropped
    packets = rig.receive(6, timeout=2)
    assert _ops(packets) == [Op.RST] * 5
    assert rig.device.stats.malformed == 6
    assert not rig.transport.status & DeviceStatus.DEVICE_NEEDS_RESET


def test_random_packets_never_break_the_device(rig: VsockRig) -> None:
    rng = random.Random(1234)
    for _ in range(300):
        kind = rng.random()
        if kind < 0.3:
            data = rng.randbytes(rng.randrange(0, 120))
        else:
            hdr = rig.header(Op(rng.randrange(1, 8)), rng.randrange(0, 5), rng.randrange(0, 5),
                             rng.randrange(0, 40), rng.randrange(0, 4)).pack()
            data = hdr + rng.randbytes(rng.randrange(0, 40))
        rig.send_raw(data)
        if rng.random() < 0.2:
            rig.post_rx(2)
    assert not rig.transport.status & DeviceStatus.DEVICE_NEEDS_RESET
    assert rig.device.stats.tx_packets == 300


def test_device_reset_closes_host_sockets(rig: VsockRig, uds: Path) -> None:
    server, peer = _connect_from_guest(rig, uds, 1600)
    with server, peer:
        rig.driver.write(MmioRegister.STATUS, 0)
        assert peer.recv(10) == b""
    assert not rig.device.connections


def test_listener_path_rules(uds: Path, events: EventLoopThread) -> None:
    watcher = events
    uds.write_text("not a socket")
    with pytest.raises(VsockError, match="not a socket"):
        VirtioVsock(3, uds, watcher)
    uds.unlink()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(uds))
    stale.close()                          # a socket file nobody listens on: replaced
    device = VirtioVsock(3, uds, watcher)
    try:
        with pytest.raises(VsockError, match="in use"):
            VirtioVsock(4, uds, watcher)
    finally:
        device.close()
    assert not uds.exists()
    with pytest.raises(VsockError, match="CID"):
        VirtioVsock(2, uds, watcher)


def test_connect_line_in_pieces_and_data_right_after_it(rig: VsockRig, uds: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(5)
        client.connect(str(uds))
        client.sendall(b"CONN")
        time.sleep(0.1)
        assert rig.device.stats.malformed == 0 and rig.receive(timeout=0.1) == []
        client.sendall(b"ECT 60\nearly bytes")   # data before OK waits for the connection
        [request] = rig.receive()
        assert request.hdr.op == Op.REQUEST and request.hdr.dst_port == 60
        rig.send(Op.RESPONSE, 60, request.hdr.src_port)
        assert client.recv(100) == f"OK {request.hdr.src_port}\n".encode()
        [data] = rig.receive()
        assert data.hdr.op == Op.RW and data.payload == b"early bytes"
