"""Training state tab: optimizer groups and per-parameter state mapped to names, scheduler, scaler, Lightning details."""

from __future__ import annotations

import ipywidgets as widgets

from ckptview.analyzers.training import TrainingState, training_state
from ckptview.present.html import training_html
from ckptview.ui.base import ExplorerState, Panel


class TrainingPanel(Panel):
    title = "Training state"

    def __init__(self, state: ExplorerState) -> None:
        self.content = widgets.HTML()
        super().__init__(state, [self.content])

    def _compute(self) -> TrainingState:
        return training_state(self.state.checkpoint)

    def _show(self, training: TrainingState) -> None:
        self.content.value = training_html(training)
