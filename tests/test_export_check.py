"""
`export_check`: real exports (torch.onnx.export, torch.jit.trace/script) run in ONNX Runtime and
TorchScript, compared with eager PyTorch on inputs that take other paths.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch
from conftest import SmallCNN, train_a_few_steps
from inference_models import TinyTransformer
from torch import nn

import ckptview
from ckptview.errors import CkptviewError
from ckptview.inference.export import export_check

TESTS = Path(__file__).parent


class Branchy(nn.Module):
    """The deployment guides' tracing pitfall: the branch depends on the input's values."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 4)
        self.fc2 = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.fc1(x)
        return self.fc2(x)


class Unscriptable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        double = lambda t: t * 2  # TorchScript refuses lambdas, which is the point
        return double(self.fc(x))


def _line_of(function: object, text: str) -> int:
    lines, start = inspect.getsourcelines(function)
    return start + next(i for i, line in enumerate(lines) if text in line)


@pytest.fixture(scope="module")
def trained_cnn() -> SmallCNN:
    torch.manual_seed(0)
    model = SmallCNN()
    train_a_few_steps(model)
    return model.eval()


def test_trace_freezes_the_branch_and_the_probe_that_shows_it_is_named() -> None:
    torch.manual_seed(0)
    model = Branchy()
    positive = torch.rand(2, 4) + 0.1
    check = export_check(model, input=positive, targets=("trace", "script"), device="cpu")

    trace = check.target("trace")
    assert trace.status == "diverges" and not check.ok
    # the example and inputs that keep its sign match: the trace is right for the path it saw
    assert {p.input: p.ok for p in trace.probes} == {"example": True, "batch 3": True, "sign flipped": False,
                                                     "scaled ×10": True}
    flipped = trace.diverging[0]
    expected = (model.fc2(-positive) - model.fc1(-positive)).abs().max().item()
    assert flipped.max_abs_diff == pytest.approx(expected, rel=1e-5)
    assert "sign flipped" in trace.message and "frozen" in trace.message
    line = _line_of(Branchy.forward, "if x.sum() > 0")
    tracer = [w for w in trace.warnings if w.category == "TracerWarning"]
    assert tracer and tracer[0].location == f"{__file__}:{line}" and tracer[0].code == "if x.sum() > 0:"
    assert f"{__file__}:{line}" in trace.message

    script = check.target("script")
    assert script.status == "ok" and script.max_abs_diff == 0.0 and len(script.probes) == 4


def test_unscriptable_model_reports_the_compilers_message_and_line() -> None:
    check = export_check(Unscriptable(), input_shape=(2, 4), targets=("script", "trace"), device="cpu")
    script = check.target("script")
    line = _line_of(Unscriptable.forward, "lambda")
    assert script.status == "failed" and script.location == f"{__file__}:{line}"
    assert script.message.startswith("torch.jit.script cannot compile the model: Lambda aren't supported")
    assert "`double = lambda t: t * 2" in script.message and "\n" not in script.message
    assert check.target("trace").ok  # the trace needs no compiler


def test_cnn_with_batchnorm_matches_in_onnx_runtime_at_another_batch_size(trained_cnn: SmallCNN) -> None:
    check = export_check(trained_cnn, input_shape=(1, 3, 16, 16), targets=("onnx",), device="cpu")
    onnx_result = check.target("onnx")
    assert onnx_result.status == "ok", onnx_result.message
    assert onnx_result.tool.startswith("torch.onnx.export (dynamo) → ONNX Runtime")
    assert "CPUExecutionProvider" in onnx_result.tool
    assert [p.input for p in onnx_result.probes] == ["example", "batch 3", "sign flipped", "scaled ×10"]
    assert all(p.max_abs_diff <= 1e-5 and p.top1_agreement == 1.0 for p in onnx_result.probes)
    assert onnx_result.file_size > sum(t.numel() * 4 for t in trained_cnn.parameters())
    assert onnx_result.latency_ms > 0 and onnx_result.eager_latency_ms > 0 and onnx_result.file is None
    frame = check.to_frame()
    assert frame.loc[0, "target"] == "onnx" and frame.loc[0, "max_abs_diff"] == onnx_result.max_abs_diff


def test_small_transformer_matches_in_onnx_runtime_and_torchscript() -> None:
    torch.manual_seed(0)
    model = TinyTransformer().eval()
    check = export_check(model, input_shape=(2, 8), device="cpu")
    assert check.input.kind == "tokens"
    onnx_result = check.target("onnx")
    assert onnx_result.status == "ok", onnx_result.message
    # token ids: the sequence axis is dynamic too, so a shorter sequence runs in ONNX Runtime
    assert onnx_result.tool.startswith("torch.onnx.export (dynamo, dynamic batch and sequence)")
    assert [p.input for p in onnx_result.probes] == ["example", "batch 3", "sequence length 4"]
    assert onnx_result.max_abs_diff <= 1e-5
    for name in ("trace", "script"):
        result = check.target(name)
        assert result.ok, result.message
        assert "sequence length 4" in {p.input for p in result.probes}


