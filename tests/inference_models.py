"""
Models for the inference tests, importable by name ("inference_models:make_cnn") because factory
strings and whole pickled modules need an importable module path. pytest puts tests/ on sys.path;
the CLI tests add it to PYTHONPATH for their subprocesses.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class BNCNN(nn.Module):
    """Conv + BatchNorm + residual block + linear head: eval() changes its output (running statistics)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = x + self.block(x)
        return self.fc(self.pool(x).flatten(1))


class TinyTransformer(nn.Module):
    """
    Token + position Embeddings, one encoder layer, an LM head: logits [batch, time, vocab].
    `position_ids` is a non-persistent buffer computed in __init__, as Hugging Face models have.
    """

    def __init__(self, vocab: int = 50, dim: int = 16, heads: int = 2, max_len: int = 12) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = nn.Embedding(max_len, dim)
        self.register_buffer("position_ids", torch.arange(max_len), persistent=False)
        self.encoder = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=32, dropout=0.1, batch_first=True)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        hidden = self.tokens(ids) + self.positions(self.position_ids[: ids.shape[1]])
        hidden = self.encoder(hidden)
        return {"logits": self.head(hidden), "hidden": hidden}


class MLP(nn.Module):
    def __init__(self, in_features: int = 8, hidden: int = 32, out_features: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Dropout(0.5),
                                 nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, out_features))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.net(x)
        return logits, logits.softmax(-1)


class BrokenMLP(nn.Module):
    """Its second Linear expects 16 features but gets 32: the forward fails in `net.2`."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def make_cnn(num_classes: int = 10) -> BNCNN:
    return BNCNN(num_classes=num_classes)


def make_transformer(vocab: int = 50) -> TinyTransformer:
    return TinyTransformer(vocab=vocab)


def make_mlp(in_features: int = 8) -> MLP:
    return MLP(in_features=in_features)


def trained(model: nn.Module, steps: int = 3, seed: int = 0) -> nn.Module:
    """Train a few steps so BatchNorm running statistics and weights move away from their init."""
    torch.manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for _ in range(steps):
        if isinstance(model, TinyTransformer):
            loss = model(torch.randint(0, model.tokens.num_embeddings, (4, 8)))["logits"].logsumexp(-1).mean()
        elif isinstance(model, BNCNN):
            loss = model(torch.randn(4, model.conv1.in_channels, 16, 16)).logsumexp(1).mean()
        else:
            loss = model(torch.randn(4, 8))[0].logsumexp(1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


# --- files that look saved on a GPU, written without one ---------------------------------------
# torch.save asks each registered "tagger" (torch.serialization.register_package) for a storage's
# location string, lowest priority number first, and writes the first non-None answer into the
# archive. A tagger at priority 0 that answers only inside `saved_on(...)` makes torch itself
# write "cuda:7" exactly as a GPU save would, with no byte patching; outside the block it answers
# None and torch's own taggers run. Its deserializer always answers None, so loading goes to
# torch's own CUDA deserializer, which fails on a CPU-only machine unless map_location is given:
# the same situation as a real checkpoint from a GPU box.
_LOCATIONS: list[str] = []
torch.serialization.register_package(0, lambda storage: _LOCATIONS[-1] if _LOCATIONS else None,
                                     lambda storage, location: None)


@contextmanager
def saved_on(location: str) -> Iterator[None]:
    """Inside the block, torch.save records every storage as saved on `location` (e.g. "cuda:7")."""
    _LOCATIONS.append(location)
    try:
        yield
    finally:
        _LOCATIONS.pop()


class TiedLM(nn.Module):
    """A language model whose output layer shares the embedding matrix (weight tying, as GPT-2 does)."""

    def __init__(self, vocab: int = 40, dim: int = 12) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.tokens.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.tokens(ids))))
