"""
Training state: optimizer param groups and per-parameter state mapped back to parameter names,
LR schedulers, AMP grad scaler, progress (epoch/step/loss), hyper-parameters and Lightning details.
"""

from __future__ import annotations

import math
import sys
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ckptview.analyzers.sections import Section, find_sections, model_section, model_state_dict
from ckptview.readers.model import (
    Checkpoint,
    MemorySource,
    PickledObject,
    TensorEntry,
    TensorInfo,
    dotted_name,
    load_tensor,
)

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
    optimizer_kind: str  # from the state keys (and Adam's saved decoupled_weight_decay): "AdamW", "SGD with momentum", ...
    groups: tuple[ParamGroup, ...]
    params: tuple[ParamState, ...]
    mapping: str  # "param_names" | "order" | "order+shape" | "shape" | "guess" | "failed" | "no model section"
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
    scheduler_states: tuple[SchedulerState, ...] = ()  # `schedulers` with their classes named

    def lr_schedules(self, *, horizon: int | None = None) -> tuple[LrSchedule, ...]:
        """Each scheduler's learning rate per step (`lr_schedule`), read with its optimizer's param
        groups: the optimizer of the same position when there are as many, else the first."""
        paired = len(self.optimizers) == len(self.scheduler_states)
        schedules = []
        for number, scheduler in enumerate(self.scheduler_states):
            optimizer = self.optimizers[number if paired else 0] if self.optimizers else None
            schedules.append(lr_schedule(scheduler, optimizer.groups if optimizer else (), horizon=horizon))
        return tuple(schedules)


def plain(value: Any, *, depth: int = 0) -> Any:
    """
    A value of the tree as plain data for display: objects the file names but ckptview did not
    import become `{"__class__": "argparse.Namespace", ...their fields}`, OmegaConf containers their
    content, tensors a short description (scalars are read: a few bytes).
    """
    if depth > 20:
        return "…"
    if isinstance(value, TensorInfo):
        if value.layout == "strided" and value.storage is not None:
            if value.numel == 1:
                return load_tensor(value, "value").item()
            if value.numel <= 16 and type(value.storage.source) is MemorySource:
                return load_tensor(value, "value").tolist()  # a numpy array a pickle held, shown as numpy's tolist
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
    named = tuple(scheduler_state(item, number) for number, item in enumerate(schedulers))
    return TrainingState(optimizers, tuple(schedulers), scaler, progress, hyper, lightning, named)


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
    return _parameters(model_state_dict(checkpoint, section).values())


def _parameters(entries: Iterable[TensorEntry]) -> list[TensorEntry]:
    entries = list(entries)
    marked = [e for e in entries if e.info.is_parameter]
    if marked:  # a whole pickled module records which tensors are nn.Parameters
        return marked
    return [e for e in entries if e.name.rsplit(".", 1)[-1] not in BUFFER_LEAVES and e.dtype.is_floating_point]


def optimizer_parameter_names(checkpoint: Checkpoint, model: Mapping[str, TensorEntry] | None = None
                              ) -> dict[tuple[Any, ...], dict[str, str]]:
    """
    Each optimizer section's path -> its parameter ids (as strings) -> model parameter names, mapped
    as `training_state` maps them, without loading any state tensor: `training_state` reads every
    parameter's `step`, a read per parameter that a caller wanting only the names (the run's
    per-checkpoint pass) need not pay. `model`: `model_state_dict(checkpoint)` where the caller has
    it already (it is not cached).
    """
    if model is None or model_section(checkpoint) is None:
        parameters = model_parameters(checkpoint, model_section(checkpoint))
    else:
        parameters = _parameters(model.values())
    found = {}
    for section in (s for s in find_sections(checkpoint) if s.kind == "optimizer"):
        _, _, ordered_ids, names, _, _ = _groups_and_names(checkpoint.get(section.path), parameters)
        found[section.path] = {str(pid): names[pid] for pid in ordered_ids if pid in names}
    return found


