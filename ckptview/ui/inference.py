"""The Inference tab: the inference engineer's `InferencePanel` when it is installed, else a note saying so."""

from __future__ import annotations

import ipywidgets as widgets

from ckptview.ui.base import ExplorerState, banner_html, optional_module


def inference_panel(state: ExplorerState) -> widgets.Widget:
    """`ckptview.ui.inference_panel.InferencePanel(state)`, imported only now so its weight is paid when used."""
    module = optional_module("ckptview.ui.inference_panel")
    if module is None:
        placeholder = widgets.VBox([widgets.HTML(banner_html(
            "info", "Running the model on a device is not part of this build yet (ckptview.ui.inference_panel "
                    "is missing); every other tab works."))])
        placeholder.title = "Inference"
        return placeholder
    panel = module.InferencePanel(state)
    panel.title = "Inference"
    return panel
