"""Building and running VMs in tests: a configuration from a few values, a machine on its own event loop
(closed, and the loop stopped, afterwards), and running the test guest with devices kept for inspection."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from kvmlet.config import Drive, Entropy, NetworkInterface, VmConfig, Vsock, simple_config
from kvmlet.devices.legacy.console import BufferConsole, Console
from kvmlet.devices.virtio.device import VirtioDevice
from kvmlet.eventloop import EventLoopThread
from kvmlet.machine import ExitStatus, Machine, build_machine
from kvmlet.memory import MiB


def vm_config(kernel: str | Path, *, cmdline: str | None = None, vcpus: int = 1, memory: int = 64 * MiB,
              boot: str = "auto", initrd: str | Path | None = None, console: str = "stdio",
              drives: list[Drive] | None = None, nets: list[NetworkInterface] | None = None,
              vsock: Vsock | None = None, entropy: Entropy | None = None) -> VmConfig:
    """A VmConfig; ``memory`` is in bytes (a whole number of MiB), as the tests have always given it."""
    assert memory % MiB == 0, f"memory {memory} is not a whole number of MiB"
    config = simple_config(kernel, cmdline=cmdline, vcpus=vcpus, mem_size_mib=memory // MiB, boot=boot,
                           console=console, drives=drives, network_interfaces=nets, vsock=vsock, entropy=entropy)
    if initrd is not None:
        assert config.boot_source is not None
        config = msgspec.structs.replace(
            config, boot_source=msgspec.structs.replace(config.boot_source, initrd_path=str(initrd)))
    return config


@contextmanager
def built_machine(config: VmConfig, *, console: Console | None = None,
                  kernel_image: bytes | None = None) -> Iterator[Machine]:
    """A built (not started) machine on its own event loop; closed, and the loop stopped, on exit."""
    events = EventLoopThread()
    try:
        machine = build_machine(config, events, console=console, kernel_image=kernel_image)
        try:
            yield machine
        finally:
            machine.close()
    finally:
        events.stop()


@dataclass
class VmRun:
    status: ExitStatus
    output: str
    devices: list[VirtioDevice] = field(default_factory=list)

    def passed(self, name: str) -> bool:
        return f"TEST {name} PASS" in self.output


def run_vm(guest_elf: Path, cmdline: str, *, nets: list[NetworkInterface] | None = None,
           vsock: Vsock | None = None, timeout: float = 90.0) -> VmRun:
    """Boot the guest with ``cmdline`` and its virtio devices; returns its status, output and devices."""
    console = BufferConsole()
    config = vm_config(guest_elf, cmdline=cmdline, memory=64 * MiB, nets=nets, vsock=vsock)
    devices: list[VirtioDevice] = []
    with built_machine(config, console=console) as machine:
        assert machine.devices is not None
        devices = machine.devices.virtio_devices()
        machine.start()
        status = machine.wait(timeout)
    output = console.output().decode(errors="replace")
    return VmRun(status, output, devices)
