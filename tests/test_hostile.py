"""Hostile and mangled files: only ckptview's own errors come out, nothing allocates without bound."""

from __future__ import annotations

import io
import random
import resource
import zipfile
from pathlib import Path

import pytest
import torch

import ckptview
from ckptview.errors import CkptviewError, CorruptCheckpointError


def _saved(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _zip_with_pickle(path: Path, payload: bytes, base: bytes | None = None) -> None:
    """A torch zip whose data.pkl is `payload`, re-zipped so its CRC is right: only the pickle lies."""
    with zipfile.ZipFile(io.BytesIO(base or _saved({"w": torch.ones(2)}))) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    members[next(n for n in members if n.endswith("/data.pkl"))] = payload
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)


@pytest.mark.parametrize("callable_name", [b"bytearray", b"bytes"])
def test_allocation_bomb_is_refused(tmp_path: Path, callable_name: bytes) -> None:
    # builtins.bytearray(10**13): sixteen bytes of pickle asking for 10 TB
    payload = b"\x80\x02cbuiltins\n" + callable_name + b"\n\x8a\x06\x00\x00\x00\x00\x00\x10\x85R."
    path = tmp_path / "bomb.pt"
    _zip_with_pickle(path, payload)
    with pytest.raises(CorruptCheckpointError, match="not accepted"):
        ckptview.open(path)


def test_tensor_with_lying_strides_is_refused(tmp_path: Path) -> None:
    good = _saved({"w": torch.ones(3, 3)})
    with zipfile.ZipFile(io.BytesIO(good)) as archive:
        pkl = archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))
    # stride (3, 1) -> (3,): one stride for two dimensions
    lying = pkl.replace(b"K\x03K\x01\x86", b"K\x03\x85", 1)
    assert lying != pkl
    path = tmp_path / "lying.pt"
    _zip_with_pickle(path, lying, good)
    with pytest.raises(CorruptCheckpointError, match="do not describe a tensor"):
        ckptview.open(path)


def _mutate(data: bytes, rng: random.Random) -> bytes:
    mutated = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        choice = rng.random()
        if choice < 0.6:
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        elif choice < 0.8:
            start = rng.randrange(len(mutated))
            del mutated[start:start + rng.randint(1, 5)]
        else:
            mutated.insert(rng.randrange(len(mutated)), rng.randrange(256))
    return bytes(mutated)


def test_mangled_pickles_and_files_raise_only_ckptview_errors(tmp_path: Path) -> None:
    """A small fixed-seed fuzz over data.pkl (re-zipped, so the CRC does not catch it) and raw file bytes."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    objects = [model.state_dict(), {"model": model.state_dict(), "epoch": 3, "cfg": {"lr": [0.1, "x"]}}, model,
               {"t": torch.randn(4, 4).t(), "q": torch.quantize_per_tensor(torch.randn(3), 0.1, 2, torch.qint8)}]
    pickles, files = [], []
    for obj in objects:
        for zip_format in (True, False):
            buffer = io.BytesIO()
            torch.save(obj, buffer, _use_new_zipfile_serialization=zip_format)
            files.append(buffer.getvalue())
            if zip_format:
                with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as archive:
                    pickles.append(archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl"))))
    rng = random.Random(1234)
    limit = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, limit[1]))  # an unbounded allocation fails instead of swapping
    try:
        for attempt in range(400):
            path = tmp_path / f"case{attempt % 2}.pt"
            if attempt % 2:
                path.write_bytes(_mutate(rng.choice(files), rng))
            else:
                _zip_with_pickle(path, _mutate(rng.choice(pickles), rng))
            try:
                with ckptview.open(path) as ckpt:
                    for entry in ckpt.tensors():
                        entry.load()
                    ckptview.sections(ckpt)
                    ckptview.training_state(ckpt)
            except CkptviewError:
                pass
    finally:
        resource.setrlimit(resource.RLIMIT_AS, limit)
