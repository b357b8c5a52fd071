"""Header-only commands answer without importing torch, numba or pandas, and the dtype names they
use instead agree with the installed torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import ckptview
from ckptview.readers.dtypes import ALIASES, ITEMSIZE, STORAGE_CLASSES, itemsize, torch_dtype

REPO = Path(__file__).resolve().parents[1]
# torch, numba and pandas take seconds; the training analyzer and the SavedModel reader (with the TF
# checkpoint reader it imports) took a fifth of a small file's `ckptview info`, and none of them is needed
HEAVY = ("torch", "numba", "pandas", "ckptview.analyzers.training", "ckptview.readers.savedmodel")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("header_only")
    state = {"conv.weight": torch.randn(4, 3, 3, 3), "bn.running_mean": torch.zeros(4),
             "bn.num_batches_tracked": torch.tensor(3), "fc.weight": torch.randn(2, 4).to(torch.bfloat16)}
    paths = {"zip": tmp / "model.pt", "legacy": tmp / "legacy.pt", "safetensors": tmp / "model.safetensors",
             "training": tmp / "training.pt", "pt2": tmp / "model.pt2"}
    torch.save(state, paths["zip"])
    torch.save(state, paths["legacy"], _use_new_zipfile_serialization=False)
    save_file(state, paths["safetensors"])
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 3,
                "dtype": torch.float16}, paths["training"])
    torch.export.save(torch.export.export(model, (torch.ones(1, 4),)), paths["pt2"])
    # the other formats' readers took a second to import torch for the dtypes they name
    import gguf
    import numpy as np

    paths["onnx"] = tmp / "model.onnx"
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    torch.onnx.export(conv, (torch.randn(1, 3, 8, 8),), paths["onnx"], dynamo=False)
    paths["gguf"] = tmp / "model.gguf"
    writer = gguf.GGUFWriter(paths["gguf"], "llama")
    writer.add_tensor("token_embd.weight", np.arange(64, dtype=np.float32).reshape(2, 32))
    writer.add_tensor("blk.0.attn_q.weight", gguf.quants.quantize(np.ones((2, 32), dtype=np.float32),
                                                                gguf.GGMLQuantizationType.Q8_0),
                      raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    import torch.distributed.checkpoint as dcp

    paths["dcp"] = tmp / "dcp"
    dcp.save({"model": model.state_dict(), "epoch": 3}, checkpoint_id=str(paths["dcp"]))
    paths["npy"], paths["npz"] = tmp / "weights.npy", tmp / "weights.npz"
    np.save(paths["npy"], np.ones((3, 2), dtype=np.float16))
    np.savez_compressed(paths["npz"], w=np.arange(6.0), mask=np.array([True, False]))
    return paths


@pytest.mark.parametrize("command", ["info", "tensors", "scan", "tree"])
@pytest.mark.parametrize("kind", ["zip", "legacy", "safetensors", "training", "pt2", "onnx", "gguf", "npy", "npz",
                                  "dcp"])
def test_header_only_commands_import_no_heavy_module(files: dict[str, Path], command: str, kind: str) -> None:
    code = ("import contextlib, io, json, sys\nfrom ckptview.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            f"    status = main([{command!r}, '--json', {str(files[kind])!r}] if {command!r} != 'scan' "
            f"else ['scan', {str(files[kind])!r}])\n"
            f"print(json.dumps({{'status': status, 'loaded': [m for m in {HEAVY!r} if m in sys.modules]}}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"status": 0, "loaded": []}


def test_the_same_answers_as_through_torch(files: dict[str, Path]) -> None:
    with ckptview.open(files["legacy"]) as ckpt:
        entries = {entry.name: entry for entry in ckpt.tensors()}
        assert entries["fc.weight"].dtype is torch.bfloat16 and entries["fc.weight"].dtype_name == "bfloat16"
        assert entries["bn.num_batches_tracked"].dtype is torch.int64
        assert torch.equal(entries["fc.weight"].load(), torch.load(files["legacy"])["fc.weight"])
        rows = {row.name: row for row in ckptview.tensor_table(ckpt).rows}
        assert rows["conv.weight"].dtype is torch.float32 and rows["conv.weight"].dtype_name == "float32"
        assert list(ckptview.tensor_table(ckpt).to_frame()["dtype"]) == [row.dtype_name for row in rows.values()]
    with ckptview.open(files["training"]) as ckpt:
        assert repr(ckpt.root["dtype"]) == "torch.float16"


def test_dtype_table_agrees_with_torch() -> None:
    for name, size in ITEMSIZE.items():
        dtype = getattr(torch, name, None)
        if dtype is not None:  # names newer than the installed torch are skipped, not guessed
            assert dtype.itemsize == size == itemsize(name), name
            assert torch_dtype(name) is dtype
    known = {str(value).removeprefix("torch.") for value in vars(torch).values() if isinstance(value, torch.dtype)}
    assert known <= set(ITEMSIZE), sorted(known - set(ITEMSIZE))
    for alias, name in ALIASES.items():
        assert getattr(torch, alias) is getattr(torch, name)
    for dtype, storage_class in torch.storage._dtype_to_storage_type_map().items():
        assert STORAGE_CLASSES[storage_class] == str(dtype).removeprefix("torch."), storage_class


def test_scan_reads_only_what_decides_whether_code_runs(tmp_path: Path) -> None:
    # offsets that overlap: the safetensors library refuses the header, `info` says the file is
    # damaged; `scan` answers the one question it is for (no safetensors header runs code) without
    # validating the header, which took 2.4 s of 3.3 s on a million tensors
    path = tmp_path / "overlap.safetensors"
    save_file({"a": torch.zeros(4), "b": torch.ones(4)}, str(path))
    data = bytearray(path.read_bytes())
    data[:] = data.replace(b'"data_offsets":[16,32]', b'"data_offsets":[8,24]')
    path.write_bytes(bytes(data))
    cli = [sys.executable, "-m", "ckptview"]
    scan = subprocess.run([*cli, "scan", str(path)], capture_output=True, text=True)
    assert scan.returncode == 0, scan.stderr
    assert "needs no foreign code (safetensors)" in scan.stdout
    info = subprocess.run([*cli, "info", str(path)], capture_output=True, text=True)
    assert info.returncode == 1 and "error" in info.stderr
