"""Host-side network set-ups for the virtio-net tests: quiet TAPs, packet sockets, a peer in a namespace.

Everything is named with a random suffix, uses addresses in 10.213.0.0/24 only inside the namespace and
bridge it creates, and is removed on exit even when the test fails.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from kvmlet.net.tap import Tap, TapSettings

ETH_P_ALL = 0x0003
TEST_ETHERTYPE = 0x88B5      # IEEE 802 local experimental: nothing else on the host sends it
PEER_IP = "10.213.0.1"
GUEST_IP = "10.213.0.2"
PREFIX = 24


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, check=check, timeout=30)


def disable_ipv6(ifname: str) -> None:
    """Keep the host from sending router solicitations and MLD reports through a test interface."""
    with contextlib.suppress(OSError):
        Path(f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6").write_text("1")


def quiet_tap(queues: int = 1) -> Tap:
    """A new TAP, up, that the host stack sends nothing through by itself."""
    tap = Tap.open("auto", queues)
    disable_ipv6(tap.name)
    tap.configure(TapSettings())
    return tap


def packet_socket(ifname: str) -> socket.socket:
    """A raw packet socket on ``ifname``: frames the guest sends arrive here, frames sent go to the guest."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.bind((ifname, 0))
    sock.settimeout(5)
    return sock


def make_frame(dst: bytes, src: bytes, payload: bytes, ethertype: int = TEST_ETHERTYPE) -> bytes:
    return dst + src + ethertype.to_bytes(2, "big") + payload


def receive_matching(sock: socket.socket, ethertype: int = TEST_ETHERTYPE, timeout: float = 5.0,
                     count: int = 1) -> list[bytes]:
    """Frames of ``ethertype`` seen on the packet socket (until ``count`` or the timeout)."""
    frames: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(frames) < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        ready, _, _ = select.select([sock], [], [], remaining)
        if not ready:
            break
        data = sock.recv(70000)
        if len(data) >= 14 and int.from_bytes(data[12:14], "big") == ethertype:
            frames.append(data)
    return frames


ECHO_SERVER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
print("READY", flush=True)
while True:
    data, addr = s.recvfrom(65536)
    s.sendto(data, addr)
"""


@dataclass
class PeerNetwork:
    """A bridge in the root namespace with a veth into a namespace where a UDP server runs."""

    bridge: str
    namespace: str
    veth: str
    peer_ip: str = PEER_IP
    guest_ip: str = GUEST_IP
    udp_port: int = 7777
    server: subprocess.Popen[str] | None = None   # its stdin is a pipe when peer_network(stdin=True)


@contextlib.contextmanager
def peer_network(udp_port: int = 7777, *, server_program: str = ECHO_SERVER,
                 stdin: bool = False) -> Iterator[PeerNetwork]:
    """The network, with ``server_program`` (Python source run with the peer address and the port as
    arguments, printing ``READY`` once it listens; by default the UDP echo server) in the namespace."""
    suffix = secrets.token_hex(3)
    net = PeerNetwork(bridge=f"kvbr{suffix}", namespace=f"kvns{suffix}", veth=f"kvve{suffix}",
                      udp_port=udp_port)
    peer = f"kvvp{suffix}"
    server: subprocess.Popen[str] | None = None
    try:
        run("ip", "link", "add", net.bridge, "type", "bridge")
        disable_ipv6(net.bridge)
        run("ip", "link", "set", net.bridge, "up")
        run("ip", "netns", "add", net.namespace)
        run("ip", "link", "add", net.veth, "type", "veth", "peer", "name", peer)
        disable_ipv6(net.veth)
        run("ip", "link", "set", peer, "netns", net.namespace)
        run("ip", "link", "set", net.veth, "master", net.bridge, "up")
        run("ip", "-n", net.namespace, "addr", "add", f"{net.peer_ip}/{PREFIX}", "dev", peer)
        run("ip", "-n", net.namespace, "link", "set", peer, "up")
        run("ip", "-n", net.namespace, "link", "set", "lo", "up")
        server = subprocess.Popen(["ip", "netns", "exec", net.namespace, sys.executable, "-c", server_program,
                                   net.peer_ip, str(udp_port)], stdout=subprocess.PIPE,
                                  stdin=subprocess.PIPE if stdin else None, text=True)
        net.server = server
        assert server.stdout is not None
        ready, _, _ = select.select([server.stdout], [], [], 10)
        if not ready or server.stdout.readline().strip() != "READY":
            raise RuntimeError("the UDP server in the namespace did not start")
        yield net
    finally:
        if server is not None:
            server.kill()
            server.wait(5)
            for stream in (server.stdin, server.stdout):
                if stream is not None:
                    stream.close()
        run("ip", "netns", "del", net.namespace, check=False)
        for link in (net.veth, net.bridge):
            if os.path.exists(f"/sys/class/net/{link}"):
                run("ip", "link", "del", link, check=False)
