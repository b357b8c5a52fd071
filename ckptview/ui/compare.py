"""Compare tab."""

from __future__ import annotations

from typing import Any

import ipywidgets as widgets

from ckptview.ui.base import ExplorerState, Panel, banner_html, optional_module


class ComparePanel(Panel):
    title = "Compare"

    def __init__(self, state: ExplorerState) -> None:
        self.content = widgets.HTML()
        super().__init__(state, [self.content])

    def _compute(self) -> Any:
        return optional_module("ckptview.analyzers.doctor")

    def _show(self, module: Any) -> None:
        if module is None:
            self.content.value = banner_html("info", "ckptview.analyzers.doctor is not in this build yet.")
