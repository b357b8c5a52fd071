"""`ckptview stats / bn / tree`: the JSON contracts scripts rely on and the text people read."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from ckptview.cli import main
from conftest import SmallCNN

STATS_KEYS = {"name", "min", "max", "mean", "std", "nan_count", "inf_count", "zero_fraction"}
FINDING_KEYS = {"check", "severity", "module", "message"}


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> object:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_stats_json_rows(capsys: pytest.CaptureFixture[str], cnn_state_dict_path: Path, trained_cnn: SmallCNN) -> None:
    rows = run_json(capsys, "stats", str(cnn_state_dict_path))
    state = trained_cnn.state_dict()
    assert [row["name"] for row in rows] == list(state)
    for row in rows:
        assert STATS_KEYS <= set(row)
        tensor = state[row["name"]].double()
        assert row["max"] == pytest.approx(float(tensor.max()), rel=1e-6)
        assert row["zero_fraction"] == pytest.approx(float((tensor == 0).double().mean()))
        assert row["nan_count"] == row["inf_count"] == 0
    conv = next(row for row in rows if row["name"] == "conv1.weight")
    assert conv["std"] == pytest.approx(float(state["conv1.weight"].std()), rel=1e-5)


def test_json_output_is_strict_json_non_finite_numbers_as_null(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    # NaN and Infinity are no JSON: JSON.parse, Go and Rust refuse the whole output. A name that reads
    # "NaN" or "Infinity" is a string and stays one.
    path = tmp_path / "odd.pt"
    torch.save({"NaN": torch.full((3,), float("nan")), "x.Infinity": torch.ones(2, dtype=torch.complex64),
                "w": torch.randn(4)}, path)

    def refuse(token: str) -> None:
        raise AssertionError(f"{token} in --json output")

    for argv in (["stats", str(path)], ["diff", str(path), str(path), "--values"]):
        assert main([*argv, "--json"]) == 0
        data = json.loads(capsys.readouterr().out, parse_constant=refuse)
        if argv[0] == "stats":
            rows = {row["name"]: row for row in data}
            assert rows["NaN"]["min"] is None and rows["NaN"]["nan_count"] == 3
            assert rows["x.Infinity"]["mean"] is None and rows["x.Infinity"]["skipped"]
            assert math.isfinite(rows["w"]["mean"])


def test_stats_filter_and_nonfinite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    weight = torch.randn(10, 10)
    weight[0, 0] = float("nan")
    weight[1, 1] = float("inf")
    path = tmp_path / "bad.pt"
    torch.save({"encoder.weight": weight, "decoder.weight": torch.randn(3)}, path)
    rows = run_json(capsys, "stats", str(path), "--filter", "^enc")
    assert [row["name"] for row in rows] == ["encoder.weight"]
    assert (rows[0]["nan_count"], rows[0]["inf_count"], rows[0]["outliers"]) == (1, 1, ["non_finite"])
    assert math.isfinite(rows[0]["mean"])
    assert main(["stats", str(path)]) == 0
    text = capsys.readouterr().out
    assert "encoder.weight" in text and "decoder.weight" in text and "non_finite" in text


def test_bn_json_findings(tmp_path: Path, capsys: pytest.CaptureFixture[str], cnn: SmallCNN) -> None:
    path = tmp_path / "fresh.pt"
    torch.save(cnn.state_dict(), path)
    findings = run_json(capsys, "bn", str(path))
    assert all(FINDING_KEYS <= set(f) for f in findings)
    assert {(f["check"], f["severity"], f["module"]) for f in findings if f["severity"] == "warning"} == {
        ("running_stats_never_updated", "warning", "bn1"), ("running_stats_never_updated", "warning", "layer1.1")}
    assert main(["bn", str(path)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("2 BatchNorm layer(s), 2 problem(s)")
    # the same finding in the same words: one paragraph naming both layers, not the advice twice
    assert "[warning] running_stats_never_updated in 2 layers (bn1, layer1.1):" in text
    assert text.count("running_stats_never_updated") == 1 and text.count("Train (or run") == 1


def test_tree_text_folds_blocks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)) for _ in range(12)], nn.Linear(8, 2))
    path = tmp_path / "stack.pt"
    torch.save(model.state_dict(), path)
    assert main(["tree", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].split()[:2] == ["0…11", "×12"]
    assert lines[3].split()[0] == "0" and lines[3].startswith("  0")  # one block's children, indented
    assert lines[5].split()[0] == "12"
    total = sum(p.numel() for p in model.parameters())
    assert lines[-1] == f"{len(model.state_dict())} tensors, {total:,} elements, {total * 4 / 1024:.1f} KiB"
    records = run_json(capsys, "tree", str(path))
    assert sum(r["parameter_count"] for r in records if r["depth"] == 0) == total


def test_missing_file_is_an_input_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("stats", "bn", "tree"):
        assert main([command, str(tmp_path / "nope.pt")]) == 1
        assert "no such file" in capsys.readouterr().err


def test_stats_runs_as_a_program(cnn_state_dict_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "ckptview", "stats", str(cnn_state_dict_path), "--json"],
                          capture_output=True, text=True, check=True)
    assert {row["name"] for row in json.loads(done.stdout)} >= {"conv1.weight", "fc.bias"}
    assert done.stderr == ""  # no progress bar when stderr is not a terminal


def test_training_text_rounds_what_json_keeps_whole(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "training.pt"
    torch.save({"model": {"w": torch.ones(2)}, "epoch": 3, "loss": 3.1106977462768555,
                "metrics": {"val_loss": 3.4217675209045413, "history": [0.123456789]}}, path)
    assert main(["training", str(path)]) == 0
    progress = capsys.readouterr().out.splitlines()[0]
    assert "loss=3.1107" in progress and "'val_loss': 3.42177" in progress and "[0.123457]" in progress
    assert run_json(capsys, "training", str(path))["progress"]["loss"] == 3.1106977462768555
