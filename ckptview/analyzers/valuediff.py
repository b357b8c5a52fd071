"""
Value diff: how much the tensors of two checkpoints with the same keys differ (two epochs, a
fine-tune and its base, a model before and after conversion), per tensor, per module and per block.

Tensors are streamed pair by pair in chunks, so memory stays bounded, and each pair of chunks goes
through one fused, compiled kernel (`kernels.diff`) that takes every sum in a single trip through
the CPU cache; several tensor pairs are compared at once on worker threads (the kernel and
`os.preadv` release the GIL). On a warm page cache this runs at 55-81 % of the speed of just
reading both files (docs/diff.md says why it varies); from disk, the two files' reads on every
worker keep the disk busy.
"""

from __future__ import annotations

import fnmatch
import math
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import torch

from ckptview.analyzers.crossformat import CrossFormatMatch, match_tensors
from ckptview.analyzers.keydiff import KeyDiff, key_diff, state_dict_of
from ckptview.readers import open_checkpoint
from ckptview.readers.dtypes import UNCONVERTIBLE, dtype_name
from ckptview.readers.model import (
    Checkpoint,
    ScratchBuffers,
    TensorEntry,
    TensorInfo,
    gc_paused,
    repeated_view,
    view_identity,
    views_beyond_their_storage,
    without_numbers,
)

__all__ = [
    "TensorChange", "GroupChange", "ValueDiff", "Diff", "value_diff", "diff",
    "IGNORE_BN_STATS", "IGNORE_EMA",
]

IGNORE_BN_STATS = ("*.running_mean", "*.running_var", "*.num_batches_tracked")
IGNORE_EMA = ("ema.*", "ema_*", "*_ema.*", "*.ema.*", "model_ema.*", "ema_model.*")

# 2M elements (4 MiB of bf16 per side) per read: the kernel works through each chunk in L1-sized
# blocks, so the chunk only needs to be big enough that syscalls and the Python between chunks
# stay a small cost (on two warm 2 GB files, 7 % faster than 1M; 4M gained nothing more).
DEFAULT_CHUNK_ELEMENTS = 2 * 1024 * 1024

Cancel = Union[threading.Event, Callable[[], bool], None]
Progress = Union[bool, Callable[[int, int], None]]


@dataclass(frozen=True)
class TensorChange:
    """
    How one tensor differs between the left (a) and right (b) checkpoints.

    Attributes:
        key, shape, numel: the tensor.
        left_dtype, right_dtype: dtypes on each side (compared in float32, or float64 for
            float64 and integer tensors; bfloat16 pairs are widened to float32 in registers).
        max_abs_diff: max |a - b| over positions where both are finite.
        rel_change: ||a - b|| / ||a|| (inf when a is all zero and b is not).
        cosine: a·b / (||a|| ||b||) (1.0 when both are all zero).
        fraction_changed: share of elements where a != b (NaN in both counts as equal).
        nan_left, nan_right: NaN counts on each side; `nan_appeared` / `nan_disappeared` compare them.
        sum_sq_diff, sum_sq_left, sum_sq_right, dot: the raw sums, for aggregating modules exactly.
    """

    key: str
    shape: tuple[int, ...]
    left_dtype: torch.dtype
    right_dtype: torch.dtype
    numel: int
    max_abs_diff: float
    rel_change: float
    cosine: float
    fraction_changed: float
    nan_left: int
    nan_right: int
    sum_sq_diff: float
    sum_sq_left: float
    sum_sq_right: float
    dot: float

    @property
    def changed(self) -> bool:
        return self.fraction_changed > 0 or self.nan_left != self.nan_right

    @property
    def is_counter(self) -> bool:
        """
        An integer tensor (`num_batches_tracked`, a step count): compared exactly (integers go through
        float64, exact below 2**53) and reported as a count that moved, never as value drift, so a
        BatchNorm's 3 → 5 batches does not dwarf its weights' change in the module totals.
        """
        return not (self.left_dtype.is_floating_point or self.left_dtype.is_complex
                    or self.right_dtype.is_floating_point or self.right_dtype.is_complex)

    @property
    def nan_appeared(self) -> bool:
        return self.nan_right > self.nan_left

    @property
    def nan_disappeared(self) -> bool:
        return self.nan_left > self.nan_right


