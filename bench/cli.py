"""``python -m bench`` / ``kvmlet bench``: run the benchmarks, print the table, write JSON, draw plots."""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from bench import migration, snapshot, tools
from bench.console import BenchError
from bench.context import Context, Sizes
from bench.model import BenchResult, Row, Series, Target
from bench.registry import BENCHMARKS, Benchmark
from bench.table import render_markdown, render_text
from bench.vmms import REPO, kvmlet_env

RESULTS_DIR = REPO / "bench" / "results"
# The snapshot benchmark takes its own sizes (--snapshot-*): registered here, bound to them in main().
BENCHMARKS.setdefault(snapshot.NAME, Benchmark(snapshot.NAME, snapshot.SUMMARY, snapshot.run))
BENCHMARKS.setdefault(migration.NAME, Benchmark(migration.NAME, migration.SUMMARY, migration.run))
PLOT_DIR = REPO / "docs" / "performance"


def build_parser() -> argparse.ArgumentParser:
    names = ", ".join(BENCHMARKS)
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="kvmlet's benchmarks, side by side with QEMU (microvm, PVH) on this host. "
                    f"Benchmarks: {names}. Nothing is installed: missing tools are named with how to get them.")
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"benchmarks to run (default: all): {names}")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument("--tiny", action="store_true", help="run each benchmark once at tiny sizes (smoke test)")
    parser.add_argument("--rounds", type=int, help="measured kvmlet/QEMU pairs per benchmark (default 5)")
    parser.add_argument("--cold-rounds", type=int, help="pairs for cold start (default 10)")
    parser.add_argument("--warmup", type=int, help="warm-up rounds, discarded (default 1)")
    parser.add_argument("--exit-loops", type=int, help="port and MMIO writes per exits run (default 50000)")
    parser.add_argument("--vm-count", type=int, help="VMs created by vm-create (default 100)")
    parser.add_argument("--density-cap", type=int, help="most VMs per side in density (default 32)")
    parser.add_argument("--density-rounds", type=int, help="density runs per side (default 5)")
    parser.add_argument("--compute-loops", type=int, help="iterations of the compute loop (default 1e9)")
    parser.add_argument("--blk-ops", type=int, help="random 4 KiB reads per blk run (default 20000)")
    parser.add_argument("--blk-seq-mib", type=int, help="MiB read sequentially per blk run (default 512)")
    parser.add_argument("--blk-image-mib", type=int, help="size of the blk image (default 256)")
    parser.add_argument("--blk-direct-ops", type=int,
                        help="random reads per blk run with O_DIRECT (default 10000; 0: no direct I/O rows)")
    parser.add_argument("--net-frames", type=int, help="UDP frames the guest sends per net run (default 100000)")
    parser.add_argument("--snapshot-mib", type=_mib_list,
                        help="guest sizes of the snapshot benchmark, MiB, comma-separated (default 128,1024,4096)")
    parser.add_argument("--snapshot-touch-mib", type=int,
                        help="MiB the guest writes before its snapshot and after its restore (default 64)")
    parser.add_argument("--snapshot-rounds", type=int, help="kvmlet/QEMU pairs per snapshot size (default --rounds)")
    parser.add_argument("--migration-mib", type=int, help="guest size of the migration benchmark, MiB (default 512)")
    parser.add_argument("--migration-rates", type=_rate_list,
                        help="dirtied pages/s of the migration benchmark, comma-separated, 0 for idle "
                             "(default 0,5000,20000)")
    parser.add_argument("--migration-rounds", type=int, help="kvmlet/QEMU pairs per migration case (default 3)")
    parser.add_argument("--no-qemu", action="store_true", help="run only kvmlet's half")
    parser.add_argument("--python-flags", default="",
                        help="interpreter flags for kvmlet's processes, e.g. '-S' (default: none)")
    parser.add_argument("--json", type=Path, help=f"results file (default: {RESULTS_DIR}/results-DATE.json)")
    parser.add_argument("--from-json", type=Path, help="print (and plot) a results file instead of running")
    parser.add_argument("--plot", action="store_true", help="draw PNG plots (matplotlib) into --plot-dir")
    parser.add_argument("--plot-dir", type=Path, default=PLOT_DIR, help=f"where plots go (default {PLOT_DIR})")
    parser.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    return parser


