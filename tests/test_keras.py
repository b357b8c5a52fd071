"""
Keras HDF5 files and `.keras` archives: the fixtures written by the real Keras (tests/fixtures/
make_tf_fixtures.py) checked against what Keras reported about them, and files written here with
h5py for the layouts and hostile cases TensorFlow would not make.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from format_checks import check_every_command, check_every_tab, cli

import ckptview
from ckptview.analyzers.sections import model_state_dict
from ckptview.errors import CkptviewError, CorruptCheckpointError, UnsupportedFormatError

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "tf"
LAMBDA_MARKER = Path("/tmp/ckptview-keras-lambda-ran")
KERAS_FILES = ("keras3_trained.h5", "keras3_untrained.h5", "keras2_trained.h5", "keras2_trained_weights.h5",
               "keras3_trained.weights.h5", "keras3_trained.keras", "keras3_lambda.h5", "keras3_attention.keras")


def report(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def readable(keras_name: str) -> str:
    return re.sub(r":\d+$", "", keras_name).replace("/", ".")


@pytest.mark.parametrize("name", KERAS_FILES)
def test_weights_equal_what_keras_reported(name: str) -> None:
    expected = report(name)["weights"]
    with ckptview.open(FIXTURES / name) as ckpt:
        state = model_state_dict(ckpt)
        assert ckpt.format == ("keras" if name.endswith(".keras") else "keras-h5")
        assert sorted(state) == sorted(readable(row["name"]) for row in expected)
        for row in expected:
            entry = state[readable(row["name"])]
            assert list(entry.shape) == row["shape"] and entry.dtype_name == row["dtype"]
            values = torch.tensor(row["values"], dtype=entry.dtype).reshape(row["shape"])
            assert torch.equal(entry.load(), values), row["name"]
            assert torch.equal(torch.cat(list(entry.iter_chunks(chunk_bytes=64))), values.reshape(-1))


@pytest.mark.parametrize("name", ("keras3_trained.h5", "keras3_trained.keras", "keras2_trained.h5",
                                  "keras3_attention.keras"))
def test_optimizer_weights_are_the_training_section(name: str) -> None:
    """Each optimizer variable, by the path Keras gave it, is the slot ckptview names. keras3_attention
    has nested layers HDF5 lists by name (MultiHeadAttention's key_dense before query_dense), and
    AdamW's group is "adam_w": its slots were all left unnamed before."""
    variables = report(name)["optimizer"]["variables"]
    with ckptview.open(FIXTURES / name) as ckpt:
        (optimizer,) = ckptview.training_state(ckpt).optimizers
        parameters = list(model_state_dict(ckpt))
        assert optimizer.mapping == "param_names"
        trainable = [p for p in parameters if not p.endswith(("moving_mean", "moving_variance"))]
        assert [state.name for state in optimizer.params] == trainable
        found = 0
        for variable in variables:
            raw = re.sub(r":\d+$", "", variable["name"])
            parts = raw.split("/")
            if len(parts) >= 3:  # Keras 2: Adam/m/conv/kernel:0
                entry = ckpt.tensor(f"optimizer_weights.state.{'.'.join(parts[2:])}.{parts[1]}")
            else:  # Keras 3: adam/conv_kernel_momentum, adam/iteration
                param = next((p for p in parameters if parts[-1].startswith(p.replace(".", "_") + "_")), None)
                entry = ckpt.tensor(f"optimizer_weights.state.{param}.{parts[-1][len(param) + 1:]}" if param
                                    else f"optimizer_weights.param_groups.0.{parts[-1]}")
            expected = np.asarray(variable["values"]).reshape(variable["shape"])
            assert np.array_equal(entry.load().numpy(), expected), variable["name"]
            found += 1
        assert found == len(variables) == len(ckpt.tensors()) - len(parameters)


def test_batchnorm_checks_fire_before_training_and_not_after() -> None:
    with ckptview.open(FIXTURES / "keras3_untrained.h5") as ckpt:
        report_ = ckptview.batchnorm_checks(ckpt)
        assert [layer.module for layer in report_.layers] == ["bn"]
        (never,) = report_.checks("running_stats_never_updated")
        assert never.tensors == ("bn.moving_mean", "bn.moving_variance")
    for name in ("keras3_trained.h5", "keras2_trained.h5", "keras3_trained.keras", "keras2_trained_weights.h5"):
        with ckptview.open(FIXTURES / name) as ckpt:
            report_ = ckptview.batchnorm_checks(ckpt)
            assert [layer.module for layer in report_.layers] == ["bn"], name
            assert not report_.problems, (name, report_.problems)
            # Keras has no num_batches_tracked: the torch note about a missing one does not apply
            assert not report_.checks("num_batches_tracked_missing"), name


def test_layer_kinds_from_keras_shapes() -> None:
    with ckptview.open(FIXTURES / "keras2_trained_weights.h5") as ckpt:  # no config: from names and shapes
        rows = {row.name: row for row in ckptview.tensor_table(ckpt).rows}
    assert rows["conv.kernel"].layer_kind == "Conv2d" and "kernel, in, out" in rows["conv.kernel"].layer_detail
    assert rows["dense_1.kernel"].layer_kind == "Linear" and rows["dense_1.kernel"].layer_detail.startswith("144×8")
    assert rows["bn.moving_variance"].layer_kind == "BatchNorm" and rows["bn.moving_variance"].role == "buffer"


def test_lambda_layer_is_code_and_never_runs() -> None:
    if LAMBDA_MARKER.exists():
        LAMBDA_MARKER.unlink()
    path = FIXTURES / "keras3_lambda.h5"
    code, out, err = cli("scan", str(path))
    assert code == 3, err
    assert "Lambda 'doubler'" in out and "marshalled bytecode" in out
    code, out, _ = cli("scan", "--json", str(path))
    assert json.loads(out)["needs_code"] is True
    with ckptview.open(path) as ckpt:
        assert ckpt.needs_trust
        ckptview.stats(ckpt)
    assert not LAMBDA_MARKER.exists()
    assert cli("scan", str(FIXTURES / "keras3_trained.h5"))[0] == 0


def test_custom_object_in_a_keras3_config_is_code(tmp_path: Path) -> None:
    path = keras3_with(tmp_path, "custom.keras", {"module": "my_project.layers", "class_name": "Gate",
                                                  "registered_name": "my_project>Gate"})
    code, out, _ = cli("scan", str(path))
    assert code == 3 and "my_project.layers.Gate" in out


def keras3_with(tmp_path: Path, name: str, layer_4: dict) -> Path:
    """keras3_trained.keras with its fifth layer's record updated by `layer_4`."""
    path = tmp_path / name
    with zipfile.ZipFile(FIXTURES / "keras3_trained.keras") as source, zipfile.ZipFile(path, "w") as target:
        for item in source.infolist():
            data = source.read(item.filename)
            if item.filename == "config.json":
                config = json.loads(data)
                config["config"]["layers"][4].update(layer_4)
                data = json.dumps(config).encode()
            target.writestr(item, data)
    return path


def test_keras_utilities_and_lookalike_packages_in_a_config_are_code(tmp_path: Path) -> None:
    # a function from keras.utils where a layer belongs: load_model calls it (Keras before 3.11 in safe
    # mode too), and get_file downloads where its arguments say
    utility = keras3_with(tmp_path, "get_file.keras", {"module": "keras.utils", "class_name": "function",
                                                       "config": "get_file", "registered_name": "get_file"})
    code, out, _ = cli("scan", str(utility))
    assert code == 3 and "keras.utils.get_file (a Keras utility" in out, out
    disabler = keras3_with(tmp_path, "unsafe.keras", {"module": "keras.src.config", "class_name": "function",
                                                      "config": "enable_unsafe_deserialization"})
    code, out, _ = cli("scan", str(disabler))
    assert code == 3 and "enable_unsafe_deserialization" in out, out
    # a package whose name only starts like Keras's is no part of it
    lookalike = keras3_with(tmp_path, "lookalike.keras", {"module": "kerastools.layers", "class_name": "Gate"})
    code, out, _ = cli("scan", str(lookalike))
    assert code == 3 and "kerastools.layers.Gate (a custom Keras object" in out, out


def test_tf_op_lambda_acting_on_files_is_code(tmp_path: Path) -> None:
    """A Keras 2 TFOpLambda layer calls the TensorFlow function its config names (strings.join, as
    tf_keras writes it for `tf.strings.join(...)` on a Keras tensor): one that writes files is code."""
    for function, is_code in (("io.write_file", True), ("compat.v1.gfile.Remove", True), ("print", True),
                              ("raw_ops.WriteFile", True), ("debugging.experimental.enable_dump_debug_info", True),
                              ("math.add", False), ("io.decode_png", False), ("raw_ops.AddV2", False),
                              ("debugging.assert_equal", False)):
        path = tmp_path / f"{function}.h5"
        shutil.copy(FIXTURES / "keras2_trained.h5", path)
        with h5py.File(path, "r+") as h5:
            config = json.loads(h5.attrs["model_config"])
            config["config"]["layers"][3].update(class_name="TFOpLambda",
                                                 config={"name": "op", "dtype": "float32", "function": function})
            h5.attrs["model_config"] = json.dumps(config)
        code, out, _ = cli("scan", str(path))
        assert (code == 3 and f"tf.{function} (a TFOpLambda layer" in out) if is_code else code == 0, (function, out)


def test_optimizer_slots_of_nested_layers_in_an_unknown_order_stay_unnamed(tmp_path: Path) -> None:
    # MultiHeadAttention with a nested layer ckptview does not know the place of: HDF5 lists its groups
    # key, query, value, z, whose shapes line up with the optimizer's query, key, value, output slots,
    # so matching by shape would give query's moments to key. None is named.
    weights = tmp_path / "model.weights.h5"
    path = tmp_path / "renamed.keras"
    with zipfile.ZipFile(FIXTURES / "keras3_attention.keras") as source:
        weights.write_bytes(source.read("model.weights.h5"))
        with h5py.File(weights, "r+") as h5:
            h5.move("layers/multi_head_attention/output_dense", "layers/multi_head_attention/z_dense")
        with zipfile.ZipFile(path, "w") as target:
            for item in source.infolist():
                target.writestr(item, weights.read_bytes() if item.filename == "model.weights.h5"
                                else source.read(item.filename))
    with ckptview.open(path) as ckpt:
        (optimizer,) = ckptview.training_state(ckpt).optimizers
        assert not optimizer.params
        assert not [entry.name for entry in ckpt.tensors() if entry.name.startswith("optimizer_weights.state.")]
        assert ckpt.tensor("model_weights.mha.query.kernel").shape == (8, 2, 4)


@pytest.mark.parametrize("kind", ["h5-weight-missing", "keras-weights-damaged"])
def test_code_in_the_config_of_a_refused_file_is_still_code(tmp_path: Path, kind: str) -> None:
    # load_model builds the model from its config (running a Lambda, importing a custom class) before
    # it reads a weight: a file refused for its weights still needs code
    if kind == "h5-weight-missing":
        path = tmp_path / "lambda.h5"
        shutil.copy(FIXTURES / "keras3_lambda.h5", path)
        with h5py.File(path, "r+") as h5:
            del h5["model_weights/head/head/bias"]
        named = "Lambda 'doubler'"
    else:
        path = tmp_path / "custom.keras"
        with zipfile.ZipFile(FIXTURES / "keras3_trained.keras") as source, zipfile.ZipFile(path, "w") as target:
            config = json.loads(source.read("config.json"))
            config["config"]["layers"][4].update(module="my_project.layers", class_name="Gate",
                                                 registered_name="my_project>Gate")
            target.writestr("config.json", json.dumps(config))
            target.writestr("model.weights.h5", b"not HDF5 at all")
        named = "my_project.layers.Gate"
    with pytest.raises(CkptviewError, match=f"It names .*{re.escape(named)}.*keras.models.load_model") as caught:
        ckptview.open(path)
    assert any(named in imp.name for imp in caught.value.named_globals)
    code, out, _ = cli("scan", str(path))
    assert code == 3 and named in out


def test_keras_archive_deflated_reads_the_same(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A deflated model.weights.h5 is inflated once into a temporary file, whose name is gone as soon
    as the archive is opened: nothing is left behind, even by a checkpoint never closed."""
    import tempfile

    path = tmp_path / "deflated.keras"
    with zipfile.ZipFile(FIXTURES / "keras3_trained.keras") as source, \
            zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as target:
        for item in source.infolist():
            target.writestr(item.filename, source.read(item.filename))
    spill_dir = tmp_path / "tmp"
    spill_dir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spill_dir))
    with ckptview.open(FIXTURES / "keras3_trained.keras") as stored, ckptview.open(path) as deflated:
        assert not list(spill_dir.iterdir())
        assert [e.name for e in stored.tensors()] == [e.name for e in deflated.tensors()]
        for a, b in zip(stored.tensors(), deflated.tensors()):
            assert torch.equal(a.load(), b.load()), a.name
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))  # the cause is said to be the folder
    with pytest.raises(CkptviewError, match=r"cannot inflate model.weights.h5 \(\d[\d,]* bytes\) into a temporary "
                                            r"file in .*missing: No such file or directory\. .*TMPDIR"):
        ckptview.open(path)


# --- layouts written with h5py ------------------------------------------------------------------

def write_weights_h5(path: Path, layers: dict[str, dict[str, np.ndarray]], *, split: int = 0,
                     **dataset_options: object) -> Path:
    """A Keras 2 weights-only file: `layer_names` at the root (split in `split` pieces), one group per layer."""
    with h5py.File(path, "w") as f:
        names = [name.encode() for name in layers]
        if split:
            for index in range(split):
                f.attrs[f"layer_names{index}"] = names[index * len(names) // split:(index + 1) * len(names) // split]
        else:
            f.attrs["layer_names"] = names
        f.attrs["keras_version"] = b"2.15.0"
        for layer, weights in layers.items():
            group = f.create_group(layer)
            group.attrs["weight_names"] = [name.encode() for name in weights]
            for name, value in weights.items():
                group.create_dataset(name, data=value, **dataset_options)
    return path


def bn_layers(rng: np.random.Generator, count: int) -> dict[str, dict[str, np.ndarray]]:
    layers = {}
    for index in range(count):
        layers[f"block_{index}"] = {
            f"block_{index}/conv/kernel:0": rng.standard_normal((3, 3, 2, 2)).astype(np.float32),
            f"block_{index}/bn/gamma:0": np.ones(2, np.float32),
            f"block_{index}/bn/beta:0": np.zeros(2, np.float32),
            f"block_{index}/bn/moving_mean:0": rng.standard_normal(2).astype(np.float32),
            f"block_{index}/bn/moving_variance:0": np.array([1.0, -0.5 if index == 1 else 2.0], np.float32),
        }
    return layers


def test_split_layer_names_and_nested_groups(tmp_path: Path) -> None:
    layers = bn_layers(np.random.default_rng(0), 5)
    path = write_weights_h5(tmp_path / "split.h5", layers, split=3)
    with ckptview.open(path) as ckpt:
        names = [entry.name for entry in ckpt.tensors()]
        assert names == [readable(w) for weights in layers.values() for w in weights]
        assert torch.equal(ckpt.tensor("block_3.conv.kernel").load(),
                           torch.from_numpy(layers["block_3"]["block_3/conv/kernel:0"]))
        report_ = ckptview.batchnorm_checks(ckpt)
        assert [layer.module for layer in report_.layers] == [f"block_{i}.bn" for i in range(5)]
        (bad,) = report_.checks("running_var_invalid")
        assert bad.tensors == ("block_1.bn.moving_variance",)


def test_chunked_compressed_datasets_stream_through_h5py(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    kernel = rng.standard_normal((300, 70)).astype(np.float32)
    path = write_weights_h5(tmp_path / "gzip.h5", {"dense": {"dense/kernel:0": kernel}}, chunks=(16, 70),
                            compression="gzip")
    with ckptview.open(path) as ckpt:
        entry = ckpt.tensor("dense.kernel")
        assert torch.equal(entry.load(), torch.from_numpy(kernel))
        chunks = list(entry.iter_chunks(chunk_bytes=1000))
        assert max(chunk.numel() for chunk in chunks) == 250
        assert torch.equal(torch.cat(chunks), torch.from_numpy(kernel).reshape(-1))


def test_chunked_datasets_read_in_bands_and_exact_boxes(tmp_path: Path) -> None:
    """Chunks that do not divide the array, read in pieces that cut rows and elements anywhere: a band
    of rows one chunk tall at a time; a 4-D dataset in a deflated .keras archive as exact boxes."""
    rng = np.random.default_rng(2)
    kernel = rng.standard_normal((50, 41)).astype(np.float32)
    path = write_weights_h5(tmp_path / "odd.h5", {"dense": {"dense/kernel:0": kernel}}, chunks=(7, 9),
                            compression="gzip")
    with ckptview.open(path) as ckpt:
        for piece in (44, 1000, 50 * 41 * 4):
            chunks = list(ckpt.tensor("dense.kernel").iter_chunks(chunk_bytes=piece))
            assert torch.equal(torch.cat(chunks), torch.from_numpy(kernel).reshape(-1)), piece
    layers = {f"dense{i}": {f"dense{i}/kernel:0": kernel + i} for i in range(6)}
    path = write_weights_h5(tmp_path / "six.h5", layers, chunks=(7, 9), compression="gzip")
    with ckptview.open(path) as ckpt:  # the first bytes of each: a band read and not finished, each
        for entry in ckpt.tensors():
            first = next(iter(entry.iter_chunks(chunk_bytes=8)))
            assert first.tolist() == (kernel + int(entry.name[5])).reshape(-1)[:2].tolist()
        kept = {id(source._bands) for source in ckpt._sources if hasattr(source, "_bands")}
        assert len(kept) == 1 and len(next(s for s in ckpt._sources if hasattr(s, "_bands"))._bands._bands) == 4
    archive = tmp_path / "deflated.keras"
    with zipfile.ZipFile(FIXTURES / "keras3_trained.keras") as source, \
            zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as target:
        for item in source.infolist():
            target.writestr(item.filename, source.read(item.filename))
    with ckptview.open(archive) as ckpt:
        kernels = [entry for entry in ckpt.tensors() if len(entry.shape) == 4]
        assert kernels
        for entry in kernels:
            assert torch.equal(torch.cat(list(entry.iter_chunks(chunk_bytes=52))), entry.load().reshape(-1))


def test_chunks_too_large_to_read_in_pieces_are_listed_not_inflated(tmp_path: Path) -> None:
    """HDF5 inflates a whole chunk to give any element of it: a 2 MB file declaring one 2 GB row in one
    chunk made each 2 MB read of statistics take 13 s and 4.3 GB. Chunks over 16 MiB (and bands of
    rows one chunk tall over 64 MiB) are listed with a note and never read."""
    zeros = np.zeros((1, 1 << 23), np.float32)
    path = write_weights_h5(tmp_path / "big-chunk.h5", {"dense": {"dense/kernel:0": zeros}}, chunks=(1, 1 << 23),
                            compression="gzip")
    assert path.stat().st_size < 1 << 20
    with ckptview.open(path) as ckpt:
        entry = ckpt.tensor("dense.kernel")
        assert entry.shape == (1, 1 << 23) and entry.layout == "unsupported"
        assert "chunks of shape [1, 8388608] (33,554,432 bytes each" in entry.info.note
        with pytest.raises(CkptviewError, match="HDF5 chunks"):
            entry.load()
    assert cli("stats", str(path))[0] == 0


def test_datasets_sharing_their_bytes_are_refused(tmp_path: Path) -> None:
    """Each dataset's values are written once; a crafted file whose datasets all point at one range
    (ten thousand over 100 MB would make statistics read a terabyte) is refused at open."""
    import struct

    kernel, bias = np.ones((8, 8), np.float32), np.zeros(64, np.float32)
    path = write_weights_h5(tmp_path / "shared.h5", {"dense": {"dense/kernel:0": kernel, "dense/bias:0": bias}})
    with h5py.File(path, "r") as f:
        first, second = (f[f"dense/dense/{name}:0"].id.get_offset() for name in ("kernel", "bias"))
    data = path.read_bytes()
    layout = struct.pack("<BBQQ", 3, 1, second, 256)  # version 3, contiguous, the address, the size
    assert data.count(layout) == 1
    path.write_bytes(data.replace(layout, struct.pack("<BBQQ", 3, 1, first, 256)))
    with pytest.raises(CorruptCheckpointError, match="keep their values in overlapping bytes of the file"):
        ckptview.open(path)


def test_keras3_nested_layers(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    path = tmp_path / "nested.weights.h5"
    with h5py.File(path, "w") as f:
        f.create_group("vars").attrs["name"] = "model"
        lstm = f.create_group("layers/lstm")
        lstm.create_group("vars").attrs["name"] = "encoder"
        cell = lstm.create_group("cell/vars")
        values = [rng.standard_normal(shape).astype(np.float32) for shape in ((5, 32), (8, 32), (32,))]
        for index, value in enumerate(values):
            cell.create_dataset(str(index), data=value)
        embedding = f.create_group("layers/embedding/vars")
        embedding.attrs["name"] = "tokens"
        embedding.create_dataset("0", data=rng.standard_normal((50, 5)).astype(np.float32))
    with ckptview.open(path) as ckpt:
        assert [e.name for e in ckpt.tensors()] == ["tokens.embeddings", "encoder.cell.kernel",
                                                    "encoder.cell.recurrent_kernel", "encoder.cell.bias"]
        rows = {row.name: row for row in ckptview.tensor_table(ckpt).rows}
        assert rows["tokens.embeddings"].layer_kind == "Embedding"
        assert rows["encoder.cell.recurrent_kernel"].layer_kind == "LSTM"
        assert torch.equal(ckpt.tensor("encoder.cell.recurrent_kernel").load(), torch.from_numpy(values[1]))


# --- hostile files ------------------------------------------------------------------------------

def refused(path: Path, error: type[CkptviewError], match: str) -> str:
    before = path.read_bytes()
    with pytest.raises(error, match=match) as caught, ckptview.open(path) as ckpt:
        for entry in ckpt.tensors():
            entry.load()
    message = str(caught.value)
    assert "\n" not in message
    code, _, err = cli("info", str(path))
    assert code == 1 and err.count("\n") == 1, err
    assert path.read_bytes() == before
    return message


def test_external_link_out_of_the_file_is_refused(tmp_path: Path) -> None:
    path = write_weights_h5(tmp_path / "link.h5", {"dense": {"dense/kernel:0": np.ones((2, 2), np.float32)}})
    with h5py.File(path, "a") as f:
        del f["dense/dense"]
        f["dense/dense"] = h5py.ExternalLink("/etc/passwd", "/kernel:0")
    message = refused(path, CorruptCheckpointError, "links 'dense/dense' to another file")
    assert "root:" not in message


def test_external_storage_and_virtual_datasets_are_refused(tmp_path: Path) -> None:
    path = write_weights_h5(tmp_path / "external.h5", {"dense": {}})
    with h5py.File(path, "a") as f:
        f["dense"].attrs["weight_names"] = [b"dense/kernel:0"]
        f.create_dataset("dense/dense/kernel:0", shape=(4,), dtype="f4", external=[("/etc/passwd", 0, 16)])
    refused(path, CorruptCheckpointError, "external file")

    other = write_weights_h5(tmp_path / "other.h5", {"x": {"x/w:0": np.arange(4, dtype=np.float32)}})
    path = write_weights_h5(tmp_path / "virtual.h5", {"dense": {}})
    layout = h5py.VirtualLayout(shape=(4,), dtype="f4")
    layout[:] = h5py.VirtualSource(str(other), "x/x/w:0", shape=(4,))
    with h5py.File(path, "a") as f:
        f["dense"].attrs["weight_names"] = [b"dense/kernel:0"]
        f.create_virtual_dataset("dense/dense/kernel:0", layout)
    refused(path, CorruptCheckpointError, "virtual dataset")


def test_shape_bomb_is_refused_before_allocation(tmp_path: Path) -> None:
    for name, options in (("contiguous", {}), ("chunked", {"chunks": (1 << 20,), "compression": "gzip"})):
        path = write_weights_h5(tmp_path / f"{name}.h5", {"dense": {}})
        with h5py.File(path, "a") as f:
            f["dense"].attrs["weight_names"] = [b"dense/kernel:0"]
            f.create_dataset("dense/dense/kernel:0", shape=(1 << 40,), dtype="f4", **options)
        refused(path, CorruptCheckpointError, "more than a .*-byte file can hold")


def test_lying_and_foreign_hdf5(tmp_path: Path) -> None:
    path = write_weights_h5(tmp_path / "missing.h5", {"dense": {"dense/kernel:0": np.ones(3, np.float32)}})
    with h5py.File(path, "a") as f:
        f["dense"].attrs["weight_names"] = [b"dense/kernel:0", b"dense/bias:0"]
    refused(path, CorruptCheckpointError, "does not hold")

    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f["data"] = np.arange(3)
    refused(plain, UnsupportedFormatError, "without Keras weights")

    cut = tmp_path / "cut.h5"
    cut.write_bytes((FIXTURES / "keras3_trained.h5").read_bytes()[:20000])
    refused(cut, CorruptCheckpointError, "damaged or cut off")


# --- every command and tab ----------------------------------------------------------------------

@pytest.mark.parametrize("name", ("keras3_trained.h5", "keras3_trained.keras"))
def test_every_cli_command_and_explorer_tab(name: str, tmp_path: Path) -> None:
    path = tmp_path / name
    shutil.copy(FIXTURES / name, path)
    info = check_every_command(path)
    assert info["details"]["optimizer"].startswith("Adam")
    assert info["metadata"]["layers"].startswith("image (InputLayer), conv (Conv2D), bn (BatchNormalization)")
    assert {s["kind"] for s in info["sections"]} >= {"state_dict", "optimizer", "hyper_parameters"}
    check_every_tab(path)
    assert os.path.getsize(path) == os.path.getsize(FIXTURES / name)


def test_listing_imports_neither_tensorflow_keras_nor_torch() -> None:
    """Header-only commands stay light on every TensorFlow-world format, and nothing imports TF or Keras."""
    import subprocess
    import sys

    paths = [FIXTURES / name for name in ("keras3_trained.h5", "keras3_trained.keras", "int8.tflite", "savedmodel",
                                           "tf_checkpoint/ckpt.index")]
    code = ("import sys, io, contextlib\nfrom ckptview.cli import main\n"
            "for path in sys.argv[1:]:\n"
            "    with contextlib.redirect_stdout(io.StringIO()):\n"
            "        assert main(['info', path]) == 0, path\n"
            "print(sorted(m for m in ('torch', 'tensorflow', 'keras', 'tf_keras') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code, *map(str, paths)], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_urls_are_refused_in_one_line() -> None:
    """h5py, the FlatBuffer bindings and the bundle reader need a local file: a URL is refused in our words."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Ranged(SimpleHTTPRequestHandler):
        def do_GET(self) -> None:
            match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
            path = self.translate_path(self.path)
            if match is None or not os.path.isfile(path):
                return super().do_GET()
            data = Path(path).read_bytes()
            start = int(match.group(1))
            end = min(int(match.group(2)) if match.group(2) else len(data) - 1, len(data) - 1)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
            self.send_header("Content-Length", str(end - start + 1))
            self.end_headers()
            self.wfile.write(data[start:end + 1])
            return None

        def log_message(self, *args: object) -> None:
            pass

    pytest.importorskip("fsspec")
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Ranged, directory=str(FIXTURES)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        for name in ("keras3_trained.h5", "keras3_trained.keras", "int8.tflite", "tf_checkpoint/ckpt.index",
                     "savedmodel/saved_model.pb"):
            with pytest.raises(UnsupportedFormatError, match="local file only: download it first"):
                ckptview.open(f"{base}/{name}")
    finally:
        server.shutdown()
        server.server_close()


def test_damaged_global_heap_is_refused_before_hdf5_reads_it(tmp_path: Path) -> None:
    """Every Keras name and config is a variable-length string in a global heap collection, which the
    HDF5 library trusts: a fuzzer's one-byte change to an object's size made an attribute read loop
    forever. Opened in a subprocess with a timeout, so a regression fails instead of hanging."""
    import struct
    import subprocess
    import sys

    path = tmp_path / "heap.h5"
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [b"dense"]  # lists of bytes: variable-length strings, in a global heap
        group = f.create_group("dense")
        group.attrs["weight_names"] = [b"dense/kernel:0", b"dense/bias:0"]
        group.create_dataset("dense/kernel:0", data=np.ones((2, 2), np.float32))
        group.create_dataset("dense/bias:0", data=np.zeros(2, np.float32))
    data = bytearray(path.read_bytes())
    heap = data.index(b"GCOL\x01\x00\x00\x00")
    objects, pos = [], heap + 16
    while struct.unpack_from("<H", data, pos)[0]:
        objects.append(pos)
        pos += 16 + -(-struct.unpack_from("<Q", data, pos + 8)[0] // 8) * 8
    data[objects[1] + 8] += 64  # the second object claims 64 bytes more: the objects after it are misread
    path.write_bytes(bytes(data))
    before = path.read_bytes()
    code = "import sys, ckptview\ntry:\n    ckptview.open(sys.argv[1])\nexcept Exception as e:\n    print(e)"
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120,
                          check=False)
    assert "global heap at byte" in done.stdout and "damaged" in done.stdout, done.stdout + done.stderr
    assert path.read_bytes() == before


def test_text_reference_claiming_gigabytes_is_refused_before_hdf5_allocates_them(tmp_path: Path) -> None:
    """A variable-length string is stored as (length, heap collection, object index); the HDF5 library
    allocates the length before it reads the object. Fuzzed copies of the fixtures whose length's top
    byte changed took up to 4 GB to open; the child runs under a 1.5 GiB address-space limit."""
    import struct
    import subprocess
    import sys

    path = tmp_path / "reference.h5"
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [b"dense"]
        group = f.create_group("dense")
        group.attrs["weight_names"] = [b"dense/kernel:0"]
        group.create_dataset("dense/kernel:0", data=np.ones((2, 2), np.float32))
    data = bytearray(path.read_bytes())
    heap = data.index(b"GCOL\x01\x00\x00\x00")
    # the first string's (length 5, the collection's address, its index): the address alone also occurs elsewhere
    reference = data.index(struct.pack("<IQ", 5, heap))
    data[reference + 3] = 0x60  # 1.6 GB
    path.write_bytes(bytes(data))
    code = ("import resource, sys\nresource.setrlimit(resource.RLIMIT_AS, (3 << 29, 3 << 29))\nimport ckptview\n"
            "try:\n    ckptview.open(sys.argv[1])\nexcept Exception as e:\n    print(e)")
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120,
                          check=False)
    assert "claims 1,610,612,7" in done.stdout and "damaged" in done.stdout, done.stdout + done.stderr


def _damaged_keras2_copy(tmp_path: Path, case: str) -> Path:
    import struct

    data = bytearray((FIXTURES / "keras2_trained.h5").read_bytes())
    if case == "fuzzed":
        # found by tests/fuzz.py: one `weight_names` element of `optimizer_weights` (kept in the header's
        # continuation block) gets length 0xFFFF0011 and an address that is no collection's
        data[33410:33418] = b"\xff" * 8
    else:  # the one element of the scalar `keras_version`: no neighbouring element to compare it with
        with h5py.File(FIXTURES / "keras2_trained.h5", "r") as f:
            version = f.attrs["keras_version"]
        version = version.encode() if isinstance(version, str) else version
        heap = data.index(b"GCOL\x01\x00\x00\x00")
        element = data.index(struct.pack("<IQ", len(version), heap), data.index(b"keras_version\x00"))
        data[element:element + 12] = struct.pack("<IQ", 0xF0000000, 0x7FFF_FFFF_0000)
    path = tmp_path / f"{case}.h5"
    path.write_bytes(bytes(data))
    return path


def _damaged_keras3_archive(tmp_path: Path, compression: int) -> Path:
    """keras3_trained.keras whose model.weights.h5 has the `name` of the model's `vars` point nowhere."""
    import struct

    with zipfile.ZipFile(FIXTURES / "keras3_trained.keras") as source:
        members = {item.filename: source.read(item.filename) for item in source.infolist()}
    weights = bytearray(members["model.weights.h5"])
    heap = weights.index(b"GCOL\x01\x00\x00\x00")
    element = weights.index(struct.pack("<IQ", len(b"small_cnn"), heap))
    weights[element:element + 12] = struct.pack("<IQ", 0xF0000000, 0x7FFF_FFFF_0000)
    members["model.weights.h5"] = bytes(weights)
    path = tmp_path / f"damaged-{compression}.keras"
    with zipfile.ZipFile(path, "w", compression=compression) as target:
        for name, data in members.items():
            target.writestr(name, data)
    return path


@pytest.mark.parametrize("case", ("fuzzed", "scalar", "archive-stored", "archive-deflated"))
def test_text_reference_to_no_heap_claiming_gigabytes_is_refused(case: str, tmp_path: Path) -> None:
    """A reference whose address is damaged as well as its length cannot be found by its collection's
    address: each attribute's elements are read from the object headers (continuation blocks
    included). Before, HDF5 allocated the 4 GB, then failed: the child runs under a 1.5 GiB limit.
    In a .keras archive too, read in place (stored) or inflated."""
    import subprocess
    import sys

    if case.startswith("archive"):
        compression = zipfile.ZIP_STORED if case.endswith("stored") else zipfile.ZIP_DEFLATED
        path = _damaged_keras3_archive(tmp_path, compression)
    else:
        path = _damaged_keras2_copy(tmp_path, case)
    code = ("import resource, sys\nresource.setrlimit(resource.RLIMIT_AS, (3 << 29, 3 << 29))\nimport ckptview\n"
            "try:\n    ckptview.open(sys.argv[1])\nexcept Exception as e:\n    print(e)")
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120,
                          check=False)
    assert "bytes of an HDF5 heap object that is not there" in done.stdout, done.stdout + done.stderr[-500:]


