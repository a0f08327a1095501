"""The test guest's snapshot checks in real VMs: `snapwork` (the deterministic workload whose output a
snapshot/restore must not change, with its numbered records on a virtio-blk drive) and `vmgenid` (the guest
finds the VM generation ID through ACPI and sees the bytes kvmlet wrote, and a change to them)."""

from __future__ import annotations

import re
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from kvmlet.config import Drive
from kvmlet.devices.legacy.console import BufferConsole
from kvmlet.devices.vmgenid import VMGENID_ADDRESS, read_generation_id, write_generation_id
from kvmlet.machine import ExitStatus
from kvmlet.memory import MiB
from tests.support.vmrun import built_machine, vm_config

SECTOR = 512
RECORD = struct.Struct("<8sQQQQQ460sI")  # guest/snapwork.c struct snaprec
CHECKSUM_SEED = 0x736E6170776F726B
MASK = (1 << 64) - 1
AREA_WORDS_PER_PAGE = 512


@dataclass
class Run:
    status: ExitStatus
    output: str

    def lines(self, prefix: str) -> list[str]:
        return [line for line in self.output.splitlines() if line.startswith(prefix)]


def _boot(guest_elf: Path, cmdline: str, *, drive: Path | None = None, generation_id: bytes | None = None,
          change_to: bytes | None = None, timeout: float = 60.0) -> Run:
    """Boot the guest; ``generation_id``: written before the start (the loader writes none yet);
    ``change_to``: written once the guest says it waits for a change."""
    console = BufferConsole()
    drives = [Drive(drive_id="drive0", path_on_host=str(drive))] if drive is not None else None
    config = vm_config(guest_elf, cmdline=f"console=ttyS0 {cmdline}", memory=64 * MiB, drives=drives)
    with built_machine(config, console=console) as machine:
        memory = machine.memory
        assert memory is not None
        if generation_id is not None:
            write_generation_id(memory, generation_id)
        machine.start()
        if change_to is not None:
            assert console.wait_for(b"vmgenid waiting", 30), console.output().decode(errors="replace")
            write_generation_id(memory, change_to)
        status = machine.wait(timeout)
    return Run(status, console.output().decode(errors="replace"))


def _drive(path: Path, sectors: int) -> Path:
    path.write_bytes(bytes([0xEE]) * (sectors * SECTOR))
    return path


# -- a model of the guest's computation (guest/snapwork.c) -------------------------------------------


def _mix(x: int) -> int:
    x ^= x >> 30
    x = x * 0xBF58476D1CE4E5B9 & MASK
    x ^= x >> 27
    x = x * 0x94D049BB133111EB & MASK
    return x ^ (x >> 31)


def _xorshift(x: int) -> int:
    x ^= x << 13 & MASK
    x ^= x >> 7
    x ^= x << 17 & MASK
    return x


def _rotl(x: int, r: int) -> int:
    return (x << r | x >> (64 - r)) & MASK


def _model(mib: int, rounds: int, steps: int) -> list[int]:
    """The checksum after each round, computed as the guest's comment describes it."""
    pages, words = mib * MiB // 4096, mib * MiB // 8
    area = [_mix(w ^ CHECKSUM_SEED) for w in range(words)]
    checksum, sums = CHECKSUM_SEED, []
    for r in range(rounds):
        rng, acc = _mix(checksum ^ r) | 1, r
        for _ in range(steps):
            rng = _xorshift(rng)
            i = (rng >> 16) % pages * AREA_WORDS_PER_PAGE + (rng & (AREA_WORDS_PER_PAGE - 1))
            value = (((area[i] ^ rng) * 0x9E3779B97F4A7C15) + r) & MASK
            area[i] = value
            acc = _rotl(acc, 7) ^ value
        checksum = _mix(checksum ^ acc)
        sample = 0
        for j in range(16):
            sample = _rotl(sample, 11) ^ area[_mix((checksum + j) & MASK) % words]
        checksum = _mix((checksum + sample) & MASK)
        sums.append(checksum)
    return sums


