"""
Did my export keep my weights? Tensors of two files of different formats (a `.pt` and its ONNX
export, its `.safetensors` or `.npz` copy, a Keras `.h5` and its `.tflite`) are paired by name where
the exporter kept names, else by content: the same values up to an axis order or a dtype cast. What has no counterpart is
explained where it can be: BatchNorm folded into the preceding convolution (checked by computing
`w·γ/√(var+ε)` and `β + (b − mean)·γ/√(var+ε)` against the exported kernel and bias), counters
an export drops (`num_batches_tracked`), constants only the graph has (shape tensors), and tied
weights one file stores under both names and the other once (a `torch.save`d GPT-2 keeps
`lm_head.weight` as a second name of `transformer.wte.weight`; `save_pretrained`'s safetensors
file and an ONNX export keep one copy).

Reading stays bounded: pairs with the same name are loaded one pair at a time and compared in
full; for the rest, each tensor is streamed once in chunks for a fingerprint (element count, sum,
sum of squares, min, max: unchanged by a transpose, within a cast's rounding after a cast), and
only pairs whose fingerprints agree are loaded, one pair at a time, and compared in full. A few
sampled values would be cheaper but depend on the layout, so they cannot find a transposed copy
without reading it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ckptview.readers.dtypes import UNCONVERTIBLE, dtype_name
from ckptview.readers.model import LayerRole, TensorEntry, view_identity, without_numbers

__all__ = ["HOW", "TensorMatch", "CrossFormatMatch", "match_tensors"]

HOW = ("name", "content", "transposed", "cast", "folded", "dropped", "graph_constant", "tied")

# BatchNorm's default eps in torch (1e-5) and Keras/TF (1e-3); a fold is recognised with either.
_BN_EPS = (1e-5, 1e-3)
_COUNTERS = ("num_batches_tracked",)
_CHUNK_BYTES = 8 * 1024 * 1024
_SLICE = 1 << 20  # elements per slice when subtracting two loaded tensors
_MAX_PERMUTED_DIMS = 5  # axis orders tried up to 5-D (120); exporters permute conv kernels, never more
# BatchNorm's tensors as torch and Keras name them
_BN_LEAVES = {"running_mean": ("running_mean", "moving_mean"), "running_var": ("running_var", "moving_variance"),
              "weight": ("weight", "gamma"), "bias": ("bias", "beta")}


@dataclass(frozen=True)
class TensorMatch:
    """
    What one tensor became in the other file.

    Attributes:
        left: the left key, or the left keys a folded tensor was computed from (None when only
            the right side has it: a graph constant, a counter the right side added).
        right: the right key (None when the left tensor was dropped).
        how: "name" (same name, same values or the value diff says how they differ), "content"
            (same values under another name), "transposed" (axes in another order), "cast" (another dtype, values equal
            after the cast), "folded" (BatchNorm folded into a convolution), "dropped" (a counter
            the export leaves out), "graph_constant" (a tensor only the graph has, used by no layer),
            "tied" (a second name one side gives a stored tensor, the other side storing it once:
            paired with what its twin became).
        max_abs_diff: max |left (transformed as `how` says) − right|; None where nothing is compared.
        detail: the transform in words, e.g. "[64, 256] → [256, 64]" or "bn1 folded into conv1, eps 1e-05".
    """

    left: str | tuple[str, ...] | None
    right: str | None
    how: str
    max_abs_diff: float | None = None
    detail: str = ""

    @property
    def left_keys(self) -> tuple[str, ...]:
        if self.left is None:
            return ()
        return (self.left,) if isinstance(self.left, str) else self.left

    def to_dict(self) -> dict[str, Any]:
        return {"left": list(self.left) if isinstance(self.left, tuple) else self.left, "right": self.right,
                "how": self.how, "max_abs_diff": self.max_abs_diff, "detail": self.detail}


@dataclass(frozen=True)
class CrossFormatMatch:
    """
    How the tensors of two files of different formats pair up.

    Attributes:
        matches: one `TensorMatch` per right tensor explained (and per left tensor dropped), left order first.
        unexplained_left, unexplained_right: keys nothing explains.
        left_format, right_format: the two formats.
    """

    matches: tuple[TensorMatch, ...]
    unexplained_left: tuple[str, ...]
    unexplained_right: tuple[str, ...]
    left_format: str = ""
    right_format: str = ""

    @property
    def complete(self) -> bool:
        """True when every tensor on both sides is paired or explained."""
        return not (self.unexplained_left or self.unexplained_right)

    def counts(self) -> dict[str, int]:
        """How many matches of each kind."""
        found = {how: 0 for how in HOW}
        for match in self.matches:
            found[match.how] += 1
        return {how: n for how, n in found.items() if n}

    def became(self, left_key: str) -> tuple[TensorMatch, ...]:
        """Every match a left key takes part in (a BatchNorm weight is in two folded matches)."""
        return tuple(m for m in self.matches if left_key in m.left_keys)

    def to_frame(self) -> Any:
        """One row per match: left (keys joined by ", "), right, how, max_abs_diff, detail."""
        import pandas as pd

        return pd.DataFrame([{"left": ", ".join(m.left_keys), "right": m.right, "how": m.how,
                              "max_abs_diff": m.max_abs_diff, "detail": m.detail} for m in self.matches],
                            columns=["left", "right", "how", "max_abs_diff", "detail"])

    def to_dict(self) -> dict[str, Any]:
        return {"matches": [m.to_dict() for m in self.matches], "unexplained_left": list(self.unexplained_left),
                "unexplained_right": list(self.unexplained_right)}


@dataclass(frozen=True)
class _Print:
    """A tensor's fingerprint: unchanged by a transpose, moved only by rounding under a cast."""

    numel: int
    total: float
    squares: float
    low: float
    high: float


