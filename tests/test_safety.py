"""Nothing from a file runs: a malicious pickle is listed, its imports named, and its payload never executed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import ckptview
from ckptview.cli import main


class RunsACommand:
    """Pickles as a call to os.system, the classic malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


class Config:
    """A user class in the pickle: needs its module to load, carries plain data."""

    def __init__(self) -> None:
        self.lr = 0.1
        self.layers = [64, 128]


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_malicious_pickle_is_listed_not_run(tmp_path: Path, zip_format: bool, capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "pwned"
    weights = {"fc.weight": torch.randn(3, 4), "fc.bias": torch.zeros(3)}
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": weights, "payload": RunsACommand(marker), "config": Config()}, path,
               _use_new_zipfile_serialization=zip_format)
    before = path.read_bytes()

    with ckptview.open(path) as ckpt:
        assert {e.name: e.shape for e in ckpt.tensors()} == {"state_dict.fc.weight": (3, 4), "state_dict.fc.bias": (3,)}
        assert torch.equal(ckpt.tensor("state_dict.fc.weight").load(), weights["fc.weight"])
        imports = {imp.name: imp.count for imp in ckpt.pickle_imports}
        assert imports == {"posix.system": 1, "test_safety.Config": 1}
        assert ckpt.needs_trust
        config = ckpt.root["config"]
        assert type(config).class_path == "test_safety.Config" and config.attributes == {"lr": 0.1, "layers": [64, 128]}
        assert ckpt.root["payload"].args == (f"touch {marker}",)

    assert main(["scan", str(path)]) == 3
    out = capsys.readouterr().out
    assert "posix.system" in out and "test_safety.Config" in out
    assert main(["scan", "--json", str(path)]) == 3
    report = json.loads(capsys.readouterr().out)
    assert report["needs_code"] is True
    assert {"name": "posix.system", "count": 1} in report["imports"]

    assert not marker.exists(), "ckptview ran code from the pickle"
    assert path.read_bytes() == before


def test_clean_files_scan_exit_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "clean.pt"
    torch.save({"model": torch.nn.Linear(2, 2).state_dict(), "epoch": 1}, path)
    assert main(["scan", str(path)]) == 0
    assert "needs no foreign code" in capsys.readouterr().out


def test_agrees_with_torch_unsafe_globals(tmp_path: Path) -> None:
    """Our import list matches torch's own scanner (torch.serialization.get_unsafe_globals_in_checkpoint)."""
    path = tmp_path / "module.pt"
    torch.save(torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU()), path)
    with ckptview.open(path) as ckpt:
        ours = {imp.name for imp in ckpt.pickle_imports}
    assert ours == set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    assert ours == {"torch.nn.modules.container.Sequential", "torch.nn.modules.linear.Linear",
                    "torch.nn.modules.activation.ReLU"}


def test_whole_module_lists_parameters_by_state_dict_name(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    path = tmp_path / "module.pt"
    torch.save(model, path)
    with ckptview.open(path) as ckpt:
        assert [e.name for e in ckpt.tensors()] == list(model.state_dict())
        assert type(ckpt.root).class_path == "torch.nn.modules.container.Sequential"
