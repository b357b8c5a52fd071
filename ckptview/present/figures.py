"""
Plotly figures for the explorer (the only place that builds them). Every figure is sized to stay
small on the wire: trees are capped by node count, per-tensor plots by point count, heatmaps are
downsampled, so a 20,000-tensor file never pushes megabytes through Jupyter's IOPub channel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

from ckptview.present.text import human_bytes, human_count

MAX_TREE_NODES = 1500
MAX_POINTS = 3000
HEATMAP_SIDE = 96

# No width anywhere: every figure takes its container's width (autosize), so it fits a 640 px
# notebook as well as a 1920 px one. Backgrounds are transparent and the explorer's CSS colours
# text and grid lines from JupyterLab's theme variables (present/html.py), so one figure reads
# right in the light and the dark theme, and follows a theme switch without a round trip to the kernel.
_LAYOUT = dict(margin=dict(l=60, r=20, t=40, b=50), height=380, template="plotly_white", autosize=True,
               paper_bgcolor="rgba(0,0,0,0)", plot_bgcolor="rgba(0,0,0,0)")
# A legend under the plot, where it never covers data (above it, it meets the title on narrow screens).
_LEGEND_BELOW = dict(orientation="h", yanchor="top", y=-0.22, xanchor="left", x=0)


def _title(text: str) -> dict[str, Any]:
    return dict(text=text, font=dict(size=13), x=0, xanchor="left", xref="paper")


def log_axis(values: Any) -> dict[str, Any]:
    """
    A log axis with one labelled tick per decade (10⁻⁶ … 10⁰) where the values span decades: plotly's
    own choice over one to three decades labels the minor ticks "2 … 9", which read as values.
    """
    finite = np.asarray(values, dtype=float)
    finite = finite[np.isfinite(finite) & (finite > 0)]
    axis: dict[str, Any] = dict(type="log", exponentformat="power", showexponent="all")
    if len(finite):
        span = math.log10(finite.max()) - math.log10(finite.min())
        if span >= 1:
            axis["dtick"] = 1 if span <= 12 else 2
    return axis


def module_treemap(root: Any, title: str, *, max_nodes: int = MAX_TREE_NODES) -> go.Figure:
    """
    A treemap of parameters by module under `root` (a `TreeNode` of a `ModuleTree`), breadth first
    up to `max_nodes` nodes (deep leaves of huge models are summed into their parents rather than drawn).
    """
    # customdata: the module path a click on a leaf tile opens in the explorer's Tensors tab
    ids, labels, parents, values, hover, paths = [title], [title], [""], [root.parameter_count], [""], [root.path]
    queue = [(child, title) for child in root.children]
    while queue and len(ids) < max_nodes:
        node, parent = queue.pop(0)
        node_id = f"{parent}/{node.name}"
        ids.append(node_id)
        labels.append(node.name + (f" ×{node.repeat}" if node.repeat > 1 else ""))
        parents.append(parent)
        values.append(node.parameter_count)
        paths.append(node.path)
        hover.append(f"{node.path}<br>{human_count(node.parameter_count)} elements, {human_bytes(node.nbytes)}"
                     f"<br>{', '.join(node.layer_kinds[:3])}")
        if node.repeat == 1:  # a folded run's children describe one block, not the run's total
            queue.extend((child, node_id) for child in node.children)
    figure = go.Figure(go.Treemap(ids=ids, labels=labels, parents=parents, values=values, branchvalues="total",
                                  hovertext=hover, hoverinfo="label+text+percent root", maxdepth=3, customdata=paths))
    figure.update_layout(**{**_LAYOUT, "height": 420, "margin": dict(l=5, r=5, t=30, b=5)},
                         title=_title("parameters by module (elements); click a tile to zoom in, a layer to list "
                                      "its tensors"))
    return figure


def histogram(edges: Sequence[float], counts: Sequence[float], title: str) -> go.Figure:
    """A histogram drawn from precomputed bin edges and counts (len(edges) == len(counts) + 1)."""
    edges = np.asarray(edges, dtype=float)
    centers = (edges[:-1] + edges[1:]) / 2 if len(edges) > 1 else edges
    figure = go.Figure(go.Bar(x=centers, y=list(counts), width=np.diff(edges) if len(edges) > 1 else None,
                              marker_color="#4c78a8", name="count",
                              hovertemplate="%{x:.4g}: %{y:,} elements<extra></extra>"))
    figure.update_layout(**{**_LAYOUT, "height": 300}, title=_title(title), bargap=0,
                         xaxis_title="value (the tensor's own units)", yaxis_title="elements per bin")
    return figure


def downsample_2d(tensor: torch.Tensor, side: int = HEATMAP_SIDE) -> np.ndarray:
    """A 2-D tensor reduced to at most side×side cells by block means (NaN/Inf kept visible as NaN)."""
    values = tensor.detach().to(torch.float32)
    values = torch.where(torch.isfinite(values), values, torch.tensor(float("nan")))
    rows, cols = values.shape
    out_rows, out_cols = min(rows, side), min(cols, side)
    if (out_rows, out_cols) != (rows, cols):
        values = torch.nn.functional.adaptive_avg_pool2d(values[None, None], (out_rows, out_cols))[0, 0]
    return values.numpy()


def heatmap(matrix: np.ndarray, title: str, *, original_shape: Sequence[int]) -> go.Figure:
    """A diverging heatmap of a (downsampled) weight matrix, centred on zero; axes count the original rows and columns."""
    limit = float(np.nanmax(np.abs(matrix))) if np.isfinite(matrix).any() else 1.0
    rows, cols = matrix.shape
    shown = f"{rows}×{cols}"
    downsampled = tuple(matrix.shape) != tuple(original_shape)
    note = f" (block means, {shown} of {'×'.join(map(str, original_shape))})" if downsampled else ""
    # each cell at the first original row/column of its block (adaptive_avg_pool2d's bins)
    y = [i * original_shape[0] // rows for i in range(rows)]
    x = [j * original_shape[1] // cols for j in range(cols)]
    figure = go.Figure(go.Heatmap(z=matrix, x=x, y=y, colorscale="RdBu", zmid=0, zmin=-limit, zmax=limit,
                                  colorbar=dict(thickness=10, title=dict(text="value", side="right")),
                                  hovertemplate="row %{y}, column %{x}: %{z:.4g}<extra></extra>"))
    figure.update_layout(**{**_LAYOUT, "height": 320}, title=_title(title + note),
                         xaxis_title="column (input) index", yaxis_title="row (output) index")
    figure.update_yaxes(autorange="reversed")
    return figure


# How each part of a file is drawn by depth: the model's weights as lines (the depth profile people
# read), everything else as markers only, so buffers and optimizer moments do not zig-zag the lines.
_PARTS = {"weights": ("lines+markers", None), "buffers": ("markers", "diamond"),
          "optimizer state": ("markers", "circle-open"), "other": ("markers", "square-open")}


def stats_by_depth(frame: pd.DataFrame, outliers: set[str], *, parts: Sequence[str] = ("weights", "buffers")) -> go.Figure:
    """
    std and abs-max of each floating tensor in file order (≈ depth), log scale, with tensors holding
    NaN/Inf and flagged outliers drawn as red markers. `frame` has name, std, abs_max, nan_count,
    inf_count, and optionally `part` ("weights", "buffers", "optimizer state", "other";
    `frames.stats_frame`) and `label`: only the `parts` asked for are drawn, each its own trace.
    """
    frame = frame.reset_index(drop=True)
    frame = frame[frame["std"].notna()] if "std" in frame else frame
    if "part" in frame:
        frame = frame[frame["part"].isin(parts)]
    frame = frame.reset_index(drop=True)
    if len(frame) > MAX_POINTS:  # keep every flagged tensor, thin the rest evenly
        flagged = frame["name"].isin(outliers) | (frame["nan_count"] > 0) | (frame["inf_count"] > 0)
        step = math.ceil(len(frame) / MAX_POINTS)
        frame = frame[flagged | (frame.index % step == 0)]
    labels = frame["label"] if "label" in frame else frame["name"]
    groups = frame.groupby(frame["part"], sort=False) if "part" in frame else [("weights", frame)]
    figure = go.Figure()
    for part, members in groups:
        mode, symbol = _PARTS.get(part, ("markers", None))
        text = labels[members.index]
        for column, name in (("std", "std"), ("abs_max", "abs-max")):
            suffix = "" if part == "weights" else f" ({part})"
            figure.add_trace(go.Scatter(
                x=members.index.to_numpy(), y=members[column], mode=mode, name=name + suffix, text=text,
                customdata=frame["name"][members.index],  # a click opens this tensor in the explorer's Tensors tab
                marker=dict(size=4 if symbol is None else 6, symbol=symbol), legendgroup=part,
                hovertemplate=f"%{{text}}<br>{name} %{{y:.3g}}<extra>{part}</extra>"))
    bad = frame[frame["name"].isin(outliers) | (frame["nan_count"] > 0) | (frame["inf_count"] > 0)]
    figure.add_trace(go.Scatter(x=bad.index.to_numpy(), y=bad["abs_max"].fillna(0).clip(lower=1e-12),
                                mode="markers", name="outlier / NaN / Inf", text=labels[bad.index],
                                customdata=bad["name"],
                                marker=dict(color="#d62728", size=11, symbol="x"),
                                hovertemplate="%{text}<extra>flagged</extra>"))
    shown = " and ".join(parts)
    figure.update_layout(**{**_LAYOUT, "height": 420, "margin": dict(l=60, r=20, t=40, b=110)},
                         title=_title(f"std and abs-max per tensor by depth ({shown})"),
                         xaxis_title="tensor index (≈ depth)", legend=_LEGEND_BELOW)
    figure.update_yaxes(title="std, abs-max (log scale)",
                        **log_axis(np.concatenate([frame["std"].to_numpy(float), frame["abs_max"].to_numpy(float)])))
    return figure


def batchnorm_buffers(layers: Sequence[tuple[str, torch.Tensor, torch.Tensor]]) -> go.Figure:
    """Box plots of running_mean and running_var per BatchNorm layer (channels as points)."""
    from plotly.subplots import make_subplots

    figure = make_subplots(rows=2, cols=1, shared_xaxes=True, subplot_titles=("running_mean", "running_var"),
                           vertical_spacing=0.1)
    for name, mean, var in layers:
        figure.add_trace(go.Box(y=mean.float().numpy(), name=name, marker_color="#4c78a8", showlegend=False,
                                boxpoints=False), row=1, col=1)
        figure.add_trace(go.Box(y=var.float().numpy(), name=name, marker_color="#f58518", showlegend=False,
                                boxpoints=False), row=2, col=1)
    figure.update_layout(**{**_LAYOUT, "height": 480, "margin": dict(l=70, r=20, t=50, b=80)},
                         title=_title("BatchNorm running statistics per layer (one box: the layer's channels)"))
    figure.update_yaxes(title="running mean", row=1, col=1)
    variances = np.concatenate([var.float().numpy().ravel() for _, _, var in layers]) if layers else []
    figure.update_yaxes(title="running variance (log)", row=2, col=1, **log_axis(variances))
    figure.update_xaxes(title="BatchNorm layer", row=2, col=1)
    return figure


def value_diff_by_module(frame: pd.DataFrame, *, module_column: str = "module", max_rows: int = 80) -> go.Figure:
    """A heatmap: modules (rows) × relative change / max abs diff / 1 − cosine (columns, each scaled 0..1)."""
    metrics = [c for c in ("rel_change", "max_abs_diff", "cosine") if c in frame]
    table = frame.set_index(module_column)[metrics].head(max_rows).astype(float)
    if "cosine" in table:
        table["cosine"] = 1.0 - table["cosine"]
    # short column names: long ones are turned on their side in a narrow notebook, up into the title
    table = table.rename(columns={"rel_change": "‖a−b‖/‖a‖", "max_abs_diff": "max |a−b|", "cosine": "1 − cos"})
    scaled = table / table.max().replace(0, 1)
    figure = go.Figure(go.Heatmap(z=scaled.to_numpy(), x=list(table.columns), y=list(table.index),
                                  text=table.map(lambda v: f"{v:.3g}").to_numpy(), texttemplate="%{text}",
                                  # from transparent: an unchanged module shows the notebook's own
                                  # background (plotly's "Reds" starts white, a pale box in a dark theme)
                                  colorscale=[[0.0, "rgba(220, 53, 69, 0)"], [1.0, "rgba(220, 53, 69, 0.9)"]],
                                  zmin=0, zmax=1, showscale=False,
                                  hovertemplate="%{y}<br>%{x}: %{text}<extra></extra>"))
    figure.update_layout(**{**_LAYOUT, "height": max(260, 22 * len(table) + 130), "margin": dict(l=10, r=10, t=95, b=30)},
                         title=_title("value difference per module<br><span style='font-size:11px'>relative change, "
                                      "largest |a−b|, 1 − cosine; colour: each column scaled to its largest; integer "
                                      "counters are listed apart</span>"))
    # each name on two short lines: in a 270 px explorer (a narrow notebook beside the file browser) three
    # one-line names ran into each other over their columns
    figure.update_xaxes(side="top", tickangle=0, tickvals=list(table.columns),
                        ticktext=[_TWO_LINE_METRICS.get(name, name) for name in table.columns])
    figure.update_yaxes(autorange="reversed", automargin=True)
    return figure


_TWO_LINE_METRICS = {"‖a−b‖/‖a‖": "‖a−b‖<br>/‖a‖", "max |a−b|": "max<br>|a−b|", "1 − cos": "1 −<br>cos"}
