"""
Key diff: what `load_state_dict` would say when the tensors of one state dict (the left side, the
checkpoint) are loaded into something with the keys of another (the right side, a model or a
second checkpoint), in torch's own words, with long key lists folded the way people read them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ckptview.analyzers.sections import Section, model_section, model_state_dict
from ckptview.readers import open_checkpoint
from ckptview.readers.model import Checkpoint

__all__ = ["QUANTIZED_DTYPES", "KeyDiff", "ShapeMismatch", "DtypeMismatch", "key_diff", "compress_keys", "spec_of", "state_dict_of"]

Spec = tuple[tuple[int, ...], torch.dtype]

QUANTIZED_DTYPES = frozenset({torch.qint8, torch.quint8, torch.qint32, torch.quint4x2, torch.quint2x4})


def spec_of(value: Any) -> Spec:
    """(shape, dtype) of a TensorEntry, a torch.Tensor or an already made (shape, dtype) pair."""
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], torch.dtype):
        return tuple(value[0]), value[1]
    return tuple(value.shape), value.dtype


@dataclass(frozen=True)
class ShapeMismatch:
    key: str
    left: tuple[int, ...]  # in the checkpoint
    right: tuple[int, ...]  # in the model (or the second checkpoint)

    def message(self) -> str:
        return (f"size mismatch for {self.key}: copying a param with shape {torch.Size(self.left)} from checkpoint, "
                f"the shape in current model is {torch.Size(self.right)}.")


@dataclass(frozen=True)
class DtypeMismatch:
    key: str
    left: torch.dtype
    right: torch.dtype

    @property
    def blocks_loading(self) -> bool:
        """Quantized on one side only: load_state_dict's copy_ refuses it, where it casts other dtypes."""
        return (self.left in QUANTIZED_DTYPES) != (self.right in QUANTIZED_DTYPES)

    def message(self) -> str:
        return (f"dtype mismatch for {self.key}: the checkpoint has {self.left}, the current model {self.right}; "
                "copying between quantized and non-quantized tensors is not allowed (dequantize first).")


@dataclass(frozen=True)
class KeyDiff:
    """
    How two state dicts' keys line up. Vocabulary as in `load_state_dict(left)` into a model with
    the right side's keys.

    Attributes:
        missing: keys of the right side that the left lacks ("Missing key(s) in state_dict").
        unexpected: keys of the left side the right lacks ("Unexpected key(s) in state_dict").
        shape_mismatches: common keys whose shapes differ ("size mismatch for ...").
        dtype_mismatches: common keys with the same shape but another dtype; `load_state_dict`
            casts these silently (fp16 vs fp32), except quantized vs float (`blocks_loading`).
        matched: common keys with equal shapes.
    """

    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    shape_mismatches: tuple[ShapeMismatch, ...]
    dtype_mismatches: tuple[DtypeMismatch, ...]
    matched: int

    @property
    def ok(self) -> bool:
        """True when `load_state_dict(strict=True)` would accept the keys, shapes and dtypes."""
        return not (self.missing or self.unexpected or self.shape_mismatches
                    or any(m.blocks_loading for m in self.dtype_mismatches))

    def message(self, *, compress: bool = True) -> str:
        """The error `load_state_dict` would raise (keys folded unless `compress=False`), or a line saying all match."""
        if self.ok:
            return f"All keys matched successfully ({self.matched} tensors)."
        fold = compress_keys if compress else list
        lines = ["Error(s) in loading state_dict:"]
        if self.missing:
            lines.append("\tMissing key(s) in state_dict: " + ", ".join(f'"{k}"' for k in fold(self.missing)) + ". ")
        if self.unexpected:
            lines.append("\tUnexpected key(s) in state_dict: " + ", ".join(f'"{k}"' for k in fold(self.unexpected)) + ". ")
        lines.extend("\t" + mismatch.message() for mismatch in self.shape_mismatches)
        lines.extend("\t" + mismatch.message() for mismatch in self.dtype_mismatches if mismatch.blocks_loading)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.message()

    def to_frame(self) -> Any:
        """One row per problem key: `key`, `problem` (missing/unexpected/shape/dtype), `left`, `right`."""
        import pandas as pd

        rows = [(k, "missing", None, None) for k in self.missing]
        rows += [(k, "unexpected", None, None) for k in self.unexpected]
        rows += [(m.key, "shape", list(m.left), list(m.right)) for m in self.shape_mismatches]
        rows += [(m.key, "dtype", str(m.left), str(m.right)) for m in self.dtype_mismatches]
        return pd.DataFrame(rows, columns=["key", "problem", "left", "right"])


