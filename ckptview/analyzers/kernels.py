"""
Fused reductions over one chunk of a tensor, compiled by numba: the hot loops of `stats` and of
the value diff.

Why numba: a chunk reduced with torch ops takes one pass over memory per statistic (convert, sum,
min/max, zero count, centred sum of squares, ...: 7 for statistics, 9 for a diff), and on a warm
page cache those passes, not the reads, were 90 % of the time. Here each chunk is cut into blocks
that stay in L1 and every statistic is taken while the block is there, with loops written so LLVM
vectorises them: on bfloat16, 0.06 ns per element per thread for the statistics, against 0.52 for
the torch ops. The kernels release the GIL, so the caller's threads run them in parallel.

The kernels take the stored bit patterns (int16 for bfloat16, int32 for float32, int64 for
float64) and reinterpret them as floats in registers, so no float copy of the data is written.

How the loops stay vectorisable and exact:
- min/max run on the bit patterns mapped to integers that order like the floats
  (`k = s ^ ((s >> width-1) & MAXPOS)`): numba's float `min`/`max` keep NaN checks that stop
  vectorisation, integer min/max does not. The same keys show whether a block holds NaN or Inf:
  those patterns map beyond the key of +Inf (or below that of -Inf), so the common all-finite
  block needs no per-element test; a block with NaN/Inf takes a scalar path that counts them and
  reduces the finite values.
- zeros are counted only in blocks whose smallest magnitude is 0, found in the same loop.
- sums run in float32 (float64 for float64) within a block, with reassociation (many partial
  sums), and are merged across blocks in float64 with Chan's formula. Within a block, the sums
  are centred on the tensor's mean so far, in the same single pass as the keys (one load per
  element: a second pass cost 25 % more time when the data came from memory). Where that centre
  is far from the block's own mean (the first block, or a jump in the data) the subtraction
  would cancel digits, so the block takes a second pass centred on its own mean, with the
  corrected two-pass formula; either way a large mean does not eat the variance.
- every integer is cast back to its own width: numba widens small-integer arithmetic to int64,
  which would cut the vector lanes by 2-4x.
- `np.isfinite` is never used: numba computes it as `x - x == 0`, which reassociation folds to
  True. Finiteness is `abs(x) <= largest finite`, or read from the keys.
"""

from __future__ import annotations

import functools
import struct

import numpy as np
from numba import njit, types
from numba.extending import intrinsic, overload
from numba.np.numpy_support import as_dtype

from ckptview.lazy import torch

BLOCK = 16384  # elements: 32 KiB of bfloat16 stays in L1 while every loop runs over it (4096 measured 7 % slower)


def _disk_cache_usable() -> bool:
    # Compiled kernels are cached next to this file, else in the user's cache directory, so only
    # the first run compiles (about 1 s per float width). Where neither is writable numba refuses
    # cache=True outright; compiling in every process is better than failing.
    try:
        njit(cache=True)(lambda: None)
    except RuntimeError:
        return False
    return True


# Not "fast": no-NaN/no-Inf flags would let LLVM delete the NaN checks of the scalar paths.
FASTMATH = {"reassoc", "nsz", "contract"}  # run_kernels compiles the kernels into its loop with these
DISK_CACHE_USABLE = _disk_cache_usable()  # run_kernels compiles with the same answer
_OPTIONS = dict(nogil=True, fastmath=FASTMATH, error_model="numpy", boundscheck=False, cache=DISK_CACHE_USABLE)
_LARGEST = np.finfo(np.float64).max

# acc slots of `moments`: finite count, mean, M2 (sum of squared deviations), zeros, NaN, +Inf, -Inf
MOMENT_SLOTS = 7
# acc slots of `diff`: max |a-b|, sum (a-b)^2, sum a^2, sum b^2, sum a*b, changed, NaN in a, NaN in b
DIFF_SLOTS = 8


@functools.cache
def _bits_of() -> dict[torch.dtype, torch.dtype]:
    """The integer type each float type's stored bits are read as (made on first use: importing torch
    takes 1.5 s, which statistics of small float tensors, `segment_stats` alone, do not need)."""
    return {torch.bfloat16: torch.int16, torch.float32: torch.int32, torch.float64: torch.int64}


def bit_patterns(chunk: torch.Tensor) -> np.ndarray:
    """A contiguous CPU chunk of bfloat16, float32 or float64 as the kernels take it: its bits, not copied."""
    return chunk.view(_bits_of()[chunk.dtype]).numpy()


