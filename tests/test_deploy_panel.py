"""The Deploy tab, driven as a user would: check targets, set the shape, press Run, read the other widgets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import SmallCNN, train_a_few_steps
from torch import nn

import ckptview
from ckptview.ui.base import ExplorerState
from ckptview.ui.deploy import DeployPanel


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 4)
        self.fc2 = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.fc1(x)
        return self.fc2(x)


@pytest.fixture
def cnn_path(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = SmallCNN()
    train_a_few_steps(model)
    path = tmp_path / "cnn.pt"
    torch.save(model.state_dict(), path)
    return path


def press_run(panel: DeployPanel) -> None:
    panel.run_button.click()
    panel.wait(300)


def test_run_fills_the_table_for_the_checked_targets(cnn_path: Path) -> None:
    panel = DeployPanel(ExplorerState(str(cnn_path), model="conftest:SmallCNN"))
    panel.activate()
    assert "Run exports the model" in panel.banner.value
    panel.targets["script"].value = False
    panel.input_shape.value = "1,3,16,16"
    panel.device.value = "cpu"
    press_run(panel)
    assert [r.target for r in panel.check.results] == ["onnx", "trace"]
    assert panel.check.ok and "every export matches eager PyTorch" in panel.banner.value
    assert "<td>onnx</td><td><span class=''>ok</span></td>" in panel.table.value
    assert "<td>trace</td>" in panel.table.value and "<td>script</td>" not in panel.table.value
    assert "ONNX Runtime" in panel.table.value and panel.pitfalls.value == ""
    assert "download='export-check.csv'" in panel.table.value and "download='export-check.json'" in panel.table.value
    assert panel.probes.value.count("<tr><td>onnx</td>") == 4


def test_a_diverging_trace_is_explained_in_words(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Branchy()
    path = tmp_path / "branchy.pt"
    torch.save(model.state_dict(), path)
    panel = DeployPanel(ExplorerState(str(path), model=model))
    panel.activate()
    panel.targets["onnx"].value = False
    panel.device.value = "cpu"
    press_run(panel)
    assert panel.input_shape.value == "1,4"  # the inferred shape, now editable
    assert [r.status for r in panel.check.results] == ["diverges", "ok"]
    assert "trace: the traced model differs from eager PyTorch on sign flipped" in panel.pitfalls.value
    assert "if x.sum() &gt; 0:" in panel.pitfalls.value  # the tracer's warning names the line
    assert "DIFFERS" in panel.probes.value


def test_no_target_and_bad_shapes_go_to_the_banner(cnn_path: Path) -> None:
    panel = DeployPanel(ExplorerState(str(cnn_path), model="conftest:SmallCNN"))
    for box in panel.targets.values():
        box.value = False
    panel.run_button.click()
    assert "no export target checked" in panel.banner.value
    panel.targets["trace"].value = True
    panel.input_shape.value = "1,a"
    panel.run_button.click()
    assert "is not sizes separated by commas" in panel.banner.value
    assert panel.check is None


def test_the_explorer_has_the_deploy_tab(cnn_path: Path) -> None:
    explorer = ckptview.explore(str(cnn_path), model="conftest:SmallCNN")
    try:
        panel = explorer.select("Deploy")
        assert isinstance(panel, DeployPanel) and panel.activated
        assert "Run exports the model" in panel.banner.value
    finally:
        explorer.close()
