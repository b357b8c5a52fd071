"""
Peak memory of loading a model whose weights are ~2 GB: ckptview's meta-device path vs the naive one.

    naive:  model = Net()  (random init on the CPU: one copy)
            model.load_state_dict(torch.load(path))  (the state dict: a second copy)
    meta:   ckptview.inference.load_model(ckpt, Net, device="cpu")
            (Net built on the meta device: no memory; each tensor read from the file and
             assigned with load_state_dict(assign=True): one copy)

With --device cuda both load onto the GPU (naive: Net().cuda(), then torch.load with
map_location="cuda") and the figure that matters is GPU memory: torch.cuda.max_memory_allocated.

Each variant runs in a fresh subprocess, so its peak RSS (VmHWM, the kernel's high-water mark
for that process; getrusage's ru_maxrss where /proc is missing) is its own; the figure reported is the rise over the process's RSS after
importing torch and ckptview. The page cache holding the file is not in RSS either way.

    python bench/inference_meta_bench.py                 # ~2 GB file in a temp dir
    python bench/inference_meta_bench.py --layers 4 --width 4096 --dir /data/tmp
    python bench/inference_meta_bench.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn

GIB = 1024**3


class Net(nn.Module):
    """`layers` square Linear layers: width 8192 x 8 layers = 537M parameters = 2.0 GiB in fp32."""

    def __init__(self, layers: int = 8, width: int = 8192) -> None:
        super().__init__()
        self.layers = nn.Sequential(*(nn.Linear(width, width) for _ in range(layers)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def peak_rss_bytes() -> int:
    """The process's RSS high-water mark. VmHWM belongs to this address space; ru_maxrss is
    inherited across fork+exec on Linux, so a child would start at its parent's peak."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux; best effort elsewhere


def write_checkpoint(path: str, layers: int, width: int) -> int:
    """Save a state dict layer by layer, so the writer never holds more than one layer twice."""
    state = {}
    generator = torch.Generator().manual_seed(0)
    for index in range(layers):
        state[f"layers.{index}.weight"] = torch.empty(width, width).uniform_(-0.01, 0.01, generator=generator)
        state[f"layers.{index}.bias"] = torch.zeros(width)
    torch.save(state, path)
    return sum(t.numel() * t.element_size() for t in state.values())


def child(mode: str, path: str, layers: int, width: int, device: str) -> dict[str, float]:
    import ckptview
    from ckptview.inference import load_model
    from ckptview.inference.devices import synchronize

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    target = torch.device(device)
    if target.type == "cuda":
        torch.empty(1, device=target)  # the CUDA context is not the model's memory
        torch.cuda.reset_peak_memory_stats(target)
    baseline = peak_rss_bytes()
    start = time.perf_counter()
    if mode == "naive":
        model = Net(layers, width).to(target)
        state = torch.load(path, weights_only=True, map_location=target)
        model.load_state_dict(state)
        del state
    else:
        with ckptview.open(path) as ckpt:
            model = load_model(ckpt, lambda: Net(layers, width), device=target).model
    synchronize(target)
    seconds = time.perf_counter() - start
    checksum = float(model.layers[0].weight[:4, :4].sum())
    gpu_peak = torch.cuda.max_memory_allocated(target) / GIB if target.type == "cuda" else None
    return {"mode": mode, "baseline_rss_gib": baseline / GIB, "peak_rss_gib": peak_rss_bytes() / GIB,
            "rise_gib": (peak_rss_bytes() - baseline) / GIB, "gpu_peak_gib": gpu_peak, "seconds": seconds,
            "checksum": checksum}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=8192)
    parser.add_argument("--dir", default=None, help="where to write the checkpoint (default: a temp dir)")
    parser.add_argument("--device", default="cpu", help="where the model is loaded: cpu or cuda")
    parser.add_argument("--child", choices=("naive", "meta"), help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.path, args.layers, args.width, args.device)))
        return
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        path = os.path.join(folder, "big.pt")
        weight_bytes = write_checkpoint(path, args.layers, args.width)
        print(f"checkpoint: {weight_bytes / GIB:.2f} GiB of weights ({args.layers} x Linear({args.width}, {args.width}))")
        results = []
        for mode in ("naive", "meta"):
            completed = subprocess.run(
                [sys.executable, __file__, "--child", mode, "--path", path, "--layers", str(args.layers),
                 "--width", str(args.width), "--device", args.device], capture_output=True, text=True, check=True)
            results.append(json.loads(completed.stdout.strip().splitlines()[-1]))
    gpu = args.device != "cpu"
    print(f"{'path':<8}{'peak RSS rise':>15}{'copies':>9}{'load time':>12}{'peak RSS':>11}"
          + (f"{'GPU peak':>12}{'GPU copies':>12}" if gpu else ""))
    for row in results:
        copies = row["rise_gib"] * GIB / weight_bytes
        line = (f"{row['mode']:<8}{row['rise_gib']:>11.2f} GiB{copies:>9.2f}{row['seconds']:>10.1f} s"
                f"{row['peak_rss_gib']:>7.2f} GiB")
        if gpu and row["gpu_peak_gib"] is not None:
            line += f"{row['gpu_peak_gib']:>8.2f} GiB{row['gpu_peak_gib'] * GIB / weight_bytes:>12.2f}"
        print(line)
    assert results[0]["checksum"] == results[1]["checksum"], "both paths must load the same weights"


if __name__ == "__main__":
    main()