_NO_KEYS = np.array([np.iinfo(np.int64).max, np.iinfo(np.int64).min], dtype=np.int64)


def new_moments() -> tuple[np.ndarray, np.ndarray]:
    """Fresh accumulators for `moments`: the float64 slots and the [min key, max key] pair (float32/64 keys)."""
    return np.zeros(MOMENT_SLOTS), _NO_KEYS.copy()


def key_to_float(key: int, itemsize: int) -> float:
    """The float of `itemsize` bytes (4 or 8) whose ordered-integer key (see the module docstring) is `key`."""
    bits = key ^ ((key >> (8 * itemsize - 1)) & ((1 << (8 * itemsize - 1)) - 1))
    signed, real = ("<i", "<f") if itemsize == 4 else ("<q", "<d")
    return struct.unpack(real, struct.pack(signed, bits))[0]


_FLOAT_OF_BITS = {types.int32: types.float32, types.uint32: types.float32, types.int64: types.float64}
_BITS_OF_FLOAT = {types.float32: types.int32, types.float64: types.int64}
_INF_BITS = {2: 0x7F80, 4: 0x7F800000, 8: 0x7FF0000000000000}  # +Inf of bfloat16, float32, float64


@intrinsic
def _reinterpret(typingctx, value):  # noqa: ANN001, ANN202, ARG001 - a numba intrinsic
    """The bits of a 32/64-bit int as the float of that width, or of a float as the signed int."""
    target = _FLOAT_OF_BITS.get(value) or _BITS_OF_FLOAT.get(value)
    if target is None:
        return None

    def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202, ARG001
        return builder.bitcast(args[0], context.get_value_type(target))

    return target(value), codegen


# The helpers below are specialised by the width of the bit patterns they get (int16: bfloat16,
# int32: float32, int64: float64) through numba's `overload`, so one kernel source compiles, and
# caches, once per width. Their bodies only ever run compiled.

def _value(bits):  # noqa: ANN001, ANN202
    """The float that `bits` encode (float32 for bfloat16)."""


def _key(bits):  # noqa: ANN001, ANN202
    """The ordered-integer key of `bits`, of the same width."""


def _key_range(bits):  # noqa: ANN001, ANN202
    """(largest key, smallest key, key of +Inf) for `bits`' width."""


def _magnitude(bits):  # noqa: ANN001, ANN202
    """`bits` without the sign bit: 0 for +0 and -0 only."""


def _wide_key(key):  # noqa: ANN001, ANN202
    """A block key as a float32/float64 key in int64 (a bfloat16 key shifted up to float32's)."""


def _to_sum(bits, value):  # noqa: ANN001, ANN202
    """`value` in the float type that sums of `bits`' values are taken in (float64 for int64, else float32)."""


def _largest(bits):  # noqa: ANN001, ANN202
    """The largest finite value of the float type sums of `bits`' values are taken in."""


def _widths(bits):  # noqa: ANN202, ANN001
    int_t = as_dtype(bits).type
    width = 8 * np.dtype(int_t).itemsize
    return int_t, width, int_t(np.iinfo(int_t).max)


@overload(_value, inline="always")
def _value_overload(bits):  # noqa: ANN001, ANN202
    if bits == types.int16:
        return lambda bits: _reinterpret(np.uint32(np.uint32(np.uint16(bits)) << np.uint32(16)))
    return lambda bits: _reinterpret(bits)


@overload(_key, inline="always")
def _key_overload(bits):  # noqa: ANN001, ANN202
    int_t, width, maxpos = _widths(bits)
    shift = int_t(width - 1)
    return lambda bits: int_t(bits ^ int_t(int_t(bits >> shift) & maxpos))