def _groups_and_names(node: Any, parameters: list[TensorEntry]) -> tuple[list[ParamGroup], dict[str, Any], list[Any],
                                                                          dict[Any, str], str, str]:
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
    # LBFGS keeps one state for all its parameters, as flat vectors, under the first: its shapes say
    # nothing of any one parameter (they read as "another model's optimizer")
    flat = any(isinstance(entry, Mapping) and _LBFGS_KEYS <= entry.keys() for entry in state.values())
    state_shapes = {pid: None if flat else _state_shape(state.get(str(pid))) for pid in ordered_ids}
    names, mapping, note = _map_names(groups, ordered_ids, state_shapes, parameters)
    return groups, state, ordered_ids, names, mapping, note


def _optimizer(checkpoint: Checkpoint, section: Section, parameters: list[TensorEntry]) -> OptimizerState:
    groups, state, ordered_ids, names, mapping, note = _groups_and_names(checkpoint.get(section.path), parameters)
    group_of = {pid: g.index for g in groups for pid in g.param_ids}
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
    return OptimizerState(section.path, _optimizer_kind(state, groups), tuple(groups), tuple(params), mapping, note)


def _state_shape(entry: Any) -> tuple[int, ...] | None:
    """The parameter's shape as its optimizer state shows it (moments have the parameter's shape)."""
    rows, cols = (entry.get("row_var"), entry.get("col_var")) if isinstance(entry, Mapping) else (None, None)
    if isinstance(rows, TensorInfo) and isinstance(cols, TensorInfo) and len(rows.shape) == len(cols.shape) >= 2:
        # Adafactor factors a matrix's second moment: rows [..., m, 1] and columns [..., 1, n] of an [..., m, n]
        return (*rows.shape[:-1], cols.shape[-1])
    if isinstance(entry, Mapping):
        for key, value in entry.items():
            if key != "step" and isinstance(value, TensorInfo) and value.shape:
                return value.shape
    return None


_LBFGS_KEYS = frozenset({"func_evals", "n_iter"})


def _optimizer_kind(state: Any, groups: Sequence[ParamGroup] = ()) -> str:
    keys = {k for entry in (state.values() if isinstance(state, Mapping) else []) if isinstance(entry, Mapping) for k in entry}
    if {"exp_avg", "exp_avg_sq"} <= keys:
        # torch >= 2.6 saves which weight decay a group used: AdamW is Adam with decoupled_weight_decay=True
        decoupled = {g.options.get("decoupled_weight_decay") for g in groups}
        kind = "AdamW" if decoupled == {True} else "Adam" if decoupled == {False} else "Adam/AdamW"
        return kind + (" (amsgrad)" if "max_exp_avg_sq" in keys else "")
    if "exp_inf" in keys:
        return "Adamax"
    if _LBFGS_KEYS <= keys:
        return "LBFGS (one state for all parameters, as flat vectors, kept under the first)"
    if {"row_var", "col_var"} & keys or keys == {"step", "variance"}:
        return "Adafactor"
    if {"prev", "step_size"} <= keys:
        return "Rprop"
    if {"eta", "mu", "ax"} <= keys:
        return "ASGD"
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
    disagree: list[str] = []
    if len(ids) == len(parameters):
        disagree = [p.name for (pid, shape), p in zip(known, parameters) if shape is not None and shape != p.shape]
        if not disagree:
            checked = sum(1 for _, shape in known if shape is not None)
            return ({pid: p.name for pid, p in zip(ids, parameters)}, "order",
                    f"mapped by order: the optimizer's {len(ids)} ids follow the model's parameter order; {checked} of "
                    f"{len(ids)} shapes confirm it")
    if all(shape is not None for _, shape in known) and len(ids) <= len(parameters):
        # Training scripts split parameters into groups (weight decay for matrices, none for biases and
        # norms: the Hugging Face Trainer, timm, nanoGPT), each group in the model's order: every group
        # a subsequence of the parameters, taken one group after the other.
        names = _by_shape(groups, state_shapes, parameters, in_order=True)
        if names is not None:
            split = f" in {len(groups)} groups" if len(groups) > 1 else ""
            frozen = (f"the optimizer holds {len(ids)} of the model's {len(parameters)} parameters (the others were "
                      "frozen or excluded)") if len(ids) < len(parameters) else f"its {len(ids)} ids"
            return names, "order+shape", (f"mapped by order and shape: {frozen}, each group following the model's "
                                          f"parameter order{split}")
        # a file that lists its tensors in another order than the model's (safetensors sorts them by name)
        names = _by_shape(groups, state_shapes, parameters, in_order=False)
        if names is not None:
            return names, "shape", (f"mapped by shape only: the {len(ids)} ids follow the model's own parameter "
                                    "order, which this file does not keep (it lists tensors by name), so "
                                    "parameters of equal shape may be swapped")
    if disagree:
        return ({pid: p.name for pid, p in zip(ids, parameters)}, "guess",
                f"a guess by order: {len(disagree)} of {len(ids)} state shapes disagree with the parameters (first: "
                f"{disagree[0]}), and no order of the parameters fits them: the optimizer may belong to another model")
    return {}, "failed", (f"cannot map: the optimizer has {len(ids)} parameters and the model section "
                          f"{len(parameters)}, and shapes do not line them up")


