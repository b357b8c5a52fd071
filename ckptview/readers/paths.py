"""Files a checkpoint names (shards, DCP data files, ONNX external data), kept inside its folder."""

from __future__ import annotations

import os

from ckptview.errors import CorruptCheckpointError, printable


def resolve_inside(folder: str, name: object, *, named_by: str, what: str) -> str:
    """
    The real path of `name`, a file that `named_by` (an index, metadata or model file) refers to,
    which must stay inside `folder` once symlinks are followed: `../`, absolute paths and links
    leading out are refused, so a downloaded index cannot make ckptview read (or echo) any other
    file on the machine.

    Raises:
        CorruptCheckpointError: the name is not a relative path inside the folder.
    """
    text = name if isinstance(name, str) else None
    root = os.path.realpath(folder)
    if text and "\x00" not in text and not os.path.isabs(text):
        resolved = os.path.realpath(os.path.join(root, text))
        if os.path.commonpath([root, resolved]) == root and resolved != root:
            return resolved
    raise CorruptCheckpointError(named_by, f"it names {what} {printable(name)!s}, which is not a file inside its "
                                           f"folder {printable(root)}: ckptview reads only files beside it. Keep the "
                                           "files together, with plain relative names.")