def test_text_attribute_with_a_damaged_type_is_refused_before_hdf5_reads_it(tmp_path: Path) -> None:
    """A fuzzed `weight_names` whose type turned from variable-length string into variable-length
    sequence crashed the HDF5 library (segmentation fault) when read: run in a subprocess."""
    import subprocess
    import sys

    path = write_weights_h5(tmp_path / "type.h5", {"dense": {"dense/kernel:0": np.ones((2, 2), np.float32)}})
    with h5py.File(path, "a") as f:  # variable-length strings, as Keras writes them
        f["dense"].attrs["weight_names"] = np.array([b"dense/kernel:0"], dtype=h5py.string_dtype("ascii"))
    data = bytearray(path.read_bytes())
    name = data.index(b"weight_names\x00")
    datatype = data.index(b"\x19", name + len(b"weight_names"))  # datatype message: version 1, class 9 (vlen)
    data[datatype + 1] = 0x8D  # its flags: a sequence (of a garbage type), no longer a string
    path.write_bytes(bytes(data))
    code = "import sys, ckptview\ntry:\n    ckptview.open(sys.argv[1])\nexcept Exception as e:\n    print(e)"
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0 and "should hold text but its type says otherwise" in done.stdout, \
        (done.returncode, done.stdout, done.stderr[-300:])


