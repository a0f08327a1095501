"""Memory overhead: the VMM's resident memory minus the guest memory the guest touched (128 MiB guest).

The guest touches ``memory_touch_mib`` MiB at CPL3 and then waits in the ``echo`` check, alive. Then
/proc/PID/smaps is read: guest RAM is every mapping at least as large as the guest's memory (kvmlet's memfd
mapping, QEMU's RAM block); everything else resident is the VMM's overhead.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from bench.console import ConsoleProcess, Mapping
from bench.context import Context, alternate
from bench.model import BenchResult, Row, Series, Target, paired_row
from bench.vmms import Launch, kvmlet_launch, qemu_launch

NAME = "memory"
MiB = 1 << 20
SETTLE_SECONDS = 0.3


@dataclass
class MemoryRun:
    rss_mib: float
    guest_rss_mib: float
    overhead_mib: float
    private_overhead_mib: float
    pss_overhead_mib: float


def account(mappings: list[Mapping], guest_bytes: int) -> MemoryRun:
    guest = [m for m in mappings if m.size >= guest_bytes]
    other = [m for m in mappings if m.size < guest_bytes]
    rss = sum(m.rss for m in mappings)
    guest_rss = sum(m.rss for m in guest)
    return MemoryRun(rss / MiB, guest_rss / MiB, (rss - guest_rss) / MiB,
                     sum(m.private for m in other) / MiB, sum(m.pss for m in other) / MiB)


def memory_run(launch: Launch, guest_mib: int, timeout: float = 60.0) -> MemoryRun:
    with ConsoleProcess(launch, stdin_pipe=True) as vmm:
        vmm.wait_for(b"READY echo\n", timeout)
        time.sleep(SETTLE_SECONDS)
        sample = account(vmm.memory(), guest_mib * MiB)
        vmm.send(b"quit\n")
        vmm.check_exit(timeout)
        return sample


def run(ctx: Context) -> BenchResult:
    sizes = ctx.sizes
    guest_mib = sizes.memory_guest_mib
    cmdline = f"console=ttyS0 kvmlet.test=touch,echo kvmlet.touch={sizes.memory_touch_mib}"
    contenders = [kvmlet_launch(ctx.guest, cmdline, guest_mib, python_flags=ctx.python_flags)]
    if ctx.qemu is not None:
        contenders.append(qemu_launch(ctx.qemu, ctx.guest, cmdline, guest_mib))
    runs = alternate(contenders, sizes.rounds, sizes.warmup, lambda launch: memory_run(launch, guest_mib),
                     lambda n, order: ctx.log(f"memory round {n}: {', '.join(c.side for c in order)}"))
    kvmlet_runs = runs[0]
    qemu_runs = runs[1] if ctx.qemu is not None else None
    result = BenchResult(NAME)
    for field_name, metric, target in (
            ("overhead_mib", "VMM resident memory minus guest RAM resident (Rss)", Target(1.0)),
            ("private_overhead_mib", "  of which private to the process (not shared libraries)", None),
            ("pss_overhead_mib", "  proportional share (Pss) of the overhead", None),
            ("guest_rss_mib", "guest RAM resident (what the guest touched)", None)):
        subject = Series("kvmlet", [getattr(r, field_name) for r in kvmlet_runs])
        baseline = Series("qemu", [getattr(r, field_name) for r in qemu_runs]) if qemu_runs else None
        row: Row = paired_row(NAME, metric, "MiB", subject, baseline, target=target)
        if target is not None:
            row.reference = "Firecracker's budget: 5 MiB"
            row.note = f"{guest_mib} MiB guest, {sizes.memory_touch_mib} MiB touched"
        result.rows.append(row)
    result.details = {"cmdline": cmdline, "guest_mib": guest_mib,
                      "runs": {c.side: [vars(r) for r in rs] for c, rs in zip(contenders, runs, strict=False)}}
    if ctx.qemu is None:
        result.skipped.append("QEMU half: qemu-system-x86_64 not found")
    return result
