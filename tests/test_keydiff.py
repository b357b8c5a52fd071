"""Key diff: the same verdict and wording as load_state_dict, on real checkpoints, with folded key lists."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from models_for_tests import make_cnn, make_with_layernorm
from safetensors.torch import load_file, save_file
from torch import nn

import ckptview
from ckptview.analyzers.keydiff import compress_keys, key_diff, state_dict_of
from ckptview.analyzers.sections import model_state_dict
from ckptview.model_source import expected_state


def _torch_error(model: nn.Module, state_dict: dict) -> str:
    with pytest.raises(RuntimeError) as info:
        model.load_state_dict(state_dict, strict=True)
    return str(info.value)


def test_compress_keys_folds_layer_numbers_like_people_read_them() -> None:
    keys = [f"encoder.layer.{i}.attention.self.query.weight" for i in range(12)]
    assert compress_keys(keys) == ["encoder.layer.{0..11}.attention.self.query.weight"]


def test_compress_keys_nested_blocks_gaps_and_leaf_names() -> None:
    keys = [f"layers.{i}.blocks.{j}.mlp.weight" for i in range(2) for j in range(4)]
    keys += ["head.weight", "head.bias", "x.3.y", "x.5.y", "x.6.y", "x.7.y", "single.1.z"]
    assert compress_keys(keys) == ["layers.{0,1}.blocks.{0..3}.mlp.weight", "head.{weight,bias}", "x.{3,5..7}.y",
                                   "single.1.z"]


def test_compress_keys_keeps_distinct_keys_and_order() -> None:
    keys = ["b.weight", "a.0.w", "c.bias"]
    assert compress_keys(keys) == ["b.weight", "a.0.w", "c.bias"]
    assert compress_keys([]) == []


def test_dataparallel_checkpoint_gives_torchs_missing_and_unexpected_keys(tmp_path: Path) -> None:
    model = make_cnn()
    path = tmp_path / "dp.pt"
    torch.save(nn.DataParallel(model).state_dict(), path)
    with ckptview.open(path) as ckpt:
        diff = key_diff(model_state_dict(ckpt), expected_state(model))
    result = model.load_state_dict(torch.load(path, weights_only=True), strict=False)
    assert diff.unexpected == tuple(result.unexpected_keys)
    # torch's BatchNorm invents a missing num_batches_tracked when the state dict has no version
    # metadata for that module (here it is filed under "module.bn1"), so torch lists 3 keys fewer.
    counters = ("bn1.num_batches_tracked", "layer1.0.1.num_batches_tracked", "layer1.1.1.num_batches_tracked")
    assert diff.missing == tuple(k for k in model.state_dict() if k in result.missing_keys or k in counters)
    assert not diff.ok and diff.matched == 0
    assert '"module.layer1.{0,1}.1.{bias,running_mean,running_var,num_batches_tracked}"' in diff.message()


def test_message_is_torchs_own_word_for_word(tmp_path: Path) -> None:
    model = make_with_layernorm()
    path = tmp_path / "dp.pt"
    torch.save(nn.DataParallel(model).state_dict(), path)
    with ckptview.open(path) as ckpt:
        diff = key_diff(model_state_dict(ckpt), expected_state(model))
    # Every line after the first ("... for Sequential:") is what torch raises.
    error = _torch_error(model, torch.load(path, weights_only=True))
    assert diff.message(compress=False).splitlines()[1:] == error.splitlines()[1:]
    assert diff.message().splitlines()[1] == '\tMissing key(s) in state_dict: "{0..2}.{weight,bias}". '


def test_size_mismatch_of_a_new_head_reads_as_torch_says_it(tmp_path: Path) -> None:
    path = tmp_path / "tuned.pt"
    torch.save(make_cnn(num_classes=10).state_dict(), path)
    model = make_cnn(num_classes=5)
    with ckptview.open(path) as ckpt:
        diff = key_diff(model_state_dict(ckpt), expected_state(model))
    assert [(m.key, m.left, m.right) for m in diff.shape_mismatches] == [
        ("fc.weight", (10, 8), (5, 8)), ("fc.bias", (10,), (5,))]
    assert diff.missing == () and diff.unexpected == ()
    error = _torch_error(model, torch.load(path, weights_only=True))
    assert diff.message().splitlines()[1:] == error.splitlines()[1:]


def test_dtype_differences_are_listed_but_not_errors(tmp_path: Path) -> None:
    model = make_cnn()
    path = tmp_path / "half.safetensors"
    save_file({k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()}, path)
    with ckptview.open(path) as ckpt:
        diff = key_diff(model_state_dict(ckpt), expected_state(model))
    assert diff.ok and diff.message().startswith("All keys matched successfully")
    floats = [k for k, v in model.state_dict().items() if v.is_floating_point()]
    assert [m.key for m in diff.dtype_mismatches] == floats
    assert {(m.left, m.right) for m in diff.dtype_mismatches} == {(torch.float16, torch.float32)}
    model.load_state_dict(load_file(path))  # and torch indeed accepts it, casting to float32
    assert model.conv1.weight.dtype == torch.float32


def test_to_frame_has_one_row_per_problem(tmp_path: Path) -> None:
    left = OrderedDict(make_cnn(10).state_dict())
    left["extra.weight"] = torch.zeros(2)
    del left["conv1.weight"]
    frame = key_diff(left, make_cnn(5).state_dict()).to_frame()
    assert list(frame.columns) == ["key", "problem", "left", "right"]
    assert frame.set_index("key")["problem"].to_dict() == {
        "conv1.weight": "missing", "extra.weight": "unexpected", "fc.weight": "shape", "fc.bias": "shape"}


def test_state_dict_of_uses_the_model_section_of_a_lightning_file(tmp_path: Path) -> None:
    weights = make_cnn().state_dict()
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": weights, "epoch": 3, "optimizer_states": [{"state": {}, "param_groups": []}]}, path)
    with state_dict_of(path) as (entries, section):
        assert list(entries) == list(weights) and section is not None and section.path == ("state_dict",)
    with state_dict_of(dict(weights)) as (entries, section):
        assert section is None and entries.keys() == weights.keys()
    model = make_cnn()
    with state_dict_of(model) as (entries, section):
        assert section is None and all(entries[k].data_ptr() == v.data_ptr() for k, v in model.state_dict().items())
    with pytest.raises(TypeError, match="checkpoint path"):
        with state_dict_of(42):
            pass


def test_diff_of_a_checkpoint_against_a_live_model(tmp_path: Path) -> None:
    model = make_cnn()
    path = tmp_path / "m.safetensors"
    save_file(model.state_dict(), path)
    with torch.no_grad():
        model.fc.bias.add_(1.0)
    result = ckptview.diff(path, model, values=True)
    assert result.keys.ok
    assert [(t.key, t.max_abs_diff) for t in result.values.changed()] == [("fc.bias", 1.0)]
