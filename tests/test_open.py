"""ckptview.open on real files: exact listings, lazy data, shared storages, every dtype it can meet."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import ckptview
from ckptview.cli import main as cli_main
from conftest import SmallCNN
from format_checks import check_every_command, check_every_tab


def listing(ckpt: ckptview.Checkpoint) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {e.name: (e.shape, e.dtype) for e in ckpt.tensors()}


def flatten(obj: object, prefix: str = "") -> dict[str, torch.Tensor]:
    """torch.load's result flattened to dotted names, the way ckptview names tensors."""
    out: dict[str, torch.Tensor] = {}
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(obj, (list, tuple)):
        for index, value in enumerate(obj):
            out.update(flatten(value, f"{prefix}.{index}" if prefix else str(index)))
    return out


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_listing_and_data_equal_torch_load(tmp_path: Path, trained_cnn: SmallCNN, zip_format: bool) -> None:
    optimizer = torch.optim.Adam(trained_cnn.parameters())
    trained_cnn(torch.randn(2, 3, 8, 8)).sum().backward()
    optimizer.step()
    payload = {"model_state_dict": trained_cnn.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 7,
               "loss": 0.25, "note": "trained", "history": [torch.tensor([1.0, 2.0]), 3]}
    path = tmp_path / "train.pth.tar"
    torch.save(payload, path, _use_new_zipfile_serialization=zip_format)

    expected = flatten(torch.load(path, weights_only=True))
    with ckptview.open(path) as ckpt:
        assert ckpt.format == ("torch-zip" if zip_format else "torch-legacy")
        assert listing(ckpt) == {name: (tuple(t.shape), t.dtype) for name, t in expected.items()}
        assert [e.name for e in ckpt.tensors()][:2] == ["model_state_dict.conv1.weight", "model_state_dict.bn1.weight"]
        for entry in ckpt.tensors():
            assert torch.equal(entry.load(), expected[entry.name]), entry.name
        assert ckpt.root["epoch"] == 7 and ckpt.root["loss"] == 0.25 and ckpt.root["note"] == "trained"
        assert not ckpt.needs_trust


def test_bare_state_dict_names_and_counts(cnn_state_dict_path: Path, trained_cnn: SmallCNN) -> None:
    state = trained_cnn.state_dict()
    with ckptview.open(cnn_state_dict_path) as ckpt:
        assert [e.name for e in ckpt.tensors()] == list(state)
        assert ckpt.parameter_count == sum(t.numel() for t in state.values())
        assert ckpt.total_bytes == sum(t.numel() * t.element_size() for t in state.values())
        entry = ckpt.tensor("fc.weight")
        assert (entry.shape, entry.dtype, entry.numel, entry.nbytes, entry.device) == ((10, 8), torch.float32, 80, 320, "cpu")
        with pytest.raises(KeyError, match="did you mean fc.weight"):
            ckpt.tensor("fc.weigth")


def test_safetensors_listing_matches_safe_open(tmp_path: Path, trained_cnn: SmallCNN) -> None:
    path = tmp_path / "model.safetensors"
    save_file(trained_cnn.state_dict(), path, metadata={"format": "pt", "epoch": "3"})
    with safe_open(path, "pt") as reference, ckptview.open(path) as ckpt:
        assert ckpt.format == "safetensors"
        assert ckpt.metadata == {"format": "pt", "epoch": "3"}
        assert set(listing(ckpt)) == set(reference.keys())
        for entry in ckpt.tensors():
            expected = reference.get_tensor(entry.name)
            assert (entry.shape, entry.dtype) == (tuple(expected.shape), expected.dtype)
            assert torch.equal(entry.load(), expected)


