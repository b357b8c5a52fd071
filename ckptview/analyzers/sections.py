"""
What each part of a checkpoint is, found by content: model state dicts wherever they sit,
optimizer state, schedulers, AMP scalers, training progress, hyper-parameters, metadata.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ckptview.readers.model import Checkpoint, PickledObject, TensorEntry, TensorInfo, children_of, dotted_name, walk_tensors


@dataclass(frozen=True)
class Section:
    """One part of a checkpoint: `kind` says what it is, `path` where it sits (keys from the root)."""

    kind: str
    path: tuple[Any, ...]
    explanation: str
    tensor_count: int

    @property
    def name(self) -> str:
        return dotted_name(self.path) or "<root>"


# Where training code usually keeps the model's weights, most likely first; EMA copies last.
_MODEL_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network", "model_state",
               "weights", "params", "params_ema", "generator", "encoder", "backbone")
_EMA_KEYS = ("ema", "model_ema", "ema_state_dict", "ema_model", "state_dict_ema", "params_ema", "ema_state")
_OPTIMIZER_KEYS = ("optimizer", "optimizer_state_dict", "optimizer_states", "optim", "opt", "optimizers")
_PROGRESS_KEYS = ("epoch", "epochs", "step", "global_step", "iteration", "iter", "steps", "loss", "best_loss",
                  "val_loss", "train_loss", "metrics", "best_metric", "best_acc", "best_acc1", "acc", "accuracy")
_HPARAM_KEYS = ("hyper_parameters", "hparams", "args", "config", "cfg", "opt_args", "hyperparameters",
                "datamodule_hyper_parameters", "model_config", "training_args")

_EXPLANATIONS = {
    "state_dict": "the model's weights and buffers, as model.state_dict() returns them: load with model.load_state_dict()",
    "ema_state_dict": "an exponential-moving-average copy of the model's weights, often better for inference",
    "module": "a whole pickled nn.Module (torch.save(model)): its class must be importable to load it",
    "torchscript": "a TorchScript module: weights plus compiled code, loadable with torch.jit.load without the Python class",
    "optimizer": "optimizer.state_dict(): per-parameter state (moments, step) and param_groups (lr, betas, weight decay)",
    "scheduler": "lr_scheduler.state_dict(): where the learning-rate schedule was",
    "grad_scaler": "torch.amp.GradScaler state: the current loss scale for mixed-precision training",
    "progress": "training progress: epoch, step, loss or metrics when the checkpoint was saved",
    "hyper_parameters": "the hyper-parameters or config the run was started with",
    "callbacks": "PyTorch Lightning callback states (checkpointing, early stopping, ...)",
    "loops": "PyTorch Lightning loop states (where fit/validate were in their epochs and batches)",
    "metadata": "other values saved beside the model",
    "script_attribute": "a plain tensor attribute of the TorchScript module (a cache or table its code keeps): not part "
                        "of state_dict(), so load_state_dict neither needs nor restores it",
}


def _is_state_dict(node: Any) -> bool:
    if not isinstance(node, Mapping) or not node:
        return False
    return all(isinstance(k, str) for k in node) and all(isinstance(v, TensorInfo) for v in node.values())


def _is_optimizer(node: Any) -> bool:
    return isinstance(node, Mapping) and "state" in node and "param_groups" in node


def _is_scheduler(node: Any) -> bool:
    # ChainedScheduler keeps no last_epoch of its own: only its schedulers' states and the lr they set
    return isinstance(node, Mapping) and (("last_epoch" in node and ("base_lrs" in node or "_last_lr" in node))
                                          or ("_schedulers" in node and "_last_lr" in node))


def _is_grad_scaler(node: Any) -> bool:
    return isinstance(node, Mapping) and "scale" in node and "growth_factor" in node


def _tensor_counts(checkpoint: Checkpoint) -> Counter[tuple[Any, ...]]:
    """Tensors under each path down to the depth sections are looked for, from one walk of the tree
    (counting each candidate subtree with a walk of its own cost time quadratic in a deep file)."""
    counts: Counter[tuple[Any, ...]] = Counter()
    for entry in checkpoint.tensors():
        path = entry.path
        for depth in range(1, min(len(path), _MAX_SECTION_DEPTH + 2) + 1):
            counts[path[:depth]] += 1
    return counts


def find_sections(checkpoint: Checkpoint) -> tuple[Section, ...]:
    """Every section of the checkpoint, in tree order. Cached per checkpoint."""
    return checkpoint.cached("sections", lambda: tuple(_find(checkpoint)))


def _find(checkpoint: Checkpoint) -> list[Section]:
    root = checkpoint.root
    if checkpoint.format == "torchscript":
        return _script_sections(checkpoint)
    if isinstance(root, PickledObject) and root.is_module():
        return [Section("module", (), _EXPLANATIONS["module"], checkpoint.tensor_count)]
    if _is_state_dict(root):
        return [Section("state_dict", (), _EXPLANATIONS["state_dict"], checkpoint.tensor_count)]
    # saved on its own, as Hugging Face's Trainer saves optimizer.pt, scheduler.pt and scaler.pt beside the model
    for kind, is_kind in (("optimizer", _is_optimizer), ("scheduler", _is_scheduler), ("grad_scaler", _is_grad_scaler)):
        if is_kind(root):
            return [Section(kind, (), _EXPLANATIONS[kind], checkpoint.tensor_count)]
    sections: list[Section] = []
    _classify(root, (), sections, _tensor_counts(checkpoint), top=True)
    return sections


def _script_sections(checkpoint: Checkpoint) -> list[Section]:
    # the reader found which tensor attributes the archive's code lists as neither parameter nor buffer
    attributes = [tuple(path) for path in checkpoint.details.get("script_attributes", ())]
    counts = [sum(1 for _ in walk_tensors(checkpoint.get(path))) for path in attributes]
    return [Section("torchscript", (), _EXPLANATIONS["torchscript"], checkpoint.tensor_count - sum(counts))] + [
        Section("script_attribute", path, _EXPLANATIONS["script_attribute"], count)
        for path, count in zip(attributes, counts)]


def _kind_of(key: Any, node: Any) -> str | None:
    name = str(key).lower()
    if _is_optimizer(node):
        return "optimizer"
    if _is_scheduler(node):
        return "scheduler"
    if _is_grad_scaler(node):
        return "grad_scaler"
    if name in _PROGRESS_KEYS and isinstance(node, Mapping) and node and all(map(_is_scalar, node.values())):
        return "progress"  # {"metrics": {"val_loss": tensor(0.31)}}: a dict of tensors, yet no state dict
    if _is_state_dict(node):
        return "ema_state_dict" if name in _EMA_KEYS or "ema" in name.split("_") else "state_dict"
    if isinstance(node, PickledObject) and node.is_module():
        return "module"
    if name in ("callbacks",):
        return "callbacks"
    if name in ("loops",):
        return "loops"
    if name in _HPARAM_KEYS:
        return "hyper_parameters"
    if name in _PROGRESS_KEYS and (not isinstance(node, TensorInfo) or _is_scalar(node)):  # `"loss": loss`, a tensor
        return "progress"
    return None


def _is_scalar(node: Any) -> bool:
    return isinstance(node, (int, float)) or (isinstance(node, TensorInfo) and node.numel == 1)


_MAX_SECTION_DEPTH = 16  # sections sit near the root; deeper nesting is data, not structure


def _classify(node: Any, path: tuple[Any, ...], out: list[Section], counts: Counter[tuple[Any, ...]], *,
              top: bool) -> None:
    children = children_of(node)
    if children is None or len(path) > _MAX_SECTION_DEPTH:
        return
    for key, child in children:
        child_path = path + (key,)
        kind = _kind_of(key, child)
        if kind is None and isinstance(child, (list, tuple)) and child and all(_is_optimizer(c) for c in child):
            for index, item in enumerate(child):
                out.append(Section("optimizer", child_path + (index,), _EXPLANATIONS["optimizer"],
                                   counts[child_path + (index,)]))
            continue
        if kind is None and isinstance(child, (list, tuple)) and child and all(_is_scheduler(c) or
                                                                             (isinstance(c, Mapping) and _is_scheduler(c.get("scheduler")))
                                                                             for c in child):
            out.append(Section("scheduler", child_path, _EXPLANATIONS["scheduler"], 0))
            continue
        if kind is not None:
            out.append(Section(kind, child_path, _EXPLANATIONS[kind], counts[child_path]))
        elif counts[child_path]:
            _classify(child, child_path, out, counts, top=False)
        elif top:
            out.append(Section("metadata", child_path, _EXPLANATIONS["metadata"], 0))


def model_section(checkpoint: Checkpoint) -> Section | None:
    """The section holding the model's weights: a state dict by the usual names first, EMA last."""
    candidates = [s for s in find_sections(checkpoint) if s.kind in ("state_dict", "module", "torchscript")]
    if not candidates:
        candidates = [s for s in find_sections(checkpoint) if s.kind == "ema_state_dict"]
    if not candidates:
        return None

    def rank(section: Section) -> tuple[int, int]:
        last = str(section.path[-1]).lower() if section.path else ""
        preferred = _MODEL_KEYS.index(last) if last in _MODEL_KEYS else len(_MODEL_KEYS)
        return (preferred, -section.tensor_count)

    return min(candidates, key=rank)