def match_tensors(left: Mapping[str, Any], right: Mapping[str, Any], *,
                  right_layers: Mapping[str, LayerRole] | None = None, right_is_graph: bool = False,
                  left_format: str = "", right_format: str = "") -> CrossFormatMatch:
    """
    Pair the tensors of two state dicts of different formats, and explain the rest.

    Args:
        left, right: key → `TensorEntry` or `torch.Tensor` (the left side is usually the PyTorch file).
        right_layers: which layer uses each right tensor (`Checkpoint.layers` of an ONNX file): a
            tensor no layer uses and nothing matches is a graph constant.
        right_is_graph: the right side is a graph (ONNX), whose unused unmatched tensors are constants.
        left_format, right_format: recorded in the result.

    Returns:
        A `CrossFormatMatch`.

    Example:
        >>> with ckptview.open("cnn.pt") as pt, ckptview.open("cnn.onnx") as exported:
        ...     m = match_tensors(model_state_dict(pt), model_state_dict(exported), right_layers=exported.layers,
        ...                       right_is_graph=True)
        >>> m.became("conv1.weight")[0].how, m.unexplained_left
        ('folded', ())
    """
    matcher = _Matcher(left, right)
    matcher.by_name_exact()
    matcher.dropped_counters()
    matcher.folded_batchnorm()
    matcher.tied_names()
    matcher.by_content()
    matcher.by_name_changed()
    if right_is_graph:
        layers = right_layers or {}
        for key in list(matcher.right_open):
            if key not in layers:
                matcher.add(TensorMatch(None, key, "graph_constant", detail="used by no layer of the graph"))
                matcher.right_open.remove(key)
    # after the constants: a layer's weight equal to a left tensor is a copy; a shape tensor of ones is not
    matcher.second_copies()
    explained = {key for match in matcher.matches for key in match.left_keys}
    order = {key: i for i, key in enumerate(left)}
    matches = sorted(matcher.matches, key=lambda m: min((order.get(k, len(order)) for k in m.left_keys),
                                                        default=len(order)))
    return CrossFormatMatch(tuple(matches), tuple(k for k in left if k not in explained),
                            tuple(k for k in right if k in matcher.right_open), left_format, right_format)


