"""Plain-text rendering shared by the CLI and the notebook views: sizes, counts, aligned tables."""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from itertools import repeat
from typing import Any

from ckptview.errors import printable


def not_compared_text(keys: Sequence[str], shown: int = 5) -> str:
    """The clause naming tensors a value diff left out (`ValueDiff.unreadable`), or ""."""
    if not keys:
        return ""
    names = ", ".join(printable(key) for key in keys[:shown]) + (" ..." if len(keys) > shown else "")
    return f"; {len(keys):,} not compared (no values to compare as real numbers): {names}"


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


# A cell longer than this is shortened in its middle: one 5,000-character tensor name (a crafted file)
# made every row of the table 5,000 columns wide. `--json` keeps every name whole.
CELL_LIMIT = 160


def display_width(text: str) -> int:
    """How many terminal cells `text` takes: two for a wide (CJK) character, none for a combining mark."""
    return sum(0 if unicodedata.combining(char) else 2 if unicodedata.east_asian_width(char) in "WF" else 1
               for char in text)


def text_table(rows: Sequence[Sequence[Any]], headers: Sequence[str], *, align_right: Sequence[int] = ()) -> str:
    """An aligned plain-text table; columns listed in `align_right` (indices) are right-aligned."""
    # column by column, so a million-row table (statistics of a million tensors) costs a few calls per
    # column and one format per row rather than one call per cell
    columns = [[str(header), *map(str, column)] for header, column in zip(headers, zip(*rows) if rows else [()] * len(headers))]
    for index, cells in enumerate(columns):
        # cells hold names from files: escaped, so a name cannot move the cursor or add lines
        if not "".join(cells).isprintable():
            columns[index] = cells = [printable(cell) for cell in cells]
        if max(map(len, cells)) > CELL_LIMIT:
            columns[index] = [cell if len(cell) <= CELL_LIMIT else f"{cell[:100]}…{cell[-(CELL_LIMIT - 101):]}"
                              for cell in cells]
    widths, padded = [], []
    for index, cells in enumerate(columns):
        if "".join(cells).isascii():
            width = max(map(len, cells))
            # padded a column at a time and joined per row, not one str.format per row: format parses
            # its template again on every call (1.5 of the 2 s a million rows took)
            padded.append(list(map(str.rjust if index in align_right else str.ljust, cells, repeat(width))))
        else:  # CJK names take two terminal cells a character, combining marks none: padded by cells
            cell_widths = list(map(display_width, cells))
            width = max(cell_widths)
            padded.append([" " * (width - used) + cell if index in align_right else cell + " " * (width - used)
                           for cell, used in zip(cells, cell_widths)])
        widths.append(width)
    lines = list(map(str.rstrip, map("  ".join, zip(*padded))))
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)
