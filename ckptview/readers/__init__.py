"""
Readers: the only code that opens files or knows formats. `open_checkpoint` looks at the
content (magic bytes, zip members, JSON), never at the extension, and returns a `Checkpoint`.
"""

from __future__ import annotations

import os
import stat

from ckptview.errors import (
    CheckpointNotFoundError,
    CheckpointPermissionError,
    CkptviewError,
    CorruptCheckpointError,
    UnsupportedFormatError,
)
from ckptview.readers.model import Checkpoint, PickledObject, PickleImport, TensorEntry, TensorInfo, gc_paused
from ckptview.readers.registry import EMPTY_ZIP_MAGIC, HEAD_BYTES, Probe, find_format, supported
from ckptview.readers.sniff import describe

__all__ = ["open_checkpoint", "Checkpoint", "TensorEntry", "TensorInfo", "PickledObject", "PickleImport"]

def open_checkpoint(path: str | os.PathLike[str], *, trust: bool = False) -> Checkpoint:
    path = os.fspath(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise CheckpointNotFoundError(path, "no such file or directory: check the path (and the current directory, "
                                            f"{os.getcwd()})") from None
    except PermissionError as exc:
        raise CheckpointPermissionError(path, "permission denied while looking it up: check the permissions of "
                                              "its folders") from exc
    except OSError as exc:
        raise CkptviewError(path, f"cannot look it up: {exc.strerror or exc}") from exc
    if stat.S_ISDIR(info.st_mode):
        from ckptview.readers.directory import open_directory

        with gc_paused():
            return open_directory(path, trust=trust)
    if not stat.S_ISREG(info.st_mode):
        raise UnsupportedFormatError(path, "not a regular file (a device, socket or pipe); give the path of a "
                                           "checkpoint file")
    try:
        with open(path, "rb") as stream:
            head = stream.read(HEAD_BYTES)
    except PermissionError as exc:
        raise CheckpointPermissionError(path, "permission denied: this user may not read the file. Fix its "
                                              "permissions (chmod/chown) or copy it somewhere readable") from exc
    except OSError as exc:
        raise CkptviewError(path, f"cannot read it: {exc.strerror or exc}") from exc
    with gc_paused():
        return _open_file(path, head, info.st_size, trust=trust)


def _open_file(path: str, head: bytes, size: int, *, trust: bool) -> Checkpoint:
    if size == 0:
        raise CorruptCheckpointError(path, "the file is empty (0 bytes): the save or copy that made it never wrote "
                                           "any data. Save or copy it again.")
    probe = Probe(path, head, size)
    fmt = find_format(probe)
    if fmt is not None:
        return fmt.read(path, size, trust=trust)
    if head.startswith(EMPTY_ZIP_MAGIC):
        raise UnsupportedFormatError(path, f"an empty zip archive, not a checkpoint; {supported()}.")
    raise UnsupportedFormatError(path, f"this is {describe(head)}, not a checkpoint; {supported()}.")
