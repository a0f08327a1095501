"""PCI and virtio-pci in real VMs: the test guest enumerates bus 0 through ECAM (found in ACPI MCFG) and 0xCF8,
sizes a BAR, and drives virtio-blk and virtio-rng over virtio-pci with MSI-X (KVM MSI routes and irqfds) and
polled queues; the ACPI tables kvmlet writes describe the host bridge."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import msgspec
import pytest

from kvmlet.boot.acpi_pci import PciAcpi, build_dmar, build_mcfg, build_pci_aml, eisa_id, pci_acpi_extras
from kvmlet.config import Drive
from kvmlet.devices.legacy.console import BufferConsole
from kvmlet.devices.manager import DeviceKind
from tests.support.pcivm import disk, pci_config, run_pci
from tests.support.vmrun import built_machine


def test_layout_of_a_vm_with_pci_devices(guest_elf: Path, tmp_path: Path) -> None:
    config = pci_config(guest_elf, tmp_path, "serial", iommu="vtd")
    with built_machine(config, console=BufferConsole()) as machine:
        devices = machine.devices
        assert devices is not None and devices.pci is not None
        kinds = [(d.name, d.kind) for d in devices.devices if d.kind is not DeviceKind.LEGACY]
        assert kinds == [("pci-host", DeviceKind.PLATFORM), ("vtd", DeviceKind.PLATFORM),
                         ("drive:d0", DeviceKind.VIRTIO_PCI), ("entropy", DeviceKind.VIRTIO_PCI)]
        assert devices.cmdline_args() == []                  # announced in ACPI, not on the command line
        decoded = devices.pci.bus.decoded()
        assert sorted(decoded) == [(0x08, 0), (0x08, 2), (0x10, 0), (0x10, 2)]
        extras, reserved = devices.acpi()
        assert extras is not None and [t[:4] for t in extras.tables] == [b"MCFG", b"DMAR"]
        assert reserved == ((0xE000_0000, 1 << 20), (0xFED9_0000, 0x1000))
        assert devices.routing.msi == {}                     # no MSI route before the guest programs MSI-X


def test_guest_enumerates_and_drives_virtio_pci(guest_elf: Path, tmp_path: Path) -> None:
    run = run_pci(pci_config(guest_elf, tmp_path, "pci-probe,virtio-blk,virtio-rng,virtio-pci-msix",
                             extra="kvmlet.virtio=pci"))
    assert run.status.code == 0, run.output[-2000:]
    for name in ("pci-probe", "virtio-blk", "virtio-rng", "virtio-pci-msix"):
        assert run.passed(name), run.output[-2000:]
    assert "PCI 00:00.0 id=1b36:0008 class=060000" in run.output
    assert "PCI 00:01.0 id=1af4:1042" in run.output and "PCI 00:02.0 id=1af4:1044" in run.output
    assert "PCI 00:01.0 bar0 size=0x4000" in run.output
    assert "MSIX vector=0x50 interrupts=2 pending-then-unmasked=1" in run.output
    assert "BLK write sector=2047" in run.output and "ok" in run.output


def test_pci_and_mmio_devices_side_by_side(guest_elf: Path, tmp_path: Path) -> None:
    mmio = Drive(drive_id="m0", path_on_host=str(disk(tmp_path / "m0.img")))
    config = pci_config(guest_elf, tmp_path, "virtio-probe,virtio-blk", rng=False)
    config = msgspec.structs.replace(config, drives=[*config.drives, mmio])
    run = run_pci(config)
    assert run.passed("virtio-probe") and run.passed("virtio-blk"), run.output[-2000:]
    assert "VIRTIO dev@0xc0000000 id=2" in run.output          # the virtio-mmio drive, found first
    assert "VIRTIO pci 00:01.0 id=2" in run.output              # and the virtio-pci one
    assert "VIRTIO blk@0xc0000000" in run.output


def test_acpi_tables_for_pci() -> None:
    description = PciAcpi(ecam_base=0xE000_0000, ecam_buses=1, mmio_window=(0xC100_0000, 0xD000_0000),
                          intx=((1, 16), (2, 17)), vtd_base=0xFED9_0000)
    mcfg, dmar = build_mcfg(description), build_dmar(description)
    assert mcfg[:4] == b"MCFG" and sum(mcfg) % 256 == 0 and mcfg[44:52] == (0xE000_0000).to_bytes(8, "little")
    assert mcfg[54:56] == b"\x00\x00"                                  # buses 0-0
    assert dmar[:4] == b"DMAR" and sum(dmar) % 256 == 0 and dmar[36] == 47
    assert dmar[48:50] == b"\x00\x00" and dmar[52] & 1                 # DRHD, INCLUDE_PCI_ALL
    assert int.from_bytes(dmar[56:64], "little") == 0xFED9_0000
    aml = build_pci_aml(description)
    assert eisa_id("PNP0A08").to_bytes(4, "little") in aml and b"_PRT" in aml and b"MRES" in aml
    no_vtd = pci_acpi_extras(PciAcpi(0xE000_0000, 1, (0xC100_0000, 0xD000_0000)))
    assert [t[:4] for t in no_vtd.tables] == [b"MCFG"]


@pytest.mark.skipif(shutil.which("iasl") is None, reason="iasl (acpica-tools) is not installed")
def test_iasl_disassembles_the_tables_cleanly(tmp_path: Path) -> None:
    from kvmlet.boot.acpi import build_dsdt

    description = PciAcpi(0xE000_0000, 1, (0xC100_0000, 0xD000_0000), ((1, 16),), 0xFED9_0000)
    extras = pci_acpi_extras(description)
    (tmp_path / "dsdt.dat").write_bytes(build_dsdt(0xF7000, extras.dsdt_aml))
    (tmp_path / "mcfg.dat").write_bytes(extras.tables[0])
    (tmp_path / "dmar.dat").write_bytes(extras.tables[1])
    result = subprocess.run(["iasl", "-d", "dsdt.dat", "mcfg.dat", "dmar.dat"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    dsl = (tmp_path / "dsdt.dsl").read_text()
    assert 'EisaId ("PNP0A08")' in dsl and "DWordMemory" in dsl and "0xCFFFFFFF" in dsl and "_PRT" in dsl
    assert "Register Base Address : 00000000FED90000" in (tmp_path / "dmar.dsl").read_text()
