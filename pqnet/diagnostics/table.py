"""Tables of result rows: plain text for the terminal (:func:`format_table`) and GitHub
markdown for reports (:func:`markdown_table`). The one home of pqnet's table formatting."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def _numeric(rows: Sequence[dict], column: str) -> bool:
    """Whether ``column`` holds a number (or nothing) in every row: right-aligned."""
    return all(isinstance(r.get(column), (int, float, np.number)) or r.get(column) is None
               for r in rows)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.4g}"
    return "" if value is None else str(value)


def format_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """``rows`` as an aligned text table with a header of ``columns``; text to the left,
    numbers to the right, floats with four decimals."""
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    numeric = [all(isinstance(row.get(c), (int, float)) for row in rows) for c in columns]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(values, widths, numeric, strict=True)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(columns), rule, *(line(r) for r in cells)])


def _markdown_cell(value: object, fmt: str | None) -> str:
    if value is None:
        return ""
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return "–"
        if fmt:
            return format(value, fmt)
        return f"{value:.4f}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return format(value, fmt or ",")
    return str(value).replace("|", "\\|")


def markdown_table(rows: Sequence[dict], columns: Sequence[str],
                   formats: dict[str, str] | None = None) -> str:
    """``rows`` as a GitHub-flavoured markdown table with the header ``columns``: numbers
    right-aligned (floats with 4 decimals unless ``formats[column]`` gives a format spec),
    text left-aligned, ``nan`` as a dash."""
    formats = formats or {}
    numeric = [_numeric(rows, c) for c in columns]
    lines = ["| " + " | ".join(columns) + " |",
             "|" + "|".join("---:" if num else ":---" for num in numeric) + "|"]
    lines += ["| " + " | ".join(_markdown_cell(r.get(c), formats.get(c)) for c in columns)
              + " |" for r in rows]
    return "\n".join(lines)
