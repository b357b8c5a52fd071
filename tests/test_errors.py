"""Every bad input gets one clear message, never a raw traceback, and the input file is never modified."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import struct
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import ckptview
from ckptview.cli import main
from ckptview.errors import (
    CheckpointNotFoundError,
    CheckpointPermissionError,
    CkptviewError,
    CorruptCheckpointError,
    ShardError,
    TruncatedCheckpointError,
    UnsupportedFormatError,
)


def _state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).state_dict()


def _write_safetensors_header(path: Path, header: dict, data: bytes = b"", length: int | None = None) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)


def _bad_inputs(tmp: Path) -> dict[str, tuple[Path, type[CkptviewError], str]]:
    cases: dict[str, tuple[Path, type[CkptviewError], str]] = {}

    empty = tmp / "empty.pt"
    empty.write_bytes(b"")
    cases["empty"] = (empty, CorruptCheckpointError, "the file is empty \\(0 bytes\\)")

    whole = tmp / "whole.pt"
    torch.save(_state(), whole)
    data = whole.read_bytes()

    truncated = tmp / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    cases["truncated zip"] = (truncated, TruncatedCheckpointError, "it was cut off while copying")

    corrupt_pickle = tmp / "corrupt_member.pt"
    pkl_at = data.index(b"\x80\x02", data.index(b"data.pkl"))  # first byte of data.pkl's pickle
    corrupt_pickle.write_bytes(data[:pkl_at + 5] + bytes([data[pkl_at + 5] ^ 0xFF]) + data[pkl_at + 6:])
    cases["corrupt zip member"] = (corrupt_pickle, CorruptCheckpointError, "archive member .*data.pkl is damaged")

    legacy = tmp / "legacy.pt"
    torch.save(_state(), legacy, _use_new_zipfile_serialization=False)
    legacy_cut = tmp / "legacy_cut.pt"
    legacy_cut.write_bytes(legacy.read_bytes()[:-100])
    cases["truncated legacy"] = (legacy_cut, TruncatedCheckpointError, "it was cut off")

    def rezipped(name: str, storage_bytes: Callable[[bytes], bytes | None], method: int = zipfile.ZIP_STORED) -> Path:
        """whole.pt's members written again by zipfile, the first storage's bytes changed (None: left out)."""
        target = tmp / name
        with zipfile.ZipFile(whole) as source, zipfile.ZipFile(target, "w", method) as out:
            for member in source.namelist():
                content = source.read(member)
                if member.endswith("/data/0"):
                    content = storage_bytes(content)
                if content is not None:
                    out.writestr(member, content)
        return target

    cases["storage member compressed"] = (rezipped("deflated.pt", lambda b: b, zipfile.ZIP_DEFLATED),
                                          UnsupportedFormatError, "member .*data/0 is compressed; torch.save never")
    cases["storage member short"] = (rezipped("short.pt", lambda b: b[:-4]), CorruptCheckpointError,
                                     "storage '0' should hold 432 bytes but its archive member has 428")
    cases["storage member missing"] = (rezipped("missing_storage.pt", lambda b: None), CorruptCheckpointError,
                                       "refers to storage '0' but the archive has no member .*data/0")

    unfinished = tmp / "unfinished.pt"  # torch.save fails to pickle a module object: its zip has no data.pkl
    with pytest.raises(TypeError):
        torch.save({"w": torch.ones(2), "module": os}, unfinished)
    cases["torch.save that failed"] = (unfinished, CorruptCheckpointError, "torch.save stopped before writing it")

    png = tmp / "image.pt"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    cases["png renamed .pt"] = (png, UnsupportedFormatError, "this is a PNG image, not a checkpoint")

    text = tmp / "notes.pt"
    text.write_text("epoch 3 loss 0.25\nthis is not a checkpoint\n")
    cases["text"] = (text, UnsupportedFormatError, "this is a text file \\(it starts with 'epoch 3 loss 0.25'\\)")

    html = tmp / "download.pth"
    html.write_text("<!DOCTYPE html><html><head><title>Sign in</title></head><body>...</body></html>")
    cases["html"] = (html, UnsupportedFormatError, "this is an HTML page.*, not a checkpoint: download the file again\\.$")

    gzipped = tmp / "model.pt.gz"  # what it is and what to do: no list of formats after it
    gzipped.write_bytes(gzip.compress(data))
    cases["gzip"] = (gzipped, UnsupportedFormatError,
                     "this is a gzip-compressed file, not a checkpoint: decompress it \\(gunzip\\) and open the result\\.$")

    zeros = tmp / "preallocated.safetensors"
    zeros.write_bytes(bytes(10_000))
    cases["zero-filled"] = (zeros, UnsupportedFormatError, "zero bytes throughout its first 4,096 .*, not a checkpoint: "
                                                           "download or copy it again\\.$")

    lfs = tmp / "lfs.bin"
    lfs.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    cases["git lfs pointer"] = (lfs, UnsupportedFormatError, "a Git LFS pointer.*git lfs pull")

    huge = tmp / "huge_header.safetensors"
    _write_safetensors_header(huge, {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(8), length=2**40)
    cases["safetensors huge header length"] = (huge, CorruptCheckpointError, "header claims 1,099,511,627,776 bytes")

    beyond = tmp / "beyond.safetensors"
    _write_safetensors_header(beyond, {"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}, bytes(16))
    cases["safetensors offsets out of range"] = (beyond, TruncatedCheckpointError, "places data up to byte .* cut off")

    overlap = tmp / "overlap.safetensors"
    _write_safetensors_header(overlap, {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                                        "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, bytes(24))
    cases["safetensors overlapping"] = (overlap, CorruptCheckpointError, "tensors 'a' and 'b' overlap")

    wrong_size = tmp / "wrong_size.safetensors"
    _write_safetensors_header(wrong_size, {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}, bytes(12))
    cases["safetensors size disagrees with shape"] = (wrong_size, CorruptCheckpointError, "need 16 bytes")

    repeated = tmp / "repeated_name.safetensors"  # json.loads keeps the last; the file means one of them
    spec = '{"dtype": "F32", "shape": [2], "data_offsets": [%d, %d]}'
    raw = ('{"w": %s, "w": %s}' % (spec % (0, 8), spec % (8, 16))).encode()
    repeated.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(16))
    cases["safetensors tensor named twice"] = (repeated, CorruptCheckpointError, "gives 'w' twice in one object")
    repeated_field = tmp / "repeated_field.safetensors"
    raw = b'{"w": {"dtype": "F32", "shape": [2], "shape": [1], "data_offsets": [0, 8]}}'
    repeated_field.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(8))
    cases["safetensors field repeated"] = (repeated_field, CorruptCheckpointError, "gives 'shape' twice in one object")

    directory = tmp / "a_directory"
    directory.mkdir()
    (directory / "readme.txt").write_text("hi")
    cases["directory"] = (directory, UnsupportedFormatError, "a directory, not a checkpoint file; it holds readme.txt")

    cases["missing"] = (tmp / "nope.pt", CheckpointNotFoundError, "no such file or directory")
    return cases


def _case_names() -> list[str]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return list(_bad_inputs(Path(tmp)))


@pytest.mark.parametrize("case", _case_names())
def test_bad_input_message_and_bytes_unchanged(tmp_path: Path, case: str) -> None:
    path, error, pattern = _bad_inputs(tmp_path)[case]
    before = path.read_bytes() if path.is_file() else None
    with pytest.raises(error, match=pattern) as raised:
        ckptview.open(path)
    message = str(raised.value)
    assert "\n" not in message and message.startswith(str(path))
    assert "Traceback" not in message
    if before is not None:
        assert path.read_bytes() == before


@pytest.mark.parametrize("case", ["truncated zip", "png renamed .pt", "safetensors overlapping", "missing"])
def test_cli_prints_one_line_and_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str) -> None:
    path, _, pattern = _bad_inputs(tmp_path)[case]
    assert main(["info", str(path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckptview: error: ")


def test_permission_denied(tmp_path: Path) -> None:
    """As root the test drops its effective uid, since root reads any file."""
    folder = Path(tempfile.mkdtemp(dir="/tmp"))
    folder.chmod(0o755)
    path = folder / "locked.pt"
    torch.save(_state(), path)
    path.chmod(0)
    as_root = os.geteuid() == 0
    try:
        if as_root:
            os.seteuid(65534)  # nobody; the real uid stays root, so it can be restored
        with pytest.raises(CheckpointPermissionError, match="permission denied: this user may not read the file"):
            ckptview.open(path)
    finally:
        if as_root:
            os.seteuid(0)
        shutil.rmtree(folder)


def test_shard_errors_name_the_file(tmp_path: Path) -> None:
    state = _state()
    names = list(state)
    save_file({k: state[k] for k in names[:3]}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({k: state[k] for k in names[3:]}, tmp_path / "model-00002-of-00002.safetensors")
    index = {"metadata": {"total_size": 0}, "weight_map": {k: ("model-00001-of-00002.safetensors" if i < 3 else
                                                              "model-00002-of-00002.safetensors") for i, k in enumerate(names)}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with ckptview.open(tmp_path) as ckpt:
        assert ckpt.format == "safetensors-sharded" and [e.name for e in ckpt.tensors()] == names

    (tmp_path / "model-00003-of-00002.safetensors").write_bytes((tmp_path / "model-00002-of-00002.safetensors").read_bytes())
    with pytest.raises(ShardError, match="shard file model-00003-of-00002.safetensors is in .* but the index does not list it"):
        ckptview.open(tmp_path / "model.safetensors.index.json")
    (tmp_path / "model-00003-of-00002.safetensors").unlink()
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ShardError, match="shard model-00002-of-00002.safetensors listed in the index is missing"):
        ckptview.open(tmp_path)


def test_safetensors_metadata_naming_a_field_is_not_a_repeated_key(tmp_path: Path) -> None:
    """The repeated-key check counts "data_offsets" in the raw header: metadata that holds that text
    (a key or a value) changes the count, and the exact parse then finds nothing repeated."""
    path = tmp_path / "odd_metadata.safetensors"
    save_file({"w": torch.ones(2)}, path, metadata={"data_offsets": "see \"data_offsets\" below"})
    with ckptview.open(path) as ckpt:
        assert [e.name for e in ckpt.tensors()] == ["w"] and ckpt.metadata["data_offsets"].startswith("see")