def test_format_is_found_by_content_not_extension(tmp_path: Path, trained_cnn: SmallCNN) -> None:
    safetensors_named_pt = tmp_path / "weights.pt"
    save_file(trained_cnn.state_dict(), safetensors_named_pt)
    zip_named_safetensors = tmp_path / "weights.safetensors"
    torch.save(trained_cnn.state_dict(), zip_named_safetensors)
    legacy_named_bin = tmp_path / "pytorch_model.bin"
    torch.save(trained_cnn.state_dict(), legacy_named_bin, _use_new_zipfile_serialization=False)
    formats = {p.name: ckptview.open(p).format for p in (safetensors_named_pt, zip_named_safetensors, legacy_named_bin)}
    assert formats == {"weights.pt": "safetensors", "weights.safetensors": "torch-zip", "pytorch_model.bin": "torch-legacy"}


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_tied_weights_and_views_share_storage(tmp_path: Path, zip_format: bool) -> None:
    embedding = nn.Embedding(100, 16)
    head = nn.Linear(16, 100, bias=False)
    head.weight = embedding.weight  # tied, as in GPT-2 style models
    qkv = torch.randn(48, 16)
    state = {"embed.weight": embedding.weight.data, "head.weight": head.weight.data,
             "q": qkv[:16], "k": qkv[16:32], "v": qkv[32:], "k_t": qkv[16:32].t()}
    path = tmp_path / "tied.pt"
    torch.save(state, path, _use_new_zipfile_serialization=zip_format)
    with ckptview.open(path) as ckpt:
        assert ckpt.tensor("embed.weight").storage_key == ckpt.tensor("head.weight").storage_key
        assert ckpt.tensor_count == 6
        # tied weights once; q, k, v are distinct views; k_t views the same elements as k but differently
        assert ckpt.parameter_count == 100 * 16 + 3 * 16 * 16 + 16 * 16
        assert ckpt.total_bytes == (100 * 16 + 48 * 16) * 4
        for name, tensor in state.items():
            loaded = ckpt.tensor(name).load()
            assert torch.equal(loaded, tensor) and loaded.stride() == tensor.stride(), name


def _read_bytes_of_this_process() -> int:
    with open(f"/proc/{os.getpid()}/io") as stats:
        return int(next(line for line in stats if line.startswith("rchar:")).split()[1])


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs Linux /proc/<pid>/io")
@pytest.mark.parametrize("writer", ["torch-zip", "torch-legacy", "safetensors"])
def test_opening_reads_headers_and_loading_reads_one_tensor(tmp_path: Path, writer: str) -> None:
    state = {f"layer{i}.weight": torch.full((1024, 4096), float(i)) for i in range(6)}  # 6 x 16 MiB
    path = tmp_path / "big.bin"
    if writer == "safetensors":
        save_file(state, path)
    else:
        torch.save(state, path, _use_new_zipfile_serialization=writer == "torch-zip")
    tensor_bytes = 1024 * 4096 * 4

    before = _read_bytes_of_this_process()
    ckpt = ckptview.open(path)
    names = [e.name for e in ckpt.tensors()]
    opened = _read_bytes_of_this_process()
    loaded = ckpt.tensor("layer3.weight").load()
    after = _read_bytes_of_this_process()
    ckpt.close()

    assert names == list(state) and ckpt.format == writer
    assert opened - before < 256 * 1024, "listing must read headers only"
    assert tensor_bytes <= after - opened < tensor_bytes + 256 * 1024, "loading one tensor must not read the others"
    assert torch.equal(loaded, state["layer3.weight"])


