"""
Every error ckptview raises, in one tree. Each carries the path it is about, and its message
says what the file is and what to do.

    CkptviewError
    ├── CheckpointNotFoundError        the path does not exist
    ├── CheckpointPermissionError      the path exists but cannot be read
    ├── UnsupportedFormatError         readable, but not a checkpoint format ckptview knows
    ├── CorruptCheckpointError         a checkpoint format, but damaged
    │   └── TruncatedCheckpointError   ... because it was cut off
    ├── ShardError                     a sharded set with a missing, extra or inconsistent shard
    ├── UntrustedCodeError             the operation needs to run code from the file
    ├── ModelBuildError                a model factory could not be imported or called
    │   └── ForwardError               the model's forward raised (names the layer and input shape)
    └── TensorDataError                a tensor's bytes cannot be turned into a torch.Tensor
"""

from __future__ import annotations

import os
from typing import Any

__all__ = [
    "printable",
    "CkptviewError",
    "CheckpointNotFoundError",
    "CheckpointPermissionError",
    "UnsupportedFormatError",
    "CorruptCheckpointError",
    "TruncatedCheckpointError",
    "ShardError",
    "UntrustedCodeError",
    "ModelBuildError",
    "ForwardError",
    "TensorDataError",
]


def printable(text: object) -> str:
    """
    `text` safe to print on one terminal line: control characters (ANSI escapes, newlines, bidi
    overrides) written as Python escapes, as `repr` does; everything printable left as it is.
    Names and paths come from files, and a file must not be able to draw on the user's terminal.
    """
    text = str(text)
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


class CkptviewError(Exception):
    """
    Base of every ckptview error. `path` is the file concerned (or None); `reason` the bare message.
    The message is one printable line whatever the path or the file's names hold.
    """

    def __init__(self, path: str | os.PathLike[str] | None, reason: str) -> None:
        self.path = None if path is None else os.fspath(path)
        self.reason = printable(reason)
        super().__init__(f"{printable(self.path)}: {self.reason}" if self.path is not None else self.reason)

    def __reduce__(self) -> tuple[Any, ...]:
        # pickled whole (Dask workers send errors back), not rebuilt from the one-string args
        return (_rebuild_error, (type(self), self.__dict__.copy()))


def _rebuild_error(cls: type[CkptviewError], state: dict[str, Any]) -> CkptviewError:
    error = cls.__new__(cls)
    Exception.__init__(error, f"{printable(state['path'])}: {state['reason']}" if state["path"] is not None
                       else state["reason"])
    error.__dict__.update(state)
    return error


class CheckpointNotFoundError(CkptviewError, FileNotFoundError):
    """The path does not exist."""


class CheckpointPermissionError(CkptviewError, PermissionError):
    """The path exists but this user may not read it."""


class UnsupportedFormatError(CkptviewError):
    """The file can be read but is not a checkpoint format ckptview knows."""


class CorruptCheckpointError(CkptviewError):
    """The file is a known checkpoint format but its contents are damaged."""


class TruncatedCheckpointError(CorruptCheckpointError):
    """The file ends before its own structure says it should: it was cut off."""


class ShardError(CkptviewError):
    """A sharded checkpoint whose index and shard files disagree."""


class UntrustedCodeError(CkptviewError):
    """The operation needs to import or run code named by the file; pass trust=True if you trust it."""


class ModelBuildError(CkptviewError):
    """A model or factory given by the user could not be imported, called or used."""


class ForwardError(ModelBuildError):
    """
    The model's forward raised. `layer` is the innermost module that was running (None when it
    cannot be told, e.g. inside TorchScript) and `input_shapes` the shapes fed to the model.
    """

    def __init__(self, path: str | None, reason: str, *, layer: str | None, input_shapes: tuple[tuple[int, ...], ...]) -> None:
        super().__init__(path, reason)
        self.layer = layer
        self.input_shapes = input_shapes


class TensorDataError(CkptviewError):
    """A tensor's stored bytes cannot be turned into a torch.Tensor (unsupported layout, missing data)."""
