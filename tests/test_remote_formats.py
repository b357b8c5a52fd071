"""GGUF and ONNX files by URL: a real HTTP server with Range support on 127.0.0.1 counts the bytes it sends."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
onnx = pytest.importorskip("onnx")
pytest.importorskip("aiohttp")
from gguf.quants import quantize  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import ckptview  # noqa: E402
from ckptview.errors import CorruptCheckpointError  # noqa: E402
from ckptview.readers import remote  # noqa: E402
from ckptview.readers.gguf_file import metadata_value  # noqa: E402
from test_remote import _Counting, _Ranged, _serve  # noqa: E402

Q = gguf.GGMLQuantizationType
VOCAB = 60_000  # a real vocabulary's size: its ~1 MB of strings is more than the first 64 KiB request


def _write_gguf(path: Path) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(4)
    writer.add_token_list([f"token_{i}" for i in range(VOCAB)])
    writer.add_token_scores([i / 7 for i in range(VOCAB)])
    tensors: dict[str, np.ndarray] = {}
    for block in range(4):
        tensors[f"blk.{block}.ffn_up.weight"] = rng.standard_normal((1024, 2048)).astype(np.float32)  # 8 MiB
        writer.add_tensor(f"blk.{block}.ffn_up.weight", tensors[f"blk.{block}.ffn_up.weight"])
        q = rng.standard_normal((512, 1024)).astype(np.float32)
        tensors[f"blk.{block}.attn_q.weight"] = q
        writer.add_tensor(f"blk.{block}.attn_q.weight", quantize(q, Q.Q8_0), raw_dtype=Q.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


def _write_onnx(path: Path, *, external: str | None = None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    weights = {f"layers.{i}.weight": rng.standard_normal((1024, 1024)).astype(np.float32) for i in range(6)}  # 4 MiB
    weights["head.bias"] = rng.standard_normal(1024).astype(np.float32)
    nodes, previous = [], "x"
    for i in range(6):
        nodes.append(helper.make_node("MatMul", [previous, f"layers.{i}.weight"], [f"h{i}"], name=f"layers.{i}"))
        previous = f"h{i}"
    nodes.append(helper.make_node("Add", [previous, "head.bias"], ["y"], name="head"))
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1024])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1024])],
                              initializer=[numpy_helper.from_array(w, name) for name, w in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    if external is None:
        onnx.save_model(model, str(path))
    else:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=external, size_threshold=1024)
    return weights


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, str, type[_Counting]]]:
    for url, server in _serve(tmp_path, _Ranged):
        yield tmp_path, url, server


def test_remote_gguf_lists_from_its_header_and_loads_exact_ranges(served: tuple[Path, str, type[_Counting]]) -> None:
    folder, url, server = served
    tensors = _write_gguf(folder / "model.gguf")
    size = os.path.getsize(folder / "model.gguf")
    with ckptview.open(folder / "model.gguf") as local:
        header_end = local.details["tensor_data_offset"]
        local_stats = ckptview.stats(local, progress=False).to_frame()
    with ckptview.open(f"{url}/model.gguf") as remote:
        listed = server.sent
        # the header is 1.37 MB (mostly the vocabulary); it is read as a doubling prefix, so at most twice that
        assert header_end < listed <= 2 * header_end + 64 * 1024, (listed, header_end, size)
        assert listed < size / 10
        assert [(e.name, e.shape) for e in remote.tensors()] == [(e.name, e.shape) for e in local.tensors()]
        assert remote.details["metadata"] == local.details["metadata"]
        entry = remote.tensor("blk.2.ffn_up.weight")
        before = server.sent
        assert np.array_equal(entry.load().numpy(), tensors["blk.2.ffn_up.weight"])
        assert server.sent - before == entry.nbytes  # its exact range, nothing more
        quant = remote.tensor("blk.1.attn_q.weight")
        assert torch.equal(quant.load(), local.tensor("blk.1.attn_q.weight").load())
        assert metadata_value(remote, "tokenizer.ggml.tokens")[-1] == f"token_{VOCAB - 1}"
        assert ckptview.stats(remote, progress=False).to_frame().equals(local_stats)


def test_listing_that_would_read_past_the_header_limit_is_refused_before_the_download(
        served: tuple[Path, str, type[_Counting]], monkeypatch: pytest.MonkeyPatch) -> None:
    # a GGUF whose metadata is larger than the limit stands for one crafted to fill its file with
    # metadata: opening it must stop asking for bytes at the limit, not download the file
    folder, url, server = served
    _write_gguf(folder / "model.gguf")
    monkeypatch.setattr(remote, "LISTING_BYTES_LIMIT", 256 * 1024)
    with pytest.raises(CorruptCheckpointError, match="more than 0.25 MiB of headers.*stopped before downloading"):
        ckptview.open(f"{url}/model.gguf")
    assert server.sent <= 256 * 1024
    monkeypatch.undo()
    with ckptview.open(f"{url}/model.gguf") as listed:  # the real limit: this 1.4 MB header lists, and
        before = server.sent
        assert len(ckptview.stats(listed, progress=False).to_frame()) == len(listed.tensors())  # data: no limit
        assert server.sent - before > 8 * 2**20


def test_remote_onnx_steps_over_every_weight(served: tuple[Path, str, type[_Counting]]) -> None:
    folder, url, server = served
    weights = _write_onnx(folder / "mlp.onnx")
    size = os.path.getsize(folder / "mlp.onnx")
    weight_bytes = sum(w.nbytes for w in weights.values())
    with ckptview.open(f"{url}/mlp.onnx") as remote, ckptview.open(folder / "mlp.onnx") as local:
        listed = server.sent
        # what is not a weight (the graph, names, shapes: ~1 KB here) plus 4 KiB read ahead per weight, and a
        # few 4 KiB reads more: the format sniff, the model's fields, then its graph's from their start again
        assert listed <= size - weight_bytes + 4096 * (len(weights) + 4), (listed, size - weight_bytes)
        assert listed < 64 * 1024
        assert [(e.name, e.shape) for e in remote.tensors()] == [(e.name, e.shape) for e in local.tensors()]
        assert remote.layers == local.layers
        before = server.sent
        assert np.array_equal(remote.tensor("layers.4.weight").load().numpy(), weights["layers.4.weight"])
        assert server.sent - before == weights["layers.4.weight"].nbytes
        assert ckptview.stats(remote, progress=False).to_frame().equals(ckptview.stats(local, progress=False).to_frame())


def test_remote_onnx_external_data_by_exact_ranges(served: tuple[Path, str, type[_Counting]]) -> None:
    folder, url, server = served
    weights = _write_onnx(folder / "ext.onnx", external="ext.onnx.data")
    with ckptview.open(f"{url}/ext.onnx") as remote:
        # the 1 KB model file twice (format sniff, walk) and the one-byte Range checks; none of the 25 MB of data
        assert server.sent <= 2 * os.path.getsize(folder / "ext.onnx") + 3
        assert remote.details["external_data"] == ["ext.onnx.data"]
        before = server.sent
        assert np.array_equal(remote.tensor("head.bias").load().numpy(), weights["head.bias"])
        assert server.sent - before == weights["head.bias"].nbytes


def test_remote_onnx_external_data_outside_its_folder_is_refused(served: tuple[Path, str, type[_Counting]]) -> None:
    folder, url, _ = served
    (folder / "secret.bin").write_bytes(bytes(16))
    (folder / "models").mkdir()
    tensor = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4], data_location=TensorProto.EXTERNAL)
    for key, value in (("location", "../secret.bin"), ("offset", "0"), ("length", "16")):
        tensor.external_data.add(key=key, value=value)
    graph = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], initializer=[tensor])
    (folder / "models" / "bad.onnx").write_bytes(helper.make_model(graph).SerializeToString())
    before = (folder / "models" / "bad.onnx").read_bytes()
    with pytest.raises(ckptview.CkptviewError, match="not a file beside the model"):
        ckptview.open(f"{url}/models/bad.onnx")
    assert (folder / "models" / "bad.onnx").read_bytes() == before