def key_diff(left: Mapping[str, Any], right: Mapping[str, Any]) -> KeyDiff:
    """
    Compare keys, shapes and dtypes of two state dicts without reading tensor data.

    Args:
        left: the state dict being loaded (a checkpoint's): values are `TensorEntry`s, tensors,
            or `(shape, dtype)` pairs.
        right: what it is loaded into: a model's `expected_state(model)`, or another checkpoint's tensors.

    Returns:
        A `KeyDiff`; key order follows `right` for missing and mismatched keys, `left` for unexpected ones.

    Example:
        >>> d = key_diff({"module.fc.weight": torch.zeros(2, 3)}, {"fc.weight": ((2, 3), torch.float32)})
        >>> d.missing, d.unexpected
        (('fc.weight',), ('module.fc.weight',))
    """
    left_specs = {key: spec_of(value) for key, value in left.items()}
    right_specs = {key: spec_of(value) for key, value in right.items()}
    shapes, dtypes = [], []
    matched = 0
    for key, (shape, dtype) in right_specs.items():
        if key not in left_specs:
            continue
        left_shape, left_dtype = left_specs[key]
        if left_shape != shape:
            shapes.append(ShapeMismatch(key, left_shape, shape))
            continue
        matched += 1
        if left_dtype != dtype:
            dtypes.append(DtypeMismatch(key, left_dtype, dtype))
    return KeyDiff(
        missing=tuple(key for key in right_specs if key not in left_specs),
        unexpected=tuple(key for key in left_specs if key not in right_specs),
        shape_mismatches=tuple(shapes),
        dtype_mismatches=tuple(dtypes),
        matched=matched,
    )


_INT = re.compile(r"\d+")


def compress_keys(keys: Iterable[str]) -> list[str]:
    """
    Fold keys that differ only in layer numbers (then in their last part) into one pattern each.

    Innermost numbers fold first, so nested blocks fold fully: `layers.{0..1}.blocks.{0..3}.mlp.weight`.
    Runs of consecutive numbers read `{0..11}`, others `{0,2,5}`.

    Args:
        keys: dotted state-dict keys.

    Returns:
        Patterns in the order their first key appeared.

    Example:
        >>> compress_keys([f"encoder.layer.{i}.attention.self.query.{p}" for i in range(12) for p in ("weight", "bias")])
        ['encoder.layer.{0..11}.attention.self.query.{weight,bias}']
    """
    items: list[list[Any]] = [key.split(".") for key in dict.fromkeys(keys)]
    depth = max((len(parts) for parts in items), default=0)
    for position in reversed(range(depth)):
        items = _fold(items, position, numeric=True)
    if items:
        items = _fold(items, None, numeric=False)
    return [".".join(_part_text(part) for part in parts) for parts in items]


def _fold(items: list[list[Any]], position: int | None, *, numeric: bool) -> list[list[Any]]:
    groups: dict[tuple[Any, ...], list[list[Any]]] = {}
    order: list[tuple[Any, ...] | int] = []
    for index, parts in enumerate(items):
        at = len(parts) - 1 if position is None else position
        part = parts[at] if at < len(parts) else None
        foldable = isinstance(part, str) and (bool(_INT.fullmatch(part)) if numeric else True)
        if not foldable:
            order.append(index)
            continue
        group_key = (at, len(parts), *(tuple(p) if isinstance(p, list) else p for i, p in enumerate(parts) if i != at))
        if group_key not in groups:
            groups[group_key] = []
            order.append(group_key)
        groups[group_key].append(parts)
    folded = []
    for entry in order:
        if isinstance(entry, int):
            folded.append(items[entry])
            continue
        members = groups[entry]
        at = entry[0]
        if len(members) == 1:
            folded.append(members[0])
            continue
        merged = list(members[0])
        merged[at] = [int(m[at]) for m in members] if numeric else [m[at] for m in members]
        folded.append(merged)
    return folded


def _part_text(part: Any) -> str:
    if isinstance(part, str):
        return part
    if part and isinstance(part[0], int):
        return "{" + ",".join(_runs(sorted(set(part)))) + "}"
    return "{" + ",".join(part) + "}"


def _runs(numbers: list[int]) -> list[str]:
    runs, start = [], 0
    for i in range(1, len(numbers) + 1):
        if i == len(numbers) or numbers[i] != numbers[i - 1] + 1:
            first, last = numbers[start], numbers[i - 1]
            runs.append(str(first) if first == last else f"{first}..{last}" if last > first + 1 else f"{first},{last}")
            start = i
    return runs


@contextmanager
def state_dict_of(source: Any, *, trust: bool = False) -> Iterator[tuple[dict[str, Any], Section | None]]:
    """
    The model state dict of a path, an open `Checkpoint` or a mapping of tensors, and where it sat.

    A path is opened here and closed on exit; a `Checkpoint` stays as the caller left it. For a
    checkpoint the model section is used (`state_dict` of a Lightning file, not its optimizer).

    Args:
        source: a checkpoint path, a `Checkpoint`, a mapping of names to tensors / `TensorEntry`s, or
            an `nn.Module` (its `state_dict()`).
        trust: passed to `ckptview.open` for paths.

    Yields:
        (entries, section): the section is None for a mapping or a module.

    Raises:
        CkptviewError: the path cannot be opened (see `ckptview.open`).
        TypeError: `source` is none of these.
    """
    if isinstance(source, Checkpoint):
        section = model_section(source)
        yield model_state_dict(source, section), section
        return
    if isinstance(source, Mapping):
        yield dict(source), None
        return
    if isinstance(source, nn.Module):
        yield dict(source.state_dict()), None
        return
    if isinstance(source, (str, os.PathLike)):
        with open_checkpoint(source, trust=trust) as checkpoint:
            section = model_section(checkpoint)
            yield model_state_dict(checkpoint, section), section
        return
    raise TypeError(f"expected a checkpoint path, a ckptview Checkpoint, a state dict or an nn.Module, "
                    f"not {type(source).__name__}")
