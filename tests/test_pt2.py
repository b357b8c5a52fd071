"""
torch.export programs (`.pt2`): listed from the archive's own tables as `torch.export.load` reads
them, and every place where loading one runs Python from the file reported by `scan`, each shown to
run under torch's own loader first.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import SmallCNN, train_a_few_steps
from format_checks import check_every_command, check_every_tab, cli
from torch.export import Dim

import ckptview


def _export(model: torch.nn.Module, args: tuple[Any, ...], path: Path, **kwargs: Any) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.export.save(torch.export.export(model, args, **kwargs), path)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SmallCNN]:
    torch.manual_seed(0)
    model = SmallCNN()
    train_a_few_steps(model)
    model.eval()
    path = _export(model, (torch.randn(2, 3, 16, 16),), tmp_path_factory.mktemp("pt2") / "cnn.pt2",
                   dynamic_shapes={"x": {0: Dim("batch", min=1, max=64)}})
    return path, model


def _rewritten(source: Path, target: Path, change: Any) -> Path:
    """A copy of the archive with `change(name, data) -> data | None` applied to each member (None drops
    it), and members `change.extra` adds: what a hostile writer does to a real export."""
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as copy:
        prefix = original.namelist()[0].split("/")[0]
        for info in original.infolist():
            data = change(info.filename.removeprefix(prefix + "/"), original.read(info))
            if data is not None:
                copy.writestr(info.filename, data)
        for name, data in getattr(change, "extra", {}).items():
            copy.writestr(f"{prefix}/{name}", data)
    return target


def _edit_json(member: str, edit: Any) -> Any:
    def change(name: str, data: bytes) -> bytes:
        if name != member:
            return data
        document = json.loads(data)
        edit(document)
        return json.dumps(document).encode()
    return change


def _runs_under_torch(path: Path, marker: Path, call: bool = False) -> bool:
    """Whether `torch.export.load` (and, with `call`, running the module it gives) runs the file's payload."""
    code = ("import torch, warnings\nwarnings.simplefilter('ignore')\n"
            f"try:\n    ep = torch.export.load({str(path)!r})\n"
            + ("    ep.module()(torch.randn(2, 3, 16, 16))\n" if call else "")
            + "except Exception:\n    pass\n")
    subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=300)
    return marker.exists()


def test_weights_equal_what_torch_export_load_gives(exported: tuple[Path, SmallCNN]) -> None:
    path, model = exported
    program = torch.export.load(path)
    expected = program.state_dict
    with ckptview.open(path) as ckpt:
        assert ckpt.format == "pt2" and not ckpt.pickle_imports
        entries = {e.name: e for e in ckpt.tensors()}
        assert list(entries) == list(expected) and set(entries) == set(model.state_dict())
        for name, tensor in expected.items():
            assert entries[name].shape == tuple(tensor.shape) and entries[name].dtype == tensor.dtype
            assert torch.equal(entries[name].load(), tensor), name
        assert entries["conv1.weight"].info.is_parameter and not entries["bn1.running_mean"].info.is_parameter
        (summary,) = ckpt.details["programs"]
    assert summary["inputs"] == ["x"] and summary["sample_inputs"] == ["float32[2, 3, 16, 16]"]
    assert summary["ops"]["torch.ops.aten.conv2d.default"] == 2
    code, out, _ = cli("info", str(path))
    assert code == 0 and "inputs=x: float32[2, 3, 16, 16], ops=10 (" in out and "conv2d 2" in out


def test_every_command_and_tab(exported: tuple[Path, SmallCNN]) -> None:
    info = check_every_command(exported[0])
    assert info["format"] == "pt2" and info["tensor_count"] == len(exported[1].state_dict())
    check_every_tab(exported[0])


def test_tied_weights_stay_one_storage(tmp_path: Path) -> None:
    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(20, 4)
            self.head = torch.nn.Linear(4, 20, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.embed(ids))

    path = _export(Tied(), (torch.tensor([[1, 2]]),), tmp_path / "tied.pt2")
    with ckptview.open(path) as ckpt:
        keys = {e.name: e.storage_key for e in ckpt.tensors()}
        assert len(set(keys.values())) == 1 and ckpt.parameter_count == 80


