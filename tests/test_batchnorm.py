"""Each BatchNorm check fires on a checkpoint crafted from a real model and stays silent on a trained one."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import ckptview
from conftest import SmallCNN, train_a_few_steps


def _report(tmp_path: Path, state: object) -> ckptview.analyzers.batchnorm.BatchNormReport:
    path = tmp_path / "bn.pt"
    torch.save(state, path)
    with ckptview.open(path) as ckpt:
        return ckptview.batchnorm_checks(ckpt)


def _problems(report: ckptview.analyzers.batchnorm.BatchNormReport) -> set[tuple[str, str, str]]:
    return {(f.check, f.severity, f.module) for f in report.problems}


def _edited(model: nn.Module, edit: Callable[[dict[str, torch.Tensor]], None]) -> dict[str, torch.Tensor]:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    edit(state)
    return state


def test_trained_model_is_silent(tmp_path: Path, trained_cnn: SmallCNN) -> None:
    report = _report(tmp_path, {"state_dict": trained_cnn.state_dict(), "epoch": 1})
    assert report.ok and report.problems == ()
    assert [(layer.module, layer.channels, layer.num_batches_tracked) for layer in report.layers] == [("bn1", 8, 3), ("layer1.1", 8, 3)]
    assert {f.check for f in report.findings} == {"fusion_hint", "summary"}
    assert report.checks("summary")[0].severity == "ok"


def test_fresh_model_never_updated(tmp_path: Path, cnn: SmallCNN) -> None:
    report = _report(tmp_path, cnn.state_dict())
    assert _problems(report) == {("running_stats_never_updated", "warning", "bn1"),
                                 ("running_stats_never_updated", "warning", "layer1.1")}
    finding = report.checks("running_stats_never_updated")[0]
    assert finding.tensors == ("bn1.running_mean", "bn1.running_var")
    assert "before any training step" in finding.message
    assert not report.checks("summary")


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda s: s["bn1.running_var"].__setitem__(2, -0.5), {("running_var_invalid", "error", "bn1")}),
        (lambda s: s["layer1.1.running_var"].__setitem__(0, float("nan")), {("running_var_invalid", "error", "layer1.1")}),
        (lambda s: s["layer1.1.running_var"].__setitem__(0, float("inf")), {("running_var_invalid", "error", "layer1.1")}),
        (lambda s: s["bn1.running_mean"].__setitem__(1, float("nan")), {("non_finite", "error", "bn1")}),
        (lambda s: s["bn1.bias"].__setitem__(1, float("-inf")), {("non_finite", "error", "bn1")}),
        (lambda s: s["layer1.1.weight"].zero_(), {("dead_layer", "warning", "layer1.1")}),
        (lambda s: s["bn1.running_var"].__setitem__(3, 1e-9), {("extreme_variance_ratio", "warning", "bn1")}),
        (lambda s: s["bn1.num_batches_tracked"].zero_(), {("num_batches_tracked_zero", "warning", "bn1")}),
        (lambda s: s["bn1.num_batches_tracked"].fill_(40), {("num_batches_tracked_differs", "warning", "")}),
    ],
    ids=["var-negative", "var-nan", "var-inf", "mean-nan", "bias-inf", "zeroed-layer", "variance-ratio",
         "count-zero", "count-differs"],
)
def test_each_check_fires_on_a_crafted_checkpoint(tmp_path: Path, trained_cnn: SmallCNN,
                                                   edit: Callable[[dict[str, torch.Tensor]], None],
                                                   expected: set[tuple[str, str, str]]) -> None:
    report = _report(tmp_path, _edited(trained_cnn, edit))
    assert _problems(report) == expected
    assert all(f.message and f.tensors for f in report.problems)


def test_count_differs_names_the_groups(tmp_path: Path, trained_cnn: SmallCNN) -> None:
    report = _report(tmp_path, _edited(trained_cnn, lambda s: s["bn1.num_batches_tracked"].fill_(40)))
    finding = report.checks("num_batches_tracked_differs")[0]
    assert set(finding.tensors) == {"bn1.num_batches_tracked", "layer1.1.num_batches_tracked"}
    assert "3: layer1.1" in finding.message and "40: bn1" in finding.message


def test_missing_num_batches_tracked_is_info(tmp_path: Path, trained_cnn: SmallCNN) -> None:
    state = {k: v for k, v in trained_cnn.state_dict().items() if not k.endswith("num_batches_tracked")}
    report = _report(tmp_path, state)
    assert report.ok
    assert {f.module for f in report.checks("num_batches_tracked_missing")} == {"bn1", "layer1.1"}
    assert all(f.severity == "info" for f in report.checks("num_batches_tracked_missing"))


def test_affine_without_running_stats_is_info(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    model.bn = nn.BatchNorm2d(4, track_running_stats=False)
    report = _report(tmp_path, model.state_dict())
    assert report.ok
    info = report.checks("no_running_stats")
    assert [f.module for f in info] == ["bn"] and info[0].severity == "info"
    assert [layer.tracks_running_stats for layer in report.layers] == [False]


def test_bn_1d_3d_sync_and_other_names(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.ModuleDict({
        "head": nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5)),
        "volume": nn.Sequential(nn.Conv3d(2, 3, 3), nn.BatchNorm3d(3)),
        "sync": nn.SyncBatchNorm(4),
        "stem_norm_layer": nn.BatchNorm2d(7),
    })
    model.train()
    model["head"](torch.randn(8, 6))
    model["volume"](torch.randn(2, 2, 5, 5, 5))
    report = _report(tmp_path, model.state_dict())
    assert {layer.module for layer in report.layers} == {"head.1", "volume.1", "sync", "stem_norm_layer"}
    assert _problems(report) == {
        ("running_stats_never_updated", "warning", "sync"),
        ("running_stats_never_updated", "warning", "stem_norm_layer"),
        ("num_batches_tracked_zero", "warning", "sync"),
        ("num_batches_tracked_zero", "warning", "stem_norm_layer"),
    }
    # head.1 follows a Linear (no fusion hint); volume.1 follows a Conv3d.
    assert [f.module for f in report.checks("fusion_hint")] == ["volume.1"]


def test_fusion_hints_pair_convs_by_name_and_position(tmp_path: Path, trained_cnn: SmallCNN) -> None:
    report = _report(tmp_path, trained_cnn.state_dict())
    assert {layer.module: layer.preceding_conv for layer in report.layers} == {"bn1": "conv1", "layer1.1": "layer1.0"}
    assert "fuse_modules(model.eval(), [['conv1', 'bn1']])" in report.checks("fusion_hint")[0].message


def test_model_without_batchnorm(tmp_path: Path) -> None:
    report = _report(tmp_path, nn.Linear(3, 3).state_dict())
    assert report.layers == () and report.ok
    assert report.findings[0].message == "no BatchNorm layers in this model"


def test_report_frame(tmp_path: Path, cnn: SmallCNN) -> None:
    train_a_few_steps(cnn, steps=1)
    frame = _report(tmp_path, _edited(cnn, lambda s: s["bn1.running_var"].__setitem__(0, -1.0))).to_frame()
    assert list(frame.columns) == ["check", "severity", "module", "tensors", "message"]
    assert frame.query("severity == 'error'")["tensors"].tolist() == ["bn1.running_var"]
