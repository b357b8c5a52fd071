"""Module tree tab: modules as collapsible rows with elements, bytes, share and layer kinds; repeated blocks folded."""

from __future__ import annotations

from typing import Any

import ipywidgets as widgets

from ckptview.analyzers.tree import ModuleTree, module_tree
from ckptview.present.html import tree_html
from ckptview.ui.base import ExplorerState, Panel

# Nodes drawn at most: a folded tree of a large model has far fewer; beyond this the page would
# be megabytes of HTML. Deeper nodes stay reachable through the Tensors tab.
MAX_NODES = 3000


class TreePanel(Panel):
    title = "Module tree"

    def __init__(self, state: ExplorerState) -> None:
        self.open_depth = widgets.IntSlider(value=1, min=0, max=6, description="expand to", continuous_update=False)
        self.tree_html = widgets.HTML()
        self.tree: ModuleTree | None = None
        self.open_depth.observe(self._on_open_depth_value, names="value")
        super().__init__(state, [self.open_depth, self.tree_html])

    def _compute(self) -> ModuleTree:
        return module_tree(self.state.checkpoint)

    def _show(self, tree: ModuleTree) -> None:
        self.tree = tree
        self._refresh()

    def _on_open_depth_value(self, change: dict[str, Any]) -> None:
        self._refresh()

    def _refresh(self) -> None:
        if self.tree is not None:
            self.tree_html.value = tree_html(self.tree, open_depth=self.open_depth.value, max_nodes=MAX_NODES)
