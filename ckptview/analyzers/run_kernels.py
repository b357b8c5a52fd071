"""
One compiled call per checkpoint for a run's per-tensor pass: every tensor of one float width, laid
out back to back in one buffer, reduced with `kernels.moments` and compared with the same tensor of
the previous and of the first checkpoint with `kernels.diff`, chunk by chunk, inside one numba loop.

Why: a training checkpoint holds ~100 tensors (weights, BatchNorm buffers, two Adam slots each),
most of them small. Driving the kernels from Python took ~15 Python calls per tensor and chunk,
each holding the GIL, so a second thread could not run and small tensors cost more in calls than
in arithmetic. Here the loop over tensors and chunks is compiled and releases the GIL throughout.

The chunks are the ones the Python driver cuts (`CHUNK_ELEMENTS` from each tensor's start) and the
kernels are the same functions, so results are bit-for-bit those of `run_tasks._row_cells`, which
remains the path for tensors whose sides differ in dtype and for float16 (converted first).

Why the kernels are inlined (numba's `inline="always"`, so this function's machine code holds all of
its arithmetic): numba links a called njit function into its caller as a weak copy of the callee's
optimised IR and optimises it again there. The float sums are reassociated (`kernels.FASTMATH`), and
that second optimisation rebalances their reduction trees, so the caller's copy of `moments` rounds
differently from the callee's own library in the last bits (~1e-7 relative in float32 mean and M2).
Which copy ran depended on the process: one that compiled this function had the callee's library
loaded and the JIT bound the weak symbol to it; one that loaded this function from the disk cache
ran the copy inside it; a local run and its Dask workers disagreed. Inlined, there is one copy.

Inlined, `kernels.py`'s arithmetic is part of this function's machine code, but numba stamps the
disk-cached code with this file's modification time and size alone: after an edit to `kernels.py`
only, it kept loading the old arithmetic. So the cached code is named after `kernels.py`'s content
too (numba names a cache file after the function's qualified name).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from numba import njit

from ckptview.analyzers import kernels

_moments = njit(inline="always")(kernels.moments.py_func)
_diff = njit(inline="always")(kernels.diff.py_func)

NONE = -1  # no such tensor on that side (the row's prev/first sums are NaN)
SAME_AS_PREV = -2  # the first checkpoint is the previous one: its sums are the previous sums


def _cached_by_kernels_source(function: Callable[..., Any]) -> Callable[..., Any]:
    function.__qualname__ += "_" + hashlib.sha256(Path(kernels.__file__).read_bytes()).hexdigest()[:16]
    return function


# the inlined kernels' arithmetic is compiled with these flags, so they must be the kernels' own
@njit(nogil=True, fastmath=kernels.FASTMATH, error_model="numpy", boundscheck=False, cache=kernels.DISK_CACHE_USABLE)
@_cached_by_kernels_source
def reduce_segments(cur, starts, counts, prev, prev_starts, first, first_starts, chunk, samples, acc, keys,
                    prev_sums, first_sums):
    """
    For each tensor k, the elements `cur[starts[k]:starts[k] + counts[k]]` (bit patterns: int16 for
    bfloat16, int32 for float32, int64 for float64): their moments into `acc[k]`, `keys[k]` (as
    `kernels.new_moments` lays them out) and, where `prev_starts[k]` (`first_starts[k]`) is an
    element offset into `prev` (`first`), the diff of that tensor against this one into
    `prev_sums[k]` (`first_sums[k]`), `chunk` elements at a time. `samples`: an empty array of the
    sample type `moments` takes (no histogram samples are drawn).
    """
    for k in range(starts.shape[0]):
        begin = starts[k]
        n = counts[k]
        p = prev_starts[k]
        f = first_starts[k]
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            part = cur[begin + s:begin + e]
            _moments(part, acc[k], keys[k], samples, 0, 0)
            if p >= 0:
                _diff(prev[p + s:p + e], part, prev_sums[k])
            if f >= 0:
                _diff(first[f + s:f + e], part, first_sums[k])


def warm_up() -> None:
    """Load (or compile, the first time) the kernel for each float width, as `kernels.warm_up` does."""
    for bits_type, sample_type in ((np.int16, np.float32), (np.int32, np.float32), (np.int64, np.float64)):
        acc, keys = kernels.new_moments()
        bits = np.zeros(1, dtype=bits_type)
        offsets = np.zeros(1, dtype=np.int64)
        reduce_segments(bits, offsets, offsets + 1, bits, offsets, bits, offsets, 1, np.empty(0, dtype=sample_type),
                        acc[None], keys[None], np.zeros((1, kernels.DIFF_SLOTS)), np.zeros((1, kernels.DIFF_SLOTS)))
