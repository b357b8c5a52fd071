"""
An input for a model: the user's, or one synthesised from the model's first layer.

Synthesised inputs come from a seeded CPU generator and are then moved to the device, so the same
seed gives the same numbers on every device and in every precision: comparisons stay fair.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ckptview.errors import ModelBuildError

DEFAULT_SEED = 0
# Token sequences are short: long enough to exercise attention, short enough to run anywhere.
_DEFAULT_TOKENS = 16
# Spatial sizes per convolution rank: ImageNet-style images; short clips for video.
_CONV_SHAPES = {1: (224,), 2: (224, 224), 3: (16, 112, 112)}
_CONV_KINDS = {"Conv1d": 1, "Conv2d": 2, "Conv3d": 3, "ConvTranspose1d": 1, "ConvTranspose2d": 2, "ConvTranspose3d": 3}


@dataclass(frozen=True)
class InputSpec:
    """
    What the model is fed.

    Attributes:
        kind: "image"/"signal"/"volume" (float from a Conv layer), "tokens" (int64 ids from an
            Embedding), "features" (float from a Linear), or "given" (the user's).
        shape: the shape of the (first) input tensor.
        dtype: its dtype.
        layer: the layer the shape was inferred from, e.g. "conv1 (Conv2d, in_channels=3)".
        high: for tokens, ids are drawn from [0, high).
        seed: the seed of the generator (None for a given input).
    """

    kind: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    layer: str = ""
    high: int | None = None
    seed: int | None = DEFAULT_SEED

    def describe(self) -> str:
        shape = "[" + ", ".join(map(str, self.shape)) + "]"
        what = f"{self.kind} {shape} {str(self.dtype).removeprefix('torch.')}"
        if self.high is not None:
            what += f" ids < {self.high}"
        return f"{what}, from {self.layer}" if self.layer else what


def first_layer(model: nn.Module) -> tuple[str, nn.Module, str] | None:
    """The first Conv/Embedding/Linear module in registration order: (name, module, kind name)."""
    for name, module in model.named_modules():
        kind = _kind_name(module)
        if (kind in _CONV_KINDS or kind in ("Embedding", "EmbeddingBag", "Linear")) and _weight(module) is not None:
            return name, module, kind
    return None


def suggest_input(model: nn.Module, *, seed: int = DEFAULT_SEED) -> InputSpec:
    """
    The input the model's first layer expects: Conv2d(C) → [1, C, 224, 224]; Embedding(N) →
    [1, 16] ids below N (fewer when a smaller Embedding, e.g. positions, caps the length);
    Linear(F) → [1, F].

    Raises:
        ModelBuildError: the model has no Conv, Embedding or Linear layer to infer from; give an input.
    """
    found = first_layer(model)
    if found is None:
        raise ModelBuildError(None, "cannot infer an input: the model has no Conv, Embedding or Linear layer. "
                                    "Give one (input=torch.randn(...) or --input-shape).")
    name, module, kind = found
    weight = _weight(module)
    assert weight is not None
    label = name or "<root>"
    if kind in _CONV_KINDS:
        transposed = kind.startswith("ConvTranspose")
        # Conv weights are [out, in/groups, *k]; transposed convs store [in, out/groups, *k].
        channels = weight.shape[0] if transposed else weight.shape[1] * int(getattr(module, "groups", 1) or 1)
        rank = _CONV_KINDS[kind]
        return InputSpec({1: "signal", 2: "image", 3: "volume"}[rank], (1, channels, *_CONV_SHAPES[rank]),
                         _float_dtype(model), f"{label} ({kind}, in_channels={channels})", seed=seed)
    if kind in ("Embedding", "EmbeddingBag"):
        vocab = weight.shape[0]
        caps = [_weight(m).shape[0] for _, m, k in _all_layers(model) if k == "Embedding" and _weight(m) is not None]
        length = max(1, min([_DEFAULT_TOKENS, *caps]))
        return InputSpec("tokens", (1, length), torch.int64, f"{label} ({kind}, num_embeddings={vocab})",
                         high=vocab, seed=seed)
    features = weight.shape[1]
    return InputSpec("features", (1, features), _float_dtype(model), f"{label} (Linear, in_features={features})",
                     seed=seed)


def make_input(model: nn.Module, shape: Sequence[int] | None = None, *, seed: int = DEFAULT_SEED,
               device: str | torch.device = "cpu") -> tuple[torch.Tensor, InputSpec]:
    """
    A seeded input for `model` on `device`, shaped like `suggest_input` or like `shape`.

    Args:
        model: the model the input is for (its first layer decides kind and dtype).
        shape: override the suggested shape, e.g. (8, 3, 64, 64); token ids keep their range.
        seed: the same seed gives the same tensor on every device.
        device: where to put it.

    Returns:
        (tensor, spec).

    Example:
        >>> x, spec = make_input(torchvision.models.resnet18(), (2, 3, 64, 64))
        >>> spec.describe()
        'image [2, 3, 64, 64] float32, from conv1 (Conv2d, in_channels=3)'
    """
    spec = suggest_input(model, seed=seed)
    if shape is not None:
        shape = tuple(int(d) for d in shape)
        if not shape or any(d <= 0 for d in shape):
            raise ModelBuildError(None, f"input shape {list(shape)} must be non-empty with positive sizes")
        spec = InputSpec(spec.kind, shape, spec.dtype, spec.layer, spec.high, seed)
    generator = torch.Generator().manual_seed(seed)
    if spec.kind == "tokens":
        tensor = torch.randint(0, spec.high or 2, spec.shape, generator=generator, dtype=torch.int64)
    else:
        tensor = torch.randn(spec.shape, generator=generator, dtype=torch.float32).to(spec.dtype)
    return tensor.to(device), spec


def given_input(value: Any) -> tuple[tuple[Any, ...], InputSpec]:
    """
    The positional arguments for a user's input, and its spec.

    Args:
        value: a tensor (one argument); a tuple/list of tensors (several arguments); or a
            (nested) list of numbers, turned into one tensor.
    """
    if isinstance(value, torch.Tensor):
        args: tuple[Any, ...] = (value,)
    elif isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
        args = tuple(value)
    elif isinstance(value, (list, tuple)):
        try:
            args = (torch.tensor(value),)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ModelBuildError(None, f"cannot turn the given input into a tensor: {exc}") from exc
    else:
        raise ModelBuildError(None, f"input must be a tensor, a list of tensors or a list of numbers, "
                                    f"not {type(value).__name__}")
    first = args[0]
    return args, InputSpec("given", tuple(first.shape), first.dtype, seed=None)


def _all_layers(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    return [(name, module, _kind_name(module)) for name, module in model.named_modules()]


def _kind_name(module: nn.Module) -> str:
    # Scripted and traced modules are RecursiveScriptModule; original_name keeps the Python class name.
    return getattr(module, "original_name", None) or type(module).__name__


def _weight(module: nn.Module) -> torch.Tensor | None:
    weight = getattr(module, "weight", None)
    return weight if isinstance(weight, torch.Tensor) and weight.dim() >= 2 else None


def _float_dtype(model: nn.Module) -> torch.dtype:
    for tensor in model.parameters():
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32
