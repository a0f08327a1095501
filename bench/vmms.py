"""How each VMM is started for a benchmark: kvmlet (64-bit or PVH entry) and QEMU microvm (PVH).

Both boot the same test-guest ELF with the same command line and memory size, with the serial console on
the process's stdout. kvmlet runs as ``python -m kvmlet run`` from the source tree with bytecode caching on
(an installed package has its .pyc files; PYTHONDONTWRITEBYTECODE is dropped for the child so the warm-up
run writes them once). With ``-S`` among the interpreter flags (no ``site`` module, so no site-packages on
``sys.path``) the directories kvmlet's run-time dependencies come from are put on ``PYTHONPATH``.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
QEMU_CPU = "qemu64"   # -cpu host fails on PVM hosts (it cannot set MSR 0x10a)


@dataclass(frozen=True)
class Launch:
    """One VMM process to start: its argv, environment and how it reports the guest's exit status."""

    side: str                       # a label: "kvmlet", "kvmlet-pvh", "qemu"
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path = REPO
    qemu_exit_code: bool = False    # QEMU exits with (status << 1) | 1

    def expected_returncode(self, guest_status: int = 0) -> int:
        return (guest_status << 1) | 1 if self.qemu_exit_code else guest_status


RUNTIME_DEPENDENCIES = ("msgspec", "pyroute2", "h11", "prometheus_client")  # pyproject.toml's dependencies


def dependency_dirs() -> list[str]:
    """The directories (site-packages) kvmlet's run-time dependencies are imported from, in this interpreter."""
    import importlib.util

    dirs: list[str] = []
    for name in RUNTIME_DEPENDENCIES:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            continue
        location = Path(spec.origin).parent
        if spec.submodule_search_locations is not None:  # a package: .../site-packages/<name>/__init__.py
            location = location.parent
        if str(location) not in dirs:
            dirs.append(str(location))
    return dirs


def kvmlet_env(extra: dict[str, str] | None = None, python_flags: tuple[str, ...] = ()) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    if "-S" in python_flags:
        env["PYTHONPATH"] = os.pathsep.join([*dependency_dirs(), *filter(None, [env.get("PYTHONPATH")])])
    env.update(extra or {})
    return env


def kvmlet_launch(guest: Path, cmdline: str, memory_mib: int, *, boot: str = "linux64",
                  python_flags: tuple[str, ...] = (), extra_args: tuple[str, ...] = (),
                  side: str | None = None, env: dict[str, str] | None = None) -> Launch:
    argv = [sys.executable, *python_flags, "-m", "kvmlet", "run", "--kernel", str(guest), "--cmdline", cmdline,
            "--memory", f"{memory_mib}M", "--boot", boot, "--console", "stdio", *extra_args]
    label = side or ("kvmlet" if boot == "linux64" else f"kvmlet-{boot}")
    return Launch(label, argv, kvmlet_env(env, python_flags))


# microvm with modern virtio-mmio devices announced on the kernel command line (virtio_mmio.device=...):
# without acpi=off QEMU announces them only in the DSDT, and without force-legacy=false they are version 1.
QEMU_VIRTIO_MACHINE = "microvm,acpi=off"
QEMU_VIRTIO_ARGS = ("-global", "virtio-mmio.force-legacy=false")


def qemu_launch(qemu: str, guest: Path, cmdline: str, memory_mib: int, *, side: str = "qemu",
                machine: str = "microvm", extra_args: tuple[str, ...] = ()) -> Launch:
    argv = [qemu, "-M", machine, "-accel", "kvm", "-cpu", QEMU_CPU, "-m", str(memory_mib), "-nographic",
            "-no-reboot", "-kernel", str(guest), "-append", cmdline,
            "-device", "isa-debug-exit,iobase=0x501,iosize=2", *extra_args]
    return Launch(side, argv, dict(os.environ), qemu_exit_code=True)
