"""Inference on real models and real files: outputs, load reports, restored state, failures, precisions."""

from __future__ import annotations

import ast
import copy
import math
from pathlib import Path

import pytest
import torch
from inference_models import BNCNN, MLP, BrokenMLP, TiedLM, TinyTransformer, make_cnn, make_mlp, saved_on, trained
from torch import nn

import ckptview
from ckptview.errors import CkptviewError, ModelBuildError, UntrustedCodeError
from ckptview.inference import (
    ForwardError,
    Precision,
    available_devices,
    compare_checkpoints,
    compare_precisions,
    load_model,
    make_input,
    run_inference,
    run_model,
    suggest_input,
)
from ckptview.inference.devices import resolve_device

CPU = "cpu"


def direct(model: nn.Module, *args: torch.Tensor):
    """What the user gets calling the model themselves the way ckptview runs it."""
    model.eval()
    with torch.inference_mode():
        return model(*args)


def seeded(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def cnn() -> BNCNN:
    torch.manual_seed(0)
    return trained(BNCNN()).eval()


@pytest.fixture
def cnn_path(tmp_path: Path, cnn: BNCNN) -> Path:
    path = tmp_path / "cnn.pt"
    torch.save({"epoch": 3, "state_dict": cnn.state_dict(), "optimizer": {"state": {}, "param_groups": []}}, path)
    return path


@pytest.fixture
def transformer() -> TinyTransformer:
    torch.manual_seed(1)
    return trained(TinyTransformer()).eval()


@pytest.fixture
def mlp() -> MLP:
    torch.manual_seed(2)
    return trained(MLP()).eval()


# --- output equals calling the model directly ----------------------------------------------------

def test_cnn_from_factory_string_matches_direct_call(cnn_path: Path, cnn: BNCNN) -> None:
    result = run_inference(cnn_path, "inference_models:make_cnn", device=CPU, repeats=2)
    assert result.input.kind == "image" and result.input.shape == (1, 3, 224, 224)
    assert result.input.layer == "conv1 (Conv2d, in_channels=3)"
    assert torch.equal(result.output, direct(cnn, seeded((1, 3, 224, 224))))
    assert result.model_source == "factory" and result.device == "cpu"
    assert result.weights is not None and result.weights.complete and not result.weights.fixes
    assert len(result.weights.loaded) == len(cnn.state_dict())
    assert [o.name for o in result.outputs] == ["output"] and result.outputs[0].shape == (1, 10)
    probabilities = result.output[0].softmax(-1)
    top = result.top_k[0]
    assert top.classes == tuple(probabilities.topk(5).indices.tolist())
    assert top.probabilities == pytest.approx(probabilities.topk(5).values.tolist())
    assert len(result.timing.times_s) == 2 and result.timing.min_ms > 0


def test_factory_model_is_materialised_from_meta_with_checkpoint_values(cnn_path: Path, cnn: BNCNN) -> None:
    with ckptview.open(cnn_path) as ckpt:
        loaded = load_model(ckpt, make_cnn, device=CPU)
    tensors = dict(loaded.model.state_dict())
    assert not any(t.is_meta for t in tensors.values())
    for name, value in cnn.state_dict().items():
        assert torch.equal(tensors[name], value), name
    assert loaded.notes == ()


class RecordsWhereItWasBuilt(nn.Module):
    built_on: list[str] = []

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)
        RecordsWhereItWasBuilt.built_on.append(self.fc.weight.device.type)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def test_factory_is_called_once_on_meta_so_no_initialised_copy_exists(tmp_path: Path) -> None:
    torch.manual_seed(6)
    reference = RecordsWhereItWasBuilt()
    path = tmp_path / "fc.pt"
    torch.save(reference.state_dict(), path)
    RecordsWhereItWasBuilt.built_on.clear()
    with ckptview.open(path) as ckpt:
        loaded = load_model(ckpt, RecordsWhereItWasBuilt, device=CPU)
    assert RecordsWhereItWasBuilt.built_on == ["meta"]
    assert torch.equal(loaded.model.fc.weight, reference.fc.weight)


