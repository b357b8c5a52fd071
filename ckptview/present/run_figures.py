"""Plotly figures and tables of a training run (`RunSummary`): metrics over time, a drift heatmap, a table."""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from ckptview.analyzers.run import RunSummary, metric_direction
from ckptview.present.figures import log_axis

# As the explorer's other figures: transparent, so the theme's background shows and the explorer's CSS
# colours text and grid lines for light and dark; the legend under the plot, where it covers neither
# the data nor a second axis's labels.
_LAYOUT = dict(margin=dict(l=60, r=20, t=40, b=50), height=380, template="plotly_white", autosize=True,
               paper_bgcolor="rgba(0,0,0,0)", plot_bgcolor="rgba(0,0,0,0)")
# At the foot of the figure (not at a fraction of the plot's height under it): when a narrow window
# wraps the legend into rows, the margin grows and a legend placed relative to the plot landed on the
# x axis's labels after the window widened again.
_LEGEND_BELOW = dict(orientation="h", yref="container", y=0, yanchor="bottom", xanchor="left", x=0)
_MAX_LOG_TICKS = 8  # a diverged run's learning rate spans 30+ decades: one label per decade would overlap
_NAN_GREY = "#9e9e9e"  # readable on the light and the dark theme
_COUNTERS = {"epoch", "epochs", "current_epoch", "step", "global_step", "steps", "iteration", "iter"}


def _x(summary: RunSummary) -> tuple[list[Any], str]:
    """The run's time axis: epochs when the order came from them, steps, else the position in the run."""
    if summary.order_by in ("epoch", "step"):
        return [getattr(c, summary.order_by) for c in summary.checkpoints], summary.order_by
    return [c.index for c in summary.checkpoints], "checkpoint"


def _mark_onset(figure: go.Figure, summary: RunSummary, x: list[Any]) -> None:
    onset = summary.nan_onset
    if onset is None:
        return
    where = next(x[i] for i, c in enumerate(summary.checkpoints) if c.path == onset.path)
    # the label above the plot area, where it hides no heatmap cell or line
    figure.add_vline(x=where, line=dict(color="#d93025", dash="dash"), annotation_text="NaN/Inf",
                     annotation_position="top", annotation_yanchor="bottom", annotation_font_color="#d93025")


def _title(text: str) -> dict[str, Any]:
    return dict(text=text, font=dict(size=13), x=0, xanchor="left", xref="paper")


def metrics_figure(summary: RunSummary) -> go.Figure:
    """One line per scalar the checkpoints save (losses and metrics; the learning rate on a log axis of its own)."""
    x, label = _x(summary)
    names = sorted({k for c in summary.checkpoints for k in c.scalars if k not in _COUNTERS})
    figure = go.Figure()
    for name in names:
        values = [c.scalars.get(name, math.nan) for c in summary.checkpoints]
        values = [v if math.isfinite(v) else None for v in values]
        is_lr = name == "lr" or name.startswith("lr_")
        figure.add_trace(go.Scatter(x=x, y=values, mode="lines+markers", name=name, yaxis="y2" if is_lr else "y",
                                    visible=True if (metric_direction(name) is not None or is_lr) else "legendonly"))
    best = summary.best
    if best is not None:
        where = next(x[i] for i, c in enumerate(summary.checkpoints) if c.path == best.path)
        figure.add_trace(go.Scatter(x=[where], y=[best.value], mode="markers", name=f"best ({best.metric})",
                                    marker=dict(symbol="star", size=14, color="#f9ab00")))
    _mark_onset(figure, summary, x)
    rates = [v for c in summary.checkpoints for k, v in c.scalars.items() if k == "lr" or k.startswith("lr_")]
    lr_axis = log_axis(rates)
    finite = [v for v in rates if v > 0 and math.isfinite(v)]
    if finite:
        decades = math.log10(max(finite)) - math.log10(min(finite))
        lr_axis["dtick"] = max(lr_axis.get("dtick", 1), math.ceil(decades / _MAX_LOG_TICKS))
    figure.update_layout(**_LAYOUT, title=_title("metrics over the run"), legend=_LEGEND_BELOW,
                         xaxis_title=label, yaxis_title="loss, metric",
                         yaxis2=dict(overlaying="y", side="right", title="learning rate", showgrid=False, **lr_axis))
    return figure


