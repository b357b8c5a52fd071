"""Tensors tab: every tensor in one data grid, filtered by name, dtype and layer kind; selecting one shows its statistics and plots."""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

import ipywidgets as widgets
import pandas as pd
import traitlets

from ckptview.analyzers.stats import StatsResult, find_outliers, stats
from ckptview.analyzers.table import tensor_table
from ckptview.present import figures
from ckptview.present.frames import filter_frame, tensor_labels
from ckptview.present.text import human_bytes, shape_text
from ckptview.readers.model import without_numbers
from ckptview.ui.base import ExplorerState, FigureBox, Panel, banner_html, esc
from ckptview.ui.grid import Table

_STAT_FIELDS = (("min", "min"), ("max", "max"), ("mean", "mean"), ("std", "std"), ("abs-max", "abs_max"),
                ("L2 norm", "l2_norm"))
# What the grid shows: (column of the tensor table, header). "checks" fills in from statistics.
# Bytes comes next to the name: in a narrow notebook (a 640 px page with the file browser open
# leaves the grid ~230 px) the columns on the right scroll out of view first.
_COLUMNS = (("label", "name"), ("nbytes", "bytes"), ("shape_text", "shape"), ("dtype_text", "dtype"),
            ("numel", "elements"), ("layer_kind", "layer kind"), ("role", "role"), ("checks", "checks"))
# The statistics checks as short badges, in the order they are listed.
BADGES = {"non_finite": "NaN/Inf", "abs_max_outlier": "outlier", "all_zero": "all zero", "collapsed_std": "constant"}