def test_transformer_with_embedding_and_dict_output(tmp_path: Path, transformer: TinyTransformer) -> None:
    path = tmp_path / "lm.pt"
    torch.save(transformer.state_dict(), path)
    result = run_inference(path, "inference_models:make_transformer", device=CPU, repeats=1)
    # ids come from the token Embedding; the position Embedding (12 rows) caps the length
    assert result.input.kind == "tokens" and result.input.shape == (1, 12) and result.input.high == 50
    ids, _ = make_input(transformer)
    assert int(ids.max()) < 50
    expected = direct(transformer, ids)
    assert torch.equal(result.output["logits"], expected["logits"])
    assert torch.equal(result.output["hidden"], expected["hidden"])
    assert [o.name for o in result.outputs] == ["output['logits']", "output['hidden']"]
    assert result.top_k[0].position == "batch 0, last position"
    assert result.top_k[0].classes[0] == int(expected["logits"][0, -1].argmax())
    # position_ids is computed in __init__ and not saved, so the model is built for real, not on meta
    assert any("non-persistent" in note for note in result.notes)


def test_given_input_tensor_and_number_list(tmp_path: Path, mlp: MLP) -> None:
    path = tmp_path / "mlp.pt"
    torch.save(mlp.state_dict(), path)
    x = seeded((3, 8), seed=5)
    result = run_inference(path, MLP, input=x, device=CPU)
    logits, probabilities = direct(mlp, x)
    assert torch.equal(result.output[0], logits) and torch.equal(result.output[1], probabilities)
    assert [o.name for o in result.outputs] == ["output[0]", "output[1]"]
    assert result.input.kind == "given" and result.input.seed is None
    listed = run_inference(path, MLP, input=[[0.5] * 8], device=CPU)
    assert torch.equal(listed.output[0], direct(mlp, torch.full((1, 8), 0.5))[0])


def test_factory_kwargs_change_the_inferred_input(tmp_path: Path) -> None:
    torch.manual_seed(3)
    model = make_mlp(in_features=6).eval()
    path = tmp_path / "mlp6.pt"
    torch.save(model.state_dict(), path)
    result = run_inference(path, "inference_models:make_mlp", model_kwargs={"in_features": 6}, device=CPU)
    assert result.input.shape == (1, 6)
    assert torch.equal(result.output[0], direct(model, seeded((1, 6)))[0])


def test_user_module_is_left_untouched(cnn_path: Path, cnn: BNCNN) -> None:
    torch.manual_seed(9)
    mine = BNCNN().train()
    before = copy.deepcopy(mine.state_dict())
    result = run_inference(cnn_path, mine, input_shape=(2, 3, 16, 16), device=CPU)
    assert torch.equal(result.output, direct(cnn, seeded((2, 3, 16, 16))))
    assert result.model_source == "instance"
    assert mine.training and all(torch.equal(before[k], v) for k, v in mine.state_dict().items())


def test_tied_weights_are_read_once_and_stay_shared(tmp_path: Path) -> None:
    torch.manual_seed(4)
    model = TiedLM().eval()
    path = tmp_path / "tied.pt"
    torch.save(model.state_dict(), path)
    with ckptview.open(path) as ckpt:
        loaded = load_model(ckpt, TiedLM, device=CPU)
    assert loaded.model.head.weight.data_ptr() == loaded.model.tokens.weight.data_ptr()
    ids, _ = make_input(model, (2, 5))
    assert torch.equal(run_model(loaded.model, ids).output, direct(model, ids))


def test_given_transformer_keeps_its_non_persistent_buffers(tmp_path: Path, transformer: TinyTransformer) -> None:
    path = tmp_path / "lm.pt"
    torch.save(transformer.state_dict(), path)
    torch.manual_seed(5)
    result = run_inference(path, TinyTransformer(), device=CPU, repeats=1)
    assert result.weights.complete and result.notes == ()
    ids, _ = make_input(transformer)
    assert torch.equal(result.output["logits"], direct(transformer, ids)["logits"])
    with pytest.raises(ModelBuildError, match="factory"):
        run_inference(path, TinyTransformer(), model_kwargs={"vocab": 50}, device=CPU)


# --- load report through the doctor --------------------------------------------------------------

def test_ddp_prefix_is_fixed_and_reported(tmp_path: Path, cnn: BNCNN) -> None:
    path = tmp_path / "ddp.pt"
    torch.save({"model": {f"module.{k}": v for k, v in cnn.state_dict().items()}}, path)
    result = run_inference(path, BNCNN, input_shape=(1, 3, 16, 16), device=CPU)
    assert result.weights.complete
    assert len(result.weights.fixes) == 1 and "module." in result.weights.fixes[0]
    assert result.weights.details.before.unexpected  # the doctor's view before the fix is kept
    assert torch.equal(result.output, direct(cnn, seeded((1, 3, 16, 16))))


