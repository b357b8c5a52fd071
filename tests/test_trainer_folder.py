"""
A Hugging Face Trainer's `checkpoint-N/` folder read as one training checkpoint, and its
`output_dir` as a run. What the Trainer alone writes (its state, its pickled arguments, the random
states) was made by transformers itself (tests/fixtures/make_hf_trainer_fixtures.py); the model,
optimizer and scheduler files are made here by torch, as the Trainer makes them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import ckptview
from ckptview.analyzers.run_tasks import checkpoint_scalars
from ckptview.analyzers.sections import find_sections
from ckptview.analyzers.training import training_state
from ckptview.cli import main
from ckptview.errors import CorruptCheckpointError
from conftest import SmallCNN

FIXTURES = Path(__file__).parent / "fixtures" / "hf_trainer"


def trainer_output(folder: Path) -> dict[int, dict[str, torch.Tensor]]:
    """`output_dir` with checkpoint-2 and checkpoint-4 as the Trainer lays them out; the model's state per step."""
    torch.manual_seed(0)
    model = SmallCNN()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / 12)
    saved = {}
    for step in range(1, 5):
        model(torch.randn(4, 3, 16, 16)).logsumexp(1).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        if step % 2 == 0:
            out = folder / f"checkpoint-{step}"
            out.mkdir(parents=True)
            state = {name: value.detach().clone() for name, value in model.state_dict().items()}
            save_file(state, out / "model.safetensors")
            torch.save(optimizer.state_dict(), out / "optimizer.pt")
            torch.save(scheduler.state_dict(), out / "scheduler.pt")
            shutil.copy(FIXTURES / f"checkpoint-{step}.trainer_state.json", out / "trainer_state.json")
            for name in ("training_args.bin", "rng_state.pth"):
                shutil.copy(FIXTURES / name, out / name)
            (out / "config.json").write_text("{}")
            saved[step] = state
    return saved


def test_a_trainer_checkpoint_folder_is_one_training_checkpoint(tmp_path: Path) -> None:
    saved = trainer_output(tmp_path)
    trainer_state = json.loads((FIXTURES / "checkpoint-4.trainer_state.json").read_text())
    with ckptview.open(tmp_path / "checkpoint-4") as ckpt:
        assert ckpt.format == "trainer-checkpoint"
        kinds = {section.path: section.kind for section in find_sections(ckpt)}
        assert kinds[("model",)] == "state_dict" and kinds[("optimizer",)] == "optimizer"
        assert kinds[("lr_scheduler",)] == "scheduler" and kinds[("training_args",)] == "hyper_parameters"
        # the model's tensors, read from model.safetensors
        model = {e.name.removeprefix("model."): e for e in ckpt.tensors() if e.name.startswith("model.")}
        assert model.keys() == saved[4].keys()
        assert all(torch.equal(model[name].load(), value) for name, value in saved[4].items())
        # the optimizer beside the model (safetensors keeps no parameter order, so its ids are mapped by a guess
        # the result says is one) and the schedule where it was
        training = training_state(ckpt)
        (optimizer,) = training.optimizers
        assert optimizer.optimizer_kind == "AdamW" and len(optimizer.params) == len(list(SmallCNN().parameters()))
        assert training.scheduler_states[0].last_epoch == 4
        # the numbers a run orders and plots by, from trainer_state.json
        scalars = checkpoint_scalars(ckpt)
        assert (scalars["epoch"], scalars["global_step"]) == (trainer_state["epoch"], 4)
        eval_losses = [entry["eval_loss"] for entry in trainer_state["log_history"] if "eval_loss" in entry]
        assert scalars["eval_loss"] == eval_losses[-1] and scalars["loss"] == trainer_state["log_history"][-2]["loss"]
        # training_args.bin names transformers' classes: the folder needs foreign code, and says which
        assert ckpt.needs_trust
        assert "transformers.training_args.TrainingArguments" in {imp.name for imp in ckpt.pickle_imports}
        assert ckpt.details["weights_only"].startswith("rng_state.pth: ")


def test_a_trainer_output_dir_is_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trainer_output(tmp_path)
    run = ckptview.open_run(tmp_path, cache=False)
    assert [Path(c.path).name for c in run.checkpoints] == ["checkpoint-2", "checkpoint-4"]
    assert run.order_by == "epoch" and [c.step for c in run.checkpoints] == [2, 4]
    assert run.best is not None and run.best.metric == "eval_loss" and Path(run.best.path).name == "checkpoint-4"
    summary = run.analyze(progress=False)
    drift = {(d.module, Path(d.path).name): d.rel_change_prev for d in summary.drift}
    assert drift[("fc", "checkpoint-4")] > 0
    assert main(["timeline", str(tmp_path), "--json"]) == 0
    timeline = json.loads(capsys.readouterr().out)
    assert [c["step"] for c in timeline["checkpoints"]] == [2, 4] and timeline["order_by"] == "epoch"


def test_a_folder_with_a_trainer_state_but_no_model_file_is_not_one(tmp_path: Path) -> None:
    shutil.copy(FIXTURES / "checkpoint-2.trainer_state.json", tmp_path / "trainer_state.json")
    torch.save(nn.Linear(2, 2).state_dict(), tmp_path / "optimizer.pt")
    with ckptview.open(tmp_path) as ckpt:  # the one checkpoint file in it, as for any folder
        assert ckpt.format == "torch-zip"


def test_a_file_of_the_folder_linked_out_of_it_is_refused(tmp_path: Path) -> None:
    trainer_output(tmp_path / "out")
    folder = tmp_path / "out" / "checkpoint-2"
    (folder / "optimizer.pt").rename(tmp_path / "elsewhere.pt")
    (folder / "optimizer.pt").symlink_to(tmp_path / "elsewhere.pt")
    with pytest.raises(CorruptCheckpointError, match="not a file inside its folder"):
        ckptview.open(folder)


@pytest.mark.parametrize("state", [b"[" * 100_000, b"{not json", b"[1, 2]", b'{"epoch": "NaN", "global_step": 1e400, '
                                   b'"log_history": [{"step": "x", "loss": [1]}, 7, {"step": 9, "loss": true}]}'])
def test_a_damaged_trainer_state_is_one_line_or_ignored_field_by_field(tmp_path: Path, state: bytes) -> None:
    trainer_output(tmp_path)
    folder = tmp_path / "checkpoint-2"
    (folder / "trainer_state.json").write_bytes(state)
    if state.startswith(b"{\"epoch\""):
        with ckptview.open(folder) as ckpt:  # fields of the wrong type are left out, the rest reads
            scalars = checkpoint_scalars(ckpt)
            assert "epoch" not in scalars and "global_step" not in scalars and "loss" not in scalars
        return
    with pytest.raises(CorruptCheckpointError, match="Trainer's state file") as caught:
        ckptview.open(folder)
    assert "\n" not in str(caught.value)