def _fill(checksum: int) -> bytes:
    rng, out = checksum | 1, bytearray()
    for _ in range(460 // 4):
        rng = _xorshift(rng)
        out += struct.pack("<I", rng & 0xFFFF_FFFF)
    return bytes(out)


# -- snapwork -----------------------------------------------------------------------------------------


def test_snapwork_output_records_and_determinism(guest_elf: Path, tmp_path: Path) -> None:
    mib, rounds, every, steps = 1, 12, 3, 2048
    cmdline = (f"kvmlet.test=snapwork kvmlet.snap_mib={mib} kvmlet.snap_rounds={rounds} "
               f"kvmlet.snap_every={every} kvmlet.snap_steps={steps}")
    first = _boot(guest_elf, cmdline, drive=_drive(tmp_path / "a.img", 32))
    assert first.status.code == 0, first.output
    assert "TEST snapwork PASS" in first.output and "TESTS DONE 1 0" in first.output
    assert first.lines("snapwork start") == [
        f"snapwork start mib={mib} rounds={rounds} every={every} steps={steps} flush=1"]
    expected = _model(mib, rounds, steps)
    printed = [(int(m[1]), int(m[2], 16)) for line in first.lines("snapwork round ")
               if (m := re.fullmatch(r"snapwork round (\d+) checksum 0x([0-9a-f]{16})", line))]
    assert printed == [(r, expected[r]) for r in range(every - 1, rounds, every)]
    assert first.lines("snapwork record ") == [f"snapwork record {i} acked" for i in range(rounds)]
    assert first.lines("snapwork done") == [
        f"snapwork done rounds={rounds} records={rounds} checksum 0x{expected[-1]:016x}"]
    # Each record is acknowledged after its round's checksum line and before the next round's.
    body = [line for line in first.output.splitlines() if line.startswith(("snapwork round", "snapwork record"))]
    assert body[:3] == ["snapwork record 0 acked", "snapwork record 1 acked", f"snapwork round 2 checksum "
                                                                                 f"0x{expected[2]:016x}"]

    disk = (tmp_path / "a.img").read_bytes()
    for i in range(rounds):
        sector = disk[i * SECTOR:(i + 1) * SECTOR]
        magic, index, total, checksum, rec_mib, rec_steps, fill, crc = RECORD.unpack(sector)
        assert (magic, index, total, rec_mib, rec_steps) == (b"SNAPREC\0", i, rounds, mib, steps)
        assert checksum == expected[i]
        assert fill == _fill(checksum)
        assert crc == zlib.crc32(sector[:508])
    assert disk[rounds * SECTOR:] == bytes([0xEE]) * (len(disk) - rounds * SECTOR)  # nothing else written

    second = _boot(guest_elf, cmdline, drive=_drive(tmp_path / "b.img", 32))
    assert second.output == first.output
    assert (tmp_path / "b.img").read_bytes() == disk


def test_snapwork_default_area_dirties_16_mib(guest_elf: Path, tmp_path: Path) -> None:
    """The default area and steps (16 MiB, 64 steps per page), for a few rounds."""
    run = _boot(guest_elf, "kvmlet.test=snapwork kvmlet.snap_rounds=3", drive=_drive(tmp_path / "d.img", 8))
    assert run.status.code == 0, run.output
    assert run.lines("snapwork start") == ["snapwork start mib=16 rounds=3 every=1 steps=262144 flush=1"]
    assert len(run.lines("snapwork round ")) == 3 and len(run.lines("snapwork record ")) == 3


def test_snapwork_refuses_a_drive_too_small(guest_elf: Path, tmp_path: Path) -> None:
    run = _boot(guest_elf, "kvmlet.test=snapwork kvmlet.snap_rounds=9 kvmlet.snap_mib=1",
                drive=_drive(tmp_path / "s.img", 8))
    assert "TEST snapwork FAIL the drive has 8 sectors; 9 rounds need one each" in run.output, run.output
    assert run.status.code == 1


def test_snapwork_needs_a_drive(guest_elf: Path) -> None:
    run = _boot(guest_elf, "kvmlet.test=snapwork kvmlet.snap_mib=1")
    assert "TEST snapwork FAIL no virtio-blk device" in run.output, run.output


# -- vmgenid ------------------------------------------------------------------------------------------


def test_vmgenid_reads_the_id_kvmlet_wrote(guest_elf: Path) -> None:
    value = bytes.fromhex("00112233445566778899aabbccddeeff")
    run = _boot(guest_elf, "kvmlet.test=vmgenid kvmlet.vmgenid_wait=0", generation_id=value)
    assert run.status.code == 0, run.output
    assert run.lines("vmgenid device") == ["vmgenid device VGEN hid=KVML0001 cid=VMGENCTR"]
    assert run.lines("vmgenid: ") == [f"vmgenid: {value.hex()}"]
    assert run.lines("vmgenid addr=") == [f"vmgenid addr={VMGENID_ADDRESS:#x}"]
    assert "TEST vmgenid PASS" in run.output


def test_vmgenid_sees_a_change(guest_elf: Path) -> None:
    before, after = bytes(range(1, 17)), bytes(range(100, 116))
    start = time.monotonic()
    run = _boot(guest_elf, "kvmlet.test=vmgenid kvmlet.timeout=20", generation_id=before, change_to=after)
    assert run.status.code == 0, run.output
    assert run.lines("vmgenid: ") == [f"vmgenid: {before.hex()}"]
    assert run.lines("vmgenid changed: ") == [f"vmgenid changed: {after.hex()}"]
    assert time.monotonic() - start < 15


def test_vmgenid_times_out_without_a_change(guest_elf: Path) -> None:
    run = _boot(guest_elf, "kvmlet.test=vmgenid kvmlet.timeout=1", generation_id=bytes(range(16)))
    assert "TEST vmgenid FAIL timeout (generation ID unchanged after 1 s)" in run.output, run.output


def test_loader_generation_id(guest_elf: Path) -> None:
    """What the guest reads when the test writes nothing: the loader's ID once it writes one (then it must
    be non-zero and match memory), else the all-zero failure."""
    console = BufferConsole()
    config = vm_config(guest_elf, cmdline="console=ttyS0 kvmlet.test=vmgenid kvmlet.vmgenid_wait=0",
                       memory=64 * MiB)
    with built_machine(config, console=console) as machine:
        assert machine.memory is not None
        written = read_generation_id(machine.memory)
        machine.start()
        machine.wait(60)
    output = console.output().decode(errors="replace")
    assert f"vmgenid: {written.hex()}" in output, output
    if any(written):
        assert "TEST vmgenid PASS" in output
    else:
        assert "TEST vmgenid FAIL generation ID is all zero" in output
