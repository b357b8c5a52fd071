"""
Training state tab: progress, hyper-parameters, each LR scheduler named and its schedule drawn, each
optimizer with its per-parameter state mapped to names, and the optimizer's moments per layer.
"""

from __future__ import annotations

import dataclasses

import ipywidgets as widgets
import pandas as pd

from ckptview.analyzers.training import LrSchedule, MomentNorm, TrainingState, moment_norms, training_state
from ckptview.present.html import moment_norms_html, training_html
from ckptview.present.training_figures import lr_schedule_figure, moment_norms_figure
from ckptview.ui.base import ExplorerState, FigureBox, Panel
from ckptview.ui.grid import download_links


class TrainingPanel(Panel):
    title = "Training state"

    def __init__(self, state: ExplorerState) -> None:
        self.content = widgets.HTML()
        self.schedule = FigureBox()
        self.moments = FigureBox()
        self.moments_table = widgets.HTML()
        self.downloads = widgets.HTML()  # each optimizer's per-parameter table as CSV/JSON
        self.training: TrainingState | None = None
        self.norms: tuple[MomentNorm, ...] = ()
        self.schedule.clear()
        self.moments.clear()
        super().__init__(state, [self.content, self.downloads, self.schedule, self.moments, self.moments_table])

    def _compute(self) -> tuple[TrainingState, tuple[LrSchedule, ...]]:
        training = training_state(self.state.checkpoint)
        return training, training.lr_schedules()

    def _show(self, result: tuple[TrainingState, tuple[LrSchedule, ...]]) -> None:
        training, schedules = result
        self.training = training
        self.content.value = training_html(training)
        self.downloads.value = "".join(
            download_links(optimizer.to_frame(), "optimizer-" + ("-".join(map(str, optimizer.path)) or "state"),
                           "optimizer " + (".".join(map(str, optimizer.path)) or "state") + " per parameter")
            for optimizer in training.optimizers)
        drawn = [(f"scheduler {s.index} ({s.class_name})", schedule)
                 for s, schedule in zip(training.scheduler_states, schedules) if schedule.steps]
        if drawn:
            self.schedule.show(lr_schedule_figure(drawn, "learning-rate schedule"))
        if any(p.tensors for optimizer in training.optimizers for p in optimizer.params):
            # the moments are read from disk (all of an LLM's optimizer state): after the rest is shown
            self.run(self._norms, self._show_norms, label="reading the optimizer's moments…")

    def _norms(self) -> tuple[MomentNorm, ...]:
        training = self.training
        assert training is not None
        several = len(training.optimizers) > 1
        norms: list[MomentNorm] = []
        for optimizer in training.optimizers:
            found = moment_norms(self.state.checkpoint, optimizer, cancel=self._cancel)
            if several:
                prefix = ".".join(map(str, optimizer.path))
                found = tuple(MomentNorm(f"{prefix}: {n.parameter}", n.moment, n.l2_norm, n.rms, n.numel) for n in found)
            norms += found
        return tuple(norms)

    def _show_norms(self, norms: tuple[MomentNorm, ...]) -> None:
        self.norms = norms
        if not norms:
            return
        self.moments.show(moment_norms_figure(norms, "optimizer moments per parameter"))
        self.moments_table.value = ("<details><summary>optimizer state norms per parameter (table)</summary>"
                                    + moment_norms_html(norms) + "</details>"
                                    + download_links(pd.DataFrame([dataclasses.asdict(n) for n in norms]), "moment-norms"))
