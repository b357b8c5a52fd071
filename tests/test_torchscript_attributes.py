"""A scripted model's plain tensor attributes are listed as attributes, not as part of its state dict."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import ckptview
from ckptview.analyzers.sections import find_sections, model_state_dict
from format_checks import cli


class Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.cache = torch.full((3,), 0.5)  # a plain attribute: not in state_dict()
        self.register_buffer("buf", torch.ones(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + self.cache + self.buf.sum()


class WithCaches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = Inner()
        self.blocks = nn.ModuleList([nn.Linear(3, 3) for _ in range(2)])
        self.bn = nn.BatchNorm1d(3)
        self._state = torch.arange(5.0)
        self.table = [torch.ones(1), torch.zeros(2)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        for block in self.blocks:
            y = block(y)
        return self.bn(y) + self._state.sum() + self.table[0]


def test_model_state_dict_is_the_scripted_modules_state_dict(tmp_path: Path) -> None:
    torch.manual_seed(0)
    scripted = torch.jit.script(WithCaches())
    path = tmp_path / "scripted.pt"
    scripted.save(str(path))
    expected = scripted.state_dict()
    with ckptview.open(path) as ckpt:
        assert ckpt.format == "torchscript"
        names = {entry.name for entry in ckpt.tensors()}
        assert names == set(expected) | {"_state", "table.0", "table.1", "inner.cache"}  # every tensor still listed
        state = model_state_dict(ckpt)
        assert sorted(state) == sorted(expected)
        for name, entry in state.items():
            assert torch.equal(entry.load(), expected[name]), name
        attributes = {s.name: s.tensor_count for s in find_sections(ckpt) if s.kind == "script_attribute"}
        assert attributes == {"_state": 1, "table": 2, "inner.cache": 1}
        assert torch.equal(ckpt.tensor("_state").load(), torch.arange(5.0))
        table = ckptview.tensor_table(ckpt)
        roles = {row.name: row.role for row in table.rows}
        assert {name for name, role in roles.items() if role == "attribute"} == {"_state", "table.0", "table.1",
                                                                                 "inner.cache"}
        weights = sum(tensor.numel() for tensor in expected.values())
        assert table.parameter_count + table.buffer_count == weights
        keys = ckptview.diff(ckpt, ckpt).keys
        assert not keys.missing and not keys.unexpected
    code, out, _ = cli("info", str(path))
    assert code == 0
    assert "script_attribute" in out and "inner.cache" in out