def test_object_headers_whose_blocks_overlap_are_refused_not_walked_again_and_again() -> None:
    """Continuation blocks chained 24 bytes apart, each running to the same end: walked one by one they
    span ~n²/2 × 24 bytes (minutes of Python for a few MB). Well-formed blocks are disjoint and span
    at most the file, so the walk stops as soon as they span more."""
    import struct
    import time

    from ckptview.readers.hdf5_text import check_hdf5_text

    size = 1 << 20
    data = bytearray(size)
    first = 16
    data[0:16] = struct.pack("<BBHII4x", 1, 0, 1, 1, size - first)  # a version 1 header: its first block
    for pos in range(first, size - 24, 24):  # each a continuation message to the block 24 bytes on
        data[pos:pos + 24] = struct.pack("<HHB3xQQ", 0x0010, 16, 0, pos + 24, size - pos - 24)
    started = time.perf_counter()
    with pytest.raises(CorruptCheckpointError, match="object headers overlap or repeat"):
        check_hdf5_text("crafted.h5", bytes(data), 0, size, object_headers=[0])
    assert time.perf_counter() - started < 2


def _jenkins_lookup3(data: bytes) -> int:
    """Bob Jenkins' lookup3 `hashlittle` (initial value 0): HDF5's checksum of its metadata blocks."""
    mask = 0xFFFFFFFF

    def rot(x: int, k: int) -> int:
        return ((x << k) | (x >> (32 - k))) & mask

    a = b = c = (0xDEADBEEF + len(data)) & mask
    words = lambda chunk: [int.from_bytes(chunk[i:i + 4], "little") for i in (0, 4, 8)]  # noqa: E731
    rest = data
    while len(rest) > 12:
        x, y, z = words(rest[:12])
        a, b, c = (a + x) & mask, (b + y) & mask, (c + z) & mask
        a = (a - c) & mask; a ^= rot(c, 4); c = (c + b) & mask  # noqa: E702
        b = (b - a) & mask; b ^= rot(a, 6); a = (a + c) & mask  # noqa: E702
        c = (c - b) & mask; c ^= rot(b, 8); b = (b + a) & mask  # noqa: E702
        a = (a - c) & mask; a ^= rot(c, 16); c = (c + b) & mask  # noqa: E702
        b = (b - a) & mask; b ^= rot(a, 19); a = (a + c) & mask  # noqa: E702
        c = (c - b) & mask; c ^= rot(b, 4); b = (b + a) & mask  # noqa: E702
        rest = rest[12:]
    if not rest:
        return c
    x, y, z = words(rest + bytes(12 - len(rest)))
    a, b, c = (a + x) & mask, (b + y) & mask, (c + z) & mask
    for first, second, third, k in ((2, 1, 0, 14), (0, 2, 1, 11), (1, 0, 2, 25), (2, 1, 0, 16), (0, 2, 1, 4),
                                    (1, 0, 2, 14), (2, 1, 0, 24)):
        state = [a, b, c]
        state[first] ^= state[second]
        state[first] = (state[first] - rot(state[second], k)) & mask
        a, b, c = state
    return c


