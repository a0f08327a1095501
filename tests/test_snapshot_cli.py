"""`kvmlet snapshot` on the command line and the console's Ctrl-A s, in real processes."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

from tests.support.apiclient import ApiServer, guest_boot_source

LONG_LOOP = "kvmlet.loops=3000000000"   # seconds of CPL3 work on any host


def _read_until(fd: int, pattern: bytes, timeout: float = 60.0) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while pattern not in seen:
        remaining = deadline - time.monotonic()
        assert remaining > 0, seen[-500:]
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            try:
                seen += os.read(fd, 4096)
            except OSError:
                break
    return seen


def test_console_escape_saves_a_snapshot_that_loads(guest_elf: Path, tmp_path: Path) -> None:
    """Ctrl-A s on a terminal saves kvmlet-<pid>-1.snap/.mem in the working directory and the VM goes on;
    `kvmlet snapshot load` runs the saved VM to the end."""
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "kvmlet", "run", "--kernel", str(guest_elf), "--memory", "64M",
         "--cmdline", f"console=ttyS0 kvmlet.test=cpl3 {LONG_LOOP}"],
        stdin=terminal, stdout=terminal, stderr=terminal, cwd=tmp_path, close_fds=True)
    os.close(terminal)
    try:
        _read_until(controller, b"kvmlet-guest: boot")
        os.write(controller, b"\x01s")
        output = _read_until(controller, b"[kvmlet: snapshot")
        match = re.search(rb"snapshot saved: (\S+\.snap) and (\S+\.mem)", output)
        assert match, output[-500:]
        state, memory = Path(match.group(1).decode()), Path(match.group(2).decode())
        assert state.parent == tmp_path and state.name == f"kvmlet-{process.pid}-1.snap"
        assert process.poll() is None                 # still running
        os.write(controller, b"\x01x")
        assert process.wait(30) == 130
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(controller)
    described = subprocess.run([sys.executable, "-m", "kvmlet", "snapshot", "describe", str(state)],
                               capture_output=True, text=True, timeout=60)
    assert described.returncode == 0 and "Full snapshot" in described.stdout and "64 MiB" in described.stdout
    loaded = subprocess.run([sys.executable, "-m", "kvmlet", "snapshot", "load", str(state), "--mem-file",
                             str(memory), "--console", "stdio"], capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-500:]
    assert "TEST cpl3 PASS" in loaded.stdout and "kvmlet-guest: boot" not in loaded.stdout


def test_snapshot_commands_refuse_bad_files_in_one_line(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.snap"
    bogus.write_bytes(b"not a snapshot at all")
    for command in (["snapshot", "describe", str(bogus)],
                    ["snapshot", "load", str(bogus), "--mem-file", str(bogus)],
                    ["snapshot", "merge", str(bogus), "--diff-mem", str(bogus), "--base-mem", str(bogus)]):
        result = subprocess.run([sys.executable, "-m", "kvmlet", *command], capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 1, command
        assert result.stderr.count("\n") == 1 and "not a kvmlet snapshot" in result.stderr, result.stderr
    firecracker = subprocess.run([sys.executable, "-m", "kvmlet.api.firecracker", "--describe-snapshot",
                                  str(bogus)], capture_output=True, text=True, timeout=60)
    assert firecracker.returncode == 1 and "not a kvmlet snapshot" in firecracker.stderr


def test_snapshot_create_through_the_api_socket(guest_elf: Path, tmp_path: Path) -> None:
    """`kvmlet snapshot create --api-sock` pauses a running VM, saves it and lets it run on."""
    api = ApiServer(tmp_path)
    try:
        assert api.call("PUT", "/boot-source", guest_boot_source(guest_elf, "cpl3", LONG_LOOP))[0] == 204
        assert api.call("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 64})[0] == 204
        assert api.call("PUT", "/actions", {"action_type": "InstanceStart"})[0] == 204
        api.wait_console("kvmlet-guest: boot")
        state, memory = tmp_path / "vm.snap", tmp_path / "vm.mem"
        result = subprocess.run([sys.executable, "-m", "kvmlet", "snapshot", "create", "--api-sock", str(api.socket),
                                 "--snapshot-path", str(state), "--mem-file-path", str(memory)],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert state.is_file() and memory.stat().st_size == 64 << 20
        assert api.state() == "Running"
        firecracker = subprocess.run([sys.executable, "-m", "kvmlet.api.firecracker", "--describe-snapshot",
                                      str(state)], capture_output=True, text=True, timeout=60)
        assert firecracker.returncode == 0 and firecracker.stdout.strip() == "v1.0.0"
    finally:
        api.stop()
