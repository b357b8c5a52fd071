"""The run's compiled kernel gives the same bits whether a process compiled it or loaded it from numba's disk cache."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

# Runs in a fresh interpreter: the kernel over float32 (with a NaN/Inf block for the scalar path),
# bfloat16 and float64 tensors of several sizes, each compared with a previous checkpoint; prints
# every accumulator as hex and whether the kernel came from the disk cache.
_KERNEL_RUN = """
import json
import numpy as np
from ckptview.analyzers import kernels, run_kernels

rng = np.random.default_rng(7)
sizes = [1, 17, 1000, 40000, 300000]
results = {}
for name, bits_type, float_type in (("float32", np.int32, np.float32), ("bfloat16", np.int16, np.float32),
                                    ("float64", np.int64, np.float64)):
    values = [rng.normal(0.3, 2.0, n).astype(float_type) for n in sizes]
    values[3][123] = np.nan
    values[3][4567] = np.inf
    cur = np.concatenate(values).view(bits_type)
    if bits_type is np.int16:
        cur = np.concatenate(values).view(np.int32)[::2].astype(np.int16)
    prev = cur[::-1].copy()
    starts = np.cumsum([0] + sizes[:-1]).astype(np.int64)
    count = len(sizes)
    acc = np.zeros((count, kernels.MOMENT_SLOTS))
    keys = np.repeat(kernels.new_moments()[1][None], count, axis=0)
    prev_sums = np.zeros((count, kernels.DIFF_SLOTS))
    first_sums = np.zeros((count, kernels.DIFF_SLOTS))
    run_kernels.reduce_segments(cur[:starts[-1] + sizes[-1]], starts, np.array(sizes, dtype=np.int64), prev, starts,
                                prev, np.full(count, run_kernels.SAME_AS_PREV, dtype=np.int64), 65536,
                                np.empty(0, dtype=float_type), acc, keys, prev_sums, first_sums)
    results[name] = [acc.tobytes().hex(), keys.tobytes().hex(), prev_sums.tobytes().hex()]
results["from_cache"] = sum(run_kernels.reduce_segments.stats.cache_hits.values()) > 0
print(json.dumps(results))
"""


def _run_kernel_in_fresh_process(cache_dir: Path) -> dict:
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache_dir)}
    done = subprocess.run([sys.executable, "-c", _KERNEL_RUN], env=env, capture_output=True, text=True, check=True,
                          cwd=Path(__file__).parent.parent, timeout=600)
    return json.loads(done.stdout.splitlines()[-1])


def test_compiled_and_cached_kernel_give_the_same_bits(tmp_path: Path) -> None:
    compiled = _run_kernel_in_fresh_process(tmp_path)
    cached = _run_kernel_in_fresh_process(tmp_path)
    assert not compiled.pop("from_cache")
    assert cached.pop("from_cache")
    assert cached == compiled


# Runs the run's kernel once over float32 in a fresh interpreter importing ckptview from `root`; prints
# whether it came from the disk cache.
_FROM_CACHE = """
import sys
sys.meta_path[:] = [finder for finder in sys.meta_path if "editable" not in repr(finder).lower()]
sys.path.insert(0, sys.argv[1])
import ckptview
from ckptview.analyzers import run_kernels
assert ckptview.__file__.startswith(sys.argv[1]), ckptview.__file__
run_kernels.warm_up()
print(sum(run_kernels.reduce_segments.stats.cache_hits.values()) > 0)
"""


def test_an_edit_to_the_kernels_alone_is_compiled_afresh(tmp_path: Path) -> None:
    # the run's kernel inlines kernels.py; numba stamps its cached code with run_kernels.py alone, so
    # an edit to kernels.py alone kept loading the old arithmetic
    root = tmp_path / "src"
    shutil.copytree(Path(__file__).parent.parent / "ckptview", root / "ckptview",
                    ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache")}

    def from_cache() -> bool:
        done = subprocess.run([sys.executable, "-c", _FROM_CACHE, str(root)], env=env, capture_output=True,
                              text=True, check=True, timeout=600)
        return done.stdout.split()[-1] == "True"

    assert not from_cache()
    assert from_cache()
    kernels = root / "ckptview" / "analyzers" / "kernels.py"
    kernels.write_text(kernels.read_text() + "\n# an edit\n")
    assert not from_cache()