def _dense_attributes_h5(path: Path, weights: int) -> Path:
    """A Keras 2 weights file whose layer group has more attributes than a header keeps (h5py's
    `libver="latest"`): HDF5 moves them into a dense-storage heap. With hundreds of weight names the
    `weight_names` message outgrows the heap's largest object (4 KB) and is stored apart from its
    blocks (a "huge" object)."""
    with h5py.File(path, "w", libver="latest") as f:
        f.attrs["layer_names"] = [b"dense"]
        f.attrs["keras_version"] = b"2.15.0"
        group = f.create_group("dense")
        names = [b"dense/kernel:0"] + [b"dense/extra_%d:0" % i for i in range(weights - 1)]
        group.attrs["weight_names"] = names
        for index in range(9):
            group.attrs[f"note_{index}"] = b"dense storage from here on"
        for index, name in enumerate(names):
            group.create_dataset(name.decode(), data=np.full((2,), index, np.float32))
    return path


def _damage_dense_weight_names(path: Path, address: int) -> None:
    """The first `weight_names` element claims 4 GB (and points at `address`, or its own collection
    when None); the heap block holding it gets its checksum recomputed, as a crafted file would (HDF5
    refuses the file otherwise)."""
    import struct

    data = bytearray(path.read_bytes())
    references = (struct.pack("<IQ", len(b"dense/kernel:0"), collection.start())
                  for collection in re.finditer(b"GCOL\x01\x00\x00\x00", data))
    element = next(data.index(reference) for reference in references if reference in data)
    data[element:element + 12] = struct.pack("<IQ", 0xF0000000, address if address is not None else
                                             struct.unpack_from("<Q", data, element + 4)[0])
    block = data.rfind(b"FHDB", 0, element)
    heap = data.index(b"FRHP")
    # FRHP: after 110 bytes of sizes and counts come the table width (2), the starting block size (8), the largest
    # direct block's size (8) and the heap's largest offset in bits (2)
    width, start_size = struct.unpack_from("<HQ", data, heap + 110)
    offset_bytes = (struct.unpack_from("<H", data, heap + 128)[0] + 7) // 8
    # a direct block's size follows from its offset in the heap: rows of `width` blocks, the first two rows of
    # `start_size`, each later row's twice the one before
    block_offset = int.from_bytes(data[block + 13:block + 13 + offset_bytes], "little")
    row, row_start = 0, 0
    while block_offset >= row_start + width * (start_size << max(row - 1, 0)):
        row_start += width * (start_size << max(row - 1, 0))
        row += 1
    block_size = start_size << max(row - 1, 0)
    if block < element < block + block_size:  # else a "huge" object, stored apart from the blocks, unchecksummed
        checksum = block + 4 + 1 + 8 + offset_bytes
        image = bytearray(data[block:block + block_size])
        image[checksum - block:checksum - block + 4] = bytes(4)
        data[checksum:checksum + 4] = struct.pack("<I", _jenkins_lookup3(bytes(image)))
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("weights", (1, 300), ids=("in-a-heap-block", "huge-object"))
def test_dense_storage_attributes_are_read_and_checked(weights: int, tmp_path: Path) -> None:
    """HDF5 checksums a dense-storage heap, so a fuzzed reference there fails; a crafted one with its
    checksum recomputed made h5py allocate 3.9 GB for a 7 KB file. The attribute's message is found by
    its name wherever it lies, and its references held to the rule of the ones in headers (a 1.5 GiB
    address-space limit on the child)."""
    import subprocess
    import sys

    clean = _dense_attributes_h5(tmp_path / "clean.h5", weights)
    with ckptview.open(clean) as ckpt:
        assert len(ckpt.tensors()) == weights and ckpt.tensor("dense.kernel").load().tolist() == [0, 0]
    code = ("import resource, sys\nresource.setrlimit(resource.RLIMIT_AS, (3 << 29, 3 << 29))\nimport ckptview\n"
            "try:\n    ckptview.open(sys.argv[1])\nexcept Exception as e:\n    print(e)")
    for address, held in ((None, "that holds"), (12345678, "that is not there")):
        damaged = _dense_attributes_h5(tmp_path / "damaged.h5", weights)
        _damage_dense_weight_names(damaged, address)
        done = subprocess.run([sys.executable, "-c", code, str(damaged)], capture_output=True, text=True,
                              timeout=120, check=False)
        assert f"claims 4,026,531,840 bytes of an HDF5 heap object {held}" in done.stdout, \
            done.stdout + done.stderr[-500:]


