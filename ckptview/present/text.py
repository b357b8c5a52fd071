"""Plain-text rendering shared by the CLI and the notebook views: sizes, counts, aligned tables."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ckptview.errors import printable


def human_bytes(nbytes: float) -> str:
    """1536 -> '1.5 KiB'."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_count(count: float) -> str:
    """11_689_512 -> '11.7M'."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(count) >= scale:
            return f"{count / scale:.1f}{unit}"
    return f"{count:,.0f}" if isinstance(count, int) or float(count).is_integer() else f"{count:.3g}"


def shape_text(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def text_table(rows: Sequence[Sequence[Any]], headers: Sequence[str], *, align_right: Sequence[int] = ()) -> str:
    """An aligned plain-text table; columns listed in `align_right` (indices) are right-aligned."""
    # cells hold names from files: escaped, so a name cannot move the cursor or add lines
    cells = [[printable(c) for c in headers]] + [[printable(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for number, row in enumerate(cells):
        parts = [cell.rjust(widths[i]) if i in align_right else cell.ljust(widths[i]) for i, cell in enumerate(row)]
        lines.append("  ".join(parts).rstrip())
        if number == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
