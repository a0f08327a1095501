"""virtio-vsock in a real VM, against the test guest's `virtio-vsock` check: the guest connects to host port
P; kvmlet connects that to the Unix socket ``<uds>_P`` where the test serves PING -> PONG.
"""

from __future__ import annotations

from pathlib import Path

from kvmlet.config import Vsock
from kvmlet.devices.virtio.vsock import VirtioVsock
from tests.support.vmrun import run_vm
from tests.support.vsockecho import pong_server


def test_guest_vsock_ping_pong_with_a_host_unix_socket(guest_elf: Path, tmp_path: Path) -> None:
    uds = tmp_path / "vm.vsock"
    port = 1234
    with pong_server(f"{uds}_{port}") as got:
        run = run_vm(guest_elf, f"console=ttyS0 kvmlet.test=virtio-vsock kvmlet.vsock_port={port}",
                     vsock=Vsock(guest_cid=7, uds_path=str(uds)))
    assert run.passed("virtio-vsock"), run.output
    assert f"VSOCK cid=7 port={port}" in run.output
    assert got == [b"PING\n"]
    [device] = run.devices
    assert isinstance(device, VirtioVsock)
    assert device.stats.guest_connections == 1 and device.stats.malformed == 0
    assert not uds.exists()  # the listener is removed with the VM
