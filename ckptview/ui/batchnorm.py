"""BatchNorm tab: findings by severity with what they mean, and running_mean/running_var per layer."""

from __future__ import annotations

from typing import Any

import ipywidgets as widgets
import plotly.graph_objects as go

from ckptview.analyzers.batchnorm import BatchNormReport
from ckptview.present.html import batchnorm_findings_html
from ckptview.present.views import batchnorm_view
from ckptview.ui.base import ExplorerState, FigureBox, Panel
from ckptview.ui.grid import download_links


class BatchNormPanel(Panel):
    title = "BatchNorm"

    def __init__(self, state: ExplorerState) -> None:
        self.findings = widgets.HTML()
        # every finding, one row each (the table above groups them by check)
        self.downloads = widgets.HTML()
        self.figure = FigureBox()
        super().__init__(state, [self.findings, self.downloads, self.figure])

    def _compute(self) -> tuple[BatchNormReport, go.Figure | None]:
        return batchnorm_view(self.state.checkpoint)

    def _show(self, result: tuple[BatchNormReport, Any]) -> None:
        report, figure = result
        self.findings.value = batchnorm_findings_html(report)
        self.downloads.value = download_links(report.to_frame(), "batchnorm-findings") if report.findings else ""
        if figure is None:
            self.figure.clear()
        else:
            self.figure.show(figure)
