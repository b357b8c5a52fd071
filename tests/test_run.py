"""A training run as one object: real training, real files, every figure checked against torch."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import threading
from concurrent.futures import CancelledError
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import ckptview
from ckptview.analyzers.run import metric_direction
from ckptview.analyzers.sections import find_sections
from ckptview.cli import main
from conftest import SmallCNN

EPOCHS = 12
DIVERGE_AT = 11  # the learning rate is raised to 1e30 at the start of this epoch


def _train(folder: Path) -> None:
    """A small CNN with BatchNorm trained with Adam and a StepLR schedule, saved every epoch as a training dict."""
    torch.manual_seed(0)
    model = SmallCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=4, gamma=0.5)
    x_train = torch.randn(64, 3, 16, 16)
    y_train = (x_train.mean((1, 2, 3)) > 0).long() * 3
    x_val = torch.randn(32, 3, 16, 16)
    y_val = (x_val.mean((1, 2, 3)) > 0).long() * 3
    step = 0
    for epoch in range(1, EPOCHS + 1):
        if epoch == DIVERGE_AT:
            for group in optimizer.param_groups:
                group["lr"] = 1e30
        model.train()
        for _ in range(3):
            batch = torch.randint(0, 64, (16,))
            loss = nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
        scheduler.step()
        model.eval()
        with torch.no_grad():
            out = model(x_val)
        torch.save({
            "epoch": epoch, "global_step": step, "loss": loss.item(),
            "metrics": {"val_loss": nn.functional.cross_entropy(out, y_val).item(),
                        "val_acc": (out.argmax(1) == y_val).float().mean().item()},
            "model_state_dict": model.state_dict(), "optimizer_state_dict": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
        }, folder / f"epoch_{epoch}.pt")


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("run")
    _train(folder)
    return folder


@pytest.fixture(scope="module")
def local_summary(run_folder: Path) -> ckptview.RunSummary:
    return ckptview.open_run(run_folder, cache=False).analyze(progress=False)


def _load(path: str | Path) -> dict:
    return torch.load(path, weights_only=True)


def test_orders_by_epoch_even_when_names_do_not_sort(run_folder: Path, local_summary: ckptview.RunSummary) -> None:
    assert sorted(os.listdir(run_folder))[:3] == ["epoch_1.pt", "epoch_10.pt", "epoch_11.pt"]
    names = [Path(c.path).name for c in local_summary.checkpoints]
    assert names == [f"epoch_{e}.pt" for e in range(1, EPOCHS + 1)]
    assert local_summary.order_by == "epoch"
    assert "epoch saved in every checkpoint" in local_summary.order_note
    assert [c.epoch for c in local_summary.checkpoints] == list(range(1, EPOCHS + 1))
    assert local_summary.checkpoints[0].scalars["lr"] == 0.01


def test_finds_nan_onset_epoch_and_first_tensors(run_folder: Path, local_summary: ckptview.RunSummary) -> None:
    expected_epoch, expected = None, set()
    for epoch in range(1, EPOCHS + 1):
        state = _load(run_folder / f"epoch_{epoch}.pt")["model_state_dict"]
        bad = {k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()}
        if bad:
            expected_epoch, expected = epoch, bad
            break
    assert expected_epoch is not None and expected_epoch >= DIVERGE_AT
    onset = local_summary.nan_onset
    assert onset is not None and onset.epoch == expected_epoch
    assert onset.path == str(run_folder / f"epoch_{expected_epoch}.pt")
    model_tensors = {name for name in onset.tensors if not name.startswith("optimizer_state_dict.")}
    assert model_tensors == expected
    holding = [str(run_folder / f"epoch_{epoch}.pt") for epoch in range(1, EPOCHS + 1)
               if any(v.is_floating_point() and not torch.isfinite(v).all()
                      for v in _load(run_folder / f"epoch_{epoch}.pt")["model_state_dict"].values())]
    assert list(local_summary.nonfinite) == holding and holding[0] == onset.path and len(holding) > 1


def test_best_checkpoint_by_validation_accuracy_among_finite_losses(run_folder: Path, local_summary: ckptview.RunSummary) -> None:
    saved = [_load(run_folder / f"epoch_{e}.pt") for e in range(1, EPOCHS + 1)]
    finite = [s for s in saved if math.isfinite(s["loss"]) and math.isfinite(s["metrics"]["val_loss"])]
    expected = max(finite, key=lambda s: s["metrics"]["val_acc"])  # max() keeps the first of equal values
    best = local_summary.best
    assert best is not None and best.metric == "val_acc" and best.higher_is_better
    assert best.epoch == expected["epoch"] and best.value == pytest.approx(expected["metrics"]["val_acc"])
    assert "validation accuracy" in best.note


@pytest.mark.parametrize(("name", "higher"), [
    ("val_acc", True), ("top1", True), ("eval_top5", True), ("f1", True), ("val_f1", True), ("best_acc1", True),
    ("mAP50-95", True), ("best_fitness", True), ("val/loss", False), ("top5_err", False), ("val_ppl", False),
    ("layer1", None), ("metric", None)])
def test_which_way_a_metric_is_better(name: str, higher: bool | None) -> None:
    """timm and torchvision save top1/top5, YOLO best_fitness: names a letter-digit split alone missed."""
    assert metric_direction(name) is higher


def test_best_checkpoint_by_timm_top1(tmp_path: Path) -> None:
    for epoch, top1 in enumerate((61.0, 74.5, 70.2)):
        torch.save({"epoch": epoch, "arch": "resnet18", "state_dict": {"fc.weight": torch.full((2, 2), float(epoch))},
                    "metric": top1, "top1": top1}, tmp_path / f"checkpoint-{epoch}.pth.tar")
    best = ckptview.open_run(tmp_path, cache=False).best
    assert best is not None and best.metric == "top1" and best.epoch == 1 and best.higher_is_better


def test_drift_norms_and_moments_match_torch(run_folder: Path, local_summary: ckptview.RunSummary) -> None:
    first, prev, cur = (_load(run_folder / f"epoch_{e}.pt") for e in (1, 4, 5))
    frame = local_summary.drift_frame()
    row = frame[(frame.module == "layer1.0") & (frame.epoch == 5)].iloc[0]
    w, p, f = (s["model_state_dict"]["layer1.0.weight"].double() for s in (cur, prev, first))
    assert row.weight_norm == pytest.approx(w.norm().item(), rel=1e-6)
    assert row.rel_change_prev == pytest.approx(((w - p).norm() / p.norm()).item(), rel=1e-5)
    assert row.rel_change_first == pytest.approx(((w - f).norm() / f.norm()).item(), rel=1e-5)
    steps = cur["global_step"] - prev["global_step"]
    assert row.update_ratio == pytest.approx(((w - p).norm() / w.norm()).item() / steps, rel=1e-5)
    assert local_summary.update_ratio_unit == "per step"
    moments = local_summary.moments_frame()
    total = moments[(moments.module == "<all>") & (moments.slot == "exp_avg_sq") & (moments.epoch == 5)].norm.item()
    squares = sum(s["exp_avg_sq"].double().pow(2).sum() for s in cur["optimizer_state_dict"]["state"].values())
    assert total == pytest.approx(math.sqrt(squares), rel=1e-6)
    bn = local_summary.batchnorm_frame()
    bn_row = bn[(bn.module == "bn1") & (bn.epoch == 5)].iloc[0]
    rv, rv_prev = cur["model_state_dict"]["bn1.running_var"].double(), prev["model_state_dict"]["bn1.running_var"].double()
    assert bn_row.running_var_mean == pytest.approx(rv.mean().item(), rel=1e-6)
    assert bn_row.var_change_prev == pytest.approx(((rv - rv_prev).norm() / rv_prev.norm()).item(), rel=1e-5)


def test_dask_local_cluster_gives_exactly_the_local_results(run_folder: Path, local_summary: ckptview.RunSummary) -> None:
    pytest.importorskip("distributed")
    on_dask = ckptview.open_run(run_folder, cache=False, engine="dask", workers=2).analyze(progress=False)
    # json with NaN as a token compares NaN fields equal and everything else exactly
    assert json.dumps(on_dask.to_dict()) == json.dumps(local_summary.to_dict())


def _bare_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return SmallCNN().state_dict()


def test_orders_by_name_number_then_mtime_when_content_says_nothing(tmp_path: Path) -> None:
    for number in (10, 9, 2):
        torch.save(_bare_state(number), tmp_path / f"epoch_{number}.pt")
    run = ckptview.open_run(tmp_path, cache=False)
    assert run.order_by == "name" and [Path(p).name for p in run.paths] == ["epoch_2.pt", "epoch_9.pt", "epoch_10.pt"]
    other = tmp_path / "unnumbered"
    other.mkdir()
    for name, when in (("b.pt", 200), ("a.pt", 300), ("c.pt", 100)):
        torch.save(_bare_state(when), other / name)
        os.utime(other / name, (when, when))
    run = ckptview.open_run(other, cache=False)
    assert run.order_by == "mtime" and [Path(p).name for p in run.paths] == ["c.pt", "b.pt", "a.pt"]


def test_mixed_formats_in_one_run(tmp_path: Path) -> None:
    states = [_bare_state(seed) for seed in range(3)]
    torch.save({"epoch": 1, "model": states[0]}, tmp_path / "ckpt_a.pt")
    save_file(states[1], str(tmp_path / "ckpt_b.safetensors"), metadata={"epoch": "2"})
    shards = tmp_path / "ckpt_c"
    shards.mkdir()
    names = list(states[2])
    weight_map = {}
    for number, part in enumerate((names[:4], names[4:]), start=1):
        shard = f"model-{number:05d}-of-00002.safetensors"
        save_file({k: states[2][k] for k in part}, str(shards / shard))
        weight_map.update(dict.fromkeys(part, shard))
    (shards / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"epoch": 3}, "weight_map": weight_map}))
    run = ckptview.open_run(tmp_path, cache=False)
    assert [c.format for c in run.checkpoints] == ["torch-zip", "safetensors", "safetensors-sharded"]
    assert run.order_by == "epoch"
    summary = run.analyze(progress=False)
    fc = {(d.module, d.epoch): d for d in summary.drift}[("fc", 3)]
    expected = ((states[2]["fc.weight"] - states[1]["fc.weight"]).double().pow(2).sum()
                + (states[2]["fc.bias"] - states[1]["fc.bias"]).double().pow(2).sum()).sqrt()
    expected /= (states[1]["fc.weight"].double().pow(2).sum() + states[1]["fc.bias"].double().pow(2).sum()).sqrt()
    assert fc.rel_change_prev == pytest.approx(expected.item(), rel=1e-5)


def test_files_being_written_are_skipped_with_a_note(run_folder: Path, tmp_path: Path) -> None:
    for epoch in (1, 2, 3):
        shutil.copy(run_folder / f"epoch_{epoch}.pt", tmp_path)
    whole = (run_folder / "epoch_4.pt").read_bytes()
    (tmp_path / "epoch_4.pt").write_bytes(whole[: len(whole) // 2])  # a save still going on
    (tmp_path / "epoch_5.pt.tmp").write_bytes(whole[:100])
    run = ckptview.open_run(tmp_path, cache=False)
    assert [Path(p).name for p in run.paths] == ["epoch_1.pt", "epoch_2.pt", "epoch_3.pt"]
    reasons = {Path(s.path).name: s.reason for s in run.skipped}
    assert "cut off" in reasons["epoch_4.pt"] and "temporary" in reasons["epoch_5.pt.tmp"]


def test_alias_files_stay_out_of_the_timeline(run_folder: Path, tmp_path: Path) -> None:
    for epoch in (1, 2, 3):
        shutil.copy(run_folder / f"epoch_{epoch}.pt", tmp_path)
    shutil.copy(run_folder / "epoch_1.pt", tmp_path / "best_model.pth")
    run = ckptview.open_run(tmp_path, cache=False)
    assert len(run) == 3
    (alias,) = run.aliases
    assert alias.path.endswith("best_model.pth") and "like epoch_1.pt" in alias.note


def test_cache_reads_only_new_and_changed_files(run_folder: Path, tmp_path: Path) -> None:
    folder, cache = tmp_path / "run", tmp_path / "cache"
    folder.mkdir()
    for epoch in range(1, 7):
        shutil.copy(run_folder / f"epoch_{epoch}.pt", folder)
    computed: list[int] = []

    def analyze() -> ckptview.RunSummary:
        computed.clear()
        return ckptview.open_run(folder, cache=cache).analyze(progress=lambda done, total: computed.append(total))

    first = analyze()
    assert computed[-1] == 6
    assert len(list(cache.rglob("*.parquet"))) == 1  # a re-run reads the run's tables in one read
    assert json.dumps(analyze().to_dict()) == json.dumps(first.to_dict()) and not computed
    shutil.copy(run_folder / "epoch_7.pt", folder)
    analyze()
    assert computed[-1] == 1  # the new file (compared with epoch 6 and epoch 1, whose results stay cached)
    shutil.copy(run_folder / "epoch_8.pt", folder / "epoch_3.pt")  # a changed file: it and its successor
    os.utime(folder / "epoch_3.pt", ns=(1, 10**18))
    changed = analyze()
    assert computed[-1] == 2
    assert [c.epoch for c in changed.checkpoints] == [1, 2, 4, 5, 6, 7, 8]
    assert json.dumps(changed.to_dict()) == json.dumps(ckptview.open_run(folder, cache=False).analyze(progress=False).to_dict())


def test_a_cached_timeline_imports_neither_torch_nor_pandas(run_folder: Path, tmp_path: Path) -> None:
    """Every table from the cache: the process needs neither (they were ~1.1 s of a 0.24 s answer)."""
    args = ["timeline", str(run_folder), "--json"]
    code = ("import contextlib, io, json, sys\nfrom ckptview.cli import main\nout = io.StringIO()\n"
            f"with contextlib.redirect_stdout(out):\n    main({args!r})\n"
            "print(json.dumps({'loaded': [m for m in ('torch', 'pandas') if m in sys.modules], "
            "'summary': json.loads(out.getvalue())}))")
    env = {**os.environ, "CKPTVIEW_CACHE_DIR": str(tmp_path / "cache")}
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
            for _ in range(2)]
    assert all(run.returncode == 0 for run in runs), runs[-1].stderr[-2000:]
    filled, cached = (json.loads(run.stdout.strip().splitlines()[-1]) for run in runs)
    assert "torch" in filled["loaded"] and cached["loaded"] == []  # the first run read tensors
    assert json.dumps(cached["summary"]) == json.dumps(filled["summary"])


def test_cancel_stops_the_analysis(run_folder: Path) -> None:
    stop = threading.Event()
    stop.set()
    with pytest.raises(CancelledError):
        ckptview.open_run(run_folder, cache=False).analyze(progress=False, cancel=stop)


def test_timeline_json_contract(run_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["timeline", str(run_folder / "epoch_*.pt"), "--json", "--no-cache"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [c["epoch"] for c in data["checkpoints"]] == list(range(1, EPOCHS + 1))
    assert set(data["checkpoints"][0]) >= {"path", "epoch", "step"}
    assert data["order_by"] == "epoch"
    assert set(data["best"]) >= {"path", "metric", "value"} and data["best"]["metric"] == "val_acc"
    assert data["nan_onset"]["epoch"] >= DIVERGE_AT and data["nan_onset"]["tensors"]
    assert data["nonfinite"][0] == data["nan_onset"]["path"]
    assert set(data["drift"][0]) >= {"module", "path", "rel_change_prev"}


def test_timeline_text(run_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["timeline", str(run_folder), "--no-cache"]) == 0
    out = capsys.readouterr().out
    assert "ordered by the epoch saved in every checkpoint" in out
    assert "NaN/Inf first in epoch_11.pt" in out
    assert "best: epoch_" in out


def test_timeline_text_writes_steps_whole_and_huge_figures_short(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A long run's step 1234567 was written 1.23457e+06, a diverged run's change 5.23747e+30 to 6 digits."""
    for epoch, scale in ((1, 1.0), (2, 5.23747e30)):
        torch.save({"model": {"w": torch.full((4,), scale)}, "epoch": epoch, "global_step": 1234567 * epoch,
                    "loss": 0.5 / epoch}, tmp_path / f"epoch_{epoch}.pt")
    assert main(["timeline", str(tmp_path), "--no-cache"]) == 0
    rows = capsys.readouterr().out.splitlines()[3:5]
    assert "1234567" in rows[0] and "2469134" in rows[1] and "5.237e+30 w" in rows[1]


