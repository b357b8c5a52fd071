"""
TorchScript archives (`torch.jit.save`). They are torch zips whose data.pkl holds script
objects (`__torch__.…` classes whose code is in the archive's code/ folder); `read_torch_zip`
lists them like any torch zip. Loading runs `torch.jit.load`, which runs that code: only with trust.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ckptview.errors import CkptviewError
from ckptview.readers.model import Checkpoint
from ckptview.readers.trusted import require_trust


def load_script_module(checkpoint: Checkpoint) -> torch.jit.ScriptModule:
    """`torch.jit.load` on the archive (on CPU). It runs the archive's code, so it needs trust."""
    require_trust(checkpoint, "torch.jit.load of a TorchScript archive (its code/ folder)")
    try:
        return torch.jit.load(checkpoint.path, map_location="cpu")
    except Exception as exc:  # torch.jit.load raises RuntimeError and C++ errors of many kinds
        raise CkptviewError(checkpoint.path, f"torch.jit.load failed: {str(exc).splitlines()[0][:300]}") from exc


@dataclass(frozen=True)
class ScriptSummary:
    """A loaded TorchScript module: its hierarchy (name, TorchScript type) and the code of forward."""

    modules: tuple[tuple[str, str], ...]
    forward_code: str


def describe_script_module(checkpoint: Checkpoint) -> ScriptSummary:
    """Load the archive (needs trust) and describe its module hierarchy and forward code."""
    module = load_script_module(checkpoint)
    modules = tuple((name or "<root>", child.original_name) for name, child in module.named_modules())
    try:
        code = module.code
    except RuntimeError:  # a module without a scripted forward (only attributes) has no code
        code = ""
    return ScriptSummary(modules, code)
