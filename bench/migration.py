"""Live migration: a 512 MiB guest, idle and dirtying 5,000 and 20,000 pages/s, against QEMU's migrate.

Two network namespaces joined by a veth pair stand for two hosts; each VMM process runs in its own. The
guest is the test guest: idle, it waits in HLT (``kvmlet.test=echo``); dirtying, ``kvmlet.test=dirtyrate``
writes every page of 256 MiB once, then dirties ``kvmlet.dirty_rate`` pages a second (paced by the TSC) until
it is stopped. Migration starts a settle time after the guest says it is ready.

kvmlet: ``kvmlet serve`` in each namespace, the destination with ``--migrate-listen``; ``PUT /migration/send``
with ``downtime_limit_ms`` 50, then ``GET /migration`` polled until it ends: its report gives the total time
(request to the destination's "running"), the downtime (pause to the destination's "running": the
destination's restore included), bytes, rounds and the throttle used. QEMU 7.2 (microvm, PVH, the same
ELF and command line): the destination started with ``-incoming tcp:...``; over QMP ``migrate-set-parameters``
``downtime-limit`` 50 and ``max-bandwidth`` raised (its 128 MiB/s default would cap a link kvmlet does not
cap), ``auto-converge`` on (kvmlet's default), ``migrate``, ``query-migrate`` polled: ``total-time``,
``downtime`` (QEMU measures it on the source, up to the end of its stream: the destination's load is not in
it), ``ram.transferred``, ``ram.dirty-sync-count`` (rounds), ``cpu-throttle-percentage``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.api import HttpClient, connect_when_listening
from bench.console import BenchError, ConsoleProcess
from bench.context import Context, Sizes, alternate
from bench.model import BenchResult, Row, Series, Target, paired_row
from bench.snapshot import UNTHROTTLED, Qmp
from bench.vmms import Launch, kvmlet_env, qemu_launch

NAME = "migration"
SUMMARY = "live migration of a 512 MiB guest (idle, 5k and 20k dirty pages/s) over a veth pair against QEMU"
TIMEOUT = 120.0
POLL_SECONDS = 0.002
DOWNTIME_LIMIT_MS = 50
QEMU_IDLE = "QEMU 7.2 here (issue): 48 ms total, about 1 ms downtime, 1.2 MB"


@dataclass
class MigrationSizes:
    guest_mib: int = 512
    dirty_mib: int = 256
    rates: tuple[int, ...] = (0, 5000, 20000)     # pages/s; 0: the idle guest
    rounds: int = 3
    warmup: int = 0
    settle_s: float = 1.0

    @classmethod
    def tiny(cls) -> MigrationSizes:
        return cls(guest_mib=64, dirty_mib=16, rates=(0, 5000), rounds=1, warmup=0, settle_s=0.3)

    @classmethod
    def following(cls, sizes: Sizes) -> MigrationSizes:
        return cls(rounds=min(sizes.rounds, 3), warmup=sizes.warmup)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def cmdline(self, rate: int) -> str:
        if rate == 0:
            return "console=ttyS0 kvmlet.test=echo"
        return f"console=ttyS0 kvmlet.test=dirtyrate kvmlet.dirty_mib={self.dirty_mib} kvmlet.dirty_rate={rate}"

    @staticmethod
    def ready(rate: int) -> bytes:
        return b"READY echo" if rate == 0 else b"dirtyrate ready"


@dataclass
class Outcome:
    total_ms: float             # the VMM's own figure
    running_ms: float           # measured here: the migrate request sent to the destination reporting it runs
    downtime_ms: float
    stream_downtime_ms: float   # QEMU's definition: the pause to the end of the source's stream
    megabytes: float
    rounds: int
    throttle_pct: int
    extra: dict[str, Any] = field(default_factory=dict)


# -- two "hosts" ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Hosts:
    source: str
    destination: str
    source_ip: str = "10.232.0.1"
    destination_ip: str = "10.232.0.2"

    def launch(self, namespace: str, launch: Launch) -> Launch:
        return Launch(launch.side, ["ip", "netns", "exec", namespace, *launch.argv], launch.env, launch.cwd,
                      launch.qemu_exit_code)


def _ip(*args: str, check: bool = True) -> None:
    subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


@contextlib.contextmanager
def two_hosts() -> Iterator[Hosts]:
    suffix = secrets.token_hex(3)
    hosts = Hosts(f"kvbm{suffix}a", f"kvbm{suffix}b")
    veth_a, veth_b = f"kvbm{suffix}a", f"kvbm{suffix}b"
    try:
        _ip("netns", "add", hosts.source)
        _ip("netns", "add", hosts.destination)
        _ip("link", "add", veth_a, "netns", hosts.source, "type", "veth", "peer", "name", veth_b,
            "netns", hosts.destination)
        for namespace, veth, address in ((hosts.source, veth_a, hosts.source_ip),
                                         (hosts.destination, veth_b, hosts.destination_ip)):
            _ip("-n", namespace, "addr", "add", f"{address}/24", "dev", veth)
            _ip("-n", namespace, "link", "set", veth, "up")
            _ip("-n", namespace, "link", "set", "lo", "up")
        yield hosts
    finally:
        for namespace in (hosts.source, hosts.destination):
            _ip("netns", "del", namespace, check=False)


def unavailable() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (ip) not found: apt-get install iproute2"
    return None


# -- one migration each ----------------------------------------------------------------------------------------
def _serve(hosts: Hosts, namespace: str, api_sock: Path, ctx: Context, side: str, *extra: str) -> ConsoleProcess:
    argv = [sys.executable, *ctx.python_flags, "-m", "kvmlet", "serve", "--api-sock", str(api_sock),
            "--console", "stdio", *extra]
    return ConsoleProcess(hosts.launch(namespace, Launch(side, argv, kvmlet_env(python_flags=ctx.python_flags))))


class KvmletSide:
    side = "kvmlet"

    def __init__(self, ctx: Context, sizes: MigrationSizes, rate: int, hosts: Hosts, work: Path) -> None:
        self.ctx, self.sizes, self.rate, self.hosts, self.work = ctx, sizes, rate, hosts, work

    def run(self) -> Outcome:
        hosts, work = self.hosts, self.work
        source_sock, destination_sock = work / "kvmlet-source.sock", work / "kvmlet-destination.sock"
        destination = _serve(hosts, hosts.destination, destination_sock, self.ctx, "kvmlet-destination",
                             "--migrate-listen", f"tcp:{hosts.destination_ip}:0")
        source = _serve(hosts, hosts.source, source_sock, self.ctx, "kvmlet")
        try:
            incoming_sock, _ = connect_when_listening(destination_sock, destination, TIMEOUT)
            sock, _ = connect_when_listening(source_sock, source, TIMEOUT)
            with sock, incoming_sock:
                api, incoming = HttpClient(sock, "kvmlet"), HttpClient(incoming_sock, "kvmlet-destination")
                api.request("PUT", "/boot-source", {"kernel_image_path": str(self.ctx.guest),
                                                    "boot_args": self.sizes.cmdline(self.rate)}, expect=204)
                api.request("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": self.sizes.guest_mib},
                            expect=204)
                api.request("PUT", "/actions", {"action_type": "InstanceStart"}, expect=204)
                source.wait_for(self.sizes.ready(self.rate), TIMEOUT)
                time.sleep(self.sizes.settle_s)
                listen = json.loads(incoming.request("GET", "/migration", expect=200))["listen_address"]
                sent = time.perf_counter()
                api.request("PUT", "/migration/send", {"destination": listen,
                                                       "downtime_limit_ms": DOWNTIME_LIMIT_MS}, expect=204)
                deadline = sent + TIMEOUT
                while json.loads(incoming.request("GET", "/", expect=200))["state"] != "Running":
                    if time.perf_counter() > deadline or source.proc.poll() is not None:
                        raise BenchError(f"kvmlet: the destination does not run the VM: "
                                         f"{incoming.request('GET', '/migration')!r}")
                    time.sleep(POLL_SECONDS)
                running_ms = (time.perf_counter() - sent) * 1000
                while (status := json.loads(api.request("GET", "/migration", expect=200)))["state"] == "active":
                    time.sleep(POLL_SECONDS)
                if status["state"] != "completed":
                    raise BenchError(f"kvmlet: the migration {status['state']}: {status['error']}; "
                                     f"{source.stderr_text()[-600:]!r}")
            report = status["report"]
            return Outcome(report["total_ms"], running_ms, report["downtime_ms"],
                           report["pause_ms"] + report["last_round_ms"] + report["state_ms"], report["bytes"] / 1e6,
                           report["rounds"],
                           report["throttle_pct"],
                           {key: report[key] for key in ("setup_ms", "precopy_ms", "pause_ms", "last_round_ms",
                                                         "state_ms", "restore_ms", "handover_ms", "pages_data",
                                                         "pages_zero", "pages_unchanged")})
        finally:
            for vmm in (source, destination):
                vmm.close()
            for path in (source_sock, destination_sock):
                path.unlink(missing_ok=True)


class QemuSide:
    side = "qemu"

    def __init__(self, ctx: Context, sizes: MigrationSizes, rate: int, hosts: Hosts, work: Path) -> None:
        assert ctx.qemu is not None
        self.ctx, self.sizes, self.rate, self.hosts, self.work = ctx, sizes, rate, hosts, work
        self.qemu = ctx.qemu

    def _launch(self, namespace: str, qmp: Path, *extra: str) -> Launch:
        return self.hosts.launch(namespace, qemu_launch(
            self.qemu, self.ctx.guest, self.sizes.cmdline(self.rate), self.sizes.guest_mib,
            extra_args=("-qmp", f"unix:{qmp},server,wait=off", *extra)))

    def run(self) -> Outcome:
        hosts, work = self.hosts, self.work
        port = random.randint(20000, 60000)
        address = f"tcp:{hosts.destination_ip}:{port}"
        qmp_in, qmp_out = work / "qmp-in.sock", work / "qmp-out.sock"
        destination = ConsoleProcess(self._launch(hosts.destination, qmp_in, "-incoming", address))
        source = ConsoleProcess(self._launch(hosts.source, qmp_out))
        try:
            incoming = Qmp(qmp_in, destination)
            outgoing = Qmp(qmp_out, source)
            source.wait_for(self.sizes.ready(self.rate), TIMEOUT)
            time.sleep(self.sizes.settle_s)
            outgoing.command("migrate-set-capabilities",
                             capabilities=[{"capability": "auto-converge", "state": True}])
            outgoing.command("migrate-set-parameters", **{"downtime-limit": DOWNTIME_LIMIT_MS,
                                                          "max-bandwidth": UNTHROTTLED})
            sent = time.perf_counter()
            outgoing.command("migrate", uri=address)
            deadline = sent + TIMEOUT
            while (state := incoming.command("query-status").get("status")) != "running":
                if time.perf_counter() > deadline or state not in ("inmigrate", "paused", "prelaunch"):
                    raise BenchError(f"qemu: the destination is {state}, not running: "
                                     f"{outgoing.command('query-migrate')}")
                time.sleep(POLL_SECONDS)
            running_ms = (time.perf_counter() - sent) * 1000
            while (status := outgoing.command("query-migrate")).get("status") not in ("completed", "failed",
                                                                                     "cancelled"):
                if time.perf_counter() > deadline:
                    raise BenchError(f"qemu: the migration did not end within {TIMEOUT:g} s: {status}")
                time.sleep(POLL_SECONDS)
            if status["status"] != "completed":
                raise BenchError(f"qemu: the migration {status['status']}: {status.get('error-desc')}")
            ram = status.get("ram", {})
            outcome = Outcome(float(status["total-time"]), running_ms, float(status["downtime"]),
                              float(status["downtime"]), ram.get("transferred", 0) / 1e6,
                              int(ram.get("dirty-sync-count", 0)), int(status.get("cpu-throttle-percentage", 0)),
                              {"setup_ms": status.get("setup-time"), "duplicate": ram.get("duplicate"),
                               "normal": ram.get("normal")})
            incoming.close()
            outgoing.close()
            return outcome
        finally:
            for vmm in (source, destination):
                vmm.close()
            for path in (qmp_in, qmp_out):
                path.unlink(missing_ok=True)


# -- the table ---------------------------------------------------------------------------------------------
def label(sizes: MigrationSizes, rate: int) -> str:
    return f"{sizes.guest_mib} MiB idle" if rate == 0 else f"{sizes.guest_mib} MiB dirtying {rate:,} pages/s"


def rows_for(sizes: MigrationSizes, rate: int, kvmlet: list[Outcome], qemu: list[Outcome] | None) -> list[Row]:
    name = label(sizes, rate)

    def series(side: str, runs: list[Outcome] | None, attribute: str) -> Series | None:
        return Series(side, [float(getattr(run, attribute)) for run in runs]) if runs is not None else None

    def pair(metric: str, unit: str, attribute: str, **extra: Any) -> Row:
        subject = series("kvmlet", kvmlet, attribute)
        assert subject is not None
        return paired_row(NAME, metric, unit, subject, series("qemu", qemu, attribute), **extra)

    idle = rate == 0
    rows = [
        pair(f"{name}: total time (the VMM's figure)", "ms", "total_ms", target=Target(1.0) if idle else None,
             reference=QEMU_IDLE if idle else "",
             note=f"{name}, downtime limit {DOWNTIME_LIMIT_MS} ms, over a veth pair between two namespaces; "
                  "kvmlet: request to the destination running; QEMU: total-time (to the end of its stream)"),
        pair("  migrate request to the destination running (measured here)", "ms", "running_ms",
             note="both: from right before the request to the destination's API (GET /; QMP query-status) "
                  "first saying it runs, polled every 2 ms"),
        pair("  downtime", "ms", "downtime_ms", target=Target(1.0) if idle else Target(DOWNTIME_LIMIT_MS, "value"),
             note="kvmlet: pause to the destination running (its restore included); QEMU: downtime as it reports "
                  "it (measured on the source, without the destination's load)"),
        pair("  downtime as QEMU counts it (pause to the end of the source's stream)", "ms", "stream_downtime_ms",
             note="kvmlet: pause + last pages + state sent (its report's parts); QEMU: its downtime"),
        pair("  bytes sent", "MB", "megabytes"),
        pair("  rounds (passes; QEMU: dirty-sync-count)", "", "rounds"),
        pair("  throttle used", "%", "throttle_pct"),
    ]
    return rows


def run(ctx: Context, sizes: MigrationSizes | None = None) -> BenchResult:
    sizes = sizes if sizes is not None else MigrationSizes.following(ctx.sizes)
    result = BenchResult(NAME)
    problem = unavailable()
    if problem is not None:
        result.skipped.append(f"the whole benchmark: {problem}")
        return result
    if sizes.guest_mib < 16 + sizes.dirty_mib + 16:
        raise BenchError(f"a {sizes.guest_mib} MiB guest cannot hold {sizes.dirty_mib} MiB dirtied from 16 MiB")
    work = ctx.work_dir / NAME
    work.mkdir(exist_ok=True)
    details: dict[str, Any] = {"sizes": sizes.to_json(), "loadavg_before": os.getloadavg(), "runs": {}}
    with two_hosts() as hosts:
        for rate in sizes.rates:
            sides: list[KvmletSide | QemuSide] = [KvmletSide(ctx, sizes, rate, hosts, work)]
            if ctx.qemu is not None:
                sides.append(QemuSide(ctx, sizes, rate, hosts, work))
            runs = alternate(sides, sizes.rounds, sizes.warmup, lambda side: side.run(),
                             lambda number, order, rate=rate: ctx.log(  # type: ignore[misc]
                                 f"migration {label(sizes, rate)} round {number}: "
                                 f"{', '.join(side.side for side in order)}"))
            result.rows += rows_for(sizes, rate, runs[0], runs[1] if ctx.qemu is not None else None)
            details["runs"][str(rate)] = {side.side: [asdict(outcome) for outcome in side_runs]
                                          for side, side_runs in zip(sides, runs, strict=True)}
    details["loadavg_after"] = os.getloadavg()
    result.details = details
    if ctx.qemu is None:
        result.skipped.append("QEMU half: qemu-system-x86_64 not found")
    return result
