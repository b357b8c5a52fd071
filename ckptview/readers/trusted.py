"""
Loading what a file needs code for: whole pickled `nn.Module`s (`torch.save(model)`) and any
object beyond the allow-list. It runs code from the file, so it needs the checkpoint opened with trust.
"""

from __future__ import annotations

import pickle
from typing import Any

import torch

from ckptview.errors import CkptviewError, ModelBuildError, UntrustedCodeError
from ckptview.readers.model import Checkpoint


def require_trust(checkpoint: Checkpoint, what: str) -> None:
    if not checkpoint.trust:
        wanted = ", ".join(imp.name for imp in checkpoint.pickle_imports[:5])
        raise UntrustedCodeError(
            checkpoint.path,
            f"{what} runs code from the file" + (f" (it imports {wanted})" if wanted else "")
            + ". Open it with trust=True (CLI: --trust) only if you trust where it came from.",
        )


def load_pickled_object(checkpoint: Checkpoint) -> Any:
    """
    `torch.load(weights_only=False)` of the whole file on CPU: the real objects, classes imported.

    Raises:
        UntrustedCodeError: the checkpoint was not opened with trust=True.
        ModelBuildError: a class the pickle names cannot be imported; the message names it.
    """
    if checkpoint.format == "torchscript":
        from ckptview.readers.torchscript import load_script_module

        return load_script_module(checkpoint)
    if not checkpoint.format.startswith("torch") or checkpoint.format.endswith("sharded"):
        raise CkptviewError(checkpoint.path, f"a {checkpoint.format} checkpoint holds tensors only; there is no "
                                             "pickled object to load")
    require_trust(checkpoint, "loading the pickled objects")
    try:
        return torch.load(checkpoint.path, map_location="cpu", weights_only=False)
    except (ModuleNotFoundError, AttributeError) as exc:
        missing = getattr(exc, "name", None) or str(exc)
        wanted = ", ".join(imp.name for imp in checkpoint.pickle_imports) or "?"
        raise ModelBuildError(
            checkpoint.path,
            f"the pickle needs a class that cannot be imported here ({type(exc).__name__}: {missing}; the file "
            f"imports {wanted}). Make the code that defined it importable (install the package or add it to "
            "sys.path), or use the portable way: save torch.save(model.state_dict()) and load it into a model "
            "built in code.",
        ) from exc
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        raise CkptviewError(checkpoint.path, f"torch.load failed: {str(exc).splitlines()[0][:300]}") from exc


def load_module(checkpoint: Checkpoint) -> torch.nn.Module:
    """The `nn.Module` a whole-model checkpoint (pickled module or TorchScript) holds; needs trust."""
    obj = load_pickled_object(checkpoint)
    if isinstance(obj, torch.nn.Module):
        return obj
    raise CkptviewError(checkpoint.path, f"the file holds a {type(obj).__name__}, not a whole nn.Module: build the "
                                         "model in code and load its state dict instead")