def test_model_state_is_put_back(trained_cnn: SmallCNN) -> None:
    model = SmallCNN()
    model.load_state_dict(trained_cnn.state_dict())
    model.train()
    model.bn1.eval()  # a mix of flags, as a fine-tuning script leaves them
    model.conv1.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    export_check(model, input_shape=(1, 3, 16, 16), device="cpu")
    assert [m.training for m in model.modules()] == flags
    assert not model.conv1.weight.requires_grad and model.fc.weight.requires_grad
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_save_to_keeps_the_files_and_never_overwrites(trained_cnn: SmallCNN, tmp_path: Path) -> None:
    existing = tmp_path / "exists"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(CkptviewError, match="already exists"):
        export_check(trained_cnn, input_shape=(1, 3, 16, 16), save_to=existing, device="cpu")
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]

    folder = tmp_path / "exports"
    check = export_check(trained_cnn, input_shape=(1, 3, 16, 16), save_to=folder, device="cpu")
    assert check.folder == str(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["model.onnx", "model.scripted.pt", "model.traced.pt"]
    for result in check.results:
        assert result.file is not None and os.path.getsize(result.file) == result.file_size
    onnx.checker.check_model(str(folder / "model.onnx"))
    scripted = torch.jit.load(str(folder / "model.scripted.pt"))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(scripted(x), trained_cnn(x), atol=1e-6)


def test_checkpoint_and_factory(tmp_path: Path, trained_cnn: SmallCNN) -> None:
    path = tmp_path / "cnn.pt"
    torch.save(trained_cnn.state_dict(), path)
    check = ckptview.export_check(path, "conftest:SmallCNN", input_shape=(1, 3, 16, 16), targets=["trace"],
                                  device="cpu")
    assert check.ok and check.weights is not None and check.weights.complete
    with pytest.raises(CkptviewError, match="not an export target"):
        export_check(path, "conftest:SmallCNN", targets=["tflite"])


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "ckptview", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300, check=False)


def test_cli_exit_codes_and_json(tmp_path: Path) -> None:
    (tmp_path / "deploy_models.py").write_text(inspect.getsource(Branchy).join(
        ["import torch\nfrom torch import nn\n\n", "\n\ndef make():\n    torch.manual_seed(0)\n    return Branchy()\n"]))
    torch.manual_seed(0)
    path = tmp_path / "branchy.pt"
    torch.save(Branchy().state_dict(), path)
    # whichever sign the synthesised input's sum has, flipping it takes the branch the trace did not record
    diverges = _cli("export-check", str(path), "--model", "deploy_models:make", "--input-shape", "2,4",
                    "--json", "--device", "cpu", cwd=tmp_path)
    assert diverges.returncode == 4, diverges.stderr
    # JSON alone on stdout, nothing on stderr: the exporters' progress, logs and graph dumps are kept off
    assert diverges.stderr == ""
    data = json.loads(diverges.stdout)
    assert [t["status"] for t in data["targets"]] == ["diverges", "diverges", "ok"]
    # torch.export refuses the data-dependent branch; the TorchScript-based exporter traces it, frozen
    assert "the dynamo exporter failed: GuardOnDataDependentSymNode" in data["targets"][0]["tool"]
    for target in data["targets"][:2]:
        assert [p["input"] for p in target["probes"] if not p["ok"]] == ["sign flipped"]

    matches = _cli("export-check", str(path), "--model", "deploy_models:make", "--input-shape", "2,4",
                   "--targets", "script", "--device", "cpu", cwd=tmp_path)
    assert matches.returncode == 0, matches.stderr
    assert "script" in matches.stdout and "ok" in matches.stdout

    usage = _cli("export-check", str(path), "--model", "deploy_models:make", "--targets", "onnx,tflite", cwd=tmp_path)
    assert usage.returncode == 2 and "tflite" in usage.stderr


# --- running ONNX files --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cnn_onnx(trained_cnn: SmallCNN, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import contextlib
    import io
    import warnings

    path = tmp_path_factory.mktemp("onnx") / "cnn.onnx"
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(trained_cnn, (torch.randn(2, 3, 16, 16),), str(path), dynamo=True, external_data=False,
                          dynamic_shapes=({0: torch.export.Dim("batch")},))
    return path