def drift_heatmap(summary: RunSummary, *, max_modules: int = 120) -> go.Figure:
    """Modules × checkpoints, colour = log10 of the relative change from the previous checkpoint; NaN onset marked."""
    x, label = _x(summary)
    frame = summary.drift_frame()
    if frame.empty:
        return go.Figure().update_layout(**_LAYOUT, title=_title("no model weights to compare"))
    modules = list(dict.fromkeys(frame["module"]))[:max_modules]
    column = {c.path: i for i, c in enumerate(summary.checkpoints)}
    z = np.full((len(modules), len(x)), np.nan)
    nan_counts = np.zeros((len(modules), len(x)))
    row = {m: i for i, m in enumerate(modules)}
    for item in frame.itertuples():
        if item.module in row:
            nan_counts[row[item.module], column[item.path]] = item.nan_count
            if item.rel_change_prev > 0 and math.isfinite(item.rel_change_prev):
                z[row[item.module], column[item.path]] = math.log10(item.rel_change_prev)
    names = np.array([[os.path.basename(c.path) for c in summary.checkpoints]] * len(modules))
    # the title short enough for a 640 px window; the colour bar and hover say what the change is
    figure = go.Figure(go.Heatmap(z=z, x=x, y=modules, colorscale="Viridis", colorbar=dict(title="log10 Δ<br>vs prev"),
                                  customdata=names,
                                  hovertemplate="%{y} @ %{customdata}<br>log10 relative change %{z:.2f}<extra></extra>"))
    # a module left with no change to show because it holds NaN (a diverged run's every weight) is grey,
    # not the blank of a module the checkpoint lacks
    poisoned = np.where(np.isnan(z) & (nan_counts > 0), 0.0, np.nan)
    if not np.isnan(poisoned).all():
        figure.add_trace(go.Heatmap(z=poisoned, x=x, y=modules, colorscale=[[0, _NAN_GREY], [1, _NAN_GREY]],
                                    showscale=False, customdata=np.dstack([names, nan_counts]),
                                    hovertemplate="%{y} @ %{customdata[0]}<br>%{customdata[1]:,} NaN: no change to show"
                                                  "<extra></extra>"))
    _mark_onset(figure, summary, x)
    figure.update_layout(**{**_LAYOUT, "height": max(300, 18 * len(modules) + 120)}, xaxis_title=label,
                         title=_title("weight change per module"),
                         yaxis=dict(autorange="reversed"))
    return figure


def run_table(summary: RunSummary) -> pd.DataFrame:
    """One row per checkpoint: file, epoch, step, the deciding metric, the largest module change, marks."""
    metric = summary.best.metric if summary.best else None
    largest = summary.largest_change()
    nonfinite = set(summary.nonfinite)
    rows = []
    for c in summary.checkpoints:
        marks = [m for m, hit in (("best", summary.best and summary.best.path == c.path),
                                  ("NaN/Inf", c.path in nonfinite)) if hit]
        change, module = largest.get(c.path, (math.nan, ""))
        rows.append({"checkpoint": c.name, "epoch": _or_nan(c.epoch), "step": _or_nan(c.step),
                     (metric or "metric"): c.scalars.get(metric, math.nan) if metric else math.nan,
                     "largest change": change, "module": module, "": " ".join(marks)})
    return pd.DataFrame(rows)


def _or_nan(value: float | None) -> float:
    # a number column (a run that saves no step has NaN there, which the table shows as a dash, not None)
    return math.nan if value is None else value
