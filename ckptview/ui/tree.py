"""Module tree tab: modules as rows of a grid (indented by depth) with elements, bytes, share and layer kinds; repeated blocks folded."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ipywidgets as widgets
import pandas as pd

from ckptview.analyzers.tree import ModuleTree, module_tree
from ckptview.present.text import human_bytes, human_count
from ckptview.ui.base import ExplorerState, Panel
from ckptview.ui.grid import Table

# Rows drawn at most: a folded tree of a large model has far fewer; deeper nodes stay reachable
# through the Tensors tab (a click on their parent's row lists them there).
MAX_NODES = 3000
_INDENT = "   "


class TreePanel(Panel):
    """
    The module tree as a grid, expanded to `open_depth` levels. A click on a row calls `on_pick`
    with the module's path (the explorer then lists its tensors in the Tensors tab); a folded run
    (`0…31 ×32`) stands for its first block.
    """

    title = "Module tree"

    def __init__(self, state: ExplorerState) -> None:
        self.open_depth = widgets.IntSlider(value=2, min=0, max=6, description="expand to", continuous_update=False)
        self.totals = widgets.HTML()
        self.rows = Table("modules", formats={"module": "name", "elements": "count", "bytes": "bytes", "share": "percent",
                                              "tensors": "count"}, on_select=self._on_rows_select)
        self.tree: ModuleTree | None = None
        self.paths: list[str] = []
        self.on_pick: Callable[[str], None] | None = None
        self.open_depth.observe(self._on_open_depth_value, names="value")
        super().__init__(state, [widgets.HBox([self.open_depth, self.totals]), self.rows])

    def _compute(self) -> ModuleTree:
        return module_tree(self.state.checkpoint)

    def _show(self, tree: ModuleTree) -> None:
        self.tree = tree
        total = tree.root
        self.totals.value = (f"<b>{human_count(total.parameter_count)}</b> elements, {human_bytes(total.nbytes)}, "
                             f"{total.tensor_count:,} tensors; click a module to list its tensors")
        self._refresh()

    def _on_open_depth_value(self, change: dict[str, Any]) -> None:
        self._refresh()

    def _on_rows_select(self, row: pd.Series) -> None:
        if self.on_pick is not None:
            self.on_pick(self.paths[row.name])

    def _refresh(self) -> None:
        with self.view_lock:  # a worker's _show draws it too
            self._draw()

    def _draw(self) -> None:
        if self.tree is None:
            return
        nodes = [(depth, node) for depth, node in self.tree.walk() if depth <= self.open_depth.value][:MAX_NODES]
        self.paths = [node.path for _, node in nodes]
        self.rows.show(pd.DataFrame({
            "module": [_INDENT * depth + node.name + (f" ×{node.repeat}" if node.repeat > 1 else "") for depth, node in nodes],
            "elements": [node.parameter_count for _, node in nodes],
            "bytes": [node.nbytes for _, node in nodes],
            "share": [node.share for _, node in nodes],
            "of": [node.share_of for _, node in nodes],
            "tensors": [node.tensor_count for _, node in nodes],
            "layer kinds": [", ".join(node.layer_kinds[:3]) for _, node in nodes],
            "holds": [", ".join(node.tensors) for _, node in nodes],
            "path": self.paths,
        }))