@overload(_key_range, inline="always")
def _key_range_overload(bits):  # noqa: ANN001, ANN202
    int_t, width, maxpos = _widths(bits)
    minneg = int_t(np.iinfo(int_t).min)
    inf_key = int_t(_INF_BITS[width // 8])
    return lambda bits: (maxpos, minneg, inf_key)


@overload(_magnitude, inline="always")
def _magnitude_overload(bits):  # noqa: ANN001, ANN202
    int_t, _, maxpos = _widths(bits)
    return lambda bits: int_t(bits & maxpos)


@overload(_wide_key, inline="always")
def _wide_key_overload(key):  # noqa: ANN001, ANN202
    if key == types.int16:
        # float32's key of a widened bfloat16: the 16-bit key shifted up, low bits filled for negatives.
        return lambda key: (np.int64(key) << 16) | ((np.int64(key) >> 63) & 0xFFFF)
    return lambda key: np.int64(key)


@overload(_to_sum, inline="always")
def _to_sum_overload(bits, value):  # noqa: ANN001, ANN202
    if bits == types.int64:
        return lambda bits, value: np.float64(value)
    return lambda bits, value: np.float32(value)


@overload(_largest, inline="always")
def _largest_overload(bits):  # noqa: ANN001, ANN202
    largest = np.float64(_LARGEST) if bits == types.int64 else np.float32(np.finfo(np.float32).max)
    return lambda bits: largest


@njit(**_OPTIONS, inline="always")
def _finite_key(key, inf_key):
    return key < inf_key and key >= -inf_key


@njit(**_OPTIONS, inline="always")
def _merge(acc, n, mean, m2):
    # Chan, Golub & LeVeque: combine two (count, mean, M2) summaries without revisiting the data.
    count = acc[0]
    total = count + n
    delta = mean - acc[1]
    acc[1] += delta * n / total
    acc[2] += m2 + delta * delta * count * n / total
    acc[0] = total


@njit(**_OPTIONS)
def merge_moments(acc, n, mean, m2):
    """Add a summary of `n` values (their mean and sum of squared deviations) to `acc`."""
    _merge(acc, n, mean, m2)


# Inlined into every caller (as the other helpers are), so each compiled kernel holds its own code
# and no other library's copy: see run_kernels for why that decides the last bits.
@njit(**_OPTIONS, inline="always")
def _moments_exact_block(block, acc, keys):
    # The scalar path, in float64: counts NaN/±Inf apart and reduces the finite values (also those
    # so large that the vectorised float32 sums overflowed).
    inf_key = _key_range(block[0])[2]
    count = 0
    total = 0.0
    for i in range(block.shape[0]):
        k = _key(block[i])
        if not _finite_key(k, inf_key):
            v = _value(block[i])
            if np.isnan(v):
                acc[4] += 1
            elif v > 0:
                acc[5] += 1
            else:
                acc[6] += 1
            continue
        count += 1
        total += np.float64(_value(block[i]))
        acc[3] += _magnitude(block[i]) == 0
        keys[0] = min(keys[0], _wide_key(k))
        keys[1] = max(keys[1], _wide_key(k))
    if count == 0:
        return
    mean = total / count
    m2 = 0.0
    for i in range(block.shape[0]):
        if _finite_key(_key(block[i]), inf_key):
            d = np.float64(_value(block[i])) - mean
            m2 += d * d
    _merge(acc, count, mean, m2)


@njit(**_OPTIONS, inline="always")
def _centred_sums(block, centre):
    # Sum of (x - centre) and of its squares, in the sum type (float32 for bfloat16/float32).
    first = _to_sum(block[0], 0)
    second = _to_sum(block[0], 0)
    for i in range(block.shape[0]):
        d = _value(block[i]) - centre
        first += d
        second += d * d
    return first, second


@njit(**_OPTIONS)
def moments(bits, acc, keys, samples, offset, stride):
    """
    Accumulate the moments of one chunk of a tensor into `acc` and `keys` (see `new_moments`).
    `bits`: the chunk's bit patterns, int16 for bfloat16, int32 for float32, int64 for float64.
    Every `stride`-th element of the tensor (counted from its first element; the chunk starts at
    element `offset`) is copied into `samples` (float32, float64 for float64) at element // stride;
    `stride` 0 takes no samples.
    """
    n = bits.shape[0]
    if n == 0:
        return
    maxpos, minneg, inf_key = _key_range(bits[0])
    largest = _largest(bits[0])
    zero = _magnitude(bits[0]) & 0  # 0 of the bits' own width: comparing with a literal widens the lanes
    for start in range(0, n, BLOCK):
        block = bits[start:min(start + BLOCK, n)]  # a slice indexed from 0: no negative-index wrap to check
        m = block.shape[0]
        # One pass takes the keys and the sums centred on the mean so far (0 before the first
        # block): a single load of each element, so reading from memory overlaps the arithmetic.
        shift = _to_sum(block[0], acc[1])
        lo = maxpos
        hi = minneg
        smallest = maxpos
        deviation = _to_sum(block[0], 0)
        squares = _to_sum(block[0], 0)
        for i in range(m):
            k = _key(block[i])
            lo = min(lo, k)
            hi = max(hi, k)
            smallest = min(smallest, _magnitude(block[i]))
            d = _value(block[i]) - shift
            deviation += d
            squares += d * d
        if stride > 0:  # now that the block is in L1
            first = offset + start
            position = -first % stride
            index = (first + position) // stride  # then one up per sample: no division per sample
            while position < m:
                samples[index] = _value(block[position])
                position += stride
                index += 1
        if not (_finite_key(lo, inf_key) and _finite_key(hi, inf_key) and abs(deviation) <= largest
                and squares <= largest):  # NaN/Inf in the block, or values near the float32 limit overflowed
            _moments_exact_block(block, acc, keys)
            continue
        offset_mean = np.float64(deviation) / m
        cancelled = m * offset_mean * offset_mean
        if cancelled <= 0.25 * np.float64(squares):
            # M2 = sum (x - shift)^2 - m (mean - shift)^2 with the subtracted term at most a quarter
            # of the first: rounding errors grow by at most 4/3, as exact as two passes.
            _merge(acc, m, np.float64(shift) + offset_mean, np.float64(squares) - cancelled)
        else:
            # The block's mean is far from the shift (the first block, or a jump in the data): a
            # second pass over the L1-resident block, centred on its own mean, with the corrected
            # two-pass formula (the residual carries the rounding error of the float32 mean).
            mean = _to_sum(block[0], np.float64(shift) + offset_mean)
            residual, m2 = _centred_sums(block, mean)
            correction = np.float64(residual) / m
            _merge(acc, m, np.float64(mean) + correction, np.float64(m2) - m * correction * correction)
        if smallest == zero:  # zeros are counted only in a block that has one
            zeros = np.int32(0)
            for i in range(m):
                zeros = np.int32(zeros + np.int32(_magnitude(block[i]) == zero))
            acc[3] += zeros
        keys[0] = min(keys[0], _wide_key(lo))
        keys[1] = max(keys[1], _wide_key(hi))


@njit(**_OPTIONS, inline="always")  # inlined for the reason `_moments_exact_block` is
def _diff_nonfinite_block(a, b, acc):
    # Positions where either side is NaN/Inf count for NaN and "changed" only; the sums are in
    # float64 over positions finite on both sides, so huge finite values whose float32 sum
    # overflowed still come out right.
    for i in range(a.shape[0]):
        x = np.float64(_value(a[i]))
        y = np.float64(_value(b[i]))
        x_nan = np.isnan(x)
        y_nan = np.isnan(y)
        acc[6] += x_nan
        acc[7] += y_nan
        if x != y and not (x_nan and y_nan):
            acc[5] += 1
        if not (abs(x) <= _LARGEST and abs(y) <= _LARGEST):
            continue
        d = x - y
        acc[0] = max(acc[0], abs(d))
        acc[1] += d * d
        acc[2] += x * x
        acc[3] += y * y
        acc[4] += x * y


@njit(**_OPTIONS)
def diff(a_bits, b_bits, acc):
    """
    Accumulate into `acc` (DIFF_SLOTS) how two chunks of the same dtype differ; `a_bits`, `b_bits`:
    their bit patterns, int16 for bfloat16, int32 for float32, int64 for float64.
    """
    n = a_bits.shape[0]
    if n == 0:
        return
    zero = _to_sum(a_bits[0], 0)
    largest = _largest(a_bits[0])
    for start in range(0, n, BLOCK):
        a = a_bits[start:min(start + BLOCK, n)]  # slices indexed from 0: no negative-index wrap to check
        b = b_bits[start:min(start + BLOCK, n)]
        dd = zero
        aa = zero
        bb = zero
        ab = zero
        top = _reinterpret(zero)
        changed = np.int32(0)
        for i in range(a.shape[0]):
            x = _value(a[i])
            y = _value(b[i])
            d = x - y
            dd += d * d
            aa += x * x
            bb += y * y
            ab += x * y
            magnitude = _reinterpret(abs(d))  # |d| >= 0, so its bit pattern orders like the float
            top = max(top, magnitude)
            changed = np.int32(changed + np.int32(magnitude != 0))
        if not abs(dd + aa + bb + ab) <= largest:  # NaN or Inf somewhere, or a float sum overflowed
            _diff_nonfinite_block(a, b, acc)
            continue
        acc[0] = max(acc[0], np.float64(_reinterpret(top)))
        acc[1] += np.float64(dd)
        acc[2] += np.float64(aa)
        acc[3] += np.float64(bb)
        acc[4] += np.float64(ab)
        acc[5] += changed


@njit(nogil=True, error_model="numpy", boundscheck=False, inline="always")
def _edge(low, high, bins, i):
    # element i of torch.linspace(low, high, bins + 1) as torch's CPU kernel computes it
    step = (high - low) / bins
    return low + step * i if i < (bins + 1) // 2 else high - step * (bins - i)


@njit(nogil=True, error_model="numpy", boundscheck=False, inline="always")
def _bin(x, low, high, bins, scale):
    # the division's bin, moved to the one whose edges hold x, as torch.histogram's local search does:
    # (x - low) * scale rounds differently from the edges near a border
    index = min(max(int(np.floor((x - low) * scale)), 0), bins - 1)
    if index < bins - 1 and x >= _edge(low, high, bins, index + 1):
        index += 1
    elif index > 0 and x < _edge(low, high, bins, index):
        index -= 1
    return index


@njit(nogil=True, error_model="numpy", boundscheck=False, cache=_OPTIONS["cache"])  # no fastmath: edges round as torch's
def histogram(values, low, high, counts):
    """Add the finite `values` to `counts`, equal bins over [low, high] (last bin closed); NaN/Inf are skipped."""
    bins = counts.shape[0]
    scale = bins / (high - low)
    for i in range(values.shape[0]):
        x = np.float64(values[i])
        if not abs(x) <= _LARGEST:
            continue
        counts[_bin(x, low, high, bins, scale)] += 1


@njit(nogil=True, error_model="numpy", boundscheck=False, cache=_OPTIONS["cache"])  # no fastmath: bins as `histogram`
def segment_stats(values, starts, ends, moments, extremes, counts):
    """
    Statistics of many small tensors in one call: tensor k is `values[starts[k]:ends[k]]` (float64,
    converted exactly from the stored dtype). A Python loop over a million one-element tensors
    cost ~100 us each through the per-tensor path; here each costs its elements.

    Fills `moments[k]` = (finite count, mean, m2, zeros, NaN, +Inf, -Inf) as `moments` accumulates
    them (m2 by the two-pass formula: the values are few and already in cache), `extremes[k]` =
    (min, max) of the finite values, and `counts[k]` with the histogram `stats` makes of a tensor
    with stride 1: equal bins over [min, max] (over [min-0.5, max+0.5] when they are equal).
    """
    bins = counts.shape[1]
    for k in range(starts.shape[0]):
        n = 0
        total = 0.0
        low = np.inf
        high = -np.inf
        zeros = nan = posinf = neginf = 0
        for i in range(starts[k], ends[k]):
            x = values[i]
            if abs(x) <= _LARGEST:
                n += 1
                total += x
                low = min(low, x)
                high = max(high, x)
                if x == 0:
                    zeros += 1
            elif x > 0:
                posinf += 1
            elif x < 0:
                neginf += 1
            else:
                nan += 1
        mean = total / n if n else 0.0
        m2 = 0.0
        if n:
            for i in range(starts[k], ends[k]):
                x = values[i]
                if abs(x) <= _LARGEST:
                    m2 += (x - mean) * (x - mean)
            left, right = (low, high) if low < high else (low - 0.5, high + 0.5)
            scale = bins / (right - left)
            for i in range(starts[k], ends[k]):
                x = values[i]
                if abs(x) <= _LARGEST:
                    counts[k, _bin(x, left, right, bins, scale)] += 1
        moments[k, 0] = n
        moments[k, 1] = mean
        moments[k, 2] = m2
        moments[k, 3] = zeros
        moments[k, 4] = nan
        moments[k, 5] = posinf
        moments[k, 6] = neginf
        extremes[k, 0] = low
        extremes[k, 1] = high


def warm_up() -> None:
    """
    Load (or, the first time, compile) every kernel now, so the first statistics or diff does not
    wait for it: numba's first call in a process costs about 0.2 s even from its disk cache. The
    explorer calls this on a background thread when it opens.
    """
    acc, keys = new_moments()
    for bits_type, sample_type in ((np.int16, np.float32), (np.int32, np.float32), (np.int64, np.float64)):
        bits = np.zeros(1, dtype=bits_type)
        moments(bits, acc, keys, np.zeros(1, dtype=sample_type), 0, 1)
        diff(bits, bits, np.zeros(DIFF_SLOTS))
        histogram(np.zeros(1, dtype=sample_type), 0.0, 1.0, np.zeros(1, dtype=np.int64))
