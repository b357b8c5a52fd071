"""
A training run of 200 checkpoints of ~25 MB (a CNN's weights plus Adam state, saved with torch.save),
every method on the same files, side by side in one run, with the page cache in a known state:

- warm: every file in the page cache before each timed method (evicted and read back once, so all
  sit in the same large-folio state; `fincore` confirms 100 % resident), the set sized to fit in RAM;
- cold: every file evicted (`posix_fadvise(DONTNEED)`, `fincore` confirms 0 %) before each method,
  so each reads from the disk.

Methods, each giving the same figures (the bench checks they agree):

1. the obvious loop: `torch.load` each file, then with torch per model tensor its squared norm,
   NaN/Inf check and squared change from the previous and from the first checkpoint (kept in
   memory), per module the norm and relative changes, BatchNorm running means and changes, the
   norm of every Adam slot and its NaN/Inf check. Timed with one torch thread: with torch's
   default (2 intra-op threads here) it was 15-40x slower whenever other processes shared the
   two cores (a short sample of it is printed).
2. `ckptview.open_run(folder).analyze()` with no cache: headers, order, then tensors, with its default
   worker count (a thread per CPU: 2 here) and on 1 thread, to compare per core.
3. the same on a 2-worker Dask `LocalCluster` (started before timing; its start-up printed apart).
4. `open_run(...).analyze()` filling an empty cache, then 10 new checkpoints and the same again:
   only the new files are read. Two trials, each from an empty cache, both printed.

Warm and cold measurements are interleaved (loop, ckptview, ckptview, loop) and the best of each
method's two is printed.

    python bench/run_bench.py [--checkpoints 200] [--dir /tmp/ckptview-run-bench] [--keep]

The files (4.7 GB) are removed at the end unless --keep.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import ckptview


def build_model() -> nn.Module:
    layers: list[nn.Module] = []
    width = 176
    for i in range(8):
        layers += [nn.Conv2d(width if i else 3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10))


def write_run(folder: Path, first: int, count: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """`count` epochs from `first`: each a real Adam step on random data, saved as a training dict."""
    for epoch in range(first, first + count):
        loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 8, 8)), torch.randint(0, 10, (4,)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        torch.save({"epoch": epoch, "global_step": epoch * 100, "loss": loss.item(), "val_acc": 1 / (1 + epoch % 37),
                    "model_state_dict": model.state_dict(), "optimizer_state_dict": optimizer.state_dict()},
                   folder / f"epoch_{epoch}.pt")


def torch_loop(paths: list[Path]) -> dict[tuple[str, int], tuple[float, float, float]]:
    """
    The obvious way to the figures `analyze()` gives: load every file, keep the first and previous
    weights, reduce with torch. Returns (module, epoch) -> (weight norm, change from previous,
    change from first), for the agreement check.
    """
    first = prev = None
    nan_onset = None
    drift = {}
    for path in paths:
        state = torch.load(path, weights_only=True, map_location="cpu")
        weights = {k: v for k, v in state["model_state_dict"].items() if v.is_floating_point()}
        bad = [k for k, v in weights.items() if not torch.isfinite(v).all()]
        squares = {k: v.square().sum().item() for k, v in weights.items()}
        to_prev = {k: ((v - prev[k]).square().sum().item(), prev[k].square().sum().item())
                   for k, v in weights.items()} if prev is not None else {}
        to_first = {k: ((v - first[k]).square().sum().item(), first[k].square().sum().item())
                    for k, v in weights.items()} if first is not None else {}
        modules = defaultdict(list)
        for k in weights:
            module, _, leaf = k.rpartition(".")
            if leaf not in ("running_mean", "running_var"):
                modules[module].append(k)
        for module, names in modules.items():
            norm = math.sqrt(sum(squares[k] for k in names))
            rel_prev = rel_first = math.nan
            if to_prev:
                rel_prev = math.sqrt(sum(to_prev[k][0] for k in names) / sum(to_prev[k][1] for k in names))
                rel_first = math.sqrt(sum(to_first[k][0] for k in names) / sum(to_first[k][1] for k in names))
            drift[(module, state["epoch"])] = (norm, rel_prev, rel_first)
        {k: v.mean().item() for k, v in weights.items() if k.endswith(("running_mean", "running_var"))}
        slots = defaultdict(float)
        for moments in state["optimizer_state_dict"]["state"].values():
            for slot, value in moments.items():
                if slot != "step" and value.is_floating_point():
                    bad += [] if torch.isfinite(value).all() else [slot]
                    slots[slot] += value.square().sum().item()
        if nan_onset is None and bad:
            nan_onset = path
        first = first if first is not None else weights
        prev = weights
    return drift


def resident(paths: list[Path]) -> float:
    """The fraction of the files' bytes in the page cache (`fincore`), NaN where it is not installed."""
    try:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES,SIZE", *map(str, paths)],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return math.nan
    pairs = [tuple(map(int, line.split())) for line in out.splitlines() if line.strip()]
    return sum(r for r, _ in pairs) / max(1, sum(s for _, s in pairs))


