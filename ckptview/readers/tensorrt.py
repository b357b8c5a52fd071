"""
TensorRT engines (`.engine`, `.plan`): recognised so the message can say what they are and what to
open instead. An engine is the output of TensorRT's builder: kernels chosen and fused for one GPU
model and one TensorRT version, with the weights folded into them in an undocumented layout. There
is no weight table to list, and even TensorRT only deserializes it on a matching GPU and version.

Why an error and not an empty `Checkpoint`: every analyzer would then report nothing (a diff
against the `.pt` it came from would call every key missing), which reads as an answer. The
error is one line, exits 1 in the CLI, and names the file to open; Ultralytics' JSON prefix,
when present, adds what the engine was exported from.
"""

from __future__ import annotations

import json
import struct

from ckptview.errors import UnsupportedFormatError
from ckptview.readers.model import Checkpoint

_MAX_PREFIX = 1 << 20  # Ultralytics' metadata is a few KB; more than this is not shown
_SHOWN_KEYS = ("description", "version", "date", "task", "imgsz", "batch")


def read_engine(path: str, size: int, *, trust: bool) -> Checkpoint:
    raise UnsupportedFormatError(path, explain(path))


def explain(path: str) -> str:
    exported = _exporter_metadata(path)
    origin = f" ({exported})" if exported else ""
    return (f"a TensorRT engine{origin}: compiled GPU kernels for one GPU model and one TensorRT version, with the "
            "weights folded into them; it holds no weight table ckptview (or anything but TensorRT on that GPU) can "
            "read. Open the ONNX file or checkpoint it was built from instead")


def _exporter_metadata(path: str) -> str:
    """What Ultralytics' length-prefixed JSON says about the export, e.g. 'Ultralytics YOLOv8n model …, 8.1.0'."""
    with open(path, "rb") as stream:
        head = stream.read(4)
        if len(head) < 4 or head in (b"ptrt", b"ftrt"):
            return ""
        (length,) = struct.unpack("<I", head)
        if length > _MAX_PREFIX:
            return ""
        raw = stream.read(length)
    try:
        metadata = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return ""
    if not isinstance(metadata, dict):
        return ""
    return ", ".join(f"{key} {_short(metadata[key])}" for key in _SHOWN_KEYS if key in metadata)


def _short(value: object) -> str:
    text = str(value)
    return text if len(text) <= 80 else text[:77] + "…"
