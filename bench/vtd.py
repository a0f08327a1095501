"""VT-d: virtio-blk over virtio-pci with DMA translation off and on (IOTLB hits and misses counted), virtio-mmio
for reference, QEMU side by side.

Every contender boots the same guest with the same image (in the host page cache) and runs the guest's
``virtio-blk-bench`` (4 KiB random reads, depth 1) and ``virtio-blk-seqbench`` (64 KiB sequential reads), polled
at CPL3:

* kvmlet virtio-mmio (``--drive path=IMG``), the reference: what kvmlet's default transport does;
* kvmlet virtio-pci, no IOMMU (``--drive path=IMG,transport=pci``);
* kvmlet virtio-pci behind the VT-d unit, translation never enabled (``--iommu vtd``: the device's DMA address
  space passes addresses through);
* kvmlet virtio-pci behind the VT-d unit, translation on: the guest's ``vtd-on`` first (3-level tables, the DMA
  pool mapped with 4 KiB pages at I/O virtual addresses 64 GiB up, queued invalidation); ``--stats`` gives the
  unit's counters: window hits (accesses the device's address space served from a translation it kept),
  IOTLB hits and misses, page walks;
* QEMU (``-M q35``) with ``virtio-blk-pci,disable-legacy=on`` and, for translation on, ``-device
  intel-iommu,intremap=off`` and ``iommu_platform=on`` (the same guest and ``vtd-on``).

Rows pair kvmlet with QEMU in the same configuration; the pass-through row pairs kvmlet with its own virtio-pci
without an IOMMU (the cost of the DMA address space when it translates nothing).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from bench.console import BenchError, ConsoleProcess
from bench.context import Context, alternate
from bench.guest_bench import GuestBench, timed_bench
from bench.model import BenchResult, Series, paired_row
from bench.virtio_blk import cache_image, make_image
from bench.vmms import Launch, kvmlet_launch, qemu_launch

NAME = "vtd"
GUEST_MEMORY_MIB = 128
MiB = 1 << 20
RAND, SEQ = "blk-randread", "blk-seqread"
TIMEOUT = 300.0
VTD_GUEST = "kvmlet.vtd_levels=3"          # 39-bit tables: what QEMU's intel-iommu offers by default
QEMU_Q35 = "q35"
QEMU_PCI_ARGS = ("-nic", "none")
CONFIGS = ("mmio", "pci", "vtd-off", "vtd")


def cmdline(config: str, ops: int, seq_mib: int) -> str:
    checks = "virtio-blk-bench,virtio-blk-seqbench"
    transport = "" if config == "mmio" else " kvmlet.virtio=pci"
    if config == "vtd":
        checks = "vtd-on," + checks
        transport += f" {VTD_GUEST}"
    return (f"console=ttyS0 kvmlet.test={checks} kvmlet.loops={ops} kvmlet.bench_mib={seq_mib} kvmlet.bench_depth=1 "
            f"kvmlet.timeout=60{transport}")


def launches(ctx: Context, image: Path, ops: int, seq_mib: int) -> dict[str, Launch]:
    out: dict[str, Launch] = {}
    for config in CONFIGS:
        drive = f"path={image}" + ("" if config == "mmio" else ",transport=pci")
        extra: tuple[str, ...] = ("--drive", drive)
        if config.startswith("vtd"):
            extra = ("--iommu", "vtd", "--stats", *extra)
        out[f"kvmlet-{config}"] = kvmlet_launch(ctx.guest, cmdline(config, ops, seq_mib), GUEST_MEMORY_MIB,
                                                python_flags=ctx.python_flags, extra_args=extra,
                                                side=f"kvmlet-{config}")
    if ctx.qemu is not None:
        qemu_drive = ("-drive", f"id=d0,file={image},format=raw,if=none,cache=writeback,aio=threads")
        plain = "virtio-blk-pci,drive=d0,disable-legacy=on"
        out["qemu-pci"] = qemu_launch(ctx.qemu, ctx.guest, cmdline("pci", ops, seq_mib), GUEST_MEMORY_MIB,
                                      side="qemu-pci", machine=QEMU_Q35,
                                      extra_args=(*QEMU_PCI_ARGS, *qemu_drive, "-device", plain))
        out["qemu-vtd"] = qemu_launch(ctx.qemu, ctx.guest, cmdline("vtd", ops, seq_mib), GUEST_MEMORY_MIB,
                                      side="qemu-vtd", machine=QEMU_Q35, extra_args=(
                                          *QEMU_PCI_ARGS, "-device", "intel-iommu,intremap=off", *qemu_drive,
                                          "-device", "virtio-blk-pci,drive=d0,disable-legacy=on,iommu_platform=on"))
    return out


def vtd_counters(stderr: str) -> dict[str, int]:
    line = re.search(r"^vtd: (.*)$", stderr, re.MULTILINE)
    if line is None:
        return {}
    return {key: int(value) for key, value in re.findall(r"(\w+)=(\d+)", line.group(1))}


def one_run(launch: Launch, image: Path) -> dict[str, Any]:
    cache_image(image)
    expected = 3 if "vtd-on" in " ".join(launch.argv) else 2
    with ConsoleProcess(launch) as vmm:
        rand, offset = timed_bench(vmm, RAND, TIMEOUT, 0, b"BLK bench")
        seq, _ = timed_bench(vmm, SEQ, TIMEOUT, offset, b"BLK bench")
        vmm.check_exit(60)
        if f"TESTS DONE {expected} 0".encode() not in vmm.output():
            raise BenchError(f"{launch.side}: the block benchmarks did not pass: {vmm.text()[-400:]!r}")
        return {RAND: rand, SEQ: seq, "vtd": vtd_counters(vmm.stderr_text())}


def run(ctx: Context) -> BenchResult:
    sizes = ctx.sizes
    result = BenchResult(NAME)
    ops, seq_mib = max(sizes.blk_ops // 4, 100), max(sizes.blk_seq_mib // 4, 4)
    image = ctx.work_dir / "vtd-bench.img"
    image_mib = max(sizes.blk_image_mib // 2, 4)
    ctx.log(f"vtd: creating a {image_mib} MiB image in {ctx.work_dir}")
    make_image(image, image_mib)
    contenders = launches(ctx, image, ops, seq_mib)
    order = list(contenders.values())

    def progress(n: int, round_order: list[Launch]) -> None:
        ctx.log(f"vtd round {n}: {', '.join(c.side for c in round_order)}")

    measured = alternate(order, sizes.rounds, sizes.warmup, lambda launch: one_run(launch, image), progress)
    runs = {launch.side: side_runs for launch, side_runs in zip(order, measured, strict=True)}

    def series(side: str, check: str) -> Series | None:
        if side not in runs:
            return None
        picked: list[GuestBench] = [r[check] for r in runs[side]]
        return Series(side, [b.ops_per_second if check == RAND else b.mib_per_second for b in picked])

    pairs = (("virtio-pci, VT-d translation on", "kvmlet-vtd", "qemu-vtd"),
             ("virtio-pci, no IOMMU", "kvmlet-pci", "qemu-pci"),
             ("virtio-pci, VT-d present, translation off (vs kvmlet virtio-pci)", "kvmlet-vtd-off", "kvmlet-pci"),
             ("virtio-pci, VT-d translation on (vs kvmlet virtio-pci)", "kvmlet-vtd", "kvmlet-pci"),
             ("virtio-mmio, kvmlet's default (reference)", "kvmlet-mmio", None))
    for check, what, unit in ((RAND, "4 KiB random read, depth 1", "IOPS"),
                              (SEQ, "sequential read, 64 KiB requests", "MiB/s")):
        for label, subject, baseline in pairs:
            subject_series = series(subject, check)
            if subject_series is None:
                continue
            baseline_series = series(baseline, check) if baseline is not None else None
            first = runs[subject][0][check]
            amount = f"{first.ops} x 4 KiB" if check == RAND else f"{first.bytes // MiB} MiB"
            result.rows.append(paired_row(NAME, f"{what}: {label}", unit, subject_series, baseline_series,
                                          note=f"{amount} per run, {image_mib} MiB image"))
    counters = [r["vtd"] for r in runs["kvmlet-vtd"]]
    if counters and all(counters):
        for key in ("window_hits", "iotlb_hits", "iotlb_misses", "translations", "context_misses"):
            result.rows.append(paired_row(NAME, f"VT-d {key.replace('_', ' ')} per run (both loops)", "count",
                                          Series("kvmlet-vtd", [float(c.get(key, 0)) for c in counters]), None,
                                          note="the unit's counters, from kvmlet run --stats"))
    image.unlink(missing_ok=True)
    result.details = {"ops": ops, "seq_mib": seq_mib, "image_mib": image_mib,
                      "argv": {launch.side: launch.argv for launch in order},
                      "vtd_counters": counters}
    if ctx.qemu is None:
        result.skipped.append("QEMU half: qemu-system-x86_64 not found")
    return result
