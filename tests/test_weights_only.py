"""
`scan` and `info` say "loads with torch.load(weights_only=True)" only of files torch's weights-only
unpickler does load: checked by loading each file with it.
"""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import pytest
import torch
import torch._weights_only_unpickler as torch_weights_only

import ckptview
from ckptview.cli import main as cli_main
from ckptview.readers.unpickler import _allowed
from ckptview.readers.weights_only import REFUSED_BY_DEFAULT, TORCH_SAFE_CLASSES


def test_the_refused_globals_are_ckptviews_allow_list_less_torchs() -> None:
    # when this fails after a torch upgrade, regenerate REFUSED_BY_DEFAULT from the difference shown
    assert REFUSED_BY_DEFAULT == set(_allowed()) - set(torch_weights_only._get_allowed_globals())


def test_torchs_own_safe_classes_are_those_its_packages_register() -> None:
    """The classes ckptview counts as torch's own (not foreign code) are exactly what importing each
    package adds to torch's weights-only safe globals."""
    import importlib

    for package in set(TORCH_SAFE_CLASSES.values()):
        importlib.import_module(package)
    registered = {f"{c.__module__}.{c.__qualname__}" for c in torch.serialization.get_safe_globals()
                  if hasattr(c, "__qualname__")}
    assert set(TORCH_SAFE_CLASSES) <= registered  # nothing torch's own loader would refuse
    tensor_classes = ("torch.distributed.tensor", "torch.distributed.device_mesh", "torch.distributed._mesh_layout",
                      "torch.nested", "torch._dynamo")
    assert {name for name in registered if name.startswith(tensor_classes)} <= set(TORCH_SAFE_CLASSES)


_CONTENTS = {
    "plain": lambda: {"w": torch.ones(2, 3), "step": 7},
    "numpy-scalar": lambda: {"w": torch.ones(2), "best_acc": np.float64(0.91)},
    "numpy-array": lambda: {"w": torch.ones(2), "confusion": np.eye(2)},
    "counter": lambda: {"w": torch.ones(2), "seen": collections.Counter("aab")},
    "defaultdict": lambda: {"w": torch.ones(2), "state": collections.defaultdict(int, a=1)},
    "set-and-complex": lambda: {"w": torch.ones(2), "tags": {"a", "b"}, "z": 1 + 2j},
}


@pytest.mark.parametrize("protocol", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("container", ["zip", "legacy"])
@pytest.mark.parametrize("content", sorted(_CONTENTS))
def test_the_verdict_matches_torchs_weights_only_load(tmp_path: Path, content: str, protocol: int,
                                                      container: str, capsys) -> None:
    path = tmp_path / "model.pt"
    torch.save(_CONTENTS[content](), path, pickle_protocol=protocol, _use_new_zipfile_serialization=container == "zip")
    try:
        torch.load(path, weights_only=True)
        loads = True
    except Exception:  # torch's own "Weights only load failed" (an UnpicklingError) or its RuntimeError
        loads = False
    with ckptview.open(path) as ckpt:
        obstacle = ckpt.details["weights_only"]
        foreign = bool(ckpt.pickle_imports)  # protocol 5 pickles an array through numpy's _frombuffer
    assert (obstacle == "") == loads, obstacle
    if foreign:
        assert not loads
        return
    assert cli_main(["scan", str(path)]) == 0
    line = capsys.readouterr().out
    assert ("safe to load with torch.load(weights_only=True)" in line) == loads
    if not loads:
        assert obstacle in line
