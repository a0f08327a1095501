"""Cold start: process start to the first guest byte on the console, and to the guest's exit.

kvmlet boots the built-in guest through its 64-bit entry and through PVH, QEMU (microvm) through PVH, each
a fresh process per run, alternating. kvmlet's ``--boot-timer`` breakdown (counted from the same spawn
time, passed in ``KVMLET_BOOT_TIMER_ORIGIN``) shows where its time goes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from bench.console import BenchError, ConsoleProcess
from bench.context import Context, alternate
from bench.model import BenchResult, Row, Series, Target, paired_row
from bench.vmms import Launch, kvmlet_launch, qemu_launch

NAME = "cold-start"
GUEST_MEMORY_MIB = 128
ORIGIN_ENV = "KVMLET_BOOT_TIMER_ORIGIN"
NO_SITE = "kvmlet-S"   # python -S: no site module (kvmlet's few dependencies are put on PYTHONPATH)
_TIMER_LINE = re.compile(r"^  (\S.*?)\s+(-?\d+\.\d+)\s+\(\+(-?\d+\.\d+)\)$")


@dataclass
class ColdRun:
    first_byte_ms: float
    exit_ms: float
    steps: dict[str, float] = field(default_factory=dict)   # boot-timer label -> ms spent in that step


def parse_boot_timer(stderr: str) -> dict[str, float]:
    """The ``--boot-timer`` lines: label -> milliseconds spent in that step."""
    steps: dict[str, float] = {}
    lines = stderr.splitlines()
    for index, line in enumerate(lines):
        if line.startswith("boot timer"):
            for entry in lines[index + 1:]:
                match = _TIMER_LINE.match(entry)
                if match is None:
                    break
                steps[match.group(1)] = float(match.group(3))
    return steps


def cold_run(launch: Launch, expect: bytes, timeout: float = 60.0) -> ColdRun:
    origin = ORIGIN_ENV if not launch.qemu_exit_code else None
    with ConsoleProcess(launch, origin_env=origin) as vmm:
        first = vmm.first_byte_at(timeout)
        exited = vmm.check_exit(timeout)
        output = vmm.output()
        if not output.startswith(b"k") or expect not in output:
            raise BenchError(f"{launch.side}: unexpected console output {output[-300:]!r}")
        steps = parse_boot_timer(vmm.stderr_text()) if origin else {}
        return ColdRun(1000 * (first - vmm.spawned_at), 1000 * (exited - vmm.spawned_at), steps)


def launches(ctx: Context) -> list[Launch]:
    from kvmlet.guest_image import DEFAULT_GUEST_CMDLINE

    out = [kvmlet_launch(ctx.guest, DEFAULT_GUEST_CMDLINE, GUEST_MEMORY_MIB, boot=boot,
                         python_flags=ctx.python_flags, extra_args=("--boot-timer",))
           for boot in ("linux64", "pvh")]
    if "-S" not in ctx.python_flags:  # show what skipping site (and its .pth files) saves
        out.append(kvmlet_launch(ctx.guest, DEFAULT_GUEST_CMDLINE, GUEST_MEMORY_MIB, side=NO_SITE,
                                 python_flags=(*ctx.python_flags, "-S"), extra_args=("--boot-timer",)))
    if ctx.qemu is not None:
        out.append(qemu_launch(ctx.qemu, ctx.guest, DEFAULT_GUEST_CMDLINE, GUEST_MEMORY_MIB))
    return out


def run(ctx: Context) -> BenchResult:
    result = BenchResult(NAME)
    contenders = launches(ctx)
    expect = b"TESTS DONE 6 0"
    runs = alternate(contenders, ctx.sizes.cold_rounds, ctx.sizes.warmup,
                     lambda launch: cold_run(launch, expect),
                     lambda n, order: ctx.log(f"cold start round {n}: {', '.join(c.side for c in order)}"))
    by_side = dict(zip([c.side for c in contenders], runs, strict=True))
    qemu = by_side.get("qemu")
    target = Target(0.5)
    for what, attribute in (("first guest byte", "first_byte_ms"), ("guest exit", "exit_ms")):
        baseline = Series("qemu", [getattr(r, attribute) for r in qemu]) if qemu else None
        for side, entry in (("kvmlet", "64-bit entry"), ("kvmlet-pvh", "PVH entry"),
                            (NO_SITE, "64-bit entry, python -S")):
            if side not in by_side:
                continue
            subject = Series(side, [getattr(r, attribute) for r in by_side[side]])
            note = {"kvmlet-pvh": "like for like: both boot through PVH",
                    NO_SITE: "the interpreter without the site module (kvmlet's dependencies on PYTHONPATH)",
                    }.get(side, "")
            result.rows.append(paired_row(NAME, f"{what}, kvmlet {entry}", "ms", subject, baseline,
                                          target=target, note=note))
    labels = [label for label in by_side["kvmlet"][0].steps] if by_side["kvmlet"] else []
    for index, label in enumerate(labels):
        values = [r.steps.get(label, 0.0) for r in by_side["kvmlet"]]
        note = "kvmlet's --boot-timer steps (64-bit entry), each from the end of the one before" if not index else ""
        result.rows.append(Row(NAME, f"  step: {label}", "ms", Series("kvmlet", values), note=note))
    result.details = {"runs": {side: [vars(r) for r in rs] for side, rs in by_side.items()},
                      "argv": {c.side: c.argv for c in contenders}}
    if ctx.qemu is None:
        result.skipped.append("QEMU half: qemu-system-x86_64 not found")
    return result