class TensorsPanel(Panel):
    """
    Every tensor in a grid (sorted, resized and copied in the browser). `selected` is the tensor whose
    statistics, histogram and heatmap are shown: a row click sets it, and so can a script.
    """

    title = "Tensors"
    selected = traitlets.Unicode("")

    def __init__(self, state: ExplorerState) -> None:
        self.name_filter = widgets.Text(placeholder="name regex, e.g. layer1\\..*weight", continuous_update=False,
                                        layout=widgets.Layout(width="280px", max_width="100%"))
        self.dtype_filter = widgets.Dropdown(options=[("any dtype", "")], layout=widgets.Layout(width="130px"))
        self.kind_filter = widgets.Dropdown(options=[("any layer kind", "")], layout=widgets.Layout(width="160px"))
        self.count_label = widgets.HTML()
        self.rows = Table("tensors", formats={"name": "name", "elements": "count", "bytes": "bytes", "checks": "badge"},
                          on_select=self._on_rows_select)
        self.detail = widgets.HTML()
        self.histogram = FigureBox()
        self.heatmap = FigureBox()
        self.frame = pd.DataFrame()
        self.shown = pd.DataFrame()
        self.checks: dict[str, str] = {}
        for control in (self.name_filter, self.dtype_filter, self.kind_filter):
            control.observe(self._on_filter_change, names="value")
        controls = widgets.HBox([self.name_filter, self.dtype_filter, self.kind_filter, self.count_label],
                                layout=widgets.Layout(flex_flow="row wrap", align_items="center"))
        # side by side where there is room, one under the other in a narrow notebook
        for box in (self.histogram, self.heatmap):
            box.layout.flex = "1 1 360px"
        plots = widgets.HBox([self.histogram, self.heatmap], layout=widgets.Layout(flex_flow="row wrap", width="100%"))
        super().__init__(state, [controls, self.rows, self.detail, plots])
        self.observe(self._on_selected_value, names="selected")

    def _compute(self) -> pd.DataFrame:
        ckpt = self.state.checkpoint
        frame = tensor_table(ckpt).to_frame()
        labels = tensor_labels(ckpt)
        frame["label"] = [labels.get(name, name) for name in frame["name"]]
        frame["shape_text"] = [shape_text(shape) for shape in frame["shape"]]
        frame["dtype_text"] = [f"{dtype} ({encoding})" if encoding else dtype
                               for dtype, encoding in zip(frame["dtype"], frame["encoding"], strict=True)]
        return frame

    def _show(self, frame: pd.DataFrame) -> None:
        self.frame = frame
        self.dtype_filter.options = [("any dtype", "")] + [(d, d) for d in sorted(frame["dtype"].unique())]
        self.kind_filter.options = [("any layer kind", "")] + [(k, k) for k in sorted(frame["layer_kind"].unique()) if k]
        self._refresh()

    # --- what other tabs ask ----------------------------------------------------------------------
    def show_tensor(self, name: str) -> None:
        """
        Show the tensor `name` (its row alone, and its detail), or a module's tensors when `name` is a
        module path (`layer1.0`: the rows under it). The other filters are cleared.
        """
        exact = any(entry.name == name for entry in self.state.checkpoint.tensors())
        self.dtype_filter.value = self.kind_filter.value = ""
        self.name_filter.value = f"^{re.escape(name)}$" if exact else f"^{re.escape(name)}\\."
        if exact:
            self.selected = name
        else:  # a module: the last tensor's detail would sit under rows that no longer hold it
            self.selected = ""
            self.detail.value = ""
            self.histogram.clear()
            self.heatmap.clear()

    def note_statistics(self, result: StatsResult) -> None:
        """Fill the checks column with the findings of a statistics run (NaN/Inf, outliers, ...)."""
        found: dict[str, list[str]] = defaultdict(list)
        for outlier in result.outliers:
            found[outlier.name].append(BADGES.get(outlier.check, outlier.check))
        self.checks.update({item.name: " · ".join(found.get(item.name, ())) for item in result.tensors})
        self._refresh()

    # --- handlers ---------------------------------------------------------------------------------
    def _on_filter_change(self, change: dict[str, Any]) -> None:
        self._refresh()

    def _on_rows_select(self, row: pd.Series) -> None:
        self.selected = self.shown.iloc[row.name]["name"]

    def _on_selected_value(self, change: dict[str, Any]) -> None:
        if change["new"]:
            name = change["new"]
            self.run(lambda: self._tensor_detail(name), self._show_detail, label=f"reading {name}…")

    # --- view ---------------------------------------------------------------------------------------
    def _refresh(self) -> None:
        with self.view_lock:  # a worker's _show draws it too
            self._draw()

    def _draw(self) -> None:
        if self.frame.empty:
            return
        try:
            matching = filter_frame(self.frame, name_regex=self.name_filter.value,
                                    column_values={"dtype": self.dtype_filter.value, "layer_kind": self.kind_filter.value})
        except re.error as exc:
            self.banner.value = banner_html("error", f"the name filter is not a valid regular expression: {exc}")
            return
        self.banner.value = ""
        self.shown = matching.reset_index(drop=True)
        self.count_label.value = f"{len(matching):,} of {len(self.frame):,} tensors"
        grid = pd.DataFrame({header: self.shown[column] if column != "checks" else
                             [self.checks.get(name, "") for name in self.shown["name"]] for column, header in _COLUMNS})
        # the download carries the file's own names beside the labels (optimizer state: its parameter's name)
        download = grid.assign(tensor=self.shown["name"], module=self.shown["module"], section=self.shown["section"])
        self.rows.show(grid, download=download)

    def _tensor_detail(self, name: str) -> dict[str, Any]:
        ckpt = self.state.checkpoint
        entry = ckpt.tensor(name)
        detail: dict[str, Any] = {"row": self.frame[self.frame["name"] == name].iloc[0].to_dict(), "stats": None,
                                  "heatmap": None, "note": entry.info.note if entry.layout == "strided" else None}
        detail["stats"] = stats(ckpt, filter=f"^{re.escape(name)}$", progress=False)[name]
        if (len(entry.shape) == 2 and entry.dtype.is_floating_point and entry.layout in ("strided", "encoded")
                and not without_numbers(entry.info)):
            detail["heatmap"] = figures.heatmap(figures.downsample_2d(entry.load()), name, original_shape=entry.shape)
        return detail

    def _show_detail(self, detail: dict[str, Any]) -> None:
        row = detail["row"]
        dtype = f"{row['dtype']} (stored as {row['encoding']})" if row["encoding"] else row["dtype"]
        facts = [("shape", shape_text(row["shape"])), ("dtype", dtype), ("elements", f"{row['numel']:,}"),
                 ("bytes", human_bytes(row["nbytes"])), ("layer", f"{row['layer_kind']} {row['layer_detail']}".strip() or "?"),
                 ("role", row["role"]), ("section", row["section"] or "—"), ("saved on", row["device"]),
                 ("storage shared", "yes" if row["shared"] else "no")]
        if detail["note"]:  # a DTensor: which part of the whole tensor the file holds
            facts.append(("distributed", detail["note"]))
        numbers = detail["stats"]
        if numbers.skipped:
            facts.append(("statistics", numbers.skipped))
        else:
            facts += [(label, f"{getattr(numbers, key):.6g}") for label, key in _STAT_FIELDS]
            facts += [("NaN", f"{numbers.nan_count:,}"), ("±Inf", f"{numbers.inf_count:,}"),
                      ("zeros", f"{numbers.zero_fraction:.2%}")]
        cells = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in facts)
        half = (len(facts) + 1) // 2
        left, right = cells.split("</tr>")[:half], cells.split("</tr>")[half:]
        title = row["name"] if row["label"] == row["name"] else f"{row['label']}  ({row['name']})"
        self.detail.value = (f"<h4 style='margin:6px 0'>{esc(title)}</h4><div style='display:flex;gap:0 24px;flex-wrap:wrap'>"
                             f"<table class='ckptview-table'>{'</tr>'.join(left)}</tr></table>"
                             f"<table class='ckptview-table'>{'</tr>'.join(right)}</table></div>")
        self._note_checks(row["name"], numbers)
        histogram = numbers.histogram
        if histogram is None:
            self.histogram.clear()
        else:
            self.histogram.show(figures.histogram(histogram.edges, histogram.counts, f"histogram of {row['name']}"))
        if detail["heatmap"] is None:
            self.heatmap.clear()
        else:
            self.heatmap.show(detail["heatmap"])

    def _note_checks(self, name: str, numbers: Any) -> None:
        # A clicked tensor's own statistics are known now: its row gets the checks that need no
        # siblings (NaN/Inf, all zero, constant) unless a statistics run already judged it.
        if name in self.checks or numbers.skipped:
            return
        self.checks[name] = " · ".join(BADGES[o.check] for o in find_outliers(self.state.checkpoint, [numbers]))
        positions = self.shown.index[self.shown["name"] == name]
        if self.checks[name] and len(positions):
            self.rows.set_cell(int(positions[0]), "checks", self.checks[name])