@dataclass(frozen=True)
class GroupChange:
    """The tensors of one module or block taken together (as if concatenated)."""

    name: str
    tensors: int
    numel: int
    changed_tensors: int
    max_abs_diff: float
    rel_change: float
    cosine: float
    fraction_changed: float


@dataclass(frozen=True)
class ValueDiff:
    """
    Per-tensor value differences of the keys both sides share with the same shape.

    Attributes:
        tensors: one `TensorChange` per compared tensor, in the left side's key order.
        ignored: keys skipped by the ignore patterns.
        complete: False when the comparison was cancelled; `tensors` then holds the finished ones.
        unreadable: keys whose data one side cannot give (a NumPy object array, a meta tensor) or not as
            real numbers (complex, FP4 pairs): not compared (`--json`: `not_compared`).
    """

    tensors: tuple[TensorChange, ...]
    ignored: tuple[str, ...]
    complete: bool = True
    unreadable: tuple[str, ...] = ()

    def changed(self) -> tuple[TensorChange, ...]:
        """The tensors that differ at all (values or NaNs)."""
        return tuple(t for t in self.tensors if t.changed)

    def counters(self) -> tuple[TensorChange, ...]:
        """The integer tensors (`TensorChange.is_counter`), which `by_module` and `by_block` leave out."""
        return tuple(t for t in self.tensors if t.is_counter)

    def by_module(self) -> tuple[GroupChange, ...]:
        """Aggregated per module: the key without its last part (`layer1.0.conv.weight` -> `layer1.0.conv`);
        integer counters left out (`counters()`)."""
        return self._group(lambda key: key.rpartition(".")[0] or key)

    def by_block(self) -> tuple[GroupChange, ...]:
        """Aggregated per numbered block (`model.layers.3`), everything else by its first part (`lm_head`)."""
        return self._group(_block_of)

    def _group(self, name_of: Callable[[str], str]) -> tuple[GroupChange, ...]:
        groups: dict[str, list[TensorChange]] = {}
        for change in self.tensors:
            if not change.is_counter:
                groups.setdefault(name_of(change.key), []).append(change)
        return tuple(_aggregate(name, members) for name, members in groups.items())

    def to_frame(self) -> Any:
        """One row per tensor, with the columns of `TensorChange`."""
        import pandas as pd

        columns = ["key", "shape", "left_dtype", "right_dtype", "numel", "max_abs_diff", "rel_change", "cosine",
                   "fraction_changed", "nan_left", "nan_right"]
        rows = [[getattr(t, c) for c in columns] for t in self.tensors]
        frame = pd.DataFrame(rows, columns=columns)
        frame["left_dtype"] = frame["left_dtype"].astype(str)
        frame["right_dtype"] = frame["right_dtype"].astype(str)
        return frame


@dataclass(frozen=True)
class Diff:
    """
    `diff(a, b)`: the key diff, and the value diff when asked for. `matching` pairs the tensors of
    two files of different formats by name or content and explains the rest (values=True only;
    see `ckptview.analyzers.crossformat`).
    """

    keys: KeyDiff
    values: ValueDiff | None = None
    matching: CrossFormatMatch | None = None

    def to_frame(self) -> Any:
        """The value diff's table when values were compared, else the key diff's."""
        return self.values.to_frame() if self.values is not None else self.keys.to_frame()

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "missing": list(self.keys.missing),
            "unexpected": list(self.keys.unexpected),
            "shape_mismatches": [{"key": m.key, "left": list(m.left), "right": list(m.right)}
                                 for m in self.keys.shape_mismatches],
            "dtype_mismatches": [{"key": m.key, "left": str(m.left).removeprefix("torch."),
                                  "right": str(m.right).removeprefix("torch.")} for m in self.keys.dtype_mismatches],
            "matched": self.keys.matched,
        }
        if self.values is not None:
            data["changed"] = [
                {"key": t.key, "max_abs_diff": t.max_abs_diff, "rel_change": t.rel_change, "cosine": t.cosine,
                 "fraction_changed": t.fraction_changed, "nan_left": t.nan_left, "nan_right": t.nan_right}
                for t in self.values.changed()
            ]
            data["compared"] = len(self.values.tensors)
            data["ignored"] = list(self.values.ignored)
            data["not_compared"] = list(self.values.unreadable)
            data["complete"] = self.values.complete
        if self.matching is not None:
            data.update(self.matching.to_dict())
        return data


