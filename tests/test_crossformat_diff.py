"""
"Did my export keep my weights?": `ckptview.diff(a, b, values=True)` across formats, on files the
real libraries write (torch.save, torch.onnx.export with constant folding, safetensors, numpy).
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SmallCNN, train_a_few_steps
from safetensors.torch import save_file

import ckptview
from ckptview.analyzers.crossformat import HOW
from ckptview.cli import main as cli_main


@pytest.fixture(scope="module")
def trained() -> SmallCNN:
    torch.manual_seed(0)
    model = SmallCNN()
    train_a_few_steps(model)
    return model.eval()


@pytest.fixture(scope="module")
def files(trained: SmallCNN, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("formats")
    state = trained.state_dict()
    paths = {"pt": folder / "cnn.pt", "onnx": folder / "cnn.onnx", "safetensors": folder / "cnn.safetensors",
             "npz": folder / "cnn.npz"}
    torch.save(state, paths["pt"])
    save_file({k: v.contiguous() for k, v in state.items()}, str(paths["safetensors"]))
    np.savez(paths["npz"], **{k: v.numpy() for k, v in state.items()})
    # the default export optimises the graph: constant folding folds each BatchNorm into its Conv
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(trained, (torch.randn(2, 3, 16, 16),), str(paths["onnx"]), dynamo=True,
                          external_data=False, optimize=True)
    return paths


def test_onnx_export_with_folded_batchnorm_is_fully_explained(files: dict[str, Path], trained: SmallCNN) -> None:
    result = ckptview.diff(files["pt"], files["onnx"], values=True)
    matching = result.matching
    assert matching is not None and (matching.left_format, matching.right_format) == ("torch-zip", "onnx")
    assert matching.unexplained_left == () and matching.unexplained_right == ()
    state = trained.state_dict()
    explained = {key for m in matching.matches for key in m.left_keys}
    assert explained == set(state)

    with ckptview.open(files["onnx"]) as exported:
        onnx_names = [e.name for e in exported.tensors()]
        graph_weights = set(exported.layers)
    assert {m.right for m in matching.matches if m.right} == set(onnx_names)

    kernel, bias = matching.became("conv1.weight")[0], matching.became("bn1.bias")[0]
    assert kernel.how == bias.how == "folded" and kernel.right == "conv1.weight"
    assert set(kernel.left_keys) == {"conv1.weight", "bn1.weight", "bn1.running_var"}
    assert {"bn1.running_mean", "bn1.bias"} <= set(bias.left_keys) and bias.right != kernel.right
    # the exported kernel really is w·γ/√(var+ε), and the value diff alone calls conv1.weight changed
    scale = state["bn1.weight"] / torch.sqrt(state["bn1.running_var"] + 1e-5)
    with ckptview.open(files["onnx"]) as exported:
        folded = exported.tensor("conv1.weight").load()
    assert torch.allclose(folded, state["conv1.weight"] * scale[:, None, None, None], atol=1e-6)
    assert "conv1.weight" in {t.key for t in result.values.changed()}

    hows = {m.left_keys[0] if m.left_keys else m.right: m.how for m in matching.matches}
    assert hows["bn1.num_batches_tracked"] == hows["layer1.1.num_batches_tracked"] == "dropped"
    assert hows["fc.weight"] == "name" and matching.became("fc.weight")[0].max_abs_diff == 0.0
    constants = [m.right for m in matching.matches if m.how == "graph_constant"]
    assert constants and not set(constants) & graph_weights
    assert set(matching.counts()) <= set(HOW)


def test_a_checkpoint_that_was_not_exported_stays_unexplained(files: dict[str, Path], trained: SmallCNN,
                                                              tmp_path: Path) -> None:
    state = {k: v.clone() for k, v in trained.state_dict().items()}
    state["bn1.running_var"][0] *= 1.5  # not the statistics the export folded
    other = tmp_path / "other.pt"
    torch.save(state, other)
    matching = ckptview.diff(other, files["onnx"], values=True).matching
    assert set(matching.unexplained_left) == {"bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var"}
    assert matching.unexplained_right == ("conv1.weight_bias",)
    # the kernel keeps its name, so it is paired by it, with the difference the fold check could not explain
    kernel = matching.became("conv1.weight")[0]
    assert (kernel.right, kernel.how, kernel.detail) == ("conv1.weight", "name", "values differ")
    assert kernel.max_abs_diff > 1e-3
    assert matching.became("layer1.0.weight")[0].how == "folded"  # the untouched block still pairs


@pytest.mark.parametrize("left,right", [("pt", "safetensors"), ("pt", "npz"), ("safetensors", "npz")])
def test_copies_in_other_formats_pair_by_name_exactly(files: dict[str, Path], left: str, right: str) -> None:
    matching = ckptview.diff(files[left], files[right], values=True).matching
    assert matching is not None and matching.complete
    assert {m.how for m in matching.matches} == {"name"}
    assert all(m.max_abs_diff == 0.0 and m.left == m.right for m in matching.matches)
    assert len(matching.matches) == len(SmallCNN().state_dict())


def test_renamed_transposed_and_cast_copies_are_found_by_content(trained: SmallCNN, tmp_path: Path) -> None:
    state = trained.state_dict()
    converted = {
        "head.kernel": state["fc.weight"].t().contiguous(),           # stored [in, out], as MatMul wants
        "stem.w16": state["conv1.weight"].half(),                      # cast to fp16 under another name
        "head.b": state["fc.bias"],                                    # renamed
        **{k: v for k, v in state.items() if k not in ("fc.weight", "conv1.weight", "fc.bias")},
    }
    path = tmp_path / "converted.safetensors"
    save_file(converted, str(path))
    pt = tmp_path / "cnn.pt"
    torch.save(state, pt)
    matching = ckptview.diff(pt, path, values=True).matching
    assert matching.complete
    fc, conv, bias = (matching.became(k)[0] for k in ("fc.weight", "conv1.weight", "fc.bias"))
    assert (fc.right, fc.how, fc.detail) == ("head.kernel", "transposed", "[10, 8] → [8, 10]")
    assert (conv.right, conv.how, conv.detail) == ("stem.w16", "cast", "float32 → float16")
    assert conv.max_abs_diff == pytest.approx(float((state["conv1.weight"].half().double()
                                                     - state["conv1.weight"].double()).abs().max()))
    assert (bias.right, bias.how, bias.max_abs_diff) == ("head.b", "content", 0.0)


def test_diff_json_across_formats_gains_the_matching(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["diff", str(files["pt"]), str(files["onnx"]), "--values", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["unexplained_left"] == [] and data["unexplained_right"] == []
    folded = [m for m in data["matches"] if m["how"] == "folded"]
    assert folded and all(isinstance(m["left"], list) and isinstance(m["right"], str) for m in folded)
    dropped = [m for m in data["matches"] if m["how"] == "dropped"]
    assert {m["left"] for m in dropped} == {"bn1.num_batches_tracked", "layer1.1.num_batches_tracked"}
    assert all(m["right"] is None for m in dropped)

    assert cli_main(["diff", str(files["pt"]), str(files["onnx"]), "--values"]) == 0
    text = capsys.readouterr().out
    assert "BatchNorm bn1 folded into conv1" in text and "every tensor is paired or explained" in text

    # one format on both sides: the plain diff, without the matching keys
    assert cli_main(["diff", str(files["pt"]), str(files["pt"]), "--values", "--json"]) == 0
    assert "matches" not in json.loads(capsys.readouterr().out)


def test_keras_model_and_its_tflite_conversion_are_fully_explained() -> None:
    # both written by TensorFlow from one trained Keras model (tests/fixtures/make_tf_fixtures.py)
    fixtures = Path(__file__).parent / "fixtures" / "tf"
    matching = ckptview.diff(fixtures / "keras3_trained.h5", fixtures / "float.tflite", values=True).matching
    assert (matching.left_format, matching.right_format) == ("keras-h5", "tflite")
    assert matching.complete
    kernel = matching.became("conv.kernel")[0]
    # TFLite keeps the kernel [out, h, w, in] where Keras has [h, w, in, out], with BatchNorm (eps 1e-3) folded in
    assert kernel.how == "folded" and set(kernel.left_keys) == {"conv.kernel", "bn.gamma", "bn.moving_variance"}
    assert "eps 0.001" in kernel.detail
    bias = next(m for m in matching.became("bn.moving_mean") if m.right != kernel.right)
    assert bias.how == "folded" and "conv.bias" in bias.left_keys
    dense = matching.became("dense_1.kernel")[0]
    assert (dense.how, dense.detail, dense.max_abs_diff) == ("transposed", "[144, 8] → [8, 144]", 0.0)
    assert {m.how for m in matching.matches if m.left is None} == {"graph_constant"}


def test_gguf_conversion_with_llama_names_and_fp16_is_found_by_content(tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf")
    torch.manual_seed(0)
    state = {"tok.weight": torch.randn(20, 8), "layers.0.q.weight": torch.randn(8, 8),
             "layers.0.o.weight": torch.randn(12, 8), "norm.weight": torch.randn(8)}
    pt = tmp_path / "lm.pt"
    torch.save(state, pt)
    path = tmp_path / "lm.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", state["tok.weight"].numpy().astype(np.float16))
    writer.add_tensor("blk.0.attn_q.weight", state["layers.0.q.weight"].numpy())
    writer.add_tensor("blk.0.attn_output.weight", state["layers.0.o.weight"].numpy().astype(np.float16))
    writer.add_tensor("output_norm.weight", state["norm.weight"].numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    matching = ckptview.diff(pt, path, values=True).matching
    assert matching.complete
    found = {m.left: (m.right, m.how) for m in matching.matches}
    assert found == {"tok.weight": ("token_embd.weight", "cast"), "layers.0.q.weight": ("blk.0.attn_q.weight", "content"),
                     "layers.0.o.weight": ("blk.0.attn_output.weight", "cast"),
                     "norm.weight": ("output_norm.weight", "content")}


class TiedLM(torch.nn.Module):
    """An embedding whose matrix is also the output head's weight (GPT-2, T5, most language models)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(50, 8)
        self.body = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 50, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(self.embed(ids))))


