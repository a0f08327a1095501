"""kvmlet-firecracker driven by a real third-party Firecracker client: firecracker-python 0.0.5 (PyPI).

The client pins many packages, so it lives in its own virtual environment (scripts/setup.sh makes it at
``$KVMLET_FCPY_VENV``, default ``~/.cache/kvmlet/fcpy-venv``) and runs tests/support/fcpy_driver.py there: it
creates a microVM with the test guest as its kernel, pauses, resumes, reads its state and configuration and
deletes it, through the client's API, and prints one JSON line saying what happened.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
DRIVER = REPO / "tests" / "support" / "fcpy_driver.py"
VENV = Path(os.environ.get("KVMLET_FCPY_VENV") or Path.home() / ".cache" / "kvmlet" / "fcpy-venv")
DRIVER_TIMEOUT = 90.0


def venv_python() -> Path:
    python = VENV / "bin" / "python"
    if not python.exists():
        pytest.skip(f"no firecracker-python venv: {python} is missing (scripts/setup.sh creates it, in its block "
                    f"'firecracker-python client for tests/test_firecracker_client.py'; KVMLET_FCPY_VENV moves it)")
    return python


def kvmlet_firecracker(tmp: Path) -> str:
    """The installed console script, else a wrapper named ``firecracker`` that runs this checkout's module."""
    installed = shutil.which("kvmlet-firecracker")
    if installed is not None:
        return installed
    wrapper = tmp / "bin" / "firecracker"
    wrapper.parent.mkdir()
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    wrapper.write_text(f"#!/bin/sh\nPYTHONPATH={shlex.quote(pythonpath)} exec {shlex.quote(sys.executable)} "
                       f'-m kvmlet.api.firecracker "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short lowercase directory (in /tmp, whatever TMPDIR says) for the client's data: the API socket, at most
    107 bytes, goes three levels down, and the client lowercases its path (tempfile's names are lowercase)."""
    path = Path(tempfile.mkdtemp(prefix="kvmlet-fcpy-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def run_driver(python: Path, binary: str, kernel: Path, data: Path) -> tuple[dict[str, Any], str]:
    """The driver's JSON line and its standard error. It runs in a session of its own, with the VMMs it
    starts (the client keeps them in its process group), so a hang ends them all."""
    proc = subprocess.Popen([str(python), str(DRIVER), binary, str(kernel), str(data), str(DRIVER_TIMEOUT)],
                            cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=DRIVER_TIMEOUT + 30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the driver hung (its own watchdog did not end it)\nstdout:\n{out}\nstderr:\n{err}")
    finally:
        with contextlib.suppress(ProcessLookupError):   # anything of the run's session left (normally nothing)
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert lines, f"the driver printed no JSON line (exit status {proc.returncode})\nstdout:\n{out}\nstderr:\n{err}"
    return json.loads(lines[-1]), err


def test_firecracker_python_creates_pauses_resumes_and_deletes_a_kvmlet_vm(guest_elf: Path, short_tmp: Path) -> None:
    python = venv_python()
    binary = kvmlet_firecracker(short_tmp)
    report, stderr = run_driver(python, binary, guest_elf, short_tmp / "data")
    detail = f"\nreport: {json.dumps(report, indent=2)}\nstderr:\n{stderr}"

    assert report["error"] is None and report["ok"], detail
    assert report["client_version"] == "0.0.5", detail
    vmid = report["id"]
    assert report["steps"]["create"] == f"VMM {vmid} created", detail
    # kvmlet answered, not something else, and the client's process check found it ("firecracker", prctl)
    assert report["instance_info"]["app_name"] == "kvmlet" and report["instance_info"]["id"] == vmid, detail
    assert report["listed"] == [vmid], detail
    # the lifecycle, as GET / reported it after each call, then the process gone and its directory removed
    assert report["states"] == ["Running", "Paused", "Running", "stopped"], detail
    assert report["steps"]["pause"] == f"VMM {vmid} paused successfully", detail
    assert report["steps"]["resume"] == f"VMM {vmid} resumed successfully", detail
    assert report["steps"]["delete"] == f"VMM {vmid} is deleted", detail
    assert report["listed_after"] == [], detail
    assert report["vmm_exit_status"] == 0, f"kvmlet did not exit cleanly on the client's SIGTERM{detail}"
    # the configuration the client sent, as GET /vm/config gives it back
    config = report["config"]
    assert config["kernel_image_path"] == os.path.abspath(guest_elf), detail
    assert config["boot_args"].startswith("console=ttyS0 reboot=k pci=off panic=1 ip="), detail
    assert config["machine"] == {"vcpu_count": 1, "mem_size_mib": 128}, detail
    assert config["drives"] == ["rootfs"], detail
    # the test guest booted and was still waiting (running) when the client stopped it
    assert report["console"].startswith("kvmlet-guest: boot="), detail
    assert "ctrlaltdel: waiting" in report["console"] and "TESTS DONE" not in report["console"], detail
