"""vTPM: VM start with and without a vTPM and measured launch, and QEMU's tpm-tis with swtpm beside it.

Every run is a fresh process from spawn to the guest's exit (the cold-start guest and command line):

* kvmlet without a vTPM, and QEMU (microvm) without one: the baseline of each;
* kvmlet ``--tpm state=DIR`` (an already provisioned vTPM: swtpm start, TPM2_Startup, the measured launch, the
  AK, the event log, the ACPI additions), and QEMU with ``-tpmdev emulator`` and ``-device tpm-tis`` on a swtpm
  a shell starts just before it (QEMU 7.2 on x86 has no sysbus ``tpm-tis-device``; ``tpm-tis`` is its TIS);
* kvmlet ``--tpm`` with a new vTPM provisioned at launch (swtpm_setup: EK and EK certificate);
* kvmlet ``--tpm state=DIR --initrd`` with an initrd of N MiB: what measuring costs per MiB of image (SHA-256
  and SHA-384 of it), end to end and in-process.

The vTPM's start-up cost is each side's with-vTPM time minus its without-vTPM time in the same round.
"""

from __future__ import annotations

import os
import shlex
import shutil
import time
from pathlib import Path

from bench.cold_start import GUEST_MEMORY_MIB, cold_run
from bench.context import Context, alternate
from bench.model import BenchResult, Row, Series, paired_row
from bench.vmms import Launch, kvmlet_launch, qemu_launch

NAME = "tpm"


def _qemu_with_swtpm(ctx: Context, cmdline: str, state: Path) -> Launch:
    assert ctx.qemu is not None
    socket = ctx.work_dir / "tpm-qemu" / "swtpm-ctrl.sock"
    qemu = qemu_launch(ctx.qemu, ctx.guest, cmdline, GUEST_MEMORY_MIB, side="qemu-tpm", extra_args=(
        "-chardev", f"socket,id=chrtpm,path={socket}", "-tpmdev", "emulator,id=tpm0,chardev=chrtpm",
        "-device", "tpm-tis,tpmdev=tpm0"))
    swtpm = ["swtpm", "socket", "--tpm2", "--terminate", "--daemon", "--tpmstate", f"dir={state}",
             "--ctrl", f"type=unixio,path={socket}"]
    script = f"rm -f {shlex.quote(str(socket))}; {shlex.join(swtpm)} && exec {shlex.join(qemu.argv)}"
    return Launch("qemu-tpm", ["sh", "-c", script], qemu.env, qemu_exit_code=True)


def _hash_ms_per_mib(mib: int) -> float:
    from kvmlet.tpm.measure import Measurement

    payload = os.urandom(mib << 20)
    started = time.perf_counter()
    Measurement("initrd", payload, b"initrd").digests  # noqa: B018 (computing the digests is the point)
    return (time.perf_counter() - started) * 1000 / mib


def run(ctx: Context) -> BenchResult:
    from kvmlet.guest_image import DEFAULT_GUEST_CMDLINE
    from kvmlet.tpm.swtpm import provision

    result = BenchResult(NAME)
    if shutil.which("swtpm") is None or shutil.which("swtpm_setup") is None:
        result.skipped.append("swtpm not found: apt-get install swtpm swtpm-tools")
        return result
    work = ctx.work_dir / "tpm"
    shutil.rmtree(work, ignore_errors=True)
    template = work / "template"
    provision(template)
    kvmlet_state, qemu_state = work / "kvmlet-state", work / "qemu-state"
    for state in (kvmlet_state, qemu_state):
        shutil.copytree(template, state)
    (ctx.work_dir / "tpm-qemu").mkdir(parents=True, exist_ok=True)
    initrd_mib = max(1, min(64, ctx.sizes.blk_image_mib // 4))
    initrd = work / "initrd.img"
    initrd.write_bytes(os.urandom(initrd_mib << 20))

    def kvmlet(side: str, *extra: str) -> Launch:
        return kvmlet_launch(ctx.guest, DEFAULT_GUEST_CMDLINE, GUEST_MEMORY_MIB, side=side,
                             python_flags=ctx.python_flags, extra_args=extra)

    contenders = [kvmlet("kvmlet"), kvmlet("kvmlet-tpm", "--tpm", f"state={kvmlet_state}"),
                  kvmlet("kvmlet-tpm-new", "--tpm"),
                  kvmlet("kvmlet-tpm-initrd", "--tpm", f"state={kvmlet_state}", "--initrd", str(initrd))]
    if ctx.qemu is not None:
        contenders += [qemu_launch(ctx.qemu, ctx.guest, DEFAULT_GUEST_CMDLINE, GUEST_MEMORY_MIB),
                       _qemu_with_swtpm(ctx, DEFAULT_GUEST_CMDLINE, qemu_state)]
    expect = b"TESTS DONE 6 0"
    runs = alternate(contenders, ctx.sizes.cold_rounds, ctx.sizes.warmup, lambda launch: cold_run(launch, expect),
                     lambda n, order: ctx.log(f"tpm round {n}: {', '.join(c.side for c in order)}"))
    exit_ms = {c.side: [r.exit_ms for r in rs] for c, rs in zip(contenders, runs, strict=True)}

    def series(side: str) -> Series | None:
        return Series(side, exit_ms[side]) if side in exit_ms else None

    plain = series("kvmlet")
    assert plain is not None
    result.rows.append(paired_row(NAME, "start to guest exit, no vTPM", "ms", plain, series("qemu"),
                                  note="the baselines: no TPM on either side"))
    with_tpm = series("kvmlet-tpm")
    qemu_tpm = series("qemu-tpm")
    assert with_tpm is not None
    cost = with_tpm.median - plain.median
    qemu_cost = f"; QEMU's: {qemu_tpm.median - qemu.median:.1f} ms" if qemu_tpm and (qemu := series("qemu")) else ""
    result.rows.append(paired_row(NAME, "start to guest exit, vTPM (provisioned state)", "ms", with_tpm, qemu_tpm,
                                  note=f"kvmlet: swtpm, measured launch, AK, event log; QEMU: swtpm started by a "
                                       f"shell, tpm-tis, no measurement. The vTPM's start-up cost (median with "
                                       f"minus median without): kvmlet's {cost:.1f} ms{qemu_cost}"))
    new = series("kvmlet-tpm-new")
    initrd_run = series("kvmlet-tpm-initrd")
    assert new is not None and initrd_run is not None
    result.rows.append(Row(NAME, "start to guest exit, vTPM provisioned at launch (EK + certificate)", "ms", new,
                           note=f"provisioning costs {new.median - with_tpm.median:.0f} ms (median difference)"))
    per_mib = (initrd_run.median - with_tpm.median) / initrd_mib
    result.rows.append(Row(NAME, f"start to guest exit, vTPM and a {initrd_mib} MiB initrd", "ms", initrd_run,
                           note=f"reading, loading and measuring the initrd: {per_mib:.2f} ms per MiB (median "
                                f"difference; noise at small sizes)"))
    result.rows.append(Row(NAME, "  SHA-256 + SHA-384 of an image, in-process", "ms/MiB",
                           Series("kvmlet", [_hash_ms_per_mib(initrd_mib) for _ in range(max(1, ctx.sizes.rounds))])))
    result.details = {"runs_ms": exit_ms, "initrd_mib": initrd_mib, "startup_cost_ms": cost,
                      "initrd_ms_per_mib": per_mib, "argv": {c.side: c.argv for c in contenders}}
    if ctx.qemu is None:
        result.skipped.append("QEMU half: qemu-system-x86_64 not found")
    shutil.rmtree(work, ignore_errors=True)
    return result
