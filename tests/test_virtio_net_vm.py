"""virtio-net in real VMs, against the test guest's `virtio-net` check.

The VM's TAP (created by kvmlet) joins a bridge in the root namespace; a veth pair connects the
bridge to a namespace where a UDP echo server listens on 10.213.0.1. The guest (10.213.0.2) resolves the
peer with ARP and has a datagram echoed. Everything is created per test and removed afterwards.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmlet.config import NetworkInterface
from kvmlet.devices.legacy.console import BufferConsole
from kvmlet.devices.virtio.net import VirtioNet
from kvmlet.machine import StopKind
from kvmlet.memory import MiB
from tests.support.netlab import PeerNetwork, peer_network, run
from tests.support.vmrun import built_machine, run_vm, vm_config

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
                                reason="TAP devices and network namespaces need root")


@pytest.fixture
def peer() -> Iterator[PeerNetwork]:
    with peer_network(udp_port=7777) as net:
        yield net


@pytest.mark.parametrize(("queues", "offload"), [(1, True), (1, False), (2, True), (2, False)])
def test_guest_udp_echo_through_a_tap_and_bridge(guest_elf: Path, peer: PeerNetwork, queues: int,
                                                 offload: bool) -> None:
    cmdline = (f"console=ttyS0 kvmlet.test=virtio-net kvmlet.net_ip={peer.guest_ip} "
               f"kvmlet.net_peer={peer.peer_ip} kvmlet.net_port={peer.udp_port} kvmlet.net_queues={queues} "
               f"kvmlet.net_offload={int(offload)} kvmlet.timeout=20")
    net = NetworkInterface(iface_id="net0", host_dev_name="auto", queues=queues, offload=offload, bridge=peer.bridge)
    vm = run_vm(guest_elf, cmdline, nets=[net])
    assert vm.passed("virtio-net"), vm.output
    assert f"NET queues={queues} csum={int(offload)} guest_csum={int(offload)}" in vm.output
    assert vm.status.code == 0, vm.output
    [device] = vm.devices
    assert isinstance(device, VirtioNet)
    stats = device.stats
    assert stats.tx_frames >= 2 and stats.rx_frames >= 2 and stats.tx_bad_frames == 0, stats
    assert device.active_pairs == 1 or queues == 2


def test_a_vanished_tap_is_link_down_for_the_guest_and_the_vm_runs_on(guest_elf: Path) -> None:
    cmdline = "console=ttyS0 kvmlet.test=virtio-net,serial kvmlet.timeout=5"
    console = BufferConsole()
    config = vm_config(guest_elf, cmdline=cmdline, memory=64 * MiB,
                       nets=[NetworkInterface(iface_id="net0", host_dev_name="auto")])
    with built_machine(config, console=console) as machine:
        assert machine.devices is not None
        [device] = machine.devices.virtio_devices()
        assert isinstance(device, VirtioNet)
        run("ip", "link", "del", device.tap.name)
        machine.start()
        status = machine.wait(60)
    output = console.output().decode(errors="replace")
    assert "NET link=down" in output and "TEST virtio-net FAIL link down" in output, output
    assert "TEST serial PASS" in output  # the guest went on to its next check
    assert status.kind is StopKind.GUEST_EXIT and status.code == 1
    assert not device.link_up
