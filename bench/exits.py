"""Exit round trip: N port writes (0x80) and N MMIO writes (unclaimed 0xd0000000) from a CPL3 loop.

Every write is a VM exit handled in the VMM's user space. The time of each loop is read from the console:
from the end of the line before it (``TEST serial PASS``) to the end of its own ``TEST ... PASS`` line, so
process start-up does not count. kvmlet and QEMU run alternately.
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.console import BenchError, ConsoleProcess
from bench.context import Context, alternate
from bench.model import BenchResult, Series, Target, paired_row
from bench.vmms import Launch, kvmlet_launch, qemu_launch

NAME = "exits"
GUEST_MEMORY_MIB = 128
KINDS = (("pio-loop", "PIO exit (out to port 0x80)"), ("mmio-loop", "MMIO exit (write to unclaimed 0xd0000000)"))


@dataclass
class ExitRun:
    us_per_exit: dict[str, float]   # check name -> microseconds per exit


def exit_run(launch: Launch, loops: int, timeout: float = 600.0) -> ExitRun:
    with ConsoleProcess(launch) as vmm:
        previous, offset = vmm.wait_for(b"TEST serial PASS\n", 60)
        out: dict[str, float] = {}
        for check, _ in KINDS:
            at, offset = vmm.wait_for(f"TEST {check} PASS\n".encode(), timeout, offset)
            out[check] = 1e6 * (at - previous) / loops
            previous = at
        vmm.check_exit(60)
        if b"TESTS DONE 3 0" not in vmm.output():
            raise BenchError(f"{launch.side}: the loops did not pass: {vmm.text()[-300:]!r}")
        return ExitRun(out)


def run(ctx: Context) -> BenchResult:
    loops = ctx.sizes.exit_loops
    cmdline = f"console=ttyS0 kvmlet.test=serial,{','.join(k for k, _ in KINDS)} kvmlet.loops={loops}"
    contenders = [kvmlet_launch(ctx.guest, cmdline, GUEST_MEMORY_MIB, python_flags=ctx.python_flags)]
    if ctx.qemu is not None:
        contenders.append(qemu_launch(ctx.qemu, ctx.guest, cmdline, GUEST_MEMORY_MIB))
    runs = alternate(contenders, ctx.sizes.rounds, ctx.sizes.warmup, lambda launch: exit_run(launch, loops),
                     lambda n, order: ctx.log(f"exits round {n} ({loops} of each): "
                                              f"{', '.join(c.side for c in order)}"))
    result = BenchResult(NAME)
    kvmlet_runs = runs[0]
    qemu_runs = runs[1] if ctx.qemu is not None else None
    for check, label in KINDS:
        subject = Series("kvmlet", [r.us_per_exit[check] for r in kvmlet_runs])
        baseline = Series("qemu", [r.us_per_exit[check] for r in qemu_runs]) if qemu_runs else None
        result.rows.append(paired_row(NAME, f"{label} round trip", "us", subject, baseline, target=Target(1.0),
                                      note=f"{loops} exits per run, CPL3"))
    for check, label in KINDS:
        subject = Series("kvmlet", [1e6 / r.us_per_exit[check] for r in kvmlet_runs])
        baseline = Series("qemu", [1e6 / r.us_per_exit[check] for r in qemu_runs]) if qemu_runs else None
        result.rows.append(paired_row(NAME, f"{label.split(' (')[0]}s per second", "exits/s", subject, baseline,
                                      target=Target(1.0, higher_is_better=True)))
    result.details = {"loops": loops, "cmdline": cmdline}
    if ctx.qemu is None:
        result.skipped.append("QEMU half: qemu-system-x86_64 not found")
    return result
