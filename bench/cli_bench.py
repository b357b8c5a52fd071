"""
How long does a header-only CLI command take as a whole process? `ckptview info`, `tensors --json`
and `scan` side by side with what a user would run instead, `python -c "import torch;
torch.load(path, weights_only=True)"` (and with mmap=True; for safetensors, which torch.load does
not read, `safetensors.torch.load_file` and listing shapes through `safe_open`), on a small .pt, a
~2 GB safetensors file and a 20,000-tensor file; and on a ~400 MB ONNX model and a GGUF file with a
152k-token vocabulary against each format's own reader (`onnx.load(load_external_data=False)`,
`gguf.GGUFReader` listing its tensors). Wall time of the whole process, the interpreter's start
included, median of `--repeat` runs; the ratio is against the faster alternative.

    python bench/cli_bench.py [--dir /tmp/somewhere] [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from gguf_bench import make_gguf  # noqa: E402
from llm_fixture import llm_state_dict, make_llm_checkpoint, make_many_tensors  # noqa: E402
from onnx_bench import write_onnx  # noqa: E402

OURS = {
    "ckptview info": ["-m", "ckptview", "info", "{path}"],
    "ckptview tensors --json": ["-m", "ckptview", "tensors", "--json", "{path}"],
    "ckptview scan": ["-m", "ckptview", "scan", "{path}"],
}
PICKLE_ALTERNATIVES = {
    "torch.load": ["-c", "import sys, torch; torch.load(sys.argv[1], weights_only=True)", "{path}"],
    "torch.load(mmap=True)": ["-c", "import sys, torch; torch.load(sys.argv[1], weights_only=True, mmap=True)", "{path}"],
}
SAFETENSORS_ALTERNATIVES = {
    "safetensors load_file": ["-c", "import sys; from safetensors.torch import load_file; load_file(sys.argv[1])",
                              "{path}"],
    "safetensors safe_open shapes": ["-c", "import sys; from safetensors import safe_open\n"
                                     "with safe_open(sys.argv[1], 'pt') as f: [f.get_slice(k).get_shape() for k in f.keys()]",
                                     "{path}"],
}

ONNX_ALTERNATIVES = {
    "onnx.load": ["-c", "import sys, onnx; onnx.load(sys.argv[1], load_external_data=False)", "{path}"],
}
GGUF_ALTERNATIVES = {
    "gguf.GGUFReader": ["-c", "import sys, gguf; [(t.name, t.shape) for t in gguf.GGUFReader(sys.argv[1]).tensors]",
                        "{path}"],
}
ALTERNATIVES = {".safetensors": SAFETENSORS_ALTERNATIVES, ".onnx": ONNX_ALTERNATIVES, ".gguf": GGUF_ALTERNATIVES}


def make_onnx(path: Path) -> Path:
    import torch

    write_onnx(llm_state_dict(layers=4, hidden=1024, intermediate=2816, vocab=32000, dtype=torch.float32,
                              poison=False), path)
    return path


def run(arguments: list[str], path: Path, repeat: int) -> float:
    seconds = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run([sys.executable, *(a.format(path=path) for a in arguments)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", help="where to write the files (default: a temp dir, removed afterwards)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        files = {"small .pt": make_many_tensors(Path(tmp) / "small.pt", count=50),
                 "2 GB safetensors": make_llm_checkpoint(Path(tmp) / "llm.safetensors"),
                 "20k-tensor .pt": make_many_tensors(Path(tmp) / "many.pt"),
                 "400 MB ONNX": make_onnx(Path(tmp) / "llm.onnx"),
                 "GGUF, 152k vocab": make_gguf(Path(tmp) / "qwen.gguf")}
        print(f"{'file':<18} {'command':<30} {'seconds':>8} {'alternative / this':>19}")
        for label, path in files.items():
            alternatives = ALTERNATIVES.get(path.suffix, PICKLE_ALTERNATIVES)
            theirs = {name: run(command, path, args.repeat) for name, command in alternatives.items()}
            fastest = min(theirs.values())
            for name, command in OURS.items():
                seconds = run(command, path, args.repeat)
                print(f"{label:<18} {name:<30} {seconds:>8.3f} {fastest / seconds:>18.1f}x")
            for name, seconds in theirs.items():
                print(f"{label:<18} {name:<30} {seconds:>8.3f}")


if __name__ == "__main__":
    main()
