"""Files a checkpoint names (shards, DCP data files, ONNX external data), kept inside its folder."""

from __future__ import annotations

import json
import os
import re
from typing import Any

from ckptview.errors import CorruptCheckpointError, UnsupportedFormatError, printable


def resolve_inside(folder: str, name: object, *, named_by: str, what: str) -> str:
    """
    The real path of `name`, a file that `named_by` (an index, metadata or model file) refers to,
    which must stay inside `folder` once symlinks are followed (see `confined_path`): `../`,
    absolute paths and links leading out are refused, so a downloaded index cannot make ckptview
    read (or echo) any other file on the machine.

    Raises:
        CorruptCheckpointError: the name is not a relative path inside the folder.
    """
    resolved = confined_path(folder, name)
    if resolved is None:
        raise CorruptCheckpointError(named_by, f"it names {what} {printable(name)!s}, which is not a file inside its "
                                               f"folder {printable(os.path.realpath(folder))}: ckptview reads only "
                                               "files beside it. Keep the files together, with plain relative names.")
    return resolved


def confined_path(folder: str, name: object) -> str | None:
    """
    The real path of the file `name` (relative) in `folder`, when it stays inside the folder once
    symlinks are followed; else None. One exception, for the Hugging Face hub's cache: a snapshot
    (`models--org--name/snapshots/<revision>/`, or a folder in one) holds each file as a link into
    its repository's `blobs/`, so a name inside the snapshot may lead into that `blobs/` folder,
    and nowhere else.
    """
    text = name if isinstance(name, str) else None
    if not text or "\x00" in text or os.path.isabs(text):
        return None
    root = os.path.realpath(folder)
    named = os.path.normpath(os.path.join(root, text))
    if not _within(root, named):
        return None
    resolved = os.path.realpath(named)
    if _within(root, resolved):
        return resolved
    blobs = _hub_blobs(root)
    return resolved if blobs is not None and _within(blobs, resolved) else None


def _within(folder: str, path: str) -> bool:
    return path != folder and os.path.commonpath([folder, path]) == folder


_HUB_REPOSITORY = re.compile(r"(models|datasets|spaces)--.+")


def _hub_blobs(folder: str) -> str | None:
    """The `blobs` folder of the Hugging Face cache repository whose snapshot `folder` (a real path) is in."""
    parts = folder.split(os.sep)
    for index in range(len(parts) - 2, 0, -1):
        if parts[index] == "snapshots" and _HUB_REPOSITORY.fullmatch(parts[index - 1]):
            blobs = os.path.join(os.sep.join(parts[:index]) or os.sep, "blobs")
            return blobs if os.path.isdir(blobs) else None
    return None


def read_json(path: str, max_bytes: int, *, too_large: str, unparsable: str, too_deep: str) -> Any:
    """A small JSON file a checkpoint keeps beside its data (a shard index, a Trainer's state), parsed,
    with each way it can fail said in the caller's words (`too_large` of a file over `max_bytes`)."""
    if os.path.getsize(path) > max_bytes:
        raise UnsupportedFormatError(path, too_large)
    try:
        with open(path, "rb") as stream:
            return json.load(stream)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptCheckpointError(path, unparsable) from exc
    except RecursionError as exc:
        raise CorruptCheckpointError(path, too_deep) from exc
