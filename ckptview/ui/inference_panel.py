"""
The Inference tab: choose a device, an input shape and precisions, press Run; the model is built,
loaded (through the load doctor) and run on a worker thread, and the tab shows the load report,
the outputs, the precision table and a latency chart.
"""

from __future__ import annotations

from typing import Any

import ipywidgets as widgets
from torch import nn

from ckptview.analyzers.sections import model_section
from ckptview.errors import ModelBuildError
from ckptview.inference import PrecisionComparison, available_devices, compare_precisions
from ckptview.present.inference_figures import latency_bars
from ckptview.present.text import human_bytes, shape_text
from ckptview.ui.base import ExplorerState, FigureBox, Panel, esc

_LOWER_PRECISIONS = ("fp16", "bf16", "int8")


class InferencePanel(Panel):
    """
    Run the checkpoint's model. Reads `state.checkpoint`, `state.model` (an `nn.Module` or a
    factory string, editable in the panel) and `state.trust`; nothing runs until Run is pressed.
    """

    title = "Inference"

    def __init__(self, state: ExplorerState) -> None:
        devices = available_devices()
        given = state.model
        self.model_factory = widgets.Text(
            value=given if isinstance(given, str) else "",
            placeholder="the given module" if isinstance(given, nn.Module) else "package.module:factory",
            description="model", layout=widgets.Layout(width="420px"))
        self.device = widgets.Dropdown(options=[(_device_label(d), d.name) for d in devices], value=devices[0].name,
                                       description="device", layout=widgets.Layout(width="420px"))
        self.input_shape = widgets.Text(placeholder="from the first layer, e.g. 1,3,224,224", description="input shape",
                                        continuous_update=False, layout=widgets.Layout(width="420px"))
        self.precisions = {name: widgets.Checkbox(value=False, description=name, indent=False,
                                                  layout=widgets.Layout(width="70px"))
                           for name in _LOWER_PRECISIONS}
        self.repeats = widgets.BoundedIntText(value=5, min=1, max=1000, description="repeats",
                                              layout=widgets.Layout(width="160px"))
        self.run_button = widgets.Button(description="Run", button_style="primary", icon="play")
        self.cancel_button = widgets.Button(description="Cancel", icon="stop")
        self.summary = widgets.HTML()
        self.outputs = widgets.HTML()
        self.table = widgets.HTML()
        self.chart = FigureBox()  # as wide as the panel, redrawn when it resizes; empty until the first run
        self.comparison: PrecisionComparison | None = None
        self.run_button.on_click(self._on_run_button_click)
        self.cancel_button.on_click(self._on_cancel_button_click)
        precision_row = widgets.HBox([widgets.Label("fp32 (reference) vs", layout=widgets.Layout(width="140px")),
                                      *self.precisions.values(), self.repeats])
        controls = [self.model_factory, self.device, self.input_shape, precision_row,
                    widgets.HBox([self.run_button, self.cancel_button])]
        super().__init__(state, [*controls, self.summary, self.outputs, self.table, self.chart])

    def _on_open(self) -> None:
        # Running a model costs time and memory: opening the tab only says what Run will do.
        self.show_info(self._what_run_does())

    def _what_run_does(self) -> str:
        section = model_section(self.state.checkpoint)
        if self.model_factory.value.strip() or self.state.model is not None:
            return "Run builds the model, loads this checkpoint's weights through the load doctor, and runs it."
        if section is not None and section.kind in ("module", "torchscript"):
            trusted = "" if self.state.trust else " It needs trust: open the explorer with trust=True."
            return f"Run loads the {section.kind} this file holds (its own code) and runs it.{trusted}"
        return ("This file holds weights only: give the model's factory (package.module:factory) above, or "
                "explore(..., model=...), then press Run.")

    # --- handlers -------------------------------------------------------------------------------
    def _on_run_button_click(self, button: widgets.Button) -> None:
        self._refresh()

    def _on_cancel_button_click(self, button: widgets.Button) -> None:
        self.cancel()

    def _refresh(self) -> None:
        if self.state.checkpoint is None:
            self.show_error(self.state.open_error)
            return
        try:
            shape = _parse_shape(self.input_shape.value)
        except ModelBuildError as exc:
            self.show_error(exc)
            return
        options = dict(
            model=self.model_factory.value.strip() or self.state.model,
            device=self.device.value,
            input_shape=shape,
            precisions=["fp32", *(name for name, box in self.precisions.items() if box.value)],
            repeats=self.repeats.value,
        )
        self.run(lambda: self._compute_run(**options), self._show, label="building the model and loading weights…")

    def _compute_run(self, *, model: Any, device: str, input_shape: tuple[int, ...] | None, precisions: list[str],
                     repeats: int) -> PrecisionComparison:
        return compare_precisions(self.state.checkpoint, model, precisions=precisions, device=device,
                                  input_shape=input_shape, repeats=repeats, progress=self.report)

    # --- showing --------------------------------------------------------------------------------
    def _show(self, comparison: PrecisionComparison) -> None:
        self.comparison = comparison
        result = comparison.row("fp32").result
        if not self.input_shape.value.strip():
            self.input_shape.value = ",".join(map(str, result.input.shape))  # editable for the next run
        self.summary.value = _summary_html(result)
        frame = result.to_frame()
        self.outputs.value = frame.to_html(index=False, classes="ckptview-table", float_format=lambda v: f"{v:.5g}",
                                           border=0)
        table = comparison.to_frame()[["device", "status", "latency_ms", "size_bytes", "max_abs_diff", "cosine",
                                       "top1_agreement"]]
        table = table.assign(size_bytes=[human_bytes(v) if v else "-" for v in table["size_bytes"]])
        self.table.value = table.to_html(classes="ckptview-table", float_format=lambda v: f"{v:.5g}", border=0,
                                         na_rep="-")
        self.chart.show(latency_bars(comparison.table()))
        if not result.finite:
            self.show_info("the output holds NaN or Inf values (see the nan/inf columns)", kind="warning")


