"""`kvmlet run` and `kvmlet host` as a user runs them, and every kind of bad input refused with its own message."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from kvmlet.cli import main
from kvmlet.machine import StopKind
from tests.conftest import RunGuest

REPO = Path(__file__).resolve().parent.parent


def host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _kvmlet(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvmlet", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def test_run_without_arguments_boots_the_builtin_guest(guest_elf: Path) -> None:
    result = _kvmlet("run")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("kvmlet-guest: boot=64bit")
    assert "TESTS DONE" in result.stdout and " 0\n" in result.stdout


def test_run_exits_with_the_guest_status_and_prints_stats(guest_elf: Path) -> None:
    result = _kvmlet("run", "--cmdline", "kvmlet.test=serial kvmlet.exit=5", "--vcpus", "2", "--stats")
    assert result.returncode == 5, result.stderr
    assert "vCPU 0 exits:" in result.stderr and "vCPU 1 exits:" in result.stderr
    assert "KVM (binary stats):" in result.stderr and "io_exits" in result.stderr
    assert "kvmlet (handled in user space):" in result.stderr and "IO " in result.stderr


def test_boot_timer_breakdown(guest_elf: Path) -> None:
    result = _kvmlet("run", "--cmdline", "kvmlet.test=serial", "--boot-timer")
    assert result.returncode == 0
    for label in ("interpreter start and imports", "image loaded", "first console byte", "guest exit"):
        assert label in result.stderr


def test_console_to_a_file(guest_elf: Path, tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    result = _kvmlet("run", "--cmdline", "kvmlet.test=serial", "--console", f"file:{log}")
    assert result.returncode == 0
    assert "HELLO from kvmlet-guest" in log.read_text()


def test_i8042_reset_ends_the_vm(run_guest: RunGuest) -> None:
    run = run_guest("serial,reset")
    assert run.status.kind is StopKind.RESET
    assert "still running" not in run.output


def test_emulation_failure_message_from_the_cli(guest_elf: Path) -> None:
    result = _kvmlet("run", "--cmdline", "kvmlet.test=emufail")
    assert result.returncode == 2
    assert "emulation failure at RIP 0xd0000000" in result.stderr


def test_host_reports_json() -> None:
    result = _kvmlet("host", "--json")
    assert result.returncode == 0
    assert '"backend"' in result.stdout


# -- bad input: each refused with its own one-line message, exit status 1 ---------------------------

def _refused(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    code = main(["run", *args])
    err = capsys.readouterr().err.strip()
    assert code == 1, err
    assert err.startswith("kvmlet: ") and "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    return err


def test_truncated_elf(capsys: pytest.CaptureFixture[str], tmp_path: Path, guest_elf: Path) -> None:
    bad = tmp_path / "truncated.elf"
    bad.write_bytes(guest_elf.read_bytes()[:100])
    assert "ELF" in _refused(capsys, "--kernel", str(bad))


def test_bzimage_with_wrong_magic(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    image = bytearray(0x4000)
    image[0x1F1] = 4
    struct.pack_into("<H", image, 0x1FE, 0xAA55)
    image[0x202:0x206] = b"HdrX"
    bad = tmp_path / "bzImage"
    bad.write_bytes(bytes(image))
    err = _refused(capsys, "--kernel", str(bad))
    assert "HdrS" in err or "neither" in err


def test_initrd_larger_than_memory(capsys: pytest.CaptureFixture[str], tmp_path: Path, guest_elf: Path) -> None:
    initrd = tmp_path / "big.img"
    with open(initrd, "wb") as f:
        f.truncate(40 << 20)
    err = _refused(capsys, "--kernel", str(guest_elf), "--initrd", str(initrd), "--memory", "32M")
    assert "initrd" in err and "MiB" in err


def test_command_line_over_the_limit(capsys: pytest.CaptureFixture[str], guest_elf: Path) -> None:
    err = _refused(capsys, "--kernel", str(guest_elf), "--cmdline", "x" * 3000)
    assert "command line is 3000 bytes" in err


def test_memory_zero(capsys: pytest.CaptureFixture[str]) -> None:
    err = _refused(capsys, "--memory", "0")
    assert "--memory" in err and "16 MiB" in err  # below the 16 MiB minimum


def test_memory_beyond_the_host(capsys: pytest.CaptureFixture[str]) -> None:
    too_much = host_memory_bytes() // (1 << 20) + 1024
    assert "more than this host has" in _refused(capsys, "--memory", f"{too_much}M")


def test_memory_not_a_size(capsys: pytest.CaptureFixture[str]) -> None:
    assert "is not a size" in _refused(capsys, "--memory", "lots")


def test_missing_kernel_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert "does not exist" in _refused(capsys, "--kernel", str(tmp_path / "nope"))


def test_too_many_vcpus(capsys: pytest.CaptureFixture[str]) -> None:
    err = _refused(capsys, "--vcpus", "100000")
    assert "--vcpus" in err and "254" in err


@pytest.mark.parametrize(("flag", "value"), [("--vcpus", "100000"), ("--memory", "0")])
def test_range_errors_name_the_flag(capsys: pytest.CaptureFixture[str], flag: str, value: str) -> None:
    assert flag in _refused(capsys, flag, value)


def test_not_a_kernel_at_all(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(os.urandom(8192))
    assert "neither" in _refused(capsys, "--kernel", str(junk))
