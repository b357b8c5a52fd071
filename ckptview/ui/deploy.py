"""
The Deploy tab: choose export targets (ONNX, trace, script) and an input shape, press Run; the
model is exported and each export compared with eager PyTorch on a worker thread (`export_check`),
and the tab shows one row per target and, when an export diverges, the pitfall in words.
"""

from __future__ import annotations

from typing import Any

import ipywidgets as widgets

from ckptview.errors import ModelBuildError
from ckptview.present.text import human_bytes
from ckptview.ui.base import ExplorerState, Panel, banner_html, esc
from ckptview.ui.grid import download_links

_TARGETS = ("onnx", "trace", "script")


class DeployPanel(Panel):
    """
    Will it deploy? Reads `state.checkpoint`, `state.model` (an `nn.Module` or a factory string,
    editable here) and `state.trust`; nothing runs until Run is pressed (exports take seconds).
    """

    title = "Deploy"

    def __init__(self, state: ExplorerState) -> None:
        given = state.model
        wide = widgets.Layout(width="420px", max_width="100%")  # never wider than a narrow page
        self.model_factory = widgets.Text(
            value=given if isinstance(given, str) else "",
            placeholder="the given module" if given is not None and not isinstance(given, str) else "package.module:factory",
            description="model", layout=wide)
        self.targets = {name: widgets.Checkbox(value=True, description=name, indent=False,
                                               layout=widgets.Layout(width="80px")) for name in _TARGETS}
        self.input_shape = widgets.Text(placeholder="from the first layer, e.g. 1,3,224,224", description="input shape",
                                        continuous_update=False, layout=wide)
        self.device = widgets.Dropdown(options=[("best available", "auto"), ("cpu", "cpu")], value="auto",
                                       description="device", layout=wide)
        self.run_button = widgets.Button(description="Run", button_style="primary", icon="play")
        self.cancel_button = widgets.Button(description="Cancel", icon="stop")
        self.table = widgets.HTML()
        self.pitfalls = widgets.HTML()
        self.probes = widgets.HTML()
        self.check: Any = None
        self.run_button.on_click(self._on_run_button_click)
        self.cancel_button.on_click(self._on_cancel_button_click)
        # at 640 px the checkboxes and buttons go under each other, not off-screen
        targets_row = widgets.HBox([widgets.Label("export to", layout=widgets.Layout(width="90px")),
                                    *self.targets.values()], layout=widgets.Layout(flex_flow="row wrap"))
        controls = [self.model_factory, targets_row, self.input_shape, self.device,
                    widgets.HBox([self.run_button, self.cancel_button], layout=widgets.Layout(flex_flow="row wrap"))]
        super().__init__(state, [*controls, self.table, self.pitfalls, self.probes])

    def _on_open(self) -> None:
        from ckptview.inference import available_devices

        self.device.options = [("best available", "auto"), *((d.name, d.name) for d in available_devices())]
        self.show_info("Run exports the model to the checked targets and compares each export with eager PyTorch on "
                       "the example input, another batch size, the sign flipped and scaled.")

    # --- handlers -------------------------------------------------------------------------------
    def _on_run_button_click(self, button: widgets.Button) -> None:
        self._refresh()

    def _on_cancel_button_click(self, button: widgets.Button) -> None:
        self.cancel()

    def _refresh(self) -> None:
        if self.state.checkpoint is None:
            self.show_error(self.state.open_error)
            return
        from ckptview.ui.inference_panel import _parse_shape  # the Inference tab's parser: one shape syntax

        targets = [name for name, box in self.targets.items() if box.value]
        try:
            shape = _parse_shape(self.input_shape.value)
            if not targets:
                raise ModelBuildError(None, "no export target checked: check onnx, trace or script")
        except ModelBuildError as exc:
            self.show_error(exc)
            return
        options = dict(model=self.model_factory.value.strip() or self.state.model, targets=targets,
                       input_shape=shape, device=None if self.device.value == "auto" else self.device.value)
        self.run(lambda: self._compute_run(**options), self._show, label="exporting…")

    def _compute_run(self, *, model: Any, targets: list[str], input_shape: tuple[int, ...] | None,
                     device: str | None) -> Any:
        from ckptview.inference.export import export_check

        return export_check(self.state.checkpoint, model, targets=targets, input_shape=input_shape, device=device,
                            trust=self.state.trust, progress=self.report)

    # --- showing --------------------------------------------------------------------------------
    def _show(self, check: Any) -> None:
        self.check = check
        if not self.input_shape.value.strip():
            self.input_shape.value = ",".join(map(str, check.input.shape))  # editable for the next run
        self.table.value = _results_html(check) + download_links(check.to_frame(), "export-check")
        self.pitfalls.value = "".join(
            banner_html("error" if r.status == "failed" else "warning", f"{r.target}: {r.message}")
            for r in check.results if r.message)
        self.probes.value = _probes_html(check)
        if check.ok:
            self.show_info(f"every export matches eager PyTorch on {check.input.describe()} "
                           f"(|diff| ≤ {check.atol:g} + {check.rtol:g} × max |eager|; {check.seconds:.1f} s)")


def _results_html(check: Any) -> str:
    rows = []
    for r in check.results:
        status = f"<span class='{'' if r.ok else 'sev-warning'}'>{esc(r.status)}</span>"
        cells = [esc(r.target), status, _number(r.max_abs_diff), _number(r.cosine, 6), _ms(r.latency_ms),
                 _ms(r.eager_latency_ms), human_bytes(r.file_size) if r.file_size else "-", esc(r.tool)]
        rows.append("<tr>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>")
    head = "".join(f"<th>{name}</th>" for name in
                   ("target", "status", "max |diff|", "cosine", "latency", "eager", "size", "exported and run by"))
    return f"<table class='ckptview-table'><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _probes_html(check: Any) -> str:
    rows = []
    for r in check.results:
        for p in r.probes:
            how = esc(p.error) if p.error else f"{_number(p.max_abs_diff)} (cosine {_number(p.cosine, 6)})"
            rows.append(f"<tr><td>{esc(r.target)}</td><td>{esc(p.input)}</td><td>{'ok' if p.ok else 'DIFFERS'}</td>"
                        f"<td>{how}</td></tr>")
    if not rows:
        return ""
    return ("<details><summary>every input compared</summary><table class='ckptview-table'><thead><tr>"
            "<th>target</th><th>input</th><th></th><th>max |diff|</th></tr></thead><tbody>"
            + "".join(rows) + "</tbody></table></details>")


def _number(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} ms"
