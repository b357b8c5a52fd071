"""
How fast are per-tensor statistics? On a ~2 GB LLM-shaped bfloat16 state dict (327 tensors, a
few with NaN/Inf), side by side in one run:

- ckptview.stats (streamed in chunks, threads over tensors),
- the obvious alternative: torch.load(weights_only=True), then a loop computing the same
  statistics with torch (finite mask, min, max, mean, std, abs-max, L2, zeros, NaN/Inf, histogram),
- the raw read limit: reading the file in 16 MB blocks,

with a warm page cache and a cold one (posix_fadvise(DONTNEED) before each run), plus the
extra anonymous memory (RssAnon growth) of each, and the tensor table + module tree of a
20,000-tensor file. Each measurement runs in a fresh subprocess so memory figures are its own.

And a safetensors file of one million one-element tensors (the hostile-file suite's layout,
tests/hostile_files.py), side by side as whole `ckptview` processes: `scan` (the header is not
checked), `info` (checked, not listed), `stats` (listed and read; the table's first 1,000 rows
printed), `stats --all` (every row) and `stats --json`,
each with its wall time and peak RSS (the child's ru_maxrss), and the load average around them:
the machine is shared, and other work slows every row. `--baseline DIR` runs the same commands,
interleaved, with another checkout's `ckptview` package first on PYTHONPATH (e.g. one made by
`git archive COMMIT ckptview | tar -x -C DIR`), for a before/after side by side.

    python bench/stats_bench.py [--dir /tmp/somewhere] [--repeat 5] [--only llm|million] [--baseline DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from llm_fixture import drop_page_cache, make_llm_checkpoint, make_many_tensors  # noqa: E402

# Each snippet prints {"seconds": ..., "extra_anon_mb": ...}. In a memory run a thread samples
# RssAnon every 2 ms (anonymous memory only: the page cache the reads go through is not the
# process's memory). Timed runs go without it: reading /proc/self/status 500 times a second took
# a share of the two cores and slowed ckptview.stats by 8 %, the single-threaded raw read less.
_PRELUDE = r"""
import json, sys, threading, time
import torch, ckptview
path = sys.argv[1]
if sys.argv[2] == "warm":
    # Re-read just before timing: this VM reclaims idle page cache within seconds (DAMON), so a
    # file read by the previous run may already be cold again.
    with open(path, "rb", buffering=0) as f:
        block = memoryview(bytearray(16 << 20))
        while f.readinto(block):
            pass
    del block
def anon_mb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("RssAnon:")) / 1024
base = anon_mb()
peak = [base]
done = threading.Event()
def sample():
    while not done.wait(0.002):
        peak[0] = max(peak[0], anon_mb())
if sys.argv[3] == "memory":
    threading.Thread(target=sample, daemon=True).start()
"""
_REPORT = r"""
seconds = time.perf_counter() - start
done.set()
peak[0] = max(peak[0], anon_mb())
print(json.dumps({"seconds": seconds, "extra_anon_mb": peak[0] - base}))
"""
# Run before the timer starts. The steady-state row makes one statistics call on a small file
# first, as any call after a process's first is made: numba's first call costs ~0.2 s (plus
# ~0.25 s to import numba), and the first threads and buffers ~0.01 s more, a fixed start-up that
# the fresh-process row keeps in.
SETUP = {"ckptview.stats": r"""
import tempfile
with tempfile.TemporaryDirectory() as scratch:
    torch.save({"w": torch.randn(256, 256).bfloat16(), "b": torch.randn(256)}, scratch + "/small.pt")
    with ckptview.open(scratch + "/small.pt") as small:
        ckptview.stats(small, progress=False)
"""}
METHODS = {
    "raw read (16 MB blocks)": r"""
buffer = bytearray(16 << 20)
view = memoryview(buffer)
with open(path, "rb", buffering=0) as f:
    while f.readinto(view):
        pass
""",
    "ckptview.stats": r"""
with ckptview.open(path) as ckpt:
    result = ckptview.stats(ckpt, progress=False)
assert sum(t.nan_count for t in result.tensors) > 0
""",
    "ckptview.stats, new process": r"""
with ckptview.open(path) as ckpt:
    result = ckptview.stats(ckpt, progress=False)
assert sum(t.nan_count for t in result.tensors) > 0
""",
    "torch.load + loop": r"""
