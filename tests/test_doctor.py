"""
The load doctor on real failures: each checkpoint is saved the way training code saves it, fails
to load as torch would fail, and the proposed code, executed here on what torch.load returns,
makes it load.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from models_for_tests import make_backbone, make_cnn, make_tied_lm, make_with_layernorm
from safetensors.torch import load_file, save_file
from torch import nn

import ckptview
from ckptview.analyzers.doctor import diagnose
from ckptview.cli import main
from ckptview.errors import ModelBuildError
from ckptview.model_source import build_model, expected_state, meta_twin

FACTORY = "models_for_tests:make_cnn"


def apply_fix(code: str, state_dict: Any) -> Any:
    """Run the doctor's snippet as a user would: `state_dict` in, repaired `state_dict` out."""
    namespace = {"state_dict": state_dict}
    exec(code, namespace)  # noqa: S102 - the code under test
    return namespace["state_dict"]


def assert_same_weights(model: nn.Module, reference: nn.Module) -> None:
    for (name, value), (_, expected) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(value, expected), name


@pytest.fixture
def trained() -> nn.Module:
    model = make_cnn()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter))  # differs from a fresh make_cnn(), so loading shows
    model.bn1.running_mean.fill_(0.5)
    model.bn1.num_batches_tracked.fill_(7)
    return model


def test_dataparallel_checkpoint_into_the_bare_model(tmp_path: Path, trained: nn.Module) -> None:
    path = tmp_path / "dp.pt"
    torch.save(nn.DataParallel(trained).state_dict(), path)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        make_cnn().load_state_dict(torch.load(path, weights_only=True))
    report = ckptview.doctor(path, FACTORY)
    assert [fix.kind for fix in report.fixes] == ["strip_prefix"]
    assert "consume_prefix_in_state_dict_if_present(state_dict, 'module.')" in report.code
    assert "DataParallel" in report.fixes[0].description
    assert report.loads_after_fix and report.strict and not report.ok
    model = make_cnn()
    model.load_state_dict(apply_fix(report.code, torch.load(path, weights_only=True)), strict=True)
    assert_same_weights(model, trained)


def test_torch_compiled_model_and_compiled_inside_dataparallel(tmp_path: Path, trained: nn.Module) -> None:
    compiled = torch.compile(trained)  # compiling without running it is enough: the keys gain "_orig_mod."
    for name, saved, prefix in (("compiled.pt", compiled.state_dict(), "_orig_mod."),
                                ("dp_compiled.pt", nn.DataParallel(compiled).state_dict(), "module._orig_mod.")):
        path = tmp_path / name
        torch.save(saved, path)
        report = ckptview.doctor(path, FACTORY)
        assert [(f.kind, f.keys[0].startswith(prefix)) for f in report.fixes] == [("strip_prefix", True)]
        assert f"consume_prefix_in_state_dict_if_present(state_dict, {prefix!r})" in report.code
        model = make_cnn()
        model.load_state_dict(apply_fix(report.code, torch.load(path, weights_only=True)), strict=True)
        assert_same_weights(model, trained)


