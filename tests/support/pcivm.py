"""Running the test guest in VMs with virtio-pci devices (and the VT-d unit): a configuration, a run with the
transports' and the unit's counters kept for inspection."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import msgspec

from kvmlet.config import Drive, Entropy, VmConfig
from kvmlet.devices.legacy.console import BufferConsole
from kvmlet.machine import ExitStatus
from kvmlet.memory import MiB
from tests.support.vmrun import built_machine, vm_config

SECTORS = 2048


@dataclass
class PciRun:
    status: ExitStatus
    output: str
    stats: dict[str, object]

    def passed(self, name: str) -> bool:
        return f"TEST {name} PASS" in self.output


def disk(path: Path) -> Path:
    path.write_bytes(bytes((i * 31 + (i >> 9)) & 0xFF for i in range(SECTORS * 512)))
    return path


def pci_config(guest_elf: Path, tmp_path: Path, tests: str, *, extra: str = "", iommu: str = "none",
               rng: bool = True) -> VmConfig:
    config = vm_config(guest_elf, cmdline=f"console=ttyS0 kvmlet.test={tests} {extra}".strip(), memory=64 * MiB,
                       drives=[Drive(drive_id="d0", path_on_host=str(disk(tmp_path / "d0.img")), transport="pci")],
                       entropy=Entropy(transport="pci") if rng else None)
    return msgspec.structs.replace(config, machine_config=msgspec.structs.replace(config.machine_config,
                                                                                  iommu=iommu))


def run_pci(config: VmConfig, timeout: float = 60.0) -> PciRun:
    console = BufferConsole()
    with built_machine(config, console=console) as machine:
        machine.start()
        status = machine.wait(timeout)
        assert machine.devices is not None
        stats: dict[str, object] = {d.name: d.transport.stats for d in machine.devices.devices
                                    if d.transport is not None}
        if machine.devices.pci is not None and machine.devices.pci.vtd is not None:
            stats["vtd"] = machine.devices.pci.vtd.stats
    return PciRun(status, console.output().decode(errors="replace"), stats)
