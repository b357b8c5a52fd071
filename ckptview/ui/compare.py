"""
Compare tab: this checkpoint against a second checkpoint (key diff, value diff per module; for two
formats, such as a `.pt` and its ONNX export, what each tensor became in the other file) or against
a model (`"package.module:factory"`: the load doctor's fixes, with code to copy).
"""

from __future__ import annotations

import os
import re
from typing import Any

import ipywidgets as widgets

import ckptview
from ckptview.analyzers.doctor import Diagnosis, diagnose
from ckptview.analyzers.keydiff import KeyDiff
from ckptview.analyzers.sections import model_section, model_state_dict
from ckptview.analyzers.valuediff import ValueDiff
from ckptview.errors import CkptviewError
from ckptview.present import figures
from ckptview.present.html import counters_html, fixes_html, key_diff_html, matching_html
from ckptview.present.text import human_bytes, not_compared_text
from ckptview.present.views import (
    FormatMatching,
    ValueComparison,
    compare_keys,
    compare_values,
    match_formats,
    module_changes_frame,
)
from ckptview.readers.model import Checkpoint
from ckptview.ui.base import ExplorerState, FigureBox, Panel, esc
from ckptview.ui.copy import CopyButton
from ckptview.ui.grid import download_links

# What the sibling dropdown offers: files a checkpoint is usually saved as, shard indexes, and what a
# model is exported or converted to (compared across formats: "did my export keep my weights").
_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".tar", ".pkl", ".index.json", ".onnx", ".tflite",
             ".npz", ".gguf", ".h5", ".keras", ".pt2")


def sibling_checkpoints(path: str, parts: tuple[str, ...] = ()) -> list[str]:
    """Checkpoint-looking files next to `path` and one folder down (sharded sets live in sub-folders),
    except what `path` itself is made of: `parts` (a sharded set's own shards, beside its index), or
    everything inside `path` when it is a folder (a set opened by its folder has its neighbours beside
    that folder)."""
    path = os.path.abspath(path)
    own_folder = path if os.path.isdir(path) else None
    folder = os.path.dirname(path)
    found = []
    try:
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if entry.is_file() and entry.name.endswith(_SUFFIXES):
                found.append(entry.path)
            elif entry.is_dir() and not entry.name.startswith(".") and os.path.abspath(entry.path) != own_folder:
                found += [os.path.join(entry.path, n) for n in sorted(os.listdir(entry.path)) if n.endswith(".index.json")]
    except OSError:
        return []
    own = {path} | {os.path.abspath(os.path.join(folder, part)) for part in parts}
    return [p for p in found if os.path.abspath(p) not in own]


def fixed_path(source: str) -> str:
    """A new file beside `source` for its fixed state dict: `model.fixed.safetensors`, `ckpt.fixed-2.pt`, ...
    (safetensors when the source is, else a torch.save file), never a path that exists."""
    source = os.path.abspath(source.rstrip(os.sep))
    name = os.path.basename(source).removesuffix(".index.json")
    stem, suffix = os.path.splitext(name)
    stem = re.sub(r"\.fixed(-\d+)?$", "", stem)
    suffix = ".safetensors" if suffix == ".safetensors" else ".pt"
    folder = os.path.dirname(source)
    candidate, number = os.path.join(folder, f"{stem}.fixed{suffix}"), 2
    while os.path.exists(candidate):
        candidate, number = os.path.join(folder, f"{stem}.fixed-{number}{suffix}"), number + 1
    return candidate


