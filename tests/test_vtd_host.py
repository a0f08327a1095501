"""`kvmlet host` and the host's DMA remapping: the ACPI DMAR table (parsed, and cross-checked against the one kvmlet
writes for its guests) and the IOMMU groups."""

from __future__ import annotations

import struct
from pathlib import Path

from kvmlet.boot.acpi import _table
from kvmlet.boot.acpi_pci import PciAcpi, build_dmar
from kvmlet.host.devices import iommu_feature, read_iommu_state
from kvmlet.host.iommu import describe_groups, iommu_groups, parse_dmar
from kvmlet.host.model import Status


def _host_dmar() -> bytes:
    """A firmware-like DMAR: two units (one with two device scopes), an RMRR, interrupt remapping."""
    scope = struct.pack("<BBHBB", 1, 8, 0, 0, 2) + bytes([2, 0])       # a PCI endpoint scope: 00:02.0
    first = struct.pack("<HHBBHQ", 0, 16 + 2 * len(scope), 0, 0, 0, 0xFED90000) + scope * 2
    second = struct.pack("<HHBBHQ", 0, 16, 1, 0, 0, 0xFED91000)
    rmrr = struct.pack("<HHHHQQ", 1, 24, 0, 0, 0x7B000000, 0x7B7FFFFF)
    return _table(b"DMAR", 1, struct.pack("<BB10s", 45, 1, bytes(10)) + first + second + rmrr)


def test_parse_the_dmar_kvmlet_writes() -> None:
    table = parse_dmar(build_dmar(PciAcpi(0xE0000000, 1, (0xC1000000, 0xD0000000), vtd_base=0xFED90000)))
    assert table is not None and table.host_address_width == 48 and not table.interrupt_remapping
    [unit] = table.units
    assert unit.base == 0xFED90000 and unit.include_all and unit.segment == 0 and unit.scopes == 0


def test_parse_a_firmware_dmar_and_garbage() -> None:
    table = parse_dmar(_host_dmar())
    assert table is not None
    assert [(u.base, u.include_all, u.scopes) for u in table.units] == [(0xFED90000, False, 2),
                                                                       (0xFED91000, True, 0)]
    assert table.interrupt_remapping and table.other == {"RMRR": 1}
    assert table.describe() == ("DMAR: HAW 46, 2 units (0xfed90000 2 scopes, 0xfed91000 all devices), "
                                "interrupt remapping, 1 RMRR")
    data = bytearray(_host_dmar())
    data[40] ^= 1                                                       # checksum no longer adds up
    assert parse_dmar(bytes(data)) is None
    assert parse_dmar(b"") is None and parse_dmar(b"APIC" + bytes(60)) is None
    broken = bytearray(_host_dmar())
    struct.pack_into("<H", broken, 50, 2)                               # a structure length below 4
    broken[9] = (broken[9] - sum(broken)) % 256
    assert parse_dmar(bytes(broken)) is not None                        # stops there, does not loop


def _fake_host(root: Path, dmar: bytes | None, groups: dict[int, list[str]]) -> None:
    tables = root / "sys/firmware/acpi/tables"
    tables.mkdir(parents=True)
    if dmar is not None:
        (tables / "DMAR").write_bytes(dmar)
    for group, devices in groups.items():
        directory = root / f"sys/kernel/iommu_groups/{group}/devices"
        directory.mkdir(parents=True)
        for device in devices:
            (directory / device).touch()
    if groups:
        (root / "sys/class/iommu/dmar0").mkdir(parents=True)


def test_host_report_names_units_and_groups(tmp_path: Path) -> None:
    _fake_host(tmp_path, _host_dmar(), {0: ["0000:00:00.0"], 1: ["0000:00:02.0", "0000:00:02.1"], 7: ["0000:03:00.0"]})
    assert iommu_groups(tmp_path) == {0: ["0000:00:00.0"], 1: ["0000:00:02.0", "0000:00:02.1"], 7: ["0000:03:00.0"]}
    assert describe_groups(iommu_groups(tmp_path)) == "groups: 3, 1 with more than one device (largest 2)"
    feature = iommu_feature(read_iommu_state(tmp_path), tmp_path)
    assert feature.status is Status.ACTIVE
    assert "dmar0; 3 groups" in feature.detail and "DMAR: HAW 46, 2 units" in feature.detail
    assert "groups: 3, 1 with more than one device" in feature.detail


def test_host_with_a_dmar_but_no_iommu_enabled(tmp_path: Path) -> None:
    _fake_host(tmp_path, _host_dmar(), {})
    feature = iommu_feature(read_iommu_state(tmp_path), tmp_path)
    assert feature.status is Status.AVAILABLE and "intel_iommu=on" in feature.detail and "RMRR" in feature.detail
