"""
BatchNorm checks: a catalogue of what goes wrong with BatchNorm state in saved models, each
reported with the module, the tensors involved, and what it means and what to do.

A BatchNorm layer is recognised by content, not class name: a module holding `running_mean` and
`running_var` (BatchNorm1d/2d/3d, SyncBatchNorm and look-alikes under any name), or a module
named like a BatchNorm (`bn1`, `batch_norm`) with only affine parameters.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from ckptview.analyzers.sections import model_state_dict
from ckptview.analyzers.table import infer_layer_kind, module_and_leaf
from ckptview.readers.model import Checkpoint, LayerRole, TensorEntry

if TYPE_CHECKING:
    import pandas as pd

# gamma below this in every channel scales the layer's output to nothing.
DEAD_GAMMA = 1e-6
# running_var spread beyond this ratio means some channels are effectively constant (or exploded).
EXTREME_VARIANCE_RATIO = 1e6


@dataclass(frozen=True)
class Finding:
    """One result of one check."""

    check: str                  # e.g. "running_stats_never_updated"
    severity: str               # "ok" | "info" | "warning" | "error"
    module: str                 # the BatchNorm module ("" for the whole network)
    tensors: tuple[str, ...]    # the tensors the finding is about
    message: str                # what it means and what to do


@dataclass(frozen=True)
class BatchNormLayer:
    """A BatchNorm layer found in the model's state dict."""

    module: str
    channels: int
    affine: bool                       # has weight and bias
    tracks_running_stats: bool         # has running_mean and running_var
    num_batches_tracked: int | None    # None when the buffer is absent
    preceding_conv: str                # the conv feeding it, when names tell; "" otherwise


@dataclass(frozen=True)
class BatchNormReport:
    """The BatchNorm layers of a model and every finding; `problems` are the warnings and errors."""

    layers: tuple[BatchNormLayer, ...]
    findings: tuple[Finding, ...]

    @property
    def problems(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.severity in ("warning", "error"))

    @property
    def ok(self) -> bool:
        return not self.problems

    def checks(self, check: str) -> tuple[Finding, ...]:
        """The findings of one check."""
        return tuple(f for f in self.findings if f.check == check)

    def to_frame(self) -> pd.DataFrame:
        """One row per finding: check, severity, module, tensors (comma-separated), message."""
        import pandas as pd

        return pd.DataFrame(
            [(f.check, f.severity, f.module, ", ".join(f.tensors), f.message) for f in self.findings],
            columns=["check", "severity", "module", "tensors", "message"],
        )


NO_LAYERS = "no BatchNorm layers in this model"  # the summary's start when there are none


def batchnorm_checks(ckpt: Checkpoint) -> BatchNormReport:
    """
    Check every BatchNorm layer of the checkpoint's model state dict.

    Checks (severity): running statistics never updated (warning); `num_batches_tracked` missing
    (info), 0 while other layers have counted batches (warning), or different between layers
    (warning); `running_var` ≤ 0, NaN or Inf (error); NaN/Inf in `running_mean`, weight or bias
    (error); gamma ≈ 0 in every channel (warning); extreme running-variance ratio between channels
    (warning); affine parameters without running statistics (info); conv + BN pairs that can be
    fused for inference (info). When nothing is wrong one "ok" summary finding says so.

    Args:
        ckpt: an opened checkpoint; its model section is found with `model_state_dict`.

    Returns:
        A frozen `BatchNormReport`; `to_frame()` gives one DataFrame row per finding. Cached per checkpoint.

    Raises:
        CorruptCheckpointError, TruncatedCheckpointError: a BatchNorm tensor's data cannot be read.

    Example:
        >>> report = ckptview.batchnorm_checks(ckpt)
        >>> [(f.check, f.module) for f in report.problems]
        [('running_stats_never_updated', 'bn1')]
    """
    return ckpt.cached("batchnorm_checks", lambda: _check(model_state_dict(ckpt), ckpt.layers))