def diff(a: Any, b: Any, *, values: bool = False, ignore: Sequence[str] = (), threads: int | None = None,
         progress: Progress = False, cancel: Cancel = None, trust: bool = False) -> Diff:
    """
    Compare two checkpoints: keys, shapes and dtypes, and with `values=True` the numbers.

    The vocabulary is torch's for `load_state_dict(a)` into a model shaped like `b`: `missing`
    keys are in b only, `unexpected` ones in a only.

    Args:
        a, b: each a checkpoint path, an open `Checkpoint`, a state dict (tensors or
            `TensorEntry`s) or an `nn.Module` (its weights). Of a checkpoint the model section is compared (a Lightning file's
            `state_dict`), so a `.ckpt` compares with the `.safetensors` exported from it.
        values: also compare values, streaming both files (see `value_diff`). For two checkpoints of
            different formats (a `.pt` and its ONNX export, `.safetensors` or `.npz` copy) also pair
            every tensor by name or content and explain the rest (`Diff.matching`); put the
            PyTorch file first, so BatchNorm folded by the export is recognised.
        ignore: glob patterns of keys to leave out of the value diff, e.g. `IGNORE_BN_STATS`.
        threads, progress, cancel: see `value_diff`.
        trust: passed to `ckptview.open` for paths.

    Returns:
        A `Diff` with `.keys` (`KeyDiff`) and `.values` (`ValueDiff` or None).

    Raises:
        CkptviewError: a path cannot be opened, or a tensor's data cannot be read.

    Example:
        >>> d = ckptview.diff("epoch1.pt", "epoch2.pt", values=True, ignore=IGNORE_BN_STATS)
        >>> d.keys.ok, max(t.rel_change for t in d.values.tensors)
        (True, 0.0132)
    """
    with ExitStack() as stack:
        a, b = (stack.enter_context(open_checkpoint(side, trust=trust)) if isinstance(side, (str, os.PathLike))
                else side for side in (a, b))
        left, _ = stack.enter_context(state_dict_of(a, trust=trust))
        right, _ = stack.enter_context(state_dict_of(b, trust=trust))
        keys = key_diff(left, right)
        changes = value_diff(left, right, ignore=ignore, threads=threads, progress=progress, cancel=cancel) if values else None
        matching = None
        if values and isinstance(a, Checkpoint) and isinstance(b, Checkpoint) and a.format != b.format:
            matching = match_tensors(left, right, right_layers=b.layers, right_is_graph=b.format in ("onnx", "tflite"),
                                     left_format=a.format, right_format=b.format)
    return Diff(keys, changes, matching)


