"""
The explorer's tables: ipydatagrid's `DataGrid` (a canvas grid from Lumino, JupyterLab's own
toolkit) with CSV and JSON download links under it.

Why ipydatagrid: it draws only the visible cells, so 20,000 rows scroll and sort in the browser
without the kernel; it sorts and filters in the front end from a header menu, keeps numbers as
numbers (a bytes column sorts by size while it reads "1.5 MiB"), resizes columns by dragging,
copies the selection with Ctrl+C, and follows JupyterLab's light/dark theme through its theme
manager. itables' widget renders DataTables HTML: every row is a DOM node unless it pages.

Downloads are `<a download href="data:...">` links built in the kernel, so they work in JupyterLab
and Voila alike with no server endpoint. A large table's links (megabytes of base64 in the page on
every filter change) are built only when asked, with one click on "prepare downloads".
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Mapping
from typing import Any

import ipywidgets as widgets
import pandas as pd
from ipydatagrid import DataGrid, TextRenderer, VegaExpr

from ckptview.present.html import esc
from ckptview.present.text import human_bytes

# Above this many bytes of CSV the links wait for a click (a 20,000-tensor table is ~1.2 MB of CSV).
INLINE_DOWNLOAD_BYTES = 256 << 10

ROW_PX = 22
HEADER_PX = 26
# Lumino's scroll bar, the grid's border, and what the output area takes (a 7-row grid at + 18 px
# lost its last row's lower half under a horizontal scroll bar in a 640 px page)
SCROLL_BAR_PX = 28
_CHAR_PX = 7  # 12px sans-serif averages under 7 px a character; columns start wide enough for their text

# A Vega expression (evaluated by the grid in the browser): the same text as `human_bytes`.
_BYTES_EXPR = " : ".join(
    f"abs(cell.value) >= {1024 ** power} ? format(cell.value / {1024 ** power}, '.1f') + ' {unit}'"
    for power, unit in ((4, "TiB"), (3, "GiB"), (2, "MiB"), (1, "KiB"))
) + " : format(cell.value, 'd') + ' B'"

# A soft red under the text that reads in light and dark themes alike.
BADGE_COLOR = "rgba(220, 53, 69, 0.35)"

FORMATS = ("text", "name", "bytes", "count", "float", "percent", "badge")
# A dotted name wider than this is cut at its start ("…layer4.1.conv2.weight"): the leaf is what tells rows apart.
NAME_PX = 300


def _renderer(kind: str) -> TextRenderer | None:
    if kind == "text":
        return None  # the grid's default renderer
    if kind == "name":
        return TextRenderer(text_elide_direction="left")
    if kind == "bytes":
        return TextRenderer(text_value=VegaExpr(_BYTES_EXPR), horizontal_alignment="right")
    if kind == "count":
        return TextRenderer(format=",d", horizontal_alignment="right")
    if kind == "float":
        return TextRenderer(format=".4~g", horizontal_alignment="right")
    if kind == "percent":
        return TextRenderer(format=".1%", horizontal_alignment="right")
    if kind == "badge":
        return TextRenderer(background_color=VegaExpr(f"cell.value ? '{BADGE_COLOR}' : default_value"))
    raise ValueError(f"unknown column format {kind!r}; use one of {', '.join(FORMATS)}")


def download_links(frame: pd.DataFrame, stem: str, label: str = "") -> str:
    """Two `<a download>` links holding `frame` as CSV and as JSON records (base64 data URIs), after
    `label` when a panel has several tables' links side by side."""
    csv = frame.to_csv(index=False).encode()
    records = frame.to_json(orient="records", default_handler=str).encode()
    links = []
    for data, kind, mime in ((csv, "CSV", "text/csv"), (records, "JSON", "application/json")):
        href = f"data:{mime};charset=utf-8;base64,{base64.b64encode(data).decode()}"
        # the theme's link colour: JupyterLab draws an HTML widget's links as plain text otherwise
        links.append(f"<a class='ckptview-download' download='{stem}.{kind.lower()}' href='{href}' "
                     f"style='color: var(--jp-content-link-color, #1976d2); margin-right: 10px' "
                     f"title='{len(frame):,} rows, {human_bytes(len(data))}'>⤓ {kind}</a>")
    named = f"<span class='ckptview-muted' style='margin: 0 6px 0 0'>{esc(label)}:</span>" if label else ""
    # one group per table, its two links never apart: a narrow notebook wraps between tables, and after
    # a label too long to share their line (at 640 px the JSON link went past the panel's edge)
    return ("<span class='ckptview-downloads' style='display: inline-block; margin-right: 8px'>" + named
            + "<span style='white-space: nowrap'>" + " ".join(links) + "</span></span>")


