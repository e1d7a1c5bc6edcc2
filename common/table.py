"""Fixed-width text tables for the command-line tools' reports (benchmarks, build summaries)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

_SPEC = re.compile(r"(?P<align>[<>^])?(?P<width>\d+)?(?P<rest>.*)")


def format_table(
    columns: Sequence[tuple[str, str]],
    rows: Iterable[Sequence[object]],
    *,
    indent: str = "  ",
    sep: str = " ",
    header: bool = True,
) -> list[str]:
    """The lines of a table: a header line (unless `header=False`), then one line per row.

    `columns` are (name, spec) pairs; a spec is a format spec such as "<12", ">10.1f" or ">10,.0f":
    alignment (default right), a minimum width (the column grows to its name and widest cell), then
    how a value is formatted. String cells (e.g. "-" for a missing value) are only aligned. Trailing
    spaces are stripped.
    """
    parts = [_SPEC.fullmatch(spec) for _, spec in columns]
    cells = [
        [value if isinstance(value, str) else format(value, part["rest"]) for value, part in zip(row, parts)]
        for row in rows
    ]
    widths = [
        max([int(part["width"] or 0), len(name) if header else 0] + [len(row[i]) for row in cells])
        for i, ((name, _), part) in enumerate(zip(columns, parts))
    ]
    aligns = [part["align"] or ">" for part in parts]
    lines = ([[name for name, _ in columns]] if header else []) + cells
    return [
        (indent + sep.join(f"{cell:{align}{width}}" for cell, align, width in zip(line, aligns, widths))).rstrip()
        for line in lines
    ]
