"""
Training state: optimizer param groups and per-parameter state mapped back to parameter names,
LR schedulers, AMP grad scaler, progress (epoch/step/loss), hyper-parameters and Lightning details.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ckptview.analyzers.sections import Section, find_sections, model_section, model_state_dict
from ckptview.readers.model import Checkpoint, PickledObject, TensorEntry, TensorInfo, load_tensor

# Buffers a state dict holds beside parameters; optimizers never see them.
BUFFER_LEAVES = frozenset({"running_mean", "running_var", "num_batches_tracked", "position_ids", "inv_freq",
                           "masked_bias", "relative_position_index", "anchors", "cos_cached", "sin_cached"})


@dataclass(frozen=True)
class ParamGroup:
    index: int
    lr: float | None
    options: Mapping[str, Any]  # everything else the group stores: betas, eps, weight_decay, momentum, ...
    param_ids: tuple[Any, ...]
    param_names: tuple[str, ...] | None  # torch >= 2.6 stores them when the optimizer got named parameters


@dataclass(frozen=True)
class ParamState:
    param_id: Any
    name: str | None  # the model parameter this state belongs to, when the mapping is known
    group: int
    step: float | None
    tensors: Mapping[str, tuple[tuple[int, ...], str]]  # exp_avg -> (shape, dtype), ...
    model_shape: tuple[int, ...] | None  # the mapped parameter's shape in the model section


@dataclass(frozen=True)
class OptimizerState:
    """One optimizer's state_dict: groups, per-parameter state, and how ids were mapped to names."""

    path: tuple[Any, ...]
    optimizer_kind: str  # a guess from the state keys: "Adam/AdamW", "SGD with momentum", ...
    groups: tuple[ParamGroup, ...]
    params: tuple[ParamState, ...]
    mapping: str  # "param_names" | "order" | "order+shape" | "guess" | "failed" | "no model section"
    mapping_note: str

    def to_frame(self) -> Any:
        import pandas as pd

        rows = []
        for param in self.params:
            rows.append({"param_id": param.param_id, "name": param.name, "group": param.group, "step": param.step,
                         "lr": self.groups[param.group].lr if param.group < len(self.groups) else None,
                         "model_shape": param.model_shape,
                         **{f"{key}_shape": shape for key, (shape, _) in param.tensors.items()}})
        return pd.DataFrame(rows)


@dataclass(frozen=True)
class TrainingState:
    optimizers: tuple[OptimizerState, ...]
    schedulers: tuple[Mapping[str, Any], ...]
    grad_scaler: Mapping[str, Any] | None
    progress: Mapping[str, Any]  # epoch, global_step, loss, metrics, ... as plain values
    hyper_parameters: Mapping[str, Any]  # rendered with `plain`: objects become {"__class__": ..., fields}
    lightning: Mapping[str, Any] | None  # version, callbacks, loops, when it is a Lightning checkpoint


