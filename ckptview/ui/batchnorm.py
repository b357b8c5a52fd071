"""BatchNorm tab: findings by severity with what they mean, and running_mean/running_var per layer."""

from __future__ import annotations

from typing import Any

import ipywidgets as widgets
import plotly.graph_objects as go

from ckptview.analyzers.batchnorm import BatchNormReport, batchnorm_checks
from ckptview.analyzers.sections import model_state_dict
from ckptview.present import figures
from ckptview.ui.base import ExplorerState, FigureBox, Panel, esc

_SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2, "ok": 3}
# Layers plotted at most: past this the boxes are too thin to read and the figure too heavy to send.
MAX_PLOTTED_LAYERS = 64


class BatchNormPanel(Panel):
    title = "BatchNorm"

    def __init__(self, state: ExplorerState) -> None:
        self.findings = widgets.HTML()
        self.figure = FigureBox()
        self.report_result: BatchNormReport | None = None
        super().__init__(state, [self.findings, self.figure])

    def _compute(self) -> tuple[BatchNormReport, go.Figure | None]:
        ckpt = self.state.checkpoint
        report = batchnorm_checks(ckpt)
        state = model_state_dict(ckpt)
        layers = [(layer.module, state[f"{prefix}running_mean"].load(), state[f"{prefix}running_var"].load())
                  for layer in report.layers[:MAX_PLOTTED_LAYERS] if layer.tracks_running_stats
                  for prefix in [f"{layer.module}." if layer.module else ""]]
        return report, figures.batchnorm_buffers(layers) if layers else None

    def _show(self, result: tuple[BatchNormReport, Any]) -> None:
        report, figure = result
        self.report_result = report
        findings = sorted(report.findings, key=lambda f: _SEVERITY_ORDER.get(f.severity, 9))
        rows = "".join(f"<tr><td class='sev-{esc(f.severity)}'>{esc(f.severity)}</td><td>{esc(f.check)}</td>"
                       f"<td><code>{esc(f.module or '—')}</code></td><td>{esc(f.message)}</td></tr>" for f in findings)
        counts = ", ".join(f"{sum(f.severity == s for f in findings)} {s}" for s in ("error", "warning", "info"))
        self.findings.value = (
            f"<p><b>{len(report.layers)}</b> BatchNorm layers; findings: {counts}.</p>"
            "<table class='ckptview-table'><tr><th>severity</th><th>check</th><th>module</th><th>what it means</th></tr>"
            f"{rows}</table>" if report.layers else "<p>No BatchNorm layers in this checkpoint's model.</p>")
        if figure is None:
            self.figure.clear()
        else:
            self.figure.show(figure)
