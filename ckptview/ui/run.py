"""The Run view (`ckptview.explore_run`): metrics over the run, a drift heatmap, a table; a checkpoint opens `explore()`."""

from __future__ import annotations

import threading
from concurrent.futures import CancelledError
from typing import Any

import ipywidgets as widgets

from ckptview.analyzers.run import Run, RunSummary, describe_skipped, open_run
from ckptview.errors import CkptviewError
from ckptview.present.run_figures import drift_heatmap, metrics_figure, run_table
from ckptview.ui.base import STYLE, FigureBox, banner_html, error_message, esc


class RunExplorer(widgets.VBox):
    """
    The widget `explore_run()` returns. The tensors are read on a worker thread (progress bar,
    Cancel); `summary` is the `RunSummary` once shown. Choosing a checkpoint in `checkpoint` and
    pressing `open_button` (or calling `open_checkpoint(path)`) shows the single-checkpoint explorer.
    """

    def __init__(self, run: Run | None, error: CkptviewError | None = None) -> None:
        self.run = run
        self.summary: RunSummary | None = None
        self.banner = widgets.HTML(banner_html("error", error_message(error)) if error else "")
        self.header = widgets.HTML()
        self.progress = widgets.FloatProgress(min=0.0, max=1.0, layout=widgets.Layout(width="50%"))
        self.cancel_button = widgets.Button(description="Cancel", layout=widgets.Layout(width="90px"))
        self.metrics = FigureBox()
        self.heatmap = FigureBox()
        for box in (self.metrics, self.heatmap):
            # a direct child of this column: 100 % plus the widget margin ran 2 px past the view's edge
            box.layout.width = "auto"
            box.layout.align_self = "stretch"
        self.table = widgets.HTML()
        self.checkpoint = widgets.Dropdown(description="checkpoint", options=[], layout=widgets.Layout(width="60%"))
        self.open_button = widgets.Button(description="Open in explorer", button_style="primary")
        self.detail = widgets.VBox()
        self.explorer: Any = None
        self._cancel = threading.Event()
        self._done = threading.Event()
        self.cancel_button.on_click(self._on_cancel_button_click)
        self.open_button.on_click(self._on_open_button_click)
        super().__init__([widgets.HTML(STYLE), self.banner, self.header,
                          widgets.HBox([self.progress, self.cancel_button]), self.metrics, self.heatmap, self.table,
                          widgets.HBox([self.checkpoint, self.open_button]), self.detail])
        self.add_class("ckptview-explorer")
        if run is None:
            self._done.set()
            return
        self.header.value = self._header_html(run)
        self.checkpoint.options = [(c.name, c.path) for c in run.checkpoints]
        threading.Thread(target=self._analyze, name="ckptview-run-view", daemon=True).start()

    @staticmethod
    def _header_html(run: Run) -> str:
        notes = "".join(f"<li>skipped {esc(line)}</li>" for line in describe_skipped(run.skipped))
        notes += "".join(f"<li>{esc(a.path)}: {esc(a.note)}</li>" for a in run.aliases)
        best = (f"<br>best: <b>{esc(run.best.path)}</b> ({esc(run.best.metric)} = {run.best.value:.4g}), "
                f"{esc(run.best.note)}" if run.best else "<br>best: none (no validation metric or training loss saved)")
        return (f"<b style='font-size:16px'>{len(run.checkpoints)} checkpoints</b>, ordered {esc(run.order_note)}"
                f"{best}" + (f"<ul>{notes}</ul>" if notes else ""))

    def _analyze(self) -> None:
        try:
            summary = self.run.analyze(progress=self._report, cancel=self._cancel)  # type: ignore[union-attr]
            self._show(summary)
        except CancelledError:
            self.banner.value = banner_html("info", "cancelled; the checkpoints read so far stay cached")
        except Exception as exc:  # noqa: BLE001 - shown in the banner, the view stays usable
            self.banner.value = banner_html("error", error_message(exc))
        finally:
            self.progress.layout.display = "none"
            self.cancel_button.layout.display = "none"
            self._done.set()

    def _report(self, done: int, total: int) -> None:
        self.progress.value = done / total if total else 1.0

    def _show(self, summary: RunSummary) -> None:
        self.summary = summary
        self.metrics.show(metrics_figure(summary))
        self.heatmap.show(drift_heatmap(summary))
        onset = summary.nan_onset
        epoch = "?" if onset is None or onset.epoch is None else f"{onset.epoch:g}"
        text = ("<p>No NaN or Inf in any checkpoint.</p>" if onset is None else
                f"<p class='sev-error'>NaN/Inf first in {esc(onset.path)} (epoch {epoch}): "
                f"{esc(', '.join(onset.tensors[:10]))}</p>")
        text += "".join(f"<p>{esc(s.module)}: {'never moved' if s.never_moved else 'stopped moving'}</p>"
                        for s in summary.stopped)
        self.table.value = text + run_table(summary).to_html(index=False, classes="ckptview-table", border=0,
                                                             na_rep="—", float_format=lambda v: f"{v:.4g}")

    def wait(self, timeout: float = 120.0) -> None:
        """Block until the run is shown (or failed); for tests."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"the run view did not finish within {timeout:.0f} s")

    def _on_cancel_button_click(self, _: Any) -> None:
        self._cancel.set()

    def _on_open_button_click(self, _: Any) -> None:
        if self.checkpoint.value:
            self.open_checkpoint(self.checkpoint.value)

    def open_checkpoint(self, path: str) -> Any:
        """Show the single-checkpoint explorer on `path` below the run, and return it."""
        from ckptview.ui.app import explore

        if self.explorer is not None:
            self.explorer.close()
        self.explorer = explore(path, trust=self.run.trust if self.run else False)
        self.detail.children = (widgets.HTML(f"<h4>{esc(path)}</h4>"), self.explorer)
        return self.explorer


def explore_run(path_or_run: Any, *, engine: Any = "local", cache: Any = True, trust: bool = False) -> RunExplorer:
    """
    Open a training run in an interactive view: metric lines over the run with the best checkpoint
    starred, a modules × checkpoints heatmap of weight change with the NaN onset marked, and a
    table; choose a checkpoint to open it in `ckptview.explore`.

    Args:
        path_or_run: a folder, glob, list of paths or URLs (as `ckptview.open_run` takes), or a `Run`.
        engine, cache, trust: as for `ckptview.open_run`.

    Example:
        >>> ckptview.explore_run("runs/resnet")
    """
    if isinstance(path_or_run, Run):
        return RunExplorer(path_or_run)
    try:
        return RunExplorer(open_run(path_or_run, engine=engine, cache=cache, trust=trust))
    except CkptviewError as exc:
        return RunExplorer(None, exc)
