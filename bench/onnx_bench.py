"""
How lazy is the ONNX reader? On a ~1.5 GB LLM-shaped ONNX model with every initializer embedded
(float32, 93 tensors, a few with NaN/Inf), side by side in one run:

- open + list every tensor: ckptview.open vs onnx.load(path, load_external_data=False), which
  parses the whole ModelProto and so copies every weight into memory (time and the process's
  peak RSS growth);
- statistics: ckptview.stats over the ONNX file vs over the same weights saved as safetensors
  (warm page cache, methods interleaved per round).

Each measurement runs in a fresh subprocess, imports done before the baseline. The model is
written here (protobuf fields by hand, nodes and tensor headers by onnx) into a temp dir, never
the repo.

    python bench/onnx_bench.py [--dir /tmp/somewhere] [--repeat 5]
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
from llm_fixture import llm_state_dict  # noqa: E402

_OPEN = r"""
import json, sys, time
method = sys.argv[2]
if method == "ckptview":
    import torch, ckptview
else:
    import onnx
path = sys.argv[1]
def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(key + ":")) / 1024
base = status("VmRSS")
start = time.perf_counter()
if method == "ckptview":
    with ckptview.open(path) as ckpt:
        listing = [(e.name, e.shape, e.dtype) for e in ckpt.tensors()]
else:
    model = onnx.load(path, load_external_data=False)
    listing = [(t.name, tuple(t.dims), t.data_type) for t in model.graph.initializer]
seconds = time.perf_counter() - start
# VmHWM: this process image's high-water mark, not inherited from the parent
print(json.dumps({"seconds": seconds, "extra_rss_mb": max(0.0, status("VmHWM") - base), "tensors": len(listing)}))
"""

_STATS = r"""
import json, sys, time
import torch, ckptview
path = sys.argv[1]
# Re-read just before timing: this VM reclaims idle page cache within seconds, so a file read by
# the previous run may be cold again; both files get the same treatment.
with open(path, "rb", buffering=0) as f:
    block = memoryview(bytearray(16 << 20))
    while f.readinto(block):
        pass
del block
with ckptview.open(path) as ckpt:
    start = time.perf_counter()
    result = ckptview.stats(ckpt)
    seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "tensors": len(result.tensors), "nan": sum(t.nan_count for t in result.tensors)}))
"""


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(number: int, wire: int) -> bytes:
    return _varint(number << 3 | wire)


def _message(number: int, payload: bytes) -> bytes:
    return _key(number, 2) + _varint(len(payload)) + payload


def write_onnx(state: dict, path: Path) -> None:
    """A ModelProto with every weight embedded as raw_data, streamed to disk: the tensors are never
    joined into one 1.5 GB bytes object as `onnx.save` would need."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Gather", ["model.embed_tokens.weight", "ids"], ["h"], name="embed")]
    hidden = "h"
    for name in state:
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            nodes.append(helper.make_node("Mul", [hidden, name], [name + ".out"], name=name.removesuffix(".weight")))
        elif name != "model.embed_tokens.weight":
            nodes.append(helper.make_node("Gemm", [hidden, name], [name + ".out"], name=name.removesuffix(".weight"),
                                          transB=1))
        else:
            continue
        hidden = name + ".out"
    graph_head = b"".join(_message(1, node.SerializeToString()) for node in nodes) + _message(2, b"llm")
    graph_head += _message(11, helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"]).SerializeToString())
    graph_head += _message(12, helper.make_tensor_value_info(hidden, TensorProto.FLOAT, None).SerializeToString())
    prefixes = []
    for name, tensor in state.items():
        header = TensorProto(name=name, dims=list(tensor.shape), data_type=TensorProto.FLOAT).SerializeToString()
        nbytes = tensor.numel() * 4
        raw_prefix = _key(9, 2) + _varint(nbytes)
        body = len(header) + len(raw_prefix) + nbytes
        prefixes.append((_key(5, 2) + _varint(body) + header + raw_prefix, tensor))
    graph_length = len(graph_head) + sum(len(prefix) + t.numel() * 4 for prefix, t in prefixes)
    opset = _message(8, helper.make_opsetid("", 21).SerializeToString())
    with open(path, "wb") as out:
        out.write(_key(1, 0) + _varint(onnx.IR_VERSION) + _message(2, b"ckptview-bench"))
        out.write(_key(7, 2) + _varint(graph_length) + graph_head)
        for prefix, tensor in prefixes:
            out.write(prefix)
            out.write(memoryview(tensor.contiguous().numpy()).cast("B"))
        out.write(opset)


def run(code: str, path: Path, method: str = "") -> dict[str, float]:
    done = subprocess.run([sys.executable, "-c", code, str(path), method], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", help="where to write the files (default: a temp dir, removed afterwards)")
    parser.add_argument("--repeat", type=int, default=5, help="rounds (median)")
    args = parser.parse_args()
    import torch
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        t0 = time.perf_counter()
        state = llm_state_dict(layers=10, hidden=1536, intermediate=4096, vocab=32000, dtype=torch.float32)
        model, safetensors = Path(tmp) / "llm.onnx", Path(tmp) / "llm.safetensors"
        write_onnx(state, model)
        save_file(state, str(safetensors))
        count = len(state)
        del state
        size = model.stat().st_size
        print(f"wrote {model.name} ({size / 2**30:.2f} GiB, {count} float32 initializers embedded) and "
              f"{safetensors.name} in {time.perf_counter() - t0:.0f}s; {os.cpu_count()} CPUs, load average "
              f"{os.getloadavg()[0]:.1f}\n")

        opens: dict[str, list[dict[str, float]]] = {"ckptview": [], "onnx.load": []}
        stats: dict[str, list[float]] = {"ONNX": [], "safetensors": []}
        for _ in range(args.repeat):
            for method in opens:
                opens[method].append(run(_OPEN, model, method))
            for label, path in (("ONNX", model), ("safetensors", safetensors)):
                result = run(_STATS, path)
                assert result["tensors"] == count and result["nan"] == 7, result
                stats[label].append(result["seconds"])

        print(f"{'open + list every tensor':<28} {'tensors':>7} {'seconds':>9} {'extra RSS':>10} {'ckptview faster by':>19}")
        ours = statistics.median(r["seconds"] for r in opens["ckptview"])
        for method, runs in opens.items():
            seconds = statistics.median(r["seconds"] for r in runs)
            ratio = "" if method == "ckptview" else f"{seconds / ours:,.0f}x"
            print(f"{method:<28} {runs[0]['tensors']:>7} {seconds:>9.4f} "
                  f"{max(r['extra_rss_mb'] for r in runs):>8.1f}MB {ratio:>19}")
        print(f"\n{'ckptview.stats (warm cache)':<28} {'seconds':>9} {'GB/s':>7} {'vs safetensors':>15}")
        reference = statistics.median(stats["safetensors"])
        for label, runs in stats.items():
            seconds = statistics.median(runs)
            print(f"{label:<28} {seconds:>9.3f} {size / seconds / 1e9:>7.2f} {seconds / reference:>14.2f}x")
        print(f"\n(medians of {args.repeat} rounds, methods interleaved per round)")


if __name__ == "__main__":
    main()
