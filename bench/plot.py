"""--plot: draw the results to PNG files with matplotlib (for docs/performance.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.model import BenchResult, Row


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_ratios(rows: list[Row], path: Path) -> None:
    plt = _pyplot()
    compared = [row for row in rows if row.ratio_median is not None]
    fig, ax = plt.subplots(figsize=(11, 0.45 * len(compared) + 1.6))
    labels = [f"{row.benchmark}: {row.metric.strip()} ({row.subject.side}/{row.baseline.side})"
              for row in compared if row.baseline is not None]
    values = [row.ratio_median or 0.0 for row in compared]
    errors = [[v - min(row.ratios) for v, row in zip(values, compared, strict=True)],
              [max(row.ratios) - v for v, row in zip(values, compared, strict=True)]]
    colours = []
    for row in compared:
        met = row.target.met(row) if row.target is not None else None
        colours.append("tab:gray" if met is None else ("tab:green" if met else "tab:red"))
    positions = list(range(len(compared)))
    ax.barh(positions, values, xerr=errors, color=colours, capsize=3)
    for position, row in zip(positions, compared, strict=True):
        if row.target is not None and row.target.on == "ratio":
            ax.plot([row.target.limit] * 2, [position - 0.4, position + 0.4], color="black", linewidth=2)
    ax.axvline(1.0, color="gray", linestyle=":", linewidth=1)
    ax.set_yticks(positions, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("A/B, median of the pairwise ratios (whiskers: min-max)")
    ax.set_title("black tick: target; green: met, red: missed, grey: no target", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


STEP_PREFIX = "step: "


def plot_steps(result: BenchResult, path: Path) -> bool:
    """kvmlet's boot-timer steps as one stacked bar, with QEMU's first byte and exit for scale."""
    steps = [row for row in result.rows if row.metric.strip().startswith(STEP_PREFIX) and row.subject.values]
    if not steps:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(11, 3.2))
    left = 0.0
    colours = plt.get_cmap("tab20").colors
    for index, row in enumerate(steps):
        width = row.subject.median
        label = row.metric.strip()[len(STEP_PREFIX):]
        ax.barh([0], [width], left=left, color=colours[index % len(colours)], label=f"{label} ({width:.1f} ms)")
        left += width
    for row in result.rows:
        if row.baseline is not None and row.baseline.values and row.subject.side == "kvmlet":
            what = row.metric.split(",")[0]
            ax.axvline(row.baseline.median, color="black", linestyle="--", linewidth=1)
            ax.text(row.baseline.median, 0.5, f" QEMU: {what}\n {row.baseline.median:.0f} ms", fontsize=7,
                    va="bottom")
            if what == "guest exit":  # kvmlet's process exit, as measured from outside
                ax.axvline(row.subject.median, color="tab:blue", linestyle=":", linewidth=1)
                ax.text(row.subject.median, -0.45, f" kvmlet: process gone\n {row.subject.median:.0f} ms",
                        fontsize=7, va="bottom")
    ax.set_yticks([])
    ax.set_ylim(-0.5, 1.0)
    ax.set_xlabel("ms since the process was spawned (medians; the steps end where the guest wrote its exit)")
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.3), frameon=False)
    ax.set_title("kvmlet run --boot-timer: where cold start goes (64-bit entry)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_benchmark(result: BenchResult, path: Path) -> bool:
    """One panel per row (boot-timer steps excluded): each side's median with its min-max range."""
    rows = [row for row in result.rows
            if row.subject.values and not row.metric.strip().startswith(STEP_PREFIX)]
    if not rows:
        return False
    plt = _pyplot()
    columns = min(3, len(rows))
    lines = (len(rows) + columns - 1) // columns
    fig, axes = plt.subplots(lines, columns, figsize=(4.2 * columns, 2.8 * lines), squeeze=False)
    for ax, row in zip([a for line in axes for a in line], rows, strict=False):
        sides = [s for s in (row.subject, row.baseline) if s is not None and s.values]
        medians = [s.median for s in sides]
        errors = [[m - s.minimum for m, s in zip(medians, sides, strict=True)],
                  [s.maximum - m for m, s in zip(medians, sides, strict=True)]]
        ax.bar([s.side for s in sides], medians, yerr=errors, capsize=4,
               color=["tab:blue", "tab:orange", "tab:gray"][:len(sides)])
        ax.set_title(row.metric.strip(), fontsize=8)
        ax.set_ylabel(row.unit)
    for ax in [a for line in axes for a in line][len(rows):]:
        ax.axis("off")
    fig.suptitle(result.name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_all(results: list[BenchResult], directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    rows = [row for result in results for row in result.rows]
    if any(row.ratio_median is not None for row in rows):
        path = directory / "ratios.png"
        plot_ratios(rows, path)
        written.append(path)
    for result in results:
        path = directory / f"{result.name}.png"
        if plot_benchmark(result, path):
            written.append(path)
        path = directory / f"{result.name}-steps.png"
        if plot_steps(result, path):
            written.append(path)
    return written
