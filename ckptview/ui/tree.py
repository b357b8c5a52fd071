"""Module tree tab: modules as collapsible rows with elements, bytes, share and layer kinds; repeated blocks folded."""

from __future__ import annotations

from typing import Any

import ipywidgets as widgets

from ckptview.analyzers.tree import ModuleTree, TreeNode, module_tree
from ckptview.present.text import human_bytes, human_count
from ckptview.ui.base import ExplorerState, Panel, esc

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
        if self.tree is None:
            return
        budget = [MAX_NODES]
        body = "".join(_node_html(child, 0, self.open_depth.value, budget) for child in self.tree.root.children)
        note = "" if budget[0] > 0 else f"<p>Only the first {MAX_NODES:,} modules are drawn; use the Tensors tab for the rest.</p>"
        total = self.tree.root
        self.tree_html.value = (f"<div class='ckptview-tree'><b>{human_count(total.parameter_count)}</b> elements, "
                                f"{human_bytes(total.nbytes)}, {total.tensor_count:,} tensors{body}{note}</div>")


def _node_html(node: TreeNode, depth: int, open_depth: int, budget: list[int]) -> str:
    if budget[0] <= 0:
        return ""
    budget[0] -= 1
    repeat = f" <b>×{node.repeat}</b>" if node.repeat > 1 else ""
    meta = (f"<span class='meta'>{human_count(node.parameter_count)} · {human_bytes(node.nbytes)} · "
            f"{node.share:.1%} · {node.tensor_count:,} tensors{' · ' + esc(', '.join(node.layer_kinds[:3])) if node.layer_kinds else ''}</span>")
    label = f"<code>{esc(node.name)}</code>{repeat}{meta}"
    leaves = ", ".join(node.tensors)
    if not node.children:
        return f"<details><summary>{label}</summary><div class='meta' style='margin-left:18px'>{esc(leaves)}</div></details>"
    inner = "".join(_node_html(child, depth + 1, open_depth, budget) for child in node.children)
    own = f"<div class='meta' style='margin-left:18px'>{esc(leaves)}</div>" if leaves else ""
    return f"<details{' open' if depth < open_depth else ''}><summary>{label}</summary>{own}{inner}</details>"
