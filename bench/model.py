"""What a benchmark produces: rows of samples for kvmlet and its baseline, with the pairwise ratios."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Series:
    """Repeated measurements of one quantity on one side (kvmlet, QEMU or the host)."""

    side: str
    values: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def minimum(self) -> float:
        return min(self.values)

    @property
    def maximum(self) -> float:
        return max(self.values)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"side": self.side, "values": self.values}
        if self.values:
            out |= {"median": self.median, "min": self.minimum, "max": self.maximum}
        return out


@dataclass(frozen=True)
class Target:
    """What the issue asks for: a ratio to the baseline or an absolute value, at most (or at least) this."""

    limit: float
    on: str = "ratio"          # "ratio" (median of pairwise ratios) or "value" (kvmlet's median)
    higher_is_better: bool = False

    def describe(self, unit: str) -> str:
        sign = ">=" if self.higher_is_better else "<="
        return f"{sign}{self.limit:g}x" if self.on == "ratio" else f"{sign}{self.limit:g} {unit}"

    def met(self, row: Row) -> bool | None:
        value = row.ratio_median if self.on == "ratio" else (row.subject.median if row.subject.values else None)
        if value is None:
            return None
        return value >= self.limit if self.higher_is_better else value <= self.limit


@dataclass
class Row:
    """One line of the results table: kvmlet's samples, the baseline's and their ratios pair by pair."""

    benchmark: str
    metric: str
    unit: str
    subject: Series
    baseline: Series | None = None
    ratios: list[float] = field(default_factory=list)
    target: Target | None = None
    reference: str = ""        # a published figure to compare with, e.g. "Hyperlight: 1-2 ms"
    note: str = ""

    @property
    def ratio_median(self) -> float | None:
        return statistics.median(self.ratios) if self.ratios else None

    def to_json(self) -> dict[str, Any]:
        return {
            "benchmark": self.benchmark, "metric": self.metric, "unit": self.unit,
            "kvmlet": self.subject.to_json(),
            "baseline": self.baseline.to_json() if self.baseline is not None else None,
            "ratios": self.ratios, "ratio_median": self.ratio_median,
            "target": self.target.describe(self.unit) if self.target else None,
            "target_met": self.target.met(self) if self.target else None,
            "reference": self.reference, "note": self.note,
        }


@dataclass
class BenchResult:
    """Everything one benchmark measured: table rows plus free-form details for the JSON file."""

    name: str
    rows: list[Row] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)   # halves that did not run, with the reason

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "rows": [row.to_json() for row in self.rows], "details": self.details,
                "skipped": self.skipped}


def paired_row(benchmark: str, metric: str, unit: str, subject: Series, baseline: Series | None,
                **extra: Any) -> Row:
    """A row whose ratios are subject/baseline taken pair by pair (same index = same pair)."""
    ratios: list[float] = []
    if baseline is not None and baseline.values:
        ratios = [a / b for a, b in zip(subject.values, baseline.values, strict=True) if b]
    return Row(benchmark, metric, unit, subject, baseline, ratios, **extra)
