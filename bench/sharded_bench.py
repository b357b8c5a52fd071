"""
Opening a 100 GB sharded safetensors set (sparse files: real headers, data regions left as holes,
so it takes almost no disk) with ckptview, side by side with safetensors' own safe_open listing.

    python bench/sharded_bench.py [--dir /tmp/somewhere] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import ckptview
from safetensors import safe_open

HIDDEN, INTERMEDIATE, LAYERS, SHARDS = 8192, 28672, 52, 13  # Llama-70B-shaped layers, ~101 GB
_SIZES = {"BF16": 2}


def write_sparse_set(folder: Path) -> int:
    weight_map, total = {}, 0
    for shard in range(SHARDS):
        file = f"model-{shard + 1:05d}-of-{SHARDS:05d}.safetensors"
        header, offset = {}, 0
        for layer in range(shard * LAYERS // SHARDS, (shard + 1) * LAYERS // SHARDS):
            shapes = {f"self_attn.{p}.weight": [HIDDEN, HIDDEN] for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
            shapes.update({"mlp.gate_proj.weight": [INTERMEDIATE, HIDDEN], "mlp.up_proj.weight": [INTERMEDIATE, HIDDEN],
                           "mlp.down_proj.weight": [HIDDEN, INTERMEDIATE], "input_layernorm.weight": [HIDDEN]})
            for name, shape in shapes.items():
                nbytes = 2 * shape[0] * (shape[1] if len(shape) > 1 else 1)
                header[f"model.layers.{layer}.{name}"] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(folder / file, "wb") as stream:
            stream.write(len(raw).to_bytes(8, "little") + raw)
            stream.truncate(8 + len(raw) + offset)
        weight_map.update({name: file for name in header})
        total += offset
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


def ckptview_listing(folder: Path) -> int:
    with ckptview.open(folder) as ckpt:
        return len([(e.name, e.shape, e.dtype) for e in ckpt.tensors()])


def safe_open_listing(folder: Path) -> int:
    count = 0
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            for name in f.keys():
                sliced = f.get_slice(name)
                count += bool((sliced.get_shape(), sliced.get_dtype()))
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        total = write_sparse_set(folder)
        on_disk = sum(p.stat().st_blocks * 512 for p in folder.iterdir())
        print(f"{SHARDS} shards, {total / 1e9:.1f} GB of tensor data, {on_disk / 1e6:.1f} MB on disk\n")
        for label, listing in (("ckptview.open + list", ckptview_listing), ("safetensors safe_open + list", safe_open_listing)):
            times = []
            for _ in range(args.repeat):
                start = time.perf_counter()
                count = listing(folder)
                times.append(time.perf_counter() - start)
            print(f"{label:<30} {count} tensors  median {statistics.median(times) * 1000:.1f} ms  "
                  f"(min {min(times) * 1000:.1f}, max {max(times) * 1000:.1f})")


if __name__ == "__main__":
    main()
