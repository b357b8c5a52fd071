"""
A training run of 200 checkpoints of ~25 MB (a CNN's weights plus Adam state, saved with torch.save),
side by side in one run:

1. the obvious loop: `torch.load` each file, then per tensor with torch its norm, NaN/Inf check,
   change from the previous and from the first checkpoint, and the Adam moment norms;
2. `ckptview.open_run(folder).analyze()` on this machine (threads);
3. the same on a 2-worker Dask `LocalCluster` (started before timing; its start-up printed apart);
4. 10 new checkpoints, then the run again with the per-file cache: only the new files are read.

    python bench/run_bench.py [--checkpoints 200] [--dir /tmp/ckptview-run-bench]

The files are written once into the folder (5 GB) and removed at the end unless --keep.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
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


def torch_loop(paths: list[Path]) -> int:
    """The obvious way: load every file, keep the first and previous weights, compare with torch."""
    first = prev = None
    nan_onset = None
    for path in paths:
        state = torch.load(path, weights_only=True, map_location="cpu")
        weights = {k: v for k, v in state["model_state_dict"].items() if v.is_floating_point()}
        norms = {k: v.norm().item() for k, v in weights.items()}
        if nan_onset is None and any(not torch.isfinite(v).all() for v in weights.values()):
            nan_onset = path
        if prev is not None:
            {k: ((v - prev[k]).norm() / prev[k].norm()).item() for k, v in weights.items()}
            {k: ((v - first[k]).norm() / first[k].norm()).item() for k, v in weights.items()}
        {k: s["exp_avg_sq"].norm().item() for k, s in state["optimizer_state_dict"]["state"].items()}
        first = first if first is not None else weights
        prev = weights
        del norms
    return len(paths)


def timed(label: str, work) -> float:  # noqa: ANN001
    start = time.perf_counter()
    work()
    seconds = time.perf_counter() - start
    print(f"  {label:<44} {seconds:8.2f} s", flush=True)
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
        size = sum(p.stat().st_size for p in folder.iterdir())
        print(f"{args.checkpoints} checkpoints, {size / args.checkpoints / 1e6:.1f} MB each ({size / 1e9:.2f} GB), "
              f"ready in {time.perf_counter() - start:.0f} s; {os.cpu_count()} CPUs; all read once first (warm page cache)")
        paths = [folder / f"epoch_{e}.pt" for e in range(1, args.checkpoints + 1)]
        for path in paths:  # every method then reads from the page cache, none from the disk
            path.read_bytes()
        from ckptview.analyzers import kernels

        kernels.warm_up()  # numba's one-off load (~0.3 s) is not what is measured
        loop = timed("torch.load + torch loop", lambda: torch_loop(paths))
        local = timed("ckptview open_run + analyze (local threads)",
                      lambda: ckptview.open_run(folder, cache=False).analyze(progress=False))
        from distributed import Client, LocalCluster

        started = time.perf_counter()
        with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster, Client(cluster) as client:
            client.run(kernels.warm_up)
            print(f"  (LocalCluster of 2 workers started in {time.perf_counter() - started:.1f} s, not counted)")
            dask = timed("ckptview on a 2-worker LocalCluster",
                         lambda: ckptview.open_run(folder, cache=False, engine=client).analyze(progress=False))
        first = timed("ckptview local, cache filled", lambda: ckptview.open_run(folder, cache=cache).analyze(progress=False))
        write_run(folder, args.checkpoints + 1, args.new, model, optimizer)
        again = timed(f"ckptview local, cached, {args.new} new files",
                      lambda: ckptview.open_run(folder, cache=cache).analyze(progress=False))
        print(f"\nckptview local {loop / local:.1f}x faster than the loop, on Dask {loop / dask:.1f}x; "
              f"the cached re-run with {args.new} new files took {again / first:.1%} of the first run")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
