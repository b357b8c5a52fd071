"""
A structure-aware fuzzer for ckptview's readers.

Families of generated inputs: pickle opcode sequences (BUILD, INST, OBJ, STACK_GLOBAL, EXT*, PERSID,
FRAME, ... with globals drawn from the allow-list, dangerous names and dotted names) inside torch
zips, legacy streams and plain pickles; zip structures with repeated, lying and re-compressed
entries; safetensors headers; shard indexes; byte-level mutations of real files of every format.

Each input is handed to a long-lived worker process that opens it, lists, scans, computes
statistics, the module tree and `info`; the properties checked are:
- nothing but a CkptviewError comes out (the CLI exits 0, 1 or 3);
- no signal kills the worker, no input takes longer than `--timeout` seconds;
- the worker's peak RSS stays under its baseline plus `--memory-mb`;
- the input's bytes are unchanged, and no file descriptor is left open;
- a real file read after every input reads the same (one file never changes how the next is read);
- for pickle-bearing inputs, every global torch.load(weights_only=False) would look up (observed by
  tests/torch_oracle.py in its own worker) beyond the allow-list is named by `scan`.

`make fuzz` runs it for FUZZ_MINUTES (default 30); `make test` runs a fixed seed over 1,500 inputs (tests/test_fuzz.py).
Run: python tests/fuzz.py --seconds 1800 [--seed N] [--keep DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import pickle
import pickletools
import random
import selectors
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import hostile_files as hostile  # noqa: E402

# --- generators ----------------------------------------------------------------------------------

_DANGEROUS = [("os", "system"), ("posix", "system"), ("builtins", "eval"), ("builtins", "exec"),
              ("subprocess", "Popen"), ("pathlib", "os.system"), ("torch", "_utils.os.system"),
              ("torch.distributed.checkpoint.filesystem", "os.system"), ("builtins", "getattr"),
              ("__builtin__", "eval"), ("copy_reg", "_reconstructor"), ("torch.tensor", "_rebuild_from_type_v2"),
              ("collections", "OrderedDict.__init__.__globals__"), ("torch._utils", "_rebuild_tensor_v2.__globals__")]


def _allowed_names() -> list[tuple[str, str]]:
    from ckptview.readers.unpickler import _allowed

    return [tuple(name.rsplit(".", 1)) for name in _allowed()]  # type: ignore[misc]


class Generator:
    def __init__(self, rng: random.Random, seeds: dict[str, bytes]) -> None:
        self.rng = rng
        self.seeds = seeds
        self.allowed = _allowed_names()

    # pickles ------------------------------------------------------------------------------------
    def _global(self) -> bytes:
        module, name = self.rng.choice(self.allowed if self.rng.random() < 0.7 else _DANGEROUS)
        if self.rng.random() < 0.4 or "." in name:
            return hostile.stack_global(module, name)
        return hostile.global_op(module, name)

    def _atom(self) -> bytes:
        r = self.rng
        return r.choice([
            lambda: b"K" + bytes([r.randrange(256)]),
            lambda: b"J" + struct.pack("<i", r.choice([0, 1, -1, 2**31 - 1, -2**31, r.randrange(-999, 999)])),
            lambda: b"\x8a\x08" + struct.pack("<q", r.choice([2**62, -1, 2**40, 7])),
            lambda: hostile.text(r.choice(["storage", "cpu", "cuda:0", "0", "1", "w", "dtype", "_metadata",
                                           "items", "__dict__", "\x1b[2J", "a\nb", "x" * 300])),
            lambda: b"N", lambda: b"\x88", lambda: b"\x89", lambda: b"}", lambda: b"]", lambda: b")",
            lambda: b"G" + struct.pack(">d", r.choice([0.5, float("nan"), 1e308])),
            lambda: b"C" + bytes([3]) + b"abc",
            lambda: b"\x8e" + struct.pack("<Q", r.choice([3, 2**40, 2**63 - 1])) + b"abc",
            lambda: self._global(),
            lambda: hostile.tensor_ops(r.choice(["0", "1", "9"]), r.choice([0, 1, 4, 2**30]),
                                       self._global() if r.random() < 0.2 else None),
        ])()

    _OPS = [b"(", b"t", b"\x85", b"\x86", b"\x87", b"l", b"d", b"a", b"e", b"s", b"u", b"b", b"R", b"0", b"2",
            b"1", b"\x81", b"\x92", b"\x93", b"Q", b"\x94", b"h\x00", b"q\x00", b"r\x00\x00\x00\x00",
            b"\x82\x01", b"\x83\x01\x00", b"\x84\x01\x00\x00\x00", b"i", b"o", b"\x90", b"\x91", b"\x95",
            b"P", b"\x97", b"\x98", b"\x8f", b"\x96"]

    def _value(self, depth: int = 0) -> object:
        r = self.rng
        if depth > 3 or r.random() < 0.3:
            return r.choice([0, 1.5, "x", None, True, b"\x00", 2**70, (1, 2), "\x1b[2J"])
        kind = r.choice(["dict", "list", "tuple", "ordered"])
        items = [self._value(depth + 1) for _ in range(r.randint(0, 4))]
        if kind == "list":
            return items
        if kind == "tuple":
            return tuple(items)
        from collections import OrderedDict

        pairs = [(f"k{i}", v) for i, v in enumerate(items)]
        return OrderedDict(pairs) if kind == "ordered" else dict(pairs)

    def valid_pickle(self) -> bytes:
        """A well-formed pickle of plain data that first calls a global (allowed, dangerous or dotted)."""
        r = self.rng
        value = self._value()
        ops = b"".join(hostile.call_and_drop(self._global(), r.choice(["true", "x", ""]))
                       for _ in range(r.randint(0, 2)))
        return b"\x80" + bytes([r.choice([2, 4])]) + ops + hostile.body(value) + b"."

    def framed(self, data: bytes) -> bytes:
        """`data` (a pickle, from its 2-byte PROTO on) cut into protocol-4 frames, with unframed stretches between:
        at opcode boundaries, as pickle writes them (read the same by every stream), or now and then
        anywhere (a frame that splits an opcode, which torch.load reads one way or another)."""
        r = self.rng
        try:
            cuts = [position for _, _, position in pickletools.genops(data)][1:]
        except Exception:  # noqa: BLE001 - damaged: cut anywhere
            cuts = []
        if not cuts or r.random() < 0.2:
            cuts = list(range(2, len(data)))
        chosen = sorted(set(r.sample(cuts, min(len(cuts), r.randint(1, 5))))) + [len(data)]
        parts, start = [b"\x80\x04"], 2
        for cut in chosen:
            if cut > start:
                chunk = data[start:cut]
                parts.append(chunk if r.random() < 0.25 else b"\x95" + struct.pack("<Q", len(chunk)) + chunk)
                start = cut
        return b"".join(parts)

    def pickle_bytes(self) -> bytes:
        r = self.rng
        if r.random() < 0.4:
            if r.random() < 0.3:
                return self.framed(self.valid_pickle())
            # protocols 0 and 1 write no PROTO opcode, and torch.load unpickles such a file all the same
            return self.valid_pickle()[2:] if r.random() < 0.2 else self.valid_pickle()
        parts = [r.choice([b"", b"\x80\x01", b"\x80\x02", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05"])]
        for _ in range(r.randint(1, 40)):
            if r.random() < 0.5:
                parts.append(self._atom())
            else:
                op = r.choice(self._OPS)
                if op == b"i":
                    op = b"i" + r.choice([b"os\nsystem\n", b"collections\nOrderedDict\n", b"torch\nFloatStorage\n"])
                elif op == b"\x95":
                    op = b"\x95" + struct.pack("<Q", r.choice([1, 8, 2**40]))
                elif op == b"P":
                    op = b"P" + r.choice([b"storage\n", b"0\n", b"\n"])
                parts.append(op)
        if r.random() < 0.5:  # end with something valid-looking
            parts.append(b"}" + hostile.text("w") + hostile.tensor_ops("0", 4) + b"s")
        parts.append(b".")
        return b"".join(parts)

    def pickle_file(self) -> tuple[str, bytes]:
        r = self.rng
        data = self.pickle_bytes()
        where = r.choice(["zip", "legacy", "plain"])
        if where == "plain":
            return "pickle-plain", data
        if where == "legacy":
            parts = hostile.legacy_pickles(self.seeds["legacy"])
            parts[r.choice([0, 1, 2, 3, 4])] = data
            return "pickle-legacy", b"".join(parts)
        buffer = io.BytesIO()
        members = [("archive/data.pkl", data), ("archive/byteorder", b"little"), ("archive/data/0", bytes(16)),
                   ("archive/version", b"3\n")]
        with zipfile.ZipFile(buffer, "w") as archive:
            for name, content in members:
                archive.writestr(zipfile.ZipInfo(name), content)
        return "pickle-zip", buffer.getvalue()

    # zips ---------------------------------------------------------------------------------------
    def zip_structure(self) -> tuple[str, bytes]:
        r = self.rng
        members = hostile.zip_members(self.seeds[r.choice(["zip", "zip-model"])])
        for _ in range(r.randint(1, 3)):
            choice = r.random()
            index = r.randrange(len(members))
            if choice < 0.2:
                members.insert(r.randrange(len(members) + 1), members[index])  # a repeated name
            elif choice < 0.35:
                members[index] = ("other/" + members[index][0].split("/", 1)[-1], members[index][1])
            elif choice < 0.5:
                members[index] = (members[index][0], self.pickle_bytes())
            elif choice < 0.6:
                members.insert(0, ("evil/data.pkl", self.pickle_bytes()))
            elif choice < 0.7:
                members[index] = (members[index][0], members[index][1][: r.randrange(len(members[index][1]) + 1)])
            else:
                members.append((f"archive/data/{r.randrange(9)}", bytes(r.randrange(64))))
        buffer = io.BytesIO()
        compression = r.choice([zipfile.ZIP_STORED] * 3 + [zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
        import warnings

        with warnings.catch_warnings(), zipfile.ZipFile(buffer, "w") as archive:
            warnings.simplefilter("ignore")
            for name, content in members:
                archive.writestr(zipfile.ZipInfo(name), content, compress_type=compression)
        data = bytearray(buffer.getvalue())
        if r.random() < 0.3:  # a lying field in a central directory or local header
            headers = [i for i in range(len(data) - 4) if data[i:i + 4] in (b"PK\x01\x02", b"PK\x03\x04")]
            at = r.choice(headers) + r.choice([6, 8, 10, 18, 22, 24, 26, 28])
            data[at:at + 4] = struct.pack("<I", r.choice([0, 1, 2**31, 2**32 - 1, r.randrange(2**20)]))
        return "zip", bytes(data)

    # safetensors ---------------------------------------------------------------------------------
    def safetensors_header(self) -> tuple[str, bytes]:
        r = self.rng
        header: dict[str, object] = {}
        offset = 0
        for i in range(r.randint(0, 6)):
            shape = [r.choice([0, 1, 2, 3, 2**31, -1]) for _ in range(r.randint(0, 3))]
            numel = 1
            for d in shape:
                numel *= max(d, 0)
            size = numel * 4 if r.random() < 0.8 else r.randrange(64)
            spec: dict[str, object] = {"dtype": r.choice(["F32", "F32", "BF16", "I64", ["F32"], {"a": 1}, 7, "Q4"]),
                                       "shape": shape if r.random() < 0.9 else "x",
                                       "data_offsets": [offset, offset + size] if r.random() < 0.9 else [5, 1]}
            header[r.choice([f"t{i}", "\x1b[2Jname\n", "__metadata__" if i else "a.b"])] = spec
            offset += max(size, 0)
        if r.random() < 0.3:
            header["__metadata__"] = r.choice([{"format": "pt"}, [1, 2], {"x": {"y": [1]}}, "s"])
        raw = json.dumps(header).encode()
        if r.random() < 0.1:
            raw = b'{"__metadata__":' + b"[" * 5000 + b"]" * 5000 + b"}"
        length = len(raw) if r.random() < 0.9 else r.choice([0, 2**63 - 1, len(raw) + 9])
        return "safetensors", struct.pack("<Q", length) + raw + bytes(min(offset, 1 << 16) if offset > 0 else 0)

    # shard indexes ------------------------------------------------------------------------------------
    def shard_index(self) -> tuple[str, bytes]:
        """An index whose weight_map names shards beside it, outside its folder, itself, or nonsense."""
        r = self.rng
        targets = ["shard-a.safetensors", "shard-b.pt", "../outside.safetensors", "/etc/passwd", "link-out",
                   "index-self.json", "sub/../shard-a.safetensors", "missing.safetensors", "", 7, None, ["x"],
                   "shard-a.safetensors\x00", "\x1b[2J.safetensors", "."]
        weight_map = {r.choice(["w", "0.weight", "a\nb", "1.bias"]) + str(i): r.choice(targets)
                      for i in range(r.randint(0, 5))}
        index: object = {"metadata": {"total_size": r.choice([0, -1, "x"])}, "weight_map": weight_map}
        if r.random() < 0.1:
            index = r.choice([[weight_map], {"weight_map": [1, 2]}, "s"])
        return "shard-index", json.dumps(index).encode()

    # mutations of real files of every format ------------------------------------------------------
    def mutation(self) -> tuple[str, bytes]:
        r = self.rng
        kind = r.choice(sorted(self.seeds))
        data = bytearray(self.seeds[kind])
        for _ in range(r.randint(1, 6)):
            choice = r.random()
            if choice < 0.5 and data:
                data[r.randrange(len(data))] = r.randrange(256)
            elif choice < 0.7 and data:
                at = r.randrange(len(data))
                data[at:at + 8] = struct.pack("<Q", r.choice([0, 1, 2**31, 2**62, 2**64 - 1]))[: len(data) - at]
            elif choice < 0.85:
                del data[r.randrange(len(data) + 1):]
            else:
                at = r.randrange(len(data) + 1)
                data[at:at] = bytes(r.randrange(256) for _ in range(r.randint(1, 16)))
        return f"mutate-{kind}", bytes(data)


def make_seeds(folder: Path) -> dict[str, bytes]:
    """Real files of every format ckptview reads, written by their own libraries."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.Linear(4, 2))
    seeds = {"zip": hostile.saved_zip(model.state_dict()), "legacy": hostile.saved_legacy(model.state_dict()),
             "zip-model": hostile.saved_zip({"model": model.state_dict(), "epoch": 3,
                                             "optimizer": torch.optim.Adam(model.parameters()).state_dict()})}
    # the pre-1.0 tar format torch.load still reads: its members' pickles, stepped through as torch does
    seeds["legacy-tar"] = hostile.legacy_tar(folder, folder / "never-written", None).read_bytes()
    save_file(model.state_dict(), folder / "s.safetensors")
    seeds["safetensors"] = (folder / "s.safetensors").read_bytes()
    # a torch.export program: JSON tables, raw weights and a nested torch.save archive of its example inputs
    torch.export.save(torch.export.export(model.eval(), (torch.randn(1, 3, 3, 3),)), folder / "m.pt2")
    seeds["pt2"] = (folder / "m.pt2").read_bytes()
    buffer = io.BytesIO()
    np.savez_compressed(buffer, a=np.arange(12.0).reshape(3, 4), b=np.ones(3, dtype=np.int8))
    seeds["npz"] = buffer.getvalue()
    buffer = io.BytesIO()
    np.save(buffer, np.arange(6, dtype=np.float16))
    seeds["npy"] = buffer.getvalue()
    # object arrays: their elements are a pickle, which numpy.load(allow_pickle=True) unpickles
    objects = np.array([{"lr": 0.1}, "text", 3, None], dtype=object)
    buffer = io.BytesIO()
    np.save(buffer, objects, allow_pickle=True)
    seeds["npy-object"] = buffer.getvalue()
    buffer = io.BytesIO()
    np.savez(buffer, a=np.arange(4.0), objects=objects)
    seeds["npz-object"] = buffer.getvalue()
    # numpy arrays inside a plain pickle (a Detectron2 `.pkl`): protocol 2 BUILDs each array's bytes,
    # protocol 5 calls numpy._core.numeric._frombuffer with them (Fortran and permuted orders too)
    arrays = {"model": {"conv.weight": np.arange(24, dtype=np.float32).reshape(2, 3, 4),
                        "fortran": np.asfortranarray(np.ones((2, 3))), "big": np.arange(4, dtype=">i4"),
                        "permuted": np.arange(6, dtype=np.int16).reshape(2, 3).T}, "names": np.array(["a", "b"])}
    for protocol in (2, 5):
        seeds[f"np-pickle-{protocol}"] = pickle.dumps(arrays, protocol=protocol)
    try:
        import gguf

        writer = gguf.GGUFWriter(str(folder / "m.gguf"), "llama")
        writer.add_uint32("llama.block_count", 1)
        writer.add_token_list(["a", "b", "c"])
        writer.add_tensor("blk.0.attn_q.weight", np.ones((4, 32), dtype=np.float16))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        seeds["gguf"] = (folder / "m.gguf").read_bytes()
    except ImportError:
        pass
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper

        weight = numpy_helper.from_array(np.ones((2, 3), dtype=np.float32), "w")
        graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], [weight])
        seeds["onnx"] = helper.make_model(graph).SerializeToString()
        del onnx
    except ImportError:
        pass
    # the formats TensorFlow writes, as the committed fixtures hold them (made once by the real libraries)
    for fixture in sorted((HERE / "fixtures" / "tf").glob("*")):
        if fixture.is_file() and fixture.suffix in (".tflite", ".h5", ".keras"):
            seeds[fixture.name] = fixture.read_bytes()
    return seeds