def _by_shape(groups: Sequence[ParamGroup], state_shapes: Mapping[Any, tuple[int, ...] | None],
              parameters: list[TensorEntry], *, in_order: bool) -> dict[Any, str] | None:
    """
    Each group's ids matched, one group after the other, to the first parameters of their shapes not
    taken yet: `in_order`, each after the previous match of its group (the group is a subsequence of
    the parameters); else anywhere. None when some id finds no parameter of its shape.
    """
    free: dict[tuple[int, ...], list[int]] = {}  # shape -> the indices of the parameters of that shape not taken
    for index, parameter in enumerate(parameters):
        free.setdefault(parameter.shape, []).append(index)
    names: dict[Any, str] = {}
    for group in groups:
        after = 0
        for pid in group.param_ids:
            places = free.get(state_shapes[pid], [])
            k = bisect_left(places, after) if in_order else 0
            if k == len(places):
                return None
            at = places.pop(k)
            names[pid] = parameters[at].name
            after = at + 1
    return names


# --- learning-rate schedulers ----------------------------------------------------------------------
# A torch scheduler's state_dict is its __dict__ minus the optimizer: it never names its class. The
# fields each class adds are distinctive, so the class is inferred from them, most specific first.
_SCHEDULER_FIELDS: tuple[tuple[str, frozenset[str]], ...] = (
    ("SequentialLR", frozenset({"_schedulers", "_milestones"})),
    ("ChainedScheduler", frozenset({"_schedulers"})),
    ("ReduceLROnPlateau", frozenset({"patience", "cooldown", "num_bad_epochs"})),
    ("OneCycleLR", frozenset({"total_steps", "_schedule_phases"})),
    ("CyclicLR", frozenset({"max_lrs", "total_size", "step_ratio"})),
    ("CosineAnnealingWarmRestarts", frozenset({"T_0", "T_mult", "T_cur"})),
    ("CosineAnnealingLR", frozenset({"T_max", "eta_min"})),
    ("LinearLR", frozenset({"start_factor", "end_factor", "total_iters"})),
    ("PolynomialLR", frozenset({"power", "total_iters"})),
    ("ConstantLR", frozenset({"factor", "total_iters"})),
    ("MultiStepLR", frozenset({"milestones", "gamma"})),
    ("StepLR", frozenset({"step_size", "gamma"})),
    # MultiplicativeLR stores the same field (its lambdas are functions, which are not saved)
    ("LambdaLR/MultiplicativeLR", frozenset({"lr_lambdas"})),
    ("ExponentialLR", frozenset({"gamma"})),
)

# Points drawn at most: a OneCycleLR over a million batches is drawn from this many evenly spaced steps.
MAX_SCHEDULE_POINTS = 2000


