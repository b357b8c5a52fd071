"""Tensors tab: every tensor, filtered, sorted and paged; selecting one shows its statistics and plots."""

from __future__ import annotations

import re
from typing import Any

import ipywidgets as widgets
import pandas as pd

from ckptview.analyzers.stats import stats
from ckptview.analyzers.table import tensor_table
from ckptview.present import figures
from ckptview.present.frames import filter_frame, page, tensor_labels
from ckptview.present.text import human_bytes, shape_text
from ckptview.ui.base import ExplorerState, FigureBox, Panel, banner_html, esc

PAGE_SIZE = 50
_STAT_FIELDS = (("min", "min"), ("max", "max"), ("mean", "mean"), ("std", "std"), ("abs-max", "abs_max"),
                ("L2 norm", "l2_norm"))
_SORTS = (("file order", "order"), ("name", "name"), ("elements", "numel"), ("bytes", "nbytes"),
          ("dtype", "dtype"), ("layer kind", "layer_kind"), ("module", "module"))


class TensorsPanel(Panel):
    title = "Tensors"

    def __init__(self, state: ExplorerState) -> None:
        self.name_filter = widgets.Text(placeholder="name regex, e.g. layer1\\..*weight", continuous_update=False,
                                        layout=widgets.Layout(width="280px", max_width="100%"))
        self.dtype_filter = widgets.Dropdown(options=[("any dtype", "")], layout=widgets.Layout(width="130px"))
        self.kind_filter = widgets.Dropdown(options=[("any layer kind", "")], layout=widgets.Layout(width="160px"))
        self.sort_by = widgets.Dropdown(options=_SORTS, value="order", description="sort", layout=widgets.Layout(width="190px"))
        self.descending = widgets.ToggleButton(description="descending", icon="sort-amount-desc",
                                               layout=widgets.Layout(width="120px"))
        self.previous = widgets.Button(description="◀", layout=widgets.Layout(width="40px"))
        self.next = widgets.Button(description="▶", layout=widgets.Layout(width="40px"))
        self.page_label = widgets.HTML()
        self.header_line = widgets.HTML()
        self.rows = widgets.Select(rows=20, layout=widgets.Layout(width="100%"))
        self.rows.add_class("ckptview-mono")
        self.rows.add_class("ckptview-rows")
        self.detail = widgets.HTML()
        self.histogram = FigureBox()
        self.heatmap = FigureBox()
        self.frame = pd.DataFrame()
        self.matching = 0
        self.page_number = 0
        for control in (self.name_filter, self.dtype_filter, self.kind_filter, self.sort_by, self.descending):
            control.observe(self._on_filter_change, names="value")
        self.previous.on_click(self._on_previous_click)
        self.next.on_click(self._on_next_click)
        self.rows.observe(self._on_rows_value, names="value")
        controls = widgets.HBox([self.name_filter, self.dtype_filter, self.kind_filter, self.sort_by, self.descending],
                                layout=widgets.Layout(flex_flow="row wrap"))
        paging = widgets.HBox([self.previous, self.next, self.page_label])
        # side by side where there is room, one under the other in a narrow notebook
        for box in (self.histogram, self.heatmap):
            box.layout.flex = "1 1 360px"
        plots = widgets.HBox([self.histogram, self.heatmap], layout=widgets.Layout(flex_flow="row wrap", width="100%"))
        super().__init__(state, [controls, paging, self.header_line, self.rows, self.detail, plots])

    def _compute(self) -> pd.DataFrame:
        ckpt = self.state.checkpoint
        frame = tensor_table(ckpt).to_frame()
        frame.insert(0, "order", range(len(frame)))
        labels = tensor_labels(ckpt)
        frame["label"] = [labels.get(name, name) for name in frame["name"]]
        return frame

    def _show(self, frame: pd.DataFrame) -> None:
        self.frame = frame
        self.dtype_filter.options = [("any dtype", "")] + [(d, d) for d in sorted(frame["dtype"].unique())]
        self.kind_filter.options = [("any layer kind", "")] + [(k, k) for k in sorted(frame["layer_kind"].unique()) if k]
        self._refresh()

    # --- handlers ---------------------------------------------------------------------------------
    def _on_filter_change(self, change: dict[str, Any]) -> None:
        self.page_number = 0
        self._refresh()

    def _on_previous_click(self, button: widgets.Button) -> None:
        self.page_number = max(0, self.page_number - 1)
        self._refresh()

    def _on_next_click(self, button: widgets.Button) -> None:
        self.page_number = min(self._last_page(), self.page_number + 1)
        self._refresh()

    def _on_rows_value(self, change: dict[str, Any]) -> None:
        if change["new"]:
            name = change["new"]
            self.run(lambda: self._tensor_detail(name), self._show_detail, label=f"reading {name}…")

    # --- view ---------------------------------------------------------------------------------------
    def _last_page(self) -> int:
        return max(0, (self.matching - 1) // PAGE_SIZE)

    def _refresh(self) -> None:
        if self.frame.empty:
            return
        try:
            matching = filter_frame(self.frame, name_regex=self.name_filter.value,
                                    column_values={"dtype": self.dtype_filter.value, "layer_kind": self.kind_filter.value})
        except re.error as exc:
            self.banner.value = banner_html("error", f"the name filter is not a valid regular expression: {exc}")
            return
        self.banner.value = ""
        self.matching = len(matching)
        self.page_number = min(self.page_number, self._last_page())
        shown = page(matching, sort_by=self.sort_by.value, descending=self.descending.value,
                     number=self.page_number, size=PAGE_SIZE)
        first = self.page_number * PAGE_SIZE
        self.page_label.value = (f"rows {first + 1 if len(shown) else 0:,}–{first + len(shown):,} of {self.matching:,}"
                                 f" (of {len(self.frame):,})")
        self.header_line.value = (f"<div class='ckptview-mono-line'>"
                                  f"{esc(_line('name', 'shape', 'dtype', 'layer kind', 'role', 'size'))}</div>")
        self.rows.index = None  # else the Select picks the first row, which would load that tensor
        self.rows.rows = max(3, min(len(shown), 20))
        self.rows.options = [(_line(r["label"], shape_text(r["shape"]), r["encoding"] or r["dtype"], r["layer_kind"], r["role"],
                                    human_bytes(r["nbytes"])), r["name"]) for r in shown.to_dict("records")]

    def _tensor_detail(self, name: str) -> dict[str, Any]:
        ckpt = self.state.checkpoint
        entry = ckpt.tensor(name)
        detail: dict[str, Any] = {"row": self.frame[self.frame["name"] == name].iloc[0].to_dict(), "stats": None, "heatmap": None}
        detail["stats"] = stats(ckpt, filter=f"^{re.escape(name)}$", progress=False)[name]
        if len(entry.shape) == 2 and entry.dtype.is_floating_point and entry.layout in ("strided", "encoded"):
            detail["heatmap"] = figures.heatmap(figures.downsample_2d(entry.load()), name, original_shape=entry.shape)
        return detail

    def _show_detail(self, detail: dict[str, Any]) -> None:
        row = detail["row"]
        dtype = f"{row['dtype']} (stored as {row['encoding']})" if row["encoding"] else row["dtype"]
        facts = [("shape", shape_text(row["shape"])), ("dtype", dtype), ("elements", f"{row['numel']:,}"),
                 ("bytes", human_bytes(row["nbytes"])), ("layer", f"{row['layer_kind']} {row['layer_detail']}".strip() or "?"),
                 ("role", row["role"]), ("section", row["section"] or "—"), ("saved on", row["device"]),
                 ("storage shared", "yes" if row["shared"] else "no")]
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
        histogram = numbers.histogram
        if histogram is None:
            self.histogram.clear()
        else:
            self.histogram.show(figures.histogram(histogram.edges, histogram.counts, f"histogram of {row['name']}"))
        if detail["heatmap"] is None:
            self.heatmap.clear()
        else:
            self.heatmap.show(detail["heatmap"])


def _line(name: str, shape: str, dtype: str, kind: str, role: str, size: str) -> str:
    name = name if len(name) <= 56 else "…" + name[-55:]
    # Browsers collapse runs of spaces inside <option>; non-breaking spaces keep the columns aligned.
    return f"{name:<56}  {shape:<20}  {dtype:<9}  {kind:<14}  {role:<9}  {size:>10}".replace(" ", "\u00a0")
