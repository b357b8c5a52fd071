"""The Inference tab, driven as a user would: set widget values, press Run, read the other widgets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from inference_models import BNCNN, MLP, BrokenMLP, trained

from ckptview.ui.base import ExplorerState
from ckptview.ui.inference_panel import InferencePanel


@pytest.fixture
def mlp_path(tmp_path: Path) -> Path:
    torch.manual_seed(2)
    path = tmp_path / "mlp.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in trained(MLP()).state_dict().items()}}, path)
    return path


def press_run(panel: InferencePanel) -> None:
    panel.run_button.click()
    panel.wait(120)


def test_run_with_precisions_fills_summary_tables_and_chart(mlp_path: Path) -> None:
    panel = InferencePanel(ExplorerState(str(mlp_path), model="inference_models:make_mlp"))
    panel.activate()
    assert "Run builds the model" in panel.banner.value
    panel.device.value = "cpu"
    panel.precisions["bf16"].value = True
    panel.precisions["int8"].value = True
    panel.repeats.value = 2
    press_run(panel)
    assert panel.banner.value == ""
    assert panel.input_shape.value == "1,8"  # the inferred shape, now editable
    assert "strip_prefix" in panel.summary.value and "all weights loaded" in panel.summary.value
    assert "output[0]" in panel.outputs.value and "output[1]" in panel.outputs.value
    assert [row.precision.value for row in panel.comparison.rows] == ["fp32", "bf16", "int8"]
    for name in ("fp32", "bf16", "int8"):
        assert f"<th>{name}</th>" in panel.table.value
    bars = panel.chart.data[0]
    assert list(bars.x) == ["fp32 (cpu)", "bf16 (cpu)", "int8 (cpu)"]
    assert list(bars.y) == [row.result.timing.median_ms for row in panel.comparison.rows]


def test_edited_shape_is_used(mlp_path: Path) -> None:
    panel = InferencePanel(ExplorerState(str(mlp_path), model="inference_models:make_mlp"))
    panel.device.value = "cpu"
    panel.input_shape.value = "4,8"
    press_run(panel)
    assert panel.comparison.row("fp32").result.outputs[0].shape == (4, 4)
    panel.input_shape.value = "4,a"
    panel.run_button.click()
    assert "is not sizes separated by commas" in panel.banner.value


def test_errors_go_to_the_banner(tmp_path: Path) -> None:
    path = tmp_path / "broken.pt"
    torch.save(BrokenMLP().state_dict(), path)
    panel = InferencePanel(ExplorerState(str(path)))
    panel.activate()
    assert "weights only" in panel.banner.value
    panel.device.value = "cpu"
    press_run(panel)
    assert "ckptview: error" in panel.banner.value and "factory" in panel.banner.value
    panel.model_factory.value = "inference_models:BrokenMLP"
    press_run(panel)
    assert "net.2 (Linear)" in panel.banner.value and "[1, 8]" in panel.banner.value
    assert panel.comparison is None


def test_whole_module_with_trust_and_a_given_module(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = trained(BNCNN()).eval()
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    untrusted = InferencePanel(ExplorerState(str(path)))
    untrusted.activate()
    assert "needs trust" in untrusted.banner.value
    panel = InferencePanel(ExplorerState(str(path), trust=True))
    panel.device.value = "cpu"
    panel.input_shape.value = "1,3,16,16"
    press_run(panel)
    result = panel.comparison.row("fp32").result
    assert result.model_source == "module"
    with torch.inference_mode():
        expected = model(torch.randn((1, 3, 16, 16), generator=torch.Generator().manual_seed(0)))
    assert torch.equal(result.output, expected)
    state_dict_path = tmp_path / "sd.pt"
    torch.save(model.state_dict(), state_dict_path)
    given = InferencePanel(ExplorerState(str(state_dict_path), model=BNCNN()))
    assert given.model_factory.placeholder == "the given module"
    given.device.value = "cpu"
    given.input_shape.value = "1,3,16,16"
    press_run(given)
    assert torch.equal(given.comparison.row("fp32").result.output, expected)


def test_explorer_has_the_inference_tab(mlp_path: Path) -> None:
    import ckptview

    explorer = ckptview.explore(str(mlp_path), model="inference_models:make_mlp")
    panel = explorer.select("Inference")
    assert isinstance(panel, InferencePanel)
    assert panel.model_factory.value == "inference_models:make_mlp"
    assert panel.comparison is None and "Run builds the model" in panel.banner.value  # nothing ran on opening
    explorer.close()