def _shard_neighbours(work: Path, seeds: dict[str, bytes]) -> None:
    """The files generated shard indexes name: two real shards, a file outside, a link leading out."""
    inputs = work / "inputs"
    inputs.mkdir()
    (inputs / "shard-a.safetensors").write_bytes(seeds["safetensors"])
    (inputs / "shard-b.pt").write_bytes(seeds["zip"])
    (work / "outside.safetensors").write_bytes(seeds["safetensors"])
    (inputs / "link-out").symlink_to(work / "outside.safetensors")
    (inputs / "index-self.json").write_text('{"weight_map": {"w": "index-self.json"}}')
    (inputs / "sub").mkdir()


# --- the workers -------------------------------------------------------------------------------

_WORKER = r"""
import contextlib, io, json, os, resource, sys, traceback
sys.path.insert(0, sys.argv[1])
import ckptview
from ckptview.cli import main as cli
from ckptview.errors import CkptviewError
canary_path = sys.argv[2]


def canary():
    # a real file read after every input: one file must never change how the next is read
    with ckptview.open(canary_path) as ckpt:
        return [(e.name, str(e.dtype), e.shape, e.load().double().sum().item()) for e in ckpt.tensors()]


expected = canary()
descriptors = len(os.listdir("/proc/self/fd"))
print(json.dumps({"ready": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}), flush=True)
for line in sys.stdin:
    path = line.rstrip("\n")
    answer = {"imports": None, "problem": None}
    try:
        try:
            with ckptview.open(path) as ckpt:
                answer["imports"] = sorted(i.name for i in ckpt.pickle_imports)
                answer["verdict"] = "code" if ckpt.needs_trust or ckpt.format == "torchscript" else "safe"
                ckpt.tensors()
                ckptview.stats(ckpt)
                ckptview.module_tree(ckpt)
                for entry in ckpt.tensors()[:8]:
                    try:
                        entry.load()
                    except CkptviewError:
                        pass
        except CkptviewError as exc:
            named = getattr(exc, "named_globals", None)
            # refused, but naming what its pickles import before the point of failure: scan exits 3 with them
            answer["verdict"] = "code" if named else "error"
            answer["imports"] = sorted(i.name for i in named) if named else None
            if "\n" in str(exc):
                answer["problem"] = "a CkptviewError message spans lines"
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            codes = [cli([command, path]) for command in ("info", "scan", "tensors")]
        if any(code not in (0, 1, 3) for code in codes):
            answer["problem"] = f"CLI exit codes {codes}"
        if "\x1b" in out.getvalue():
            answer["problem"] = "a raw escape character reached the terminal"
        if canary() != expected:
            answer["problem"] = "after this input, a normal file reads differently (the process was poisoned)"
        if len(os.listdir("/proc/self/fd")) > descriptors + 8:
            answer["problem"] = "this input left file descriptors open"
            descriptors = len(os.listdir("/proc/self/fd"))
    except BaseException as exc:
        answer["problem"] = f"{type(exc).__name__}: {traceback.format_exc()[-1500:]}"
    answer["peak_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps(answer), flush=True)
"""