class _Matcher:
    def __init__(self, left: Mapping[str, Any], right: Mapping[str, Any]) -> None:
        self.left = {k: v for k, v in left.items() if _readable(v)}
        self.right = {k: v for k, v in right.items() if _readable(v)}
        self.left_open = list(self.left)
        self.right_open = list(self.right)
        self.matches: list[TensorMatch] = []
        self._prints: dict[tuple[str, str], _Print] = {}

    def add(self, match: TensorMatch) -> None:
        self.matches.append(match)

    def take(self, left_keys: tuple[str, ...], right_key: str | None) -> None:
        for key in left_keys:
            if key in self.left_open:
                self.left_open.remove(key)
        if right_key is not None and right_key in self.right_open:
            self.right_open.remove(right_key)

    # -- the steps, in order ------------------------------------------------------------------------

    def by_name_exact(self) -> None:
        """Same name, and the same values (up to a cast or a transpose): the exporter kept the tensor."""
        for key in list(self.left_open):
            if key not in self.right_open:
                continue
            found = self._compare(key, key)
            if found is not None:
                self.add(found)
                self.take((key,), key)

    def dropped_counters(self) -> None:
        """Training counters one side keeps and the other leaves out."""
        for key in list(self.left_open):
            if key.rpartition(".")[2] in _COUNTERS:
                self.add(TensorMatch(key, None, "dropped", detail="a training counter; inference does not use it"))
                self.take((key,), None)
        for key in list(self.right_open):
            if key.rpartition(".")[2] in _COUNTERS:
                self.add(TensorMatch(None, key, "dropped", detail="a training counter the left side leaves out"))
                self.right_open.remove(key)

    def folded_batchnorm(self) -> None:
        """A BatchNorm group whose statistics went into the preceding convolution's kernel and bias."""
        keys = list(self.left)
        for prefix, group in _batchnorm_groups(self.left).items():
            if not any(k in self.left_open for k in group.values()):
                continue
            conv = _preceding_weight(keys, self.left, group["running_mean"], _numel(self.left[group["running_mean"]]))
            if conv is None:
                continue
            self._try_fold(prefix, group, conv)

    def tied_names(self) -> None:
        """
        A name whose stored view another name of its side also has (tied weights), that twin paired:
        the other file stores the tensor once. Found by storage, not by value: two equal tensors saved
        apart are not tied.
        """
        for side, keys in (("left", self.left_open), ("right", self.right_open)):
            state = self.left if side == "left" else self.right
            paired = {m.left if side == "left" else m.right: m for m in self.matches
                      if m.how in _ONE_TO_ONE and m.left is not None and m.right is not None}
            twin_of = {}
            for key, value in state.items():
                identity = _stored_view(value)
                if identity is not None and key in paired:
                    twin_of.setdefault(identity, key)
            for key in list(keys):
                twin = twin_of.get(_stored_view(state[key]))
                if twin is None:
                    continue
                match = paired[twin]
                detail = f"tied to {twin}: one stored tensor under both names here, stored once in the other file"
                if side == "left":
                    self.add(TensorMatch(key, match.right, "tied", match.max_abs_diff, detail))
                    self.left_open.remove(key)
                else:
                    self.add(TensorMatch(match.left, key, "tied", match.max_abs_diff, detail))
                    self.right_open.remove(key)

    def by_content(self) -> None:
        """Same values under another name, a transpose or a cast: found by fingerprint, confirmed in full."""
        for key in list(self.left_open):
            for other in self._candidates(key):
                found = self._compare(key, other)
                if found is not None:
                    self.add(TensorMatch(key, other, "content" if found.how == "name" else found.how,
                                         found.max_abs_diff, found.detail))
                    self.take((key,), other)
                    break

    def by_name_changed(self) -> None:
        """Same name and shape but other values, and nothing else explains either: paired, with the difference."""
        for key in list(self.left_open):
            if key in self.right_open and _shape(self.left[key]) == _shape(self.right[key]):
                a, b = _load(self.left[key]), _load(self.right[key])
                self.add(TensorMatch(key, key, "name", _max_abs(a, b), "values differ"))
                self.take((key,), key)

    def second_copies(self) -> None:
        """A right tensor holding the values of a left one already paired: the other file stores it twice
        (an ONNX export keeps a tied embedding for Gather and its transpose for the head's MatMul)."""
        paired = dict.fromkeys(m.left for m in self.matches
                               if m.how in _ONE_TO_ONE + ("tied",) and isinstance(m.left, str))
        for key in list(self.right_open):
            for other in paired:
                found = self._compare(other, key)
                if found is not None:
                    self.add(TensorMatch(other, key, "content" if found.how == "name" else found.how,
                                         found.max_abs_diff, (found.detail + "; " if found.detail else "")
                                         + "a second copy: the other file stores it once"))
                    self.right_open.remove(key)
                    break

    # -- helpers ------------------------------------------------------------------------------------

    def _compare(self, left_key: str, right_key: str) -> TensorMatch | None:
        """A match when the right tensor holds the left one's values, as stored, with its axes permuted, or cast."""
        a_entry, b_entry = self.left[left_key], self.right[right_key]
        a_shape, b_shape = _shape(a_entry), _shape(b_entry)
        orders = _orders(a_shape, b_shape)
        if not orders:
            return None
        # a name pair is compared directly; fingerprints only narrow the search for content pairs
        if left_key != right_key and not _prints_agree(self._print("left", left_key), self._print("right", right_key),
                                                       _dtype(a_entry), _dtype(b_entry)):
            return None
        loaded, b = _load(a_entry), _load(b_entry)
        for order in orders:
            a = loaded.permute(order)
            if _same_values(a, b):
                break
        else:
            return None
        cast = a.dtype != b.dtype
        difference = _max_abs(a, b)
        names = f"{_dtype_text(a.dtype)} → {_dtype_text(b.dtype)}"
        if order != tuple(range(len(order))):
            detail = (f"[{', '.join(map(str, a_shape))}] → [{', '.join(map(str, b_shape))}]"
                      + (f" (axes {', '.join(map(str, order))})" if len(order) > 2 else "") + (f", {names}" if cast else ""))
            return TensorMatch(left_key, right_key, "transposed", difference, detail)
        if cast:
            return TensorMatch(left_key, right_key, "cast", difference, names)
        return TensorMatch(left_key, right_key, "name", difference)

    def _candidates(self, key: str) -> list[str]:
        shape = _shape(self.left[key])
        same_shape = [k for k in self.right_open if _orders(shape, _shape(self.right[k]))]
        # a tensor tied to another (embedding and head) may be stored once: fall back to used ones
        return same_shape or [k for k in self.right if _orders(shape, _shape(self.right[k])) and k not in self.right_open
                              and any(m.right == k and m.how in _ONE_TO_ONE for m in self.matches)]

    def _try_fold(self, prefix: str, group: dict[str, str], conv: str) -> None:
        left = self.left
        mean = _load(left[group["running_mean"]]).double()
        var = _load(left[group["running_var"]]).double()
        gamma = _load(left[group["weight"]]).double() if "weight" in group else torch.ones_like(mean)
        beta = _load(left[group["bias"]]).double() if "bias" in group else torch.zeros_like(mean)
        weight = _load(left[conv]).double()
        module = conv.rpartition(".")[0]
        conv_bias_key = f"{module}.bias" if module else "bias"
        conv_bias = _load(left[conv_bias_key]).double() if conv_bias_key in left else torch.zeros_like(mean)
        axis = _output_axis(conv)
        for eps in _BN_EPS:
            scale = gamma / torch.sqrt(var + eps)
            kernel = weight * scale.reshape([-1 if i == axis % weight.dim() else 1 for i in range(weight.dim())])
            bias = beta + (conv_bias - mean) * scale
            found_kernel = self._find_folded(kernel)
            if found_kernel is None:
                continue
            detail = f"BatchNorm {prefix} folded into {module or conv}, eps {eps:g}"
            kernel_from = (conv, *(group[k] for k in ("weight", "running_var") if k in group))
            self.add(TensorMatch(kernel_from, found_kernel[0], "folded", found_kernel[1], detail + ": w·γ/√(var+ε)"))
            self.take(kernel_from, found_kernel[0])
            found_bias = self._find_folded(bias)
            if found_bias is not None:
                bias_from = tuple(k for k in (group.get("bias"), group["running_mean"], group.get("weight"),
                                              group["running_var"], conv_bias_key if conv_bias_key in left else None)
                                  if k is not None)
                self.add(TensorMatch(bias_from, found_bias[0], "folded", found_bias[1],
                                     detail + ": β + (b − mean)·γ/√(var+ε)"))
                self.take(bias_from, found_bias[0])
            elif not float(bias.abs().max()):
                # an all-zero folded bias (γ=1, β=0, mean 0): exporters leave the bias out
                bias_from = tuple(k for k in (group.get("bias"), group["running_mean"]) if k is not None)
                self.add(TensorMatch(bias_from, None, "folded", None, detail + "; the folded bias is zero and left out"))
                self.take(bias_from, None)
            return

    def _find_folded(self, expected: torch.Tensor) -> tuple[str, float] | None:
        scale = float(expected.abs().max()) if expected.numel() else 0.0
        wanted = _fingerprint(expected)
        for key in self.right_open:
            entry = self.right[key]
            orders = _orders(tuple(expected.shape), _shape(entry))
            if not orders or not _dtype(entry).is_floating_point:
                continue
            # loaded only when its fingerprint is near: float32 folding moves the sum of squares by ~1e-7
            found = self._print("right", key)
            if abs(found.squares - wanted.squares) > 1e-4 * max(found.squares, wanted.squares) + 1e-12:
                continue
            value = _load(entry)
            for order in orders:  # the exported kernel may keep another axis order (TFLite: out, h, w, in)
                difference = _max_abs(expected.permute(order), value)
                # the exporter folds in float32: allow its rounding, nothing more
                if difference <= 1e-5 * scale + 1e-7:
                    return key, difference
        return None

    def _print(self, side: str, key: str) -> _Print:
        cached = self._prints.get((side, key))
        if cached is None:
            value = (self.left if side == "left" else self.right)[key]
            cached = self._prints[(side, key)] = _fingerprint(value)
        return cached


