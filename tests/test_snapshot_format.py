"""The snapshot state file: round trip, and every kind of damage refused before anything is read from it."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from kvmlet.cpu.state import VcpuState
from kvmlet.kvm.cpuid import CpuidEntry
from kvmlet.snapshot.format import FORMAT_VERSION, MemoryInfo, SnapshotError, SnapshotFile, write_snapshot

VCPU = VcpuState(vcpu_id=0, cpuid=(CpuidEntry(0, 0, 0, 0xD, 0x756E6547, 0x6C65746E, 0x49656E69),), tsc_khz=2_000_000,
                 regs=bytes(range(144)), sregs=b"\x01" * 312, xsave=b"\x02" * 4096, xcrs=b"\x03" * 392,
                 debugregs=b"\x04" * 128, lapic=b"\x05" * 1024, msrs={0x10: 123, 0x2FF: 0xC06}, mp_state=0,
                 events=b"\x06" * 64)

MEMORY = MemoryInfo(size=1 << 20, ranges=[(0, 1 << 20)], snapshot_type="Full", runs=[(0, 4096)], file_name="mem")


def write(path: Path) -> None:
    write_snapshot(path, kvmlet_version="0.1.0", cpu_vendor="GenuineIntel", created_unix_ms=1,
                   vm_config={"machine-config": {"vcpu_count": 1}}, memory=MEMORY,
                   sections={"vcpu0": VCPU, "devices": {"serial0": {"ier": 1}}})


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "vm.snap"
    write(path)
    snapshot = SnapshotFile(path)
    assert snapshot.section_names == ["vcpu0", "devices"]
    assert snapshot.section("vcpu0", VcpuState) == VCPU
    assert snapshot.section("devices", dict) == {"serial0": {"ier": 1}}
    assert snapshot.header.cpu_vendor == "GenuineIntel"
    assert "section vcpu0" in snapshot.describe()
    with pytest.raises(SnapshotError, match="no section 'vcpu1'"):
        snapshot.section("vcpu1", VcpuState)


def test_every_truncation_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "vm.snap"
    write(path)
    data = path.read_bytes()
    cut = tmp_path / "cut.snap"
    for length in range(0, len(data), max(1, len(data) // 200)):
        cut.write_bytes(data[:length])
        with pytest.raises(SnapshotError) as refused:
            SnapshotFile(cut)
        assert "\n" not in str(refused.value) and str(cut) in str(refused.value)


def test_every_corrupted_part_is_refused_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "vm.snap"
    write(path)
    data = path.read_bytes()
    snapshot = SnapshotFile(path)
    body = len(data) - sum(info.length for info in snapshot.header.sections)
    bad = tmp_path / "bad.snap"
    for info in snapshot.header.sections:
        for at in (0, info.length // 2, info.length - 1):
            damaged = bytearray(data)
            damaged[body + info.offset + at] ^= 0x40
            bad.write_bytes(damaged)
            with pytest.raises(SnapshotError, match=f"section '{info.name}' does not match its checksum"):
                SnapshotFile(bad)
    damaged = bytearray(data)
    damaged[20] ^= 0x01                              # inside the header
    bad.write_bytes(damaged)
    with pytest.raises(SnapshotError, match="header's checksum"):
        SnapshotFile(bad)


def test_wrong_magic_and_version(tmp_path: Path) -> None:
    path = tmp_path / "vm.snap"
    write(path)
    data = path.read_bytes()
    (tmp_path / "magic.snap").write_bytes(b"NOTKVMLT" + data[8:])
    with pytest.raises(SnapshotError, match="not a kvmlet snapshot"):
        SnapshotFile(tmp_path / "magic.snap")
    (tmp_path / "version.snap").write_bytes(data[:8] + (FORMAT_VERSION + 1).to_bytes(4, "little") + data[12:])
    with pytest.raises(SnapshotError, match=f"format version {FORMAT_VERSION + 1}"):
        SnapshotFile(tmp_path / "version.snap")
    with pytest.raises(SnapshotError, match="No such file"):
        SnapshotFile(tmp_path / "missing.snap")


def test_a_section_of_the_wrong_shape_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "vm.snap"
    write(path)
    with pytest.raises(SnapshotError, match="section 'devices' cannot be read"):
        SnapshotFile(path).section("devices", VcpuState)
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(VCPU), type=VcpuState) == VCPU
