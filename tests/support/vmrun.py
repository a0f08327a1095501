"""Running the test guest in a VM with network devices, keeping the devices for inspection."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kvmlet.config import MachineConfig
from kvmlet.devices.legacy.console import BufferConsole
from kvmlet.devices.virtio.device import VirtioDevice
from kvmlet.devices.virtio.net_options import NetConfig, VsockConfig
from kvmlet.memory import MiB
from kvmlet.vm import ExitStatus, Machine


@dataclass
class VmRun:
    status: ExitStatus
    output: str
    devices: list[VirtioDevice] = field(default_factory=list)

    def passed(self, name: str) -> bool:
        return f"TEST {name} PASS" in self.output


def run_vm(guest_elf: Path, cmdline: str, *, nets: list[NetConfig] | None = None,
           vsock: VsockConfig | None = None, timeout: float = 90.0) -> VmRun:
    """Boot the guest with ``cmdline``; skips if the guest's check is still a stub ("FAIL todo")."""
    console = BufferConsole()
    config = MachineConfig(kernel=guest_elf, cmdline=cmdline, memory=64 * MiB, nets=nets or [], vsock=vsock)
    machine = Machine(config, console=console).build()
    devices: list[VirtioDevice] = []
    try:
        assert machine.virtio is not None
        devices = [attached.device for attached in machine.virtio.devices]
        machine.start()
        status = machine.wait(timeout)
    finally:
        machine.close()
    output = console.output().decode(errors="replace")
    return VmRun(status, output, devices)
