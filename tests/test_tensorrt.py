"""TensorRT engines: recognised by their signature (with or without Ultralytics' JSON prefix) and explained."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

import ckptview
from ckptview.errors import UnsupportedFormatError
from format_checks import cli

# An engine's first bytes as TensorRT 8.6 writes them: the "ftrt" signature, then the serialization
# version and sizes (netron's source/tensorrt.js reads the same fields); the rest is opaque kernels.
ENGINE = b"ftrt" + struct.pack("<IIQI", 0x61, 0, 4096, 0) + bytes(range(256)) * 4


def _ultralytics(engine: bytes, metadata: dict[str, object]) -> bytes:
    """What ultralytics' TensorRT export writes: a little-endian uint32 length, the JSON, then the engine."""
    text = json.dumps(metadata).encode()
    return struct.pack("<I", len(text)) + text + engine


@pytest.mark.parametrize("signature", [b"ftrt", b"ptrt"])
def test_engine_is_recognised_and_explained(tmp_path: Path, signature: bytes) -> None:
    path = tmp_path / "model.bin"  # the extension says nothing: the content does
    content = signature + ENGINE[4:]
    path.write_bytes(content)
    with pytest.raises(UnsupportedFormatError, match="a TensorRT engine: compiled GPU kernels for one GPU model and "
                                                     "one TensorRT version") as caught:
        ckptview.open(path)
    message = str(caught.value)
    assert "no weight table" in message and "Open the ONNX file or checkpoint it was built from" in message
    assert "\n" not in message
    code, out, err = cli("info", str(path))
    assert code == 1 and not out and err.count("\n") == 1 and "TensorRT engine" in err
    assert path.read_bytes() == content


def test_ultralytics_engine_says_what_it_was_exported_from(tmp_path: Path) -> None:
    path = tmp_path / "yolov8n.engine"
    metadata = {"description": "Ultralytics YOLOv8n model trained on coco.yaml", "author": "Ultralytics",
                "version": "8.1.0", "task": "detect", "batch": 1, "imgsz": [640, 640], "names": {"0": "person"},
                "args": {"half": True}, "pad": "x" * 6000}  # past the 4 KB the probe reads first
    path.write_bytes(_ultralytics(ENGINE, metadata))
    with pytest.raises(UnsupportedFormatError) as caught:
        ckptview.open(path)
    message = str(caught.value)
    assert "a TensorRT engine (description Ultralytics YOLOv8n model trained on coco.yaml, version 8.1.0, task " \
           "detect, imgsz [640, 640], batch 1)" in message


def test_json_prefix_without_an_engine_is_not_called_one(tmp_path: Path) -> None:
    path = tmp_path / "not-an-engine.bin"
    path.write_bytes(_ultralytics(b"GIF89a" + bytes(64), {"description": "x"}))
    with pytest.raises(UnsupportedFormatError) as caught:
        ckptview.open(path)
    assert "this is unknown binary data" in str(caught.value) and "a TensorRT engine" not in str(caught.value)
