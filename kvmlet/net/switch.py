"""The software switch behind vhost-user interfaces: DPDK's ``dpdk-testpmd`` run as a vhost-user back end.

A :class:`TestpmdSwitch` is one ``dpdk-testpmd`` process: one vhost-user port (a server socket kvmlet connects to)
per VM interface, each with its queue pairs (the VMDq pool of that VM), and optionally an uplink: a TAP interface
on the host (DPDK's ``net_tap``) that can join a bridge. Frames are forwarded port to port in DPDK's ``io`` mode
(port 0 with port 1, 2 with 3, ...) or dropped on receipt (``rxonly``, to measure what a guest can send).

It is the fallback engine of ``kvmlet net switch``: where Open vSwitch with DPDK is installed, kvmlet/net/ovs.py is
the default, a learning switch with per-port controls (MAC anti-spoofing, VLAN, rate, trust) that testpmd has not;
a testpmd port with controls is refused naming why. :class:`VhostPort` (kvmlet/net/ports.py) is either engine's port.

Costs, and why the switch is never left running: DPDK's forwarding core polls all the time, a whole CPU even when
idle (half of a 2-CPU host). So it runs without huge pages (``--no-huge``: as fast here), with one forwarding
core, and :meth:`TestpmdSwitch.stop` (also on ``with`` exit, on every path) ends it and removes its sockets.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kvmlet.errors import ConfigError, KvmletError
from kvmlet.net.ports import VhostPort as VhostPort
from kvmlet.process import die_with_parent  # re-exported: the port of either engine

TESTPMD = "dpdk-testpmd"
START_TIMEOUT = 20.0
FORWARD_MODES = ("io", "rxonly", "macswap")


class SwitchError(KvmletError):
    """The switch cannot be started or used."""


def check_huge_dir(path: str | None) -> str | None:
    """``path`` if it is a hugetlbfs mount (DPDK's memory then comes from huge pages), else ConfigError."""
    if path is None:
        return None
    resolved = os.path.realpath(path)
    with open("/proc/mounts") as mounts:
        hugetlbfs = {fields[1] for fields in (line.split() for line in mounts) if fields[2] == "hugetlbfs"}
    if resolved not in hugetlbfs:
        raise ConfigError(f"--huge-dir {path}: not a hugetlbfs mount (mount -t hugetlbfs nodev {path}, and reserve "
                          "pages: echo 512 > /proc/sys/vm/nr_hugepages)")
    return resolved


def testpmd_path() -> str | None:
    """The testpmd binary (Debian package ``dpdk-dev``), or None."""
    return shutil.which(TESTPMD)


@dataclass
class TestpmdSwitch:
    """One dpdk-testpmd process serving vhost-user ports (see the module docstring)."""

    __test__ = False   # not a pytest test class, whatever its name

    ports: Sequence[VhostPort]
    uplink_tap: str | None = None          # a host TAP interface as the last port (DPDK net_tap)
    forward_mode: str = "io"
    cores: str = "0,1"                     # main lcore, forwarding lcore
    memory_mib: int = 256
    log_path: str | None = None
    huge_dir: str | None = None            # a hugetlbfs mount for DPDK's memory (default: --no-huge)
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)
    prefix: str = field(default_factory=lambda: f"kvmlet-{os.getpid()}-{secrets.token_hex(3)}", init=False)

    def command(self) -> list[str]:
        controlled = [port.name for port in self.ports if port.policy.controlled]
        if controlled:
            raise SwitchError(f"port {controlled[0]}: per-port controls (mac, vlan, rate, trust) need the ovs engine: "
                              f"{TESTPMD} forwards port to port and has no anti-spoofing, VLAN tagging or policing")
        binary = testpmd_path()
        if binary is None:
            raise SwitchError(f"{TESTPMD} is not installed (Debian package dpdk-dev)")
        if self.forward_mode not in FORWARD_MODES:
            raise SwitchError(f"forward mode {self.forward_mode!r}: choose one of {', '.join(FORWARD_MODES)}")
        queues = max([port.queues for port in self.ports] or [1])
        memory = ["--huge-dir", self.huge_dir, "--huge-unlink"] if self.huge_dir else ["--no-huge"]
        args = [binary, "-l", self.cores, *memory, "-m", str(self.memory_mib), "--no-pci",
                f"--file-prefix={self.prefix}", "--log-level=lib.eal:error"]
        for number, port in enumerate(self.ports):
            args += ["--vdev", f"net_vhost{number},iface={port.socket},queues={port.queues}"]
        if self.uplink_tap is not None:
            args += ["--vdev", f"net_tap0,iface={self.uplink_tap}"]
        args += ["--", f"--forward-mode={self.forward_mode}", "--auto-start", "--stats-period=0", "--nb-cores=1",
                 f"--rxq={queues}", f"--txq={queues}", "--total-num-mbufs=16384"]
        return args

    def start(self) -> TestpmdSwitch:
        """Start testpmd and wait until every vhost-user socket exists (SwitchError, with its log, if not)."""
        if self.process is not None:
            return self
        for port in self.ports:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(port.socket)
        log = open(self.log_path, "wb") if self.log_path else tempfile.TemporaryFile()  # noqa: SIM115
        try:
            # stdin stays open: testpmd without -i runs until its standard input ends or it is signalled
            self.process = subprocess.Popen(self.command(), stdin=subprocess.PIPE, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True,
                                            preexec_fn=die_with_parent)
            self._log = log
            deadline = time.monotonic() + START_TIMEOUT
            while not all(Path(port.socket).is_socket() for port in self.ports) or not self._uplink_ready():
                if self.process.poll() is not None or time.monotonic() > deadline:
                    output = self.output()
                    self.stop()
                    raise SwitchError(f"{TESTPMD} did not start: {output[-800:]}")
                time.sleep(0.05)
        except BaseException:
            self.stop()
            raise
        return self

    def _uplink_ready(self) -> bool:
        return self.uplink_tap is None or Path(f"/sys/class/net/{self.uplink_tap}").exists()

    def output(self) -> str:
        log = getattr(self, "_log", None)
        if log is None:
            return ""
        try:
            log.flush()
            log.seek(0)
            return bytes(log.read()).decode(errors="replace")
        except (OSError, ValueError):
            return ""

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def pids(self) -> list[int]:
        """testpmd's process ID while it runs (the same call as OvsSwitch.pids)."""
        return [self.process.pid] if self.process is not None else []

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        """End testpmd (SIGTERM, then SIGKILL) and remove its sockets; idempotent, safe on every exit path."""
        process, self.process = self.process, None
        if process is not None:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout)
            if process.stdin is not None:
                with contextlib.suppress(OSError):
                    process.stdin.close()
        for port in self.ports:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(port.socket)
        with contextlib.suppress(OSError):
            shutil.rmtree(f"/var/run/dpdk/{self.prefix}")
        log = getattr(self, "_log", None)
        if log is not None:
            log.close()
            del self._log

    def __enter__(self) -> TestpmdSwitch:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