class Table(widgets.VBox):
    """
    One table of the explorer: a `DataGrid` and its download links.

    `show(frame)` replaces the rows; `formats` says how a column is drawn ("name", "bytes", "count",
    "float", "percent", "badge"; text otherwise) while its values stay raw, so sorting by it is
    numeric and the downloads carry the numbers. With `on_select`, clicking a row calls it with
    that row of `frame` (whatever order the grid's own sort shows).
    """

    def __init__(self, stem: str, *, formats: Mapping[str, str] | None = None, max_height: int = 420,
                 on_select: Callable[[pd.Series], None] | None = None) -> None:
        self.stem = stem
        self.formats = dict(formats or {})
        self.max_height = max_height
        self.frame = pd.DataFrame()
        self._download: pd.DataFrame = self.frame
        self._on_select = on_select
        self.grid = DataGrid(pd.DataFrame(), selection_mode="row" if on_select else "cell",
                             header_visibility="column", base_row_size=ROW_PX, base_column_header_size=HEADER_PX,
                             renderers={name: renderer for name, kind in self.formats.items()
                                        if (renderer := _renderer(kind)) is not None},
                             layout=widgets.Layout(width="100%", max_width="100%", height=f"{HEADER_PX + ROW_PX}px"))
        self.grid.on_cell_click(self._on_grid_click)
        self.downloads = widgets.HTML()
        self.prepare = widgets.Button(description="prepare downloads", icon="download",
                                      tooltip="build the CSV and JSON files of this table",
                                      layout=widgets.Layout(width="auto", display="none"))
        self.prepare.on_click(self._on_prepare_click)
        self.add_class("ckptview-table-grid")
        super().__init__([self.grid, widgets.HBox([self.downloads, self.prepare])],
                         layout=widgets.Layout(width="100%", min_width="0"))

    def show(self, frame: pd.DataFrame, *, download: pd.DataFrame | None = None) -> None:
        """Show `frame` (its index is dropped); the download links carry `download` (default `frame`)."""
        self.frame = frame.reset_index(drop=True)
        self._download = self.frame if download is None else download
        # Widths are set by the first rows shown (a full table) and kept: a filter that leaves short
        # names does not shrink the columns under the user, nor undo a column they dragged wider.
        kept = {name: width for name, width in self.grid.column_widths.items() if name in self.frame.columns}
        self.grid.column_widths = _widths(self.frame, self.formats) | kept
        self.grid.data = self.frame
        visible_rows = max(1, min(len(self.frame), (self.max_height - HEADER_PX) // ROW_PX))
        # + a scroll bar's height, so a short table's last row is not hidden under its horizontal scroll bar
        self.grid.layout.height = f"{HEADER_PX + visible_rows * ROW_PX + SCROLL_BAR_PX}px"
        # as wide as its columns (the grid paints the rest in its own void colour), + a vertical scroll
        # bar when the rows do not all fit, and never wider than the panel (max_width)
        scroll_bar = SCROLL_BAR_PX if len(self.frame) > visible_rows else 8  # 8: borders and rounding
        self.grid.layout.width = f"{sum(self.grid.column_widths.values()) + scroll_bar}px"
        if _csv_size(self._download) > INLINE_DOWNLOAD_BYTES:
            self.downloads.value = ""
            self.prepare.description = f"prepare downloads ({len(self._download):,} rows)"
            self.prepare.layout.display = ""
        else:
            self.prepare.layout.display = "none"
            self.downloads.value = download_links(self._download, self.stem)

    def set_cell(self, position: int, column: str, value: Any) -> None:
        """Change one cell (one small message to the browser, not the whole table again) and its downloads."""
        self.frame.loc[position, column] = value
        self.grid.set_cell_value_by_index(column, position, value)
        if column in self._download.columns:
            self._download.loc[position, column] = value
        if self.downloads.value:
            self.downloads.value = download_links(self._download, self.stem)

    def sort(self, column: str, *, descending: bool = False) -> None:
        """Sort the grid by `column`, as its header menu does (the rows stay in `frame` as given)."""
        if column not in self.frame.columns:
            raise ValueError(f"no column {column!r}; the columns are {', '.join(map(str, self.frame.columns))}")
        self.grid.transform([{"type": "sort", "column": column, "desc": descending}])

    def sorted_frame(self) -> pd.DataFrame:
        """`frame` in the order the grid shows it: its sort applied (the last one wins, as in the grid)."""
        frame = self.frame
        for transform in self.grid._transforms:
            if transform.get("type") == "sort":
                frame = frame.sort_values(transform["column"], ascending=not transform["desc"], kind="stable")
        return frame

    def select_row(self, position: int) -> None:
        """Act as a click on the row at `position` in `frame`."""
        if self._on_select is not None:
            self._on_select(self.frame.iloc[position])

    def _on_grid_click(self, cell: dict[str, Any]) -> None:
        # primary_key_row is the row's position in the data sent, whatever the grid's sort shows
        if cell["region"] == "body" and cell["primary_key_row"] is not None:
            self.select_row(int(cell["primary_key_row"]))

    def _on_prepare_click(self, button: widgets.Button) -> None:
        self.prepare.layout.display = "none"
        self.downloads.value = download_links(self._download, self.stem)


def _csv_size(frame: pd.DataFrame) -> int:
    # a sample's size scaled up: writing 20,000 rows to learn their size costs as much as the links
    sample = frame.head(200)
    return len(sample.to_csv(index=False)) * max(1, len(frame)) // max(1, len(sample))


def _widths(frame: pd.DataFrame, formats: Mapping[str, str]) -> dict[str, int]:
    widths = {}
    for column in frame.columns:
        kind = formats.get(column, "text")
        if kind in ("text", "name", "badge") and len(frame):
            chars = int(frame[column].astype(str).str.len().max())
        else:
            chars = 10
        cells = min(NAME_PX if kind == "name" else 420, _CHAR_PX * chars + 24)
        header = _CHAR_PX * len(str(column)) + 36  # the header's text and its menu button
        widths[column] = max(60, cells, header)
    return widths
