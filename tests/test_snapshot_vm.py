"""Snapshots of real VMs, saved by one `kvmlet serve` process and restored by another.

The test guest's ``snapwork`` check computes at CPL3 over a memory area it keeps dirtying, prints a checksum
every few rounds and writes numbered records to a virtio-blk drive (HLT while each request is in flight).
Its output does not depend on time, so a run that was snapshotted and restored must print exactly what an
unsnapshotted run prints and leave the same records on its drive.
"""

from __future__ import annotations

import random
import re
import shutil
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvmlet.kvm.cpuid import CpuidEntry
from tests.support.apiclient import ApiServer, Servers, guest_boot_source, ok, server_group

SNAPWORK = "kvmlet.snap_mib=8 kvmlet.snap_rounds=100 kvmlet.snap_every=4"
DISK_SIZE = 1 << 20
MEMORY_MIB = 64


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers[ApiServer]]:
    with server_group(tmp_path, ApiServer) as group:
        yield group


def boot(api: ApiServer, guest_elf: Path, tests: str, extra: str = "", *, disk: Path | None = None,
         track_dirty_pages: bool = False) -> None:
    ok(api.call("PUT", "/boot-source", guest_boot_source(guest_elf, tests, extra)))
    ok(api.call("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": MEMORY_MIB,
                                           "track_dirty_pages": track_dirty_pages}))
    if disk is not None:
        ok(api.call("PUT", "/drives/data", {"drive_id": "data", "path_on_host": str(disk),
                                            "is_root_device": False, "is_read_only": False}))
    ok(api.call("PUT", "/actions", {"action_type": "InstanceStart"}))


def snapshot(api: ApiServer, directory: Path, name: str, snapshot_type: str = "Full") -> tuple[Path, Path]:
    state, memory = directory / f"{name}.snap", directory / f"{name}.mem"
    if api.state() != "Paused":
        ok(api.call("PATCH", "/vm", {"state": "Paused"}))
    ok(api.call("PUT", "/snapshot/create", {"snapshot_path": str(state), "mem_file_path": str(memory),
                                            "snapshot_type": snapshot_type}))
    return state, memory


def load(api: ApiServer, state: Path, memory: Path, **extra: Any) -> None:
    body = {"snapshot_path": str(state), "mem_backend": {"backend_type": "File", "backend_path": str(memory)},
            "resume_vm": True, **extra}
    ok(api.call("PUT", "/snapshot/load", body))


def new_disk(path: Path) -> Path:
    path.write_bytes(bytes(DISK_SIZE))
    return path


def acked_records(output: str) -> list[int]:
    return [int(number) for number in re.findall(r"snapwork record (\d+) acked", output)]


def record_on_disk(disk: bytes, number: int) -> bool:
    sector = disk[number * 512:(number + 1) * 512]
    return sector.startswith(b"SNAPREC") and struct.unpack_from("<I", sector, 8)[0] == number


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, guest_elf: Path) -> tuple[str, bytes]:
    """An unsnapshotted run: its console output and its drive's contents."""
    root = tmp_path_factory.mktemp("reference")
    with server_group(root, ApiServer) as group:
        api = group.new("vm")
        disk = new_disk(root / "disk.img")
        boot(api, guest_elf, "snapwork", SNAPWORK, disk=disk)
        output = api.wait_console("TESTS DONE", timeout=120)
        assert "TEST snapwork PASS" in output, output[-800:]
        return output[output.index("kvmlet-guest"):], disk.read_bytes()


@pytest.mark.slow
def test_snapshots_at_random_moments_continue_exactly(servers: Servers, guest_elf: Path, tmp_path: Path,
                                                      reference: tuple[str, bytes]) -> None:
    """A chain of VMs, each restored from a snapshot of the one before, taken at a random moment; the
    concatenated console output and the final drive equal the unsnapshotted run's."""
    expected_output, expected_disk = reference
    rng = random.Random(0x5EED)
    first = servers.new("vm0")
    disk = new_disk(tmp_path / "disk0.img")
    boot(first, guest_elf, "snapwork", SNAPWORK, disk=disk)
    current, outputs = first, []
    for hop in range(1, 4):
        current.wait_console("snapwork round", timeout=60)
        time.sleep(rng.uniform(0.0, 0.4))
        state, memory = snapshot(current, tmp_path, f"hop{hop}")
        output = current.console_text()
        copy = tmp_path / f"disk{hop}.img"
        shutil.copyfile(disk, copy)        # the restored VM gets the drive as it was at the snapshot
        current.stop()
        outputs.append(output)
        if "TESTS DONE" in output:
            break                           # the guest finished before this hop: nothing left to restore
        contents = copy.read_bytes()
        missing = [n for n in acked_records("".join(outputs)) if not record_on_disk(contents, n)]
        assert not missing, f"records acknowledged before the snapshot but not on the drive: {missing}"
        current = servers.new(f"vm{hop}")
        load(current, state, memory, drive_overrides=[{"drive_id": "data", "path_on_host": str(copy)}])
        disk = copy
    else:
        outputs.append(current.wait_console("TESTS DONE", timeout=120))
        current.stop()
    joined = "".join(outputs)
    joined = joined[joined.index("kvmlet-guest"):]
    assert joined == expected_output
    assert disk.read_bytes() == expected_disk