@dataclass(frozen=True)
class SchedulerState:
    """
    One learning-rate scheduler's saved state: its class (recorded by the file, or inferred from the
    fields a torch scheduler stores), its fields and bookkeeping apart, and the schedulers it chains.
    """

    index: int
    class_name: str | None  # "StepLR"; None when neither recorded nor recognisable
    named_by: str  # "recorded" | "inferred from its fields" | "unknown"
    fields: Mapping[str, Any]  # what a reader looks at: step_size, gamma, base_lrs, last_epoch, ...
    bookkeeping: Mapping[str, Any]  # fields starting with "_" (_step_count, _get_lr_called_within_step, ...)
    children: tuple[SchedulerState, ...]  # SequentialLR / ChainedScheduler's own schedulers

    @property
    def last_epoch(self) -> int | None:
        """How many times scheduler.step() had run (a ChainedScheduler's: its schedulers')."""
        value = self.fields.get("last_epoch")
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        return max((c.last_epoch for c in self.children if c.last_epoch is not None), default=None)

    @property
    def last_lr(self) -> list[float] | None:
        value = self.bookkeeping.get("_last_lr")
        return [float(v) for v in value] if isinstance(value, list) and all(_is_number(v) for v in value) else None


@dataclass(frozen=True)
class LrSchedule:
    """A scheduler's learning rate per step, computed from its class's formula and saved state."""

    steps: tuple[int, ...]
    lrs: tuple[tuple[float, ...], ...]  # one curve per param group, lrs[group][i] at steps[i]
    current: int | None  # last_epoch: how many times scheduler.step() had run when the file was saved
    note: str  # how it was drawn, or why it could not be


def scheduler_state(value: Any, index: int = 0) -> SchedulerState:
    """
    A saved scheduler (`plain` data of `scheduler.state_dict()`, or a pickled scheduler object) with its class named.

    Example:
        >>> scheduler_state({"step_size": 2, "gamma": 0.5, "base_lrs": [0.001], "last_epoch": 3}).class_name
        'StepLR'
    """
    node = dict(value) if isinstance(value, Mapping) else {}
    if isinstance(node.get("scheduler"), Mapping) and "interval" in node:  # Lightning's {"scheduler": ..., "interval": ...}
        node = dict(node["scheduler"])
    recorded = node.pop("__class__", None)
    children = tuple(scheduler_state(child, number) for number, child in enumerate(node.get("_schedulers") or [])
                     if isinstance(child, Mapping))
    fields = {k: v for k, v in node.items() if not str(k).startswith("_")}
    bookkeeping = {k: v for k, v in node.items() if str(k).startswith("_") and k != "_schedulers"}
    if isinstance(recorded, str):
        return SchedulerState(index, recorded.rsplit(".", 1)[-1], "recorded", fields, bookkeeping, children)
    keys = set(map(str, node))
    name = next((name for name, wanted in _SCHEDULER_FIELDS if wanted <= keys), None)
    return SchedulerState(index, name, "inferred from its fields" if name else "unknown", fields, bookkeeping, children)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def lr_schedule(scheduler: SchedulerState, groups: Sequence[ParamGroup] = (), *, horizon: int | None = None) -> LrSchedule:
    """
    The learning rate `scheduler` sets at each step from 0 to `horizon`, by its class's closed form
    (what torch's `_get_closed_form_lr` computes), for every param group.

    Args:
        scheduler: from `TrainingState.scheduler_states`.
        groups: the optimizer's param groups; OneCycleLR reads its peak and final rates from them.
        horizon: the last step drawn; by default where the schedule ends (T_max, total_steps, ...)
            or a few periods past the saved step.

    Returns:
        An `LrSchedule`; empty `steps` with a `note` saying why when the schedule cannot be computed
        (a LambdaLR's functions are not saved; ReduceLROnPlateau follows a metric).
    """
    current = scheduler.last_epoch
    # the fields come from the file: a damaged or hand-made one gets a sentence, not a failed tab
    try:
        curve = _curve(scheduler, groups)
        if isinstance(curve, str):
            return LrSchedule((), (), current, curve)
        function, natural_end, count = curve
        end = max(horizon if horizon is not None else natural_end, current or 0, 1)
        if end + 1 <= MAX_SCHEDULE_POINTS:
            steps = list(range(end + 1))
        else:
            steps = sorted({round(i * end / (MAX_SCHEDULE_POINTS - 1)) for i in range(MAX_SCHEDULE_POINTS)}
                           | {current or 0})
        lrs = tuple(tuple(float(function(step, group)) for step in steps) for group in range(count))
    except (TypeError, ValueError, ZeroDivisionError, OverflowError, KeyError, IndexError, AttributeError) as exc:
        return LrSchedule((), (), current, f"the saved fields do not give a schedule ({type(exc).__name__}: {exc})")
    how = f"drawn with the formula of {scheduler.class_name} from its saved fields"
    if scheduler.last_lr is not None and current is not None and current in steps:
        at = steps.index(current)
        recorded = scheduler.last_lr
        computed = [lrs[g][at] for g in range(min(count, len(recorded)))]
        if all(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12) for a, b in zip(computed, recorded)):
            how += f"; at step {current} it gives the lr the scheduler last set ({recorded[0]:.6g})"
        else:
            how += (f"; at step {current} it gives {computed[0]:.6g} but the scheduler last set {recorded[0]:.6g}: "
                    "the run changed the lr another way (scheduler.step(epoch), a manual lr, a resumed run)")
    return LrSchedule(tuple(steps), lrs, current, how)


