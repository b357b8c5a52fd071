"""
How fast does a GGUF file with a large tokenizer open? A llama-shaped GGUF with a 151,936-token
vocabulary (Qwen2's size: tokens, scores, token types and ~150,000 merges in the metadata) and
8 blocks of Q8_0/Q4_0/F16 tensors, side by side in one run:

- ckptview.open + list the tensors (names, shapes, GGML types) and the metadata table,
- gguf.GGUFReader (the gguf package's own reader) + the same listing.

Each runs in a fresh process with `gguf` and `ckptview` imported before the timer (both need
the package's tables; its import is reported apart), rounds interleaved, median of --repeat.

    python bench/gguf_bench.py [--dir /tmp/somewhere] [--repeat 7]
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

VOCAB = 151_936
BLOCKS = 8
DIM = 512

_PRELUDE = r"""
import json, sys, time
import gguf, ckptview
path = sys.argv[1]
with open(path, "rb") as f:  # warm page cache for both: this compares parsing, not the disk
    while f.read(16 << 20):
        pass
start = time.perf_counter()
"""
METHODS = {
    "ckptview.open + list": r"""
with ckptview.open(path) as ckpt:
    listed = [(e.name, e.shape, e.encoding or str(e.dtype)) for e in ckpt.tensors()]
    keys = [row["key"] for row in ckpt.details["metadata"]]
""",
    "gguf.GGUFReader + list": r"""
reader = gguf.GGUFReader(path)
listed = [(t.name, tuple(reversed(t.shape.tolist())), t.tensor_type.name) for t in reader.tensors]
keys = list(reader.fields)
""",
}
_REPORT = r"""
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "tensors": len(listed), "keys": len(keys)}))
"""
_IMPORT = r"""
import json, time
t0 = time.perf_counter()
import gguf
print(json.dumps({"seconds": time.perf_counter() - t0}))
"""


def make_gguf(path: Path) -> Path:
    import numpy as np
    import gguf
    from gguf.quants import quantize

    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_block_count(BLOCKS)
    writer.add_embedding_length(DIM)
    writer.add_context_length(4096)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"tok{i}_{'x' * (i % 7)}" for i in range(VOCAB)])
    writer.add_token_scores([float(i) for i in range(VOCAB)])
    writer.add_token_types([1] * VOCAB)
    writer.add_token_merges([f"t{i} o{i}" for i in range(VOCAB - 256)])
    writer.add_tensor("token_embd.weight", rng.standard_normal((4096, DIM)).astype(np.float16))
    for block in range(BLOCKS):
        for name, qtype in (("attn_q", gguf.GGMLQuantizationType.Q8_0), ("attn_k", gguf.GGMLQuantizationType.Q4_0),
                            ("attn_v", gguf.GGMLQuantizationType.Q4_0), ("attn_output", gguf.GGMLQuantizationType.Q8_0),
                            ("ffn_up", gguf.GGMLQuantizationType.Q4_0), ("ffn_down", gguf.GGMLQuantizationType.Q4_0)):
            data = quantize(rng.standard_normal((DIM, DIM)).astype(np.float32), qtype)
            writer.add_tensor(f"blk.{block}.{name}.weight", data, raw_dtype=qtype)
        writer.add_tensor(f"blk.{block}.attn_norm.weight", np.ones(DIM, np.float32))
    writer.add_tensor("output_norm.weight", np.ones(DIM, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def run(code: str, path: Path) -> dict[str, float]:
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", help="where to write the file (default: a temp dir, removed afterwards)")
    parser.add_argument("--repeat", type=int, default=7, help="rounds (median)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        t0 = time.perf_counter()
        path = make_gguf(Path(tmp) / "vocab150k.gguf")
        print(f"wrote {path.name} ({path.stat().st_size / 2**20:.1f} MiB, {VOCAB:,}-token vocabulary, "
              f"{BLOCKS * 7 + 2} tensors) in {time.perf_counter() - t0:.0f}s\n")
        times: dict[str, list[float]] = {method: [] for method in METHODS}
        counts: dict[str, tuple[int, int]] = {}
        for _ in range(args.repeat):
            for method, code in METHODS.items():
                result = run(_PRELUDE + code + _REPORT, path)
                times[method].append(result["seconds"])
                counts[method] = (int(result["tensors"]), int(result["keys"]))
        imports = statistics.median(run(_IMPORT, path)["seconds"] for _ in range(3))
        ours = statistics.median(times["ckptview.open + list"])
        print(f"{'method':<24} {'seconds':>8} {'tensors':>8} {'keys':>5} {'vs ckptview':>12}")
        for method, values in times.items():
            seconds = statistics.median(values)
            ratio = f"{seconds / ours:.0f}x slower" if seconds > ours * 1.5 else ""
            print(f"{method:<24} {seconds:>8.4f} {counts[method][0]:>8} {counts[method][1]:>5} {ratio:>12}")
        print(f"\n(import gguf, paid once by both, not in the rows: {imports:.3f}s; GGUFReader's key count includes "
              "its 3 header pseudo-fields)")


if __name__ == "__main__":
    main()