def test_iter_chunks_streams_in_bounded_pieces(tmp_path: Path) -> None:
    tensor = torch.randn(1000, 37)
    path = tmp_path / "t.pt"
    torch.save({"t": tensor, "col": tensor[:, 3]}, path)
    with ckptview.open(path) as ckpt:
        chunks = [c.clone() for c in ckpt.tensor("t").iter_chunks(chunk_bytes=4096)]
        assert max(c.numel() for c in chunks) == 1024 and torch.equal(torch.cat(chunks), tensor.reshape(-1))
        reused = list(ckpt.tensor("t").iter_chunks(chunk_bytes=4096, reuse_buffer=True))
        assert len(reused) == len(chunks)
        # a caller's buffer: every chunk is read into it, in turn
        buffer = torch.empty(5000, dtype=torch.uint8)
        for chunk, expected in zip(ckpt.tensor("t").iter_chunks(chunk_bytes=4096, buffer=buffer), chunks, strict=True):
            assert chunk.data_ptr() == buffer.data_ptr() and torch.equal(chunk, expected)
        with pytest.raises(ValueError, match="at least 4,096 bytes"):
            next(ckpt.tensor("t").iter_chunks(chunk_bytes=4096, buffer=torch.empty(100, dtype=torch.uint8)))
        with pytest.raises(ValueError, match="uint8"):
            next(ckpt.tensor("t").iter_chunks(chunk_bytes=4096, buffer=torch.empty(5000)))
        # a non-contiguous view is streamed too, in logical order
        assert torch.equal(torch.cat(list(ckpt.tensor("col").iter_chunks(chunk_bytes=64))), tensor[:, 3])


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_every_dtype_lists_and_loads(tmp_path: Path, zip_format: bool) -> None:
    dtypes = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.int16,
              torch.int32, torch.int64, torch.bool, torch.complex64]
    if zip_format:
        dtypes += [torch.float8_e4m3fn, torch.float8_e5m2, torch.uint16, torch.uint32, torch.uint64, torch.complex32]
        dtypes += [getattr(torch, name) for name in ("float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu")
                   if hasattr(torch, name)]  # newer than torch 2.4
    state = {str(d).removeprefix("torch."): (torch.arange(12).reshape(3, 4) % 3).to(d) for d in dtypes}
    if zip_format and hasattr(torch, "float4_e2m1fn_x2"):  # torch 2.8+; no conversion to or from it
        state["float4_e2m1fn_x2"] = torch.arange(12, dtype=torch.uint8).reshape(3, 4).view(torch.float4_e2m1fn_x2)
    state["scalar"] = torch.tensor(3.5)
    state["empty"] = torch.empty(0, 5)
    path = tmp_path / "dtypes.pt"
    torch.save(state, path, _use_new_zipfile_serialization=zip_format)
    with ckptview.open(path) as ckpt:
        for name, tensor in state.items():
            entry = ckpt.tensor(name)
            assert (entry.shape, entry.dtype) == (tuple(tensor.shape), tensor.dtype)
            # compare bytes: float8 has no equality kernel on CPU
            assert torch.equal(entry.load().reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), name
    # every command and tab on it: statistics and value diffs skip (and say so) what torch cannot convert
    check_every_command(path)
    check_every_tab(path)
    with ckptview.open(path) as ckpt:
        results = ckptview.stats(ckpt, progress=False)
    for name in ("float4_e2m1fn_x2", "complex64"):
        if name in state:
            assert results[name].skipped, name
    assert not results["float32"].skipped and results["float32"].max == 2


@pytest.mark.skipif(not hasattr(torch, "float8_e8m0fnu"), reason="torch 2.7+ dtypes")
def test_safetensors_fnuz_and_packed_dtypes_read_as_safetensors_reads_them(tmp_path: Path) -> None:
    """float8 FNUZ and the packed F4 / F6 dtypes, in a header written as the safetensors crate writes
    it (its Python binding of the installed version may lack them): the crate's own parser and torch
    loader are the reference."""
    import json
    import struct

    import safetensors

    header = {"f4": {"dtype": "F4", "shape": [3, 4], "data_offsets": [0, 6]},
              "f4_odd": {"dtype": "F4", "shape": [2, 3], "data_offsets": [6, 9]},
              "f6": {"dtype": "F6_E2M3", "shape": [2, 4], "data_offsets": [9, 15]},
              "fnuz": {"dtype": "F8_E4M3FNUZ", "shape": [3], "data_offsets": [15, 18]},
              "fnuz2": {"dtype": "F8_E5M2FNUZ", "shape": [2], "data_offsets": [18, 20]}}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path = tmp_path / "packed.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(range(7, 27)))
    reference = {name: (spec["dtype"], spec["shape"], bytes(spec["data"]))
                 for name, spec in safetensors.deserialize(path.read_bytes())}
    with ckptview.open(path) as ckpt, safe_open(path, "pt") as loaded:
        for name in ("f4", "fnuz", "fnuz2"):
            entry, tensor = ckpt.tensor(name), loaded.get_tensor(name)
            assert (entry.shape, entry.dtype) == (tuple(tensor.shape), tensor.dtype), name
            assert entry.load().view(torch.uint8).reshape(-1).tolist() == list(reference[name][2]), name
        assert ckpt.tensor("f4").shape == (3, 2)  # two F4 values per float4_e2m1fn_x2 element, as torch holds them
        for name in ("f4_odd", "f6"):  # no torch dtype: listed with the header's shape, their bytes where it says
            entry = ckpt.tensor(name)
            assert (entry.layout, entry.encoding, list(entry.shape)) == ("encoded", *reference[name][:2])
            assert entry.info.stored_nbytes == len(reference[name][2])
            with pytest.raises(ckptview.CkptviewError, match="packed .*-bit floats, which torch has no dtype for"):
                entry.load()
    check_every_command(path)

    cut = tmp_path / "cut_bits.safetensors"  # 3 F6 values: 18 bits, not whole bytes
    header = {"f6": {"dtype": "F6_E3M2", "shape": [3], "data_offsets": [0, 2]}}
    raw = json.dumps(header).encode()
    cut.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(2))
    with pytest.raises(ckptview.CkptviewError, match="3 F6_E3M2 elements of 6 bits, which do not fill whole bytes"):
        ckptview.open(cut)


