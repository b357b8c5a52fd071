"""
Training state on files torch itself saved: each LR scheduler's class named from its fields, its
schedule computed from them and checked step by step against torch's own `scheduler.step()`, and
the optimizer's moments per parameter against the norms of the tensors torch saved.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler as S

import ckptview
from ckptview.analyzers.training import moment_norms, training_state
from ckptview.present.html import training_html
from ckptview.ui import explore

STEPS = 24  # the schedule is recorded over this many steps
SAVED_AT = 9  # and the file saved after this many

SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer], object]] = {
    "StepLR": lambda o: S.StepLR(o, step_size=3, gamma=0.5),
    "MultiStepLR": lambda o: S.MultiStepLR(o, milestones=[2, 5, 5, 11], gamma=0.3),
    "ExponentialLR": lambda o: S.ExponentialLR(o, gamma=0.9),
    "CosineAnnealingLR": lambda o: S.CosineAnnealingLR(o, T_max=STEPS - 1, eta_min=1e-4),
    "CosineAnnealingWarmRestarts": lambda o: S.CosineAnnealingWarmRestarts(o, T_0=3, T_mult=2, eta_min=1e-3),
    "LinearLR": lambda o: S.LinearLR(o, start_factor=0.1, end_factor=1.0, total_iters=5),
    "ConstantLR": lambda o: S.ConstantLR(o, factor=0.25, total_iters=4),
    "PolynomialLR": lambda o: S.PolynomialLR(o, total_iters=12, power=2.0),
    "CyclicLR": lambda o: S.CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=3, mode="triangular2"),
    "OneCycleLR": lambda o: S.OneCycleLR(o, max_lr=[1.0, 0.5], total_steps=STEPS),
    "SequentialLR": lambda o: S.SequentialLR(o, [S.LinearLR(o, start_factor=0.1, total_iters=3),
                                                 S.ExponentialLR(o, gamma=0.8)], milestones=[3]),
    "ChainedScheduler": lambda o: S.ChainedScheduler([S.ConstantLR(o, factor=0.5, total_iters=4),
                                                      S.ExponentialLR(o, gamma=0.9)]),
}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def _train(tmp_path: Path, name: str, make: Callable[[torch.optim.Optimizer], object],
           optimizer: type[torch.optim.Optimizer] = torch.optim.SGD) -> tuple[Path, list[list[float]]]:
    """Train with two param groups, save a training dict after SAVED_AT steps, and record every step's lrs."""
    model = _model()
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.05}]
    extra = {"momentum": 0.9} if optimizer is torch.optim.SGD else {}
    opt = optimizer(groups, lr=0.1, **extra)
    scheduler = make(opt)
    lrs, path = [], tmp_path / f"{name}.pt"
    x = torch.randn(16, 4)
    for step in range(STEPS):
        lrs.append([g["lr"] for g in opt.param_groups])
        if step == SAVED_AT:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": scheduler.state_dict(),
                        "epoch": step}, path)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        scheduler.step()
    return path, lrs


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_schedule_is_named_and_equals_torchs_own_stepping(tmp_path: Path, name: str) -> None:
    path, lrs = _train(tmp_path, name, SCHEDULERS[name])
    with ckptview.open(path) as ckpt:
        state = training_state(ckpt)
        (scheduler,) = state.scheduler_states
        (schedule,) = state.lr_schedules(horizon=STEPS - 1)
    assert (scheduler.class_name, scheduler.named_by) == (name, "inferred from its fields")
    assert schedule.current == SAVED_AT and schedule.steps == tuple(range(STEPS))
    for group in (0, 1):
        expected = [lr[group] for lr in lrs]
        assert schedule.lrs[group] == pytest.approx(expected, rel=1e-6), (name, group)
    assert "it gives the lr the scheduler last set" in schedule.note


def test_default_horizon_reaches_the_end_of_the_schedule(tmp_path: Path) -> None:
    path, lrs = _train(tmp_path, "cosine", lambda o: S.CosineAnnealingLR(o, T_max=40))
    with ckptview.open(path) as ckpt:
        (schedule,) = training_state(ckpt).lr_schedules()
    assert schedule.steps[-1] == 40 and schedule.lrs[0][-1] == pytest.approx(0.0, abs=1e-12)
    assert schedule.lrs[0][:STEPS] == pytest.approx([lr[0] for lr in lrs], rel=1e-6)


@pytest.mark.parametrize("name, why", [
    ("LambdaLR/MultiplicativeLR", "lr_lambda"),
    ("ReduceLROnPlateau", "metric"),
])
def test_schedules_that_depend_on_code_or_a_metric_say_why_they_are_not_drawn(tmp_path: Path, name: str, why: str) -> None:
    make = (lambda o: S.LambdaLR(o, lambda e: 0.95 ** e)) if name.startswith("Lambda") else S.ReduceLROnPlateau
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = make(opt)
    path = tmp_path / "s.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "lr_scheduler": scheduler.state_dict()}, path)
    with ckptview.open(path) as ckpt:
        state = training_state(ckpt)
        (schedule,) = state.lr_schedules()
    assert state.scheduler_states[0].class_name == name and not schedule.steps and why in schedule.note