def _check(state: dict[str, TensorEntry], layers: Mapping[str, LayerRole]) -> BatchNormReport:
    layers_named = layers
    modules: dict[str, dict[str, TensorEntry]] = defaultdict(dict)
    # A layer found through the file's graph (an ONNX BatchNormalization's inputs) has tensors named
    # anything; findings name them as the file does, not as module.leaf.
    renamed: dict[str, str] = {}
    for name, entry in state.items():
        module, leaf = module_and_leaf(name, entry, layers)
        modules[module][leaf] = entry
        if _name(module, leaf) != name:
            renamed[_name(module, leaf)] = name

    findings: list[Finding] = []
    layers: list[BatchNormLayer] = []
    counts: dict[str, int] = {}
    for module, leaves in modules.items():
        tracks = "running_mean" in leaves and "running_var" in leaves
        if not tracks and infer_layer_kind(module, leaves)[0] != "BatchNorm":
            continue
        affine = "weight" in leaves and "bias" in leaves
        values = {leaf: leaves[leaf].load().double().reshape(-1)
                  for leaf in ("weight", "bias", "running_mean", "running_var") if leaf in leaves}
        channels = next(iter(values.values())).numel() if values else 0
        tracked = leaves.get("num_batches_tracked")
        count = int(tracked.load().reshape(-1)[0]) if tracked is not None and tracked.numel else None
        if count is not None:
            counts[module] = count
        conv = _preceding_conv(module, channels, modules)
        layers.append(BatchNormLayer(module, channels, affine, tracks, count, conv))
        # a layer the file's own graph or config names (ONNX, Keras, TFLite) has no num_batches_tracked to miss
        from_graph = any(entry.name in layers_named for entry in leaves.values())
        findings.extend(_layer_findings(module, leaves, values, tracks, affine, count, conv, from_graph))

    findings.extend(_count_findings(counts, modules))
    if renamed:
        findings = [replace(f, tensors=tuple(renamed.get(t, t) for t in f.tensors)) for f in findings]
    if not any(f.severity in ("warning", "error") for f in findings):
        summary = (f"{len(layers)} BatchNorm layer(s) checked: running statistics, counts and parameters look healthy"
                   if layers else NO_LAYERS + _folded_note(layers_named))
        findings.append(Finding("summary", "ok", "", (), summary))
    return BatchNormReport(tuple(layers), tuple(findings))


def _folded_note(layers: Mapping[str, LayerRole]) -> str:
    """Why a graph with convolutions has no BatchNorm: a model trained with it still lists none once exported."""
    convolutions = {role.module for role in layers.values() if role.kind.startswith("Conv")}
    if not convolutions:
        return ""
    return (f": the file's graph has {len(convolutions)} convolution(s) and no BatchNorm, as when an exporter folds "
            "BatchNorm into the convolution before it (torch.onnx.export in eval mode, TFLite's converter); there are "
            "no running statistics left to check")


def _name(module: str, leaf: str) -> str:
    return f"{module}.{leaf}" if module else leaf


