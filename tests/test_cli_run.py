"""`ckptview run` on real files: text and JSON output, precisions, trust, usage and input errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from inference_models import BNCNN, MLP, trained

from ckptview.cli import main

TESTS = Path(__file__).parent


@pytest.fixture
def cnn() -> BNCNN:
    torch.manual_seed(0)
    return trained(BNCNN()).eval()


@pytest.fixture
def ddp_path(tmp_path: Path, cnn: BNCNN) -> Path:
    path = tmp_path / "ddp.pt"
    torch.save({"epoch": 2, "state_dict": {f"module.{k}": v for k, v in cnn.state_dict().items()}}, path)
    return path


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    assert main(["run", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_has_outputs_weights_and_matches_the_model(capsys: pytest.CaptureFixture[str], ddp_path: Path,
                                                        cnn: BNCNN) -> None:
    data = run_json(capsys, str(ddp_path), "--model", "inference_models:make_cnn", "--input-shape", "1,3,32,32",
                    "--device", "cpu", "--repeats", "2")
    assert set(data) == {"checkpoint", "device", "model_source", "input", "outputs", "finite", "top_k", "latency_ms",
                         "peak_memory_bytes", "weights", "notes"}
    assert data["device"] == "cpu" and data["model_source"] == "factory"
    assert data["input"] == {"kind": "image", "shape": [1, 3, 32, 32], "dtype": "float32",
                             "layer": "conv1 (Conv2d, in_channels=3)", "seed": 0}
    assert data["weights"]["complete"] and data["weights"]["loaded"] == 14
    assert data["weights"]["fixes"][0].startswith("strip_prefix")
    with torch.inference_mode():
        expected = cnn(torch.randn((1, 3, 32, 32), generator=torch.Generator().manual_seed(0)))
    assert data["outputs"][0]["shape"] == [1, 10]
    assert data["outputs"][0]["max"] == pytest.approx(float(expected.max()))
    assert data["top_k"][0]["classes"][0] == int(expected.argmax())
    assert data["latency_ms"]["repeats"] == 2 and data["latency_ms"]["min"] > 0


def test_text_report_lists_fix_input_outputs_and_top_k(capsys: pytest.CaptureFixture[str], ddp_path: Path) -> None:
    assert main(["run", str(ddp_path), "--model", "inference_models:make_cnn", "--input-shape", "1,3,32,32",
                 "--device", "cpu", "--top-k", "3"]) == 0
    out = capsys.readouterr().out
    assert "  fixed       strip_prefix: Strip the prefix 'module.'" in out
    assert "  input       image [1, 3, 32, 32] float32, from conv1 (Conv2d, in_channels=3), seed 0" in out
    assert "top 3 of output (batch 0, softmax):" in out
    # invariant: the listed probabilities are sorted and sum to at most 1
    table = out.split("top 3 of output (batch 0, softmax):\n")[1].splitlines()[2:5]
    probabilities = [float(line.split()[1]) for line in table]
    assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1.0


def test_precisions_table(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    torch.manual_seed(2)
    path = tmp_path / "mlp.pt"
    torch.save(trained(MLP()).state_dict(), path)
    data = run_json(capsys, str(path), "--model", "inference_models:make_mlp", "--precisions", "bf16,int8",
                    "--device", "cpu", "--repeats", "1")
    rows = {row["precision"]: row for row in data["precisions"]}
    assert list(rows) == ["fp32", "bf16", "int8"]
    assert rows["fp32"]["cosine"] is None and rows["int8"]["cosine"] > 0.99 and rows["int8"]["status"] == "ok"
    assert rows["int8"]["size_bytes"] < rows["fp32"]["size_bytes"]
    assert main(["run", str(path), "--model", "inference_models:make_mlp", "--precisions", "int8", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "precision  device" in out and "\nint8 " in out


def test_whole_module_needs_trust(capsys: pytest.CaptureFixture[str], tmp_path: Path, cnn: BNCNN) -> None:
    path = tmp_path / "whole.pt"
    torch.save(cnn, path)
    assert main(["run", str(path), "--device", "cpu"]) == 1
    assert "trust" in capsys.readouterr().err
    data = run_json(capsys, str(path), "--trust", "--input-shape", "1,3,16,16", "--device", "cpu")
    assert data["model_source"] == "module" and data["weights"] is None


def test_input_and_usage_errors(capsys: pytest.CaptureFixture[str], ddp_path: Path) -> None:
    assert main(["run", str(ddp_path), "--device", "cpu"]) == 1
    assert "--model package.module:factory" in capsys.readouterr().err
    assert main(["run", str(ddp_path), "--model", "no_such_module_xyz:f", "--device", "cpu"]) == 1
    assert "cannot import 'no_such_module_xyz'" in capsys.readouterr().err
    for bad in (["--input-shape", "1,three"], ["--precisions", "fp8"], ["--model-kwargs", "[1]"], ["--repeats", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["run", str(ddp_path), *bad])
        assert exit_info.value.code == 2
    assert "fp32, fp16, bf16, int8" in capsys.readouterr().err


def test_command_line_entry_point(tmp_path: Path, ddp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    completed = subprocess.run(
        [sys.executable, "-m", "ckptview", "run", str(ddp_path), "--model", "inference_models:make_cnn",
         "--model-kwargs", '{"num_classes": 10}', "--input-shape", "1,3,16,16", "--device", "cpu", "--json"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout)["outputs"][0]["shape"] == [1, 10]
