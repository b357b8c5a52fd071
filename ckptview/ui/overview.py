"""Overview tab: the checkpoint's sections with their values, and a treemap of parameters by module."""

from __future__ import annotations

from typing import Any

import ipywidgets as widgets
import pandas as pd
import plotly.graph_objects as go

from ckptview.present.frames import sections_frame
from ckptview.present.html import metadata_html, sections_html
from ckptview.present.views import model_treemap
from ckptview.ui.base import ExplorerState, FigureBox, Panel
from ckptview.ui.grid import download_links


class OverviewPanel(Panel):
    title = "Overview"

    def __init__(self, state: ExplorerState) -> None:
        self.sections = widgets.HTML()
        self.downloads = widgets.HTML()
        self.metadata = widgets.HTML()
        # every key, where the table above stops after its first rows
        self.metadata_downloads = widgets.HTML()
        self.treemap = FigureBox()
        super().__init__(state, [self.sections, self.downloads, self.metadata, self.metadata_downloads, self.treemap])

    def _compute(self) -> tuple[Any, go.Figure]:
        ckpt = self.state.checkpoint
        return sections_frame(ckpt), model_treemap(ckpt)

    def _show(self, result: tuple[Any, go.Figure]) -> None:
        frame, treemap = result
        metadata = self.state.checkpoint.metadata
        self.metadata.value = metadata_html(metadata)
        self.metadata_downloads.value = download_links(pd.DataFrame(
            {"metadata": list(metadata), "value": [str(v) for v in metadata.values()]}), "metadata") if metadata else ""
        self.sections.value = sections_html(frame)
        self.downloads.value = download_links(frame, "sections")
        self.treemap.show(treemap)