@pytest.mark.parametrize("validation", [False, True])
def test_timeline_text_has_a_column_for_the_deciding_metric_unless_it_is_the_loss(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], validation: bool) -> None:
    # best by the training loss printed the loss column twice, both headed "loss"
    for epoch in (1, 2):
        torch.save({"model": {"w": torch.full((4,), float(epoch))}, "epoch": epoch, "loss": 1.0 / epoch,
                    **({"val_acc": 0.5 + epoch / 10} if validation else {})}, tmp_path / f"epoch_{epoch}.pt")
    assert main(["timeline", str(tmp_path), "--no-cache"]) == 0
    header = capsys.readouterr().out.splitlines()[1].split()
    assert header.count("loss") == 1 and ("val_acc" in header) == validation


def test_timeline_says_what_not_moving_means(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """It said "relative change below 0" of a layer whose changes were all exactly 0."""
    for epoch in (1, 2, 3, 4):
        torch.save({"model": {"fc.weight": torch.ones(4), "head.weight": torch.full((2,), float(epoch))},
                    "epoch": epoch}, tmp_path / f"epoch_{epoch}.pt")
    assert main(["timeline", str(tmp_path), "--no-cache"]) == 0
    out = capsys.readouterr().out
    assert "fc: never moved (last relative change 0; under 1e-07 counts as not moving)" in out
    assert "head:" not in out


def test_a_module_with_no_finite_value_has_no_norm_and_no_change(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Every weight NaN (a diverged run) was weight_norm 0 and change 0: a layer said to have stopped."""
    weights = (torch.ones(4), torch.full((4,), 2.0), torch.full((4,), math.nan), torch.full((4,), math.nan),
               torch.full((4,), 3.0))
    for epoch, w in enumerate(weights, 1):
        model = {"fc.weight": w, "head.weight": torch.full((2,), float(epoch)), "bn.running_mean": w + 1,
                 "bn.running_var": w + 2}
        if epoch == 5:  # a tensor more: the tables' lists differ from here, and the NaN before must still count
            model["extra.weight"] = torch.ones(3)
        optimizer = {"state": {0: {"exp_avg_sq": w * w}}, "param_groups": [{"params": [0], "lr": 0.1}]}
        torch.save({"model": model, "optimizer": optimizer, "epoch": epoch,
                    "loss": 1.0 / epoch if epoch < 3 else math.nan}, tmp_path / f"epoch_{epoch}.pt")
    summary = ckptview.open_run(tmp_path, cache=False).analyze(progress=False)
    bn = summary.batchnorm_frame().set_index("epoch")
    assert bn.mean_change_prev[2] == pytest.approx(0.5)
    assert bn.loc[[3, 4, 5], "mean_change_prev"].isna().all() and bn.loc[[3, 4], "mean_change_first"].isna().all()
    moments = summary.moments_frame().query("module == '<all>'").set_index("epoch")
    assert moments.norm[2] == pytest.approx(8.0) and moments.loc[[3, 4], "norm"].isna().all()
    fc = summary.drift_frame().query("module == 'fc'").set_index("epoch")
    assert fc.weight_norm[2] == pytest.approx(4.0) and fc.rel_change_prev[2] == pytest.approx(1.0)
    for epoch in (3, 4):
        assert fc.loc[epoch, ["weight_norm", "rel_change_prev", "rel_change_first", "update_ratio"]].isna().all()
    # back to finite values: a norm again, but no change from a checkpoint that had no value to compare with
    assert fc.weight_norm[5] == pytest.approx(6.0) and math.isnan(fc.rel_change_prev[5])
    assert fc.rel_change_first[5] == pytest.approx(2.0)
    assert not summary.stopped
    view = ckptview.explore_run(tmp_path, cache=False)
    view.wait()
    assert "epoch_5.pt" in view.table.value and "None" not in view.table.value  # no step saved: a dash
    assert main(["timeline", str(tmp_path), "--no-cache"]) == 0
    rows = capsys.readouterr().out.splitlines()[3:8]
    assert rows[2].split()[3] == "nan" and rows[3].split()[-2:] == ["head", "NaN/Inf"]  # the one module that moved
    assert [row.endswith("NaN/Inf") for row in rows] == [False, False, True, True, False]


def test_a_loss_saved_as_a_tensor_counts(tmp_path: Path) -> None:
    """PyTorch's checkpoint tutorial saves `"loss": loss`, the tensor itself: it is the run's loss."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    losses = []
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    for epoch in range(3):
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        torch.save({"epoch": epoch, "model_state_dict": model.state_dict(),
                    "optimizer_state_dict": optimizer.state_dict(), "loss": loss}, tmp_path / f"ckpt_{epoch}.pt")
        # and a dict of them, which is no state dict
        torch.save({"epoch": epoch, "model": model.state_dict(), "metrics": {"val_loss": loss.detach() * 2}},
                   metrics / f"ckpt_{epoch}.pt")
    summary = ckptview.open_run(tmp_path / "ckpt_*.pt", cache=False).analyze(progress=False)
    assert [c.scalars["loss"] for c in summary.checkpoints] == pytest.approx(losses)
    best = min(range(3), key=losses.__getitem__)
    assert summary.best is not None and summary.best.metric == "loss" and summary.best.epoch == best
    with ckptview.open(tmp_path / "ckpt_0.pt") as ckpt:
        assert ("progress", ("loss",)) in [(s.kind, s.path) for s in find_sections(ckpt)]
    summary = ckptview.open_run(metrics, cache=False).analyze(progress=False)
    assert [c.scalars["val_loss"] for c in summary.checkpoints] == pytest.approx([2 * v for v in losses])
    assert summary.best is not None and summary.best.metric == "val_loss" and summary.best.epoch == best
    with ckptview.open(metrics / "ckpt_0.pt") as ckpt:
        assert [(s.kind, s.path) for s in find_sections(ckpt)][1:] == [("state_dict", ("model",)), ("progress", ("metrics",))]


def test_timeline_missing_path_is_an_input_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["timeline", str(tmp_path / "nothing_*.pt")]) == 1
    assert "no file matches" in capsys.readouterr().err


def test_run_view_shows_metrics_heatmap_onset_and_opens_a_checkpoint(run_folder: Path) -> None:
    view = ckptview.explore_run(run_folder, cache=False)
    view.wait()
    assert view.summary is not None and not view.banner.value
    assert {trace.name for trace in view.metrics.data} >= {"val_acc", "loss", "lr", "best (val_acc)"}
    heatmap, poisoned = view.heatmap.data
    assert list(heatmap.y) == ["conv1", "bn1", "layer1.0", "layer1.1", "fc"] and len(heatmap.x) == EPOCHS
    # grey where a module holds NaN and has no change to show: after the onset, not before
    onset = list(heatmap.x).index(view.summary.nan_onset.epoch)
    grey = ~np.isnan(np.array(poisoned.z, dtype=float))
    assert grey[:, onset:].any() and not grey[:, :onset].any()
    assert np.isnan(np.array(heatmap.z, dtype=float)[grey]).all()
    assert any(shape.x0 == view.summary.nan_onset.epoch for shape in view.heatmap.figure.layout.shapes)
    assert "NaN/Inf first in" in view.table.value and "epoch_10.pt" in view.table.value
    view.checkpoint.value = str(run_folder / "epoch_10.pt")
    view.open_button.click()
    assert view.explorer is not None and view.explorer.state.checkpoint.path == str(run_folder / "epoch_10.pt")
    view.explorer.close()


def test_run_view_shows_the_error_for_a_missing_folder(tmp_path: Path) -> None:
    view = ckptview.explore_run(tmp_path / "nowhere")
    assert "no such file or folder" in view.banner.value and view.summary is None


def test_each_tensor_is_read_once(run_folder: Path, local_summary: ckptview.RunSummary,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from collections import Counter

    from ckptview.analyzers import run_tasks
    from ckptview.readers import model

    reads: Counter[tuple[str, str]] = Counter()
    real = model.iter_tensor_chunks
    real_view = run_tasks._FileMaps.view

    def counting(info, name, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202 - a spy on the real reader
        reads[(Path(info.storage.source.path).name, info.storage.key)] += 1
        return real(info, name, *args, **kwargs)

    def counting_view(maps, entry):  # noqa: ANN001, ANN202 - a tensor taken from the file's map is read too
        view = real_view(maps, entry)
        if view is not None:
            reads[(Path(entry.info.storage.source.path).name, entry.info.storage.key)] += 1
        return view

    monkeypatch.setattr(model, "iter_tensor_chunks", counting)
    monkeypatch.setattr(run_tasks._FileMaps, "view", counting_view)
    summary = ckptview.open_run(run_folder, cache=False, workers=1).analyze(progress=False)
    assert json.dumps(summary.to_dict()) == json.dumps(local_summary.to_dict())
    chain_starts = {chain[0] for chain in run_tasks.plan_chains(list(range(EPOCHS)), 1)} - {0}
    for epoch in range(1, EPOCHS + 1):
        with ckptview.open(run_folder / f"epoch_{epoch}.pt") as ckpt:
            model_keys = {entry.storage_key for entry in run_tasks._model(ckpt).values()}
            float_keys = {row.entry.storage_key for row in run_tasks._tensor_rows(ckpt)}
        again = epoch in chain_starts  # the last file of a chain is read again as the previous of the next chain
        expected = {key: 1 + (again and key in model_keys) for key in float_keys}
        assert {key: n for (file, key), n in reads.items() if file == f"epoch_{epoch}.pt"} == expected


@pytest.mark.parametrize("how", ["read, not mapped", "streamed, not held"])
def test_fused_mapped_pass_equals_the_read_and_streamed_ones(run_folder: Path, local_summary: ckptview.RunSummary,
                                                            monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    from ckptview.analyzers import run_tasks

    # the default pass takes tensors from the files' maps and reduces each checkpoint in one compiled call;
    # pread into buffers, and chunk-by-chunk streaming beside the previous file, must give the same bits
    monkeypatch.setattr(run_tasks, "MAP_FILES" if how.startswith("read") else "HOLD_BYTES", 0)
    run_tasks.OPEN_CHECKPOINTS.clear()
    run_tasks.FIRST_CHECKPOINTS.clear()
    other = ckptview.open_run(run_folder, cache=False, workers=1).analyze(progress=False)
    assert json.dumps(other.to_dict()) == json.dumps(local_summary.to_dict())


def test_each_file_is_parsed_once_by_the_local_engine(run_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from collections import Counter

    opened: Counter[str] = Counter()
    real = ckptview.open

    def counting(path, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202 - a spy on the real open
        opened[Path(path).name] += 1
        return real(path, *args, **kwargs)

    monkeypatch.setattr(ckptview, "open", counting)
    ckptview.open_run(run_folder, cache=False, workers=1).analyze(progress=False)
    # the header scan's parsed checkpoint is the one its task reads (a chain's previous file is kept too)
    assert opened == Counter({f"epoch_{epoch}.pt": 1 for epoch in range(1, EPOCHS + 1)})


def test_no_full_collection_walks_the_heap_while_a_run_is_read(run_folder: Path) -> None:
    # every file's records stay alive from the header scan to the pass: collected as they arrive, they
    # set off full collections over the whole heap (torch's objects too), a fifth of a 200-file run.
    # A low threshold makes collections frequent, as a longer run's allocations would.
    import gc

    full = []

    def count(phase: str, info: dict[str, int]) -> None:
        if phase == "start" and info["generation"] == 2:
            full.append(info)

    thresholds = gc.get_threshold()
    gc.collect()
    gc.set_threshold(50, 1, 1)
    gc.callbacks.append(count)
    try:
        summary = ckptview.open_run(run_folder, cache=False, workers=2).analyze(progress=False)
    finally:
        gc.callbacks.remove(count)
        gc.set_threshold(*thresholds)
    assert summary.nan_onset is not None and full == []


def test_the_pass_finds_each_tensor_in_the_files_map_without_a_read(run_folder: Path,
                                                                     local_summary: ckptview.RunSummary,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # a mapped file's tensors are located by its zip members' local headers read from the map: a read
    # (a system call) per tensor was 8 % of a profile of the pass (200 files)
    from ckptview.readers.model import FileSource

    run = ckptview.open_run(run_folder, cache=False, workers=1)
    reads = []
    real = FileSource.read_into

    def counting(source, buffer, offset):  # noqa: ANN001, ANN202 - a spy on the real read
        reads.append((Path(source.path).name, offset, len(buffer)))
        return real(source, buffer, offset)

    monkeypatch.setattr(FileSource, "read_into", counting)
    summary = run.analyze(progress=False)
    assert json.dumps(summary.to_dict()) == json.dumps(local_summary.to_dict())
    assert reads == []


def test_views_reading_one_storage_many_times_over_are_left_out_of_a_run(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """As in statistics: `[x[i:] for i in range(40)]` is one 16 MiB storage that 40 views would read
    40 times per pass; the run reads the first 16 and leaves the others out."""
    from collections import Counter

    from ckptview.analyzers import run_tasks
    from ckptview.readers import model

    x = torch.arange(1 << 22, dtype=torch.float32)
    for epoch in (1, 2):
        torch.save({"epoch": epoch, "views": [x[i:] for i in range(40)]}, tmp_path / f"epoch_{epoch}.pt")
    reads: Counter[str] = Counter()
    real, real_view = model.iter_tensor_chunks, run_tasks._FileMaps.view

    def counting(info, name, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202 - a spy on the real reader
        reads[Path(info.storage.source.path).name] += 1
        return real(info, name, *args, **kwargs)

    def counting_view(maps, entry):  # noqa: ANN001, ANN202
        view = real_view(maps, entry)
        if view is not None:
            reads[Path(entry.info.storage.source.path).name] += 1
        return view

    monkeypatch.setattr(model, "iter_tensor_chunks", counting)
    monkeypatch.setattr(run_tasks._FileMaps, "view", counting_view)
    run_tasks.OPEN_CHECKPOINTS.clear()
    summary = ckptview.open_run(tmp_path, cache=False, workers=1).analyze(progress=False)
    assert [c["path"] for c in summary.to_dict()["checkpoints"]] == [str(tmp_path / f"epoch_{e}.pt") for e in (1, 2)]
    assert reads and all(count <= 2 * 16 for count in reads.values()), reads
    with ckptview.open(tmp_path / "epoch_1.pt") as ckpt:
        assert [row.name for row in run_tasks._tensor_rows(ckpt)] == [f"views.{i}" for i in range(16)]


def test_open_checkpoints_stay_within_their_bounds(tmp_path: Path) -> None:
    """At most `capacity` checkpoints kept, at most `files` idle ones holding a descriptor, the rest reopen on use."""
    from ckptview.analyzers import run_tasks

    paths = []
    for i in range(7):
        paths.append(tmp_path / f"epoch_{i}.pt")
        torch.save({"w": torch.full((3,), float(i))}, paths[-1])
    kept = run_tasks._OpenCheckpoints(capacity=4, files=2)

    def descriptors() -> int:
        return sum(os.path.realpath(f"/proc/self/fd/{fd}").startswith(str(tmp_path)) for fd in os.listdir("/proc/self/fd"))

    before = descriptors()
    for path in paths:
        with kept.use(run_tasks.file_id(str(path)), False) as ckpt:
            ckpt.tensor("w").load()  # opens its file
            assert descriptors() - before <= 3  # two idle ones and this one
    assert [key[0].path for key in kept._entries] == [str(p) for p in paths[-4:]]
    assert descriptors() - before == 2
    with kept.use(run_tasks.file_id(str(paths[3])), False) as ckpt:  # idle without a descriptor: reads again
        assert torch.equal(ckpt.tensor("w").load(), torch.full((3,), 3.0))
    with kept.use(run_tasks.file_id(str(paths[0])), False) as ckpt:  # dropped: opened anew, the oldest idle goes
        assert torch.equal(ckpt.tensor("w").load(), torch.full((3,), 0.0))
    assert len(kept._entries) == 4 and str(paths[4]) not in [key[0].path for key in kept._entries]
    assert descriptors() - before == 2
    kept.clear()
    assert descriptors() == before and not kept._entries


def test_timeline_of_one_checkpoint_says_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.save({"w": torch.ones(2)}, tmp_path / "epoch_1.pt")
    assert main(["timeline", str(tmp_path), "--no-cache"]) == 0
    assert capsys.readouterr().out.startswith("1 checkpoint, ordered")
