"""What the benchmarks need from the host, and what to do when something is missing (nothing is installed)."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

QEMU_BINARY = "qemu-system-x86_64"


@dataclass(frozen=True)
class Tool:
    name: str
    path: str | None
    purpose: str
    how_to_get: str

    @property
    def missing_message(self) -> str:
        return f"{self.name} not found: {self.purpose} is skipped; to get it: {self.how_to_get}"


def find_qemu() -> Tool:
    return Tool(QEMU_BINARY, shutil.which(QEMU_BINARY), "the QEMU half of each comparison",
                "apt-get install qemu-system-x86 (Debian/Ubuntu)")


def find_gcc() -> Tool:
    return Tool("gcc", shutil.which("gcc"), "the host side of the guest-compute benchmark",
                "apt-get install gcc")


def have_matplotlib() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


MATPLOTLIB_HINT = "--plot needs matplotlib: pip install matplotlib (or pip install -e '.[bench]')"


def kvm_problem() -> str | None:
    """Why VMs cannot run here, or None."""
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm is missing: the benchmarks run real VMs and need KVM"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not readable and writable by this user: run as root or join the kvm group"
    return None
