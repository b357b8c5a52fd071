"""
Small real models for the diff/doctor tests, importable by factory string (`"models_for_tests:make_cnn"`).

pytest puts `tests/` on `sys.path` (it holds `conftest.py` and no `__init__.py`, so the default
"prepend" import mode inserts it), which is what makes the bare module name importable; a
subprocess gets the same by `PYTHONPATH=tests`.
"""

from __future__ import annotations

import torch
from torch import nn


class ResNetLike(nn.Module):
    """conv/bn stem, two residual blocks with BatchNorm, a linear classifier `fc`."""

    def __init__(self, num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = nn.ModuleList(
            nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
            for _ in range(2)
        )
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        for block in self.layer1:
            x = x + block(x)
        return self.fc(x.mean((2, 3)))


class TiedLM(nn.Module):
    """A tiny language model whose output projection shares the embedding matrix."""

    def __init__(self, vocab: int = 50, hidden: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        self.lm_head.weight = self.embed.weight


class Backbone(nn.Module):
    """A model holding the ResNet-like net as `backbone` (weights saved from the bare net need the prefix)."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = ResNetLike()


def make_cnn(num_classes: int = 10) -> ResNetLike:
    torch.manual_seed(0)
    return ResNetLike(num_classes)


def make_tied_lm() -> TiedLM:
    return TiedLM()


def make_backbone() -> Backbone:
    return Backbone()


def make_with_layernorm() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 3))


def broken_factory() -> nn.Module:
    raise ValueError("this factory always fails")


def not_a_model() -> str:
    return "not a module"