class ComparePanel(Panel):
    title = "Compare"

    def __init__(self, state: ExplorerState) -> None:
        shards = tuple(state.checkpoint.details.get("shards", ())) if state.checkpoint is not None else ()
        siblings = sibling_checkpoints(state.path, shards)
        self.other_path = widgets.Text(value=str(state.compare_to or ""), placeholder="path of a second checkpoint",
                                       description="checkpoint", layout=widgets.Layout(width="520px", max_width="100%"))
        self.siblings = widgets.Dropdown(options=[("files next to this one…", "")] + [(os.path.relpath(p, os.path.dirname(
            os.path.abspath(state.path))), p) for p in siblings], layout=widgets.Layout(width="280px", max_width="100%"))
        self.model_factory = widgets.Text(value=state.model if isinstance(state.model, str) else "",
                                          placeholder="package.module:factory", description="or model",
                                          layout=widgets.Layout(width="520px", max_width="100%"))
        self.compare = widgets.Button(description="Compare", button_style="primary", icon="columns")
        self.key_report = widgets.HTML()
        self.fixes = widgets.HTML()
        self.code = widgets.Textarea(layout=widgets.Layout(width="100%", height="120px", display="none"))
        self.code.add_class("ckptview-mono")
        self.copy_code = CopyButton(description="Copy fix code", tooltip="copy the fix code to the clipboard",
                                    layout=widgets.Layout(display="none"))
        # the doctor's fixed state dict, written to a new file (Diagnosis.save_fixed: atomic, no overwrite unless ticked)
        self.save_path = widgets.Text(description="save as", placeholder="path of the fixed checkpoint",
                                      layout=widgets.Layout(width="520px", max_width="100%"))
        self.overwrite = widgets.Checkbox(value=False, description="replace an existing file", indent=False,
                                          layout=widgets.Layout(width="auto"))
        self.save_button = widgets.Button(description="Save fixed checkpoint", icon="save",
                                          layout=widgets.Layout(width="200px"))
        self.saved = widgets.HTML()
        self.save_row = widgets.HBox([self.save_path, self.save_button, self.overwrite],
                                     layout=widgets.Layout(flex_flow="row wrap", display="none"))
        self.values_button = widgets.Button(description="Compute value diff", icon="bar-chart",
                                            layout=widgets.Layout(display="none", width="190px"))
        self.cancel_button = widgets.Button(description="Cancel", icon="stop", layout=widgets.Layout(display="none"))
        self.values = FigureBox()
        self.counters = widgets.HTML()
        self.matching = widgets.HTML()  # two formats: what each tensor became in the other file
        self.downloads = widgets.HTML()  # the key diff's and the value diff's tables as CSV/JSON
        self.format_matching: FormatMatching | None = None
        self.diagnosis: Diagnosis | None = None
        self.key_diff: KeyDiff | None = None
        self.value_diff: ValueDiff | None = None
        self._other: Checkpoint | None = None  # kept open for the value diff
        self.siblings.observe(self._on_siblings_value, names="value")
        self.compare.on_click(self._on_compare_click)
        self.values_button.on_click(self._on_values_button_click)
        self.cancel_button.on_click(self._on_cancel_button_click)
        self.save_button.on_click(self._on_save_button_click)
        # at 640 px the controls go under each other, not off-screen
        rows = [widgets.HBox([self.other_path, self.siblings], layout=widgets.Layout(flex_flow="row wrap")),
                widgets.HBox([self.model_factory, self.compare], layout=widgets.Layout(flex_flow="row wrap"))]
        super().__init__(state, [*rows, self.key_report, self.fixes, self.code, self.copy_code, self.save_row, self.saved,
                                 widgets.HBox([self.values_button, self.cancel_button]), self.values, self.counters,
                                 self.matching, self.downloads])

    def _on_open(self) -> None:
        # Compares at once when explore(compare_to=/model=) prefilled the boxes, else says what to give.
        self._refresh()

    def close(self) -> None:
        if self._other is not None:
            self._other.close()
        super().close()

    def _on_siblings_value(self, change: dict[str, Any]) -> None:
        if change["new"]:
            self.other_path.value = change["new"]
            self.model_factory.value = ""

    def _on_compare_click(self, button: widgets.Button) -> None:
        self._refresh()

    def _on_values_button_click(self, button: widgets.Button) -> None:
        self.cancel_button.layout.display = ""
        self.value_diff, self.format_matching = None, None
        self.values.clear()
        self.counters.value = self.matching.value = ""
        self.run(self._values, self._show_values, label="comparing values…")

    def _on_cancel_button_click(self, button: widgets.Button) -> None:
        self.cancel()

    def _on_save_button_click(self, button: widgets.Button) -> None:
        diagnosis, target, overwrite = self.diagnosis, self.save_path.value.strip(), self.overwrite.value
        self.saved.value = ""
        if diagnosis is None or not target:
            self.show_info("give the path of the file to write", "warning")
            return
        self.run(lambda: self._save(diagnosis, target, overwrite), self._show_saved, label=f"writing {target}…")

    def _save(self, diagnosis: Diagnosis, target: str, overwrite: bool) -> str:
        try:
            return diagnosis.save_fixed(os.path.expanduser(target), overwrite=overwrite)
        except FileExistsError as exc:
            raise CkptviewError(target, "exists; nothing was written. Tick 'replace an existing file' or choose "
                                        "another path") from exc
        except OSError as exc:
            raise CkptviewError(target, f"cannot write here ({exc.strerror or exc}); choose another path") from exc

    def _show_saved(self, written: str) -> None:
        self.saved.value = (f"Wrote <code>{esc(os.path.abspath(written))}</code> "
                            f"({human_bytes(os.path.getsize(written))}): the fixed state dict; the checkpoint "
                            "itself is unchanged.")
        self.save_path.value = fixed_path(written)  # a second click writes a new file, not over this one

    def _refresh(self) -> None:
        other, model = self.other_path.value.strip(), self.model_factory.value.strip()
        model_spec = model or (self.state.model if not isinstance(self.state.model, str) else None)
        if not other and model_spec is None:
            self.show_info("give a second checkpoint's path or a model factory such as ckptview.demo:build_model")
            return
        self._clear()
        if model_spec is not None:
            self.run(lambda: self._doctor(model_spec), self._show_diagnosis, label="building the model on the meta device…")
        else:
            self.run(lambda: self._diff(other), self._show_comparison, label=f"opening {os.path.basename(other)}…")

    def _clear(self) -> None:
        """Take down what the previous comparison showed, so a new result or error never sits under old ones."""
        self.key_diff, self.diagnosis, self.value_diff, self.format_matching = None, None, None, None
        self.key_report.value = self.fixes.value = self.code.value = self.saved.value = ""
        self.code.layout.display = "none"
        self.copy_code.text = ""
        self.copy_code.layout.display = self.save_row.layout.display = "none"
        self.values_button.layout.display = "none"
        self.values.clear()
        self.counters.value = self.matching.value = self.downloads.value = ""

    def _doctor(self, model: Any) -> Diagnosis:
        ckpt = self.state.checkpoint
        return diagnose(model_state_dict(ckpt), model, section=model_section(ckpt))

    def _diff(self, other: str) -> tuple[KeyDiff, Diagnosis | None]:
        ckpt = self.state.checkpoint
        if self._other is not None:
            self._other.close()
            self._other = None
        second = ckptview.open(other, trust=self.state.trust)
        self._other = second
        return compare_keys(ckpt, second)

    def _values(self) -> tuple[ValueComparison, FormatMatching | None]:
        if self._other is None:
            raise RuntimeError("compare with a second checkpoint first")

        def progress(done: int, total: int) -> None:
            if not self.cancel_requested:
                self.report(done, total, f"{human_bytes(done)} of {human_bytes(total)}")

        try:
            comparison = compare_values(self.state.checkpoint, self._other, self.diagnosis, progress=progress,
                                        cancel=self._cancel)
            if self.state.checkpoint.format == self._other.format or self.cancel_requested:
                return comparison, None  # a cancelled value diff is shown as it stands, without the pairing
            self.progress_text.value = esc("pairing the tensors of the two formats…")
            return comparison, match_formats(self.state.checkpoint, self._other)
        finally:
            self.cancel_button.layout.display = "none"

    def _show_comparison(self, result: tuple[KeyDiff, Diagnosis | None]) -> None:
        keys, diagnosis = result
        self.key_diff = keys
        self.key_report.value = key_diff_html(keys, "the other checkpoint", "this one")
        self.downloads.value = download_links(keys.to_frame(), "key-diff", "key diff")
        self.values_button.layout.display = ""
        if diagnosis is not None:
            self._show_fixes(diagnosis, "To load the other checkpoint where this one's keys are expected",
                             self.other_path.value.strip())

    def _show_values(self, result: tuple[ValueComparison, FormatMatching | None]) -> None:
        comparison, matched = result
        changes = self.value_diff = comparison.values
        frame = module_changes_frame(changes)
        self.counters.value = counters_html(comparison.counters)
        # Across formats a tensor of the same name may differ on purpose (an export folds BatchNorm into
        # the convolution's kernel): the banner points at the pairing, which says what each one became.
        below = ""
        if matched is not None:
            self.format_matching = matched
            left, right = os.path.basename(matched.left.path), os.path.basename(matched.right.path)
            self.matching.value = matching_html(matched.matching, left, right)
            below = f" Below: what each tensor of {left} became in {right}."
        if frame.empty:
            self.show_info(f"no tensors with the same name and shape on both sides: nothing to compare.{below}")
            return
        note = "" if changes.complete else " (cancelled: partial)"
        self.show_info(f"{len(changes.tensors):,} tensors compared, {len(changes.changed()):,} differ{note}"
                       f"{not_compared_text(changes.unreadable)}.{below}")
        self.values.show(figures.value_diff_by_module(frame))
        keys = self.key_diff or (self.diagnosis.before if self.diagnosis is not None else None)
        self.downloads.value = ((download_links(keys.to_frame(), "key-diff", "key diff") if keys is not None else "")
                                + download_links(changes.to_frame(), "value-diff", "value diff"))

    def _show_diagnosis(self, diagnosis: Diagnosis) -> None:
        self.key_report.value = key_diff_html(diagnosis.before, "this checkpoint", "the model")
        self.downloads.value = download_links(diagnosis.before.to_frame(), "key-diff", "key diff")
        self.values_button.layout.display = "none"
        self._show_fixes(diagnosis, "It loads into the model", self.state.path)

    def _show_fixes(self, diagnosis: Diagnosis, goal: str, fixed: str) -> None:
        """The fixes and their code (with a copy button), and a save row when they make `fixed` load."""
        self.diagnosis = diagnosis
        self.fixes.value = fixes_html(diagnosis, goal)
        self.code.value = self.copy_code.text = diagnosis.code
        self.code.layout.display = self.copy_code.layout.display = "" if diagnosis.code else "none"
        if diagnosis.loads_after_fix and not diagnosis.ok:
            self.save_path.value = fixed_path(fixed)
            self.save_row.layout.display = ""
