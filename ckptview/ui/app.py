"""The explorer: a header with what the file is, and one tab per view; each tab computes when first opened."""

from __future__ import annotations

import threading
from typing import Any

import ipywidgets as widgets

from ckptview.present.frames import summary
from ckptview.present.html import header_html
from ckptview.ui.base import STYLE, ExplorerState, Panel, banner_html, error_message, esc
from ckptview.ui.batchnorm import BatchNormPanel
from ckptview.ui.compare import ComparePanel
from ckptview.ui.deploy import DeployPanel
from ckptview.ui.inference import InferenceTab
from ckptview.ui.overview import OverviewPanel
from ckptview.ui.plot_clicks import PlotClicks
from ckptview.ui.statistics import StatisticsPanel
from ckptview.ui.tensors import TensorsPanel
from ckptview.ui.training import TrainingPanel
from ckptview.ui.tree import TreePanel


def _warm_up_kernels() -> None:
    try:
        from ckptview.analyzers import kernels

        kernels.warm_up()
    except Exception:  # noqa: BLE001 - the tab that needs the kernels reports the failure in its banner
        return


class Explorer(widgets.VBox):
    """
    The widget `ckptview.explore()` returns. `panels` maps tab titles to panels; selecting a tab
    (in the page, or with `select(title)`) starts that panel's first computation.
    """

    def __init__(self, state: ExplorerState) -> None:
        self.state = state
        self.header = widgets.HTML(self._header_html())
        if state.checkpoint is None:
            self.panels: dict[str, Panel | InferenceTab] = {}
            self.tabs = widgets.Tab()
            super().__init__([widgets.HTML(STYLE), self.header])
            self.add_class("ckptview-explorer")
            return
        panels = [OverviewPanel(state), TensorsPanel(state), TreePanel(state), StatisticsPanel(state),
                  BatchNormPanel(state), TrainingPanel(state), ComparePanel(state), InferenceTab(state),
                  DeployPanel(state)]
        self.panels = {panel.title: panel for panel in panels}
        # a module tree or statistics row opens its tensor(s) in the Tensors tab, and a statistics
        # run fills the Tensors tab's checks column
        panels[2].on_pick = panels[3].on_pick = self.show_tensor
        panels[3].on_result = panels[1].note_statistics
        self.tabs = widgets.Tab(children=panels, titles=[panel.title for panel in panels])
        self.tabs.observe(self._on_tabs_selected_index, names="selected_index")
        # a Statistics point or a treemap leaf clicked in the page opens that tensor or module here
        self.plot_clicks = PlotClicks(layout=widgets.Layout(display="none"))
        self.plot_clicks.observe(self._on_plot_clicks, names="clicks")
        super().__init__([widgets.HTML(STYLE), self.header, self.tabs, self.plot_clicks])
        self.add_class("ckptview-explorer")
        # The statistics and diff kernels take ~0.3 s to import and load the first time in a process;
        # done now, in the background, the Statistics and Compare tabs do not wait for it.
        threading.Thread(target=_warm_up_kernels, name="ckptview-warm-up", daemon=True).start()
        self._activate(0)

    def _header_html(self) -> str:
        state = self.state
        if state.checkpoint is None:
            return (f"<h3 style='margin:4px 0'>{esc(state.path)}</h3>"
                    + banner_html("error", error_message(state.open_error)))
        return header_html(summary(state.checkpoint))

    def _on_plot_clicks(self, change: dict[str, Any]) -> None:
        if self.plot_clicks.target:
            self.show_tensor(self.plot_clicks.target)

    def _on_tabs_selected_index(self, change: dict[str, Any]) -> None:
        self._activate(change["new"])

    def _activate(self, index: int | None) -> None:
        if index is None:
            return
        self.tabs.children[index].activate()

    def select(self, title: str) -> Panel | widgets.Widget:
        """Open the tab called `title` (as a click would) and return its panel (the Inference panel once built)."""
        self.tabs.selected_index = list(self.panels).index(title)
        tab = self.panels[title]
        return tab.panel if isinstance(tab, InferenceTab) else tab

    def show_tensor(self, name: str) -> TensorsPanel:
        """
        Open the Tensors tab on `name`: a tensor's row and its statistics and plots, or a module path's
        tensors (what a click on a module tree row does). Returns the Tensors panel.
        """
        panel = self.select("Tensors")
        panel.show_tensor(name)
        return panel

    def close(self) -> None:
        """Close the widgets, the worker threads, and the files the explorer opened."""
        for panel in self.panels.values():
            panel.close()
        self.state.close()
        super().close()


def explore(path_or_checkpoint: Any, *, compare_to: Any = None, model: Any = None, trust: bool = False) -> Explorer:
    """
    Open a checkpoint in an interactive explorer (an ipywidgets app; it displays itself as the cell's result).

    Only headers are read up front; each tab computes the first time it is opened, on a worker thread
    with a progress bar, and keeps its result. A file that cannot be opened shows the error (the same
    message as the `ckptview` command line) instead of tabs.

    Args:
        path_or_checkpoint: a checkpoint path (anything `ckptview.open` takes) or an opened `Checkpoint`.
        compare_to: a second checkpoint path to preselect in the Compare tab.
        model: an `nn.Module` or a `"package.module:factory"` string for the Compare (load doctor) and
            Inference tabs.
        trust: allow code from the file to run (pickled classes, TorchScript). Only for files you trust.

    Returns:
        An `Explorer` widget; `explorer.panels["Tensors"]` etc. give the tabs for scripting.

    Example:
        >>> import ckptview
        >>> ckptview.explore("runs/resnet/epoch_10.pt", compare_to="runs/resnet/epoch_9.pt")
    """
    return Explorer(ExplorerState(path_or_checkpoint, compare_to=compare_to, model=model, trust=trust))
