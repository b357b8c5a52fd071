"""
Sample checkpoints for the demo notebook, the teaching notebooks and the UI tests, written on the fly
(nothing is downloaded):

    python -m ckptview.demo DIR

Every file is made by real `torch.save` / `safetensors.torch.save_file` calls from a small CNN with
BatchNorm trained for a few steps, so each one looks like what a training script leaves behind.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


class DemoCNN(nn.Module):
    """A ResNet-flavoured CNN: a stem with BatchNorm, two residual stages, a linear head."""

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = nn.Sequential(*(self._block(width) for _ in range(2)))
        self.layer2 = nn.Sequential(*(self._block(width) for _ in range(2)))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    @staticmethod
    def _block(width: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        # Two plain loops, not one over both stages: TorchScript (the teaching notebook scripts it) can iterate
        # an nn.Sequential but not a tuple of modules.
        for block in self.layer1:
            x = x + block(x)
        for block in self.layer2:
            x = x + block(x)
        return self.fc(self.pool(x).flatten(1))


def build_model() -> DemoCNN:
    """The untrained demo model (a factory for the Compare tab: `ckptview.demo:build_model`)."""
    torch.manual_seed(0)
    return DemoCNN()


@dataclass(frozen=True)
class Sample:
    name: str  # path relative to the demo directory
    what: str


SAMPLES = (
    Sample("cnn.pt", "state dict of a CNN with BatchNorm trained for 5 steps (torch.save(model.state_dict()))"),
    Sample("training.pt", "training checkpoint: model + Adam state + scheduler + epoch/step/loss/hyper-parameters"),
    Sample("cnn_dataparallel.pt", "the same weights saved from nn.DataParallel: every key starts with 'module.'"),
    Sample("cnn.safetensors", "the state dict converted to safetensors"),
    Sample("sharded/model.safetensors.index.json", "the state dict split into 2 safetensors shards plus an index"),
    Sample("lightning.ckpt", "a PyTorch Lightning-style checkpoint: keys under 'model.', optimizer_states, loops"),
    Sample("broken.pt", "cnn.pt cut off at half its size, as an interrupted copy leaves it"),
)


def write_samples(directory: str | os.PathLike[str], *, steps: int = 5) -> dict[str, Path]:
    """
    Write every sample checkpoint into `directory` (created if needed) and return their paths by name.

    Args:
        directory: where to write; existing sample files are overwritten, nothing else is touched.
        steps: optimizer steps to train the CNN for, so BatchNorm running statistics are realistic.

    Returns:
        {sample name: path}, in the order of `SAMPLES`.
    """
    out = Path(directory)
    (out / "sharded").mkdir(parents=True, exist_ok=True)
    model = build_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    model.train()
    loss = torch.tensor(0.0)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(torch.randn(8, 3, 16, 16)), torch.randint(0, 10, (8,)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    model.eval()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    torch.save(state, out / "cnn.pt")
    torch.save({
        "epoch": 3,
        "global_step": steps,
        "loss": loss.item(),
        "metrics": {"val_acc": 0.41, "val_loss": loss.item() * 1.1},
        "model_state_dict": state,
        "optimizer_state_dict": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "hparams": {"lr": 1e-3, "batch_size": 8, "width": 16, "arch": "DemoCNN"},
        "versions": {"torch": torch.__version__.split("+")[0], "python": sys.version.split()[0]},
    }, out / "training.pt")
    torch.save({f"module.{k}": v for k, v in state.items()}, out / "cnn_dataparallel.pt")

    from safetensors.torch import save_file

    # safetensors refuses shared or non-contiguous tensors; the state dict has neither.
    save_file(state, str(out / "cnn.safetensors"), metadata={"format": "pt", "source": "ckptview.demo"})
    names = list(state)
    half = len(names) // 2
    weight_map = {}
    for number, part in enumerate((names[:half], names[half:]), start=1):
        shard = f"model-{number:05d}-of-00002.safetensors"
        save_file({k: state[k] for k in part}, str(out / "sharded" / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    index = {"metadata": {"total_size": sum(t.nbytes for t in state.values())}, "weight_map": weight_map}
    (out / "sharded" / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    torch.save({
        "epoch": 3,
        "global_step": steps,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": {f"model.{k}": v for k, v in state.items()},
        "optimizer_states": [optimizer.state_dict()],
        "lr_schedulers": [scheduler.state_dict()],
        "callbacks": {"ModelCheckpoint{'monitor': 'val_loss'}": {"best_model_score": loss.item(), "current_score": loss.item()}},
        "loops": {"fit_loop": {"epoch_progress": {"total": {"completed": 3}}}},
        "hyper_parameters": {"lr": 1e-3, "num_classes": 10},
    }, out / "lightning.ckpt")

    whole = (out / "cnn.pt").read_bytes()
    (out / "broken.pt").write_bytes(whole[: len(whole) // 2])
    write_run(out / "run")
    return {sample.name: out / sample.name for sample in SAMPLES}


RUN_EPOCHS = 12


def write_run(directory: str | os.PathLike[str], *, epochs: int = RUN_EPOCHS) -> list[Path]:
    """
    A training run for `ckptview.open_run`: the demo CNN trained with Adam, a training dict saved every
    epoch as `epoch_<n>.pt` (so the names do not sort: epoch_10 comes before epoch_2), with the
    learning rate raised to 1e30 for the last two epochs, so the run diverges and ends in NaN.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    model = build_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=4, gamma=0.5)
    x_train, x_val = torch.randn(64, 3, 16, 16), torch.randn(32, 3, 16, 16)
    y_train, y_val = (x_train.mean((1, 2, 3)) > 0).long() * 3, (x_val.mean((1, 2, 3)) > 0).long() * 3
    paths = []
    for epoch in range(1, epochs + 1):
        if epoch == epochs - 1:
            for group in optimizer.param_groups:
                group["lr"] = 1e30
        model.train()
        for step in range(2):
            batch = torch.arange(16) + 16 * step
            loss = nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        scheduler.step()
        model.eval()
        with torch.no_grad():
            logits = model(x_val)
        path = out / f"epoch_{epoch}.pt"
        torch.save({"epoch": epoch, "global_step": 2 * epoch, "loss": loss.item(),
                    "metrics": {"val_loss": nn.functional.cross_entropy(logits, y_val).item(),
                                "val_acc": (logits.argmax(1) == y_val).float().mean().item()},
                    "model_state_dict": model.state_dict(), "optimizer_state_dict": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict()}, path)
        paths.append(path)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ckptview.demo", description="Write the demo sample checkpoints.")
    parser.add_argument("directory", nargs="?", default="demo_checkpoints", help="where to write them")
    args = parser.parse_args(argv)
    paths = write_samples(args.directory)
    print(f"wrote {len(paths)} sample checkpoints to {os.path.abspath(args.directory)}:")
    width = max(len(name) for name in paths)
    for sample in SAMPLES:
        size = paths[sample.name].stat().st_size
        print(f"  {sample.name.ljust(width)}  {size:>9,} B  {sample.what}")
    print(f"  {'run/'.ljust(width)}  {RUN_EPOCHS} checkpoints of a training run that diverges (ckptview.open_run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
