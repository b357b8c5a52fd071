"""Training state tab: optimizer groups and per-parameter state mapped to names, scheduler, scaler, Lightning details."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ipywidgets as widgets

from ckptview.analyzers.training import TrainingState, training_state
from ckptview.present.frames import flat_values, optimizer_groups_frame
from ckptview.ui.base import ExplorerState, Panel, esc

# Per-parameter rows drawn at most per optimizer (an LLM's optimizer has thousands).
MAX_PARAM_ROWS = 500


class TrainingPanel(Panel):
    title = "Training state"

    def __init__(self, state: ExplorerState) -> None:
        self.content = widgets.HTML()
        super().__init__(state, [self.content])

    def _compute(self) -> TrainingState:
        return training_state(self.state.checkpoint)

    def _show(self, training: TrainingState) -> None:
        parts = []
        for title, values in (("Progress", training.progress), ("Hyper-parameters", training.hyper_parameters),
                              ("Lightning", training.lightning), ("AMP grad scaler", training.grad_scaler)):
            if values:
                parts.append(_values_table(title, values))
        for number, scheduler in enumerate(training.schedulers):
            parts.append(_values_table(f"LR scheduler {number}", scheduler))
        for optimizer in training.optimizers:
            path = ".".join(str(p) for p in optimizer.path)
            params = optimizer.to_frame()
            shown = params.head(MAX_PARAM_ROWS)
            more = f"<p>… and {len(params) - len(shown):,} more parameters.</p>" if len(params) > len(shown) else ""
            parts.append(
                f"<h4>Optimizer <code>{esc(path)}</code>: {esc(optimizer.optimizer_kind)}</h4>"
                f"<p>Parameter names: {esc(optimizer.mapping_note)}</p>"
                + optimizer_groups_frame(optimizer).to_html(index=False, classes="ckptview-table", border=0)
                + "<details><summary>per-parameter state</summary>"
                + shown.to_html(index=False, classes="ckptview-table", border=0, na_rep="—") + more + "</details>"
            )
        self.content.value = "".join(parts) or (
            "<p>No training state: this checkpoint holds only weights (no optimizer, scheduler, epoch or "
            "hyper-parameters).</p>")


def _values_table(title: str, values: Mapping[str, Any]) -> str:
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in flat_values(values).items())
    return f"<h4>{esc(title)}</h4><table class='ckptview-table'>{rows}</table>"
