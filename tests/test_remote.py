"""Checkpoints by URL: a real HTTP server on 127.0.0.1 (with and without Range support) counting the bytes it sends."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import ckptview
from conftest import SmallCNN

pytest.importorskip("aiohttp")


class _Counting(SimpleHTTPRequestHandler):
    """Serves a folder; `sent` counts the body bytes sent. Without Range support (as `python -m http.server`)."""

    sent = 0

    def copyfile(self, source, outputfile) -> None:  # noqa: ANN001
        while chunk := source.read(1 << 16):
            # counted before it is written: the client may have the bytes before this thread runs again
            type(self).sent += len(chunk)
            try:
                outputfile.write(chunk)
            except (BrokenPipeError, ConnectionResetError):
                return  # the client hung up after the part it wanted

    def log_message(self, *args: object) -> None:
        pass


class _Ranged(_Counting):
    """The same with `Range: bytes=a-b` answered by 206 and exactly those bytes."""

    def do_GET(self) -> None:
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        path = self.translate_path(self.path)
        if match is None or not os.path.isfile(path):
            return super().do_GET()
        size = os.path.getsize(path)
        start = int(match.group(1))
        end = min(int(match.group(2)) if match.group(2) else size - 1, size - 1)
        if start >= size:
            self.send_error(416)
            return
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        with open(path, "rb") as stream:
            stream.seek(start)
            left = end - start + 1
            while left:
                chunk = stream.read(min(left, 1 << 20))
                type(self).sent += len(chunk)
                self.wfile.write(chunk)
                left -= len(chunk)


def _serve(folder: Path, handler: type[_Counting]) -> Iterator[tuple[str, type[_Counting]]]:
    counting = type("Handler", (handler,), {"sent": 0})
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(counting, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", counting
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    state = SmallCNN().state_dict()
    torch.save({"epoch": 3, "model_state_dict": state}, tmp_path / "cnn.pt")
    save_file(state, str(tmp_path / "cnn.safetensors"))
    names = list(state)
    weight_map = {}
    for number, part in enumerate((names[:4], names[4:]), start=1):
        shard = f"model-{number:05d}-of-00002.safetensors"
        save_file({k: state[k] for k in part}, str(tmp_path / shard))
        weight_map.update(dict.fromkeys(part, shard))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return tmp_path


@pytest.fixture
def ranged(folder: Path) -> Iterator[tuple[str, type[_Counting]]]:
    yield from _serve(folder, _Ranged)


def _big_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A 2 GB safetensors file written sparse: 8 zero tensors of 256 MB, and one small real one at the end."""
    small = torch.randn(64, 33)
    header: dict[str, object] = {}
    offset = 0
    for i in range(8):
        header[f"layers.{i}.weight"] = {"dtype": "F32", "shape": [8192, 8192], "data_offsets": [offset, offset + 2**28]}
        offset += 2**28
    header["head.weight"] = {"dtype": "F32", "shape": list(small.shape), "data_offsets": [offset, offset + small.nbytes]}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    if len(raw) % 256 == 0x80:  # b"\x80\x03" would open the file as a pickle (registry order; see the report)
        raw += b" " * 8
    with open(path, "wb") as stream:
        stream.write(struct.pack("<Q", len(raw)) + raw)
        stream.seek(8 + len(raw) + offset)
        stream.write(small.numpy().tobytes())
    return {"head.weight": small}


def test_listing_a_2gb_remote_file_moves_under_1mb(folder: Path, ranged: tuple[str, type[_Counting]]) -> None:
    expected = _big_safetensors(folder / "big.safetensors")
    assert os.path.getsize(folder / "big.safetensors") > 2 * 10**9
    url, server = ranged
    with ckptview.open(f"{url}/big.safetensors") as remote:
        assert len(remote.tensors()) == 9 and remote.tensor("layers.3.weight").shape == (8192, 8192)
        listed = server.sent
        assert listed < 2**20
        assert torch.equal(remote.tensor("head.weight").load(), expected["head.weight"])
        assert server.sent - listed == expected["head.weight"].nbytes  # the tensor's exact range, nothing more
        with ckptview.open(folder / "big.safetensors") as local:
            assert ckptview.stats(remote, filter="head", progress=False).to_frame().equals(
                ckptview.stats(local, filter="head", progress=False).to_frame())