def test_committed_text_type_is_refused(tmp_path: Path) -> None:
    """A text attribute whose type is committed elsewhere in the file: its message names the type
    instead of holding it, so its references are not checked before h5py would read them."""
    committed = write_weights_h5(tmp_path / "committed.h5", {"dense": {"dense/kernel:0": np.ones((2, 2), np.float32)}})
    with h5py.File(committed, "a") as f:
        f["text_type"] = h5py.string_dtype()
        del f["dense"].attrs["weight_names"]
        f["dense"].attrs.create("weight_names", [b"dense/kernel:0"], dtype=f["text_type"])
    refused(committed, CorruptCheckpointError, "committed type")


def test_compressed_dense_attribute_heap_is_refused() -> None:
    """A dense-storage heap with an I/O filter keeps its attribute messages compressed, out of reach of
    the search by name. h5py writes none (HDF5 1.14 leaves a filtered dataset's attribute heap
    uncompressed), so the bytes are made here: a version 1 header whose attribute info message names
    a fractal heap that declares a filter pipeline."""
    import struct

    from ckptview.readers.hdf5_text import check_hdf5_text

    data = bytearray(4096)
    data[0:16] = struct.pack("<BBHII4x", 1, 0, 1, 1, 32)  # version 1 header: one message, a 32-byte block
    data[16:24] = struct.pack("<HHB3x", 0x0015, 18, 0)  # attribute info: version 0, no flags, heap, name index
    data[24:42] = struct.pack("<BBQQ", 0, 0, 1024, 2048)
    data[1024:1033] = b"FRHP" + struct.pack("<BHH", 0, 8, 12)  # version 0, 8-byte heap IDs, 12 bytes of filters
    names = []
    with pytest.raises(CorruptCheckpointError, match="attributes compressed"):
        check_hdf5_text("crafted.h5", bytes(data), 0, len(data), object_headers=[0],
                        dense_attribute_names=lambda header: names.append(header) or [b"weight_names"])
    data[1031] = 0  # no filters: its attribute messages are searched for by name instead
    check_hdf5_text("crafted.h5", bytes(data), 0, len(data), object_headers=[0],
                    dense_attribute_names=lambda header: names.append(header) or [b"weight_names"])
    assert names == [0]


