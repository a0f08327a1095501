"""vhost-user virtio-net: the protocol against a scripted back end (unit), and real VMs against DPDK's testpmd.

The VM tests start ``dpdk-testpmd`` (Debian ``dpdk-dev``) inside the test and stop it on every exit path: its
forwarding core polls a whole CPU. They skip, naming what is missing, on a host without testpmd, root or TAP.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kvmlet.config import NetworkInterface
from kvmlet.config.specs import parse_net
from kvmlet.devices.legacy.console import BufferConsole
from kvmlet.devices.virtio.vhost_user_net import VhostUserNet
from kvmlet.errors import ConfigError, UnsupportedError
from kvmlet.memory import GuestMemory, MiB
from kvmlet.net import switch as switches
from kvmlet.net.switch import TestpmdSwitch, VhostPort
from kvmlet.vhost.protocol import FLAG_NEED_REPLY, Request
from tests.support.netlab import PeerNetwork, peer_network, run
from tests.support.vhost_backend import fake_backend
from tests.support.vmrun import built_machine, run_vm, vm_config


class StubLoop:
    """The event loop as the device sees it, without a thread (unit tests)."""

    def __init__(self) -> None:
        self.watched: dict[int, Callable[[], None]] = {}
        self.later: list[tuple[float, Callable[[], None]]] = []

    def watch_read(self, fd: int, callback: Callable[[], None]) -> None:
        self.watched[fd] = callback

    def unwatch_read(self, fd: int) -> None:
        self.watched.pop(fd, None)

    def watch_write(self, fd: int, callback: Callable[[], None]) -> None: ...

    def unwatch_write(self, fd: int) -> None: ...

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        self.later.append((delay, callback))

    def call_soon(self, callback: Callable[[], None]) -> None:
        callback()


@pytest.fixture
def socket_path(tmp_path: Path) -> str:
    return str(tmp_path / "vhost.sock")


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    with GuestMemory.with_size(16 * MiB) as mem:
        yield mem


# -- the protocol, against a scripted back end ---------------------------------------------------------------
def test_set_up_negotiates_reply_ack_and_every_command_is_acknowledged(socket_path: str,
                                                                       memory: GuestMemory) -> None:
    with fake_backend(socket_path) as backend:
        device = VhostUserNet(socket_path, b"\x02\0\0\0\0\1", memory, StubLoop(), pairs=2)
        try:
            requests = [request for request, _, _ in backend.received]
            assert requests[:5] == [Request.GET_FEATURES, Request.GET_PROTOCOL_FEATURES,
                                    Request.SET_PROTOCOL_FEATURES, Request.GET_QUEUE_NUM, Request.SET_OWNER]
            flags = dict((request, flag) for request, flag, _ in backend.received)
            assert flags[Request.SET_OWNER] & FLAG_NEED_REPLY      # REPLY_ACK agreed: commands acknowledged
            assert not flags[Request.SET_PROTOCOL_FEATURES] & FLAG_NEED_REPLY
            assert device.link_up and device.stats.connects == 1
            offered = device.device_features()
            assert offered & (1 << 32) and offered & (1 << 22)    # VERSION_1 (back end), MQ (kvmlet's)
            assert not offered & (1 << 29)                        # EVENT_IDX: the back end did not offer it
        finally:
            device.close()


def test_a_back_end_answering_garbage_is_refused_with_a_message_naming_it(socket_path: str,
                                                                          memory: GuestMemory) -> None:
    with fake_backend(socket_path, garbage_reply_to=Request.GET_FEATURES), \
            pytest.raises(ConfigError, match="broke the protocol: it answered GET_FEATURES"):
        VhostUserNet(socket_path, b"\x02\0\0\0\0\1", memory, StubLoop())


def test_unsolicited_bytes_drop_the_connection_and_reconnection_is_scheduled(socket_path: str,
                                                                             memory: GuestMemory) -> None:
    loop = StubLoop()
    with fake_backend(socket_path, garbage_after=Request.SET_OWNER) as backend:
        device = VhostUserNet(socket_path, b"\x02\0\0\0\0\1", memory, loop)
        try:
            [(fd, readable)] = loop.watched.items()
            deadline = time.monotonic() + 5
            while not select_readable(fd) and time.monotonic() < deadline:
                time.sleep(0.01)
            readable()
            assert not device.link_up
            assert device.stats.protocol_errors == 1
            assert "broke the protocol: it sent" in device.stats.last_error
            assert loop.later, "a reconnection is scheduled"
            backend.garbage_after = None
            loop.later.pop()[1]()                 # the reconnection attempt
            assert device.link_up and device.stats.connects == 2 and backend.connections == 2
        finally:
            device.close()


def select_readable(fd: int) -> bool:
    import select

    return bool(select.select([fd], [], [], 0)[0])


def test_more_queue_pairs_than_the_back_end_serves_are_refused(socket_path: str, memory: GuestMemory) -> None:
    with fake_backend(socket_path, queues=1), pytest.raises(ConfigError, match="serves 1 queue pairs; 2 were"):
        VhostUserNet(socket_path, b"\x02\0\0\0\0\1", memory, StubLoop(), pairs=2)


def test_no_back_end_is_a_clear_error(socket_path: str, memory: GuestMemory) -> None:
    with pytest.raises(ConfigError, match="cannot connect"):
        VhostUserNet(socket_path, b"\x02\0\0\0\0\1", memory, StubLoop(), connect_timeout=0.1)


def test_memory_mapped_privately_from_a_snapshot_is_refused(tmp_path: Path, socket_path: str) -> None:
    image = tmp_path / "memory"
    image.write_bytes(bytes(16 * MiB))
    with GuestMemory.from_file(str(image), [(0, 16 * MiB)]) as private, \
            pytest.raises(ConfigError, match=r"mapped privately .* from .*snapshot"):
        VhostUserNet(socket_path, b"\x02\0\0\0\0\1", private, StubLoop())


def test_snapshots_are_refused_naming_why(socket_path: str, memory: GuestMemory) -> None:
    with fake_backend(socket_path):
        device = VhostUserNet(socket_path, b"\x02\0\0\0\0\1", memory, StubLoop(), name="net:uplink")
        try:
            with pytest.raises(UnsupportedError, match=r"net:uplink cannot be saved: .*dirty logging"):
                device.save_state()
        finally:
            device.close()


# -- configuration -------------------------------------------------------------------------------------------
def test_the_cli_spec_and_the_model() -> None:
    net = parse_net("vhost-user=/run/sw/vm0.sock,queues=2", 0)
    assert net.vhost_user_socket == "/run/sw/vm0.sock" and net.queues == 2 and net.iface_id == "net0"
    with pytest.raises(ConfigError, match="tap= or vhost-user="):
        parse_net("tap=tap0,vhost-user=/run/x.sock", 0)
    with pytest.raises(ConfigError, match="bridge applies to TAP"):
        parse_net("vhost-user=/run/x.sock,bridge=br0", 0)
    with pytest.raises(ConfigError, match="transport mmio"):
        NetworkInterface(iface_id="n", vhost_user_socket="/run/x.sock", transport="pci").validate()


# -- real VMs against dpdk-testpmd ----------------------------------------------------------------------------
def _host_problem() -> str | None:
    if switches.testpmd_path() is None:
        return "dpdk-testpmd is not installed (Debian package dpdk-dev)"
    if os.geteuid() != 0 or not os.path.exists("/dev/net/tun"):
        return "TAP devices, network namespaces and DPDK's net_tap need root and /dev/net/tun"
    if not os.path.exists("/dev/kvm"):
        return "no /dev/kvm"
    return None


needs_testpmd = pytest.mark.skipif(_host_problem() is not None, reason=_host_problem() or "")


@pytest.fixture
def peer() -> Iterator[PeerNetwork]:
    with peer_network(udp_port=7777) as net:
        yield net


@pytest.fixture
def switch_factory(tmp_path: Path) -> Iterator[Callable[..., TestpmdSwitch]]:
    """Starts testpmd switches for a test and stops every one of them afterwards, whatever happened."""
    started: list[TestpmdSwitch] = []

    def start(queues: int = 1, uplink: str | None = None) -> TestpmdSwitch:
        switch = TestpmdSwitch([VhostPort("vm0", str(tmp_path / "vm0.sock"), queues)], uplink_tap=uplink)
        started.append(switch)
        return switch.start()

    try:
        yield start
    finally:
        for switch in started:
            switch.stop()
        assert all(not switch.running() for switch in started)


def _uplink(peer: PeerNetwork) -> str:
    return f"kvdt{secrets.token_hex(3)}"


def _join(tap: str, bridge: str) -> None:
    run("ip", "link", "set", tap, "master", bridge, "up")


def _cmdline(peer: PeerNetwork, checks: str = "virtio-net", queues: int = 1) -> str:
    return (f"console=ttyS0 kvmlet.test={checks} kvmlet.net_ip={peer.guest_ip} kvmlet.net_peer={peer.peer_ip} "
            f"kvmlet.net_port={peer.udp_port} kvmlet.net_queues={queues} kvmlet.timeout=10")


@needs_testpmd
@pytest.mark.slow
@pytest.mark.parametrize("queues", [1, 2])
def test_guest_udp_echo_over_vhost_user_through_testpmd(guest_elf: Path, peer: PeerNetwork,
                                                        switch_factory: Callable[..., TestpmdSwitch],
                                                        queues: int) -> None:
    uplink = _uplink(peer)
    switch = switch_factory(queues, uplink)
    _join(uplink, peer.bridge)
    net = NetworkInterface(iface_id="net0", vhost_user_socket=switch.ports[0].socket, queues=queues)
    vm = run_vm(guest_elf, _cmdline(peer, "virtio-net,serial", queues), nets=[net], timeout=60)
    assert vm.passed("virtio-net") and vm.passed("serial"), vm.output
    assert f"NET queues={queues}" in vm.output
    [device] = vm.devices
    assert isinstance(device, VhostUserNet)
    assert device.stats.protocol_errors == 0 and device.stats.rings_started >= 2, device.stats


@needs_testpmd
@pytest.mark.slow
def test_the_back_end_restarting_reconnects_and_the_network_comes_back(
        guest_elf: Path, peer: PeerNetwork, switch_factory: Callable[..., TestpmdSwitch]) -> None:
    uplink = _uplink(peer)
    first = switch_factory(1, uplink)
    _join(uplink, peer.bridge)
    console = BufferConsole()
    net = NetworkInterface(iface_id="net0", vhost_user_socket=first.ports[0].socket)
    cmdline = _cmdline(peer, "virtio-net,uart-rx,virtio-net,serial").replace("kvmlet.timeout=10", "kvmlet.timeout=60")
    config = vm_config(guest_elf, cmdline=cmdline, memory=64 * MiB, nets=[net])
    with built_machine(config, console=console) as machine:
        assert machine.devices is not None
        [device] = machine.devices.virtio_devices()
        assert isinstance(device, VhostUserNet) and device.link_up
        machine.start()
        assert console.wait_for(b"READY uart-rx", 60), console.output()   # the first echo went through
        first.stop()                                   # the switch goes away under the running VM ...
        deadline = time.monotonic() + 10
        while device.link_up and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not device.link_up and device.stats.disconnects == 1
        second = switch_factory(1, uplink)             # ... and comes back (a new process, same socket)
        _join(uplink, peer.bridge)
        deadline = time.monotonic() + 10
        while not device.link_up and time.monotonic() < deadline:
            time.sleep(0.05)
        assert device.link_up and device.stats.connects == 2, device.stats
        console.feed(b"go on\n")                      # the guest sets its device up again and echoes again
        status = machine.wait(90)
        assert second.running()
    output = console.output().decode(errors="replace")
    assert output.count("TEST virtio-net PASS") == 2 and "TEST serial PASS" in output, output
    assert status.code == 0


@pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="no /dev/kvm")
def test_a_back_end_sending_garbage_mid_run_is_disconnected_and_the_vm_runs_on(guest_elf: Path,
                                                                                 socket_path: str) -> None:
    with fake_backend(socket_path, garbage_after=Request.SET_VRING_ENABLE) as backend:
        cmdline = "console=ttyS0 kvmlet.test=virtio-net,serial kvmlet.timeout=2"
        vm = run_vm(guest_elf, cmdline, nets=[NetworkInterface(iface_id="net0", vhost_user_socket=socket_path)],
                    timeout=60)
    assert "TEST virtio-net FAIL" in vm.output and "TEST serial PASS" in vm.output, vm.output
    assert "TESTS DONE 1 1" in vm.output
    [device] = vm.devices
    assert isinstance(device, VhostUserNet)
    assert device.stats.protocol_errors >= 1 and "broke the protocol" in device.stats.last_error, device.stats
    assert backend.memory_fds >= 1    # the memory table went with the memfd


def test_no_testpmd_is_left_running() -> None:
    if shutil.which("pgrep") is None:
        pytest.skip("no pgrep")
    mine = subprocess.run(["pgrep", "-f", f"file-prefix=kvmlet-{os.getpid()}-"], capture_output=True, text=True)
    assert mine.stdout.strip() == "", f"testpmd processes of this test run are still running: {mine.stdout}"


def test_kvmlet_net_port_specs() -> None:
    from kvmlet.net.cli import parse_port

    assert parse_port("vm0=/run/vm0.sock,queues=2") == VhostPort("vm0", "/run/vm0.sock", 2)
    with pytest.raises(ConfigError, match="NAME=SOCKET"):
        parse_port("/run/vm0.sock")


@needs_testpmd
def test_kvmlet_net_switch_runs_until_sigterm_and_cleans_up(tmp_path: Path) -> None:
    import signal
    import sys

    sock = tmp_path / "vm0.sock"
    process = subprocess.Popen([sys.executable, "-m", "kvmlet", "net", "switch", "--engine", "testpmd",
                                "--port", f"vm0={sock},queues=2"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert process.stdout is not None
        lines = []
        for line in process.stdout:
            lines.append(line)
            if line.startswith("switch running"):
                break
        assert sock.is_socket(), lines
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0
        assert not sock.exists()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
