"""Shared fixtures: the built test guest and a helper that runs it in a real VM on /dev/kvm."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from kvmlet.devices.legacy.console import BufferConsole
from kvmlet.guest_image import builtin_guest
from kvmlet.machine import ExitStatus, Machine
from kvmlet.memory import MiB
from tests.support.vmrun import built_machine, vm_config


@pytest.fixture(scope="session")
def guest_elf() -> Path:
    if not os.path.exists("/dev/kvm"):
        pytest.fail("/dev/kvm is missing: the VM tests need KVM (every dev and CI host has it)")
    return builtin_guest()


@dataclass
class GuestRun:
    status: ExitStatus
    output: str
    machine: Machine

    def lines(self, prefix: str) -> list[str]:
        return [line for line in self.output.splitlines() if line.startswith(prefix)]

    def passed(self, name: str) -> bool:
        return f"TEST {name} PASS" in self.output


RunGuest = Callable[..., GuestRun]


@pytest.fixture
def run_guest(guest_elf: Path) -> RunGuest:
    """Boot the test guest with ``kvmlet.test=<tests>`` and return its status and console output
    (``memory`` in bytes, a whole number of MiB)."""

    def run(tests: str, *, vcpus: int = 1, memory: int = 64 * MiB, boot: str = "auto",
            extra: str = "", timeout: float = 60.0,
            during: Callable[[Machine, BufferConsole], None] | None = None) -> GuestRun:
        console = BufferConsole()
        cmdline = f"console=ttyS0 kvmlet.test={tests} {extra}".strip()
        config = vm_config(guest_elf, cmdline=cmdline, vcpus=vcpus, memory=memory, boot=boot)
        with built_machine(config, console=console) as machine:
            machine.start()
            if during is not None:
                during(machine, console)
            status = machine.wait(timeout)
        return GuestRun(status, console.output().decode(errors="replace"), machine)

    return run