_ONE_TO_ONE = ("name", "content", "transposed", "cast")


def _stored_view(value: Any) -> Any:
    """What two names of one tied tensor have in common: their stored view (None when unknown)."""
    if isinstance(value, TensorEntry):
        return None if value.info.storage is None else view_identity(value.info)
    if isinstance(value, torch.Tensor) and value.layout == torch.strided and value.device.type != "meta":
        return (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), value.stride(),
                value.dtype)
    return None


def _fingerprint(value: Any) -> _Print:
    total = squares = 0.0
    low, high = math.inf, -math.inf
    count = 0
    chunks = value.iter_chunks(_CHUNK_BYTES) if isinstance(value, TensorEntry) else [value.detach().reshape(-1)]
    for chunk in chunks:
        if chunk.is_quantized:
            chunk = chunk.dequantize()
        if not chunk.numel():
            continue
        values = chunk.reshape(-1).double()
        count += chunk.numel()
        chunk_total = float(values.sum())
        # a finite float64 sum of float32-or-narrower values means no NaN/Inf: skip the masking pass
        finite = values if math.isfinite(chunk_total) else values[torch.isfinite(values)]
        if finite.numel():
            total += chunk_total if finite is values else float(finite.sum())
            squares += float(torch.dot(finite, finite))
            chunk_low, chunk_high = torch.aminmax(finite)
            low, high = min(low, float(chunk_low)), max(high, float(chunk_high))
    return _Print(count, total, squares, low, high)


