"""Guest compute: the test guest's CPL3 ``dec; jnz`` loop in a VM against the same loop in a host process.

The host program (bench/native/cpl3_loop.c) is compiled with gcc at benchmark time. Both loops are timed
from outside by the arrival of the console lines around them. The ratio shows what the hardware (or PVM's
shadow paging) leaves of native speed; the VMM hardly matters, since the loop makes no exit.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from bench.console import BenchError, ConsoleProcess
from bench.context import Context, alternate
from bench.model import BenchResult, Series, paired_row
from bench.vmms import REPO, Launch, kvmlet_launch, qemu_launch

NAME = "compute"
SOURCE = Path(__file__).resolve().parent / "native" / "cpl3_loop.c"
GUEST_MEMORY_MIB = 128


def build_host_loop(gcc: str, work_dir: Path) -> Path:
    binary = work_dir / "cpl3_loop"
    result = subprocess.run([gcc, "-O2", "-o", str(binary), str(SOURCE)], capture_output=True, text=True)
    if result.returncode != 0:
        raise BenchError(f"gcc could not build {SOURCE}: {result.stderr.strip()}")
    return binary


def loop_seconds(launch: Launch, loops: int, timeout: float = 600.0) -> float:
    with ConsoleProcess(launch) as proc:
        if launch.side == "host":
            start, offset = proc.wait_for(b"START\n", 60)
            end, _ = proc.wait_for(b"DONE\n", timeout, offset)
            proc.check_exit(60)
        else:
            start, offset = proc.wait_for(b"TEST serial PASS\n", 60)
            end, _ = proc.wait_for(f"CPL3 loops={loops} cpl=3\n".encode(), timeout, offset)
            proc.check_exit(60)
        return end - start


def run(ctx: Context) -> BenchResult:
    result = BenchResult(NAME)
    loops = ctx.sizes.compute_loops
    if ctx.gcc is None:
        result.skipped.append("the host loop: gcc not found (apt-get install gcc)")
        return result
    host = Launch("host", [str(build_host_loop(ctx.gcc, ctx.work_dir)), str(loops)], cwd=REPO)
    cmdline = f"console=ttyS0 kvmlet.test=serial,cpl3 kvmlet.loops={loops}"
    contenders = [kvmlet_launch(ctx.guest, cmdline, GUEST_MEMORY_MIB, python_flags=ctx.python_flags), host]
    if ctx.qemu is not None:
        contenders.append(qemu_launch(ctx.qemu, ctx.guest, cmdline, GUEST_MEMORY_MIB))
    runs = alternate(contenders, ctx.sizes.rounds, ctx.sizes.warmup, lambda launch: loop_seconds(launch, loops),
                     lambda n, order: ctx.log(f"compute round {n} ({loops} iterations): "
                                              f"{', '.join(c.side for c in order)}"))
    by_side = {c.side: [1000 * s for s in rs] for c, rs in zip(contenders, runs, strict=True)}
    host_series = Series("host", by_side["host"])
    for side in ("kvmlet", "qemu"):
        if side in by_side:
            result.rows.append(paired_row(NAME, f"CPL3 loop ({loops:.0e} dec/jnz) in the {side} VM vs a host "
                                                f"process", "ms", Series(side, by_side[side]), host_series,
                                          note="ratio = VM time / host time"))
    result.details = {"loops": loops, "milliseconds": by_side}
    if ctx.qemu is None:
        result.skipped.append("the QEMU VM row: qemu-system-x86_64 not found")
    return result
