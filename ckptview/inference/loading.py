"""
A runnable model from a checkpoint: the module the file holds (a whole pickled `nn.Module` or a
TorchScript archive, both only with trust), or a user's `nn.Module` / factory with the
checkpoint's weights loaded into it through the load doctor (`ckptview.doctor`), whose fixes
(prefixes, renames, tied weights, ...) are applied and reported.

Weights go straight from the file to the target device. A model built from a factory is built on
the `meta` device (no memory, no random init) and each parameter is then *assigned* the tensor
read from the file, already on the target device, so RAM never holds a randomly initialised copy
next to the real one (`load_state_dict(assign=True)`). A user's module is never modified: its
meta twin (`model_source.meta_twin`) receives the weights. Tensors are read by ckptview's own
reader, which ignores the device they were saved on (the `map_location` of `torch.load`), so a
checkpoint saved on `cuda:7` loads on a CPU-only machine; pickled modules load on the CPU first
for the same reason.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import torch
from torch import nn

from ckptview.analyzers.doctor import Diagnosis, doctor
from ckptview.analyzers.sections import model_section
from ckptview.errors import ModelBuildError, UntrustedCodeError
from ckptview.inference.devices import resolve_device
from ckptview.model_source import ModelSpec, build_model, meta_twin
from ckptview.readers.model import Checkpoint, view_identity
from ckptview.readers.trusted import load_pickled_object



@dataclass(frozen=True)
class WeightsReport:
    """
    How the checkpoint's weights went into the model.

    Attributes:
        loaded: names of tensors taken from the checkpoint.
        missing: in the model, not in the checkpoint once the fixes ran (see `initialised`).
        unexpected: in the checkpoint, not in the model, once the fixes ran (ignored).
        mismatched: (name, checkpoint shape, model shape) for tensors whose shapes still differ (not loaded).
        fixes: the load doctor's fixes that were applied, as "kind: description" (e.g. a
            stripped "module." prefix); empty when the checkpoint loaded as it is.
        initialised: tensors that were not loaded and were initialised by their module's
            `reset_parameters()` (zeros where it has none), or taken from the user's module, so the
            outputs are not the checkpoint's alone.
        details: the load doctor's diagnosis (`ckptview.analyzers.doctor.Diagnosis`): the keys
            before any fix, every proposal and its code.
    """

    loaded: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    mismatched: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...] = ()
    fixes: tuple[str, ...] = ()
    initialised: tuple[str, ...] = ()
    details: Diagnosis | None = field(default=None, compare=False, repr=False)

    @property
    def complete(self) -> bool:
        """True when every tensor of the model came from the checkpoint."""
        return not (self.missing or self.mismatched or self.initialised)

    def to_dict(self) -> dict[str, Any]:
        return {
            "loaded": len(self.loaded),
            "missing": list(self.missing),
            "unexpected": list(self.unexpected),
            "mismatched": [{"name": n, "checkpoint_shape": list(a), "model_shape": list(b)} for n, a, b in self.mismatched],
            "fixes": list(self.fixes),
            "initialised": list(self.initialised),
            "complete": self.complete,
            "doctor": None if self.details is None else self.details.to_dict(),
        }


@dataclass(frozen=True)
class LoadedModel:
    """
    A model ready to run and where it came from.

    Attributes:
        model: the module (an `nn.Module` or a `torch.jit.ScriptModule`), on `device`.
        source: "module" (the checkpoint's pickled module), "torchscript", "instance" (the user's
            module), or "factory" (built from a callable or "package.module:callable").
        device: where its weights are.
        weights: how the checkpoint's state dict was loaded; None when the model came whole
            from the file (its weights are the file's by construction).
        notes: anything the user should know about how it was built.
    """

    model: nn.Module
    source: str
    device: torch.device
    weights: WeightsReport | None
    notes: tuple[str, ...] = ()


def load_model(
    checkpoint: Checkpoint,
    model: ModelSpec | None = None,
    *,
    model_kwargs: Mapping[str, Any] | None = None,
    device: str | torch.device | None = None,
) -> LoadedModel:
    """
    A runnable model with the checkpoint's weights, on `device`.

    Args:
        checkpoint: an opened checkpoint.
        model: None to use the module the checkpoint holds (a whole pickled module or a
            TorchScript archive; needs `ckptview.open(..., trust=True)`); an `nn.Module`, whose
            meta twin receives the checkpoint's weights (the module itself is not modified;
            tensors the checkpoint lacks are copied from it); or a callable /
            "package.module:callable" string returning an `nn.Module`, called with
            `model_kwargs` on the meta device.
        model_kwargs: keyword arguments for a factory.
        device: where to put the model; None picks the best available device.

    Returns:
        A `LoadedModel`; `weights` is the load report when a state dict was loaded.

    Raises:
        UntrustedCodeError: the checkpoint is a module or TorchScript and was not opened with trust.
        ModelBuildError: no model was given and the checkpoint holds only weights, or the
            factory could not be imported or called.

    Example:
        >>> with ckptview.open("cnn.pt") as ckpt:
        ...     loaded = load_model(ckpt, "torchvision.models:resnet18", model_kwargs={"num_classes": 10})
        >>> loaded.weights.missing
        ()
    """
    target = resolve_device(device)
    if model is None:
        return _load_whole_model(checkpoint, target)
    if isinstance(model, nn.Module):
        if model_kwargs:
            raise ModelBuildError(None, "model_kwargs were given with an already built nn.Module: pass a factory "
                                        "to build it with those arguments, or drop them")
        # The user's module stays untouched: the weights go into a meta twin of it, and the
        # buffers its state dict leaves out are copied from the original.
        twin = meta_twin(model)
        report, notes = _assign_weights(twin, checkpoint, target, like=model)
        return LoadedModel(twin, "instance", target, report, notes)
    skeleton = build_model(model, device="meta", kwargs=model_kwargs)
    non_persistent = _non_persistent_buffers(skeleton)
    if non_persistent:
        # Buffers that __init__ computes and state_dict() leaves out (rotary tables, position ids)
        # would stay empty on meta; building on the target device keeps their values.
        eager = build_model(model, device=target, kwargs=model_kwargs)
        report = _copy_weights(eager, checkpoint)
        note = (f"built directly on {target} rather than on meta, because its non-persistent buffers "
                f"({', '.join(non_persistent[:3])}{'…' if len(non_persistent) > 3 else ''}) are computed in __init__")
        return LoadedModel(eager, "factory", target, report, (note,))
    report, notes = _assign_weights(skeleton, checkpoint, target)
    return LoadedModel(skeleton, "factory", target, report, notes)


# --- the model itself from the file --------------------------------------------------------------

def _load_whole_model(checkpoint: Checkpoint, device: torch.device) -> LoadedModel:
    section = model_section(checkpoint)
    kind = section.kind if section is not None else None
    if kind == "torchscript":
        from ckptview.readers.torchscript import load_script_module

        # load_script_module checks trust itself and raises UntrustedCodeError with the reason.
        return LoadedModel(load_script_module(checkpoint).to(device), "torchscript", device, None)
    if kind == "module":
        if not checkpoint.trust:
            classes = ", ".join(imp.name for imp in checkpoint.pickle_imports[:3]) or "its class"
            raise UntrustedCodeError(
                checkpoint.path,
                f"the checkpoint holds a whole pickled nn.Module; building it imports and runs {classes}. "
                "Open it with trust=True (or --trust) if you trust the file, or give the model "
                "(model=MyNet() or 'package.module:factory') to load only its weights.",
            )
        return LoadedModel(_pickled_module(checkpoint, section.path, device), "module", device, None)
    raise ModelBuildError(
        checkpoint.path,
        "the checkpoint holds only weights (a state dict), not the model's code: give the model as an "
        "nn.Module instance or a factory, e.g. model='torchvision.models:resnet18' with model_kwargs, "
        "or --model package.module:factory on the command line.",
    )


def _pickled_module(checkpoint: Checkpoint, path: tuple[Any, ...], device: torch.device) -> nn.Module:
    """The module the pickle holds at `path` (the root, or e.g. checkpoint["model"]), moved to `device`."""
    # Loads on the CPU whatever device the file names, so a module saved on cuda:7 loads anywhere.
    obj = load_pickled_object(checkpoint)
    for key in path:
        obj = obj[key] if isinstance(obj, (Mapping, list, tuple)) else getattr(obj, key)
    if not isinstance(obj, nn.Module):
        raise ModelBuildError(checkpoint.path, f"expected an nn.Module at {'.'.join(map(str, path)) or 'the root'}, "
                                               f"found {type(obj).__name__}")
    return obj.to(device)


# --- loading weights -----------------------------------------------------------------------------

def _checkpoint_state(checkpoint: Checkpoint, model: nn.Module) -> tuple[dict[str, Callable[[], torch.Tensor]], WeightsReport]:
    """
    The checkpoint's state dict as the load doctor repairs it (prefixes, renames, tied weights,
    transposes, ...), keyed by the model's names, and the load report.

    Values are readers, not tensors, so the caller decides when each tensor is read. Names that
    view the same stored tensor (tied weights) share one reader, so it is read once.
    """
    diagnosis = doctor(checkpoint, model)
    fixed = diagnosis.fixed_state_dict()
    expected = model.state_dict(keep_vars=True)
    after = diagnosis.after
    mismatched = {m.key for m in after.shape_mismatches}
    readers: dict[str, Callable[[], torch.Tensor]] = {}
    shared: dict[Any, Callable[[], torch.Tensor]] = {}
    for key in fixed:
        if key not in expected or key in mismatched:
            continue
        entry = fixed.entry(key)
        identity = (view_identity(entry.info), fixed.spec(key)) if entry is not None else key
        readers[key] = shared.setdefault(identity, partial(fixed.__getitem__, key))
    applied = tuple(f"{fix.kind}: {fix.description}" for fix in diagnosis.fixes
                    if fix.applicable and fix.code and fix.kind != "section" and not diagnosis.ok)
    report = WeightsReport(
        loaded=tuple(readers),
        missing=tuple(after.missing),
        unexpected=tuple(after.unexpected),
        mismatched=tuple((m.key, tuple(m.left), tuple(m.right)) for m in after.shape_mismatches),
        fixes=applied,
        details=diagnosis,
    )
    return readers, report


def _read(read: Callable[[], torch.Tensor], like: torch.Tensor, device: torch.device) -> torch.Tensor:
    tensor = read()
    # Cast floating weights to the dtype the model declares, as load_state_dict's copy_ would,
    # so an fp16 checkpoint in an fp32 model does not give a half-converted model.
    dtype = like.dtype if tensor.is_floating_point() and like.is_floating_point() else tensor.dtype
    return tensor.to(device=device, dtype=dtype)


def _assign_weights(model: nn.Module, checkpoint: Checkpoint, device: torch.device, *,
                    like: nn.Module | None = None) -> tuple[WeightsReport, tuple[str, ...]]:
    """
    Load into a model whose tensors are on meta: each one is read, put on `device` and assigned,
    so the tensors read are the model's memory (one copy). Tensors the checkpoint does not fill
    are taken from `like` (the user's module) when given.
    """
    matched, report = _checkpoint_state(checkpoint, model)
    expected = model.state_dict(keep_vars=True)
    state: dict[str, torch.Tensor] = {}
    read_once: dict[int, torch.Tensor] = {}
    for name, read in matched.items():
        if id(read) not in read_once:
            read_once[id(read)] = _read(read, expected[name], device)
        state[name] = read_once[id(read)]  # tied names get the very same tensor: one copy, still tied in memory
    del read_once
    try:
        model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:
        raise ModelBuildError(checkpoint.path, f"load_state_dict failed: {exc}") from exc
    del state
    initialised = _materialise_leftovers(model, device, like)
    notes = ()
    if initialised:
        origin = "the given module's own values" if like is not None else "the model's reset_parameters() (or zeros)"
        notes = (f"{len(initialised)} tensor(s) not loaded from the checkpoint come from {origin}: "
                 "outputs depend on them",)
    return replace(report, initialised=initialised), notes


def _copy_weights(model: nn.Module, checkpoint: Checkpoint) -> WeightsReport:
    """
    Load into a model that already has real tensors: values are copied in, the tensors stay where
    they are. One tensor at a time, through load_state_dict (so modules' own load hooks run), so
    memory holds the model plus one tensor.
    """
    matched, report = _checkpoint_state(checkpoint, model)
    device = module_device(model) or torch.device("cpu")
    expected = model.state_dict(keep_vars=True)
    for name, read in matched.items():
        try:
            model.load_state_dict({name: _read(read, expected[name], device)}, strict=False)
        except RuntimeError as exc:
            raise ModelBuildError(checkpoint.path, f"load_state_dict failed for {name}: {exc}") from exc
    return report


def _materialise_leftovers(model: nn.Module, device: torch.device, like: nn.Module | None) -> tuple[str, ...]:
    """
    Give every tensor still on meta real values on `device`; returns the names of those a
    checkpoint could have held (non-persistent buffers never are, so they are not reported).
    """
    originals = dict(like.named_modules()) if like is not None else {}
    never_saved = set(_non_persistent_buffers(model))
    leftovers = []
    for module_name, module in model.named_modules():
        own = [(n, t) for n, t in [*module._parameters.items(), *module._buffers.items()] if t is not None]
        missing = [n for n, t in own if t.is_meta]
        if not missing:
            continue
        original = originals.get(module_name)
        for name in missing:
            source = getattr(original, name, None) if original is not None else None
            value = (source.detach().to(device, copy=True) if isinstance(source, torch.Tensor) and not source.is_meta
                     else torch.zeros_like(getattr(module, name), device=device))
            _set_tensor(module, name, value)
        if original is None and hasattr(module, "reset_parameters"):
            # reset_parameters() re-initialises all of the module's tensors in place, so the ones
            # that came from the checkpoint are set aside and written back afterwards.
            kept = {n: t.detach().clone() for n, t in own if n not in missing}
            with torch.no_grad():
                module.reset_parameters()
                for n, value in kept.items():
                    getattr(module, n).copy_(value)
        leftovers.extend(f"{module_name}.{n}" if module_name else n for n in missing)
    return tuple(name for name in leftovers if name not in never_saved)


def _set_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    old = module._parameters.get(name)
    if old is not None:
        module._parameters[name] = nn.Parameter(value, requires_grad=old.requires_grad)
    else:
        module._buffers[name] = value


def _non_persistent_buffers(model: nn.Module) -> list[str]:
    names = []
    for module_name, module in model.named_modules():
        for buffer in sorted(module._non_persistent_buffers_set):
            if module._buffers.get(buffer) is not None:
                names.append(f"{module_name}.{buffer}" if module_name else buffer)
    return names


def module_device(model: nn.Module) -> torch.device | None:
    """The device of the model's first parameter or buffer (None for a module without tensors)."""
    for tensor in [*model.parameters(), *model.buffers()]:
        return tensor.device
    return None