def test_archive_saved_without_checksums_opens(tmp_path: Path) -> None:
    """torch.save told not to compute CRC-32s records 0 for each member, and torch.load (which checks no
    CRC) reads it: so does ckptview, where a recorded CRC that disagrees still says the file is damaged."""
    config = pytest.importorskip("torch.utils.serialization").config
    state = {"w": torch.randn(3, 4), "b": torch.arange(4.0)}
    path = tmp_path / "nocrc.pt"
    config.save.compute_crc32 = False
    try:
        torch.save(state, path)
    finally:
        config.save.compute_crc32 = True
    import zipfile

    assert {info.CRC for info in zipfile.ZipFile(path).infolist()} == {0}
    with ckptview.open(path) as ckpt:
        assert all(torch.equal(ckpt.tensor(name).load(), value) for name, value in state.items())
    assert cli_main(["scan", str(path)]) == 0


def test_archive_saved_under_skip_data_says_its_values_were_never_written(tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """torch.serialization.skip_data() saves shapes and leaves zeros where each storage's bytes go (to be
    filled later), recording a CRC of 0 for those members only: torch.load reads zeros without a word.
    ckptview says so, and statistics and the value diff leave those tensors out rather than report a
    model of zeros; the same file saved normally, or without checksums, has every value."""
    from ckptview.analyzers.stats import stats
    from ckptview.analyzers.valuediff import diff
    from ckptview.present.frames import summary
    from ckptview.present.html import header_html, stats_summary_html

    config = pytest.importorskip("torch.utils.serialization").config
    state = {"w": torch.randn(3, 4), "b": torch.arange(4), "shared": torch.randn(6)}
    state["view"] = state["shared"][2:]
    skipped, normal, unchecked = tmp_path / "skipped.pt", tmp_path / "normal.pt", tmp_path / "nocrc.pt"
    with torch.serialization.skip_data():
        torch.save(state, skipped)
    torch.save(state, normal)
    config.save.compute_crc32 = False
    try:
        torch.save(state, unchecked)
    finally:
        config.save.compute_crc32 = True
    assert all(not value.any() for value in torch.load(skipped).values())  # torch.load: zeros, silently
    with ckptview.open(skipped) as ckpt:
        assert [e.shape for e in ckpt.tensors()] == [tuple(v.shape) for v in state.values()]
        assert ckpt.details["problems"] == [next(p for p in ckpt.details["problems"] if p.startswith("3 storage(s) hold"))]
        assert "skip_data" in header_html(summary(ckpt))
        results = stats(ckpt, progress=False)
        assert all("skip_data" in row.skipped for row in results.tensors) and not results.outliers
        assert "4 without statistics: no values saved" in stats_summary_html(results, results.to_frame())
    assert cli_main(["stats", str(skipped)]) == 0
    assert "4 without statistics: no values saved" in capsys.readouterr().out
    compared = diff(skipped, normal, values=True, progress=False)
    assert compared.values is not None and sorted(compared.values.unreadable) == sorted(state)
    for path in (normal, unchecked):
        with ckptview.open(path) as ckpt:
            assert "problems" not in ckpt.details
            assert not any(row.skipped for row in stats(ckpt, progress=False).tensors)


def test_quantized_sparse_and_meta_tensors(tmp_path: Path) -> None:
    quantized = torch.quantize_per_tensor(torch.randn(4, 4), scale=0.1, zero_point=3, dtype=torch.qint8)
    per_channel = torch.quantize_per_channel(torch.randn(3, 4), torch.tensor([0.1, 0.2, 0.3]),
                                             torch.tensor([0, 1, 2]), axis=0, dtype=torch.quint8)
    sparse = torch.sparse_coo_tensor(torch.tensor([[0, 2], [1, 3]]), torch.tensor([5.0, 6.0]), (4, 4))
    state = {"q": quantized, "qc": per_channel, "sparse": sparse, "meta": torch.empty(7, 3, device="meta")}
    path = tmp_path / "special.pt"
    torch.save(state, path)
    with ckptview.open(path) as ckpt:
        layouts = {e.name: (e.layout, e.shape, e.dtype, e.device) for e in ckpt.tensors()}
        assert layouts == {
            "q": ("quantized", (4, 4), torch.qint8, "cpu"),
            "qc": ("quantized", (3, 4), torch.quint8, "cpu"),
            "sparse": ("sparse_coo", (4, 4), torch.float32, "cpu"),
            "meta": ("meta", (7, 3), torch.float32, "meta"),
        }
        assert torch.equal(ckpt.tensor("q").load().dequantize(), quantized.dequantize())
        assert torch.equal(ckpt.tensor("qc").load().dequantize(), per_channel.dequantize())
        assert torch.equal(ckpt.tensor("sparse").load().to_dense(), sparse.to_dense())
        assert ckpt.tensor("meta").load().is_meta


def test_cuda_saved_locations_are_reported_and_load_on_cpu(tmp_path: Path) -> None:
    path = tmp_path / "gpu.pt"
    torch.save({"w": torch.arange(6.0)}, path)
    # Rewrite the storage location in data.pkl (a BINUNICODE string) as a GPU machine writes it,
    # then re-zip: a "cuda:7" checkpoint without a GPU.
    import zipfile

    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    pkl_name = next(n for n in members if n.endswith("data.pkl"))
    members[pkl_name] = members[pkl_name].replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:7")
    rewritten = tmp_path / "gpu7.pt"
    with zipfile.ZipFile(rewritten, "w", zipfile.ZIP_STORED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    with ckptview.open(rewritten) as ckpt:
        entry = ckpt.tensor("w")
        assert entry.device == "cuda:7"
        assert torch.equal(entry.load(), torch.arange(6.0))


def test_a_finalized_source_never_closes_a_descriptor_twice(tmp_path: Path) -> None:
    """A reference cycle's collection runs FileSource.__del__ before an explorer's finalizer closes the
    checkpoint: that close must not close the number again, by then another file's descriptor."""
    from ckptview.readers.model import FileSource

    first, second = tmp_path / "a.bin", tmp_path / "b.bin"
    first.write_bytes(b"first")
    second.write_bytes(b"second")
    source = FileSource(first)
    assert source.read(0, 5) == b"first"
    source.__del__()
    other = os.open(second, os.O_RDONLY)  # the lowest free number: the one the source just released
    try:
        source.close()
        assert os.pread(other, 6, 0) == b"second"
    finally:
        os.close(other)


def test_safetensors_the_crate_refuses_is_listed_and_said_so(tmp_path: Path) -> None:
    """Bytes after the last tensor, or a gap between two: safetensors.load_file refuses the file, ckptview
    lists it (each tensor's bytes are where its offsets say) and `info` says load_file will refuse it."""
    import json
    import struct

    from safetensors.torch import load_file

    from ckptview.present.frames import summary
    from ckptview.present.html import header_html

    fine = tmp_path / "fine.safetensors"
    save_file({"empty": torch.empty(0), "w": torch.arange(4.0), "none": torch.empty(2, 0)}, fine)
    trailing = tmp_path / "trailing.safetensors"
    trailing.write_bytes(fine.read_bytes() + bytes(100))
    gap = tmp_path / "gap.safetensors"
    raw = json.dumps({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                      "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}).encode()
    gap.write_bytes(struct.pack("<Q", len(raw)) + raw + struct.pack("<3f", 1.0, 2.0, 3.0))
    load_file(fine)
    for path, said, name, values in ((trailing, "runs 100 bytes past its last tensor", "w", [0.0, 1.0, 2.0, 3.0]),
                                     (gap, "no tensor covers bytes 4 to 8", "b", [3.0])):
        with pytest.raises(Exception, match="not fully covered|invalid offset"):
            load_file(path)
        with ckptview.open(path) as ckpt:
            assert said in ckpt.details["load_file"]
            assert ckpt.tensor(name).load().tolist() == values
            assert "loading: safetensors.load_file refuses it" in header_html(summary(ckpt))  # the explorer's header
    with ckptview.open(fine) as ckpt:
        assert "load_file" not in ckpt.details


def test_a_path_from_the_home_folder_opens_as_typed_in_a_notebook(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    torch.save({"w": torch.ones(2)}, tmp_path / "model.pt")
    with ckptview.open("~/model.pt") as ckpt:
        assert ckpt.path == str(tmp_path / "model.pt") and ckpt.tensor("w").shape == (2,)
    with ckptview.open(os.fsencode(tmp_path / "model.pt")) as ckpt:  # a bytes path, as open() takes
        assert ckpt.tensor("w").shape == (2,)