def test_a_diff_onto_its_base_equals_a_full_snapshot(servers: Servers, guest_elf: Path, tmp_path: Path) -> None:
    """Full snapshot, run on, then a diff and a full snapshot at one moment: the diff merged onto the first
    full one's memory is the second full one's memory, byte for byte, and restores to the same end."""
    from kvmlet.cpu.state import MSR_IA32_TSC, VcpuState
    from kvmlet.snapshot.format import SnapshotFile

    api = servers.new("vm")
    disk = new_disk(tmp_path / "disk.img")
    boot(api, guest_elf, "snapwork", SNAPWORK, disk=disk, track_dirty_pages=True)
    api.wait_console("snapwork round", timeout=60)
    _, base_memory = snapshot(api, tmp_path, "base")
    ok(api.call("PATCH", "/vm", {"state": "Resumed"}))
    time.sleep(0.3)
    diff_state, diff_memory = snapshot(api, tmp_path, "diff", "Diff")
    full_state, full_memory = snapshot(api, tmp_path, "full")
    api.stop()
    diff = SnapshotFile(diff_state)
    full = SnapshotFile(full_state)
    assert diff.header.memory.snapshot_type == "Diff" and diff.header.memory.data_bytes > 0
    assert diff.header.memory.data_bytes < full.header.memory.data_bytes
    assert diff.section_names == full.section_names
    for name in full.section_names:      # the same machine state, section by section
        if name.startswith("vcpu"):      # the TSC runs on between the two reads; the rest stands still
            a, b = diff.section(name, VcpuState), full.section(name, VcpuState)
            a.msrs.pop(MSR_IA32_TSC), b.msrs.pop(MSR_IA32_TSC)
            assert a == b, name
        elif name == "vm":   # the in-kernel PIT ticks on while the vCPUs are paused: its count, kvmclock and
            continue         # the PIC's request register (IRQ 0) change between two reads
        else:
            assert diff._sections[name] == full._sections[name], name
    merged = tmp_path / "merged.mem"
    shutil.copyfile(base_memory, merged)
    from kvmlet.snapshot.memory_file import merge_diff

    merge_diff(diff.header.memory, diff_memory, merged)
    assert merged.read_bytes() == full_memory.read_bytes()
    restored = servers.new("restored")
    load(restored, diff_state, merged)
    assert "TEST snapwork PASS" in restored.wait_console("TESTS DONE", timeout=120)


@pytest.mark.slow
def test_ten_clones_each_see_a_new_generation_id(servers: Servers, guest_elf: Path, tmp_path: Path) -> None:
    api = servers.new("origin")
    boot(api, guest_elf, "vmgenid")
    output = api.wait_console("vmgenid addr=", timeout=60)   # the line after the ID: the ID is whole
    original = re.search(r"vmgenid: ([0-9a-f]{32})", output)
    assert original, output
    time.sleep(0.1)
    state, memory = snapshot(api, tmp_path, "origin")
    api.stop()
    clones = [servers.new(f"clone{n}") for n in range(10)]
    for clone in clones:
        load(clone, state, memory)
    seen = set()
    for clone in clones:
        text = clone.wait_console("TESTS DONE", timeout=120)
        assert "TEST vmgenid PASS" in text, text[-500:]
        changed = re.search(r"vmgenid changed: ([0-9a-f]{32})", text)
        assert changed, text
        seen.add(changed.group(1))
    assert len(seen) == 10 and original.group(1) not in seen


# -- refusals ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory, guest_elf: Path) -> tuple[Path, Path]:
    """A snapshot of a small VM running a long CPL3 loop."""
    root = tmp_path_factory.mktemp("saved")
    with server_group(root, ApiServer) as group:
        api = group.new("vm")
        boot(api, guest_elf, "cpl3", "kvmlet.loops=400000000")
        api.wait_console("kvmlet-guest: boot", timeout=60)
        return snapshot(api, root, "vm")