def test_a_real_dynamic_export_is_not_called_code(exported: tuple[Path, SmallCNN], tmp_path: Path) -> None:
    class Slice(torch.nn.Module):
        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            mask = ((x > 0) & (x < 1)).to(torch.float16)  # aten's __and__, a dtype cast's metadata assert
            return (x * mask.float())[: y.shape[0] // 2 + 1] * 2

    path = _export(Slice(), (torch.randn(8, 4), torch.randn(6)), tmp_path / "slice.pt2",
                   dynamic_shapes=({0: Dim("a", min=4)}, {0: Dim("b", min=2, max=100)}))
    with zipfile.ZipFile(path) as archive:
        graph = next(n for n in archive.namelist() if n.endswith("models/model.json"))
        document = json.loads(archive.read(graph))
    # torch writes symbolic sizes as sympy's srepr and a guard on the inputs: both must read as plain
    assert document["guards_code"] and "Symbol(" in json.dumps(document)
    targets = {node["target"] for node in document["graph_module"]["graph"]["nodes"]}
    assert {"torch.ops.aten.__and__.Tensor", "torch.ops.aten._assert_tensor_metadata.default"} <= targets
    assert cli("scan", str(path), str(exported[0]))[0] == 0


def test_a_symbolic_size_that_is_python_runs_at_load_and_is_reported(exported: tuple[Path, SmallCNN],
                                                                       tmp_path: Path) -> None:
    marker = tmp_path / "sympify-ran"

    def plant(document: dict[str, Any]) -> None:
        values = document["graph_module"]["graph"]["tensor_values"]
        sizes = values[next(iter(values))]["sizes"]
        sizes[0] = {"as_expr": {"expr_str": f"__import__('pathlib').Path({str(marker)!r}).touch()",
                                "hint": {"as_int": 2}}}

    path = _rewritten(exported[0], tmp_path / "sympify.pt2", _edit_json("models/model.json", plant))
    code, out, _ = cli("scan", str(path))
    assert code == 3 and "sympy.sympify(__import__('pathlib')" in out
    # a folder walked by a pre-commit gate finds it too
    code, out, _ = cli("scan", str(tmp_path))
    assert code == 3 and "sympify.pt2: NEEDS CODE" in out
    assert _runs_under_torch(path, marker)


def test_guard_code_runs_when_the_module_is_called_and_is_reported(exported: tuple[Path, SmallCNN],
                                                                     tmp_path: Path) -> None:
    marker = tmp_path / "guard-ran"
    payload = f"__import__('pathlib').Path({str(marker)!r}).touch() is None"
    path = _rewritten(exported[0], tmp_path / "guard.pt2",
                      _edit_json("models/model.json", lambda d: d.__setitem__("guards_code", [payload])))
    code, out, _ = cli("scan", str(path))
    assert code == 3 and "guard __import__('pathlib')" in out
    assert _runs_under_torch(path, marker, call=True)
    # a comment would hide the rest of a guard from one reading of it and not from the other
    hidden = _rewritten(exported[0], tmp_path / "comment.pt2", _edit_json(
        "models/model.json", lambda d: d.__setitem__("guards_code", ["L['x'].size()[0] >= 1 # x"])))
    assert cli("scan", str(hidden))[0] == 3


def test_a_graph_call_outside_torch_ops_is_reported(exported: tuple[Path, SmallCNN], tmp_path: Path) -> None:
    def plant(document: dict[str, Any]) -> None:
        document["graph_module"]["graph"]["nodes"][0]["target"] = "torch.serialization.os.system"

    path = _rewritten(exported[0], tmp_path / "target.pt2", _edit_json("models/model.json", plant))
    code, out, _ = cli("scan", str(path))
    assert code == 3 and "torch.serialization.os.system (a graph node calls it" in out


def test_pytree_spec_naming_a_module_is_reported(exported: tuple[Path, SmallCNN], tmp_path: Path) -> None:
    spec = json.dumps([1, {"type": "builtins.tuple", "context": "null", "children_spec": [
        {"type": None, "context": json.dumps({"__enum__": True, "fqn": "antigravity:Fly", "name": "UP"}),
         "children_spec": []}]}])

    def plant(document: dict[str, Any]) -> None:
        document["graph_module"]["module_call_graph"][0]["signature"]["in_spec"] = spec

    path = _rewritten(exported[0], tmp_path / "spec.pt2", _edit_json("models/model.json", plant))
    code, out, _ = cli("scan", str(path))
    assert code == 3 and "antigravity.Fly (named in a pytree spec" in out


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return os.utime, (self.marker, None)  # harmless when run, but only if the marker exists already


def test_pickled_payloads_are_scanned(exported: tuple[Path, SmallCNN], tmp_path: Path) -> None:
    marker = tmp_path / "pickle-ran"
    marker.touch()
    os.utime(marker, (0, 0))
    evil = tmp_path / "evil.pt"
    torch.save(_Payload(marker), evil)

    # a weight marked use_pickle: torch.load(weights_only=False)
    def use_pickle(document: dict[str, Any]) -> None:
        document["config"]["fc.bias"]["use_pickle"] = True

    weights_config = "data/weights/model_weights_config.json"
    with ckptview.open(exported[0]) as ckpt:
        member = ckpt.tensor("fc.bias").storage_key.removeprefix("data/weights/")
    configured = _edit_json(weights_config, use_pickle)

    def swap(name: str, data: bytes) -> bytes:
        return evil.read_bytes() if name == f"data/weights/{member}" else configured(name, data)

    weights = _rewritten(exported[0], tmp_path / "weights.pt2", swap)
    code, out, _ = cli("scan", str(weights))
    assert code == 3 and "posix.utime" in out
    subprocess.run([sys.executable, "-c", f"import torch; torch.export.load({str(weights)!r})"], capture_output=True,
                   timeout=300)
    assert os.stat(marker).st_mtime > 0  # torch's loader ran it

    # an opaque constant (pickle.loads), and example inputs torch.load falls back to weights_only=False for
    def opaque(name: str, data: bytes) -> bytes:
        if name == "data/constants/model_constants_config.json":
            return json.dumps({"config": {"obj": {"path_name": "opaque_obj_0", "is_param": False,
                                                  "use_pickle": True, "tensor_meta": None}}}).encode()
        return data
    opaque.extra = {"data/constants/opaque_obj_0": pickle.dumps(_Payload(marker))}  # type: ignore[attr-defined]
    assert "posix.utime" in cli("scan", str(_rewritten(exported[0], tmp_path / "opaque.pt2", opaque)))[1]
    inputs = _rewritten(exported[0], tmp_path / "inputs.pt2",
                        lambda name, data: evil.read_bytes() if name == "data/sample_inputs/model.pt" else data)
    code, out, _ = cli("scan", str(inputs))
    assert code == 3 and "posix.utime" in out


def test_aotinductor_libraries_and_crafted_archives(exported: tuple[Path, SmallCNN], tmp_path: Path) -> None:
    def keep(name: str, data: bytes) -> bytes:
        return data

    keep.extra = {"data/aotinductor/model/model.wrapper.so": b"\x7fELF"}  # type: ignore[attr-defined]
    code, out, _ = cli("scan", str(_rewritten(exported[0], tmp_path / "aoti.pt2", keep)))
    assert code == 3 and "an AOTInductor library" in out

    # also a torch.save archive: torch.load would read its data.pkl, torch.export.load the program
    keep.extra = {"data.pkl": pickle.dumps({})}  # type: ignore[attr-defined]
    code, _, err = cli("scan", str(_rewritten(exported[0], tmp_path / "both.pt2", keep)))
    assert code == 1 and "also holds" in err and "crafted" in err


def test_damaged_archives_get_one_line(exported: tuple[Path, SmallCNN], tmp_path: Path) -> None:
    data = exported[0].read_bytes()
    for cut in range(0, len(data), max(1, len(data) // 40)):
        damaged = tmp_path / f"cut{cut}.pt2"
        damaged.write_bytes(data[:cut])
        code, out, err = cli("info", "--json", str(damaged))
        if code == 0:
            # cut just after the example inputs' own torch.save archive, whose end record is then the
            # file's last: read as zipfile reads it, the bytes before it a prefix, it is that archive
            assert json.loads(out)["format"] == "torch-zip", cut
            continue
        assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (cut, err)

    def too_far(document: dict[str, Any]) -> None:
        document["config"]["fc.weight"]["tensor_meta"]["storage_offset"] = {"as_int": 1 << 20}

    beyond = _rewritten(exported[0], tmp_path / "beyond.pt2",
                        _edit_json("data/weights/model_weights_config.json", too_far))
    code, _, err = cli("info", str(beyond))
    assert code == 1 and "'fc.weight' reaches byte" in err