def test_run_inference_on_an_onnx_file_equals_the_pytorch_model(cnn_onnx: Path, trained_cnn: SmallCNN) -> None:
    x = torch.randn(4, 3, 16, 16)
    result = ckptview.run_inference(cnn_onnx, input=x, repeats=2)
    assert result.model_source == "onnxruntime" and result.device == "cpu"
    assert result.notes[0].startswith("ran in ONNX Runtime") and "CPUExecutionProvider" in result.notes[0]
    (output,) = result.output.values()
    with torch.no_grad():
        expected = trained_cnn(x)
    assert torch.allclose(output, expected, atol=1e-5)
    assert result.outputs[0].shape == (4, 10) and result.outputs[0].mean == pytest.approx(float(expected.mean()), abs=1e-5)
    assert result.top_k[0].classes[0] == int(expected[0].argmax())


def test_run_inference_synthesises_inputs_from_the_graph(cnn_onnx: Path, trained_cnn: SmallCNN) -> None:
    result = ckptview.run_inference(str(cnn_onnx), seed=3, repeats=1)
    assert result.input.shape == (1, 3, 16, 16)  # the dynamic batch dimension becomes 1
    assert result.input.layer == "graph input x" and result.input.dtype == torch.float32
    x = torch.randn((1, 3, 16, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(next(iter(result.output.values())), trained_cnn(x), atol=1e-5)
    wider = ckptview.run_inference(cnn_onnx, input_shape=(5, 3, 16, 16), repeats=1)
    assert wider.outputs[0].shape == (5, 10)


def test_cli_runs_an_onnx_file(cnn_onnx: Path, tmp_path: Path) -> None:
    done = _cli("run", str(cnn_onnx), "--json", "--repeats", "1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["model_source"] == "onnxruntime" and data["outputs"][0]["shape"] == [1, 10]
    wrong = _cli("run", str(cnn_onnx), "--input-shape", "1,4,16,16", cwd=tmp_path)
    assert wrong.returncode == 1 and "ONNX Runtime failed" in wrong.stderr and "\n" not in wrong.stderr.strip()


# --- running TFLite files ------------------------------------------------------------------------

TFLITE = TESTS / "fixtures" / "tf"


def test_run_inference_on_tflite_files_names_the_runtime_and_dequantizes() -> None:
    pytest.importorskip("ai_edge_litert")
    results = {name: ckptview.run_inference(TFLITE / f"{name}.tflite", seed=2, repeats=1) for name in ("float", "int8")}
    for result in results.values():
        assert result.model_source == "litert" and result.notes[0].startswith("ran in the LiteRT interpreter")
        assert result.input.shape == (1, 8, 8, 3) and result.outputs[0].shape == (1, 3) and result.finite
    int8 = results["int8"]
    assert any(note.startswith("input serving_default_image:0 quantized to int8") for note in int8.notes)
    assert any("dequantized from int8" in note for note in int8.notes)
    # the int8 model is the float one quantized: the same answer to a few output quantization steps
    float_out = next(iter(results["float"].output.values()))
    int8_out = next(iter(int8.output.values()))
    reported = json.loads((TFLITE / "int8.tflite.json").read_text())
    step = next(t["scales"][0] for t in reported["tensors"] if t["name"] == reported["outputs"][0]["name"])
    assert int8_out.dtype == torch.float32 and float_out.shape == int8_out.shape
    assert float((float_out - int8_out).abs().max()) <= 4 * step
    assert int8.top_k[0].classes[0] == results["float"].top_k[0].classes[0]


def test_precisions_of_an_onnx_file_say_what_to_do(cnn_onnx: Path, tmp_path: Path) -> None:
    with pytest.raises(CkptviewError, match="its own model, run by its runtime .* need a PyTorch model"):
        ckptview.compare_precisions(cnn_onnx, precisions=["fp32", "fp16"])
    with pytest.raises(CkptviewError, match="export checks .* need a PyTorch model"):
        export_check(cnn_onnx, targets=["trace"])
    done = _cli("run", str(cnn_onnx), "--precisions", "fp16", cwd=tmp_path)
    assert done.returncode == 1 and "need a PyTorch model" in done.stderr


def test_token_model_onnx_run_draws_ids_every_embedding_table_accepts(tmp_path: Path) -> None:
    import contextlib
    import io
    import warnings

    torch.manual_seed(0)
    model = TinyTransformer(vocab=50).eval()
    path = tmp_path / "lm.onnx"
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randint(0, 50, (2, 8)),), str(path), dynamo=True, external_data=False,
                          dynamic_shapes=({0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence")},))
    result = ckptview.run_inference(path, input_shape=(2, 6), seed=5, repeats=1)
    # the graph gathers from the token table (50 rows) and the position table (12): ids below 12 fit both
    assert result.input.kind == "tokens" and result.input.dtype == torch.int64 and result.input.high == 12
    ids = torch.randint(0, 12, (2, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = model(ids)
    outputs = dict(zip(("logits", "hidden"), result.output.values()))
    assert torch.allclose(outputs["logits"], expected["logits"], atol=1e-5)
    assert result.top_k[0].position == "batch 0, last position"