def test_lightning_lr_schedulers_list_is_named_and_drawn(tmp_path: Path) -> None:
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = S.StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(5):
        opt.step()
        scheduler.step()
    path = tmp_path / "lightning.ckpt"
    torch.save({"pytorch-lightning_version": "2.4.0", "epoch": 5, "global_step": 5, "state_dict": model.state_dict(),
                "optimizer_states": [opt.state_dict()], "lr_schedulers": [scheduler.state_dict()]}, path)
    with ckptview.open(path) as ckpt:
        state = training_state(ckpt)
        (schedule,) = state.lr_schedules()
    assert state.scheduler_states[0].class_name == "StepLR"
    assert schedule.current == 5 and schedule.lrs[0][5] == pytest.approx(1e-3 * 0.5 ** 2)


def test_training_view_names_the_class_and_hides_private_fields(tmp_path: Path) -> None:
    path, _ = _train(tmp_path, "step", SCHEDULERS["StepLR"])
    with ckptview.open(path) as ckpt:
        html = training_html(training_state(ckpt))
    assert "LR scheduler 0: StepLR" in html and "inferred from its fields" in html
    assert "<th>step_size</th><td>3</td>" in html and "<th>last lr set</th>" in html
    assert "_get_lr_called_within_step" not in html and "_step_count" not in html and "_is_initial" not in html


def test_moment_norms_are_the_norms_of_the_saved_adam_state(tmp_path: Path) -> None:
    path, _ = _train(tmp_path, "adam", SCHEDULERS["StepLR"], optimizer=torch.optim.Adam)
    saved = torch.load(path, weights_only=True)
    names = [name for name, _ in _model().named_parameters()]
    with ckptview.open(path) as ckpt:
        (optimizer,) = training_state(ckpt).optimizers
        norms = {(n.parameter, n.moment): n for n in moment_norms(ckpt, optimizer)}
    assert len(norms) == 2 * len(names)
    for pid, name in enumerate(names):
        for moment in ("exp_avg", "exp_avg_sq"):
            tensor = saved["optimizer"]["state"][pid][moment].double()
            norm = norms[(name, moment)]
            assert norm.l2_norm == pytest.approx(tensor.norm().item(), rel=1e-5)
            assert norm.rms == pytest.approx(tensor.norm().item() / math.sqrt(tensor.numel()), rel=1e-5)


def test_training_tab_draws_the_schedule_with_the_saved_step_and_the_moments(tmp_path: Path) -> None:
    path, lrs = _train(tmp_path, "onecycle", SCHEDULERS["OneCycleLR"], optimizer=torch.optim.Adam)
    panel = explore(path).select("Training state")
    panel.wait()
    assert "LR scheduler 0: OneCycleLR" in panel.content.value
    curve, second, marker = panel.schedule.data
    assert curve.name == "scheduler 0 (OneCycleLR) group 0" and list(curve.y) == pytest.approx([lr[0] for lr in lrs])
    assert list(second.y) == pytest.approx([lr[1] for lr in lrs])
    assert list(marker.x) == [SAVED_AT, SAVED_AT] and list(marker.y) == pytest.approx(lrs[SAVED_AT])
    moments = {trace.name: list(trace.y) for trace in panel.moments.data}
    assert moments["exp_avg"] == ["0.weight", "0.bias", "2.weight", "2.bias"] and "exp_avg_sq" in moments
    assert "<code>2.weight</code>" in panel.moments_table.value


def test_damaged_scheduler_fields_give_a_sentence_not_a_failure(tmp_path: Path) -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = S.StepLR(opt, step_size=3).state_dict()
    path = tmp_path / "damaged.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": {**state, "step_size": 0}, "other_scheduler": {**state, "gamma": "half"}}, path)
    with ckptview.open(path) as ckpt:
        schedules = training_state(ckpt).lr_schedules()
    assert [s.steps for s in schedules] == [(), ()]
    assert "ZeroDivisionError" in schedules[0].note and "ValueError" in schedules[1].note


def test_optimizer_scheduler_and_scaler_saved_on_their_own_are_training_state(tmp_path: Path) -> None:
    """Hugging Face's Trainer saves optimizer.pt, scheduler.pt and scaler.pt beside the model, each a bare
    state_dict(): each is the training state it holds, not "weights only"."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = S.LambdaLR(optimizer, lambda step: 1.0 - step / 10)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    scheduler.step()
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp_path / "scheduler.pt")
    torch.save(torch.amp.GradScaler("cpu").state_dict(), tmp_path / "scaler.pt")
    with ckptview.open(tmp_path / "optimizer.pt") as ckpt:
        (found,) = training_state(ckpt).optimizers
        assert (found.path, found.optimizer_kind, len(found.params)) == ((), "AdamW", 2)
        assert {p.tensors["exp_avg"][0] for p in found.params} == {(2, 3), (2,)}
    with ckptview.open(tmp_path / "scheduler.pt") as ckpt:
        (named,) = training_state(ckpt).scheduler_states
        assert named.last_epoch == 1 and "LambdaLR" in named.class_name
    with ckptview.open(tmp_path / "scaler.pt") as ckpt:
        assert training_state(ckpt).grad_scaler["scale"] == 65536.0