_Curve = tuple[Any, int, int]  # (lr(step, group), where the schedule ends, number of groups)


def _curve(s: SchedulerState, groups: Sequence[ParamGroup]) -> _Curve | str:
    f = s.fields
    name = s.class_name
    base = [float(v) for v in f.get("base_lrs") or []]
    last = s.last_epoch or 0
    if name == "ReduceLROnPlateau":
        return "ReduceLROnPlateau lowers the lr when a metric stops improving: its future depends on that metric"
    if name in ("LambdaLR", "MultiplicativeLR", "LambdaLR/MultiplicativeLR"):
        return "the lr functions (lr_lambda) are code, which a state_dict does not save: the schedule cannot be drawn"
    if name == "SequentialLR":
        return _sequential(s, groups)
    if name == "ChainedScheduler":
        return _chained(s, groups)
    if not base:
        return f"no base_lrs saved: the {name or 'scheduler'}'s schedule cannot be drawn"
    count = len(base)
    if name == "StepLR":
        size, gamma = int(f["step_size"]), float(f["gamma"])
        return (lambda e, g: base[g] * gamma ** (e // size)), max(4 * size, 2 * last), count
    if name == "MultiStepLR":
        milestones = _milestones(f["milestones"])
        gamma = float(f["gamma"])
        end = max(milestones, default=0)
        return ((lambda e, g: base[g] * gamma ** sum(n for m, n in milestones.items() if m <= e)),
                max(end + max(end // 4, 1), last), count)
    if name == "ExponentialLR":
        gamma = float(f["gamma"])
        return (lambda e, g: base[g] * gamma ** e), max(20, 2 * last), count
    if name == "CosineAnnealingLR":
        t_max, eta_min = int(f["T_max"]), float(f["eta_min"])
        return (lambda e, g: eta_min + (base[g] - eta_min) * (1 + math.cos(math.pi * e / t_max)) / 2), t_max, count
    if name == "CosineAnnealingWarmRestarts":
        t_0, t_mult, eta_min = int(f["T_0"]), int(f["T_mult"]), float(f["eta_min"])

        def restarts(e: int, g: int) -> float:
            if t_mult == 1:
                t_cur, t_i = e % t_0, t_0
            else:
                n = int(math.log(e / t_0 * (t_mult - 1) + 1, t_mult))
                t_cur, t_i = e - t_0 * (t_mult ** n - 1) / (t_mult - 1), t_0 * t_mult ** n
            return eta_min + (base[g] - eta_min) * (1 + math.cos(math.pi * t_cur / t_i)) / 2

        return restarts, max(t_0 * (1 + t_mult + t_mult ** 2), last), count
    if name == "LinearLR":
        start, stop, total = float(f["start_factor"]), float(f["end_factor"]), int(f["total_iters"])
        return ((lambda e, g: base[g] * (start + (stop - start) * min(total, e) / total)),
                max(total + max(total // 4, 1), last), count)
    if name == "ConstantLR":
        factor, total = float(f["factor"]), int(f["total_iters"])
        return (lambda e, g: base[g] * (factor if e < total else 1.0)), max(total + max(total // 4, 1), last), count
    if name == "PolynomialLR":
        power, total = float(f["power"]), int(f["total_iters"])
        return ((lambda e, g: base[g] * (1 - min(total, e) / total) ** power),
                max(total + max(total // 4, 1), last), count)
    if name == "CyclicLR":
        return _cyclic(s, base, last)
    if name == "OneCycleLR":
        return _one_cycle(s, groups)
    return f"the scheduler's class is not known ({', '.join(map(str, f))}): its schedule cannot be drawn"


def _milestones(value: Any) -> dict[int, int]:
    # a Counter {milestone: times}; plain() turns it into a dict, an older torch saved a list
    if isinstance(value, Mapping):
        return {int(k): int(v) for k, v in value.items()}
    counts: dict[int, int] = {}
    for milestone in value:
        counts[int(milestone)] = counts.get(int(milestone), 0) + 1
    return counts


def _cyclic(s: SchedulerState, base: list[float], last: int) -> _Curve | str:
    f = s.fields
    if s.bookkeeping.get("_scale_fn_custom") is not None or f.get("mode") not in ("triangular", "triangular2", "exp_range"):
        return "a CyclicLR with a custom scale function (code, not saved): its schedule cannot be drawn"
    peaks = [float(v) for v in f["max_lrs"]]
    size, ratio, gamma, mode = float(f["total_size"]), float(f["step_ratio"]), float(f["gamma"]), f["mode"]
    by_cycle = f.get("scale_mode", "cycle" if mode != "exp_range" else "iterations") == "cycle"

    def scale(x: float) -> float:
        return 1.0 if mode == "triangular" else 1 / (2.0 ** (x - 1)) if mode == "triangular2" else gamma ** x

    def cyclic(e: int, g: int) -> float:
        cycle = math.floor(1 + e / size)
        x = 1.0 + e / size - cycle
        factor = x / ratio if x <= ratio else (x - 1) / (ratio - 1)
        return base[g] + (peaks[g] - base[g]) * factor * scale(cycle if by_cycle else e)

    return cyclic, max(round(3 * size), last), len(base)


def _one_cycle(s: SchedulerState, groups: Sequence[ParamGroup]) -> _Curve | str:
    phases = s.bookkeeping.get("_schedule_phases")
    total = int(s.fields["total_steps"])
    if not groups:
        return "OneCycleLR keeps its peak and final rates in the optimizer's param groups, which this file does not hold"
    if not isinstance(phases, list):
        return "OneCycleLR without its phases (_schedule_phases): its schedule cannot be drawn"
    kind = s.bookkeeping.get("_anneal_func_type", "cos")  # torch < 2.2 pickled the function; "cos" is the default
    options = [dict(g.options, lr=g.lr) for g in groups]

    def anneal(start: float, end: float, pct: float) -> float:
        if kind == "linear":
            return (end - start) * pct + start
        return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)

    def one_cycle(e: int, g: int) -> float:
        start_step = 0.0
        for number, phase in enumerate(phases):
            end_step = float(phase["end_step"])
            if e <= end_step or number == len(phases) - 1:
                pct = (e - start_step) / (end_step - start_step)
                return anneal(float(options[g][phase["start_lr"]]), float(options[g][phase["end_lr"]]), pct)
            start_step = end_step
        raise ValueError("no phases")

    return one_cycle, total - 1, len(options)


def _sequential(s: SchedulerState, groups: Sequence[ParamGroup]) -> _Curve | str:
    # SequentialLR hands over at each milestone with child.step(0): the next child starts from step 0
    milestones = [int(m) for m in s.bookkeeping.get("_milestones") or []]
    curves = [_curve(child, groups) for child in s.children]
    bad = next((c for c in curves if isinstance(c, str)), None)
    if bad is not None or not curves:
        return f"one of its schedulers cannot be drawn: {bad}" if bad else "SequentialLR without its schedulers"
    starts = [0, *milestones]

    def sequential(e: int, g: int) -> float:
        index = bisect_right(milestones, e)
        return curves[index][0](e - starts[index], g)

    end = starts[len(curves) - 1] + curves[-1][1]
    return sequential, max(end, s.last_epoch or 0), min(c[2] for c in curves)


def _chained(s: SchedulerState, groups: Sequence[ParamGroup]) -> _Curve | str:
    # ChainedScheduler steps every scheduler each time; each multiplies the lr by its own factor
    curves = [_curve(child, groups) for child in s.children]
    bad = next((c for c in curves if isinstance(c, str)), None)
    if bad is not None or not curves:
        return f"one of its schedulers cannot be drawn: {bad}" if bad else "ChainedScheduler without its schedulers"
    bases = [[float(v) for v in child.fields.get("base_lrs") or []] for child in s.children]

    def chained(e: int, g: int) -> float:
        lr = bases[0][g]
        for (function, _, _), base in zip(curves, bases):
            lr *= function(e, g) / base[g]
        return lr

    last = max((child.last_epoch or 0) for child in s.children)
    return chained, max(max(c[1] for c in curves), last), min(c[2] for c in curves)


# --- optimizer moments -----------------------------------------------------------------------------
@dataclass(frozen=True)
class MomentNorm:
    """One per-parameter state tensor of an optimizer (Adam's exp_avg, exp_avg_sq, SGD's momentum_buffer)."""

    parameter: str  # the model parameter's name, or "state <id>" when the ids could not be mapped
    moment: str  # exp_avg, exp_avg_sq, max_exp_avg_sq, momentum_buffer, square_avg, ...
    l2_norm: float
    rms: float  # l2_norm / sqrt(numel): comparable across layers of different sizes
    numel: int


def moment_norms(checkpoint: Checkpoint, optimizer: OptimizerState, *, cancel: Any = None) -> tuple[MomentNorm, ...]:
    """
    The L2 norm and RMS of every per-parameter state tensor of `optimizer`, in parameter order,
    read with the streaming statistics (`ckptview.stats`, cached per checkpoint).

    Args:
        checkpoint: the checkpoint `optimizer` was read from.
        optimizer: one of `training_state(checkpoint).optimizers`.
        cancel: a `threading.Event` (or callable) that stops the reading.

    Returns:
        One `MomentNorm` per state tensor (scalars such as `step` left out).
    """
    from ckptview.analyzers.stats import stats

    wanted: dict[str, tuple[str, str]] = {}
    keys = {str(k): k for k in (checkpoint.get(optimizer.path + ("state",)) or {})}
    for param in optimizer.params:
        key = keys.get(str(param.param_id))
        for moment, (shape, _) in param.tensors.items():
            if key is not None and shape:
                label = param.name or f"state {param.param_id}"
                wanted[dotted_name(optimizer.path + ("state", key, moment))] = (label, moment)
    if not wanted:
        return ()
    result = stats(checkpoint, filter=lambda entry: entry.name in wanted, progress=False, cancel=cancel)
    by_name = {item.name: item for item in result.tensors}
    norms = []
    for name, (label, moment) in wanted.items():
        item = by_name.get(name)
        if item is not None and item.numel:
            norms.append(MomentNorm(label, moment, item.l2_norm, item.l2_norm / math.sqrt(item.numel), item.numel))
    return tuple(norms)