def test_tied_weights_stored_once_by_safetensors_and_onnx_are_explained(tmp_path: Path) -> None:
    from safetensors.torch import save_model

    torch.manual_seed(0)
    model = TiedLM().eval()
    pt, st, exported = tmp_path / "lm.pt", tmp_path / "lm.safetensors", tmp_path / "lm.onnx"
    torch.save(model.state_dict(), pt)  # both names, one storage
    save_model(model, str(st))  # drops the second name of the shared tensor
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.tensor([[1, 2, 3]]),), str(exported), dynamo=True, external_data=False)
    with ckptview.open(st) as stored:
        kept = {e.name for e in stored.tensors()}
    assert len(kept & {"embed.weight", "head.weight"}) == 1

    for a, b in ((pt, st), (st, pt), (pt, exported)):
        matching = ckptview.diff(a, b, values=True).matching
        assert matching.complete, (a.name, b.name, matching.unexplained_left, matching.unexplained_right)
        tied = [m for m in matching.matches if m.how == "tied"]
        assert len(tied) == 1 and tied[0].max_abs_diff == 0.0 and "tied to" in tied[0].detail
        assert {tied[0].left, tied[0].right} & {"embed.weight", "head.weight"}

    # the export keeps the embedding for Gather and its transpose for the head's MatMul: one left tensor, two copies
    matching = ckptview.diff(pt, exported, values=True).matching
    copies = [m for m in matching.matches if "second copy" in m.detail]
    assert [(m.left, m.how) for m in copies] in ([("head.weight", "transposed")], [("embed.weight", "transposed")])

    # equal values saved apart are not tied: paired by content, not called one stored tensor
    untied = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save(untied, tmp_path / "untied.pt")
    matching = ckptview.diff(tmp_path / "untied.pt", st, values=True).matching
    assert matching.complete and not [m for m in matching.matches if m.how == "tied"]
    assert [m.how for m in matching.matches if m.left == "head.weight" or m.left == "embed.weight"].count("content") == 1
