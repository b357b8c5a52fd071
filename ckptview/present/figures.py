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

_LAYOUT = dict(margin=dict(l=40, r=10, t=40, b=30), height=380, template="plotly_white")


def module_treemap(root: Any, title: str, *, max_nodes: int = MAX_TREE_NODES) -> go.Figure:
    """
    A treemap of parameters by module under `root` (a `TreeNode` of a `ModuleTree`), breadth first
    up to `max_nodes` nodes (deep leaves of huge models are summed into their parents rather than drawn).
    """
    ids, labels, parents, values, hover = [title], [title], [""], [root.parameter_count], [""]
    queue = [(child, title) for child in root.children]
    while queue and len(ids) < max_nodes:
        node, parent = queue.pop(0)
        node_id = f"{parent}/{node.name}"
        ids.append(node_id)
        labels.append(node.name + (f" ×{node.repeat}" if node.repeat > 1 else ""))
        parents.append(parent)
        values.append(node.parameter_count)
        hover.append(f"{node.path}<br>{human_count(node.parameter_count)} elements, {human_bytes(node.nbytes)}"
                     f"<br>{', '.join(node.layer_kinds[:3])}")
        if node.repeat == 1:  # a folded run's children describe one block, not the run's total
            queue.extend((child, node_id) for child in node.children)
    figure = go.Figure(go.Treemap(ids=ids, labels=labels, parents=parents, values=values, branchvalues="total",
                                  hovertext=hover, hoverinfo="label+text+percent root", maxdepth=3))
    figure.update_layout(**{**_LAYOUT, "height": 420, "margin": dict(l=5, r=5, t=30, b=5)},
                         title=dict(text="parameters by module", font=dict(size=13)))
    return figure


def histogram(edges: Sequence[float], counts: Sequence[float], title: str) -> go.Figure:
    """A histogram drawn from precomputed bin edges and counts (len(edges) == len(counts) + 1)."""
    edges = np.asarray(edges, dtype=float)
    centers = (edges[:-1] + edges[1:]) / 2 if len(edges) > 1 else edges
    figure = go.Figure(go.Bar(x=centers, y=list(counts), width=np.diff(edges) if len(edges) > 1 else None,
                              marker_color="#4c78a8", name="count"))
    figure.update_layout(**{**_LAYOUT, "height": 300}, title=dict(text=title, font=dict(size=13)), bargap=0)
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
    """A diverging heatmap of a (downsampled) weight matrix, centred on zero."""
    limit = float(np.nanmax(np.abs(matrix))) if np.isfinite(matrix).any() else 1.0
    shown = "×".join(str(s) for s in matrix.shape)
    note = "" if tuple(matrix.shape) == tuple(original_shape) else f" (block means, {shown} of {'×'.join(map(str, original_shape))})"
    figure = go.Figure(go.Heatmap(z=matrix, colorscale="RdBu", zmid=0, zmin=-limit, zmax=limit, colorbar=dict(thickness=10)))
    figure.update_layout(**{**_LAYOUT, "height": 320}, title=dict(text=title + note, font=dict(size=13)))
    figure.update_yaxes(autorange="reversed")
    return figure


def stats_by_depth(frame: pd.DataFrame, outliers: set[str]) -> go.Figure:
    """
    std and abs-max of each floating tensor in file order (≈ depth), log scale, with tensors holding
    NaN/Inf and flagged outliers drawn as red markers. `frame` has name, std, abs_max, nan_count, inf_count.
    """
    frame = frame.reset_index(drop=True)
    frame = frame[frame["std"].notna()] if "std" in frame else frame
    if len(frame) > MAX_POINTS:  # keep every flagged tensor, thin the rest evenly
        flagged = frame["name"].isin(outliers) | (frame["nan_count"] > 0) | (frame["inf_count"] > 0)
        step = math.ceil(len(frame) / MAX_POINTS)
        frame = frame[flagged | (frame.index % step == 0)]
    depth = frame.index.to_numpy()
    figure = go.Figure()
    figure.add_trace(go.Scatter(x=depth, y=frame["std"], mode="lines+markers", name="std", text=frame["name"],
                                  marker=dict(size=4), hovertemplate="%{text}<br>std %{y:.3g}<extra></extra>"))
    figure.add_trace(go.Scatter(x=depth, y=frame["abs_max"], mode="lines+markers", name="abs-max", text=frame["name"],
                                  marker=dict(size=4), hovertemplate="%{text}<br>abs-max %{y:.3g}<extra></extra>"))
    bad = frame[frame["name"].isin(outliers) | (frame["nan_count"] > 0) | (frame["inf_count"] > 0)]
    figure.add_trace(go.Scatter(x=bad.index.to_numpy(), y=bad["abs_max"].fillna(0).clip(lower=1e-12),
                                  mode="markers", name="outlier / NaN / Inf", text=bad["name"],
                                  marker=dict(color="#d62728", size=11, symbol="x"),
                                  hovertemplate="%{text}<extra>flagged</extra>"))
    figure.update_layout(**_LAYOUT, title=dict(text="per-tensor std and abs-max by depth (file order)", font=dict(size=13)),
                         xaxis_title="tensor index (≈ depth)", legend=dict(orientation="h", y=1.02, x=1, xanchor="right"))
    figure.update_yaxes(type="log")
    return figure


def batchnorm_buffers(layers: Sequence[tuple[str, torch.Tensor, torch.Tensor]]) -> go.Figure:
    """Box plots of running_mean and running_var per BatchNorm layer (channels as points)."""
    from plotly.subplots import make_subplots

    figure = make_subplots(rows=2, cols=1, shared_xaxes=True, subplot_titles=("running_mean", "running_var"),
                           vertical_spacing=0.08)
    for name, mean, var in layers:
        figure.add_trace(go.Box(y=mean.float().numpy(), name=name, marker_color="#4c78a8", showlegend=False,
                                boxpoints=False), row=1, col=1)
        figure.add_trace(go.Box(y=var.float().numpy(), name=name, marker_color="#f58518", showlegend=False,
                                boxpoints=False), row=2, col=1)
    figure.update_layout(**{**_LAYOUT, "height": 460}, title=dict(text="BatchNorm running statistics per layer",
                                                                  font=dict(size=13)))
    figure.update_yaxes(type="log", row=2, col=1)
    return figure


def value_diff_by_module(frame: pd.DataFrame, *, module_column: str = "module", max_rows: int = 80) -> go.Figure:
    """A heatmap: modules (rows) × relative change / max abs diff / 1 − cosine (columns, each scaled 0..1)."""
    metrics = [c for c in ("rel_change", "max_abs_diff", "cosine") if c in frame]
    table = frame.set_index(module_column)[metrics].head(max_rows).astype(float)
    if "cosine" in table:
        table["cosine"] = 1.0 - table["cosine"]
        table = table.rename(columns={"cosine": "1 − cosine"})
    scaled = table / table.max().replace(0, 1)
    figure = go.Figure(go.Heatmap(z=scaled.to_numpy(), x=list(table.columns), y=list(table.index),
                                  text=table.map(lambda v: f"{v:.3g}").to_numpy(), texttemplate="%{text}",
                                  colorscale="Reds", zmin=0, zmax=1, showscale=False))
    figure.update_layout(**{**_LAYOUT, "height": max(240, 22 * len(table) + 80)},
                         title=dict(text="value difference per module", font=dict(size=13)))
    figure.update_yaxes(autorange="reversed")
    return figure
