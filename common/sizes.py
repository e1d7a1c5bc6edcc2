"""Byte sizes as people write them: `800KB`, `20GB`, `1.5TiB` (decimal and binary units), and back.

`--cache-limit` takes one; a value without a unit, or with an unknown one, is refused with one line that
shows the forms accepted rather than guessed at (is `20G` 20 GB or 20 GiB? both are written out).
"""

from __future__ import annotations

import math
import re

from .errors import UsageError

# Decimal units (SI, powers of 1000) and binary ones (IEC, powers of 1024), by their lower-case spelling.
UNITS = {
    "b": 1,
    **{f"{p}b": 1000 ** (i + 1) for i, p in enumerate("kmgtpe")},
    **{f"{p}ib": 1024 ** (i + 1) for i, p in enumerate("kmgtpe")},
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]+)\s*")


class SizeError(UsageError):
    """A size that cannot be read; `str()` names the value and the forms accepted."""


def parse_size(text: str, *, what: str = "size") -> int:
    """Bytes of `text`: a number and a unit, `800KB`, `20GB`, `1.5TiB`, `4096B` (units in any case; KB = 1000
    bytes, KiB = 1024). Fractions of a byte are rounded down. SizeError (one line, naming `what`) otherwise."""
    match = _SIZE.fullmatch(str(text))
    unit = match and UNITS.get(match.group(2).lower())
    if not unit:
        raise SizeError(
            f"{what} {text!r}: not a size; write a number and a unit: B, KB, MB, GB, TB (powers of 1000) or "
            "KiB, MiB, GiB, TiB (powers of 1024), e.g. 800KB, 20GB, 1.5TiB"
        )
    return math.floor(float(match.group(1)) * unit)


def format_size(n: int) -> str:
    """`n` bytes in the largest decimal unit that keeps it at least 1, to three significant figures
    (`3.28 MB`); what `parse_size` reads back to within the rounding."""
    for unit in ("EB", "PB", "TB", "GB", "MB", "KB"):
        if n >= UNITS[unit.lower()]:
            return f"{n / UNITS[unit.lower()]:.3g} {unit}"
    return f"{n} B"