def _device_label(device: Any) -> str:
    free = f" ({human_bytes(device.free_bytes)} free)" if device.free_bytes is not None else ""
    return f"{device.name} — {device.description}{free}"


def _parse_shape(text: str) -> tuple[int, ...] | None:
    text = text.strip()
    if not text:
        return None
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(",") if part.strip())
    except ValueError:
        raise ModelBuildError(None, f"input shape {text!r} is not sizes separated by commas, e.g. 1,3,224,224") from None
    if not shape or any(size <= 0 for size in shape):
        raise ModelBuildError(None, f"input shape {text!r} needs at least one size, all positive")
    return shape


def _summary_html(result: Any) -> str:
    lines = [f"<b>ran on</b> {esc(result.device)} · <b>model</b> {esc(result.model_source)} · "
             f"<b>input</b> {esc(result.input.describe())} · <b>latency</b> {result.timing.median_ms:.3f} ms median "
             f"({len(result.timing.times_s)} calls)"
             + (f" · <b>peak memory</b> {human_bytes(result.peak_memory_bytes)}" if result.peak_memory_bytes else "")]
    weights = result.weights
    if weights is not None:
        verdict = "all weights loaded" if weights.complete else "<span class='sev-warning'>not all weights loaded</span>"
        lines.append(f"<b>weights</b> {len(weights.loaded)} tensors from the checkpoint, {verdict}")
        lines += [f"<b>fixed</b> {esc(fix)}" for fix in weights.fixes]
        for label, names in (("missing", weights.missing), ("unexpected", weights.unexpected),
                             ("initialised", weights.initialised)):
            if names:
                lines.append(f"<b>{label}</b> {esc(', '.join(names[:8]))}{' …' if len(names) > 8 else ''}")
        lines += [f"<b>mismatched</b> {esc(name)}: checkpoint {shape_text(a)}, model {shape_text(b)}"
                  for name, a, b in weights.mismatched]
    lines += [f"<b>note</b> {esc(note)}" for note in result.notes]
    for top in result.top_k:
        classes = ", ".join(f"{c} ({p:.3f})" for c, p in zip(top.classes, top.probabilities))
        lines.append(f"<b>top {len(top.classes)}</b> of {esc(top.output)} ({esc(top.position)}): {classes}")
    return '<div class="ckptview-banner-info">' + "<br>".join(lines) + "</div>"
