"""GGUF files written by `gguf.GGUFWriter`, read by ckptview and checked against `gguf`'s own reader."""

from __future__ import annotations

import json
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize, quantize  # noqa: E402

import ckptview  # noqa: E402
from ckptview.errors import CkptviewError, CorruptCheckpointError, TruncatedCheckpointError  # noqa: E402
from ckptview.readers.gguf_file import metadata_value  # noqa: E402
from format_checks import check_every_command, check_every_tab, cli  # noqa: E402

Q = gguf.GGMLQuantizationType
VOCAB = 300
DIM = 256
BLOCKS = 3


def k_quant_blocks(rng: np.random.Generator, rows: int, cols: int, qtype: Q) -> np.ndarray:
    """Random Q4_K blocks with finite scales: gguf (0.19) has a K-quant dequantizer but no quantizer,
    so the blocks are made byte by byte, their fp16 super-block scales (d, dmin) set to 0.01."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (rows, cols // block_size, type_size), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    blocks[..., 0:2] = scale
    blocks[..., 2:4] = scale
    return blocks.reshape(rows, -1)


def write_model(path: Path, *, tensors: bool = True, vocab: list[str] | None = None) -> Path:
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(BLOCKS)
    writer.add_context_length(128)
    writer.add_embedding_length(DIM)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(vocab or [f"tok{i}" for i in range(VOCAB)])
    writer.add_token_scores([i / 7 for i in range(len(vocab or range(VOCAB)))])
    writer.add_token_types([1 + i % 3 for i in range(len(vocab or range(VOCAB)))])
    writer.add_bool("test.flag", True)
    if tensors:
        writer.add_tensor("token_embd.weight", rng.standard_normal((VOCAB, DIM)).astype(np.float16))
        for block in range(BLOCKS):
            weights = {name: rng.standard_normal((DIM, DIM)).astype(np.float32) for name in ("q", "k", "v", "o")}
            writer.add_tensor(f"blk.{block}.attn_q.weight", quantize(weights["q"], Q.Q8_0), raw_dtype=Q.Q8_0)
            writer.add_tensor(f"blk.{block}.attn_k.weight", quantize(weights["k"], Q.Q4_0), raw_dtype=Q.Q4_0)
            writer.add_tensor(f"blk.{block}.attn_v.weight", k_quant_blocks(rng, DIM, DIM, Q.Q4_K), raw_dtype=Q.Q4_K)
            writer.add_tensor(f"blk.{block}.attn_output.weight", weights["o"].astype(np.float16))
            writer.add_tensor(f"blk.{block}.attn_norm.weight", rng.standard_normal(DIM).astype(np.float32))
        writer.add_tensor("output_norm.weight", np.ones(DIM, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("gguf") / "model.gguf")


def test_names_shapes_and_types_equal_gguf_reader(model: Path) -> None:
    reader = gguf.GGUFReader(model)
    with ckptview.open(model) as ckpt:
        assert ckpt.format == "gguf"
        assert [e.name for e in ckpt.tensors()] == [t.name for t in reader.tensors]
        for tensor in reader.tensors:
            entry = ckpt.tensor(tensor.name)
            assert entry.shape == tuple(reversed(tensor.shape.tolist()))  # numpy order: innermost dimension last
            assert entry.nbytes == tensor.n_bytes
            if tensor.tensor_type in (Q.F16, Q.F32):
                assert entry.layout == "strided" and entry.encoding is None
                assert entry.dtype == {Q.F16: torch.float16, Q.F32: torch.float32}[tensor.tensor_type]
            else:
                assert entry.layout == "encoded" and entry.encoding == tensor.tensor_type.name
                assert entry.dtype == torch.float32
                assert entry.info.encoding_params["block_size"] == gguf.GGML_QUANT_SIZES[tensor.tensor_type][0]
        assert ckpt.details["ggml_types"] == {"F16": 1 + BLOCKS, "Q8_0": BLOCKS, "Q4_0": BLOCKS, "Q4_K": BLOCKS,
                                              "F32": BLOCKS + 1}


def test_loaded_values_equal_gguf_dequantize_exactly(model: Path) -> None:
    reader = gguf.GGUFReader(model)
    with ckptview.open(model) as ckpt:
        for tensor in reader.tensors:
            expected = torch.from_numpy(np.array(dequantize(tensor.data, tensor.tensor_type)))
            entry = ckpt.tensor(tensor.name)
            loaded = entry.load()
            assert loaded.shape == expected.shape
            assert torch.equal(loaded.float(), expected), tensor.name
            # chunks of 250 elements cut through Q8_0's 32- and Q4_K's 256-element blocks
            chunks = list(entry.iter_chunks(1000))
            assert torch.equal(torch.cat(chunks).float(), expected.reshape(-1)), tensor.name


def test_statistics_of_quantized_tensors_are_those_of_the_dequantized_values(model: Path) -> None:
    reader = gguf.GGUFReader(model)
    with ckptview.open(model) as ckpt:
        result = ckptview.stats(ckpt, progress=False, chunk_bytes=4096)
        for tensor in reader.tensors:
            item = result[tensor.name]
            values = torch.from_numpy(np.array(dequantize(tensor.data, tensor.tensor_type))).double()
            assert not item.skipped
            assert item.min == values.min().item() and item.max == values.max().item()
            # float32 block sums, as for any float32 tensor: exact to float32 rounding of the spread
            assert item.mean == pytest.approx(values.mean().item(), abs=1e-6 * values.std().item())
            assert item.std == pytest.approx(values.std().item(), rel=1e-6)


def _type_gguf_cannot_dequantize() -> Q | None:
    for qtype in Q:
        block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
        try:
            dequantize(np.zeros(type_size, dtype=np.uint8), qtype)
        except NotImplementedError:
            if block_size > 1:  # a block type, not a plain one gguf reads as it is
                return qtype
    return None


def test_a_type_gguf_cannot_dequantize_is_listed_and_the_others_still_measured(tmp_path: Path) -> None:
    """gguf lists block types it has no decoder for (Q8_1 in 0.19): such a tensor is listed and named as
    not decoded, and statistics and diffs of the file's other tensors still run."""
    qtype = _type_gguf_cannot_dequantize()
    if qtype is None:
        pytest.skip("the installed gguf dequantizes every type it knows")
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    path = tmp_path / "mixed.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    weights = np.linspace(-1, 1, 2 * DIM, dtype=np.float32).reshape(2, DIM)
    writer.add_tensor("q8_0", quantize(weights, Q.Q8_0), raw_dtype=Q.Q8_0)
    blocks = np.zeros((2, DIM // gguf.GGML_QUANT_SIZES[qtype][0] * type_size), dtype=np.uint8)
    writer.add_tensor("undecodable", blocks, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with ckptview.open(path) as ckpt:
        entry = ckpt.tensor("undecodable")
        assert (entry.encoding, entry.shape) == (qtype.name, (2, DIM))
        result = ckptview.stats(ckpt, progress=False)
        assert result["undecodable"].skipped.startswith(f"{qtype.name} blocks, which gguf")
        assert not result["q8_0"].skipped and result["q8_0"].max == pytest.approx(1.0, abs=0.01)
    values = ckptview.diff(path, path, values=True).values
    assert [t.key for t in values.tensors] == ["q8_0"] and values.unreadable == ("undecodable",)
    check_every_command(path)


def test_metadata_table_summarises_arrays_and_decodes_them_on_demand(model: Path) -> None:
    reader = gguf.GGUFReader(model)
    with ckptview.open(model) as ckpt:
        rows = {row["key"]: row for row in ckpt.details["metadata"]}
        assert list(rows) == [key for key in reader.fields if not key.startswith("GGUF.")]
        tokens = rows["tokenizer.ggml.tokens"]
        assert tokens["type"] == "array[string]" and tokens["length"] == VOCAB
        assert tokens["first"] == ["tok0", "tok1", "tok2", "tok3", "tok4"]
        assert ckpt.metadata["tokenizer.ggml.tokens"] == "[300 × string: 'tok0', 'tok1', 'tok2', 'tok3', 'tok4', …]"
        assert rows["llama.block_count"] == {"key": "llama.block_count", "type": "uint32", "value": BLOCKS}
        assert ckpt.details["architecture"] == "llama" and ckpt.details["gguf_version"] == 3
        for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type", "test.flag",
                    "general.architecture"):
            assert metadata_value(ckpt, key) == reader.fields[key].contents(), key


def test_vocabulary_is_not_decoded_at_open(tmp_path: Path) -> None:
    # A token that is not UTF-8 deep in the vocabulary: an open that decoded the array would fail.
    path = write_model(tmp_path / "vocab.gguf", tensors=False, vocab=[f"t{i}" for i in range(2000)])
    data = bytearray(path.read_bytes())
    at = data.index(b"t1500")
    data[at:at + 5] = b"\xff\xfe\xfd\xfc\xfb"
    path.write_bytes(bytes(data))
    with ckptview.open(path) as ckpt:
        assert ckpt.details["metadata"][5]["first"] == ["t0", "t1", "t2", "t3", "t4"]
        with pytest.raises(CorruptCheckpointError, match="not valid UTF-8"):
            metadata_value(ckpt, "tokenizer.ggml.tokens")
        assert metadata_value(ckpt, "tokenizer.ggml.scores")[1999] == pytest.approx(1999 / 7)


def test_vocab_only_file_opens_and_shows_its_metadata(tmp_path: Path) -> None:
    path = write_model(tmp_path / "vocab-only.gguf", tensors=False)
    with ckptview.open(path) as ckpt:
        assert ckpt.tensor_count == 0 and ckpt.total_bytes == 0
        assert ckpt.metadata["tokenizer.ggml.model"] == "llama"
    code, out, _ = cli("info", str(path))
    assert code == 0 and "tokenizer.ggml.model=llama" in out
    overview = check_every_tab(path).panels["Overview"]
    assert "tokenizer.ggml.tokens" in overview.metadata.value and "300 × string" in overview.metadata.value


def test_module_tree_folds_blocks_and_names_layer_kinds(model: Path) -> None:
    with ckptview.open(model) as ckpt:
        tree = ckptview.module_tree(ckpt)
        blk = next(node for node in tree.root.children if node.name == "blk")
        assert [(node.name, node.repeat) for node in blk.children] == [(f"0…{BLOCKS - 1}", BLOCKS)]
        kinds = {row.name: (row.layer_kind, row.encoding) for row in ckptview.tensor_table(ckpt).rows}
    assert kinds["blk.0.attn_q.weight"] == ("attention.q", "Q8_0")
    assert kinds["blk.0.attn_k.weight"] == ("attention.k", "Q4_0")
    assert kinds["blk.0.attn_v.weight"] == ("attention.v", "Q4_K")
    assert kinds["blk.0.attn_output.weight"] == ("attention.out", "")
    assert kinds["blk.0.attn_norm.weight"][0] == "RMSNorm"
    assert kinds["token_embd.weight"][0] == "Embedding"


def test_every_command_and_tab_runs_and_info_json_has_details(model: Path) -> None:
    info = check_every_command(model)
    assert info["format"] == "gguf" and info["details"]["gguf_version"] == 3
    assert info["details"]["ggml_types"]["Q4_K"] == BLOCKS
    assert any(row["key"] == "tokenizer.ggml.tokens" and row["length"] == VOCAB for row in info["details"]["metadata"])
    app = check_every_tab(model)
    assert "float32 (Q4_K)" in set(app.panels["Tensors"].rows.frame["dtype"])


# --- hostile files: built byte by byte --------------------------------------------------------------

def _string(text: bytes) -> bytes:
    return struct.pack("<Q", len(text)) + text


def _kv_u32(key: bytes, value: int) -> bytes:
    return _string(key) + struct.pack("<II", int(gguf.GGUFValueType.UINT32), value)


def _tensor(name: bytes, dims: list[int], ggml_type: int, offset: int) -> bytes:
    return _string(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims) \
        + struct.pack("<IQ", ggml_type, offset)


def raw_gguf(kvs: list[bytes], tensors: list[bytes], *, data: bytes = b"", tensor_count: int | None = None,
             kv_count: int | None = None) -> bytes:
    header = b"GGUF" + struct.pack("<IQQ", 3, len(tensors) if tensor_count is None else tensor_count,
                                   len(kvs) if kv_count is None else kv_count)
    body = header + b"".join(kvs) + b"".join(tensors)
    return body + b"\0" * (-len(body) % 32) + data


F32 = int(Q.F32)
ARRAY = int(gguf.GGUFValueType.ARRAY)
STRING = int(gguf.GGUFValueType.STRING)
HOSTILE = {
    "tensor count lies": (raw_gguf([], [_tensor(b"w", [4], F32, 0)], data=bytes(16), tensor_count=2**60),
                          CorruptCheckpointError, "claims 1,152,921,504,606,846,976 tensors"),
    "metadata count lies": (raw_gguf([_kv_u32(b"a", 1)], [], kv_count=2**62), CorruptCheckpointError,
                            "metadata entries"),
    "tensor count one too many": (raw_gguf([], [_tensor(b"w", [4], F32, 0)] * 1, data=bytes(16), tensor_count=2),
                                  TruncatedCheckpointError, "cut off"),
    "dimensions overflow 64 bits": (raw_gguf([], [_tensor(b"w", [2**40, 2**40, 2**40], F32, 0)], data=bytes(16)),
                                    TruncatedCheckpointError, "would end at byte"),
    "too many dimensions": (raw_gguf([], [_tensor(b"w", [1] * 9, F32, 0)]), CorruptCheckpointError,
                            "claims 9 dimensions"),
    "data offset past the end": (raw_gguf([], [_tensor(b"w", [4], F32, 2**50)], data=bytes(16)),
                                 TruncatedCheckpointError, "would end at byte"),
    "data offset not aligned": (raw_gguf([], [_tensor(b"w", [4], F32, 4)], data=bytes(32)),
                                CorruptCheckpointError, "not a multiple of the file's alignment"),
    "tensors overlap": (raw_gguf([], [_tensor(b"a", [8], F32, 0), _tensor(b"b", [8], F32, 0)], data=bytes(64)),
                        CorruptCheckpointError, "overlap"),
    "quant rows not whole blocks": (raw_gguf([], [_tensor(b"w", [33], int(Q.Q8_0), 0)], data=bytes(64)),
                                    CorruptCheckpointError, "blocks of 32"),
    "unknown GGML type": (raw_gguf([], [_tensor(b"w", [4], 999, 0)], data=bytes(16)), CorruptCheckpointError,
                          "GGML type 999"),
    "absurd array length": (raw_gguf([_string(b"tokens") + struct.pack("<IIQ", ARRAY, STRING, 2**61)], []),
                            CorruptCheckpointError, "claims 2,305,843,009,213,693,952 elements"),
    "absurd string length": (raw_gguf([_string(b"name") + struct.pack("<IQ", STRING, 2**62)], []),
                             TruncatedCheckpointError, "cut off"),
    "absurd key length": (raw_gguf([struct.pack("<Q", 2**40) + b"x" * 64], []), CorruptCheckpointError,
                          "claims 1,099,511,627,776 bytes"),
    "unknown version": (b"GGUF" + struct.pack("<IQQ", 7, 0, 0), CorruptCheckpointError, "version 7"),
    "bad alignment": (raw_gguf([_kv_u32(b"general.alignment", 24)], []), CorruptCheckpointError,
                      "not a power of two"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_gguf_is_refused_in_one_line(tmp_path: Path, case: str) -> None:
    content, error, message = HOSTILE[case]
    path = tmp_path / "hostile.gguf"
    path.write_bytes(content)
    tracemalloc.start()
    try:
        with pytest.raises(error, match=message) as caught:
            ckptview.open(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20
    assert "\n" not in str(caught.value)
    code, out, err = cli("info", str(path))
    assert code == 1 and not out and err.count("\n") == 1 and message.split(",")[0] in err
    assert path.read_bytes() == content


def test_every_cut_of_a_gguf_file_is_refused_or_reads_whole(model: Path, tmp_path: Path) -> None:
    content = model.read_bytes()
    with ckptview.open(model) as ckpt:
        data_start = ckpt.details["tensor_data_offset"]
    cuts = list(range(1, data_start + 64, 37)) + list(range(data_start + 64, len(content), 4099))
    path = tmp_path / "cut.gguf"
    for cut in cuts:
        path.write_bytes(content[:cut])
        try:
            with ckptview.open(path) as ckpt:
                for entry in ckpt.tensors():
                    entry.load()
        except CkptviewError as exc:
            assert "\n" not in str(exc)
            continue
        raise AssertionError(f"a GGUF file cut at byte {cut:,} of {len(content):,} opened without complaint")


def test_cli_tensors_shows_the_stored_encoding(model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ckptview.cli import main

    assert main(["tensors", str(model)]) == 0
    line = next(row for row in capsys.readouterr().out.splitlines() if row.startswith("blk.0.attn_v.weight"))
    assert "Q4_K → float32" in line
    assert main(["tensors", "--json", str(model)]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["blk.0.attn_v.weight"]["encoding"] == "Q4_K" and rows["blk.0.attn_v.weight"]["dtype"] == "float32"
