"""The Inference tab: `InferencePanel`, built the first time the tab is opened."""

from __future__ import annotations

import ipywidgets as widgets

from ckptview.ui.base import ExplorerState


class InferenceTab(widgets.VBox):
    """
    Holds `ckptview.ui.inference_panel.InferencePanel(state)` once opened. Building it imports plotly's
    FigureWidget and probes devices (about a second), which `explore()` should not pay up front.
    """

    title = "Inference"

    def __init__(self, state: ExplorerState) -> None:
        self.state = state
        self.panel: widgets.Widget | None = None
        super().__init__([widgets.HTML("<p>Loading the inference panel…</p>")])

    def activate(self) -> None:
        if self.panel is not None:
            return
        from ckptview.ui.inference_panel import InferencePanel

        self.panel = InferencePanel(self.state)
        self.panel.activate()
        self.children = (self.panel,)
