"""Shared fixtures: real checkpoints written by torch.save / safetensors into a temp dir."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn


class SmallCNN(nn.Module):
    """A ResNet-flavoured CNN with BatchNorm: conv1/bn1, one residual block, fc head."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = x + self.layer1(x)
        return self.fc(self.pool(x).flatten(1))


def train_a_few_steps(model: nn.Module, steps: int = 3, seed: int = 0) -> torch.optim.Optimizer:
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(steps):
        loss = model(torch.randn(4, 3, 16, 16)).logsumexp(1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return optimizer


@pytest.fixture
def cnn() -> SmallCNN:
    torch.manual_seed(0)
    return SmallCNN()


@pytest.fixture
def trained_cnn(cnn: SmallCNN) -> SmallCNN:
    train_a_few_steps(cnn)
    return cnn.eval()


@pytest.fixture
def cnn_state_dict_path(tmp_path: Path, trained_cnn: SmallCNN) -> Path:
    path = tmp_path / "cnn.pt"
    torch.save(trained_cnn.state_dict(), path)
    return path
