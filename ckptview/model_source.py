"""
Where a model comes from when ckptview needs one to compare a checkpoint against: an `nn.Module`
the user already has, or a factory named as `"package.module:callable"` that ckptview imports and
calls on the `meta` device, so that even a model of hundreds of GB costs no memory to build.

    >>> model = build_model("torchvision.models:resnet50", kwargs={"num_classes": 10})
    >>> expected_state(model)["fc.weight"]
    ((10, 2048), torch.float32)
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable, Mapping
from typing import Any, Union

import torch
from torch import nn

from ckptview.errors import ModelBuildError

__all__ = ["ModelSpec", "build_model", "expected_state", "meta_twin"]

ModelSpec = Union[nn.Module, str, Callable[..., nn.Module]]


def build_model(spec: ModelSpec, *, device: str | torch.device = "meta", kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """
    Resolve a model: return an `nn.Module` as given, or import and call a factory under `device`.

    Args:
        spec: an `nn.Module` (returned unchanged, never copied or moved), a callable returning one
            (a class or function), or a string `"package.module:callable"` (the callable may be
            dotted, `"pkg.mod:Outer.build"`). The module is imported the usual way, so it must be
            on `sys.path`.
        device: the default device while the factory runs. `"meta"` (the default) allocates no
            memory for parameters: only shapes and dtypes exist, which is all a key check needs.
        kwargs: keyword arguments for the factory, e.g. `{"num_classes": 10}`.

    Returns:
        The model. Built models are put in `eval()` mode.

    Raises:
        ModelBuildError: the string is malformed, the module cannot be imported, the attribute is
            missing, the call fails, or it returns something that is not an `nn.Module`. The
            original exception is chained.

    Example:
        >>> build_model("models_for_tests:make_cnn", kwargs={"num_classes": 5}).fc.weight.shape
        torch.Size([5, 8])
    """
    if isinstance(spec, nn.Module):
        if kwargs:
            raise ModelBuildError(None, "kwargs were given with an already built nn.Module: pass a factory instead, "
                                        "or build the model yourself with those arguments")
        return spec
    factory, label = (_import_factory(spec), spec) if isinstance(spec, str) else (spec, _label(spec))
    if not callable(factory):
        raise ModelBuildError(None, f"{label} is a {type(factory).__name__}, not a callable that returns an nn.Module")
    try:
        with torch.device(device):
            model = factory(**dict(kwargs or {}))
    except Exception as exc:
        raise ModelBuildError(None, f"calling {label}({_kwargs_text(kwargs)}) on device {str(device)!r} failed with "
                                    f"{type(exc).__name__}: {exc}. Check the arguments; a factory that reads weights "
                                    "or calls .to()/.cuda() itself cannot run on the meta device, pass device='cpu' "
                                    "or an nn.Module you built") from exc
    if not isinstance(model, nn.Module):
        raise ModelBuildError(None, f"{label}({_kwargs_text(kwargs)}) returned a {type(model).__name__}, "
                                    "not an nn.Module: name a factory that builds the model")
    return model.eval()


def _import_factory(spec: str) -> Any:
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ModelBuildError(None, f"model {spec!r} is not of the form 'package.module:callable', "
                                    "e.g. 'torchvision.models:resnet50'")
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:  # an ImportError, or anything the module raises while importing
        raise ModelBuildError(None, f"cannot import {module_name!r} for model {spec!r}: {type(exc).__name__}: {exc}. "
                                    "Install the package or add its directory to PYTHONPATH") from exc
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError as exc:
            public = sorted(name for name in dir(target) if not name.startswith("_"))[:12]
            raise ModelBuildError(None, f"{module_name!r} has no attribute {attribute!r} (model {spec!r}); "
                                        f"it has: {', '.join(public)}") from exc
    return target


def _label(factory: Any) -> str:
    return f"{getattr(factory, '__module__', '?')}:{getattr(factory, '__qualname__', repr(factory))}"


def _kwargs_text(kwargs: Mapping[str, Any] | None) -> str:
    return ", ".join(f"{key}={value!r}" for key, value in (kwargs or {}).items())


def expected_state(model: nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """
    What `model.load_state_dict` expects: every state-dict key with its shape and dtype.

    Args:
        model: any `nn.Module` (meta-device models included; no data is read).

    Returns:
        `{key: (shape, dtype)}` in `model.state_dict()` order; tied weights appear under each name,
        as `load_state_dict(strict=True)` requires them.

    Example:
        >>> expected_state(nn.Linear(3, 2))
        {'weight': ((2, 3), torch.float32), 'bias': ((2,), torch.float32)}
    """
    return {key: (tuple(value.shape), value.dtype) for key, value in model.state_dict(keep_vars=True).items()}


def meta_twin(model: nn.Module) -> nn.Module:
    """
    A copy of `model` whose parameters and buffers are empty meta tensors: safe to load a state dict
    into with `assign=True` without touching (or copying the data of) the user's model.

    Tied weights stay tied in the copy, because each shared tensor maps to one meta tensor.

    Args:
        model: any `nn.Module`.

    Returns:
        The twin, in the same train/eval mode.

    Raises:
        ModelBuildError: the module cannot be deep-copied (it holds an object that refuses to be).
    """
    memo: dict[int, Any] = {}
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) in memo:
            continue
        empty = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = nn.Parameter(empty, requires_grad=tensor.requires_grad) if isinstance(tensor, nn.Parameter) else empty
    try:
        return copy.deepcopy(model, memo)
    except Exception as exc:
        raise ModelBuildError(None, f"cannot copy {type(model).__name__} to check a load on the meta device: "
                                    f"{type(exc).__name__}: {exc}. Pass a factory string instead of the instance") from exc
