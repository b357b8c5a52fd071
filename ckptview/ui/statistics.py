"""Statistics tab: per-tensor statistics streamed from disk with progress and Cancel, plotted by depth, outliers listed."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import ipywidgets as widgets
import pandas as pd

from ckptview.analyzers.stats import StatsResult, stats
from ckptview.present import figures
from ckptview.present.frames import stats_frame, tensor_labels
from ckptview.present.html import stats_findings_html, stats_summary_html
from ckptview.present.text import human_bytes
from ckptview.readers.model import TensorEntry
from ckptview.ui.base import Cancelled, ExplorerState, FigureBox, Panel, banner_html
from ckptview.ui.grid import Table

# Progress granularity: the work is handed to `stats` in batches of about this share of the bytes,
# so the bar moves ~50 times whatever the file size (stats itself parallelises within a batch).
_BATCHES = 50
_MIN_BATCH_BYTES = 32 << 20
# ... and of at most this many tensors: a file of 20,000 small tensors still shows progress, and each
# call's own outlier pass (which compares a tensor with its siblings) stays small.
_MAX_BATCH_TENSORS = 1000


# The per-tensor grid: (column of stats_frame, header, how the grid draws it).
_COLUMNS = (("label", "name", "name"), ("part", "part", "text"), ("dtype", "dtype", "text"), ("numel", "elements", "count"),
            ("min", "min", "float"), ("max", "max", "float"), ("mean", "mean", "float"), ("std", "std", "float"),
            ("abs_max", "abs-max", "float"), ("nan_count", "NaN", "count"), ("inf_count", "±Inf", "count"),
            ("zero_fraction", "zeros", "percent"), ("outliers", "checks", "badge"))


class StatisticsPanel(Panel):
    """
    Statistics of every tensor: a summary, the depth plot, the findings grouped by check, and one
    grid row per tensor. `on_pick(name)` is called when a row is clicked; `on_result(result)` after
    each run (the explorer fills the Tensors tab's checks column from it).
    """

    title = "Statistics"

    def __init__(self, state: ExplorerState) -> None:
        self.name_filter = widgets.Text(placeholder="only tensors matching this regex", continuous_update=False,
                                        layout=widgets.Layout(width="300px"))
        self.compute = widgets.Button(description="Compute statistics", button_style="primary", icon="play",
                                      layout=widgets.Layout(width="190px"))
        self.cancel_button = widgets.Button(description="Cancel", icon="stop", disabled=True)
        self.training_too = widgets.Checkbox(value=False, description="plot optimizer state and other tensors too",
                                             indent=False, layout=widgets.Layout(width="auto"))
        self.summary = widgets.HTML()
        self.figure = FigureBox()
        self.outliers = widgets.HTML()
        self.rows = Table("statistics", formats={header: kind for _, header, kind in _COLUMNS},
                          on_select=self._on_rows_select)
        self.result: StatsResult | None = None
        self.on_pick: Callable[[str], None] | None = None
        self.on_result: Callable[[StatsResult], None] | None = None
        self.compute.on_click(self._on_compute_click)
        self.cancel_button.on_click(self._on_cancel_click)
        self.name_filter.observe(self._on_name_filter_value, names="value")
        self.training_too.observe(self._on_training_too_value, names="value")
        self.frame: Any = None
        controls = widgets.HBox([self.name_filter, self.compute, self.cancel_button, self.training_too],
                                layout=widgets.Layout(flex_flow="row wrap"))
        super().__init__(state, [controls, self.summary, self.figure, self.outliers, self.rows])

    def _on_compute_click(self, button: widgets.Button) -> None:
        self._refresh()

    def _on_name_filter_value(self, change: dict[str, Any]) -> None:
        self._refresh()

    def _on_training_too_value(self, change: dict[str, Any]) -> None:
        with self.view_lock:  # a worker's _show draws it too
            self._plot()

    def _on_cancel_click(self, button: widgets.Button) -> None:
        self.cancel()

    def _on_rows_select(self, row: pd.Series) -> None:
        if self.on_pick is not None:
            self.on_pick(self.frame["name"].iloc[row.name])

    def _compute(self) -> StatsResult:
        self.compute.disabled, self.cancel_button.disabled = True, False
        try:
            return self._stream(self.name_filter.value or None)
        finally:
            self.compute.disabled, self.cancel_button.disabled = False, True

    def _refresh(self) -> None:
        try:
            re.compile(self.name_filter.value)
        except re.error as exc:
            self.banner.value = banner_html("error", f"the name filter is not a valid regular expression: {exc}")
            return
        self.run(self._compute, self._show, label="reading tensors…")

    def _stream(self, pattern: str | None) -> StatsResult:
        ckpt = self.state.checkpoint
        wanted = re.compile(pattern) if pattern else None
        entries = [e for e in ckpt.unique_tensors() if wanted is None or wanted.search(e.name)]
        total = sum(e.nbytes for e in entries) or 1
        target = max(total // _BATCHES, _MIN_BATCH_BYTES)
        done = 0
        for batch in _batches(entries, target):
            names = {e.name for e in batch}
            try:
                stats(ckpt, filter=lambda e, names=names: e.name in names, progress=False, cancel=self._cancel)
            except Exception as exc:
                if self.cancel_requested:
                    raise Cancelled() from exc
                raise
            done += sum(e.nbytes for e in batch)
            self.report(done, total, f"{human_bytes(done)} of {human_bytes(total)}")
        # Every tensor is cached now: this returns at once, with outliers judged over the whole selection.
        return stats(ckpt, filter=pattern, progress=False)

    def _show(self, result: StatsResult) -> None:
        self.result = result
        self.frame = stats_frame(self.state.checkpoint, result)
        self.summary.value = stats_summary_html(result, self.frame)
        self._plot()
        self.outliers.value = stats_findings_html(result, tensor_labels(self.state.checkpoint))
        grid = pd.DataFrame({header: self.frame[column] for column, header, _ in _COLUMNS})
        self.rows.show(grid, download=grid.assign(tensor=self.frame["name"]))
        if self.on_result is not None:
            self.on_result(result)

    def _plot(self) -> None:
        # The model's weights and buffers by default: optimizer moments are orders of magnitude apart
        # from the weights and would fill the plot with a sawtooth between them.
        if self.result is None:
            return
        if all(item.skipped for item in self.result.tensors):
            self.figure.clear()  # axes over no points said less than the summary line's reasons
            return
        parts = ("weights", "buffers") + (("optimizer state", "other") if self.training_too.value else ())
        self.figure.show(figures.stats_by_depth(self.frame, {o.name for o in self.result.outliers}, parts=parts))


def _batches(entries: list[TensorEntry], target: int) -> list[list[TensorEntry]]:
    batches: list[list[TensorEntry]] = [[]]
    size = 0
    for entry in entries:
        if size >= target or len(batches[-1]) >= _MAX_BATCH_TENSORS:
            batches.append([])
            size = 0
        batches[-1].append(entry)
        size += entry.nbytes
    return [b for b in batches if b]