def test_too_many_dense_attribute_names_to_search_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each distinct name kept in dense storage costs a search of the whole file: past the budget (16 GiB
    of searching; here 3 searches of a 4 KB file) the file is refused instead of searched for minutes."""
    import struct

    from ckptview.readers import hdf5_text

    data = bytearray(4096)
    data[0:16] = struct.pack("<BBHII4x", 1, 0, 1, 1, 32)
    data[16:24] = struct.pack("<HHB3x", 0x0015, 18, 0)
    data[24:42] = struct.pack("<BBQQ", 0, 0, 1024, 2048)
    data[1024:1033] = b"FRHP" + struct.pack("<BHH", 0, 8, 0)
    monkeypatch.setattr(hdf5_text, "_DENSE_SEARCH_BYTES", 3 * len(data))
    hdf5_text.check_hdf5_text("crafted.h5", bytes(data), 0, len(data), object_headers=[0],
                              dense_attribute_names=lambda header: [b"a", b"b", b"c"])
    with pytest.raises(CorruptCheckpointError, match="4 differently named attributes in dense storage"):
        hdf5_text.check_hdf5_text("crafted.h5", bytes(data), 0, len(data), object_headers=[0],
                                  dense_attribute_names=lambda header: [b"a", b"b", b"c", b"d"])
