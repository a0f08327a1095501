"""Two kvmlet VMs talking to each other: the test guest's virtio-net peer checks over two TAPs in a bridge.

Guest A runs the client checks (`virtio-net`: ARP, one UDP datagram, its echo; `virtio-net-bench`: a stream of
1514-byte frames), guest B the peer checks (`virtio-net-serve`: answers ARP, echoes UDP; `virtio-net-sink`:
answers ARP, counts). Both TAPs join a Linux bridge in the root namespace made for the test; a packet socket on
A's TAP sees what A sends, so the source MAC (`kvmlet.net_mac`) and the 802.1Q tag (`kvmlet.net_vlan`) can be
checked on the host side.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kvmlet.config import NetworkInterface
from kvmlet.devices.legacy.console import BufferConsole
from kvmlet.devices.virtio.net import VirtioNet
from kvmlet.machine import ExitStatus
from kvmlet.memory import MiB
from tests.support.netlab import ETH_P_ALL, disable_ipv6, run
from tests.support.vmrun import built_machine, vm_config

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
                                reason="TAP devices and bridges need root")

IP_A, IP_B = "10.200.0.2", "10.200.0.3"
PORT = 7
ETH_P_8021Q = 0x8100
ETH_P_ARP = 0x0806
ETH_P_IP = 0x0800
SOL_PACKET = 263
PACKET_AUXDATA = 8
TP_STATUS_VLAN_VALID = 0x10
AUXDATA = struct.Struct("=IIIHHHH")   # struct tpacket_auxdata


@pytest.fixture
def bridge() -> Iterator[str]:
    name = f"kvpb{secrets.token_hex(3)}"
    run("ip", "link", "add", name, "type", "bridge")
    try:
        disable_ipv6(name)
        run("ip", "link", "set", name, "up")
        yield name
    finally:
        run("ip", "link", "del", name, check=False)


@dataclass
class Frame:
    data: bytes          # as captured, with the tag put back in place if the kernel moved it to metadata
    vlan: int | None     # the 802.1Q VID, if tagged

    @property
    def src(self) -> bytes:
        return self.data[6:12]

    @property
    def ethertype(self) -> int:
        return int.from_bytes(self.data[16:18] if self.vlan is not None else self.data[12:14], "big")


@dataclass
class PeerRun:
    server: str                       # B's console
    client: str                       # A's console
    server_status: ExitStatus
    client_status: ExitStatus
    client_device: VirtioNet
    server_device: VirtioNet
    captured: list[Frame] = field(default_factory=list)   # what A sent, seen on its TAP


def capture_socket(ifname: str) -> socket.socket:
    """Frames leaving the guest on its TAP (outgoing from the host's view is not wanted: PACKET_OUTGOING)."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind((ifname, 0))
    sock.setblocking(False)
    return sock


def drain(sock: socket.socket) -> list[Frame]:
    frames: list[Frame] = []
    while True:
        try:
            data, ancillary, _, address = sock.recvmsg(70000, socket.CMSG_SPACE(AUXDATA.size))
        except BlockingIOError:
            return frames
        if address[2] == socket.PACKET_OUTGOING:
            continue   # the host sending to the guest, not the guest sending
        vlan = None
        if len(data) >= 16 and int.from_bytes(data[12:14], "big") == ETH_P_8021Q:
            vlan = int.from_bytes(data[14:16], "big") & 0xfff
        for level, kind, value in ancillary:
            if level == SOL_PACKET and kind == PACKET_AUXDATA and len(value) >= AUXDATA.size:
                status, _, _, _, _, tci, tpid = AUXDATA.unpack_from(value)
                if status & TP_STATUS_VLAN_VALID and vlan is None:   # the kernel took the tag off the data
                    vlan = tci & 0xfff
                    data = data[:12] + (tpid or ETH_P_8021Q).to_bytes(2, "big") + tci.to_bytes(2, "big") + data[12:]
        frames.append(Frame(data, vlan))


def run_peers(guest_elf: Path, bridge: str, server_cmdline: str, client_cmdline: str,
              timeout: float = 60.0) -> PeerRun:
    """B (the server) boots first; A starts once B printed ``NET serve ready``."""
    consoles = BufferConsole(), BufferConsole()
    nets = [NetworkInterface(iface_id="net0", host_dev_name="auto", bridge=bridge)]
    with contextlib.ExitStack() as stack:
        machines = [stack.enter_context(built_machine(
            vm_config(guest_elf, cmdline=f"console=ttyS0 {cmdline}", memory=64 * MiB, nets=nets), console=console))
            for cmdline, console in zip((server_cmdline, client_cmdline), consoles, strict=True)]
        devices: list[VirtioNet] = []
        for machine in machines:
            assert machine.devices is not None
            [device] = machine.devices.virtio_devices()
            assert isinstance(device, VirtioNet)
            devices.append(device)
        sock = stack.enter_context(capture_socket(devices[1].tap.name))
        server, client = machines
        server.start()
        assert consoles[0].wait_for(b"NET serve ready", 30), consoles[0].output()
        client.start()
        client_status = client.wait(timeout)
        server_status = server.wait(timeout)
        captured = drain(sock)
    return PeerRun(consoles[0].output().decode(errors="replace"), consoles[1].output().decode(errors="replace"),
                   server_status, client_status, devices[1], devices[0], captured)


def test_two_guests_echo_udp_through_a_bridge(guest_elf: Path, bridge: str) -> None:
    r = run_peers(guest_elf, bridge,
                  f"kvmlet.test=virtio-net-serve kvmlet.net_ip={IP_B} kvmlet.net_peer={IP_A} kvmlet.net_port={PORT} "
                  "kvmlet.net_serve=1",
                  f"kvmlet.test=virtio-net kvmlet.net_ip={IP_A} kvmlet.net_peer={IP_B} kvmlet.net_port={PORT}")
    assert "TEST virtio-net-serve PASS" in r.server and "NET served echoes=1" in r.server, r.server
    assert "TEST virtio-net PASS" in r.client and "NET udp echo ok" in r.client, r.client
    assert r.client_status.code == 0 and r.server_status.code == 0
    server_mac = r.server.split("NET mac=")[1].split()[0]
    assert f"NET arp reply from {server_mac}" in r.client
    assert r.client_device.stats.tx_bad_frames == 0 and r.server_device.stats.tx_bad_frames == 0


def test_net_mac_is_the_source_of_every_frame_and_is_answered(guest_elf: Path, bridge: str) -> None:
    spoofed = "02:11:22:33:44:55"
    r = run_peers(guest_elf, bridge,
                  f"kvmlet.test=virtio-net-serve kvmlet.net_ip={IP_B} kvmlet.net_peer={IP_A} kvmlet.net_port={PORT}",
                  f"kvmlet.test=virtio-net kvmlet.net_ip={IP_A} kvmlet.net_peer={IP_B} kvmlet.net_port={PORT} "
                  f"kvmlet.net_mac={spoofed}")
    assert f"NET mac={spoofed}" in r.client, r.client
    assert "TEST virtio-net PASS" in r.client, r.client      # B answered to the spoofed MAC, A received it
    assert "TEST virtio-net-serve PASS" in r.server, r.server
    device_mac = r.client_device.mac
    sent = [f for f in r.captured if f.ethertype in (ETH_P_ARP, ETH_P_IP)]
    assert {f.ethertype for f in sent} == {ETH_P_ARP, ETH_P_IP}, r.captured
    assert all(f.src == bytes.fromhex(spoofed.replace(":", "")) for f in sent), [f.src.hex() for f in sent]
    assert device_mac != bytes.fromhex(spoofed.replace(":", ""))
    arp = next(f for f in sent if f.ethertype == ETH_P_ARP)
    assert arp.data[22:28] == bytes.fromhex(spoofed.replace(":", ""))   # ARP sender hardware address too


@pytest.mark.parametrize("vid", [1, 100, 4094])
def test_net_vlan_tags_every_frame_and_two_guests_on_the_vlan_talk(guest_elf: Path, bridge: str, vid: int) -> None:
    r = run_peers(guest_elf, bridge,
                  f"kvmlet.test=virtio-net-serve kvmlet.net_ip={IP_B} kvmlet.net_peer={IP_A} kvmlet.net_port={PORT} "
                  f"kvmlet.net_vlan={vid}",
                  f"kvmlet.test=virtio-net kvmlet.net_ip={IP_A} kvmlet.net_peer={IP_B} kvmlet.net_port={PORT} "
                  f"kvmlet.net_vlan={vid}")
    assert f"NET vlan={vid}" in r.client and "TEST virtio-net PASS" in r.client, r.client
    assert "TEST virtio-net-serve PASS" in r.server, r.server
    sent = [f for f in r.captured if f.ethertype in (ETH_P_ARP, ETH_P_IP)]
    assert sent and all(f.vlan == vid for f in sent), [(f.vlan, f.data[:18].hex()) for f in r.captured]
    assert {f.ethertype for f in sent} == {ETH_P_ARP, ETH_P_IP}
    arp = next(f for f in sent if f.ethertype == ETH_P_ARP)
    assert len(arp.data) >= 64   # tagged and padded: still 60 bytes once the tag is removed


def test_guests_on_different_vlans_do_not_hear_each_other(guest_elf: Path, bridge: str) -> None:
    r = run_peers(guest_elf, bridge,
                  f"kvmlet.test=virtio-net-serve kvmlet.net_ip={IP_B} kvmlet.net_peer={IP_A} kvmlet.net_port={PORT} "
                  "kvmlet.net_vlan=20 kvmlet.timeout=1",
                  f"kvmlet.test=virtio-net kvmlet.net_ip={IP_A} kvmlet.net_peer={IP_B} kvmlet.net_port={PORT} "
                  "kvmlet.net_vlan=10 kvmlet.timeout=1")
    assert f"TEST virtio-net FAIL no ARP reply from {IP_B}" in r.client, r.client
    assert "TEST virtio-net-serve FAIL timeout: 0 of 1 echoes" in r.server, r.server


def test_bench_into_a_sink_between_two_guests(guest_elf: Path, bridge: str) -> None:
    loops = 2000
    r = run_peers(guest_elf, bridge,
                  f"kvmlet.test=virtio-net-sink kvmlet.net_ip={IP_B} kvmlet.net_peer={IP_A} kvmlet.loops={loops} "
                  "kvmlet.net_idle_ms=300",
                  f"kvmlet.test=virtio-net-bench kvmlet.net_ip={IP_A} kvmlet.net_peer={IP_B} kvmlet.net_port=9000 "
                  f"kvmlet.loops={loops}")
    assert "TEST virtio-net-bench PASS" in r.client, r.client
    assert f"BENCH net-udp-tx done ops={loops} bytes={loops * 1472}" in r.client
    assert "TEST virtio-net-sink PASS" in r.server, r.server
    assert "BENCH net-udp-rx start" in r.server
    done = r.server.split("BENCH net-udp-rx done ")[1].splitlines()[0]
    values = dict(item.split("=") for item in done.split())
    frames = int(values["ops"])
    assert 0 < frames <= loops and int(values["bytes"]) == frames * 1472, done
    assert "NET sink frames=" in r.server
