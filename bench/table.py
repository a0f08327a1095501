"""The results table: median [min-max] for each side, the median of the pairwise ratios, the target."""

from __future__ import annotations

from bench.model import Row, Series


def number(value: float) -> str:
    magnitude = abs(value)
    if magnitude >= 10000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def cell(series: Series | None) -> str:
    if series is None or not series.values:
        return "-"
    if len(series.values) == 1:
        return f"{series.side} {number(series.median)}"
    return f"{series.side} {number(series.median)} [{number(series.minimum)}-{number(series.maximum)}]"


def ratio_cell(row: Row) -> str:
    ratio = row.ratio_median
    return "-" if ratio is None else f"{ratio:.2f}x"


def target_cell(row: Row) -> str:
    if row.target is None:
        return row.reference
    met = row.target.met(row)
    verdict = "" if met is None else (" met" if met else " MISSED")
    text = f"{row.target.describe(row.unit)}{verdict}"
    return f"{text} ({row.reference})" if row.reference else text


HEADER = ("benchmark", "metric", "unit", "A: median [min-max]", "B: median [min-max]", "A/B (pairs)", "target")


def table_rows(rows: list[Row]) -> list[tuple[str, ...]]:
    return [(row.benchmark, row.metric, row.unit, cell(row.subject), cell(row.baseline), ratio_cell(row),
             target_cell(row)) for row in rows]


def render_text(rows: list[Row]) -> str:
    lines = [HEADER, *table_rows(rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADER))]
    out = []
    for index, line in enumerate(lines):
        out.append("  ".join(text.ljust(width) for text, width in zip(line, widths, strict=True)).rstrip())
        if index == 0:
            out.append("  ".join("-" * width for width in widths))
    return "\n".join(out)


def render_markdown(rows: list[Row]) -> str:
    out = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for line in table_rows(rows):
        cells = [text.replace("|", "\\|").strip() for text in line]
        if line[1].startswith("  "):
            cells[1] = "&nbsp;&nbsp;" + cells[1]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)