def test_fine_tune_with_a_new_head_loads_all_but_the_head(tmp_path: Path, trained: nn.Module) -> None:
    path = tmp_path / "pretrained.pt"
    torch.save(trained.state_dict(), path)
    model = make_cnn(num_classes=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = ckptview.doctor(path, model)
    assert {k: torch.equal(v, before[k]) for k, v in model.state_dict().items()} == dict.fromkeys(before, True)
    assert [fix.kind for fix in report.fixes] == ["head"]
    assert "10 outputs in the checkpoint, 5 in the model" in report.fixes[0].description
    assert report.loads_after_fix and not report.strict and report.leaves_missing == ("fc.weight", "fc.bias")
    result = model.load_state_dict(apply_fix(report.code, torch.load(path, weights_only=True)), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and result.unexpected_keys == []
    assert torch.equal(model.conv1.weight, trained.conv1.weight)
    assert torch.equal(model.fc.weight, before["fc.weight"])  # the new head keeps its initialisation


def test_checkpoint_without_num_batches_tracked_is_safe_and_fixed(tmp_path: Path, trained: nn.Module) -> None:
    state = trained.state_dict()  # an OrderedDict with torch's version metadata, as a real save has
    for key in [k for k in state if k.endswith("num_batches_tracked")]:
        del state[key]
    path = tmp_path / "old.pt"
    torch.save(state, path)
    with pytest.raises(RuntimeError, match="Missing key.*num_batches_tracked"):
        make_cnn().load_state_dict(torch.load(path, weights_only=True))
    report = ckptview.doctor(path, FACTORY)
    assert [fix.kind for fix in report.fixes] == ["num_batches_tracked"]
    assert "Safe to ignore" in report.fixes[0].description and "momentum=None" in report.fixes[0].description
    model = make_cnn()
    model.load_state_dict(apply_fix(report.code, torch.load(path, weights_only=True)), strict=True)
    assert int(model.bn1.num_batches_tracked) == 0
    assert torch.equal(model.bn1.running_mean, trained.bn1.running_mean)


def test_zero3_placeholders_cannot_be_fixed_by_renaming(tmp_path: Path, trained: nn.Module) -> None:
    state = trained.state_dict()
    for name, parameter in trained.named_parameters():
        state[name] = torch.empty(0, dtype=parameter.dtype)  # what a ZeRO-3 rank saves for a partitioned param
    path = tmp_path / "zero3.pt"
    torch.save(state, path)
    report = ckptview.doctor(path, FACTORY)
    assert [(fix.kind, fix.applicable) for fix in report.fixes] == [("sharded_placeholders", False)]
    description = report.fixes[0].description
    assert "cannot be fixed by renaming" in description
    assert "zero_to_fp32.py" in description and "dcp_to_torch_save" in description
    assert "11 of 20 tensors are placeholders of shape [0]" in description
    assert report.code == "" and not report.loads_after_fix
    with pytest.raises(ValueError, match="do not make this checkpoint load"):
        report.save_fixed(tmp_path / "out.pt")


def test_lightning_checkpoint_with_model_prefix(tmp_path: Path, trained: nn.Module) -> None:
    path = tmp_path / "epoch=3.ckpt"
    torch.save({"state_dict": {"model." + k: v for k, v in trained.state_dict().items()}, "epoch": 3,
                "global_step": 120, "hyper_parameters": {"lr": 0.1}}, path)
    report = ckptview.doctor(path, FACTORY)
    assert [fix.kind for fix in report.fixes] == ["section", "strip_prefix"]
    model = make_cnn()
    model.load_state_dict(apply_fix(report.code, torch.load(path, weights_only=True)), strict=True)
    assert_same_weights(model, trained)


def test_weights_of_the_bare_net_into_a_model_holding_it_as_backbone(tmp_path: Path, trained: nn.Module) -> None:
    path = tmp_path / "net.pt"
    torch.save(trained.state_dict(), path)
    report = ckptview.doctor(path, "models_for_tests:make_backbone")
    assert [fix.kind for fix in report.fixes] == ["add_prefix"] and "'backbone.'" in report.code
    model = make_backbone()
    model.load_state_dict(apply_fix(report.code, torch.load(path, weights_only=True)), strict=True)
    assert_same_weights(model.backbone, trained)


def test_gamma_beta_renamed_to_weight_bias(tmp_path: Path) -> None:
    reference = make_with_layernorm()
    path = tmp_path / "tf_port.pt"
    torch.save({k.replace("1.weight", "1.gamma").replace("1.bias", "1.beta"): v
                for k, v in reference.state_dict().items()}, path)
    report = ckptview.doctor(path, make_with_layernorm)
    assert [fix.kind for fix in report.fixes] == ["rename"]
    assert "renames = {'gamma': 'weight', 'beta': 'bias'}" in report.code
    model = make_with_layernorm()
    model.load_state_dict(apply_fix(report.code, torch.load(path, weights_only=True)), strict=True)
    assert_same_weights(model, reference)


def test_rename_is_not_proposed_when_shapes_disagree(tmp_path: Path) -> None:
    state = make_cnn(num_classes=3).state_dict()
    state = OrderedDict((k.replace("fc.", "classifier."), v) for k, v in state.items())
    report = diagnose(state, make_cnn(num_classes=10))
    assert "rename" not in [fix.kind for fix in report.fixes]
    assert [fix.kind for fix in report.fixes] == ["drop_unexpected", "missing"]
    assert report.leaves_missing == ("fc.weight", "fc.bias") and report.loads_after_fix


def test_tied_weights_saved_once(tmp_path: Path) -> None:
    reference = make_tied_lm()
    path = tmp_path / "lm.safetensors"
    save_file({k: v for k, v in reference.state_dict().items() if k != "lm_head.weight"}, path)
    report = ckptview.doctor(path, "models_for_tests:make_tied_lm")
    assert [fix.kind for fix in report.fixes] == ["tied_weights"]
    assert report.code == "state_dict['lm_head.weight'] = state_dict['embed.weight']"
    model = make_tied_lm()
    model.load_state_dict(apply_fix(report.code, load_file(path)), strict=True)
    assert torch.equal(model.lm_head.weight, reference.embed.weight)


def test_transposed_matrix(tmp_path: Path) -> None:
    reference = make_with_layernorm()
    state = dict(reference.state_dict())
    state["0.weight"] = state["0.weight"].t().contiguous()  # [in, out], as Conv1D / Flax store it
    path = tmp_path / "conv1d.safetensors"
    save_file(state, path)
    report = ckptview.doctor(path, make_with_layernorm)
    assert [fix.kind for fix in report.fixes] == ["transpose"]
    model = make_with_layernorm()
    model.load_state_dict(apply_fix(report.code, load_file(path)), strict=True)
    assert_same_weights(model, reference)
    assert torch.equal(report.fixed_state_dict()["0.weight"], reference[0].weight)


def test_unexpected_extra_module_is_dropped(tmp_path: Path, trained: nn.Module) -> None:
    state = dict(trained.state_dict())
    state["criterion.pos_weight"] = torch.ones(10)
    path = tmp_path / "with_loss.pt"
    torch.save(state, path)
    report = ckptview.doctor(path, FACTORY)
    assert [(f.kind, f.keys) for f in report.fixes] == [("drop_unexpected", ("criterion.pos_weight",))]
    make_cnn().load_state_dict(apply_fix(report.code, torch.load(path, weights_only=True)), strict=True)


def test_fixes_compose_into_one_snippet(tmp_path: Path, trained: nn.Module) -> None:
    state = nn.DataParallel(trained).state_dict()
    for key in [k for k in state if k.endswith("num_batches_tracked")]:
        del state[key]
    path = tmp_path / "ddp_old_finetune.pt"
    torch.save({"model": state, "epoch": 9}, path)
    model = make_cnn(num_classes=4)
    report = ckptview.doctor(path, model)
    assert [fix.kind for fix in report.fixes] == ["section", "strip_prefix", "num_batches_tracked", "head"]
    assert report.code.splitlines()[:3] == [
        "from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present", "import torch", ""]
    result = model.load_state_dict(apply_fix(report.code, torch.load(path, weights_only=True)), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys
    assert torch.equal(model.layer1[1][0].weight, trained.layer1[1][0].weight)


def test_checkpoint_that_loads_needs_no_fix(tmp_path: Path, trained: nn.Module) -> None:
    path = tmp_path / "ok.pt"
    torch.save(trained.state_dict(), path)
    report = ckptview.doctor(path, FACTORY)
    assert report.ok and report.fixes == () and report.code == "" and report.loads_after_fix and report.strict
    assert report.summary().startswith("All keys matched successfully")


def test_fixed_state_dict_is_lazy_and_equals_the_snippets_result(tmp_path: Path, trained: nn.Module) -> None:
    path = tmp_path / "dp.pt"
    torch.save(nn.DataParallel(trained).state_dict(), path)
    report = ckptview.doctor(path, FACTORY)
    fixed = report.fixed_state_dict()
    by_code = apply_fix(report.code, torch.load(path, weights_only=True))
    assert list(fixed) == list(by_code)
    entry = fixed.entry("conv1.weight")
    assert entry is not None and entry.name == "module.conv1.weight" and fixed.spec("fc.weight") == ((10, 8), torch.float32)
    for key in by_code:
        assert torch.equal(fixed[key], by_code[key]), key
    model = make_cnn()
    model.load_state_dict(fixed, strict=True)
    assert_same_weights(model, trained)


def test_save_fixed_writes_a_new_file_atomically_and_never_overwrites(tmp_path: Path, trained: nn.Module) -> None:
    source = tmp_path / "dp.pt"
    torch.save(nn.DataParallel(trained).state_dict(), source)
    original = source.read_bytes()
    report = ckptview.doctor(source, FACTORY)
    target = tmp_path / "fixed.pt"
    assert report.save_fixed(target) == str(target)
    model = make_cnn()
    model.load_state_dict(torch.load(target, weights_only=True), strict=True)
    assert_same_weights(model, trained)
    target.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        report.save_fixed(target)
    assert target.read_bytes() == b"keep me"
    report.save_fixed(target, overwrite=True)
    make_cnn().load_state_dict(torch.load(target, weights_only=True), strict=True)
    assert source.read_bytes() == original
    assert sorted(os.listdir(tmp_path)) == ["dp.pt", "fixed.pt"]  # no temp file left behind


def test_save_fixed_safetensors_with_tied_weights(tmp_path: Path) -> None:
    reference = make_tied_lm()
    path = tmp_path / "lm.safetensors"
    save_file({k: v for k, v in reference.state_dict().items() if k != "lm_head.weight"}, path)
    report = ckptview.doctor(path, make_tied_lm)
    out = report.save_fixed(tmp_path / "lm_full.safetensors")
    model = make_tied_lm()
    model.load_state_dict(load_file(out), strict=True)
    assert torch.equal(model.lm_head.weight, reference.embed.weight)


def test_model_factory_is_built_on_meta_and_the_user_model_is_left_alone() -> None:
    model = build_model(FACTORY, kwargs={"num_classes": 3})
    assert {p.device.type for p in model.parameters()} == {"meta"} and model.fc.weight.shape == (3, 8)
    assert expected_state(model)["fc.weight"] == ((3, 8), torch.float32)
    real = make_tied_lm()
    twin = meta_twin(real)
    assert twin.lm_head.weight is twin.embed.weight and twin.embed.weight.device.type == "meta"
    assert real.embed.weight.device.type == "cpu"
    assert build_model(real) is real


@pytest.mark.parametrize(("spec", "message"), [
    ("make_cnn", "not of the form 'package.module:callable'"),
    ("no_such_package_ckptview:build", "cannot import 'no_such_package_ckptview'"),
    ("models_for_tests:make_nothing", "has no attribute 'make_nothing'"),
    ("models_for_tests:broken_factory", "this factory always fails"),
    ("models_for_tests:not_a_model", "returned a str, not an nn.Module"),
])
def test_bad_factories_raise_model_build_error(spec: str, message: str) -> None:
    with pytest.raises(ModelBuildError, match=message):
        ckptview.doctor({"w": torch.zeros(1)}, spec)


def test_matching_keys_inside_a_training_checkpoint_still_need_the_section(tmp_path: Path, trained: nn.Module) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save({"model_state_dict": trained.state_dict(), "optimizer_state_dict": {"state": {}, "param_groups": []},
                "epoch": 4}, path)
    report = ckptview.doctor(path, FACTORY)
    assert report.before.ok and not report.ok
    assert [fix.kind for fix in report.fixes] == ["section"] and report.code == "state_dict = state_dict['model_state_dict']"
    model = make_cnn()
    model.load_state_dict(apply_fix(report.code, torch.load(path, weights_only=True)), strict=True)
    assert_same_weights(model, trained)


def test_quantized_weights_into_a_float_model(tmp_path: Path) -> None:
    reference = make_with_layernorm()
    state = dict(reference.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch 2.13 deprecates quantized tensors, still saves them
        state["0.weight"] = torch.quantize_per_tensor(state["0.weight"], 0.01, 0, torch.qint8)
    path = tmp_path / "quantized.pt"
    torch.save(state, path)
    with pytest.raises(RuntimeError, match="quantized Tensor to non-quantized"):
        make_with_layernorm().load_state_dict(torch.load(path, weights_only=True))
    report = ckptview.doctor(path, make_with_layernorm)
    assert not report.before.ok and [fix.kind for fix in report.fixes] == ["dequantize"]
    assert report.loads_after_fix and report.strict
    model = make_with_layernorm()
    model.load_state_dict(apply_fix(report.code, torch.load(path, weights_only=True)), strict=True)
    assert torch.allclose(model[0].weight, reference[0].weight, atol=0.005)
    assert torch.equal(report.fixed_state_dict()["0.weight"], model[0].weight)


def test_renamed_head_with_the_same_shape_is_renamed(tmp_path: Path, trained: nn.Module) -> None:
    path = tmp_path / "old_names.pt"
    torch.save({k.replace("fc.", "head."): v for k, v in trained.state_dict().items()}, path)
    report = ckptview.doctor(path, FACTORY)
    assert [fix.kind for fix in report.fixes] == ["rename"] and "renames = {'head': 'fc'}" in report.code
    model = make_cnn()
    model.load_state_dict(apply_fix(report.code, torch.load(path, weights_only=True)), strict=True)
    assert_same_weights(model, trained)


def test_diff_and_doctor_are_public() -> None:
    assert {"diff", "doctor"} <= set(ckptview.__all__)
    assert ckptview.doctor.__module__ == "ckptview.analyzers.doctor"
    assert ckptview.diff.__module__ == "ckptview.analyzers.valuediff"


# --- wrapper parts inside keys and renames of runs of parts ---------------------------------------

class Holder(nn.Module):
    """Holds its layer as `self.module`: a real submodule with the name DataParallel gives what it wraps."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.module = nn.Linear(width, width)


class EncoderModel(nn.Module):
    """An encoder that training code may compile or wrap on its own, a `block.module` that is real, and a head."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.embed = nn.Linear(4, width)
        self.encoder = nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width), nn.Linear(width, width))
        self.block = Holder(width)
        self.head = nn.Linear(width, 3)


def randomized(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter))
    return model


def wrapped_encoder(reference: nn.Module, wrap: Any) -> nn.Module:
    """A copy of `reference` whose encoder is wrapped on its own, as training code does before saving."""
    model = copy.deepcopy(reference)
    model.encoder = wrap(model.encoder)
    return model


@pytest.mark.parametrize(("wrap", "part"), [(torch.compile, "_orig_mod"), (nn.DataParallel, "module")])
def test_submodule_compiled_or_wrapped_alone_loses_its_wrapper_part(tmp_path: Path, wrap: Any, part: str) -> None:
    reference = randomized(EncoderModel())
    path = tmp_path / "wrapped_encoder.pt"
    torch.save(wrapped_encoder(reference, wrap).state_dict(), path)
    assert f"encoder.{part}.0.weight" in torch.load(path, weights_only=True)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        EncoderModel().load_state_dict(torch.load(path, weights_only=True))
    report = ckptview.doctor(path, EncoderModel)
    assert [fix.kind for fix in report.fixes] == ["drop_wrapper_parts"]
    assert f"wrapped = {{'encoder': [{part!r}]}}" in report.code
    assert f"(key part {part!r})" in report.fixes[0].description
    assert report.loads_after_fix and report.strict
    assert [fix["kind"] for fix in json.loads(json.dumps(report.to_dict()))["fixes"]] == ["drop_wrapper_parts"]
    model = EncoderModel()
    model.load_state_dict(apply_fix(report.code, torch.load(path, weights_only=True)), strict=True)
    assert_same_weights(model, reference)  # block.module, a real submodule, kept its part


def test_wrapper_part_composes_with_section_and_leading_prefix_in_the_cli_json(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    reference = randomized(make_backbone())
    model = copy.deepcopy(reference)
    model.backbone = torch.compile(model.backbone)
    path = tmp_path / "ddp_compiled_backbone.pt"
    torch.save({"model": nn.DataParallel(model).state_dict(), "epoch": 1}, path)
    assert "module.backbone._orig_mod.conv1.weight" in torch.load(path, weights_only=True)["model"]
    assert main(["doctor", str(path), "--model", "models_for_tests:make_backbone", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [fix["kind"] for fix in data["fixes"]] == ["section", "strip_prefix", "drop_wrapper_parts"]
    assert data["loads_after_fix"] is True and data["strict"] is True
    assert "consume_prefix_in_state_dict_if_present(state_dict, 'module.')" in data["code"]
    loaded = make_backbone()
    loaded.load_state_dict(apply_fix(data["code"], torch.load(path, weights_only=True)), strict=True)
    assert_same_weights(loaded, reference)


def test_a_real_submodule_named_module_is_never_unwrapped(tmp_path: Path) -> None:
    reference = randomized(EncoderModel())
    compiled_block = copy.deepcopy(reference)
    compiled_block.block = torch.compile(compiled_block.block)
    cases = [  # (saved model, a key it has, fix kinds, the wrapped modules in the code)
        (nn.DataParallel(reference), "module.block.module.weight", ["strip_prefix"], None),
        (nn.DataParallel(wrapped_encoder(reference, torch.compile)), "module.block.module.weight",
         ["strip_prefix", "drop_wrapper_parts"], "{'encoder': ['_orig_mod']}"),
        (compiled_block, "block._orig_mod.module.weight", ["drop_wrapper_parts"], "{'block': ['_orig_mod']}"),
    ]
    for number, (saved, key, kinds, wrapped) in enumerate(cases):
        path = tmp_path / f"case{number}.pt"
        torch.save(saved.state_dict(), path)
        assert key in torch.load(path, weights_only=True)
        report = ckptview.doctor(path, EncoderModel)
        assert [fix.kind for fix in report.fixes] == kinds
        assert (f"wrapped = {wrapped}" in report.code) if wrapped else "unwrap" not in report.code
        model = EncoderModel()
        model.load_state_dict(apply_fix(report.code, torch.load(path, weights_only=True)), strict=True)
        assert_same_weights(model, reference)


def test_wrapper_part_dropped_even_where_a_key_then_has_no_place(tmp_path: Path) -> None:
    reference = randomized(EncoderModel())
    state = wrapped_encoder(reference, torch.compile).state_dict()
    state["encoder._orig_mod.step"] = torch.tensor(3)  # a buffer this version of the model no longer has
    path = tmp_path / "compiled_encoder_with_extra.pt"
    torch.save(state, path)
    report = ckptview.doctor(path, EncoderModel)
    assert [(fix.kind, fix.keys) for fix in report.fixes][1:] == [("drop_unexpected", ("encoder.step",))]
    assert report.fixes[0].kind == "drop_wrapper_parts" and report.loads_after_fix and report.strict
    model = EncoderModel()
    model.load_state_dict(apply_fix(report.code, torch.load(path, weights_only=True)), strict=True)
    assert_same_weights(model, reference)


def test_wrapper_part_is_kept_when_dropping_it_lines_up_no_same_shaped_key(tmp_path: Path) -> None:
    state = dict(EncoderModel().state_dict())
    state["block.module.weight"] = torch.zeros(8, 5)  # unmatched: `block.weight` is no model key either
    narrow = tmp_path / "narrow_block.pt"
    torch.save(state, narrow)
    other_width = tmp_path / "other_width.pt"  # `encoder.0.weight` is a model key, of another shape
    torch.save(wrapped_encoder(EncoderModel(width=6), torch.compile).state_dict(), other_width)
    for path in (narrow, other_width):
        report = ckptview.doctor(path, EncoderModel)
        assert "drop_wrapper_parts" not in [fix.kind for fix in report.fixes], path.name
        assert "unwrap" not in report.code


class TinyTransformer(nn.Module):
    """Two blocks whose names differ between implementations: (blocks, attention, qkv, out)."""

    def __init__(self, names: tuple[str, str, str, str] = ("h", "attn", "c_attn", "c_proj")) -> None:
        super().__init__()
        blocks, attention, qkv, out = names
        self.wte = nn.Embedding(20, 8)
        layers = nn.ModuleList()
        for _ in range(2):
            block, attn = nn.Module(), nn.Module()
            setattr(attn, qkv, nn.Linear(8, 24))
            setattr(attn, out, nn.Linear(8, 8))
            setattr(block, attention, attn)
            block.ln = nn.LayerNorm(8)
            layers.append(block)
        setattr(self, blocks, layers)


def make_ported_transformer() -> TinyTransformer:
    return TinyTransformer(("layers", "attention", "qkv", "out"))


def make_cnn_with_head_fc(num_classes: int = 10) -> nn.Module:
    """make_cnn with its classifier moved to `head.fc`, beside `xfc` and `fc_out` that merely contain `fc`."""
    model = make_cnn(num_classes)
    model.head = nn.Module()
    model.head.fc = model.fc
    del model.fc
    model.xfc, model.fc_out = nn.Linear(2, 2), nn.Linear(2, 3)
    return model


def test_renames_of_runs_of_parts_port_a_transformer(tmp_path: Path) -> None:
    reference = randomized(TinyTransformer())
    path = tmp_path / "gpt_names.pt"
    torch.save(reference.state_dict(), path)
    report = ckptview.doctor(path, make_ported_transformer)
    assert [fix.kind for fix in report.fixes] == ["rename"]
    assert "renames = {'h': 'layers', 'attn.c_attn': 'attention.qkv', 'attn.c_proj': 'attention.out'}" in report.code
    assert report.loads_after_fix and report.strict
    assert [fix["kind"] for fix in json.loads(json.dumps(report.to_dict()))["fixes"]] == ["rename"]
    model = make_ported_transformer()
    model.load_state_dict(apply_fix(report.code, torch.load(path, weights_only=True)), strict=True)
    assert_same_weights(model, reference)


def test_rename_to_more_parts_leaves_parts_that_merely_contain_the_name_alone(tmp_path: Path) -> None:
    reference = randomized(make_cnn())
    reference.xfc, reference.fc_out = nn.Linear(2, 2), nn.Linear(2, 3)
    path = tmp_path / "flat_fc.pt"
    torch.save(reference.state_dict(), path)
    report = ckptview.doctor(path, make_cnn_with_head_fc)
    assert [fix.kind for fix in report.fixes] == ["rename"] and "renames = {'fc': 'head.fc'}" in report.code
    assert report.fixes[0].keys == ("fc.weight", "fc.bias") and report.loads_after_fix and report.strict
    model = make_cnn_with_head_fc()
    fixed = apply_fix(report.code, torch.load(path, weights_only=True))
    assert {"xfc.weight", "fc_out.weight", "head.fc.weight"} <= set(fixed)
    model.load_state_dict(fixed, strict=True)
    assert torch.equal(model.head.fc.weight, reference.fc.weight)
    assert torch.equal(model.xfc.weight, reference.xfc.weight)


class Stack(nn.Module):
    """An embedding, `layers` (under `encoder` when nested), a final norm."""

    def __init__(self, nested: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
        if nested:
            self.encoder = nn.Module()
            self.encoder.layers = layers
        else:
            self.layers = layers
        self.norm = nn.LayerNorm(4)


class Nest(nn.Module):
    """`name.name`: a module holding a same-named submodule (encoder.encoder), and a head whose keys already load."""

    def __init__(self, name: str) -> None:
        super().__init__()
        inner = nn.Module()
        setattr(inner, name, nn.Linear(4, 4))
        inner.norm, inner.proj = nn.LayerNorm(4), nn.Linear(4, 2)
        setattr(self, name, inner)
        self.head = nn.Linear(4, 2)


@pytest.mark.parametrize(("saved", "factory", "renames"), [
    (lambda: Stack(nested=False), lambda: Stack(nested=True), "{'layers': 'encoder.layers'}"),
    (lambda: Nest("enc"), lambda: Nest("encoder"), "{'enc': 'encoder'}"),  # enc.enc: both parts, on dot boundaries
])
def test_rename_of_some_keys_beside_keys_that_already_load(
        tmp_path: Path, saved: Any, factory: Any, renames: str) -> None:
    reference = randomized(saved())
    path = tmp_path / "partly_renamed.pt"
    torch.save(reference.state_dict(), path)
    report = ckptview.doctor(path, factory)
    assert [fix.kind for fix in report.fixes] == ["rename"] and f"renames = {renames}" in report.code
    model = factory()
    model.load_state_dict(apply_fix(report.code, torch.load(path, weights_only=True)), strict=True)
    assert_same_weights(model, reference)


def test_rename_to_more_parts_is_not_proposed_when_shapes_disagree(tmp_path: Path) -> None:
    path = tmp_path / "ten_classes.pt"
    torch.save(make_cnn().state_dict(), path)
    report = ckptview.doctor(path, lambda: make_cnn_with_head_fc(num_classes=5))
    assert [fix.kind for fix in report.fixes] == ["drop_unexpected", "missing"]
    assert report.leaves_missing == ("head.fc.weight", "head.fc.bias", "xfc.weight", "xfc.bias", "fc_out.weight",
                                     "fc_out.bias")


def test_rename_is_not_proposed_when_one_renamed_key_would_change_shape(tmp_path: Path) -> None:
    state = dict(Stack(nested=False).state_dict())
    state["layers.2.weight"], state["layers.2.bias"] = torch.zeros(5, 4), torch.zeros(5)  # a wider last layer
    path = tmp_path / "wider_last_layer.pt"
    torch.save(state, path)
    report = ckptview.doctor(path, lambda: Stack(nested=True))
    assert [fix.kind for fix in report.fixes] == ["drop_unexpected", "missing"]  # layers.0 and .1 alone fit
