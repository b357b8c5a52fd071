"""
What every panel shares: the explorer's state (the opened checkpoint, a worker pool), an error
banner, a progress bar, and running work off the kernel's main thread.

Work runs on a worker thread so the kernel keeps answering the front end (a Cancel click, another
tab) while a panel computes; widgets are updated from that thread, which ipykernel allows (comm
messages go through its IOPub thread). A panel's view is drawn under its `view_lock`, by that
thread and by the handlers that redraw it in place (a filter), so a filter typed while the table
loads is never overwritten by the rows of the filter before it. Progress updates are throttled so a
panel never comes near Jupyter's IOPub message-rate limit.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from typing import Any

import ipywidgets as widgets

from ckptview.errors import CkptviewError
from ckptview.present.html import STYLE, banner_html, esc  # noqa: F401 - the panels take them from here
from ckptview.readers.model import Checkpoint

log = logging.getLogger(__name__)

# At most this many progress messages a second per panel: far below the IOPub limits.
_PROGRESS_INTERVAL_S = 0.2


def error_message(exc: BaseException) -> str:
    """The text the CLI prints for the same error (`ckptview: error: ...`), or the exception for a bug."""
    if isinstance(exc, CkptviewError):
        return f"ckptview: error: {exc}"
    return f"ckptview: internal error ({type(exc).__name__}: {exc}); the rest of the explorer still works"


class ExplorerState:
    """
    What the panels of one explorer share: the checkpoint, the options `explore()` was given, and
    a small worker pool. The inference panel receives this object too.

    Attributes:
        path: the file or directory given (None when a `Checkpoint` was passed in).
        checkpoint: the opened checkpoint, or None when opening failed (`open_error` says why).
        compare_to: a second checkpoint's path to preselect in the Compare tab.
        model: an `nn.Module` or `"package.module:factory"` for the Compare and Inference tabs.
        trust: whether code from the file may run (pickled classes, TorchScript).
    """

    def __init__(self, source: Any, *, compare_to: Any = None, model: Any = None, trust: bool = False) -> None:
        self.compare_to = compare_to
        self.model = model
        self.trust = trust
        self.open_error: CkptviewError | None = None
        self.checkpoint: Checkpoint | None
        self.owns_checkpoint = not isinstance(source, Checkpoint)  # close only what explore() opened
        if isinstance(source, Checkpoint):
            self.path = source.path
            self.checkpoint = source
        else:
            self.path = str(source)
            import ckptview

            try:
                self.checkpoint = ckptview.open(source, trust=trust)
            except CkptviewError as exc:
                self.checkpoint = None
                self.open_error = exc
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ckptview-ui")

    def submit(self, work: Callable[[], Any]) -> Future:
        return self._executor.submit(work)

    def close(self) -> None:
        """Stop the worker threads (work already running finishes) and close the checkpoint explore() opened."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self.checkpoint is not None and self.owns_checkpoint:
            self.checkpoint.close()


class Cancelled(Exception):
    """Raised inside panel work when the user pressed Cancel."""


class Panel(widgets.VBox):
    """
    A tab of the explorer. Subclasses put their controls in `body`, compute in `_compute()` (worker
    thread, may call `self.report(done, total)`), show the result in `_show(result)`, and call
    `_refresh()` from their handlers.
    """

    title = ""

    def __init__(self, state: ExplorerState, body: list[widgets.Widget]) -> None:
        self.state = state
        self.banner = widgets.HTML()
        self.progress = widgets.FloatProgress(min=0.0, max=1.0, description="", layout=widgets.Layout(display="none", width="50%"))
        self.progress_text = widgets.HTML()
        self.activated = False
        self._idle = threading.Event()
        self._idle.set()
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self.view_lock = threading.RLock()
        self._pending: tuple[Callable[[], Any], Callable[[Any], None], str] | None = None
        self._last_report = 0.0
        super().__init__([self.banner, widgets.HBox([self.progress, self.progress_text]), *body])

    # --- lifecycle ------------------------------------------------------------------------------
    def activate(self) -> None:
        """First time the tab is opened: `_on_open()` (subsequent calls do nothing)."""
        if self.activated:
            return
        self.activated = True
        if self.state.checkpoint is None:
            self.show_error(self.state.open_error)
            return
        self._on_open()

    def _on_open(self) -> None:
        """By default opening the tab computes its result on a worker thread and shows it."""
        self.run(self._compute, self._show)

    def _compute(self) -> Any:
        return None

    def _show(self, result: Any) -> None:
        pass

    def run(self, work: Callable[[], Any], done: Callable[[Any], None], *, label: str = "computing…") -> None:
        """
        Run `work` on a worker thread with the progress bar shown, then `done(result)`. One job at a
        time per panel: a request made while one runs waits for it, and only the latest request waits
        (clicking through ten rows quickly computes the first and the last).
        """
        with self._lock:
            if self.busy:
                self._pending = (work, done, label)
                return
            self._idle.clear()
        self._start(work, done, label)

    def _start(self, work: Callable[[], Any], done: Callable[[Any], None], label: str) -> None:
        self._cancel.clear()
        self.progress.value = 0.0
        self.progress.layout.display = ""
        self.progress_text.value = esc(label)
        future = self.state.submit(work)
        future.add_done_callback(lambda f: self._finish(f, done))

    def _finish(self, future: Future, done: Callable[[Any], None]) -> None:
        try:
            result = future.result()
            with self.view_lock:
                self.show_error(None)
                done(result)
        except (Cancelled, CancelledError):
            self.banner.value = banner_html("info", "cancelled; press the button again to start over")
        except Exception as exc:  # a bug in one panel must not take the explorer down: show it here
            if not isinstance(exc, CkptviewError):
                log.error("ckptview panel %s failed:\n%s", self.title, "".join(traceback.format_exception(exc)))
            self.show_error(exc)
        finally:
            with self._lock:
                pending, self._pending = self._pending, None
                if pending is None:
                    self.progress.layout.display = "none"
                    self.progress_text.value = ""
                    self._idle.set()
        if pending is not None:
            self._start(*pending)

    def wait(self, timeout: float = 120.0) -> None:
        """Block until the panel's current work (if any) is shown; for tests and benchmarks."""
        if not self._idle.wait(timeout):
            raise TimeoutError(f"the {self.title} panel did not finish within {timeout:.0f} s")

    @property
    def busy(self) -> bool:
        return not self._idle.is_set()

    # --- progress, cancel, errors ---------------------------------------------------------------
    def report(self, done: float, total: float, text: str = "") -> None:
        """Progress from worker code; raises `Cancelled` once the user has pressed Cancel."""
        if self._cancel.is_set():
            raise Cancelled()
        now = time.monotonic()
        if now - self._last_report < _PROGRESS_INTERVAL_S and done < total:
            return
        self._last_report = now
        self.progress.value = (done / total) if total else 1.0
        self.progress_text.value = esc(text or f"{done:,.0f} / {total:,.0f}")

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def show_error(self, exc: BaseException | None) -> None:
        self.banner.value = "" if exc is None else banner_html("error", error_message(exc))

    def show_info(self, message: str, kind: str = "info") -> None:
        self.banner.value = banner_html(kind, message)


