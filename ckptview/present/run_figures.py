"""Plotly figures and tables of a training run (`RunSummary`): metrics over time, a drift heatmap, a table."""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from ckptview.analyzers.run import RunSummary, metric_direction

_LAYOUT = dict(margin=dict(l=50, r=10, t=40, b=40), height=340, template="plotly_white")
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
    figure.add_vline(x=where, line=dict(color="#d93025", dash="dash"), annotation_text="NaN/Inf",
                     annotation_font_color="#d93025")


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
    figure.update_layout(**_LAYOUT, title=dict(text="metrics over the run", font=dict(size=13)),
                         xaxis_title=label, yaxis2=dict(overlaying="y", side="right", type="log", title="lr",
                                                        showgrid=False))
    return figure


def drift_heatmap(summary: RunSummary, *, max_modules: int = 120) -> go.Figure:
    """Modules × checkpoints, colour = log10 of the relative change from the previous checkpoint; NaN onset marked."""
    x, label = _x(summary)
    frame = summary.drift_frame()
    if frame.empty:
        return go.Figure().update_layout(**_LAYOUT, title="no model weights to compare")
    modules = list(dict.fromkeys(frame["module"]))[:max_modules]
    column = {c.path: i for i, c in enumerate(summary.checkpoints)}
    z = np.full((len(modules), len(x)), np.nan)
    row = {m: i for i, m in enumerate(modules)}
    for item in frame.itertuples():
        if item.module in row and item.rel_change_prev > 0 and math.isfinite(item.rel_change_prev):
            z[row[item.module], column[item.path]] = math.log10(item.rel_change_prev)
    names = [os.path.basename(c.path) for c in summary.checkpoints]
    figure = go.Figure(go.Heatmap(z=z, x=x, y=modules, colorscale="Viridis", colorbar=dict(title="log10 Δ"),
                                  customdata=np.array([names] * len(modules)),
                                  hovertemplate="%{y} @ %{customdata}<br>log10 relative change %{z:.2f}<extra></extra>"))
    _mark_onset(figure, summary, x)
    figure.update_layout(**{**_LAYOUT, "height": max(300, 18 * len(modules) + 120)}, xaxis_title=label,
                         title=dict(text="weight change from the previous checkpoint, per module", font=dict(size=13)),
                         yaxis=dict(autorange="reversed"))
    return figure


def run_table(summary: RunSummary) -> pd.DataFrame:
    """One row per checkpoint: file, epoch, step, the deciding metric, the largest module change, marks."""
    metric = summary.best.metric if summary.best else None
    largest = summary.largest_change()
    rows = []
    for c in summary.checkpoints:
        marks = [m for m, hit in (("best", summary.best and summary.best.path == c.path),
                                  ("NaN/Inf", summary.nan_onset and summary.nan_onset.path == c.path)) if hit]
        change, module = largest.get(c.path, (math.nan, ""))
        rows.append({"checkpoint": c.name, "epoch": c.epoch, "step": c.step,
                     (metric or "metric"): c.scalars.get(metric, math.nan) if metric else math.nan,
                     "largest change": change, "module": module, "": " ".join(marks)})
    return pd.DataFrame(rows)
