"""
Per-tensor statistics streamed from disk in chunks, in parallel over tensors.

How one tensor is read: its chunks arrive in a buffer each worker thread keeps for all its
tensors (`ScratchBuffers`), and each float chunk goes through one fused, compiled kernel
(`kernels.py`) that takes min/max, zeros, NaN/±Inf counts, the sum, the centred sum of squares
and the histogram sample in a single trip through the CPU cache; chunk moments are merged in
float64 with Chan's parallel formula, so the variance does not lose precision when the mean is
large against the spread. Integer and bool tensors (few and small in practice) use numpy and torch ops on the integers, exact beyond 2**53.

Why the histogram is taken from a sample: its bins span the tensor's finite [min, max], which is
known only after the last chunk. The alternatives are a second read of every tensor (halves the
throughput) or merging per-chunk histograms with different ranges (smears the counts). Instead
every k-th element (k = ceil(numel / histogram_sample)) is copied aside during the single pass,
at most `histogram_sample` values per tensor, and binned at the end: exact for tensors up to
that size, an unbiased systematic sample beyond it. `histogram_sample=None` reads each tensor a
second time for exact counts.
"""

from __future__ import annotations

import math
import os
import re
import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import CancelledError
from dataclasses import dataclass, field, replace
from itertools import repeat
from operator import attrgetter, itemgetter
from typing import TYPE_CHECKING, Any

import numpy as np

from ckptview.analyzers.table import layer_kinds
from ckptview.lazy import torch
from ckptview.readers.dtypes import ITEMSIZE, UNCONVERTIBLE
from ckptview.readers.model import (
    Checkpoint,
    ScratchBuffers,
    TensorEntry,
    contiguous_stride,
    fast_init,
    gc_paused,
    not_decoded,
    repeated_view,
    view_identity,
    views_beyond_their_storage,
)

if TYPE_CHECKING:
    import pandas as pd

DEFAULT_BINS = 64
DEFAULT_HISTOGRAM_SAMPLE = 1 << 15
_BYTES_PER_WORKER = 32 << 20  # data for which one more default worker thread is started
# 2 MiB of stored data per read: the kernel works through a chunk in L1-sized blocks, so the chunk
# only needs to be big enough that syscalls and the Python between chunks stay a small cost (on a
# warm 2 GB file, 2, 4 and 8 MiB measured alike, 1 MiB a few % slower, 256 KiB 40 % slower).
DEFAULT_CHUNK_BYTES = 2 << 20
# A tensor whose abs-max exceeds this many times the median abs-max of its siblings is flagged.
ABS_MAX_RATIO = 10.0

CancelHook = threading.Event | Callable[[], bool]


@fast_init
@dataclass(frozen=True)
class Histogram:
    """Counts in `len(counts)` equal bins from `low` (the finite min) to `high` (the finite max)."""

    low: float
    high: float
    counts: tuple[int, ...]
    stride: int  # every `stride`-th element was counted; 1 = every finite element

    @property
    def edges(self) -> tuple[float, ...]:
        """The `len(counts) + 1` bin edges, as torch.linspace gives them (made on demand: a million
        small tensors' edges would take 2 GB)."""
        return tuple(torch.linspace(self.low, self.high, len(self.counts) + 1, dtype=torch.float64).tolist())

    @property
    def sampled(self) -> int:
        return sum(self.counts)

    def log_counts(self) -> tuple[float, ...]:
        """log10(1 + count) per bin, for showing tails next to a dominant peak."""
        return tuple(math.log10(1 + c) for c in self.counts)