@pytest.mark.parametrize("name", ["cnn.pt", "cnn.safetensors", "model.safetensors.index.json"])
def test_remote_statistics_equal_local(folder: Path, ranged: tuple[str, type[_Counting]], name: str) -> None:
    url, _ = ranged
    with ckptview.open(f"{url}/{name}") as remote, ckptview.open(folder / name) as local:
        assert remote.format == local.format
        assert [e.name for e in remote.tensors()] == [e.name for e in local.tensors()]
        assert ckptview.stats(remote, progress=False).to_frame().equals(ckptview.stats(local, progress=False).to_frame())


def test_server_without_range_support_gets_a_clear_message(folder: Path) -> None:
    _big_safetensors(folder / "big.safetensors")
    for url, server in _serve(folder, _Counting):
        with pytest.raises(ckptview.CkptviewError, match=r"ignores HTTP Range requests.*2\.00 GiB"):
            ckptview.open(f"{url}/big.safetensors")
        assert server.sent < 64 * 2**20  # it hung up instead of taking the 2 GB


def test_open_run_over_http(folder: Path, ranged: tuple[str, type[_Counting]], tmp_path: Path) -> None:
    run_folder = folder / "run"
    run_folder.mkdir()
    for epoch in (1, 2, 10):
        torch.manual_seed(epoch)
        torch.save({"epoch": epoch, "model_state_dict": SmallCNN().state_dict()}, run_folder / f"epoch_{epoch}.pt")
    url, _ = ranged
    remote = ckptview.open_run([f"{url}/run/epoch_{e}.pt" for e in (10, 2, 1)], cache=tmp_path / "cache")
    assert [c.epoch for c in remote.checkpoints] == [1, 2, 10]
    local = ckptview.open_run(run_folder, cache=False)
    columns = ["module", "epoch", "weight_norm", "rel_change_prev"]  # NaN at the first checkpoint: equal frames
    assert remote.analyze(progress=False).drift_frame()[columns].equals(local.analyze(progress=False).drift_frame()[columns])
    shutil.rmtree(run_folder)


class _RangedThenNot(_Ranged):
    """Answers the first ranged requests (the check at open passes), then ignores Range: 1 GB of zeros."""

    honoured = 1  # the 1-byte check at open

    def do_GET(self) -> None:
        type(self).honoured -= 1
        if type(self).honoured >= 0:
            return super().do_GET()
        self.send_response(200)
        self.send_header("Content-Length", str(1 << 30))
        self.end_headers()
        self._flood()

    def _flood(self) -> None:
        chunk = bytes(1 << 20)
        try:
            for _ in range(1 << 10):
                type(self).sent += len(chunk)
                self.wfile.write(chunk)
        except (BrokenPipeError, ConnectionResetError):
            return


class _LongRanges(_RangedThenNot):
    """Says 206 with the range asked for, then sends 1 GB past it (after the check and the first read)."""

    honoured = 2

    def do_GET(self) -> None:
        type(self).honoured -= 1
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if type(self).honoured >= 0 or match is None:
            return super().do_GET()
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {match.group(1)}-{match.group(2)}/{1 << 30}")
        self.end_headers()
        self._flood()


@pytest.mark.parametrize("handler", [_RangedThenNot, _LongRanges], ids=["ignores-ranges-later", "sends-more-than-asked"])
def test_a_server_that_sends_more_than_asked_is_cut_off(folder: Path, handler: type[_Counting]) -> None:
    """Each read takes at most one byte more than it asked for, whatever the server sends: reading the whole
    answer into memory (fsspec's cat_file) took 3 GB into the process before the check could see it."""
    for url, server in _serve(folder, handler):
        # whatever it reads as (a read from byte 0 takes the start of a whole-file answer), one line
        with pytest.raises(ckptview.CkptviewError) as failed:
            with ckptview.open(f"{url}/cnn.pt") as ckpt:
                ckptview.stats(ckpt, progress=False)
        assert "\n" not in str(failed.value)
        assert server.sent < 256 * 2**20, f"the client took {server.sent:,} bytes"
