"""
TensorFlow checkpoints (tensor bundles): the two-shard checkpoint and the SavedModel's variables
written by TensorFlow (tests/fixtures/make_tf_fixtures.py), checked against what
`tf.train.load_checkpoint` reported, and damaged copies of them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from format_checks import check_every_command, check_every_tab, cli

import ckptview
from ckptview.analyzers.sections import model_state_dict
from ckptview.errors import CkptviewError, CorruptCheckpointError, ShardError, TruncatedCheckpointError

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "tf"
INDEX = FIXTURES / "tf_checkpoint" / "ckpt.index"


def report(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


def expected_values(variable: dict) -> torch.Tensor:
    stored = "float32" if variable["dtype"] == "bfloat16" else variable["dtype"]
    return torch.from_numpy(np.asarray(variable["values"], dtype=stored).reshape(variable["shape"]))


@pytest.mark.parametrize("index, name", ((INDEX, "tf_checkpoint.json"),
                                         (FIXTURES / "savedmodel" / "variables" / "variables.index", "savedmodel.json")))
def test_variables_equal_what_tensorflow_reported(index: Path, name: str) -> None:
    variables = [v for v in report(name)["variables"] if v["dtype"] != "string"]
    with ckptview.open(index) as ckpt:
        assert ckpt.format == "tf-checkpoint"
        by_key = {key: ckpt.tensor(tensor) for tensor, key in ckpt.details["checkpoint_keys"].items()}
        assert sorted(by_key) == sorted(v["key"] for v in variables)
        for variable in variables:
            entry = by_key[variable["key"]]
            assert list(entry.shape) == variable["shape"]
            wanted = expected_values(variable)
            if variable["dtype"] == "bfloat16":  # the report holds them widened to float32
                assert entry.dtype_name == "bfloat16"
                wanted = wanted.to(torch.bfloat16)
            else:
                assert entry.dtype_name == variable["dtype"]
            assert torch.equal(entry.load(), wanted), variable["key"]
            assert torch.equal(torch.cat(list(entry.iter_chunks(chunk_bytes=64))), wanted.reshape(-1))


def test_keras2_legacy_optimizer_slots_under_their_variables() -> None:
    # tf.keras 2 with a legacy optimizer saves each slot under its variable's key (.OPTIMIZER_SLOT) and
    # the checkpoint's own save_counter at the root: neither belongs to the model
    expected = report("keras2_tf_checkpoint.json")
    values = {v["key"]: v for v in expected["variables"]}
    with ckptview.open(FIXTURES / "keras2_tf_checkpoint") as ckpt:
        keys = ckpt.details["checkpoint_keys"]
        assert sorted(keys.values()) == sorted(values)
        for name, key in keys.items():
            assert torch.equal(ckpt.tensor(name).load(), expected_values(values[key])), key
        state = model_state_dict(ckpt)
        assert sorted(state) == sorted(w["name"].removesuffix(":0").replace("/", ".") for w in expected["weights"])
        assert "save_counter" in keys and not any("OPTIMIZER_SLOT" in keys[f"model.{name}"] for name in state)
        (optimizer,) = ckptview.training_state(ckpt).optimizers
        assert optimizer.mapping == "param_names" and len(optimizer.params) == 8
        assert {tuple(sorted(p.tensors)) for p in optimizer.params} == {("m", "v")}
        assert keys["optimizer.state.conv.kernel.m"] == \
            "model/layer_with_weights-0/kernel/.OPTIMIZER_SLOT/optimizer/m/.ATTRIBUTES/VARIABLE_VALUE"


def test_tf1_saver_checkpoint_slots_and_stale_absolute_state(tmp_path: Path) -> None:
    # TF1's Saver names variables by key, keeps Adam's slots under them and writes absolute paths into
    # its state file: opened from a copy, the checkpoint is found beside the state file
    folder = tmp_path / "moved"
    shutil.copytree(FIXTURES / "tf1_checkpoint", folder)
    expected = {v["key"]: v for v in report("tf1_checkpoint.json")["variables"]}
    with ckptview.open(folder) as ckpt:
        assert Path(ckpt.path).parent == folder
        keys = ckpt.details["checkpoint_keys"]
        assert sorted(keys.values()) == sorted(expected)
        for name, key in keys.items():
            assert torch.equal(ckpt.tensor(name).load(), expected_values(expected[key])), key
        assert sorted(model_state_dict(ckpt)) == ["dense.bias", "dense.kernel", "head.bias", "head.kernel"]
        (optimizer,) = ckptview.training_state(ckpt).optimizers
        assert optimizer.mapping == "param_names"
        assert {p.name: sorted(p.tensors) for p in optimizer.params} == {
            name: ["Adam", "Adam_1"] for name in ("dense.bias", "dense.kernel", "head.bias", "head.kernel")}
        assert optimizer.groups[0].options["global_step"] == 2


def test_names_from_the_object_graph_match_the_keras_model() -> None:
    # the checkpoint holds the same trained model as keras3_trained.h5: Keras 3 saved its kernels under
    # optimizer/_trainable_variables/<i>, the object graph gives them back their names
    with ckptview.open(INDEX) as ckpt, ckptview.open(FIXTURES / "keras3_trained.h5") as h5:
        assert ckpt.details["checkpoint_keys"]["model.conv.kernel"] == \
            "optimizer/_trainable_variables/0/.ATTRIBUTES/VARIABLE_VALUE"
        assert ckpt.tensor("model.dense_1.kernel").encoding == "slices"  # split over both shards
        assert sorted(model_state_dict(ckpt)) == sorted(model_state_dict(h5))
        result = ckptview.diff(h5, ckpt, values=True)
        assert result.keys.matched == 10 and not result.keys.missing and not result.keys.unexpected
        assert all(row.max_abs_diff == 0 for row in result.values.tensors)
        (optimizer,) = ckptview.training_state(ckpt).optimizers
        assert optimizer.mapping == "param_names" and len(optimizer.params) == 8
        assert {tuple(sorted(p.tensors)) for p in optimizer.params} == {("momentum", "velocity")}
        assert [f.check for f in ckptview.batchnorm_checks(ckpt).problems] == []
        rows = {row.name: row for row in ckptview.tensor_table(ckpt).rows}
        assert rows["model.bn.moving_variance"].layer_kind == "BatchNorm"


def copy_checkpoint(tmp_path: Path) -> Path:
    folder = tmp_path / "ckpt"
    shutil.copytree(INDEX.parent, folder)
    return folder / "ckpt.index"


def refused(path: Path, error: type[CkptviewError], match: str, *, on_load: bool = False) -> None:
    before = {p: p.read_bytes() for p in path.parent.rglob("*") if p.is_file()}
    with pytest.raises(error, match=match) as caught, ckptview.open(path) as ckpt:
        assert on_load
        for entry in ckpt.tensors():
            entry.load()
    assert "\n" not in str(caught.value)
    code, _, err = cli("stats", str(path))
    assert code == 1 and err.count("\n") == 1, err
    assert {p: p.read_bytes() for p in path.parent.rglob("*") if p.is_file()} == before


def test_crc_mismatch_is_found_on_load(tmp_path: Path) -> None:
    index = copy_checkpoint(tmp_path)
    with ckptview.open(index) as ckpt:
        key = ckpt.details["checkpoint_keys"]["model.conv.kernel"]
        storage = ckpt.tensor("model.conv.kernel").info.storage
        shard, offset = Path(storage.source.path), storage.offset
    data = bytearray(shard.read_bytes())
    data[offset + 5] ^= 0x40
    shard.write_bytes(bytes(data))
    with ckptview.open(index) as ckpt:
        ckpt.tensor("model.bn.gamma").load()  # the others still read
        with pytest.raises(CorruptCheckpointError, match="fails its crc32c check") as caught:
            ckpt.tensor("model.conv.kernel").load()
        assert key in str(caught.value)
        with pytest.raises(CorruptCheckpointError, match="crc32c"):
            list(ckpt.tensor("model.conv.kernel").iter_chunks(chunk_bytes=100))
    refused(index, CorruptCheckpointError, "crc32c", on_load=True)


def test_missing_shard_is_named(tmp_path: Path) -> None:
    index = copy_checkpoint(tmp_path)
    (index.parent / "ckpt.data-00001-of-00002").unlink()
    refused(index, ShardError, "data shard ckpt.data-00001-of-00002 is missing")


def test_shard_symlinked_out_of_the_folder_is_refused(tmp_path: Path) -> None:
    index = copy_checkpoint(tmp_path)
    secret = tmp_path / "secret.bin"
    secret.write_bytes((index.parent / "ckpt.data-00001-of-00002").read_bytes())
    (index.parent / "ckpt.data-00001-of-00002").unlink()
    (index.parent / "ckpt.data-00001-of-00002").symlink_to(secret)
    refused(index, CorruptCheckpointError, "not a file inside its folder")


def test_entry_past_its_shard_and_truncated_index(tmp_path: Path) -> None:
    index = copy_checkpoint(tmp_path)
    shard = index.parent / "ckpt.data-00000-of-00002"
    shard.write_bytes(shard.read_bytes()[:-100])
    refused(index, CorruptCheckpointError, "the data file is cut off or from another save")

    index = copy_checkpoint(tmp_path / "cut")
    data = index.read_bytes()
    for cut in (len(data) - 1, len(data) // 2, 40):
        index.write_bytes(data[:cut])
        refused(index, TruncatedCheckpointError, "cut off")


def test_entries_reading_overlapping_bytes_are_refused(tmp_path: Path) -> None:
    """TensorFlow writes each tensor's bytes once; an index whose entries read one range again (ten
    thousand entries over 100 MB would make statistics read a terabyte) is refused when opened."""
    from ckptview.readers.tf_checkpoint import _entry, _Table

    def varint(value: int) -> bytes:
        out = bytearray()
        while True:
            out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
            value >>= 7
            if not value:
                return bytes(out)

    index = copy_checkpoint(tmp_path)
    data = index.read_bytes()
    values = dict(_Table(str(index), data).entries())
    entries = {key: _entry(str(index), key, value) for key, value in values.items() if key}
    pairs = [(a, b) for a in entries for b in entries
             if a != b and entries[a]["size"] and entries[b]["size"]
             and entries[a]["shard_id"] == entries[b]["shard_id"]
             and len(varint(entries[a]["offset"])) == len(varint(entries[b]["offset"]))
             and data.count(values[b]) == 1]
    first, second = pairs[0]
    offset_field = b"\x20" + varint(entries[second]["offset"])  # field 4 (offset), a varint
    moved = values[second].replace(offset_field, b"\x20" + varint(entries[first]["offset"]), 1)
    assert moved != values[second]
    index.write_bytes(data.replace(values[second], moved))
    refused(index, CorruptCheckpointError, "read overlapping bytes of their data shard")


def test_checkpoint_state_file_opens_the_latest(tmp_path: Path) -> None:
    index = copy_checkpoint(tmp_path)
    state = index.parent / "checkpoint"
    state.write_text('model_checkpoint_path: "ckpt"\nall_model_checkpoint_paths: "ckpt-0"\n'
                     'all_model_checkpoint_paths: "ckpt"\n')
    with ckptview.open(state) as ckpt, ckptview.open(index) as direct:
        assert [e.name for e in ckpt.tensors()] == [e.name for e in direct.tensors()]
        assert ckpt.details["checkpoint_state"] == {"latest": "ckpt", "all": ["ckpt-0", "ckpt"]}
    state.write_text('model_checkpoint_path: "../../etc/ckpt"\n')
    refused(state, CorruptCheckpointError, "not a file inside its folder")


def test_every_cli_command_and_explorer_tab(tmp_path: Path) -> None:
    index = copy_checkpoint(tmp_path)
    info = check_every_command(index)
    assert info["details"]["num_shards"] == 2
    assert {s["kind"] for s in info["sections"]} >= {"state_dict", "optimizer"}
    check_every_tab(index)


# --- SavedModel ---------------------------------------------------------------------------------

def test_saved_model_signatures_and_variables() -> None:
    expected = report("savedmodel.json")
    with ckptview.open(FIXTURES / "savedmodel") as ckpt:
        assert ckpt.format == "savedmodel" and not ckpt.needs_trust
        serving = ckpt.details["signatures"]["serving_default"]
        for side in ("inputs", "outputs"):
            got = {key: {"dtype": value["dtype"], "shape": [None if d == -1 else d for d in value["shape"]]}
                   for key, value in serving[side].items()}
            assert got == expected["signatures"]["serving_default"][side]
        assert serving["inputs"]["x"]["name"] == "serving_default_x:0"
        assert ckpt.details["op_counts"]["MatMul"] == 1
        assert sorted(ckpt.details["checkpoint_keys"].values()) == sorted(
            v["key"] for v in expected["variables"] if v["dtype"] != "string")
        assert torch.equal(ckpt.tensor("w").load(), torch.arange(6, dtype=torch.float32).reshape(2, 3))


def test_saved_model_with_a_file_op_is_code_and_never_runs(tmp_path: Path) -> None:
    marker = Path("/tmp/ckptview-keras-lambda-ran")  # what the fixture's WriteFile op would write
    if marker.exists():
        marker.unlink()
    folder = tmp_path / "writer"
    shutil.copytree(FIXTURES / "savedmodel_writefile", folder)
    for path in (folder, folder / "saved_model.pb"):
        code, out, err = cli("scan", str(path))
        assert code == 3, err
        assert "tf.raw_ops.WriteFile" in out
    code, out, _ = cli("scan", str(FIXTURES / "savedmodel"))
    assert code == 0, out
    with ckptview.open(folder) as ckpt:
        check = ckpt.pickle_imports
        assert [imp.name.split(" ")[0] for imp in check] == ["tf.raw_ops.WriteFile"]
    assert not marker.exists()


@pytest.mark.parametrize("name", ("keras2_savedmodel_lambda", "keras2_savedmodel_lambda_pre25"))
def test_keras2_saved_model_with_a_lambda_is_code_and_never_runs(tmp_path: Path, name: str) -> None:
    """
    `tf_keras.models.load_model` ran the Lambda layer's bytecode of both layouts (keras_metadata.pb,
    and the layer configs in saved_model.pb's object graph as before TF 2.5), `tf.saved_model.load`
    did not: what the fixture script recorded. scan named neither code before.
    """
    ran = report(f"{name}.json")
    assert ran["tf_keras.models.load_model ran the Lambda"] and not ran["tf.saved_model.load ran the Lambda"]
    marker = Path("/tmp/ckptview-keras-lambda-ran")
    marker.unlink(missing_ok=True)
    folder = tmp_path / name
    shutil.copytree(FIXTURES / name, folder)
    for path in (folder, folder / "saved_model.pb"):
        code, out, err = cli("scan", str(path))
        assert code == 3, (out, err)
        assert "keras.layers.Lambda 'doubler'" in out and "tf.keras.models.load_model runs it" in out
    with ckptview.open(folder) as ckpt:
        assert [imp.name.split(" ")[0] for imp in ckpt.pickle_imports] == ["keras.layers.Lambda"]
        assert sorted(entry.name for entry in ckpt.tensors()) == ["head.bias", "head.kernel"]
        ckpt.tensor("head.kernel").load()
    check_every_tab(folder)
    assert not marker.exists()


def test_keras_metadata_is_read_as_protobuf_reads_it(tmp_path: Path) -> None:
    folder = tmp_path / "lambda"
    shutil.copytree(FIXTURES / "keras2_savedmodel_lambda", folder)
    metadata = folder / "keras_metadata.pb"
    original = metadata.read_bytes()
    # a group (field 9) SavedMetadata does not have: protobuf keeps it as an unknown field and reads on,
    # and load_model ran the Lambda all the same
    metadata.write_bytes(b"\x4b\x08\x01\x4c" + original)
    code, out, _ = cli("scan", str(folder))
    assert code == 3 and "keras.layers.Lambda 'doubler'" in out, out
    # cut off: protobuf refuses it, and load_model with it, before any layer is called; the SavedModel
    # itself (what tf.saved_model.load reads) is whole
    metadata.write_bytes(original[:len(original) // 2])
    code, out, _ = cli("scan", str(folder))
    assert code == 0, out
    with ckptview.open(folder) as ckpt:
        assert "damaged" in ckpt.details["keras_metadata"] and not ckpt.pickle_imports
    # linked out of the folder: refused, as linked variables are
    (tmp_path / "elsewhere.pb").write_bytes(original)
    metadata.unlink()
    metadata.symlink_to(tmp_path / "elsewhere.pb")
    refused(folder / "saved_model.pb", CorruptCheckpointError, "not a file inside its folder")


def test_checkpoint_ops_outside_the_saver_are_code() -> None:
    """
    SaveV2 in a serving function wrote files where its prefix said when TensorFlow served the model,
    one the saver's restore op runs did as TF1's loader loaded it, and the saver's own did when a
    serving output waited on it (what the fixture script recorded); every SavedModel's own saver has SaveV2 and RestoreV2 too, in functions (TF2) or in
    the graph itself (TF1), and they are no code.
    """
    ran = report("savedmodel_savev2.json")
    assert ran["files after serving"] and not ran["files after tf.saved_model.load"]
    code, out, _ = cli("scan", str(FIXTURES / "savedmodel_savev2"))
    assert code == 3, out
    assert "tf.raw_ops.SaveV2" in out and "beyond the saver's own save; in function __inference_serve" in out
    # TF1's loader runs the saver's restore op as it loads: a SaveV2 that op runs wrote files then
    assert report("tf1_savedmodel_restore_writes.json")["files after tf.compat.v1.saved_model.load"]
    code, out, _ = cli("scan", str(FIXTURES / "tf1_savedmodel_restore_writes"))
    assert code == 3 and "tf.raw_ops.SaveV2" in out and "beyond the saver's own save; in the graph" in out, out
    # the saver's own SaveV2, run by a serving output that waits on it: serving wrote checkpoint files
    assert report("tf1_savedmodel_serving_saves.json")["after serving"]
    code, out, _ = cli("scan", str(FIXTURES / "tf1_savedmodel_serving_saves"))
    assert code == 3 and "tf.raw_ops.SaveV2" in out and "beyond the saver's own save; in the graph" in out, out
    assert report("tf1_savedmodel.json")["saver ops in the graph"] == ["RestoreV2", "SaveV2"]
    for name in ("savedmodel", "tf1_savedmodel", "keras2_savedmodel_lambda"):
        with ckptview.open(FIXTURES / name) as ckpt:
            assert ckpt.details["op_counts"]["SaveV2"] and ckpt.details["op_counts"]["RestoreV2"]
            assert not [imp.name for imp in ckpt.pickle_imports if "saver's own" in imp.name]
    code, out, _ = cli("scan", str(FIXTURES / "tf1_savedmodel"))
    assert code == 0, out
    with ckptview.open(FIXTURES / "tf1_savedmodel") as ckpt:
        assert ckpt.tensor("w").load().reshape(-1).tolist() == [1.0, 2.0]


def test_saved_model_variables_linked_out_of_the_folder_are_refused(tmp_path: Path) -> None:
    folder = tmp_path / "linked"
    shutil.copytree(FIXTURES / "savedmodel", folder)
    shutil.move(folder / "variables", tmp_path / "elsewhere")
    (folder / "variables").symlink_to(tmp_path / "elsewhere")
    refused(folder / "saved_model.pb", CorruptCheckpointError, "not a file inside its folder")


def test_saved_model_cut_off(tmp_path: Path) -> None:
    folder = tmp_path / "cut"
    shutil.copytree(FIXTURES / "savedmodel", folder)
    pb = folder / "saved_model.pb"
    pb.write_bytes(pb.read_bytes()[:3000])
    refused(pb, TruncatedCheckpointError, "cut off")


def test_every_cli_command_and_explorer_tab_on_a_saved_model(tmp_path: Path) -> None:
    folder = tmp_path / "savedmodel"
    shutil.copytree(FIXTURES / "savedmodel", folder)
    info = check_every_command(folder / "saved_model.pb")
    assert info["format"] == "savedmodel" and "serving_default" in info["details"]["signatures"]
    check_every_tab(folder)
