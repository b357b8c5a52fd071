"""Plotly figures of a checkpoint's training state: the learning-rate schedule and the optimizer's moments per layer."""

from __future__ import annotations

from collections.abc import Sequence

import plotly.graph_objects as go

from ckptview.analyzers.training import LrSchedule, MomentNorm
from ckptview.present.figures import _LAYOUT, _LEGEND_BELOW, _title, log_axis

# Parameters drawn at most in the moments plot, one row each; the table below it lists them all.
MAX_MOMENT_ROWS = 150
_ROW_PX = 16


def _legend_below(plot_px: int) -> dict:
    # under the x-axis title, not on it: the offset is in pixels, the legend's y in fractions of the plot
    return {**_LEGEND_BELOW, "y": -66 / max(plot_px, 1)}


def lr_schedule_figure(schedules: Sequence[tuple[str, LrSchedule]], title: str) -> go.Figure:
    """
    The learning rate per scheduler step of each (label, schedule) and param group, with the step
    the file was saved at marked (a dashed line, and a dot on each curve).
    """
    figure = go.Figure()
    for label, schedule in schedules:
        groups = len(schedule.lrs)
        for group, lrs in enumerate(schedule.lrs):
            name = label + (f" group {group}" if groups > 1 else "")
            figure.add_trace(go.Scatter(x=list(schedule.steps), y=list(lrs), mode="lines", name=name,
                                        hovertemplate=name + "<br>step %{x}<br>lr %{y:.4g}<extra></extra>"))
        if schedule.current is not None and schedule.current in schedule.steps:
            at = schedule.steps.index(schedule.current)
            figure.add_trace(go.Scatter(x=[schedule.current] * groups, y=[lrs[at] for lrs in schedule.lrs],
                                        mode="markers", marker={"size": 9, "color": "#d93025"},
                                        name=f"saved at step {schedule.current}",
                                        hovertemplate="saved here: step %{x}<br>lr %{y:.4g}<extra></extra>"))
            figure.add_vline(x=schedule.current, line={"color": "#d93025", "dash": "dash", "width": 1})
    figure.update_layout(**_LAYOUT)
    figure.update_layout(title=_title(title), height=340, legend=_legend_below(340 - 40 - 110),
                         margin={"l": 70, "r": 20, "t": 40, "b": 110},
                         xaxis_title="step (epoch or batch)",  # fits a 250 px panel
                         yaxis={"title": "learning rate", "exponentformat": "power"})
    return figure


def moment_norms_figure(norms: Sequence[MomentNorm], title: str, *, max_rows: int = MAX_MOMENT_ROWS) -> go.Figure:
    """
    One row per parameter (in the optimizer's order, top to bottom), one dot per moment: the RMS of
    each state tensor (L2 norm / √elements, so layers of different sizes compare), on a log axis.
    """
    parameters = list(dict.fromkeys(n.parameter for n in norms))[:max_rows]
    shown = set(parameters)
    figure = go.Figure()
    by_moment: dict[str, list[MomentNorm]] = {}
    for norm in norms:
        if norm.parameter in shown:
            by_moment.setdefault(norm.moment, []).append(norm)
    for moment, rows in by_moment.items():
        figure.add_trace(go.Scatter(
            x=[r.rms for r in rows], y=[r.parameter for r in rows], mode="markers", name=moment,
            customdata=[[r.l2_norm, r.numel] for r in rows],
            hovertemplate="%{y}<br>" + moment + ": RMS %{x:.3g}<br>L2 norm %{customdata[0]:.3g}"
                          "<br>%{customdata[1]:,} elements<extra></extra>"))
    more = f" (first {max_rows} of {len(dict.fromkeys(n.parameter for n in norms)):,} parameters)" \
        if len(shown) < len(dict.fromkeys(n.parameter for n in norms)) else ""
    height = max(260, 140 + _ROW_PX * len(parameters))
    figure.update_layout(**_LAYOUT)
    figure.update_layout(
        title=_title(title + more), height=height, legend=_legend_below(height - 140),
        margin={"l": 20, "r": 20, "t": 40, "b": 100},
        xaxis=dict(title="RMS: L2 norm / √elements (log)", **log_axis([n.rms for n in norms])),
        yaxis={"categoryorder": "array", "categoryarray": parameters[::-1], "automargin": True, "tickfont": {"size": 10}},
    )
    return figure

