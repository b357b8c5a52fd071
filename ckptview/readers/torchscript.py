"""
TorchScript archives (`torch.jit.save`). They are torch zips whose data.pkl holds script
objects (`__torch__.…` classes whose code is in the archive's code/ folder); `read_torch_zip`
lists them like any torch zip. Only `load_script_module` runs `torch.jit.load`, and only with trust.
"""

from __future__ import annotations

import torch

from ckptview.errors import CkptviewError, UntrustedCodeError
from ckptview.readers.model import Checkpoint


def load_script_module(checkpoint: Checkpoint) -> torch.jit.ScriptModule:
    """`torch.jit.load` on the archive (on CPU). It runs the archive's code, so it needs trust."""
    if not checkpoint.trust:
        raise UntrustedCodeError(checkpoint.path, "a TorchScript archive is code: loading it runs the archive's "
                                                  "code/ folder. Open it with trust=True (or --trust) if you trust it.")
    try:
        return torch.jit.load(checkpoint.path, map_location="cpu")
    except Exception as exc:  # torch.jit.load raises RuntimeError and C++ errors of many kinds
        raise CkptviewError(checkpoint.path, f"torch.jit.load failed: {str(exc).splitlines()[0][:300]}") from exc