def value_diff(a: Mapping[str, Any], b: Mapping[str, Any], *, ignore: Sequence[str] = (), threads: int | None = None,
               chunk_elements: int = DEFAULT_CHUNK_ELEMENTS, progress: Progress = False, cancel: Cancel = None) -> ValueDiff:
    """
    Compare the values of the tensors two state dicts share (same key, same shape).

    Memory stays bounded by a few chunks per thread whatever the tensor sizes: every tensor is read
    with `TensorEntry.iter_chunks(buffer=...)` into buffers the thread reuses.

    Args:
        a, b: mappings of key to `TensorEntry` (streamed from disk) or `torch.Tensor`.
        ignore: glob patterns (`fnmatch`) of keys to skip, e.g. `IGNORE_BN_STATS + IGNORE_EMA`.
        threads: tensor pairs compared at once; default the CPU count (at most 8).
        chunk_elements: elements per chunk.
        progress: True for a tqdm bar (bytes of both sides), or a callable `(done_bytes, total_bytes)`.
        cancel: a `threading.Event` or a callable returning True to stop early; the result then has
            `complete=False` and the tensors finished so far.

    Returns:
        A `ValueDiff`.

    Raises:
        CkptviewError: a tensor's data cannot be read (truncated file, unsupported layout).

    Example:
        >>> with ckptview.open("base.safetensors") as base, ckptview.open("tuned.safetensors") as tuned:
        ...     changes = value_diff(model_state_dict(base), model_state_dict(tuned), progress=True)
        >>> [t.key for t in changes.changed()][:3]
    """
    ignored = tuple(key for key in a if key in b and any(fnmatch.fnmatchcase(key, p) for p in ignore))
    beyond_a, beyond_b = _views_beyond_their_storage(a), _views_beyond_their_storage(b)
    unreadable = tuple(key for key in a if key in b and key not in ignored
                       and (_unreadable(a[key], beyond_a) or _unreadable(b[key], beyond_b)))
    skip = set(ignored) | set(unreadable)
    pairs = [(key, a[key], b[key]) for key in a
             if key in b and key not in skip and tuple(a[key].shape) == tuple(b[key].shape)]
    total = sum(_nbytes(x) + _nbytes(y) for _, x, y in pairs)
    report, close = _progress_reporter(progress, total)
    cancelled = cancel.is_set if isinstance(cancel, threading.Event) else (cancel or (lambda: False))
    halt = threading.Event()  # set when the caller is interrupted (Ctrl-C), so the workers stop too

    def stop() -> bool:
        return halt.is_set() or cancelled()

    # Largest first, so the workers do not end waiting on one big tensor started last.
    queue = deque(sorted(pairs, key=lambda pair: -_nbytes(pair[1])))
    results: dict[str, TensorChange] = {}
    errors: list[BaseException] = []
    lock = threading.Lock()
    torch_threads = torch.get_num_threads()

    def work() -> None:
        # One intra-op thread per worker: the workers already fill the cores, and on a busy machine
        # OpenMP teams spinning on chunk-sized conversions made the diff up to 10x slower (measured).
        # torch.set_num_threads in a thread sets the default of threads started later, so restore it.
        torch.set_num_threads(1)
        buffers = ScratchBuffers()
        try:
            while not errors:
                with lock:
                    if not queue:
                        return
                    key, x, y = queue.popleft()
                change = _compare(key, x, y, chunk_elements, buffers, stop)
                if change is None:
                    return
                with lock:
                    results[key] = change
                    report(_nbytes(x) + _nbytes(y))
        except BaseException as exc:  # re-raised in the calling thread
            errors.append(exc)
        finally:
            torch.set_num_threads(torch_threads)

    workers = [threading.Thread(target=work, name=f"ckptview-diff-{i}", daemon=True)
               for i in range(max(1, min(threads or min(os.cpu_count() or 1, 8), len(pairs) or 1)))]
    try:
        with gc_paused():  # one result per tensor, none of them garbage: collections would only cost time
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()
    except BaseException:
        halt.set()
        raise
    finally:
        close()
    if errors:
        raise errors[0]
    complete = len(results) == len(pairs)
    return ValueDiff(tuple(results[key] for key, _, _ in pairs if key in results), ignored, complete, unreadable)


def _unreadable(value: Any, beyond: set[Any]) -> bool:
    if dtype_name(value.dtype) in UNCONVERTIBLE or value.dtype.is_complex:
        # no conversion to numbers, or (complex) none to the real numbers the kernels compare: a copy to
        # float64 drops the imaginary parts, and two tensors differing only there read as equal
        return True
    return isinstance(value, TensorEntry) and (
        without_numbers(value.info) or bool(repeated_view(value.info)) or view_identity(value.info) in beyond)


def _views_beyond_their_storage(side: Mapping[str, Any]) -> set[Any]:
    """`views_beyond_their_storage` over a side's distinct views, in its order (tied names count once)."""
    distinct: dict[Any, TensorInfo] = {}
    for value in side.values():
        if isinstance(value, TensorEntry):
            distinct.setdefault(view_identity(value.info), value.info)
    return set(views_beyond_their_storage(distinct.values()))


def _nbytes(value: Any) -> int:
    return int(value.numel() * value.element_size()) if isinstance(value, torch.Tensor) else int(value.nbytes)


def _progress_reporter(progress: Progress, total: int) -> tuple[Callable[[int], None], Callable[[], None]]:
    if callable(progress):
        done = [0]

        def report(nbytes: int) -> None:
            done[0] += nbytes
            progress(done[0], total)

        return report, lambda: None
    if not progress:
        return (lambda nbytes: None), (lambda: None)
    from tqdm.auto import tqdm  # imported here: in a notebook tqdm.auto pulls in ipywidgets

    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="diff")
    return bar.update, bar.close


