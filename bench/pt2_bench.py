"""
How fast does a torch.export program (`.pt2`) list? On an ~830 MiB GPT-shaped program (12 blocks of
attention and MLP, float32), side by side in one run:

- open + list every weight: `ckptview.open` (the archive's JSON tables, the graph's op counts and
  every check `scan` needs) vs `torch.export.load(path).state_dict` (what a user would call), time
  and the process's peak RSS growth;
- `ckptview scan` as a whole process vs `python -c "import torch; torch.export.load(path)"`.

Each measurement runs in a fresh subprocess; for the in-process figures the imports (torch in both)
come before the baseline. The program is exported here into a temp dir, never the repo.

    python bench/pt2_bench.py [--dir /tmp/somewhere] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

_OPEN = r"""
import json, sys, time, warnings
import torch, ckptview
warnings.simplefilter("ignore")
path, method = sys.argv[1:3]
def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(key + ":")) / 1024
base = status("VmRSS")
start = time.perf_counter()
if method == "ckptview":
    with ckptview.open(path) as ckpt:
        listing = [(e.name, e.shape, e.dtype) for e in ckpt.tensors()]
else:
    state = torch.export.load(path).state_dict
    listing = [(k, tuple(v.shape), v.dtype) for k, v in state.items()]
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "extra_rss_mb": max(0.0, status("VmHWM") - base), "tensors": len(listing)}))
"""


class _Block(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.qkv, self.proj = nn.Linear(hidden, 3 * hidden), nn.Linear(hidden, hidden)
        self.up, self.down = nn.Linear(hidden, 4 * hidden), nn.Linear(4 * hidden, hidden)
        self.heads = 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, hidden = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attended = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, length, hidden))
        return x + self.down(nn.functional.gelu(self.up(self.norm2(x))))


class _GPT(nn.Module):
    def __init__(self, layers: int = 12, hidden: int = 1024, vocab: int = 32000) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList(_Block(hidden) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def _run(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(args, capture_output=True, check=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", help="where to write the program (default: a temp dir, removed afterwards)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "gpt.pt2"
        start = time.perf_counter()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.export.save(torch.export.export(_GPT().eval(), (torch.randint(0, 32000, (1, 16)),)), path)
        print(f"exported {path.stat().st_size / 2**20:,.0f} MiB in {time.perf_counter() - start:.0f}s "
              "(page cache warm)\n")
        results = {}
        for method in ("ckptview", "torch.export.load"):
            runs = [json.loads(subprocess.run([sys.executable, "-c", _OPEN, str(path), method], capture_output=True,
                                              text=True, check=True).stdout) for _ in range(args.repeat)]
            results[method] = {"seconds": statistics.median(r["seconds"] for r in runs),
                               "rss": max(r["extra_rss_mb"] for r in runs), "tensors": runs[0]["tensors"]}
        print(f"{'open + list':<24} {'tensors':>7} {'seconds':>9} {'extra RSS':>10} {'ckptview faster by':>19}")
        ours = results["ckptview"]["seconds"]
        for method, r in results.items():
            ratio = "" if method == "ckptview" else f"{r['seconds'] / ours:,.1f}x"
            print(f"{method:<24} {r['tensors']:>7} {r['seconds']:>9.4f} {r['rss']:>8.1f}MB {ratio:>19}")
        scan = statistics.median(_run([sys.executable, "-m", "ckptview", "scan", str(path)])
                                 for _ in range(args.repeat))
        load = statistics.median(_run([sys.executable, "-c", f"import torch; torch.export.load({str(path)!r})"])
                                 for _ in range(args.repeat))
        print(f"\nwhole process: ckptview scan {scan:.3f}s, python -c 'torch.export.load(...)' {load:.3f}s "
              f"({load / scan:,.1f}x)")


if __name__ == "__main__":
    main()