def plain(value: Any, *, depth: int = 0) -> Any:
    """
    A value of the tree as plain data for display: objects the file names but ckptview did not
    import become `{"__class__": "argparse.Namespace", ...their fields}`, OmegaConf containers their
    content, tensors a short description (scalars are read: a few bytes).
    """
    if depth > 20:
        return "…"
    if isinstance(value, TensorInfo):
        if value.numel == 1 and value.layout == "strided" and value.storage is not None:
            return load_tensor(value, "value").item()
        return f"tensor{list(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    if isinstance(value, PickledObject):
        attributes = value.attributes
        if "_content" in attributes:  # OmegaConf DictConfig/ListConfig keep their data here
            return plain(attributes["_content"], depth=depth + 1)
        if "_val" in attributes:  # an OmegaConf value node
            return plain(attributes["_val"], depth=depth + 1)
        fields = {str(k): plain(v, depth=depth + 1) for k, v in (attributes or dict(value.items)).items()}
        if not fields and value.args:
            fields = {"args": plain(list(value.args), depth=depth + 1)}
        return {"__class__": type(value).class_path, **fields}
    if isinstance(value, Mapping):
        return {str(k) if not isinstance(k, (int, float, bool)) else k: plain(v, depth=depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v, depth=depth + 1) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((plain(v, depth=depth + 1) for v in value), key=repr)
    # a numpy value can only be here once numpy is imported (by the unpickler or a numpy reader)
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(value, numpy.generic):  # np.float64(0.93) saved as best_acc
        return plain(value.item(), depth=depth + 1)
    if numpy is not None and isinstance(value, numpy.ndarray):
        if value.size <= 16 and value.dtype != object:
            return value.tolist()
        return f"array{list(value.shape)} {value.dtype}"
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def training_state(checkpoint: Checkpoint) -> TrainingState:
    """
    Everything about training a checkpoint holds, with optimizer state mapped to parameter names.

    Args:
        checkpoint: an opened checkpoint.

    Returns:
        A frozen `TrainingState`; empty parts when the checkpoint holds only weights.

    Example:
        >>> state = ckptview.training_state(ckpt)
        >>> state.optimizers[0].mapping, state.optimizers[0].groups[0].lr
        ('order+shape', 0.001)
    """
    return checkpoint.cached("training_state", lambda: _training_state(checkpoint))


def _training_state(checkpoint: Checkpoint) -> TrainingState:
    sections = find_sections(checkpoint)
    model = model_section(checkpoint)
    parameters = model_parameters(checkpoint, model)
    optimizers = tuple(_optimizer(checkpoint, s, parameters) for s in sections if s.kind == "optimizer")
    schedulers: list[Mapping[str, Any]] = []
    for section in (s for s in sections if s.kind == "scheduler"):
        node = checkpoint.get(section.path)
        items = node if isinstance(node, list) else [node]
        schedulers.extend(plain(item) for item in items)
    scaler = next((plain(checkpoint.get(s.path)) for s in sections if s.kind == "grad_scaler"), None)
    progress = {s.name: plain(checkpoint.get(s.path)) for s in sections if s.kind == "progress"}
    hyper = {s.name: plain(checkpoint.get(s.path)) for s in sections if s.kind == "hyper_parameters"}
    lightning = None
    root = checkpoint.root
    if isinstance(root, Mapping) and "pytorch-lightning_version" in root:
        lightning = {
            "version": root.get("pytorch-lightning_version"),
            "epoch": root.get("epoch"),
            "global_step": root.get("global_step"),
            "callbacks": list(plain(root.get("callbacks") or {})),
            "loops": {name: _loop_summary(loop) for name, loop in (root.get("loops") or {}).items()},
            "hparams_name": root.get("hparams_name"),
        }
    return TrainingState(optimizers, tuple(schedulers), scaler, progress, hyper, lightning)


def _loop_summary(loop: Any) -> Any:
    """Lightning loops nest progress counters deeply; keep the `total`/`current` counters people look at."""
    summary: dict[str, Any] = {}
    stack = [((), loop)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, Mapping):
            if "total" in node and isinstance(node["total"], Mapping):
                summary[".".join(path) or "progress"] = plain(node["total"])
                continue
            stack.extend((path + (str(k),), v) for k, v in node.items())
    return summary


def model_parameters(checkpoint: Checkpoint, section: Section | None = None) -> list[TensorEntry]:
    """The model section's parameters in order: state dict entries minus buffers."""
    if section is None and model_section(checkpoint) is None:
        return []
    entries = model_state_dict(checkpoint, section).values()
    marked = [e for e in entries if e.info.is_parameter]
    if marked:  # a whole pickled module records which tensors are nn.Parameters
        return marked
    return [e for e in entries if e.name.rsplit(".", 1)[-1] not in BUFFER_LEAVES and e.dtype.is_floating_point]


def _optimizer(checkpoint: Checkpoint, section: Section, parameters: list[TensorEntry]) -> OptimizerState:
    node = checkpoint.get(section.path)
    groups = []
    for index, group in enumerate(node.get("param_groups") or []):
        group = dict(group) if isinstance(group, Mapping) else {}
        ids = tuple(group.pop("params", ()))
        names = group.pop("param_names", None)
        lr = group.pop("lr", None)
        groups.append(ParamGroup(index, plain(lr), {k: plain(v) for k, v in group.items()}, ids,
                                 tuple(names) if names is not None else None))
    # ids are ints in torch.save files but strings once DCP has flattened the state to paths
    state = {str(k): v for k, v in (node.get("state") or {}).items()} if isinstance(node.get("state"), Mapping) else {}
    ordered_ids = [pid for g in groups for pid in g.param_ids]
    group_of = {pid: g.index for g in groups for pid in g.param_ids}
    state_shapes = {pid: _state_shape(state.get(str(pid))) for pid in ordered_ids}
    names, mapping, note = _map_names(groups, ordered_ids, state_shapes, parameters)
    shape_of = {e.name: e.shape for e in parameters}
    params = []
    for pid in ordered_ids:
        entry = state.get(str(pid))
        entry = entry if isinstance(entry, Mapping) else {}
        tensors = {str(k): (v.shape, str(v.dtype).removeprefix("torch.")) for k, v in entry.items()
                   if isinstance(v, TensorInfo) and k != "step"}
        step = plain(entry.get("step")) if "step" in entry else None
        name = names.get(pid)
        params.append(ParamState(pid, name, group_of[pid], step, tensors, shape_of.get(name) if name else None))
    return OptimizerState(section.path, _optimizer_kind(state), tuple(groups), tuple(params), mapping, note)


def _state_shape(entry: Any) -> tuple[int, ...] | None:
    """The parameter's shape as its optimizer state shows it (moments have the parameter's shape)."""
    if isinstance(entry, Mapping):
        for key, value in entry.items():
            if key != "step" and isinstance(value, TensorInfo) and value.shape:
                return value.shape
    return None


def _optimizer_kind(state: Any) -> str:
    keys = {k for entry in (state.values() if isinstance(state, Mapping) else []) if isinstance(entry, Mapping) for k in entry}
    if {"exp_avg", "exp_avg_sq"} <= keys:
        return "Adam/AdamW" + (" (amsgrad)" if "max_exp_avg_sq" in keys else "")
    if "momentum_buffer" in keys:
        return "SGD with momentum"
    if "square_avg" in keys:
        return "RMSprop/Adadelta"
    if "sum" in keys:
        return "Adagrad"
    if not keys:
        return "no per-parameter state yet (no step taken, or SGD without momentum)"
    return "unknown (" + ", ".join(sorted(map(str, keys))) + ")"


def _map_names(groups: Sequence[ParamGroup], ids: list[Any], state_shapes: Mapping[Any, tuple[int, ...] | None],
               parameters: list[TensorEntry]) -> tuple[dict[Any, str], str, str]:
    if groups and all(g.param_names is not None for g in groups):
        names = {pid: name for g in groups for pid, name in zip(g.param_ids, g.param_names or ())}
        return names, "param_names", "mapped by the param_names the optimizer stored (exact)"
    if not parameters:
        return {}, "no model section", "no model state dict in this checkpoint to map parameter ids to"
    known = [(pid, state_shapes[pid]) for pid in ids]
    if len(ids) == len(parameters):
        disagree = [p.name for (pid, shape), p in zip(known, parameters) if shape is not None and shape != p.shape]
        names = {pid: p.name for pid, p in zip(ids, parameters)}
        if not disagree:
            checked = sum(1 for _, shape in known if shape is not None)
            return names, "order", (f"mapped by order: the optimizer's {len(ids)} ids follow the model's parameter "
                                    f"order; {checked} of {len(ids)} shapes confirm it")
        return names, "guess", (f"a guess by order: {len(disagree)} of {len(ids)} state shapes disagree with the "
                                f"parameters (first: {disagree[0]}); the optimizer may belong to another model")
    if all(shape is not None for _, shape in known) and len(ids) < len(parameters):
        names: dict[Any, str] = {}
        remaining = iter(parameters)
        for pid, shape in known:
            match = next((p for p in remaining if p.shape == shape), None)
            if match is None:
                break
            names[pid] = match.name
        else:
            return names, "order+shape", (f"mapped by order and shape: the optimizer holds {len(ids)} of the model's "
                                          f"{len(parameters)} parameters (the others were frozen or excluded)")
    return {}, "failed", (f"cannot map: the optimizer has {len(ids)} parameters and the model section "
                          f"{len(parameters)}, and shapes do not line them up")
