"""virtio-blk: 4 KiB random reads (IOPS, depth 1 and 8) and sequential 64 KiB reads (MiB/s), polled at CPL3.

Both VMMs get the same raw image (created once in the work directory, filled with random bytes, written back
and read again before every run, so it is in the host page cache for both) as one virtio-mmio block device,
and boot the same guest, whose ``virtio-blk-bench`` and ``virtio-blk-seqbench`` checks poll the used ring at
CPL3 with ``kvmlet.bench_depth`` requests in flight. kvmlet: ``--drive path=IMG``; QEMU (microvm, modern
virtio-mmio): ``-drive id=d0,file=IMG,format=raw,if=none,cache=writeback,aio=threads -device
virtio-blk-device,drive=d0``. With O_DIRECT available in the work directory, a depth-1 run also goes past
the page cache: kvmlet ``direct=on`` against QEMU ``cache=none,aio=threads``.
"""

from __future__ import annotations

import errno
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.console import BenchError, ConsoleProcess
from bench.context import Context, alternate
from bench.guest_bench import GuestBench, timed_bench
from bench.model import BenchResult, Series, Target, paired_row
from bench.vmms import QEMU_VIRTIO_ARGS, QEMU_VIRTIO_MACHINE, Launch, kvmlet_launch, qemu_launch

NAME = "blk"
GUEST_MEMORY_MIB = 128
MiB = 1 << 20
RAND, SEQ = "blk-randread", "blk-seqread"
TIMEOUT = 300.0


@dataclass(frozen=True)
class Setup:
    """One configuration both VMMs run in: cached or direct I/O, requests in flight, how much."""

    direct: bool
    depth: int
    ops: int            # random 4 KiB reads
    seq_mib: int        # MiB read sequentially (wrapping at the end of the image)

    @property
    def label(self) -> str:
        return f"depth {self.depth}" + (", direct I/O" if self.direct else "")

    @property
    def cmdline(self) -> str:
        return (f"console=ttyS0 kvmlet.test=virtio-blk-bench,virtio-blk-seqbench kvmlet.loops={self.ops} "
                f"kvmlet.bench_mib={self.seq_mib} kvmlet.bench_depth={self.depth} kvmlet.timeout=60")

    def launches(self, ctx: Context, image: Path) -> list[Launch]:
        drive = f"path={image}" + (",direct=on" if self.direct else "")
        out = [kvmlet_launch(ctx.guest, self.cmdline, GUEST_MEMORY_MIB, python_flags=ctx.python_flags,
                             extra_args=("--drive", drive))]
        if ctx.qemu is not None:
            cache = "none" if self.direct else "writeback"
            out.append(qemu_launch(ctx.qemu, ctx.guest, self.cmdline, GUEST_MEMORY_MIB, machine=QEMU_VIRTIO_MACHINE,
                                   extra_args=(*QEMU_VIRTIO_ARGS,
                                               "-drive", f"id=d0,file={image},format=raw,if=none,cache={cache},"
                                                         "aio=threads",
                                               "-device", "virtio-blk-device,drive=d0")))
        return out


def make_image(path: Path, mib: int) -> None:
    """A raw image of ``mib`` MiB of random bytes, written back to the disk (clean pages in the cache)."""
    chunk = os.urandom(MiB)
    with open(path, "wb") as f:
        for index in range(mib):
            f.write(chunk[index % 251:] + chunk[:index % 251])   # every MiB different, cheaply
        f.flush()
        os.fsync(f.fileno())


def cache_image(path: Path) -> None:
    """Read the whole image, so that it is in the host page cache for the run that follows."""
    with open(path, "rb", buffering=0) as f:
        buffer = bytearray(4 * MiB)
        while f.readinto(buffer):
            pass


