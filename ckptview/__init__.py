"""
ckptview: open, inspect, check, compare and run deep-learning checkpoints.

    >>> import ckptview
    >>> with ckptview.open("model.pt") as ckpt:
    ...     for entry in ckpt.tensors():
    ...         print(entry.name, entry.shape, entry.dtype)
"""

from __future__ import annotations

import importlib
import os

from ckptview import errors
from ckptview.errors import CkptviewError
from ckptview.readers import Checkpoint, PickledObject, PickleImport, TensorEntry, open_checkpoint
from ckptview.analyzers.sections import find_sections as sections, model_state_dict, pickled_modules

# Imported on first use (PEP 562): they need torch, numba or pandas, or take import time (a fifth of
# `ckptview info`'s start for the training, table and tree analyzers), and listing a file needs none
# of them (`ckptview info` answers in a fraction of torch's import time).
_LAZY = {
    "training_state": "ckptview.analyzers.training",
    "tensor_table": "ckptview.analyzers.table",
    "module_tree": "ckptview.analyzers.tree",
    "batchnorm_checks": "ckptview.analyzers.batchnorm",
    "stats": "ckptview.analyzers.stats",
    "doctor": "ckptview.analyzers.doctor",
    "diff": "ckptview.analyzers.valuediff",
    "Run": "ckptview.analyzers.run",
    "RunSummary": "ckptview.analyzers.run",
    "open_run": "ckptview.analyzers.run",
    "available_devices": "ckptview.inference",
    "compare_checkpoints": "ckptview.inference",
    "compare_precisions": "ckptview.inference",
    "load_model": "ckptview.inference",
    "run_inference": "ckptview.inference",
    "export_check": "ckptview.inference.export",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ckptview' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

__version__ = "0.1.0"

__all__ = [
    "open",
    "Checkpoint",
    "TensorEntry",
    "PickledObject",
    "PickleImport",
    "CkptviewError",
    "errors",
    "sections",
    "model_state_dict",
    "pickled_modules",
    "training_state",
    "tensor_table",
    "module_tree",
    "stats",
    "batchnorm_checks",
    "explore",
    "diff",
    "doctor",
    "run_inference",
    "compare_precisions",
    "compare_checkpoints",
    "export_check",
    "load_model",
    "available_devices",
    "open_run",
    "Run",
    "RunSummary",
    "explore_run",
    "report",
]


def open(path: str | os.PathLike[str], *, trust: bool = False) -> Checkpoint:  # noqa: A001 - mirrors safetensors' safe_open
    """
    Open a checkpoint lazily: names, shapes and dtypes come from headers; tensor data is read on demand.

    Args:
        path: a `.pt/.pth/.bin/.ckpt` file (torch zip or legacy pickle), a `.safetensors` file, a
            sharded `*.index.json`, a TorchScript archive, a `torch.distributed.checkpoint`
            directory, or a directory holding one of these. The format is found from the content.
        trust: allow code named by the file to run when you ask for objects that need it (whole
            pickled modules, TorchScript). Listing never runs code, trusted or not.

    Returns:
        A `Checkpoint`, usable as a context manager that closes its files.

    Raises:
        CheckpointNotFoundError, CheckpointPermissionError: the path cannot be read.
        UnsupportedFormatError: not a format ckptview knows; the message says what the file is.
        CorruptCheckpointError, TruncatedCheckpointError: a known format, damaged or cut off.
        ShardError: a sharded set whose index and shard files disagree.

    Example:
        >>> with ckptview.open("resnet.pt") as ckpt:
        ...     ckpt.tensor("fc.weight").shape
        (1000, 512)
    """
    return open_checkpoint(path, trust=trust)


def explore(path_or_checkpoint: object, *, compare_to: object = None, model: object = None, trust: bool = False) -> object:
    """
    Open a checkpoint in the notebook explorer (an ipywidgets app). See `ckptview.ui.explore`.

    Imported on call, so `import ckptview` needs neither ipywidgets nor a Jupyter kernel.
    """
    from ckptview.ui import explore as _explore

    return _explore(path_or_checkpoint, compare_to=compare_to, model=model, trust=trust)


def explore_run(path_or_run: object, *, engine: object = "local", cache: object = True, trust: bool = False) -> object:
    """
    Open a training run in the notebook explorer: metrics over epochs, a modules × checkpoints drift
    heatmap with the NaN onset marked, a table; choosing a checkpoint opens `explore()` on it.
    See `ckptview.ui.run.explore_run`. Imported on call, like `explore`.
    """
    from ckptview.ui.run import explore_run as _explore_run

    return _explore_run(path_or_run, engine=engine, cache=cache, trust=trust)


def report(path: str | os.PathLike[str] | Checkpoint, out: str | os.PathLike[str], *,
           compare: str | os.PathLike[str] | None = None, force: bool = False, trust: bool = False) -> str:
    """
    Write one self-contained HTML report of a checkpoint: a file that opens in any browser, offline,
    without a server or a kernel (plotly is embedded once), to attach to a bug report or a pull request.

    It holds what the explorer's tabs show, rendered by the same code: the overview (sections,
    metadata, parameters by module), the tensor table, the module tree, statistics with their plot
    and findings, BatchNorm findings and plot, and the training state; with `compare`, the key diff
    in `load_state_dict`'s words, the load doctor's fixes and the value diff per module.

    Args:
        path: a checkpoint path (anything `ckptview.open` takes) or an open `Checkpoint`.
        out: the HTML file to write, atomically (a temporary file in the same folder renamed into place).
        compare: a second checkpoint to compare with.
        force: replace `out` if it exists.
        trust: passed to `ckptview.open`.

    Returns:
        The path written.

    Raises:
        ReportExistsError: `out` exists and `force` is False; nothing is read or written.
        CkptviewError: a checkpoint cannot be opened, or `out` cannot be written.

    Example:
        >>> ckptview.report("epoch_10.pt", "report.html", compare="epoch_9.pt")
        'report.html'
    """
    from ckptview.present.report import write_report

    return write_report(path, out, compare=compare, force=force, trust=trust)