def evict(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(paths: list[Path]) -> None:
    for path in paths:
        path.read_bytes()


def timed(label: str, state: str, paths: list[Path], work: Callable[[], object]) -> float:
    (warm if state == "warm" else evict)(paths)
    before = resident(paths)
    start, cpu = time.perf_counter(), time.process_time()
    work()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    # CPU time of this process beside the wall time: with other work on the machine, the wall time of
    # two threads says little, and the CPU time is what the method costs (a Dask run's is in its workers)
    print(f"  [{state}, {before:4.0%} cached] {label:<50} {seconds:8.3f} s  ({cpu:7.3f} s CPU here)", flush=True)
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", type=int, default=200)
    parser.add_argument("--new", type=int, default=10)
    parser.add_argument("--dir", default=None)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="ckptview-run-bench-"))
    folder, cache = root / "run", root / "cache"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(cache, ignore_errors=True)
    torch.manual_seed(0)
    model = build_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    try:
        start = time.perf_counter()
        if not (folder / f"epoch_{args.checkpoints}.pt").exists():  # --keep left them from an earlier run
            write_run(folder, 1, args.checkpoints, model, optimizer)
        for extra in range(args.checkpoints + 1, args.checkpoints + args.new + 1):
            (folder / f"epoch_{extra}.pt").unlink(missing_ok=True)
        os.sync()  # written pages must be clean before they can be evicted
        paths = [folder / f"epoch_{e}.pt" for e in range(1, args.checkpoints + 1)]
        size = sum(p.stat().st_size for p in paths)
        available = int(next(line.split()[1] for line in open("/proc/meminfo") if line.startswith("MemAvailable"))) * 1024
        print(f"{args.checkpoints} checkpoints, {size / args.checkpoints / 1e6:.1f} MB each ({size / 1e9:.2f} GB), "
              f"ready in {time.perf_counter() - start:.0f} s; {os.cpu_count()} CPUs, {available / 2**30:.1f} GiB "
              f"available (the set {'fits' if size < available / 2 else 'does NOT fit'} in the page cache twice); "
              f"torch {torch.get_num_threads()} intra-op threads by default", flush=True)
        if size >= available / 2:
            print("  warm figures are not warm: rerun with fewer --checkpoints")
        from ckptview.analyzers import kernels, run_kernels, run_tasks

        kernels.warm_up()  # numba's one-off load (~0.3 s) is not what is measured
        run_kernels.warm_up()
        threads = torch.get_num_threads()

        def loop(n: int, files: list[Path] = paths) -> Callable[[], object]:
            def work() -> object:
                torch.set_num_threads(n)
                try:
                    return torch_loop(files)
                finally:
                    torch.set_num_threads(threads)
            return work

        sample = paths[:10]
        for n in (threads, 1):
            seconds = timed(f"(sample) loop, torch {n} threads, {len(sample)} files", "warm", sample, loop(n, sample))
            print(f"    {seconds / len(sample) * 1000:.0f} ms per file")

        def local(workers: int | None) -> Callable[[], object]:
            return lambda: ckptview.open_run(folder, cache=False, workers=workers).analyze(progress=False)

        results: dict[tuple[str, str], list[float]] = defaultdict(list)
        for state in ("warm", "cold"):
            plan = [("loop, torch 1 thread", loop(1)), ("ckptview local, default workers", local(None)),
                    ("ckptview local, 1 thread", local(1))]
            for label, work in plan + plan[::-1]:  # interleaved: each method once early, once late
                results[(state, label)].append(timed(label, state, paths, work))
        agreement = torch_loop(paths)
        frame = ckptview.open_run(folder, cache=False).analyze(progress=False).drift_frame()
        worst = max(abs(getattr(row, field) - agreement[(row.module, row.epoch)][k]) / abs(agreement[(row.module, row.epoch)][k])
                    for row in frame.itertuples() for k, field in enumerate(("weight_norm", "rel_change_prev", "rel_change_first"))
                    if math.isfinite(agreement[(row.module, row.epoch)][k]) and agreement[(row.module, row.epoch)][k])
        print(f"  loop and ckptview agree: largest relative difference over {len(frame)} module figures {worst:.1e}")

        from distributed import Client, LocalCluster

        started = time.perf_counter()
        with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster, Client(cluster) as client:
            client.run(kernels.warm_up)
            client.run(run_kernels.warm_up)
            # the imports a task needs (torch alone takes ~1.5 s in each worker; kernels no longer imports it)
            client.run(run_tasks.scan, str(paths[0]))
            print(f"  (LocalCluster of 2 workers started in {time.perf_counter() - started:.1f} s, not counted)")
            dask = timed("ckptview on a 2-worker LocalCluster", "warm", paths,
                         lambda: ckptview.open_run(folder, cache=False, engine=client).analyze(progress=False))
        new = [folder / f"epoch_{e}.pt" for e in range(args.checkpoints + 1, args.checkpoints + args.new + 1)]
        cached_runs = []  # (first run, re-run) of each trial: a re-run is ~0.2 s, one sample of it is noisy
        for _ in range(2):
            shutil.rmtree(cache, ignore_errors=True)
            for path in new:
                path.unlink(missing_ok=True)
            first = timed("ckptview local, empty cache filled", "warm", paths,
                          lambda: ckptview.open_run(folder, cache=cache).analyze(progress=False))
            write_run(folder, args.checkpoints + 1, args.new, model, optimizer)
            again = timed(f"ckptview local, cached, {args.new} new files", "warm", paths + new,
                          lambda: ckptview.open_run(folder, cache=cache).analyze(progress=False))
            cached_runs.append((first, again))

        print()
        for state in ("warm", "cold"):
            best = {label: min(times) for (s, label), times in results.items() if s == state}
            loop_best = best["loop, torch 1 thread"]
            print(f"{state} page cache ({args.checkpoints} files): loop {loop_best:.2f} s (1 torch thread), ckptview "
                  f"{best['ckptview local, default workers']:.2f} s with its default = "
                  f"{loop_best / best['ckptview local, default workers']:.1f}x faster; on 1 thread "
                  f"{best['ckptview local, 1 thread']:.2f} s = {loop_best / best['ckptview local, 1 thread']:.1f}x per core")
        print(f"2-worker LocalCluster, warm: {dask:.2f} s; cached re-run with {args.new} new files, each trial: "
              + "; ".join(f"{again:.3f} s = {again / first:.1%} of the {first:.2f} s first run"
                          for first, again in cached_runs) + " (all warm)")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