def direct_problem(path: Path) -> str | None:
    """Why O_DIRECT reads of ``path`` do not work here, or None."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return "O_DIRECT is not available on this platform"
    try:
        fd = os.open(path, os.O_RDONLY | flag)
    except OSError as exc:
        return f"{path.parent} does not support O_DIRECT ({exc.strerror})"
    buffer = mmap.mmap(-1, mmap.PAGESIZE)
    view = memoryview(buffer)
    try:
        os.preadv(fd, [view], 0)
    except OSError as exc:
        return f"O_DIRECT reads fail in {path.parent} ({errno.errorcode.get(exc.errno or 0, exc.errno)})"
    finally:
        view.release()
        buffer.close()
        os.close(fd)
    return None


def blk_run(launch: Launch, image: Path) -> dict[str, GuestBench]:
    cache_image(image)
    with ConsoleProcess(launch) as vmm:
        rand, offset = timed_bench(vmm, RAND, TIMEOUT, 0, b"BLK bench")
        seq, _ = timed_bench(vmm, SEQ, TIMEOUT, offset, b"BLK bench")
        vmm.check_exit(60)
        if b"TESTS DONE 2 0" not in vmm.output():
            raise BenchError(f"{launch.side}: the block benchmarks did not pass: {vmm.text()[-300:]!r}")
        return {RAND: rand, SEQ: seq}


def setups(ctx: Context, image: Path, result: BenchResult) -> list[Setup]:
    sizes = ctx.sizes
    out = [Setup(False, depth, sizes.blk_ops, sizes.blk_seq_mib) for depth in (1, 8)]
    if sizes.blk_direct_ops > 0:
        problem = direct_problem(image)
        if problem is None:
            out.append(Setup(True, 1, sizes.blk_direct_ops, sizes.blk_direct_seq_mib))
        else:
            result.skipped.append(f"direct I/O rows: {problem}")
    return out


def run(ctx: Context) -> BenchResult:
    sizes = ctx.sizes
    result = BenchResult(NAME)
    image = ctx.work_dir / "blk-bench.img"
    ctx.log(f"blk: creating a {sizes.blk_image_mib} MiB image in {ctx.work_dir}")
    make_image(image, sizes.blk_image_mib)
    per_setup: dict[str, Any] = {}
    for setup in setups(ctx, image, result):
        contenders = setup.launches(ctx, image)
        label = setup.label

        def progress(n: int, order: list[Launch], label: str = label) -> None:
            ctx.log(f"blk {label} round {n}: {', '.join(c.side for c in order)}")

        runs = alternate(contenders, sizes.rounds, sizes.warmup, lambda launch: blk_run(launch, image), progress)
        kvmlet_runs = runs[0]
        qemu_runs = runs[1] if len(runs) > 1 else None
        target = Target(1.0, higher_is_better=True)
        for check, metric, unit in ((RAND, f"4 KiB random read, {setup.label}", "IOPS"),
                                    (SEQ, f"sequential read, 64 KiB requests, {setup.label}", "MiB/s")):
            def pick(bench: GuestBench, unit: str = unit) -> float:
                return bench.ops_per_second if unit == "IOPS" else bench.mib_per_second

            subject = Series("kvmlet", [pick(r[check]) for r in kvmlet_runs])
            baseline = Series("qemu", [pick(r[check]) for r in qemu_runs]) if qemu_runs else None
            depths = sorted({r[check].info.get("depth", "?") for r in kvmlet_runs + (qemu_runs or [])})
            first = kvmlet_runs[0][check]
            amount = (f"{first.ops} x 4 KiB" if check == RAND
                      else f"{first.bytes // MiB} MiB in {first.info.get('req', '?')}-byte requests")
            note = f"{amount} per run, {sizes.blk_image_mib} MiB image, guest depth {'/'.join(depths)}"
            if setup.direct:
                note += "; kvmlet direct=on, QEMU cache=none,aio=threads"
            result.rows.append(paired_row(NAME, metric, unit, subject, baseline, target=target, note=note))
        per_setup[setup.label] = {
            "cmdline": setup.cmdline, "argv": {c.side: c.argv for c in contenders},
            "runs": {c.side: [{check: vars(bench) for check, bench in r.items()} for r in side_runs]
                     for c, side_runs in zip(contenders, runs, strict=True)}}
    image.unlink(missing_ok=True)
    result.details = {"image_mib": sizes.blk_image_mib, "setups": per_setup}
    if ctx.qemu is None:
        result.skipped.append("QEMU half: qemu-system-x86_64 not found")
    return result
