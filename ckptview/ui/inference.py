"""The Inference tab: the inference engineer's `InferencePanel`, built the first time the tab is opened."""

from __future__ import annotations

import ipywidgets as widgets

from ckptview.ui.base import ExplorerState, banner_html, optional_module


class InferenceTab(widgets.VBox):
    """
    Holds `ckptview.ui.inference_panel.InferencePanel(state)` once opened. Building it imports plotly's
    FigureWidget and probes devices (about a second), which `explore()` should not pay up front;
    where that module is not installed the tab says so.
    """

    title = "Inference"

    def __init__(self, state: ExplorerState) -> None:
        self.state = state
        self.panel: widgets.Widget | None = None
        super().__init__([widgets.HTML("<p>Loading the inference panel…</p>")])

    def activate(self) -> None:
        if self.panel is not None:
            return
        module = optional_module("ckptview.ui.inference_panel")
        if module is None:
            self.panel = widgets.HTML(banner_html(
                "info", "Running the model on a device is not part of this build (ckptview.ui.inference_panel "
                        "is missing); every other tab works."))
        else:
            self.panel = module.InferencePanel(self.state)
            self.panel.activate()
        self.children = (self.panel,)