def model_state_dict(checkpoint: Checkpoint, section: Section | None = None) -> dict[str, TensorEntry]:
    """
    The model's tensors named as `model.state_dict()` would name them (relative to the section).

    Args:
        checkpoint: an opened checkpoint.
        section: which section; default `model_section(checkpoint)`, or every tensor when none is found.
    """
    section = section or model_section(checkpoint)
    if section is None:
        return {entry.name: entry for entry in checkpoint.tensors()}
    node = checkpoint.get(section.path)
    depth = len(section.path)
    # sections nested inside this one (a TorchScript module's plain tensor attributes) are not its state
    nested = {s.path[depth:] for s in find_sections(checkpoint) if len(s.path) > depth and s.path[:depth] == section.path}
    entries = {}
    for path, info in walk_tensors(node):
        if nested and any(path[:len(inner)] == inner for inner in nested):
            continue
        name = dotted_name(path)
        entries[name] = TensorEntry(name, info, section.path + path)
    return entries



@dataclass(frozen=True)
class PickledModule:
    """One module of a whole pickled `nn.Module`, read from the pickle without importing its class."""

    name: str  # dotted path from the root module ("" for the root)
    class_path: str  # e.g. "torchvision.models.resnet.BasicBlock"
    parameters: tuple[str, ...]
    buffers: tuple[str, ...]


def pickled_modules(checkpoint: Checkpoint) -> tuple[PickledModule, ...]:
    """Every module of each whole pickled `nn.Module` in the file, with the class path the pickle names."""
    found: list[PickledModule] = []
    for section in find_sections(checkpoint):
        root = checkpoint.get(section.path)
        if section.kind != "module" or not isinstance(root, PickledObject):
            continue
        stack: list[tuple[str, PickledObject]] = [("", root)]  # names relative to the module, as state_dict() gives them
        while stack:
            name, module = stack.pop()
            attributes = module.attributes
            found.append(PickledModule(
                name, type(module).class_path,
                tuple(k for k, v in _present(attributes.get("_parameters"))),
                tuple(k for k, v in _present(attributes.get("_buffers"))),
            ))
            children = [(f"{name}.{k}" if name else str(k), v) for k, v in _present(attributes.get("_modules"))
                        if isinstance(v, PickledObject) and v.is_module()]
            stack.extend(reversed(children))
    return tuple(found)


def _present(group: Any) -> list[tuple[str, Any]]:
    items = group.items() if isinstance(group, Mapping) else (group.items.items() if isinstance(group, PickledObject) else ())
    return [(str(k), v) for k, v in items if v is not None]
