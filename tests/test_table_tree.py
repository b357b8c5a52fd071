"""Tensor table and module tree on checkpoints saved from real models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import ckptview
from conftest import SmallCNN, train_a_few_steps


class TinyLM(nn.Module):
    """A decoder-only LM named like LLaMA, with the head tied to the embedding."""

    def __init__(self, layers: int = 4, dim: int = 16, vocab: int = 50) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList()
        for _ in range(layers):
            block = nn.Module()
            block.self_attn = nn.Module()
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                setattr(block.self_attn, name, nn.Linear(dim, dim, bias=False))
            block.input_layernorm = nn.RMSNorm(dim)
            block.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim))
            self.layers.append(block)
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.embed_tokens.weight


def _save(tmp_path: Path, obj: object, name: str = "ckpt.pt") -> Path:
    path = tmp_path / name
    torch.save(obj, path)
    return path


def test_table_rows_of_a_cnn(cnn_state_dict_path: Path, trained_cnn: SmallCNN) -> None:
    with ckptview.open(cnn_state_dict_path) as ckpt:
        table = ckptview.tensor_table(ckpt)
    rows = {row.name: row for row in table.rows}
    assert list(rows) == list(trained_cnn.state_dict())
    conv = rows["conv1.weight"]
    assert (conv.section, conv.module, conv.leaf, conv.layer_kind, conv.role) == ("state_dict", "conv1", "weight", "Conv2d", "parameter")
    assert conv.layer_detail == "8, 3, 3×3 (out, in/groups, kernel)"
    assert (conv.shape, conv.dtype, conv.numel, conv.nbytes, conv.device) == ((8, 3, 3, 3), torch.float32, 216, 864, "cpu")
    assert rows["fc.weight"].layer_kind == "Linear" and rows["fc.weight"].layer_detail == "10×8 (out×in)"
    for leaf in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        assert rows[f"bn1.{leaf}"].layer_kind == "BatchNorm"
        assert rows[f"layer1.1.{leaf}"].layer_kind == "BatchNorm"
    assert {rows[f"bn1.{leaf}"].role for leaf in ("running_mean", "running_var", "num_batches_tracked")} == {"buffer"}
    assert rows["layer1.0.weight"].layer_kind == "Conv2d"
    assert table.parameter_count == sum(p.numel() for p in trained_cnn.parameters())
    assert table.buffer_count == sum(b.numel() for b in trained_cnn.buffers())
    assert table.dtype_numel == {"float32": table.parameter_count + 16 + 16, "int64": 2}
    assert table.total_bytes == sum(t.numel() * t.element_size() for t in trained_cnn.state_dict().values())
    assert not any(row.shared for row in table.rows)


def test_layer_kinds_of_a_transformer_and_other_layers(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.ModuleDict({
        "encoder": nn.TransformerEncoderLayer(32, 4, 64),
        "conv1d": nn.Conv1d(4, 8, 5),
        "conv3d": nn.Conv3d(2, 4, (3, 3, 3)),
        "bn1d": nn.BatchNorm1d(8),
        "gn": nn.GroupNorm(2, 8),
        "word_embeddings": nn.Embedding(100, 32),
    })
    with ckptview.open(_save(tmp_path, model.state_dict())) as ckpt:
        kinds = {row.name: (row.layer_kind, row.layer_detail) for row in ckptview.tensor_table(ckpt).rows}
    assert kinds["encoder.self_attn.in_proj_weight"] == ("attention.qkv", "96×32 (3·embed×embed)")
    assert kinds["encoder.self_attn.out_proj.weight"][0] == "attention.out"
    assert kinds["encoder.linear1.weight"] == ("Linear", "64×32 (out×in)")
    assert kinds["encoder.norm1.weight"][0] == "LayerNorm"
    assert kinds["conv1d.weight"] == ("Conv1d", "8, 4, 5 (out, in/groups, kernel)")
    assert kinds["conv3d.weight"][0] == "Conv3d"
    assert kinds["bn1d.running_var"] == ("BatchNorm", "8 channels")
    assert kinds["gn.weight"][0] == "GroupNorm"
    assert kinds["word_embeddings.weight"] == ("Embedding", "100×32 (vocab×dim)")


def test_llama_names_tied_head_and_sections(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyLM()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.embed_tokens.weight.sum().backward()
    optimizer.step()
    path = _save(tmp_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 1})
    with ckptview.open(path) as ckpt:
        table = ckptview.tensor_table(ckpt)
    rows = {row.name: row for row in table.rows}
    q = rows["model.layers.2.self_attn.q_proj.weight"]
    assert (q.section, q.module, q.leaf, q.layer_kind) == ("state_dict", "layers.2.self_attn.q_proj", "weight", "attention.q")
    assert rows["model.layers.2.self_attn.o_proj.weight"].layer_kind == "attention.out"
    assert rows["model.layers.0.input_layernorm.weight"].layer_kind == "RMSNorm"
    assert rows["model.norm.weight"].layer_kind == "LayerNorm"
    assert rows["model.embed_tokens.weight"].layer_kind == "Embedding"
    head, embed = rows["model.lm_head.weight"], rows["model.embed_tokens.weight"]
    assert head.shared and embed.shared and head.tied_to == "model.embed_tokens.weight" and embed.tied_to == ""
    optimizer_rows = [row for row in table.rows if row.section == "optimizer"]
    assert optimizer_rows and all(row.layer_kind == "" for row in optimizer_rows)
    model_params = sum(p.numel() for p in model.parameters())  # parameters() yields the tied weight once
    momentum = sum(row.numel for row in optimizer_rows)
    assert table.parameter_count == model_params + momentum
    frame = table.to_frame()
    assert list(frame.columns[:6]) == ["name", "section", "module", "leaf", "layer_kind", "layer_detail"]
    assert frame.sort_values("numel", ascending=False).iloc[0]["numel"] == max(p.numel() for p in model.parameters())
    assert set(frame.query("section == 'state_dict' and layer_kind == 'attention.q'")["module"]) == {
        f"layers.{i}.self_attn.q_proj" for i in range(4)}


def test_tree_folds_identical_blocks(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyLM(layers=5)
    model.layers.append(nn.Module())  # a different last block breaks the run
    model.layers[5].proj = nn.Linear(16, 8)
    with ckptview.open(_save(tmp_path, model.state_dict())) as ckpt:
        tree = ckptview.module_tree(ckpt)
        flat = ckptview.module_tree(ckpt, fold_repeats=False)
    top = {node.name: node for node in tree.root.children}
    assert list(top) == ["embed_tokens", "layers", "norm", "lm_head"]
    blocks = top["layers"].children
    assert [(b.name, b.repeat) for b in blocks] == [("0…4", 5), ("5", 1)]
    per_block = sum(p.numel() for p in model.layers[0].parameters())
    assert blocks[0].parameter_count == 5 * per_block
    assert [c.name for c in blocks[0].children] == ["self_attn", "input_layernorm", "mlp"]
    assert blocks[0].children[0].parameter_count == 4 * 16 * 16  # children describe one block
    assert "attention.q" in blocks[0].layer_kinds
    assert [b.name for b in {n.name: n for n in flat.root.children}["layers"].children] == [str(i) for i in range(6)]
    # The tied head is counted once, under the embedding (its first name).
    assert top["lm_head"].parameter_count == 0 and top["embed_tokens"].parameter_count == 50 * 16
    assert tree.root.parameter_count == sum(p.numel() for p in model.parameters())
    assert sum(node.share for node in tree.root.children) == pytest.approx(1.0)


def test_tree_of_a_cnn_keeps_different_blocks_apart(cnn_state_dict_path: Path) -> None:
    with ckptview.open(cnn_state_dict_path) as ckpt:
        tree = ckptview.module_tree(ckpt)
    frame = tree.to_frame()
    assert list(frame["path"]) == ["conv1", "bn1", "layer1", "layer1.0", "layer1.1", "fc"]
    assert list(frame["repeat"]) == [1] * 6
    assert frame.set_index("path").loc["layer1", "layer_kinds"] == "Conv2d, BatchNorm"
    assert frame.set_index("path").loc["layer1", "tensor_count"] == 6


def test_table_and_tree_are_cached(tmp_path: Path) -> None:
    model = SmallCNN()
    train_a_few_steps(model, steps=1)
    with ckptview.open(_save(tmp_path, model.state_dict())) as ckpt:
        assert ckptview.tensor_table(ckpt) is ckptview.tensor_table(ckpt)
        assert ckptview.module_tree(ckpt) is ckptview.module_tree(ckpt)


def test_scoped_names_of_tensorflow_files_make_tree_levels() -> None:
    # TFLite (like TF and ONNX exporters) scopes names with "/": split only on "." the whole model was one node
    path = Path(__file__).resolve().parent / "fixtures" / "tf" / "float.tflite"
    with ckptview.open(path) as ckpt:
        tree = ckptview.module_tree(ckpt)
        model = next(node for node in tree.root.children if node.name == "small_cnn_1")
        assert {"dense_1_1", "logits_1"} <= {child.name for child in model.children}
        assert sum(node.parameter_count for node in tree.root.children) == ckpt.parameter_count
