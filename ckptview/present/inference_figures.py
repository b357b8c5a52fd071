"""Plotly figures for inference results: latency per precision, annotated with how far each output moved."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import plotly.graph_objects as go

_COLOURS = {"fp32": "#1a73e8", "fp16": "#f9ab00", "bf16": "#e37400", "int8": "#188038"}


def latency_bars(rows: Sequence[Mapping[str, Any]], *, title: str = "latency per precision") -> go.Figure:
    """
    One bar per precision that ran: median latency in ms, the fastest call as a marker tick in
    the hover, and the cosine similarity to fp32 as the bar's label.

    Args:
        rows: `PrecisionComparison.table()` rows (precision, device, status, latency_ms, latency_min_ms, cosine, ...).
    """
    ran = [row for row in rows if row.get("latency_ms") is not None]
    labels = [f"{row['precision']} ({row['device']})" for row in ran]
    text = ["reference" if row.get("cosine") is None else f"cos {row['cosine']:.5f}" for row in ran]
    figure = go.Figure(go.Bar(
        x=labels,
        y=[row["latency_ms"] for row in ran],
        text=text,
        textposition="outside",
        marker_color=[_COLOURS.get(row["precision"], "#5f6368") for row in ran],
        customdata=[[row.get("latency_min_ms") or 0.0, row.get("size_bytes") or 0] for row in ran],
        hovertemplate="%{x}<br>median %{y:.3f} ms<br>min %{customdata[0]:.3f} ms<br>%{customdata[1]:,} bytes"
                      "<extra></extra>",
    ))
    skipped = [f"{row['precision']}: {row['status']}" for row in rows if row.get("latency_ms") is None]
    figure.update_layout(
        title=title + (f"<br><sup>not run: {'; '.join(skipped)}</sup>" if skipped else ""),
        yaxis_title="median latency (ms)",
        margin=dict(l=50, r=10, t=60 if skipped else 40, b=30),
        height=320,
        template="plotly_white",
        autosize=True,  # no width: the explorer's box decides it
        paper_bgcolor="rgba(0,0,0,0)",  # the explorer's CSS colours text from the theme
        plot_bgcolor="rgba(0,0,0,0)",
        showlegend=False,
    )
    return figure