state = torch.load(path, weights_only=True)
rows = {}
for name, tensor in state.items():
    x = tensor.float().reshape(-1)
    finite = x[torch.isfinite(x)]
    low, high = finite.min(), finite.max()
    rows[name] = dict(min=float(low), max=float(high), mean=float(finite.double().mean()),
                      std=float(finite.double().std()), abs_max=float(finite.abs().max()),
                      l2=float(finite.double().norm()), zeros=float((x == 0).sum()) / x.numel(),
                      nan=int(torch.isnan(x).sum()), posinf=int((x == float("inf")).sum()),
                      neginf=int((x == -float("inf")).sum()), hist=torch.histc(finite, 64, float(low), float(high)))
assert sum(r["nan"] for r in rows.values()) > 0
""",
}
_TABLE_TREE = r"""
import json, sys, time
import ckptview
path = sys.argv[1]
t0 = time.perf_counter()
ckpt = ckptview.open(path)
ckpt.tensors()
t1 = time.perf_counter()
table = ckptview.tensor_table(ckpt)
t2 = time.perf_counter()
tree = ckptview.module_tree(ckpt)
t3 = time.perf_counter()
print(json.dumps({"open": t1 - t0, "table": t2 - t1, "tree": t3 - t2, "rows": len(table.rows),
                  "folded": [(n.name, n.repeat) for n in tree.root.children[0].children[0].children][:3]}))
