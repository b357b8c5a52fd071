"""
TorchScript archives (`torch.jit.save`). They are torch zips whose data.pkl holds script
objects (`__torch__.…` classes whose code is in the archive's code/ folder). Listing parses
data.pkl like any torch zip; only `load_script_module` runs `torch.jit.load`, and only with trust.
"""

from __future__ import annotations

import zipfile

import torch

from ckptview.errors import CkptviewError, UntrustedCodeError
from ckptview.readers.model import Checkpoint


def is_torchscript(path: str, size: int) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return False  # read_torch_zip explains what is wrong with the archive
    return any(n.count("/") == 1 and n.endswith("/constants.pkl") for n in names) or any(
        n.count("/") >= 2 and n.split("/")[1] == "code" for n in names
    )


def read_torchscript(path: str, size: int, *, trust: bool) -> Checkpoint:
    from ckptview.readers.torch_pickle import read_torch_zip

    return read_torch_zip(path, size, trust=trust, format_name="torchscript")


def load_script_module(checkpoint: Checkpoint) -> torch.jit.ScriptModule:
    """`torch.jit.load` on the archive (on CPU). It runs the archive's code, so it needs trust."""
    if not checkpoint.trust:
        raise UntrustedCodeError(checkpoint.path, "a TorchScript archive is code: loading it runs the archive's "
                                                  "code/ folder. Open it with trust=True (or --trust) if you trust it.")
    try:
        return torch.jit.load(checkpoint.path, map_location="cpu")
    except Exception as exc:  # torch.jit.load raises RuntimeError and C++ errors of many kinds
        raise CkptviewError(checkpoint.path, f"torch.jit.load failed: {str(exc).splitlines()[0][:300]}") from exc
