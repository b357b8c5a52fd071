"""`ckptview diff` and `ckptview doctor`: the JSON contract, readable text, and code that works when run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from models_for_tests import make_cnn
from safetensors.torch import save_file
from torch import nn

import ckptview
from ckptview.cli import main

TESTS = Path(__file__).parent


def run_json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path, dict, dict]:
    first = make_cnn().state_dict()
    second = {k: v.clone() for k, v in first.items()}
    second["fc.weight"][0] += 0.5
    second["conv1.weight"].mul_(2)
    second["fc.bias"] = torch.zeros(4)
    second["head.extra"] = second.pop("layer1.1.0.weight")
    paths = tmp_path / "a.pt", tmp_path / "b.safetensors"
    torch.save(first, paths[0])
    save_file(second, paths[1])
    return paths[0], paths[1], first, second


def test_diff_json_keys_and_shapes(capsys: pytest.CaptureFixture[str], pair) -> None:
    a, b, _, _ = pair
    data = run_json(capsys, ["diff", str(a), str(b)])
    assert data["missing"] == ["head.extra"]
    assert data["unexpected"] == ["layer1.1.0.weight"]
    assert data["shape_mismatches"] == [{"key": "fc.bias", "left": [10], "right": [4]}]
    assert "changed" not in data


def test_diff_json_values_match_the_python_api(capsys: pytest.CaptureFixture[str], pair) -> None:
    a, b, first, second = pair
    data = run_json(capsys, ["diff", str(a), str(b), "--values"])
    changed = {item["key"]: item for item in data["changed"]}
    assert sorted(changed) == ["conv1.weight", "fc.weight"]
    assert set(changed["fc.weight"]) >= {"key", "max_abs_diff", "rel_change", "cosine"}
    assert changed["fc.weight"]["max_abs_diff"] == pytest.approx(0.5)
    diff = (first["conv1.weight"] - second["conv1.weight"]).double()
    assert changed["conv1.weight"]["rel_change"] == pytest.approx((diff.norm() / first["conv1.weight"].double().norm()).item())
    assert changed["conv1.weight"]["cosine"] == pytest.approx(1.0)
    api = ckptview.diff(a, b, values=True).values
    assert changed["fc.weight"]["rel_change"] == {t.key: t for t in api.tensors}["fc.weight"].rel_change


def test_diff_text_is_readable(capsys: pytest.CaptureFixture[str], pair) -> None:
    a, b, _, _ = pair
    assert main(["diff", str(a), str(b), "--values", "--ignore", "bn"]) == 0
    out = capsys.readouterr().out
    assert "18 tensors in both with the same shape; 1 only in B (missing), 1 only in A (unexpected), 1 with another shape" in out
    assert 'Missing key(s) in state_dict: "head.extra".' in out
    assert "size mismatch for fc.bias: copying a param with shape torch.Size([10]) from checkpoint" in out
    assert "values: 2 of 9 compared tensors differ (9 ignored)" in out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("key ") and "rel change" in line)
    assert lines[header + 2].startswith("conv1.weight") and lines[header + 3].startswith("fc.weight")  # largest change first


def test_doctor_json_code_loads_the_checkpoint(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    trained = make_cnn()
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"model." + k: v for k, v in nn.DataParallel(trained).state_dict().items()},
                "epoch": 2}, path)
    data = run_json(capsys, ["doctor", str(path), "--model", "models_for_tests:make_cnn"])
    assert [fix["kind"] for fix in data["fixes"]] == ["section", "strip_prefix"]
    assert all(set(fix) >= {"kind", "description", "code"} for fix in data["fixes"])
    assert "'model.module.'" in data["code"]
    assert data["loads_after_fix"] is True
    namespace = {"state_dict": torch.load(path, weights_only=True)}
    exec(data["code"], namespace)  # noqa: S102 - the code under test
    model = make_cnn(num_classes=10)
    model.load_state_dict(namespace["state_dict"], strict=True)
    assert torch.equal(model.fc.weight, trained.fc.weight)


def test_doctor_text_for_zero3_and_exit_code(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    state = make_cnn().state_dict()
    for name, _ in make_cnn().named_parameters():
        state[name] = torch.empty(0)
    path = tmp_path / "zero3.pt"
    torch.save(state, path)
    assert main(["doctor", str(path), "--model", "models_for_tests:make_cnn"]) == 0
    out = capsys.readouterr().out
    assert "[sharded_placeholders]" in out and "cannot be fixed by renaming" in out
    assert "After the proposed fixes it still does not load" in out
    data = run_json(capsys, ["doctor", str(path), "--model", "models_for_tests:make_cnn"])
    assert data["loads_after_fix"] is False and data["code"] == ""


def test_doctor_save_fixed_and_never_overwrite(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    trained = make_cnn()
    source, target = tmp_path / "dp.pt", tmp_path / "fixed.pt"
    torch.save(nn.DataParallel(trained).state_dict(), source)
    argv = ["doctor", str(source), "--model", "models_for_tests:make_cnn", "--save-fixed", str(target)]
    assert main(argv) == 0
    assert f"Wrote the repaired state dict to {target}" in capsys.readouterr().out
    make_cnn().load_state_dict(torch.load(target, weights_only=True), strict=True)
    before = target.read_bytes()
    assert main(argv) == 1
    assert "overwrite" in capsys.readouterr().err and target.read_bytes() == before


def test_doctor_bad_factory_is_an_input_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    torch.save(make_cnn().state_dict(), path)
    assert main(["doctor", str(path), "--model", "models_for_tests:broken_factory"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ckptview: error:") and "this factory always fails" in err


def test_doctor_imports_a_factory_from_the_current_directory(tmp_path: Path) -> None:
    path = tmp_path / "dp.pt"
    torch.save(nn.DataParallel(make_cnn()).state_dict(), path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-m", "ckptview", "doctor", str(path), "--model", "models_for_tests:make_cnn",
                             "--json"], cwd=TESTS, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["loads_after_fix"] is True