"""


def run(code: str, path: Path, cache: str = "cold", mode: str = "time") -> dict[str, float]:
    done = subprocess.run([sys.executable, "-c", code, str(path), cache, mode], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(path: Path, method: str, *, cold: bool, mode: str = "time") -> dict[str, float]:
    """One run of `method` in a fresh process; `mode` "memory" samples RssAnon, "time" does not."""
    if cold:
        drop_page_cache(path)
    code = _PRELUDE + SETUP.get(method, "") + "\nstart = time.perf_counter()\n" + METHODS[method] + _REPORT
    return run(code, path, "cold" if cold else "warm", mode)


def measure_interleaved(path: Path, *, cold: bool, repeat: int) -> dict[str, dict[str, float]]:
    """
    Every method once per round, `repeat` timed rounds and one memory round, then the median time
    per method: the machine's speed drifts (the raw read alone ranges 0.07-0.10 s here from one
    minute to the next), and rounds put each method under the same drift instead of measuring one
    method's runs after another's. torch.load + loop runs once, sampled: ~30 s, 20x away from the
    others, and the sampler's cost is lost in it.
    """
    times: dict[str, list[float]] = {method: [] for method in METHODS}
    memory: dict[str, float] = {}
    for round_number in range(repeat + 1):
        for method in METHODS:
            slow = method.startswith("torch")
            if slow and round_number:
                continue
            mode = "memory" if slow or round_number == repeat else "time"
            result = measure(path, method, cold=cold, mode=mode)
            if mode == "memory":
                memory[method] = result["extra_anon_mb"]
            if mode == "time" or slow:
                times[method].append(result["seconds"])
    return {method: {"seconds": statistics.median(times[method]), "extra_anon_mb": memory[method]}
            for method in METHODS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", help="where to write the files (default: a temp dir, removed afterwards)")
    parser.add_argument("--repeat", type=int, default=5, help="rounds of the fast methods (median); torch.load+loop runs once")
    parser.add_argument("--only", choices=("llm", "million"), help="run one part: the LLM file and the 20,000-tensor "
                                                                    "file, or the million-tensor file")
    parser.add_argument("--baseline", metavar="DIR", help="also run the million-tensor commands with the ckptview "
                                                           "package in DIR (another checkout) first on the path")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        if args.only != "llm":
            report_million(Path(tmp) / "million.safetensors", repeat=max(1, min(args.repeat, 3)), baseline=args.baseline)
        if args.only == "million":
            return
        t0 = time.perf_counter()
        llm = make_llm_checkpoint(Path(tmp) / "llm.pt")
        many = make_many_tensors(Path(tmp) / "many.pt")
        size = llm.stat().st_size
        print(f"wrote {llm.name} ({size / 2**30:.2f} GiB) and {many.name} in {time.perf_counter() - t0:.0f}s; "
              f"{os.cpu_count()} CPUs, torch threads {__import__('torch').get_num_threads()}, "
              f"load average {os.getloadavg()[0]:.1f} (other work on the machine slows every row)\n")

        results: dict[tuple[str, str], dict[str, float]] = {}
        for cache in ("warm", "cold"):
            for method, result in measure_interleaved(llm, cold=cache == "cold", repeat=args.repeat).items():
                results[(cache, method)] = result

        print(f"{'cache':<6} {'method':<26} {'seconds':>8} {'GB/s':>7} {'extra anon':>11} {'vs torch.load+loop':>19} "
              f"{'% of raw read':>14}")
        for (cache, method), r in results.items():
            ours = results[(cache, "ckptview.stats")]["seconds"]
            raw = results[(cache, "raw read (16 MB blocks)")]["seconds"]
            speedup = f"{r['seconds'] / ours:.1f}x slower" if method.startswith("torch") else ""
            share = f"{raw / r['seconds']:.0%}" if method.startswith("ckptview") else ""
            print(f"{cache:<6} {method:<26} {r['seconds']:>8.3f} {size / r['seconds'] / 1e9:>7.2f} "
                  f"{r['extra_anon_mb']:>9.0f}MB {speedup:>19} {share:>14}")

        timings = [run(_TABLE_TREE, many) for _ in range(args.repeat)]
        best = {key: min(t[key] for t in timings) for key in ("open", "table", "tree")}
        print(f"\n20,000-tensor file ({timings[0]['rows']:,} rows): open {best['open']:.3f}s, tensor_table "
              f"{best['table']:.3f}s, module_tree {best['tree']:.3f}s, table+tree {best['table'] + best['tree']:.3f}s "
              f"(best of {args.repeat}); folded {timings[0]['folded']}")
        print(f"load average at the end {os.getloadavg()[0]:.1f}")


MILLION = 1_000_000
MILLION_COMMANDS = {"scan": ["scan"], "info": ["info"], "stats": ["stats"], "stats --all": ["stats", "--all"],
                    "stats --json": ["stats", "--json"]}


def cli_process(arguments: list[str], package_dir: str | None = None) -> dict[str, float]:
    """
    One `python -m ckptview ...` process, output discarded: wall seconds from start to exit (imports and
    teardown included) and its peak RSS. `package_dir` holds the ckptview to run instead of this one.

    The peak comes from /usr/bin/time, not from os.wait4 here: a child's ru_maxrss starts at its
    parent's RSS when it forks (Linux keeps the larger across exec), and this process has just written
    the million-tensor header, so every command read ~870 MB, `scan` included.
    """
    environment = dict(os.environ, PYTHONPATH=package_dir) if package_dir else None
    with tempfile.NamedTemporaryFile("r") as peak:
        start = time.perf_counter()
        # run from `package_dir`: `-m` puts the working directory ahead of PYTHONPATH
        done = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", peak.name, sys.executable, "-m", "ckptview", *arguments],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=environment, cwd=package_dir, check=False)
        seconds = time.perf_counter() - start
        if done.returncode:
            raise RuntimeError(f"ckptview {' '.join(arguments)} failed (exit {done.returncode})")
        return {"seconds": seconds, "peak_rss_mb": int(peak.read().split()[-1]) / 1024}  # %M is in KiB


def report_million(path: Path, *, repeat: int, baseline: str | None) -> None:
    """The million-tensor figures: each command `repeat` times, interleaved (with the baseline's, when given,
    so both meet the same load); the fastest run and its memory."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from hostile_files import many_tensor_safetensors

    many_tensor_safetensors(path, MILLION)
    versions = {"this": None} | ({"baseline": baseline} if baseline else {})
    for package_dir in versions.values():  # numba's and Python's caches, and the file's pages, warm for every row
        cli_process(["stats", str(path)], package_dir)
    load_before = os.getloadavg()
    runs: dict[tuple[str, str], list[dict[str, float]]] = {
        (version, label): [] for label in MILLION_COMMANDS for version in versions}
    for _ in range(repeat):
        for label, command in MILLION_COMMANDS.items():
            for version, package_dir in versions.items():
                try:
                    runs[(version, label)].append(cli_process([*command, str(path)], package_dir))
                except RuntimeError:
                    if not package_dir:
                        raise  # an option the baseline lacks (`stats --all` before it existed) leaves its row empty
    load_after = os.getloadavg()
    print(f"{MILLION:,} one-element float32 tensors ({path.stat().st_size / 1e6:.0f} MB safetensors), whole "
          f"`ckptview` processes, fastest of {repeat}; load average {load_before[0]:.1f} before, "
          f"{load_after[0]:.1f} after, {os.cpu_count()} CPUs")
    print(f"{'version':<9} {'command':<14} {'seconds':>8} {'slowest':>8} {'peak RSS':>9}")
    for (version, label), results in runs.items():
        if not results:
            print(f"{version:<9} {label:<14} {'-':>8}")
            continue
        best = min(results, key=lambda result: result["seconds"])
        print(f"{version:<9} {label:<14} {best['seconds']:>8.2f} {max(r['seconds'] for r in results):>8.2f} "
              f"{best['peak_rss_mb']:>7.0f}MB")
    print()


if __name__ == "__main__":
    main()
