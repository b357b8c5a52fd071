"""Overview tab: the checkpoint's sections with their values, and a treemap of parameters by module."""

from __future__ import annotations

from typing import Any

import ipywidgets as widgets
import plotly.graph_objects as go

from ckptview.analyzers.sections import model_section
from ckptview.analyzers.tree import module_tree
from ckptview.present import figures
from ckptview.present.frames import sections_frame, summary
from ckptview.ui.base import ExplorerState, FigureBox, Panel, esc


class OverviewPanel(Panel):
    title = "Overview"

    def __init__(self, state: ExplorerState) -> None:
        self.sections = widgets.HTML()
        self.metadata = widgets.HTML()
        self.treemap = FigureBox()
        super().__init__(state, [self.sections, self.metadata, self.treemap])

    def _compute(self) -> tuple[Any, go.Figure]:
        ckpt = self.state.checkpoint
        frame = sections_frame(ckpt)
        root, title = module_tree(ckpt).root, summary(ckpt).name
        # Draw the model's modules, not the optimizer's moments beside them, when the model section is known.
        section = model_section(ckpt)
        for part in section.path if section is not None else ():
            below = next((child for child in root.children if child.name == str(part) and child.repeat == 1), None)
            if below is None:
                break
            root, title = below, f"{title}: {below.path}"
        return frame, figures.module_treemap(root, title)

    def _show(self, result: tuple[Any, go.Figure]) -> None:
        frame, treemap = result
        # the file's own metadata (GGUF keys, safetensors __metadata__), large arrays already summarised
        items = list(self.state.checkpoint.metadata.items())
        shown = "".join(f"<tr><td><code>{esc(k)}</code></td><td>{esc(_clip(v))}</td></tr>" for k, v in items[:_METADATA_ROWS])
        more = f"<div class='meta'>… and {len(items) - _METADATA_ROWS:,} more keys</div>" if len(items) > _METADATA_ROWS else ""
        self.metadata.value = (f"<table class='ckptview-table'><tr><th>metadata</th><th>value</th></tr>{shown}</table>{more}"
                               if items else "")
        rows = "".join(
            f"<tr><td><b>{esc(r['section'])}</b></td><td><code>{esc(r['path'])}</code></td>"
            f"<td class='num'>{r['tensors']:,}</td><td>{esc(r['contents'])}</td>"
            f"<td style='color:#5f6368'>{esc(r['what it is'])}</td></tr>"
            for r in frame.to_dict("records")
        )
        self.sections.value = (
            "<table class='ckptview-table'><tr><th>section</th><th>path</th><th>tensors</th><th>contents</th>"
            f"<th>what it is</th></tr>{rows}</table>"
        )
        self.treemap.show(treemap)


_METADATA_ROWS = 60


def _clip(value: str) -> str:
    return value if len(value) <= 160 else value[:157] + "…"