def test_missing_tensors_are_reported_and_initialised(tmp_path: Path, cnn: BNCNN) -> None:
    state = cnn.state_dict()
    del state["fc.bias"]
    path = tmp_path / "nobias.pt"
    torch.save(state, path)
    result = run_inference(path, BNCNN, input_shape=(1, 3, 16, 16), device=CPU)
    assert result.weights.missing == ("fc.bias",)
    assert result.weights.initialised == ("fc.bias",) and not result.weights.complete
    assert result.notes and "reset_parameters" in result.notes[0]
    data = result.to_dict()["weights"]
    assert data["missing"] == ["fc.bias"] and data["complete"] is False and data["doctor"]["ok"] is False


def test_state_dict_without_model_says_what_to_give(cnn_path: Path) -> None:
    with pytest.raises(ModelBuildError, match="--model"):
        run_inference(cnn_path, device=CPU)


# --- whole modules and TorchScript ---------------------------------------------------------------

def test_whole_pickled_module_needs_trust_then_matches(tmp_path: Path, cnn: BNCNN) -> None:
    path = tmp_path / "whole.pt"
    torch.save(cnn, path)
    with pytest.raises(UntrustedCodeError, match="trust"):
        run_inference(path, device=CPU)
    result = run_inference(path, trust=True, input_shape=(1, 3, 16, 16), device=CPU)
    assert result.model_source == "module" and result.weights is None
    assert torch.equal(result.output, direct(cnn, seeded((1, 3, 16, 16))))


def test_pickled_module_inside_a_training_checkpoint(tmp_path: Path, cnn: BNCNN) -> None:
    path = tmp_path / "train.pt"
    torch.save({"epoch": 4, "model": cnn, "optimizer": torch.optim.SGD(cnn.parameters(), lr=0.1).state_dict()}, path)
    result = run_inference(path, trust=True, input_shape=(1, 3, 16, 16), device=CPU)
    assert result.model_source == "module"
    assert torch.equal(result.output, direct(cnn, seeded((1, 3, 16, 16))))


@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_needs_trust_then_matches(tmp_path: Path, cnn: BNCNN, how: str) -> None:
    x = seeded((1, 3, 16, 16))
    scripted = torch.jit.script(cnn) if how == "script" else torch.jit.trace(cnn, x)
    path = tmp_path / f"{how}.pt"
    torch.jit.save(scripted, path)
    with ckptview.open(path) as ckpt, pytest.raises(UntrustedCodeError):
        run_inference(ckpt, device=CPU)
    with ckptview.open(path, trust=True) as ckpt:
        result = run_inference(ckpt, input_shape=(1, 3, 16, 16), device=CPU)
    assert result.model_source == "torchscript"
    assert result.input.layer == "conv1 (Conv2d, in_channels=3)"
    assert torch.allclose(result.output, direct(cnn, x), atol=1e-6)


# --- saved on a GPU, run on the CPU --------------------------------------------------------------

def test_state_dict_saved_on_cuda_runs_on_cpu(tmp_path: Path, cnn: BNCNN) -> None:
    path = tmp_path / "gpu.pt"
    with saved_on("cuda:7"):
        torch.save(cnn.state_dict(), path)
    with ckptview.open(path) as ckpt:
        assert {entry.device for entry in ckpt.tensors()} == {"cuda:7"}
    if not torch.cuda.is_available():  # the file really is a GPU save: plain torch.load refuses it here
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(path, weights_only=True)
    result = run_inference(path, BNCNN, input_shape=(1, 3, 16, 16), device=CPU)
    assert torch.equal(result.output, direct(cnn, seeded((1, 3, 16, 16))))


def test_whole_module_saved_on_cuda_runs_on_cpu(tmp_path: Path, cnn: BNCNN) -> None:
    path = tmp_path / "gpu_whole.pt"
    with saved_on("cuda:7"):
        torch.save(cnn, path)
    result = run_inference(path, trust=True, input_shape=(1, 3, 16, 16), device=CPU)
    assert torch.equal(result.output, direct(cnn, seeded((1, 3, 16, 16))))


# --- hygiene: modes, hooks, failures --------------------------------------------------------------