class FigureBox(widgets.Output):
    """
    A slot for one plotly figure, shown as plotly's own output (`application/vnd.plotly.v1+json`,
    drawn by the jupyterlab-plotly renderer) rather than a FigureWidget: that renderer is a Lumino
    widget that relayouts the figure when its tab is shown or the notebook's width changes, so the
    figure always fits its box (a FigureWidget keeps the width of its first drawing: plotly's 700 px
    default when the tab was hidden), and a saved notebook keeps the figure as output data and a PNG.
    Each `show()` replaces the output whole, so a front end that attaches later (Voila) gets the
    figure, not a history of updates.
    """

    def __init__(self) -> None:
        self.figure: Any = None
        # As wide as the panel and never wider (min_width 0 lets a flex row shrink it).
        super().__init__(layout=widgets.Layout(width="100%", min_width="0"))
        self.add_class("ckptview-plot-box")

    def show(self, figure: Any) -> None:
        import plotly.io as pio

        # to_json turns numpy arrays into plotly's typed-array form; the renderer takes plain JSON
        spec = json.loads(pio.to_json(figure, validate=False))
        spec["config"] = {"responsive": True, "displaylogo": False}
        self.figure = figure
        self.layout.display = ""
        title = _html_title(spec["layout"])
        self.outputs = (*title, {"output_type": "display_data", "metadata": {},
                                 "data": {"application/vnd.plotly.v1+json": spec, "text/plain": "<plotly figure>"}})

    def clear(self) -> None:
        # hidden, so a plot beside an empty slot (a 4-D weight has no heatmap) takes the whole row
        self.figure = None
        self.layout.display = "none"
        self.outputs = ()

    @property
    def data(self) -> tuple[Any, ...]:
        """The traces shown (empty when nothing is)."""
        return () if self.figure is None else self.figure.data


# What plotly's own titles here use of its HTML subset; everything else in a title is shown as text
# (a title names tensors, and a file names its tensors).
_TITLE_TAGS = ("<br>", "<span style='font-size:11px'>", "</span>", "<sup>", "</sup>", "<b>", "</b>", "<i>", "</i>")


_UNTITLED_TOP = 12  # px above a plot whose title is shown apart: its top tick label's half height


def _html_title(layout: dict[str, Any]) -> tuple[dict[str, Any], ...]:
    """
    The figure's title taken out of `layout` (a plotly JSON layout) as an HTML output to show above it.
    plotly draws a title on one line and clips it where the panel is narrower: at 640 px with the file
    browser open, "std and abs-max per tensor by depth" lost its last words. HTML wraps. The top margin
    the title took goes with it (and as much of the height, so the plot area, which legends are placed
    by, keeps its size), unless something is drawn above the plot (an annotation).
    """
    title = layout.pop("title", None) or {}
    text = title.get("text") if isinstance(title, dict) else None
    if not text:
        return ()
    margin = layout.setdefault("margin", {})
    top = margin.get("t", 100)
    if not layout.get("annotations") and top > _UNTITLED_TOP:
        margin["t"] = _UNTITLED_TOP
        if "height" in layout:
            layout["height"] -= top - _UNTITLED_TOP
    shown = esc(text)
    for tag in _TITLE_TAGS:
        shown = shown.replace(esc(tag), tag)
    html = f"<div class='ckptview-plot-title' style='padding-left:{margin.get('l', 80)}px'>{shown}</div>"
    return ({"output_type": "display_data", "metadata": {}, "data": {"text/html": html, "text/plain": text}},)
