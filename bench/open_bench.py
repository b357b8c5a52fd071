"""
How fast does a checkpoint open? ckptview.open + listing every tensor, side by side with
torch.load(weights_only=True) and torch.load(mmap=True), on a ~2 GB LLM-shaped state dict and a
20,000-tensor file. Each method runs in a fresh subprocess so its peak memory is its own, measured
two ways:
- fresh: from the process's first import (what a script or a CLI pays: ckptview lists without
  importing torch, torch.load cannot);
- steady: after one call on a small file, so both have paid their imports and lazy set-up (what a
  notebook that has opened one file pays for the next).

    python bench/open_bench.py [--dir /tmp/somewhere] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from llm_fixture import make_llm_checkpoint, make_many_tensors  # noqa: E402

# Each snippet prints {"seconds": ..., "extra_rss_mb": ..., "tensors": ...}; imports happen before
# the baseline so only the work itself is measured.
_METHOD = r"""
import json, sys, time
start = time.perf_counter()
path, method, mode, small = sys.argv[1:5]
def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) / 1024
def listing(target):
    if method == "ckptview":
        import ckptview
        with ckptview.open(target) as ckpt:
            return [(e.name, e.shape, e.dtype_name) for e in ckpt.tensors()]
    import torch
    state = torch.load(target, weights_only=True, mmap=(method == "torch.load(mmap=True)"))
    return [(k, tuple(v.shape), v.dtype) for k, v in state.items()]
if mode == "steady":
    listing(small)
base = rss_mb()
if mode == "steady":
    start = time.perf_counter()  # after reading /proc for the baseline: only the listing is timed
count = len(listing(path))
seconds = time.perf_counter() - start
# VmHWM, not ru_maxrss: the high-water mark of this process image, not inherited from the parent
with open("/proc/self/status") as f:
    peak = next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024
print(json.dumps({"seconds": seconds, "extra_rss_mb": max(0.0, peak - base), "tensors": count}))
"""

METHODS = ("ckptview", "torch.load(weights_only=True)", "torch.load(mmap=True)")


def measure(path: Path, method: str, mode: str, small: Path, repeat: int) -> dict[str, float]:
    runs = []
    for _ in range(repeat):
        out = subprocess.run([sys.executable, "-c", _METHOD, str(path), method, mode, str(small)],
                             capture_output=True, text=True, check=True)
        runs.append(json.loads(out.stdout))
    return {
        "seconds": statistics.median(r["seconds"] for r in runs),
        "extra_rss_mb": max(r["extra_rss_mb"] for r in runs),
        "tensors": runs[0]["tensors"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", help="where to write the files (default: a temp dir, removed afterwards)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        files = {}
        t0 = time.perf_counter()
        files["llm-2GB"] = make_llm_checkpoint(Path(tmp) / "llm.pt")
        files["20k-tensors"] = make_many_tensors(Path(tmp) / "many.pt")
        small = make_many_tensors(Path(tmp) / "small.pt", count=50)
        print(f"wrote {', '.join(f'{k} ({p.stat().st_size / 2**30:.2f} GiB)' for k, p in files.items())} "
              f"in {time.perf_counter() - t0:.0f}s (page cache warm)\n")
        print(f"{'file':<12} {'mode':<7} {'method':<30} {'tensors':>7} {'seconds':>9} {'extra RSS':>10} "
              f"{'ckptview faster by':>19}")
        for label, path in files.items():
            for mode in ("fresh", "steady"):
                results = {m: measure(path, m, mode, small, args.repeat) for m in METHODS}
                ours = results["ckptview"]["seconds"]
                for method, r in results.items():
                    ratio = "" if method == "ckptview" else f"{r['seconds'] / ours:,.1f}x"
                    print(f"{label:<12} {mode:<7} {method:<30} {r['tensors']:>7} {r['seconds']:>9.4f} "
                          f"{r['extra_rss_mb']:>8.1f}MB {ratio:>19}")


if __name__ == "__main__":
    main()