def sizes_from(args: argparse.Namespace) -> Sizes:
    sizes = Sizes.tiny() if args.tiny else Sizes()
    for option, attribute in (("rounds", "rounds"), ("cold_rounds", "cold_rounds"), ("warmup", "warmup"),
                              ("exit_loops", "exit_loops"), ("vm_count", "vm_count"),
                              ("density_cap", "density_cap"), ("density_rounds", "density_rounds"),
                              ("compute_loops", "compute_loops"), ("blk_ops", "blk_ops"),
                              ("blk_seq_mib", "blk_seq_mib"), ("blk_image_mib", "blk_image_mib"),
                              ("blk_direct_ops", "blk_direct_ops"), ("net_frames", "net_frames")):
        value = getattr(args, option)
        if value is not None:
            setattr(sizes, attribute, value)
    return sizes


def _rate_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected pages/s, comma-separated (e.g. 0,5000)") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected pages/s (0 or more), comma-separated")
    return values


def _mib_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected MiB, comma-separated (e.g. 128,1024)") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive MiB, comma-separated")
    return values


def snapshot_sizes_from(args: argparse.Namespace, sizes: Sizes) -> snapshot.SnapshotSizes:
    out = snapshot.SnapshotSizes.tiny() if args.tiny else snapshot.SnapshotSizes.following(sizes)
    for option, attribute in (("snapshot_mib", "guest_mib"), ("snapshot_touch_mib", "touch_mib"),
                              ("snapshot_rounds", "rounds")):
        value = getattr(args, option)
        if value is not None:
            setattr(out, attribute, value)
    if args.warmup is not None:
        out.warmup = args.warmup
    return out


def migration_sizes_from(args: argparse.Namespace, sizes: Sizes) -> migration.MigrationSizes:
    out = migration.MigrationSizes.tiny() if args.tiny else migration.MigrationSizes.following(sizes)
    if args.migration_mib is not None:
        out.guest_mib = args.migration_mib
    if args.migration_rates is not None:
        out.rates = args.migration_rates
    if args.migration_rounds is not None:
        out.rounds = args.migration_rounds
    if args.warmup is not None and not args.tiny:
        out.warmup = args.warmup
    return out