def _compute_dtype(left: torch.dtype, right: torch.dtype) -> torch.dtype:
    if left == right == torch.bfloat16:
        return torch.bfloat16  # the kernel widens bfloat16 in registers: no float32 copy
    wide = torch.float64 in (left, right) or not (left.is_floating_point and right.is_floating_point)
    return torch.float64 if wide else torch.float32


def _chunks(value: Any, elements: int, buffer: torch.Tensor) -> Iterator[torch.Tensor]:
    if isinstance(value, TensorEntry):
        yield from value.iter_chunks(elements * value.dtype.itemsize, buffer=buffer)
        return
    flat = value.detach().reshape(-1)
    for start in range(0, flat.numel(), elements):
        yield flat[start:start + elements]


def _compare(key: str, left: Any, right: Any, elements: int, buffers: ScratchBuffers,
             stop: Callable[[], bool]) -> TensorChange | None:
    from ckptview.analyzers import kernels  # numba takes ~0.25 s to import; `import ckptview` should not pay it

    dtype = _compute_dtype(left.dtype, right.dtype)
    buf_a, buf_b = buffers.get("work a", elements, dtype), buffers.get("work b", elements, dtype)
    read_a = buffers.get("read a", elements * left.dtype.itemsize, torch.uint8)
    read_b = buffers.get("read b", elements * right.dtype.itemsize, torch.uint8)
    sums = np.zeros(kernels.DIFF_SLOTS)
    for chunk_a, chunk_b in zip(_chunks(left, elements, read_a), _chunks(right, elements, read_b)):
        if stop():
            return None
        n = chunk_a.numel()
        kernels.diff(kernels.bit_patterns(_as(chunk_a, buf_a[:n], dtype)),
                     kernels.bit_patterns(_as(chunk_b, buf_b[:n], dtype)), sums)
    max_abs, dd, aa, bb, ab, changed, nan_a, nan_b = sums.tolist()
    numel = math.prod(left.shape)
    return TensorChange(
        key=key, shape=tuple(left.shape), left_dtype=left.dtype, right_dtype=right.dtype, numel=numel,
        max_abs_diff=max_abs, rel_change=_rel(dd, aa), cosine=_cosine(ab, aa, bb),
        fraction_changed=changed / numel if numel else 0.0, nan_left=int(nan_a), nan_right=int(nan_b),
        sum_sq_diff=dd, sum_sq_left=aa, sum_sq_right=bb, dot=ab,
    )


def _as(chunk: torch.Tensor, buffer: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The chunk as a contiguous CPU tensor of `dtype`, copied into `buffer` only where it is not one already."""
    if chunk.is_quantized:
        chunk = chunk.dequantize()
    if chunk.dtype != dtype or not chunk.is_contiguous() or chunk.device != buffer.device:  # e.g. a CUDA model's state_dict()
        chunk = buffer.copy_(chunk)
    return chunk


def _rel(dd: float, aa: float) -> float:
    if dd == 0:
        return 0.0
    return math.sqrt(dd) / math.sqrt(aa) if aa > 0 else math.inf


def _cosine(ab: float, aa: float, bb: float) -> float:
    if aa == 0 and bb == 0:
        return 1.0
    if aa == 0 or bb == 0:
        return 0.0
    return ab / math.sqrt(aa * bb)


def _block_of(key: str) -> str:
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return parts[0]


def _aggregate(name: str, members: list[TensorChange]) -> GroupChange:
    numel = sum(m.numel for m in members)
    dd = sum(m.sum_sq_diff for m in members)
    aa = sum(m.sum_sq_left for m in members)
    bb = sum(m.sum_sq_right for m in members)
    ab = sum(m.dot for m in members)
    changed_elements = sum(m.fraction_changed * m.numel for m in members)
    return GroupChange(
        name=name, tensors=len(members), numel=numel, changed_tensors=sum(m.changed for m in members),
        max_abs_diff=max((m.max_abs_diff for m in members), default=0.0), rel_change=_rel(dd, aa),
        cosine=_cosine(ab, aa, bb), fraction_changed=changed_elements / numel if numel else 0.0,
    )