_ORACLE = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import torch_oracle
print(json.dumps({"ready": 0}), flush=True)
for line in sys.stdin:
    torch_oracle._LOOKUPS.clear()
    print(json.dumps(torch_oracle.observe(line.rstrip("\n"))), flush=True)
"""


class Worker:
    """A process that answers one JSON line per path written to it; restarted after a hang or crash."""

    def __init__(self, code: str, env: dict[str, str], *args: str) -> None:
        self.code, self.env, self.args = code, env, args
        self.process: subprocess.Popen[str] | None = None
        self.baseline_kb = 0

    def start(self) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", self.code, str(HERE), *self.args], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=self.env,
                                        cwd=HERE.parent)
        self.baseline_kb = int(self._read(120)["ready"])

    def _read(self, timeout: float) -> dict[str, object]:
        assert self.process is not None and self.process.stdout is not None
        selector = selectors.DefaultSelector()
        selector.register(self.process.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not selector.select(left):
                raise TimeoutError
            line = self.process.stdout.readline()
            if not line:
                raise ChildProcessError(self.process.wait())
            if line.startswith("{"):
                return json.loads(line)

    def ask(self, path: str, timeout: float) -> dict[str, object]:
        if self.process is None or self.process.poll() is not None:
            self.start()
        assert self.process is not None and self.process.stdin is not None
        self.process.stdin.write(path + "\n")
        self.process.stdin.flush()
        return self._read(timeout)

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


def run(seconds: float, seed: int, timeout: float = 20.0, memory_mb: float = 300.0, keep: Path | None = None,
        oracle_every: int = 1, log=print, max_inputs: int | None = None) -> dict[str, object]:
    """Fuzz for `seconds`; return counts per family and the violations found (each with its input)."""
    from ckptview.readers.dcp import _DCP_CLASSES
    from ckptview.readers.unpickler import _allowed
    from ckptview.readers.weights_only import TORCH_SAFE_CLASSES

    allowed = set(_allowed())
    torch_own = set(TORCH_SAFE_CLASSES)
    rng = random.Random(seed)
    work = Path(tempfile.mkdtemp(prefix="ckptview-fuzz-"))
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    generator = Generator(rng, make_seeds(work))
    canary = work / "canary.pt"
    canary.write_bytes(generator.seeds["zip-model"])
    target, oracle = Worker(_WORKER, env, str(canary)), Worker(_ORACLE, env)
    families = [generator.pickle_file, generator.zip_structure, generator.safetensors_header, generator.shard_index,
                generator.mutation]
    _shard_neighbours(work, generator.seeds)
    counts: Counter[str] = Counter()
    violations: list[dict[str, object]] = []
    started = time.monotonic()
    number = 0
    try:
        while time.monotonic() - started < seconds and (max_inputs is None or number < max_inputs):
            number += 1
            family, data = rng.choice(families)()
            path = work / "inputs" / f"input-{number}.bin"
            path.write_bytes(data)
            digest = hashlib.sha256(data).hexdigest()
            counts[family] += 1
            problem = None
            answer: dict[str, object] = {}
            try:
                answer = target.ask(str(path), timeout)
                problem = answer.get("problem")
                if not problem and (int(answer["peak_kb"]) - target.baseline_kb) / 1024 > memory_mb:
                    problem = f"peak RSS grew by {(int(answer['peak_kb']) - target.baseline_kb) / 1024:.0f} MB"
                    target.kill()  # a fresh baseline for the next input
            except TimeoutError:
                problem = f"no answer within {timeout} s"
                target.kill()
            except ChildProcessError as exc:
                problem = f"the worker died (exit {exc.args[0]}: a signal if negative)"
                target.kill()
            counts["opened" if answer.get("verdict") in ("safe", "code") else "refused"] += 1
            if hashlib.sha256(path.read_bytes()).hexdigest() != digest:
                problem = "the input's bytes changed"
            pickle_bearing = family.startswith(("pickle", "zip", "mutate-zip", "mutate-legacy", "mutate-np"))
            # refused files too: one torch.load takes foreign globals from must name them (scan exits 3)
            if not problem and pickle_bearing and number % oracle_every == 0:
                counts["oracle-checked"] += 1
                try:
                    observed = oracle.ask(str(path), 60)
                    # torch's own classes (DCP's, DTensor's) are not foreign: scan counts them as torch's
                    foreign = set(observed["lookups"]) - allowed - _DCP_CLASSES - torch_own  # type: ignore[arg-type]
                    named = set(answer["imports"] or [])  # type: ignore[arg-type]
                    # "<unknown: …>": torch's reading depends on how the bytes reach it; any global counts
                    missing = set() if any(n.startswith("<unknown") for n in named) else foreign - named
                    if missing:
                        problem = f"its loader (torch.load, numpy.load) looks up {sorted(missing)}, which scan does not name"
                    if observed["torchscript"] and answer.get("verdict") == "safe":
                        problem = "a TorchScript archive scanned as safe"
                except (TimeoutError, ChildProcessError):
                    oracle.kill()
            if problem:
                saved = None
                if keep is not None:
                    keep.mkdir(parents=True, exist_ok=True)
                    saved = keep / f"{family}-{digest[:12]}.bin"
                    shutil.copy(path, saved)
                violations.append({"family": family, "problem": problem, "input": str(saved or path)})
                log(f"VIOLATION [{family}] {problem} ({saved or path})")
            path.unlink()
            if number % 200 == 0:
                log(f"{time.monotonic() - started:7.0f} s  {number} inputs  {dict(counts)}  violations {len(violations)}")
    finally:
        target.kill()
        oracle.kill()
        shutil.rmtree(work, ignore_errors=True)
    return {"inputs": number, "per_family": dict(counts), "violations": violations, "seconds": seconds, "seed": seed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=1800)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds one input may take")
    parser.add_argument("--memory-mb", type=float, default=300.0, help="peak RSS growth allowed over the baseline")
    parser.add_argument("--keep", type=Path, default=Path("test-artifacts/fuzz"), help="where failing inputs go")
    parser.add_argument("--report", type=Path, default=None, help="write the summary as JSON here")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    print(f"fuzzing for {args.seconds:.0f} s with seed {seed}")
    summary = run(args.seconds, seed, args.timeout, args.memory_mb, args.keep)
    print(json.dumps({k: v for k, v in summary.items() if k != "violations"}, indent=2))
    print(f"{len(summary['violations'])} property violations")
    if args.report:
        args.report.write_text(json.dumps(summary, indent=2))
    return 1 if summary["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
