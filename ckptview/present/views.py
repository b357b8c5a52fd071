"""
What a view of the explorer computes from a checkpoint, as functions: the explorer's panels run them
on a worker thread and the report runs them in line, so both show the same figures.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import torch
from torch import nn

from ckptview.analyzers.batchnorm import BatchNormReport, batchnorm_checks
from ckptview.analyzers.crossformat import CrossFormatMatch, match_tensors
from ckptview.analyzers.doctor import Diagnosis, diagnose
from ckptview.analyzers.keydiff import KeyDiff, key_diff
from ckptview.analyzers.sections import model_section, model_state_dict
from ckptview.analyzers.tree import module_tree
from ckptview.analyzers.valuediff import ValueDiff, value_diff
from ckptview.present import figures
from ckptview.present.frames import summary
from ckptview.readers.model import Checkpoint, TensorEntry

# BatchNorm layers plotted at most: past this the boxes are too thin to read and the figure too heavy to send.
MAX_PLOTTED_LAYERS = 64


def model_treemap(ckpt: Checkpoint) -> go.Figure:
    """The treemap of parameters by module, drawn over the model section when one is known
    (the model's modules, not the optimizer's moments beside them)."""
    root, title = module_tree(ckpt).root, summary(ckpt).name
    section = model_section(ckpt)
    for part in section.path if section is not None else ():
        below = next((child for child in root.children if child.name == str(part) and child.repeat == 1), None)
        if below is None:
            break
        root, title = below, f"{title}: {below.path}"
    return figures.module_treemap(root, title)


def batchnorm_view(ckpt: Checkpoint) -> tuple[BatchNormReport, go.Figure | None]:
    """The BatchNorm findings and the running statistics plot of the first `MAX_PLOTTED_LAYERS` layers."""
    report = batchnorm_checks(ckpt)
    state = model_state_dict(ckpt)
    # a file that says which layer a tensor belongs to names its statistics anything (ONNX inputs,
    # Keras `moving_variance`): found through `Checkpoint.layers`, else by torch's names
    by_role = {(role.module, role.leaf): name for name, role in ckpt.layers.items() if name in state}

    def load(module: str, leaf: str) -> Any:
        return state[by_role.get((module, leaf), f"{module}.{leaf}" if module else leaf)].load()

    layers = [(layer.module, load(layer.module, "running_mean"), load(layer.module, "running_var"))
              for layer in report.layers[:MAX_PLOTTED_LAYERS] if layer.tracks_running_stats]
    return report, figures.batchnorm_buffers(layers) if layers else None


def compare_keys(ckpt: Checkpoint, other: Checkpoint) -> tuple[KeyDiff, Diagnosis | None]:
    """
    The key diff read as "load the other checkpoint into a model shaped like this one", the question
    a user comparing a good file with a failing one asks, and the doctor's fix when the keys differ.
    """
    mine, theirs = model_state_dict(ckpt), model_state_dict(other)
    keys = key_diff(theirs, mine)
    diagnosis = None if keys.ok else diagnose(theirs, shaped_like(mine), section=model_section(other))
    return keys, diagnosis


@dataclass(frozen=True)
class ValueComparison:
    """A value diff with the integer counters that moved (`num_batches_tracked`: 3 → 5), read exactly."""

    values: ValueDiff
    counters: tuple[tuple[str, str, str], ...]  # (key, this side, the other side); elements changed for non-scalars


def compare_values(ckpt: Checkpoint, other: Checkpoint, diagnosis: Diagnosis | None, *,
                   progress: Callable[[int, int], None] | bool = False, cancel: Any = None) -> ValueComparison:
    """The value diff of the two model sections; after the doctor's key fix when it makes them line up."""
    mine = model_state_dict(ckpt)
    theirs: Mapping[str, Any] = model_state_dict(other)
    if diagnosis is not None and diagnosis.loads_after_fix:
        theirs = diagnosis.fixed_state_dict()
    changes = value_diff(mine, theirs, progress=progress, cancel=cancel)
    counters = []
    for change in changes.counters():
        if not change.changed:
            continue
        if change.numel == 1:
            counters.append((change.key, str(_scalar(mine[change.key])), str(_scalar(theirs[change.key]))))
        else:
            counters.append((change.key, "", f"{change.fraction_changed:.1%} of {change.numel:,} elements differ"))
    return ValueComparison(changes, tuple(counters))


# Formats that hold a graph: their tensors no layer uses are graph constants (as `ckptview.diff` has it).
_GRAPH_FORMATS = ("onnx", "tflite")


@dataclass(frozen=True)
class FormatMatching:
    """How the tensors of two checkpoints of different formats pair up, and which file is which side."""

    matching: CrossFormatMatch
    left: Checkpoint
    right: Checkpoint


def match_formats(ckpt: Checkpoint, other: Checkpoint) -> FormatMatching | None:
    """
    Pair the model tensors of two checkpoints of different formats by name or content and explain
    the rest (`crossformat.match_tensors`); None when both have the same format. A graph (ONNX,
    TFLite) goes on the right whichever file the explorer was opened on: BatchNorm folded by an
    export is recognised only from the PyTorch side.
    """
    if ckpt.format == other.format:
        return None
    swap = ckpt.format in _GRAPH_FORMATS and other.format not in _GRAPH_FORMATS
    left, right = (other, ckpt) if swap else (ckpt, other)
    matching = match_tensors(model_state_dict(left), model_state_dict(right), right_layers=right.layers,
                             right_is_graph=right.format in _GRAPH_FORMATS, left_format=left.format,
                             right_format=right.format)
    return FormatMatching(matching, left, right)


def _scalar(value: Any) -> int:
    tensor = value.load() if isinstance(value, TensorEntry) else value
    return int(tensor.reshape(-1)[0].item())


def module_changes_frame(changes: ValueDiff) -> pd.DataFrame:
    """One row per module of a value diff: max abs diff, relative change and cosine."""
    return pd.DataFrame([{"module": g.name, "max_abs_diff": g.max_abs_diff, "rel_change": g.rel_change,
                          "cosine": g.cosine} for g in changes.by_module()],
                        columns=["module", "max_abs_diff", "rel_change", "cosine"])


def shaped_like(entries: dict[str, TensorEntry]) -> nn.Module:
    """A meta-device module whose state_dict has exactly these keys, shapes and dtypes: a checkpoint as a load target."""
    root = nn.Module()
    for key, entry in entries.items():
        *path, leaf = key.split(".")
        module = root
        for part in path:
            if part not in module._modules:
                module.add_module(part, nn.Module())
            module = module._modules[part]
        tensor = torch.empty(entry.shape, dtype=entry.dtype, device="meta")
        if entry.dtype.is_floating_point or entry.dtype.is_complex:
            module.register_parameter(leaf, nn.Parameter(tensor, requires_grad=False))
        else:
            module.register_buffer(leaf, tensor)
    return root
