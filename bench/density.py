"""Density: how many 64 MiB test-guest VMs run at once, each alive and answering on its console.

VMs are started one after another (the guest's ``echo`` check: it waits in ``hlt`` for console lines and
echoes them). Each start-up is timed from spawn to ``READY echo`` and the new VM must echo a line. Starting
stops at the cap, when a start-up takes ``density_slowdown`` times the first, or when the host would keep
less than ``density_keep_free_mib`` available. At the end every VM must still answer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from bench.console import BenchError, ConsoleProcess, read_rollup
from bench.context import Context, alternate
from bench.model import BenchResult, Series, paired_row
from bench.vmms import Launch, kvmlet_launch, qemu_launch

NAME = "density"
STARTUP_TIMEOUT = 120.0


def mem_available_mib() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    raise BenchError("/proc/meminfo has no MemAvailable")


@dataclass
class DensityRun:
    count: int
    stop_reason: str
    startup_ms: list[float] = field(default_factory=list)
    pss_mib_per_vm: float = 0.0          # mean proportional set size of the VMM processes (guest RAM included)
    available_drop_mib_per_vm: float = 0.0


def _answers(vmm: ConsoleProcess, word: str, timeout: float = 30.0) -> None:
    offset = len(vmm.output())
    vmm.send(f"{word}\n".encode())
    vmm.wait_for(f"ECHO {word}\n".encode(), timeout, offset)


def density_run(ctx: Context, launch: Launch) -> DensityRun:
    sizes = ctx.sizes
    vms: list[ConsoleProcess] = []
    startups: list[float] = []
    reason = f"cap of {sizes.density_cap}"
    available_before = mem_available_mib()
    available_after = available_before
    pss: list[float] = []
    try:
        for index in range(sizes.density_cap):
            if mem_available_mib() - sizes.density_memory_mib - 64 < sizes.density_keep_free_mib:
                reason = f"host would keep less than {sizes.density_keep_free_mib} MiB available"
                break
            vmm = ConsoleProcess(launch, stdin_pipe=True)
            vms.append(vmm)
            ready, _ = vmm.wait_for(b"READY echo\n", STARTUP_TIMEOUT)
            _answers(vmm, f"hello{index}")
            startup = 1000 * (ready - vmm.spawned_at)
            if startups and startup > sizes.density_slowdown * startups[0]:
                reason = f"start-up {startup:.0f} ms > {sizes.density_slowdown:g}x the first"
                vms.pop().close()
                break
            startups.append(startup)
        for index, vmm in enumerate(vms):
            _answers(vmm, f"alive{index}")
        available_after = mem_available_mib()
        pss = [read_rollup(vmm.pid).get("Pss", 0) / (1 << 20) for vmm in vms[:len(startups)]]
    finally:
        for vmm in vms:
            try:
                if vmm.proc.poll() is None:
                    vmm.send(b"quit\n")
            except OSError:
                pass
        for vmm in vms:
            try:
                vmm.wait_exit(30)
            except BenchError:
                pass
            vmm.close()
    count = len(startups)
    drop = (available_before - available_after) / count if count else 0.0
    pss_per_vm = sum(pss) / len(pss) if pss else 0.0
    ctx.log(f"density {launch.side}: {count} VMs ({reason}); first start-up {startups[0]:.0f} ms, "
            f"last {startups[-1]:.0f} ms; Pss {pss_per_vm:.1f} MiB per VM")
    return DensityRun(count, reason, startups, pss_per_vm, drop)


def run(ctx: Context) -> BenchResult:
    sizes = ctx.sizes
    mib = sizes.density_memory_mib
    cmdline = "console=ttyS0 kvmlet.test=echo"
    contenders = [kvmlet_launch(ctx.guest, cmdline, mib, python_flags=ctx.python_flags)]
    if ctx.qemu is not None:
        contenders.append(qemu_launch(ctx.qemu, ctx.guest, cmdline, mib))
    runs = alternate(contenders, sizes.density_rounds, 0, lambda launch: density_run(ctx, launch),
                     lambda n, order: ctx.log(f"density round {n}: {', '.join(c.side for c in order)}"))
    kvmlet_runs = runs[0]
    qemu_runs = runs[1] if ctx.qemu is not None else None
    result = BenchResult(NAME)
    rows: tuple[tuple[str, str, Callable[[DensityRun], float]], ...] = (
        ("VMs alive at once", "VMs", lambda r: float(r.count)),
        ("  start-up of the first VM", "ms", lambda r: r.startup_ms[0]),
        ("  start-up of the last VM", "ms", lambda r: r.startup_ms[-1]),
        ("  memory per VM (Pss of the VMM process, guest RAM included)", "MiB", lambda r: r.pss_mib_per_vm))
    for index, (metric, unit, pick) in enumerate(rows):
        subject = Series("kvmlet", [pick(r) for r in kvmlet_runs])
        baseline = Series("qemu", [pick(r) for r in qemu_runs]) if qemu_runs else None
        row = paired_row(NAME, metric, unit, subject, baseline)
        if index == 0:
            row.note = (f"{mib} MiB guests, cap {sizes.density_cap}; stopped by: "
                        f"{'; '.join(sorted({r.stop_reason for r in kvmlet_runs + (qemu_runs or [])}))}")
        result.rows.append(row)
    result.details = {"cmdline": cmdline, "runs": {c.side: [vars(r) for r in rs]
                                                   for c, rs in zip(contenders, runs, strict=False)}}
    if ctx.qemu is None:
        result.skipped.append("QEMU half: qemu-system-x86_64 not found")
    return result