def _rewrite_header(source: Path, target: Path, **changes: Any) -> None:
    """A copy of a state file with header fields changed and its checksums made right again."""
    import msgspec

    from kvmlet.snapshot.format import SnapshotFile, write_snapshot

    snapshot = SnapshotFile(source)
    header = msgspec.structs.replace(snapshot.header, **changes)
    raw = msgspec.msgpack.Decoder()
    sections = {name: raw.decode(snapshot._sections[name]) for name in snapshot.section_names}
    write_snapshot(target, kvmlet_version=header.kvmlet_version, cpu_vendor=header.cpu_vendor,
                   created_unix_ms=header.created_unix_ms, vm_config=header.vm_config, memory=header.memory,
                   sections=sections)


def _refusals(saved: tuple[Path, Path], directory: Path) -> Iterator[tuple[str, Path, Path, str]]:
    state, memory = saved
    data = state.read_bytes()
    from kvmlet.snapshot.format import SnapshotFile

    header = SnapshotFile(state).header
    cut = directory / "truncated.snap"
    cut.write_bytes(data[:len(data) - 100])
    yield "truncated", cut, memory, "truncated"
    body = len(data) - sum(info.length for info in header.sections)
    for info in header.sections:
        damaged = bytearray(data)
        damaged[body + info.offset + info.length // 2] ^= 0xFF
        path = directory / f"corrupt-{info.name}.snap"
        path.write_bytes(bytes(damaged))
        yield f"corrupted {info.name}", path, memory, f"section '{info.name}' does not match its checksum"
    damaged = bytearray(data)
    damaged[40] ^= 0xFF
    path = directory / "corrupt-header.snap"
    path.write_bytes(bytes(damaged))
    yield "corrupted header", path, memory, "header"
    versioned = bytearray(data)
    versioned[8:12] = struct.pack("<I", 99)
    path = directory / "version.snap"
    path.write_bytes(bytes(versioned))
    yield "wrong version", path, memory, "format version 99"
    vendor = "AuthenticAMD" if header.cpu_vendor != "AuthenticAMD" else "GenuineIntel"
    path = directory / "vendor.snap"
    _rewrite_header(state, path, cpu_vendor=vendor)
    yield "wrong vendor", path, memory, f"taken on a {vendor} host"
    yield "missing memory file", state, directory / "absent.mem", "No such file"
    small = directory / "small.mem"
    small.write_bytes(bytes(4096))
    yield "memory file of the wrong size", state, small, "is 4096 bytes"


def test_damaged_snapshots_are_refused_and_nothing_is_left_behind(servers: Servers, saved: tuple[Path, Path],
                                                                  tmp_path: Path) -> None:
    api = servers.new("vm")
    for what, state, memory, words in _refusals(saved, tmp_path):
        status, reply = api.call("PUT", "/snapshot/load", {
            "snapshot_path": str(state), "mem_backend": {"backend_type": "File", "backend_path": str(memory)}})
        assert status == 400, (what, reply)
        message = reply["fault_message"]
        assert words in message and "\n" not in message, (what, message)
        assert api.state() == "Not started", what
    load(api, *saved)                    # the same process still restores a good snapshot
    assert api.state() == "Running"


def test_snapshot_needs_a_paused_vm_and_diff_needs_tracking(servers: Servers, guest_elf: Path,
                                                            tmp_path: Path) -> None:
    api = servers.new("vm")
    body = {"snapshot_path": str(tmp_path / "s"), "mem_file_path": str(tmp_path / "m")}
    status, reply = api.call("PUT", "/snapshot/create", body)
    assert status == 400 and "not supported before starting" in reply["fault_message"]
    boot(api, guest_elf, "cpl3", "kvmlet.loops=400000000")
    status, reply = api.call("PUT", "/snapshot/create", body)
    assert status == 400 and "not paused" in reply["fault_message"]
    ok(api.call("PATCH", "/vm", {"state": "Paused"}))
    status, reply = api.call("PUT", "/snapshot/create", {**body, "snapshot_type": "Diff"})
    assert status == 400 and "track_dirty_pages" in reply["fault_message"]
    assert not (tmp_path / "s").exists() and not (tmp_path / "m").exists()
    status, reply = api.call("PUT", "/snapshot/load", {"snapshot_path": "x", "mem_file_path": "y"})
    assert status == 400 and "after starting" in reply["fault_message"]


def _lacking_bit(saved: list[CpuidEntry]) -> tuple[str, int]:
    """A leaf 7.0 feature register and bit that this host's KVM gives no vCPU (neither in its supported table
    nor, under PVM, in what KVM_GET_CPUID2 returns after the saved table is set)."""
    from kvmlet.kvm.system import Kvm

    kvm = Kvm()
    try:
        vm = kvm.create_vm()
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid(saved)
        tables = [kvm.supported_cpuid(), vcpu.get_cpuid()]
        vm.close()
    finally:
        kvm.close()
    for register in ("edx", "ecx", "ebx"):
        have = 0
        for table in tables:
            have |= next((getattr(e, register) for e in table if (e.function, e.index) == (7, 0)), 0)
        for bit in range(31, 0, -1):
            if not have & (1 << bit) and not (register == "ecx" and bit == 4):
                return register, 1 << bit
    raise AssertionError("this host offers every leaf 7 feature bit")


def test_a_cpuid_this_host_cannot_give_is_refused(servers: Servers, saved: tuple[Path, Path],
                                                  tmp_path: Path) -> None:
    import dataclasses

    import msgspec

    from kvmlet.cpu.state import VcpuState
    from kvmlet.snapshot.format import SnapshotFile, write_snapshot

    state, memory = saved
    snapshot = SnapshotFile(state)
    vcpu = snapshot.section("vcpu0", VcpuState)
    register, bit = _lacking_bit(list(vcpu.cpuid))
    cpuid = tuple(dataclasses.replace(e, **{register: getattr(e, register) | bit}) if (e.function, e.index) == (7, 0)
                  else e for e in vcpu.cpuid)
    sections: dict[str, object] = {name: msgspec.msgpack.Decoder().decode(snapshot._sections[name])
                                   for name in snapshot.section_names}
    sections["vcpu0"] = dataclasses.replace(vcpu, cpuid=cpuid)
    header = snapshot.header
    changed = tmp_path / "cpuid.snap"
    write_snapshot(changed, kvmlet_version=header.kvmlet_version, cpu_vendor=header.cpu_vendor,
                   created_unix_ms=header.created_unix_ms, vm_config=header.vm_config, memory=header.memory,
                   sections=sections)
    api = servers.new("vm")
    status, reply = api.call("PUT", "/snapshot/load", {
        "snapshot_path": str(changed), "mem_backend": {"backend_type": "File", "backend_path": str(memory)}})
    assert status == 400 and f"CPUID leaf 0x7.0 {register} bits {bit:#x}" in reply["fault_message"], reply
    assert api.state() == "Not started"


def test_a_request_in_flight_completes_after_restore(guest_elf: Path, tmp_path: Path,
                                                     reference: tuple[str, bytes]) -> None:
    """The moment least likely to be hit at random: the guest has made a blk request available and waits for
    it in HLT, but the device has not taken it (its devices were paused first, so the notification is held).
    The restored VM, in a `kvmlet snapshot load` process, serves it and finishes like the unsnapshotted run."""
    import subprocess
    import sys

    import msgspec

    from kvmlet.config import simple_config
    from kvmlet.config.models import Drive
    from kvmlet.devices.legacy.console import BufferConsole
    from kvmlet.eventloop import EventLoopThread
    from kvmlet.kvm import constants as c
    from kvmlet.machine.builder import build_machine
    from kvmlet.snapshot.create import create_snapshot

    expected_output, expected_disk = reference
    disk = new_disk(tmp_path / "disk.img")
    config = simple_config(guest_elf, cmdline=f"console=ttyS0 kvmlet.test=snapwork {SNAPWORK}",
                           mem_size_mib=MEMORY_MIB, console="none")
    config = msgspec.structs.replace(config, drives=[Drive(drive_id="data", path_on_host=str(disk),
                                                           is_root_device=False)])
    events = EventLoopThread()
    console = BufferConsole()
    machine = build_machine(config, events, console=console)
    try:
        machine.start()
        deadline = time.monotonic() + 60
        while b"snapwork round" not in console.output():
            assert time.monotonic() < deadline, console.output()[-300:]
            time.sleep(0.01)
        assert machine.devices is not None and machine.memory is not None
        managed = machine.devices.find("drive:data")
        assert managed is not None and managed.transport is not None
        queue = managed.transport.queues[0]
        machine.devices.pause()            # the device holds its notifications; the guest runs on
        while machine.memory.read_u16(queue.driver_addr + 2) == queue.next_avail:
            assert time.monotonic() < deadline, "the guest made no request available"
            time.sleep(0.001)
        time.sleep(0.05)                    # let it reach its HLT
        machine.pause()
        assert machine.memory.read_u16(queue.driver_addr + 2) != queue.next_avail   # still in flight
        halted = machine.vcpus[0].get_mp_state() == c.MpState.HALTED
        state, memory = tmp_path / "vm.snap", tmp_path / "vm.mem"
        create_snapshot(machine, state, memory)
        before = console.output().decode(errors="replace")
        copy = tmp_path / "copy.img"
        shutil.copyfile(disk, copy)
    finally:
        machine.close()
        events.stop()
    loaded = subprocess.run([sys.executable, "-m", "kvmlet", "snapshot", "load", str(state), "--mem-file", str(memory),
                             "--drive-override", f"data={copy}", "--console", "stdio"],
                            capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-500:]
    joined = before + loaded.stdout
    assert joined[joined.index("kvmlet-guest"):] == expected_output, f"halted={halted}"
    assert copy.read_bytes() == expected_disk
