"""What a VM is made of: a validated configuration, independent of how it was given (CLI, API)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from kvmlet.memory import MiB

if TYPE_CHECKING:
    from kvmlet.devices.virtio.net_options import NetConfig, VsockConfig
    from kvmlet.devices.virtio.options import DriveConfig, RngConfig

DEFAULT_MEMORY = 128 * MiB
DEFAULT_CMDLINE = "console=ttyS0 earlyprintk=serial,ttyS0 reboot=k panic=1"
MAX_VCPUS_SUPPORTED = 254  # what the MP table's 8-bit APIC ids describe (kvmlet.boot.mptable.MAX_CPUS)


class ConfigError(ValueError):
    """A configuration value that cannot work, with what to change."""


_SIZE = re.compile(r"^\s*(\d+)\s*(?:([kmgt])(?:i?b)?|(b))?\s*$", re.IGNORECASE)
_UNITS = {"k": 1 << 10, "m": MiB, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """'128M', '1G', '2GiB', '512' (MiB when no unit), '65536b' (bytes) -> bytes."""
    match = _SIZE.match(text)
    if not match:
        raise ConfigError(f"memory size {text!r} is not a size like 128M or 2G")
    if match.group(3):
        return int(match.group(1))
    return int(match.group(1)) * (_UNITS[match.group(2).lower()] if match.group(2) else MiB)


def host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass
class MachineConfig:
    """One VM: kernel, initrd, command line, vCPUs, memory and console."""

    kernel: Path | None = None          # None: the built-in test guest
    initrd: Path | None = None
    cmdline: str | None = None           # None: DEFAULT_CMDLINE (or the guest's default)
    vcpus: int = 1
    memory: int = DEFAULT_MEMORY
    boot: str = "auto"                   # auto | linux64 | pvh
    console: str = "stdio"               # stdio | file:PATH | socket:PATH | none
    extra: dict[str, str] = field(default_factory=dict)
    drives: list[DriveConfig] = field(default_factory=list)   # virtio-blk, in order
    rng: RngConfig | None = None                              # virtio-rng
    nets: list[NetConfig] = field(default_factory=list)       # virtio-net on TAPs, in order
    vsock: VsockConfig | None = None                          # virtio-vsock

    def validate(self, max_vcpus: int | None = None) -> None:
        if self.vcpus < 1:
            raise ConfigError(f"--vcpus must be at least 1 (got {self.vcpus})")
        if self.vcpus > MAX_VCPUS_SUPPORTED:
            raise ConfigError(f"--vcpus {self.vcpus}: kvmlet supports at most {MAX_VCPUS_SUPPORTED} vCPUs "
                              "(8-bit APIC ids in the MP and ACPI tables, one taken by the I/O APIC)")
        if max_vcpus is not None and self.vcpus > max_vcpus:
            raise ConfigError(f"--vcpus {self.vcpus} is more than this host's KVM allows ({max_vcpus})")
        if self.memory <= 0:
            raise ConfigError("--memory must be larger than zero")
        if self.memory % 4096:
            raise ConfigError(f"--memory {self.memory} bytes is not a multiple of 4 KiB")
        if self.memory < 16 * MiB:
            raise ConfigError(f"--memory {self.memory // MiB} MiB is too small; kvmlet needs at least 16 MiB")
        host = host_memory_bytes()
        if self.memory > host:
            raise ConfigError(f"--memory {self.memory // MiB} MiB is more than this host has "
                              f"({host // MiB} MiB)")
        if self.boot not in ("auto", "linux64", "pvh"):
            raise ConfigError(f"--boot {self.boot!r}: choose auto, linux64 or pvh")
        for label, path in (("kernel", self.kernel), ("initrd", self.initrd)):
            if path is not None and not path.is_file():
                raise ConfigError(f"{label} {path} does not exist or is not a file")
        if self.drives or self.rng is not None:
            from kvmlet.devices.virtio.options import validate_devices

            validate_devices(self.drives, self.rng)
        if self.nets or self.vsock is not None:
            from kvmlet.devices.virtio.net_options import validate_network

            validate_network(self.nets, self.vsock)