def _modes(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_a_ready_module_runs_as_it_is(mlp: MLP) -> None:
    result = run_inference(mlp, device=CPU, input_shape=(2, 8))
    assert result.model_source == "given" and result.weights is None
    assert torch.equal(result.output[0], direct(copy.deepcopy(mlp), seeded((2, 8)))[0])
    with pytest.raises(ModelBuildError, match="already a model"):
        run_inference(mlp, MLP, device=CPU)


def test_run_model_restores_every_training_flag(mlp: MLP) -> None:
    mlp.train()
    mlp.net[2].eval()  # a mixed state (a frozen dropout) must come back exactly
    before = _modes(mlp)
    result = run_model(mlp, input_shape=(2, 8))
    assert _modes(mlp) == before and _hook_count(mlp) == 0
    # it ran in eval mode: dropout off, so two runs agree with a direct eval call
    assert torch.equal(result.output[0], direct(copy.deepcopy(mlp), seeded((2, 8)))[0])


def test_failing_forward_names_layer_and_shape_and_restores() -> None:
    model = BrokenMLP().train()
    before = _modes(model)
    with pytest.raises(ForwardError) as info:
        run_model(model, input_shape=(3, 8))
    message = str(info.value)
    assert "net.2 (Linear)" in message and "[3, 8]" in message and "mat1 and mat2" in message
    assert info.value.layer == "net.2 (Linear)" and info.value.input_shapes == ((3, 8),)
    assert isinstance(info.value.__cause__, RuntimeError)
    assert _modes(model) == before and _hook_count(model) == 0


def test_failing_forward_through_run_inference(tmp_path: Path) -> None:
    path = tmp_path / "broken.pt"
    torch.save(BrokenMLP().state_dict(), path)
    with pytest.raises(ForwardError, match=r"net\.2 \(Linear\)"):
        run_inference(path, BrokenMLP, device=CPU)


class FailsAfterFirstCall(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 2)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls > 1:
            raise RuntimeError("state went bad")
        return self.linear(x)


def test_failure_after_the_first_call_is_a_forward_error_too() -> None:
    model = FailsAfterFirstCall().train()
    with pytest.raises(ForwardError, match="warm-up call 1 failed.*state went bad"):
        run_model(model, input_shape=(1, 4))
    assert model.training and _hook_count(model) == 0


def test_nan_outputs_are_counted(tmp_path: Path, mlp: MLP) -> None:
    state = mlp.state_dict()
    state["net.5.bias"][0] = float("nan")
    path = tmp_path / "nan.pt"
    torch.save(state, path)
    result = run_inference(path, MLP, device=CPU)
    assert not result.finite
    assert result.outputs[0].nan_count == 1 and result.outputs[1].nan_count == 4  # softmax spreads it over the row
    assert result.outputs[0].min is not None and not math.isnan(result.outputs[0].min)


# --- inputs and devices ---------------------------------------------------------------------------

def test_suggested_inputs_per_first_layer(cnn: BNCNN, transformer: TinyTransformer, mlp: MLP) -> None:
    assert suggest_input(cnn).shape == (1, 3, 224, 224)
    assert suggest_input(nn.Sequential(nn.Conv1d(2, 4, 3))).shape == (1, 2, 224)
    assert suggest_input(transformer).dtype == torch.int64
    assert suggest_input(mlp).shape == (1, 8)
    first, again = make_input(cnn, (1, 3, 8, 8), seed=4)[0], make_input(cnn, (1, 3, 8, 8), seed=4)[0]
    assert torch.equal(first, again)
    with pytest.raises(ModelBuildError, match="input"):
        suggest_input(nn.Sequential(nn.ReLU()))


def test_devices_list_cpu_last_and_refuse_unknown() -> None:
    devices = available_devices()
    assert devices[-1].name == "cpu"
    assert resolve_device(None).type == devices[0].kind
    with pytest.raises(CkptviewError, match="not available"):
        resolve_device(f"cuda:{torch.cuda.device_count() + 3}")


# --- precisions and two checkpoints --------------------------------------------------------------

def test_precision_comparison_table(tmp_path: Path, mlp: MLP) -> None:
    path = tmp_path / "mlp.pt"
    torch.save(mlp.state_dict(), path)
    comparison = compare_precisions(path, MLP, device=CPU, input_shape=(16, 8), repeats=2)
    assert [row.precision.value for row in comparison.rows] == ["fp32", "fp16", "bf16", "int8"]
    fp32 = comparison.row("fp32")
    assert fp32.ok and fp32.deviation is None
    assert torch.equal(fp32.result.output[0], direct(mlp, seeded((16, 8)))[0])
    for name in ("fp16", "bf16", "int8"):
        row = comparison.row(name)
        assert row.ok, row.status
        assert 0 < row.deviation.max_abs < 0.5 and row.deviation.cosine > 0.99
        assert row.deviation.top1_agreement is not None
    assert comparison.row("fp16").size_bytes == fp32.size_bytes // 2
    assert comparison.row("int8").size_bytes < comparison.row("fp16").size_bytes
    assert comparison.row("int8").device == "cpu"
    frame = comparison.to_frame()
    assert list(frame.index) == ["fp32", "fp16", "bf16", "int8"]
    assert {"latency_ms", "size_bytes", "max_abs_diff", "cosine", "top1_agreement"} <= set(frame.columns)


def test_int8_transformer_runs_with_the_fused_fast_path_off_and_back_on(tmp_path: Path,
                                                                          transformer: TinyTransformer) -> None:
    path = tmp_path / "lm.pt"
    torch.save(transformer.state_dict(), path)
    comparison = compare_precisions(path, TinyTransformer, precisions=["int8"], device=CPU, repeats=1)
    row = comparison.row("int8")
    assert row.ok, row.status
    assert row.deviation.cosine > 0.99 and row.deviation.top1_agreement is not None
    assert torch.backends.mha.get_fastpath_enabled()


def test_precision_names_are_checked_and_int8_needs_python_linear(tmp_path: Path, cnn: BNCNN) -> None:
    with pytest.raises(ValueError, match="fp32, fp16, bf16, int8"):
        Precision("fp8")
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(cnn), path)
    with ckptview.open(path, trust=True) as ckpt:
        comparison = compare_precisions(ckpt, precisions=["int8"], device=CPU, input_shape=(1, 3, 16, 16), repeats=1)
    assert [row.precision.value for row in comparison.rows] == ["int8"]
    assert comparison.rows[0].status.startswith("unsupported") and "TorchScript" in comparison.rows[0].status