def _layer_findings(module: str, leaves: dict[str, TensorEntry], values: dict[str, torch.Tensor], tracks: bool,
                    affine: bool, count: int | None, conv: str, from_graph: bool = False) -> list[Finding]:
    out: list[Finding] = []
    if not tracks:
        if affine:
            out.append(Finding("no_running_stats", "info", module, (_name(module, "weight"), _name(module, "bias")),
                               "affine parameters but no running statistics: built with track_running_stats=False, "
                               "so it normalises with batch statistics even in eval(); outputs then depend on the "
                               "batch. Expected for some models; otherwise rebuild with track_running_stats=True "
                               "and re-calibrate on training data."))
        return out
    mean, var = values["running_mean"], values["running_var"]
    mean_name, var_name = _name(module, "running_mean"), _name(module, "running_var")
    if torch.all(mean == 0) and torch.all(var == 1):
        out.append(Finding("running_stats_never_updated", "warning", module, (mean_name, var_name),
                           "running_mean is all 0 and running_var all 1, their initial values: the model was saved "
                           "before any training step in train() mode, or this BN was frozen from init. In eval() it "
                           "will not normalise. Train (or run a few batches in train() mode to calibrate) before "
                           "saving, or check that the right checkpoint was saved."))
    bad_var = ~torch.isfinite(var) | (var <= 0)
    if bool(bad_var.any()):
        nan, inf, nonpos = int(torch.isnan(var).sum()), int(torch.isinf(var).sum()), int((var <= 0).sum())
        out.append(Finding("running_var_invalid", "error", module, (var_name,),
                           f"running_var has {nonpos} channel(s) ≤ 0, {nan} NaN and {inf} Inf of {var.numel()}: "
                           "normalising divides by sqrt(var + eps), so these channels output NaN or huge values. "
                           "The statistics were corrupted (diverged training, bad edit or conversion); use an earlier "
                           "checkpoint or re-estimate the statistics on training data."))
    for leaf in ("running_mean", "weight", "bias"):
        tensor = values.get(leaf)
        if tensor is not None and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            out.append(Finding("non_finite", "error", module, (_name(module, leaf),),
                               f"{leaf} has {bad} NaN/Inf value(s) of {tensor.numel()}: every output of this layer "
                               "will be NaN. Training diverged or the file was damaged; use an earlier checkpoint."))
    weight = values.get("weight")
    if weight is not None and weight.numel() and bool(torch.isfinite(weight).all()) and float(weight.abs().max()) < DEAD_GAMMA:
        out.append(Finding("dead_layer", "warning", module, (_name(module, "weight"),),
                           f"the scale (gamma, weight) is below {DEAD_GAMMA:g} in every channel: the layer outputs only "
                           "its bias, whatever the input, so the path through it is dead. Intended for zero-init "
                           "residual branches before training; otherwise the weights were zeroed or collapsed."))
    positive = var[torch.isfinite(var) & (var > 0)]
    if positive.numel() > 1:
        ratio = float(positive.max() / positive.min())
        if ratio > EXTREME_VARIANCE_RATIO:
            out.append(Finding("extreme_variance_ratio", "warning", module, (var_name,),
                               f"running_var spans a factor of {ratio:.3g} between channels (min {float(positive.min()):.3g}, "
                               f"max {float(positive.max()):.3g}): near-constant channels get amplified by "
                               "1/sqrt(var + eps) and may be dead; exploded ones point to unstable training. "
                               "Inspect the preceding layer's weights for those channels."))
    if count is None and not from_graph:
        out.append(Finding("num_batches_tracked_missing", "info", module, (mean_name,),
                           "no num_batches_tracked buffer: saved by torch < 0.4.1 or by a BN built differently "
                           "(track_running_stats mismatch). load_state_dict(strict=True) into a current BatchNorm "
                           "reports it missing; torch fills it with 0 for old checkpoints, or load with strict=False."))
    if conv:
        out.append(Finding("fusion_hint", "info", module, (_name(conv, "weight"), mean_name, var_name),
                           f"{conv} feeds this BatchNorm: for inference they can be fused into one conv "
                           f"(torch.ao.quantization.fuse_modules(model.eval(), [['{conv}', '{module}']])), "
                           "which saves a pass over the activations."))
    return out


def _count_findings(counts: dict[str, int], modules: dict[str, dict[str, TensorEntry]]) -> list[Finding]:
    out = []
    positive = {module: n for module, n in counts.items() if n > 0}
    if positive:
        for module, n in counts.items():
            if n == 0:
                out.append(Finding("num_batches_tracked_zero", "warning", module, (_name(module, "num_batches_tracked"),),
                                   f"num_batches_tracked is 0 here while {len(positive)} other BatchNorm layer(s) "
                                   f"counted up to {max(positive.values()):,} batches: this layer never ran in train() "
                                   "mode (frozen, replaced after training, or skipped by the forward pass); its running "
                                   "statistics may not match the data."))
    distinct = sorted(set(positive.values()))
    if len(distinct) > 1:
        by_value: dict[int, list[str]] = defaultdict(list)
        for module, n in positive.items():
            by_value[n].append(module)
        parts = "; ".join(f"{n:,}: {', '.join(names[:3])}{' …' if len(names) > 3 else ''}" for n, names in sorted(by_value.items()))
        out.append(Finding("num_batches_tracked_differs", "warning", "",
                           tuple(_name(m, "num_batches_tracked") for m in positive),
                           f"BatchNorm layers counted different numbers of batches ({parts}): parts of the network "
                           "were frozen, trained separately, or swapped in from another checkpoint. Check that this "
                           "was intended."))
    return out


_BN_TOKEN = re.compile(r"batch_norm|batchnorm|bn|norm")


def _preceding_conv(module: str, channels: int, modules: dict[str, dict[str, TensorEntry]]) -> str:
    parent, _, last = module.rpartition(".")
    candidates = []
    if last.isdigit() and int(last) > 0:
        candidates.append(str(int(last) - 1))  # nn.Sequential(conv, bn): bn at i, conv at i-1
    if _BN_TOKEN.search(last):
        candidates.append(_BN_TOKEN.sub("conv", last, count=1))  # bn1 ↔ conv1, norm ↔ conv
    for candidate in candidates:
        name = f"{parent}.{candidate}" if parent else candidate
        weight = modules.get(name, {}).get("weight")
        if weight is not None and len(weight.shape) in (3, 4, 5) and weight.shape[0] == channels:
            return name
    return ""

