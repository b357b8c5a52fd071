"""Training state tab: optimizer groups and per-parameter state mapped to names, scheduler, scaler, Lightning details."""

from __future__ import annotations

from typing import Any

import ipywidgets as widgets

from ckptview.ui.base import ExplorerState, Panel, banner_html, optional_module


class TrainingPanel(Panel):
    title = "Training state"

    def __init__(self, state: ExplorerState) -> None:
        self.content = widgets.HTML()
        super().__init__(state, [self.content])

    def _compute(self) -> Any:
        return optional_module("ckptview.analyzers.training")

    def _show(self, training: Any) -> None:
        if training is None:
            self.content.value = banner_html("info", "The training-state analyzer (ckptview.analyzers.training) is not "
                                                     "in this build yet; the Overview tab lists the optimizer, scheduler "
                                                     "and progress sections.")