def test_compare_two_checkpoints_on_one_input(tmp_path: Path, cnn: BNCNN) -> None:
    early, late = tmp_path / "early.pt", tmp_path / "late.pt"
    torch.save(cnn.state_dict(), early)
    torch.save(trained(copy.deepcopy(cnn), steps=5, seed=7).state_dict(), late)
    same = compare_checkpoints(early, early, BNCNN, input_shape=(4, 3, 16, 16), device=CPU)
    assert same.deviation.max_abs == 0 and same.deviation.cosine == pytest.approx(1.0)
    assert same.deviation.top1_agreement == 1.0
    different = compare_checkpoints(early, late, BNCNN, input_shape=(4, 3, 16, 16), device=CPU)
    assert different.deviation.max_abs > 0
    assert torch.equal(different.left.output, direct(cnn, seeded((4, 3, 16, 16))))
    assert list(different.to_frame().index) == ["output"]


# --- CUDA -----------------------------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_run_on_cuda_restores_cpu_and_measures_memory(mlp: MLP) -> None:
    mlp.train()
    result = run_model(mlp, input_shape=(4, 8), device="cuda")
    assert result.device == "cuda:0" and result.peak_memory_bytes and result.peak_memory_bytes > 0
    assert next(mlp.parameters()).device.type == "cpu" and mlp.training
    assert torch.allclose(result.output[0].cpu(), direct(mlp, seeded((4, 8)))[0], atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_failing_forward_on_cuda_restores_device() -> None:
    model = BrokenMLP()
    with pytest.raises(ForwardError, match=r"net\.2"):
        run_model(model, input_shape=(2, 8), device="cuda")
    assert next(model.parameters()).device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_factory_loads_straight_onto_cuda_and_fp16_runs(cnn_path: Path, cnn: BNCNN) -> None:
    with ckptview.open(cnn_path) as ckpt:
        loaded = load_model(ckpt, make_cnn, device="cuda")
    assert {t.device.type for t in loaded.model.state_dict().values()} == {"cuda"}
    comparison = compare_precisions(cnn_path, BNCNN, device="cuda", precisions=["fp32", "fp16"], repeats=3)
    assert comparison.row("fp16").ok and comparison.row("fp16").deviation.cosine > 0.99


# --- layering ---------------------------------------------------------------------------------------

def test_inference_package_imports_no_presentation_libraries() -> None:
    package = Path(ckptview.__file__).parent / "inference"
    for source in package.glob("*.py"):
        tree = ast.parse(source.read_text())
        top_level = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
        names = {alias.name.split(".")[0] for node in top_level if isinstance(node, ast.Import) for alias in node.names}
        names |= {(node.module or "").split(".")[0] for node in top_level if isinstance(node, ast.ImportFrom)}
        assert not names & {"pandas", "plotly", "ipywidgets", "IPython"}, source.name