@fast_init
@dataclass(frozen=True)
class TensorStats:
    """
    Statistics of one tensor. min/max/mean/std/abs_max/l2_norm are over the finite values only;
    NaN and ±Inf are counted apart. `std` is the sample standard deviation (torch's default,
    correction=1), 0 for one value; statistics of no values are NaN.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    numel: int
    min: float
    max: float
    mean: float
    std: float
    abs_max: float
    l2_norm: float
    zero_fraction: float  # zeros / numel (NaN for an empty tensor)
    nan_count: int
    posinf_count: int
    neginf_count: int
    histogram: Histogram | None = field(default=None, repr=False)
    skipped: str = ""  # why no statistics were computed (complex dtype, quantized/sparse layout)

    @property
    def inf_count(self) -> int:
        return self.posinf_count + self.neginf_count

    @property
    def finite_count(self) -> int:
        return self.numel - self.nan_count - self.inf_count


@dataclass(frozen=True)
class Outlier:
    """A tensor whose statistics look wrong, with why."""

    name: str
    check: str  # "non_finite" | "all_zero" | "abs_max_outlier" | "collapsed_std"
    message: str


@dataclass(frozen=True)
class StatsResult:
    """Statistics per tensor, in checkpoint order, and the tensors flagged as outliers."""

    tensors: tuple[TensorStats, ...]
    outliers: tuple[Outlier, ...]

    def __getitem__(self, name: str) -> TensorStats:
        for item in self.tensors:
            if item.name == name:
                return item
        raise KeyError(f"no statistics for {name!r}; was it excluded by the filter?")

    def __len__(self) -> int:
        return len(self.tensors)

    def skipped_reasons(self) -> list[tuple[str, int]]:
        """Why tensors have no statistics, each reason with how many, most frequent first."""
        return Counter(item.skipped for item in self.tensors if item.skipped).most_common()

    def to_frame(self) -> pd.DataFrame:
        """
        One row per tensor: name, dtype, shape, numel, min, max, mean, std, abs_max, l2_norm,
        zero_fraction, nan_count, inf_count, posinf_count, neginf_count, outliers (comma-separated
        checks), skipped.
        """
        import pandas as pd

        flags: dict[str, list[str]] = defaultdict(list)
        for outlier in self.outliers:
            flags[outlier.name].append(outlier.check)
        rows = [stats_row(item) | {"outliers": ", ".join(flags.get(item.name, ())), "skipped": item.skipped}
                for item in self.tensors]
        # columns named even without rows: a file of no tensors (a vocab-only GGUF) still has a table
        return pd.DataFrame(rows, columns=[*_ROW_FIELDS, "outliers", "skipped"])


_ROW_FIELDS = ("name", "dtype", "shape", "numel", "min", "max", "mean", "std", "abs_max", "l2_norm", "zero_fraction",
               "nan_count", "inf_count", "posinf_count", "neginf_count")


def stats_row(item: TensorStats) -> dict[str, Any]:
    """The scalar fields of one tensor's statistics as a flat dict (the CLI's --json row)."""
    return {
        "name": item.name, "dtype": item.dtype, "shape": list(item.shape), "numel": item.numel,
        "min": item.min, "max": item.max, "mean": item.mean, "std": item.std, "abs_max": item.abs_max,
        "l2_norm": item.l2_norm, "zero_fraction": item.zero_fraction, "nan_count": item.nan_count,
        "inf_count": item.inf_count, "posinf_count": item.posinf_count, "neginf_count": item.neginf_count,
    }


def stats(
    ckpt: Checkpoint,
    *,
    filter: str | Callable[[TensorEntry], bool] | None = None,  # noqa: A002 - the issue's public name
    progress: bool = True,
    cancel: CancelHook | None = None,
    bins: int = DEFAULT_BINS,
    histogram_sample: int | None = DEFAULT_HISTOGRAM_SAMPLE,
    workers: int | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> StatsResult:
    """
    Statistics of every tensor (or those matching `filter`), streamed from disk with bounded memory.

    Each tensor is read once in chunks of `chunk_bytes` (see the module docstring for how the
    histogram fits in one pass); tensors are spread over `workers` threads. Results are cached per
    checkpoint and per (bins, histogram_sample), tensor by tensor, so a second call, or a call with
    a narrower filter, reads nothing. Tied tensors are read once.

    Args:
        ckpt: an opened checkpoint.
        filter: a regular expression searched in each tensor name, or a predicate on `TensorEntry`.
        progress: show a tqdm progress bar (a widget in Jupyter, text in a terminal).
        cancel: a `threading.Event` (set it to stop) or a callable returning True to stop; checked
            between chunks.
        bins: histogram bins between the finite min and max.
        histogram_sample: at most this many values per tensor go into its histogram; None counts
            every value at the cost of a second read.
        workers: threads; default the number of CPUs, fewer for files under 32 MiB per CPU.
        chunk_bytes: stored bytes per chunk; each thread holds about 3 chunks of memory.

    Returns:
        A frozen `StatsResult`: per-tensor `TensorStats` in checkpoint order and flagged `outliers`.

    Raises:
        concurrent.futures.CancelledError: `cancel` asked to stop; nothing partial is cached.
        re.error: `filter` is not a valid regular expression.
        CorruptCheckpointError, TruncatedCheckpointError: the tensor data cannot be read.

    Example:
        >>> with ckptview.open("llama.safetensors") as ckpt:
        ...     result = ckptview.stats(ckpt, filter=r"layers\\.0\\.")
        >>> result.to_frame()[["name", "mean", "std", "nan_count"]]
        >>> [o.name for o in result.outliers if o.check == "non_finite"]
    """
    if bins < 1:
        raise ValueError(f"bins must be at least 1, not {bins}")
    if histogram_sample is not None and histogram_sample < 1:
        raise ValueError(f"histogram_sample must be at least 1 or None, not {histogram_sample}")
    # Tens of thousands of small result objects and keys, none of them garbage: without the pause,
    # collections triggered by those allocations took 0.3 s of a 20,000-tensor file's 1.3 s.
    with gc_paused():
        return _stats(ckpt, filter, bins, histogram_sample, workers, chunk_bytes, progress, cancel)


def _stats(ckpt: Checkpoint, filter: str | Callable[[TensorEntry], bool] | None, bins: int,  # noqa: A002
           histogram_sample: int | None, workers: int | None, chunk_bytes: int, progress: bool,
           cancel: CancelHook | None) -> StatsResult:
    selected = _select(ckpt.tensors(), filter)
    cache: dict[Any, TensorStats] = ckpt.cached(f"stats:{bins}:{histogram_sample}", dict)
    keys = list(map(view_identity, map(attrgetter("info"), selected)))
    todo: dict[Any, TensorEntry] = {}
    for key, entry in zip(keys, selected):
        if key not in cache:
            todo.setdefault(key, entry)
    # decided over the whole checkpoint, in its order, so a filter never changes which views are read
    beyond = ckpt.cached("views_beyond_their_storage",
                         lambda: views_beyond_their_storage(entry.info for entry in ckpt.unique_tensors()))
    for key in [key for key in todo if key in beyond]:
        cache[key] = _empty(todo.pop(key), beyond[key])
    if todo:
        # The outlier check's layer kinds are found on this thread while the workers read.
        cache.update(_compute(list(todo.items()), bins, histogram_sample, workers, chunk_bytes, progress, cancel,
                              while_waiting=lambda: layer_kinds(ckpt)))
    results = list(map(cache.__getitem__, keys))
    names = list(map(attrgetter("name"), selected))
    if list(map(attrgetter("name"), results)) != names:  # tied tensors: each name gets the statistics of its view
        results = [item if item.name == name else replace(item, name=name) for item, name in zip(results, names)]
    return StatsResult(tuple(results), find_outliers(ckpt, results))


def _select(entries: Iterable[TensorEntry], filter: str | Callable[[TensorEntry], bool] | None) -> list[TensorEntry]:  # noqa: A002
    if filter is None:
        return list(entries)
    if isinstance(filter, str):
        pattern = re.compile(filter)
        return [entry for entry in entries if pattern.search(entry.name)]
    return [entry for entry in entries if filter(entry)]


def _is_cancelled(cancel: CancelHook | None) -> bool:
    if cancel is None:
        return False
    return cancel.is_set() if isinstance(cancel, threading.Event) else bool(cancel())


def _compute(
    todo: list[tuple[Any, TensorEntry]], bins: int, histogram_sample: int | None, workers: int | None,
    chunk_bytes: int, progress: bool, cancel: CancelHook | None, while_waiting: Callable[[], object] = lambda: None,
) -> dict[Any, TensorStats]:
    from tqdm.auto import tqdm

    # Largest first, so the last tensors to finish are small and the threads end together. Workers
    # take the next tensor from a shared iterator (atomic under the GIL) rather than one future per
    # tensor: 20,000 futures and their condition variables cost 0.4 s before any data was read.
    batches, singles = _small_batches(todo, histogram_sample, chunk_bytes)
    units: list[tuple[int, Any]] = [(entry.nbytes, item) for item in singles for entry in (item[1],)]
    units += [(batch.nbytes, batch) for batch in batches]
    queue = iter([unit for _, unit in sorted(units, key=lambda unit: -unit[0])])
    # from the units, not each tensor's `nbytes` again (a chain of properties: 1.5 s for a million)
    total = sum(nbytes for nbytes, _ in units)
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="statistics", disable=not progress,
               leave=False)
    stop = threading.Event()
    results: dict[Any, TensorStats] = {}
    errors: list[BaseException] = []

    def work() -> None:
        buffers = ScratchBuffers()
        step = lambda nbytes: _step(bar, nbytes, cancel, stop)  # noqa: E731
        try:
            for unit in queue:
                if stop.is_set():
                    return
                if isinstance(unit, _SmallBatch):
                    results.update(unit.run(bins, step))
                    continue
                key, entry = unit
                results[key] = _Reducer(entry, bins, histogram_sample, chunk_bytes, buffers).run(step)
        except BaseException as exc:  # re-raised in the calling thread
            errors.append(exc)
            stop.set()

    if workers is None:
        # A second thread pays only where reading and the kernels (which release the GIL) outweigh
        # the per-tensor Python (~30 us, which holds it): 20,000 tensors of 450 bytes took 1.3 s
        # on two threads and 0.9 s on one.
        workers = min(os.cpu_count() or 1, max(1, total // _BYTES_PER_WORKER))
    threads = [threading.Thread(target=work, name=f"ckptview-stats-{i}", daemon=True)
               for i in range(max(1, min(workers, len(todo))))]
    try:
        for thread in threads:
            thread.start()
        while_waiting()
        for thread in threads:
            thread.join()
    except BaseException:  # Ctrl-C in the caller, or `while_waiting` failed: the workers stop at their next chunk
        stop.set()
        raise
    finally:
        bar.close()
    if errors:
        raise errors[0]
    if stop.is_set():
        raise CancelledError()
    return results


# Tensors of at most this many elements, stored contiguously as floats, are read and reduced many
# at a time (`kernels.segment_stats`): one read per span of the file and one compiled call per batch.
SMALL_TENSOR_NUMEL = 4096
_BATCH_TENSORS = 16384  # per batch: its histograms (64 bins of int64 each) stay under 8 MB
_BATCH_GAP = 64 << 10  # bytes of other data a batch's read may skip over before a new read starts
_BATCHED_DTYPES = {"float64": "<f8", "float32": "<f4", "float16": "<f2", "bfloat16": "<u2"}


class _SmallBatch:
    """Small float tensors lying close together in one file, reduced together."""

    def __init__(self, source: Any, dtype: str) -> None:
        self.source, self.dtype = source, dtype
        self.members: list[tuple[int, int, int, Any, TensorEntry]] = []  # (byte offset, bytes, numel, cache key, entry)
        self.nbytes = 0

    @property
    def start(self) -> int:
        return self.members[0][0]

    @property
    def end(self) -> int:
        offset, nbytes, _, _, _ = self.members[-1]
        return offset + nbytes

    def run(self, bins: int, step: Callable[[int], None]) -> dict[Any, TensorStats]:
        raw = self.source.read(self.start, self.end - self.start)
        stored = np.frombuffer(raw, dtype=_BATCHED_DTYPES[self.dtype])
        if self.dtype == "bfloat16":  # numpy has no bfloat16: its bits are a float32's upper half
            stored = (stored.astype(np.uint32) << 16).view(np.float32)
        with np.errstate(invalid="ignore"):  # NaN payloads in the data are values to count, not errors
            values = stored.astype(np.float64)
        itemsize = stored.itemsize if self.dtype != "bfloat16" else 2
        offsets, _, numels, keys, entries = zip(*self.members)
        numel = np.array(numels, dtype=np.int64)
        starts = (np.array(offsets, dtype=np.int64) - self.start) // itemsize
        count = len(self.members)
        moments, extremes = np.zeros((count, 7)), np.zeros((count, 2))
        counts = np.zeros((count, bins), dtype=np.int64)
        _kernels().segment_stats(values, starts, starts + numel, moments, extremes, counts)
        results = dict(zip(keys, self._records(entries, numels, moments, extremes, counts)))
        step(self.nbytes)
        return results

    def _records(self, entries: tuple[TensorEntry, ...], numels: tuple[int, ...], moments: np.ndarray,
                 extremes: np.ndarray, counts: np.ndarray) -> list[TensorStats]:
        """
        Each tensor's `TensorStats` from the kernel's arrays, with the arithmetic `_Reducer._finish`
        does per tensor done here per column (the same IEEE operations in the same order, so the same
        values): a million one-element tensors spent 8 s making their records one Python float at a time.
        """
        n, mean, m2 = moments[:, 0], moments[:, 1], moments[:, 2]
        low, high = extremes[:, 0], extremes[:, 1]
        some, several = n > 0, n > 1
        nan = math.nan
        with np.errstate(invalid="ignore", divide="ignore"):  # the columns of empty tensors are replaced by NaN
            std = np.where(several, np.sqrt(m2 / (n - 1)), np.where(n == 1, 0.0, nan))
            abs_max = np.where(some, np.maximum(np.abs(low), np.abs(high)), nan)
            l2_norm = np.sqrt(m2 + n * mean * mean)
            zero_fraction = moments[:, 3] / np.array(numels, dtype=np.float64)
        equal = ~(low < high)
        left, right = np.where(equal, low - 0.5, low), np.where(equal, high + 0.5, high)
        # histograms of small tensors repeat (a one-element tensor's is always the same): one tuple
        # per distinct row, shared, instead of 570 bytes per tensor
        # (rows compared as raw bytes: np.unique(axis=0) took 0.6 s per batch of 16,384)
        distinct, which = np.unique(counts.view(np.dtype((np.void, counts.strides[0]))).reshape(-1), return_inverse=True)
        row_tuples = list(map(tuple, distinct.view(np.int64).reshape(-1, counts.shape[1]).tolist()))
        # records made by `map` over the columns, without a Python loop (a third less time)
        histograms: list[Histogram | None] = list(map(
            Histogram, left.tolist(), right.tolist(), map(row_tuples.__getitem__, which.reshape(-1).tolist()), repeat(1)))
        if not some.all():  # no finite value, no histogram
            histograms = [histogram if present else None for histogram, present in zip(histograms, some.tolist())]
        nan_count, posinf, neginf = moments[:, 4:7].astype(np.int64).T.tolist()
        return list(map(
            TensorStats, map(attrgetter("name"), entries), repeat(self.dtype), map(attrgetter("info.shape"), entries),
            numels, np.where(some, low, nan).tolist(), np.where(some, high, nan).tolist(),
            np.where(some, mean, nan).tolist(), std.tolist(), abs_max.tolist(), l2_norm.tolist(), zero_fraction.tolist(),
            nan_count, posinf, neginf, histograms))


def _small_batches(todo: list[tuple[Any, TensorEntry]], histogram_sample: int | None,
                   chunk_bytes: int) -> tuple[list[_SmallBatch], list[tuple[Any, TensorEntry]]]:
    """Split the tensors into batches of small ones (each batch one read) and the rest, reduced one by one."""
    limit = SMALL_TENSOR_NUMEL if histogram_sample is None else min(SMALL_TENSOR_NUMEL, histogram_sample)
    groups: dict[tuple[int, str], list[tuple[int, int, int, Any, TensorEntry]]] = defaultdict(list)
    singles = []
    for key, entry in todo:
        info = entry.info
        storage = info.storage
        dtype = info.dtype
        # the record's numel and is_contiguous() are Python calls, a million times over: the same
        # tests inline, with the usual contiguous stride compared first
        if (dtype in _BATCHED_DTYPES and info.layout == "strided" and storage is not None
                and storage.byteorder == "little" and not storage.unsaved
                and 0 < (numel := math.prod(info.shape)) <= limit
                and (info.stride == contiguous_stride(info.shape) or info.is_contiguous())):
            itemsize = ITEMSIZE[dtype]
            offset = storage.data_offset() + info.storage_offset * itemsize
            groups[(id(storage.source), dtype)].append((offset, numel * itemsize, numel, key, entry))
        else:
            singles.append((key, entry))
    batches: list[_SmallBatch] = []
    for (_, dtype), members in groups.items():
        itemsize = ITEMSIZE[dtype]
        members.sort(key=itemgetter(0))
        batch: _SmallBatch | None = None
        batch_start = batch_end = 0
        for member in members:
            offset, nbytes, _, _, entry = member
            if (batch is None or len(batch.members) >= _BATCH_TENSORS or offset + nbytes - batch_start > chunk_bytes
                    or offset - batch_end > _BATCH_GAP or (offset - batch_start) % itemsize):
                batch = _SmallBatch(entry.info.storage.source, entry.info.dtype)  # type: ignore[union-attr]
                batches.append(batch)
                batch_start = offset
            batch.members.append(member)
            batch.nbytes += nbytes
            batch_end = offset + nbytes
    return batches, singles


def _step(bar: Any, nbytes: int, cancel: CancelHook | None, stop: threading.Event) -> None:
    bar.update(nbytes)
    if stop.is_set() or _is_cancelled(cancel):
        stop.set()
        raise CancelledError()


class _Reducer:
    """
    Accumulates one tensor's statistics over its chunks. Float chunks go through the fused kernels
    (`kernels.py`); integer and bool chunks through torch ops on the integers themselves (min/max
    compared as integers, not as rounded float64), with float64 totals merged by Chan's formula.
    """

    def __init__(self, entry: TensorEntry, bins: int, histogram_sample: int | None, chunk_bytes: int,
                 buffers: ScratchBuffers) -> None:
        self.entry = entry
        self.bins = bins
        self.exact_histogram = histogram_sample is None
        self.stride = 1 if histogram_sample is None else max(1, -(-entry.numel // histogram_sample))
        self.chunk_bytes = chunk_bytes
        self.buffers = buffers
        self.kernels = _kernels()
        self.acc, self.keys = self.kernels.new_moments()
        self.int_min = math.inf
        self.int_max = -math.inf
        dtype = entry.dtype
        self.is_float = dtype.is_floating_point
        # Floats are reduced in float32 (exact for every 16-bit and 8-bit float) or float64;
        # integers in float64 for the sums.
        self.work_dtype = torch.float32 if self.is_float and dtype.itemsize <= 4 else torch.float64
        # Every stride-th element, copied here chunk by chunk; NaN/Inf are skipped when binning.
        # The thread's buffer: read only until this tensor's `_finish`, before its next tensor.
        self.samples = self.buffers.get("samples", 0 if self.exact_histogram else -(-entry.numel // self.stride),
                                    self.work_dtype)
        self.sample_values = self.samples.numpy()
        self.kernel_stride = 0 if self.exact_histogram else self.stride

    def _read_buffer(self) -> torch.Tensor:
        return self.buffers.get("read", max(self.chunk_bytes, self.entry.dtype.itemsize), torch.uint8)

    def run(self, step: Callable[[int], None]) -> TensorStats:
        entry = self.entry
        skipped = _unsupported(entry)
        if skipped:
            step(entry.nbytes)
            return _empty(entry, skipped)
        start = 0
        reduce = self._reduce_float if self.is_float else self._reduce_integer
        # progress counts stored bytes; an encoded tensor stores fewer (or more) than it decodes to
        stored_per_element = entry.nbytes / entry.numel if entry.numel else 0
        for chunk in entry.iter_chunks(self.chunk_bytes, buffer=self._read_buffer()):
            reduce(chunk, start)
            start += chunk.numel()
            step(round(chunk.numel() * stored_per_element))
        return self._finish(step)

    def _reduce_float(self, chunk: torch.Tensor, start: int) -> None:
        if chunk.dtype != torch.bfloat16 and chunk.dtype != self.work_dtype:
            chunk = self.buffers.get("work", chunk.numel(), self.work_dtype).copy_(chunk)
        self.kernels.moments(self.kernels.bit_patterns(chunk), self.acc, self.keys, self.sample_values, start,
                             self.kernel_stride)

    def _reduce_integer(self, chunk: torch.Tensor, start: int) -> None:
        if chunk.dtype == torch.bool:
            chunk = chunk.view(torch.uint8)
        count = chunk.numel()
        # numpy, not torch: torch has no min/max or count_nonzero for uint16/32/64 on the CPU.
        # Compared as integers: float64 would tie values beyond 2**53.
        values = chunk.numpy()
        self.int_min = min(self.int_min, float(values.min()))
        self.int_max = max(self.int_max, float(values.max()))
        self.acc[3] += count - int(np.count_nonzero(values))
        work = self.buffers.get("work", count, torch.float64).copy_(chunk)
        self._sample(chunk, start)
        chunk_mean = float(work.sum()) / count
        work.sub_(chunk_mean)
        self.kernels.merge_moments(self.acc, count, chunk_mean, float(torch.dot(work, work)))

    def _sample(self, chunk: torch.Tensor, start: int) -> None:
        if self.exact_histogram:
            return
        first = -start % self.stride  # the stride runs over the whole tensor, across chunk borders
        if first < chunk.numel():
            picked = chunk[first :: self.stride]
            index = (start + first) // self.stride
            self.samples[index : index + picked.numel()].copy_(picked)

    def _finish(self, step: Callable[[int], None]) -> TensorStats:
        entry = self.entry
        count, mean, m2, zeros, nan_count, posinf, neginf = self.acc.tolist()
        n = int(count)
        if not n:
            minimum = maximum = math.nan
        elif self.is_float:
            minimum, maximum = (self.kernels.key_to_float(key, self.work_dtype.itemsize) for key in self.keys.tolist())
        else:
            minimum, maximum = self.int_min, self.int_max
        histogram = None
        if n:
            low, high = (minimum, maximum) if minimum < maximum else (minimum - 0.5, maximum + 0.5)
            if self.exact_histogram:
                counts = self._exact_counts(low, high, step)
            else:
                counts = bin_counts(self.samples, self.bins, low, high)
            histogram = Histogram(low, high, tuple(counts.tolist()), self.stride)
        nan = math.nan
        m2 = max(m2, 0.0)  # combining blocks can leave a rounding residue below zero (seen on subnormals)
        return TensorStats(
            name=entry.name,
            dtype=str(entry.dtype).removeprefix("torch."),
            shape=entry.shape,
            numel=entry.numel,
            min=minimum,
            max=maximum,
            mean=mean if n else nan,
            std=math.sqrt(m2 / (n - 1)) if n > 1 else (0.0 if n == 1 else nan),
            abs_max=max(abs(minimum), abs(maximum)) if n else nan,
            l2_norm=math.sqrt(m2 + n * mean * mean),
            zero_fraction=zeros / entry.numel if entry.numel else nan,
            nan_count=int(nan_count),
            posinf_count=int(posinf),
            neginf_count=int(neginf),
            histogram=histogram,
        )

    def _exact_counts(self, low: float, high: float, step: Callable[[int], None]) -> torch.Tensor:
        counts = torch.zeros(self.bins, dtype=torch.int64)
        for chunk in self.entry.iter_chunks(self.chunk_bytes, buffer=self._read_buffer()):
            counts += bin_counts(chunk.view(torch.uint8) if chunk.dtype == torch.bool else chunk, self.bins, low, high)
            step(0)
        return counts


def _kernels() -> Any:
    # Imported on first use: numba takes about 0.25 s to import, which `import ckptview` should not pay.
    from ckptview.analyzers import kernels

    return kernels


def bin_counts(values: torch.Tensor, bins: int, low: float, high: float) -> torch.Tensor:
    """
    Counts of the finite `values` in `bins` equal bins over [low, high] (the last bin closed), as
    `torch.histogram(values.double(), bins, range=(low, high))` counts them, in one compiled pass
    (no float64 copy, no mask). Every finite value must lie in [low, high]; NaN and ±Inf are skipped.
    """
    if values.dtype not in (torch.float32, torch.float64):
        values = values.to(torch.float64)
    counts = np.zeros(bins, dtype=np.int64)
    _kernels().histogram(values.contiguous().numpy(), float(low), float(high), counts)
    return torch.from_numpy(counts)


def _unsupported(entry: TensorEntry) -> str:
    if entry.layout == "encoded":
        if not_decoded(entry.info):
            return entry.info.note or f"{entry.encoding}: listed, not decoded"
        return ""  # statistics of the decoded values (GGUF block quants dequantized), streamed by iter_chunks
    if entry.layout != "strided":
        return f"{entry.layout} layout: statistics are computed for dense tensors only"
    if entry.dtype.is_complex:
        return "complex dtype: statistics are computed for real tensors only"
    if entry.dtype_name in UNCONVERTIBLE:
        return f"{entry.dtype_name}: torch converts it to no other dtype, so it has no statistics"
    if entry.info.storage is None:
        return "no stored data"
    if entry.info.storage.unsaved:
        return "no values saved: torch.save ran under torch.serialization.skip_data(), zeros stand in their place"
    return repeated_view(entry.info)


def _empty(entry: TensorEntry, skipped: str) -> TensorStats:
    nan = math.nan
    return TensorStats(entry.name, str(entry.dtype).removeprefix("torch."), entry.shape, entry.numel,
                       nan, nan, nan, nan, nan, nan, nan, 0, 0, 0, None, skipped)


def find_outliers(ckpt: Checkpoint, results: Iterable[TensorStats], *, abs_max_ratio: float = ABS_MAX_RATIO) -> tuple[Outlier, ...]:
    """
    Tensors whose statistics look wrong: NaN/Inf, all zeros, a constant value, or an abs-max more
    than `abs_max_ratio` times the median abs-max of at least two siblings (tensors with the same
    inferred layer kind and leaf name, e.g. every attention q weight).
    """
    results = [r for r in results if not r.skipped]
    layers = layer_kinds(ckpt)
    groups: dict[tuple[str, str], list[TensorStats]] = defaultdict(list)
    out: list[Outlier] = []
    for item in results:
        if item.nan_count or item.posinf_count or item.neginf_count:  # not `inf_count`: a call per tensor
            out.append(Outlier(item.name, "non_finite",
                               f"{item.nan_count:,} NaN, {item.posinf_count:,} +Inf, {item.neginf_count:,} -Inf of "
                               f"{item.numel:,} values: training diverged or the file was damaged; use an earlier "
                               "checkpoint or find the step where the loss became NaN"))
        is_float = item.dtype.startswith(("float", "bfloat"))
        # integers that are all 0 are counters, shapes and indices (a graph's shape constants), not weights
        if item.numel and item.zero_fraction == 1.0 and is_float:
            out.append(Outlier(item.name, "all_zero",
                               "every value is 0: fine for a freshly initialised bias, otherwise the layer was "
                               "never trained, was pruned, or was overwritten"))
        elif (item.numel > 1 and is_float and item.finite_count > 1
              and item.std <= 1e-7 * max(item.abs_max, 1e-30)):
            out.append(Outlier(item.name, "collapsed_std",
                               f"all values equal {item.mean:.6g} (std {item.std:.3g}): normal for a freshly "
                               "initialised norm scale, otherwise the tensor stopped learning"))
        kind, leaf = layers.get(item.name, ("", ""))
        if kind and math.isfinite(item.abs_max) and is_float:
            groups[(kind, leaf)].append(item)
    for (kind, leaf), members in groups.items():
        if len(members) < 3:
            continue
        ordered = sorted(members, key=lambda m: m.abs_max)
        values = [m.abs_max for m in ordered]
        for position, item in enumerate(ordered):
            median = _median_without(values, position)
            if median > 0 and item.abs_max > abs_max_ratio * median:
                out.append(Outlier(item.name, "abs_max_outlier",
                                   f"abs-max {item.abs_max:.4g} is {item.abs_max / median:.0f}× the median "
                                   f"({median:.4g}) of {len(values) - 1} other {kind} {leaf} tensors: look for an "
                                   "exploding layer or a weight that was scaled by mistake"))
    return tuple(out)


def _median_without(ordered: list[float], skip: int) -> float:
    """Median of sorted `ordered` with the element at `skip` left out, in O(1): a group of 2,000
    siblings would otherwise cost 2,000 medians of 1,999 values."""
    count = len(ordered) - 1

    def at(index: int) -> float:
        return ordered[index if index < skip else index + 1]

    return at(count // 2) if count % 2 else (at(count // 2 - 1) + at(count // 2)) / 2