def host_report() -> dict[str, Any]:
    """`kvmlet host --json`, or what went wrong."""
    done = subprocess.run([sys.executable, "-m", "kvmlet", "host", "--json"], cwd=REPO, env=kvmlet_env(),
                          capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        return {"error": done.stderr.strip()[-400:]}
    try:
        parsed: dict[str, Any] = json.loads(done.stdout)
    except json.JSONDecodeError:
        return {"error": "kvmlet host --json printed no JSON"}
    return parsed


def _row_from_json(data: dict[str, Any]) -> Row:
    def series(entry: dict[str, Any] | None) -> Series | None:
        return Series(entry["side"], entry["values"]) if entry else None

    target = None
    if data.get("target"):
        text: str = data["target"]
        higher = text.startswith(">=")
        limit_text = text[2:].split()[0].rstrip("x")
        target = Target(float(limit_text), "ratio" if text.split()[0].endswith("x") else "value", higher)
    subject = series(data["kvmlet"])
    assert subject is not None
    return Row(data["benchmark"], data["metric"], data["unit"], subject, series(data["baseline"]),
               data["ratios"], target, data.get("reference", ""), data.get("note", ""))


def load_results(path: Path) -> tuple[dict[str, Any], list[BenchResult]]:
    data = json.loads(path.read_text())
    results = [BenchResult(entry["name"], [_row_from_json(row) for row in entry["rows"]], entry["details"],
                           entry.get("skipped", [])) for entry in data["results"]]
    return data, results


def report(results: list[BenchResult], args: argparse.Namespace) -> None:
    rows = [row for result in results for row in result.rows]
    print(render_text(rows))
    notes = [f"{row.benchmark} / {row.metric.strip()}: {row.note}" for row in rows if row.note]
    if notes:
        print("\nnotes:\n  " + "\n  ".join(notes))
    skipped = [f"{result.name}: {reason}" for result in results for reason in result.skipped]
    if skipped:
        print("\nskipped:\n  " + "\n  ".join(skipped))
    if args.markdown:
        print("\n" + render_markdown(rows))
    if args.plot:
        if not tools.have_matplotlib():
            print(f"bench: {tools.MATPLOTLIB_HINT}", file=sys.stderr)
            return
        from bench.plot import plot_all

        for path in plot_all(results, args.plot_dir):
            print(f"plot: {path}", file=sys.stderr)


def run_benchmarks(names: list[str], ctx: Context,
                   runners: Mapping[str, Callable[[Context], BenchResult]] | None = None,
                   ) -> tuple[list[BenchResult], list[str]]:
    """Run the benchmarks named; ``runners`` replaces a benchmark's ``run`` (one bound to its own sizes)."""
    results: list[BenchResult] = []
    errors: list[str] = []
    for name in names:
        ctx.log(f"== {name}: {BENCHMARKS[name].summary}")
        started = time.monotonic()
        run = (runners or {}).get(name, BENCHMARKS[name].run)
        try:
            result = run(ctx)
        except (BenchError, OSError, subprocess.SubprocessError) as exc:
            errors.append(f"{name}: {exc}")
            print(f"bench: {name} failed: {exc}", file=sys.stderr)
            continue
        result.details["seconds"] = round(time.monotonic() - started, 1)
        results.append(result)
    return results, errors


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list:
        for benchmark in BENCHMARKS.values():
            print(f"{benchmark.name:<11} {benchmark.summary}")
        return 0
    if args.from_json is not None:
        _, results = load_results(args.from_json)
        report(results, args)
        return 0
    unknown = [name for name in args.names if name not in BENCHMARKS and name != "all"]
    if unknown:
        print(f"bench: unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}",
              file=sys.stderr)
        return 2
    names = [n for n in BENCHMARKS if n in args.names] if args.names and "all" not in args.names \
        else list(BENCHMARKS)
    problem = tools.kvm_problem()
    if problem is not None:
        print(f"bench: {problem}", file=sys.stderr)
        return 2
    if args.plot and not tools.have_matplotlib():
        print(f"bench: {tools.MATPLOTLIB_HINT}", file=sys.stderr)
        return 2
    qemu, gcc = tools.find_qemu(), tools.find_gcc()
    missing = [tool.missing_message for tool in (qemu, gcc) if tool.path is None]
    if args.no_qemu:
        missing.append("QEMU: --no-qemu given; only kvmlet's half runs")
    for message in missing:
        print(f"bench: {message}", file=sys.stderr)

    from kvmlet.guest_image import GuestBuildError, builtin_guest

    try:
        guest = builtin_guest()
    except GuestBuildError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    sizes = sizes_from(args)
    snapshot_sizes = snapshot_sizes_from(args, sizes)
    migration_sizes = migration_sizes_from(args, sizes)
    started = datetime.datetime.now(datetime.UTC)
    with tempfile.TemporaryDirectory(prefix="kvmlet-bench-") as work:
        ctx = Context(sizes, guest, None if args.no_qemu else qemu.path, gcc.path, Path(work),
                      tuple(args.python_flags.split()), verbose=not args.quiet, missing=missing)
        results, errors = run_benchmarks(
            names, ctx, {snapshot.NAME: functools.partial(snapshot.run, sizes=snapshot_sizes),
                         migration.NAME: functools.partial(migration.run, sizes=migration_sizes)})
    output = {
        "date": started.isoformat(timespec="seconds"),
        "argv": sys.argv if argv is None else ["python", "-m", "bench", *argv],
        "python": sys.version.split()[0], "python_flags": args.python_flags,
        "qemu": ctx.qemu, "missing": missing, "errors": errors,
        "sizes": {**sizes.to_json(), "snapshot": snapshot_sizes.to_json(), "migration": migration_sizes.to_json()},
        "host": host_report(), "loadavg": os.getloadavg(),
        "results": [result.to_json() for result in results],
    }
    path = args.json or RESULTS_DIR / f"results-{started.strftime('%Y%m%dT%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(output, indent=1) + "\n")
    print()
    report(results, args)
    print(f"\nresults: {path}")
    for message in missing:
        print(f"missing: {message}")
    return 1 if errors else 0