def _prints_agree(a: _Print, b: _Print, a_dtype: torch.dtype, b_dtype: torch.dtype) -> bool:
    if a.numel != b.numel:
        return False
    # a cast rounds each value by at most half its dtype's epsilon; sums of the same values in
    # another order (a transpose) differ by float64 rounding only
    rel = 4 * max(_eps(a_dtype), _eps(b_dtype)) if a_dtype != b_dtype else 1e-9
    norm = math.sqrt(max(a.squares, b.squares))
    size = math.sqrt(a.numel) * norm + 1e-30
    return (abs(a.squares - b.squares) <= 2 * rel * max(a.squares, b.squares) + 1e-30
            and abs(a.total - b.total) <= rel * size
            and all(abs(x - y) <= rel * max(abs(x), abs(y)) + 1e-30 or x == y for x, y in ((a.low, b.low), (a.high, b.high))))


def _batchnorm_groups(state: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """prefix → {"running_mean": key, "running_var": key, "weight"?: key, "bias"?: key}, in torch's or Keras' names."""
    groups: dict[str, dict[str, str]] = {}
    for key in state:
        prefix, _, leaf = key.rpartition(".")
        if not prefix or leaf not in _BN_LEAVES["running_mean"]:
            continue
        found = {role: next((f"{prefix}.{name}" for name in names if f"{prefix}.{name}" in state), None)
                 for role, names in _BN_LEAVES.items()}
        if found["running_var"] is None:
            continue
        groups[prefix] = {role: name for role, name in found.items()
                          if name is not None and _shape(state[name]) == _shape(state[key])}
    return groups


def _preceding_weight(keys: list[str], state: Mapping[str, Any], anchor: str, channels: int) -> str | None:
    """The nearest weight before `anchor` in state-dict order with `channels` outputs: the layer feeding the BatchNorm."""
    for key in reversed(keys[:keys.index(anchor)]):
        shape = _shape(state[key])
        if key.rpartition(".")[2] in ("weight", "kernel") and len(shape) >= 2 and shape[_output_axis(key)] == channels:
            return key
    return None


def _output_axis(key: str) -> int:
    """Where a weight keeps its output channels: first in torch ([out, in, kh, kw]), last in a Keras kernel."""
    return -1 if key.endswith("kernel") else 0


def _orders(left: tuple[int, ...], right: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The axis orders that turn `left`'s shape into `right`'s, the identity first (none when they cannot)."""
    if len(left) != len(right) or sorted(left) != sorted(right) or len(left) > _MAX_PERMUTED_DIMS:
        return [tuple(range(len(left)))] if left == right else []
    return [order for order in itertools.permutations(range(len(left))) if tuple(left[i] for i in order) == right]


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal as stored, or equal once the wider side is cast to the narrower one's dtype."""
    if a.dtype == b.dtype:
        return torch.equal(a, b)
    if not (a.is_floating_point() or b.is_floating_point()):
        return torch.equal(a.to(torch.int64), b.to(torch.int64))
    narrow = a.dtype if _eps(a.dtype) > _eps(b.dtype) else b.dtype
    return torch.equal(a.to(narrow), b.to(narrow))


def _readable(value: Any) -> bool:
    if isinstance(value, TensorEntry):
        return not without_numbers(value.info)
    return isinstance(value, torch.Tensor) and dtype_name(value.dtype) not in UNCONVERTIBLE


def _load(value: Any) -> torch.Tensor:
    tensor = value.load() if isinstance(value, TensorEntry) else value.detach()
    if tensor.is_quantized:
        tensor = tensor.dequantize()
    return tensor.cpu()


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(value.shape)


def _numel(value: Any) -> int:
    return math.prod(_shape(value))


def _dtype(value: Any) -> torch.dtype:
    return value.dtype


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps if dtype.is_floating_point else 0.0


def _dtype_text(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| over finite differences, in slices so the temporaries stay small whatever the tensor size."""
    wide = torch.promote_types(a.dtype, b.dtype)
    if not wide.is_floating_point:
        wide = torch.float64
    a, b = a.reshape(-1), b.reshape(-1)
    largest = 0.0
    for start in range(0, a.numel(), _SLICE):
        difference = (a[start:start + _SLICE].to(wide) - b[start:start + _SLICE].to(wide)).abs()
        top = float(difference.max()) if difference.numel() else 0.0
        if not math.isfinite(top):  # NaN or Inf on a side: the largest finite difference
            finite = difference[torch.isfinite(difference)]
            top = float(finite.max()) if finite.numel() else 0.0
        largest = max(largest, top)
    return largest
