"""
A sharded set as Hugging Face saves one (a folder with `config.json`, `model.safetensors.index.json`
and its shards, written with safetensors' `save_file`): the header is named by the folder, says what
config.json declares and each shard's size, and Compare never offers the set's own shards.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import ckptview
from ckptview.errors import UnsupportedFormatError
from ckptview.present.frames import summary
from ckptview.present.html import header_html
from ckptview.ui import explore


def _save_sharded(folder: Path, config: dict | None) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    state = {f"model.layers.{i}.mlp.weight": torch.randn(32, 16) for i in range(4)} | {"lm_head.weight": torch.randn(50, 16)}
    folder.mkdir(parents=True)
    names = list(state)
    weight_map = {}
    for number, part in enumerate((names[:3], names[3:]), 1):
        shard = f"model-{number:05d}-of-00002.safetensors"
        save_file({k: state[k] for k in part}, str(folder / shard), metadata={"format": "pt"})
        weight_map |= {k: shard for k in part}
    total = sum(t.numel() * t.element_size() for t in state.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return state


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("hub") / "tiny-llama"
    _save_sharded(folder, {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "float32",
                           "hidden_size": 16, "num_hidden_layers": 4, "num_attention_heads": 2, "vocab_size": 50,
                           "num_parameters": 4 * 32 * 16 + 50 * 16})
    (folder.parent / "other.safetensors").write_bytes((folder / "model-00001-of-00002.safetensors").read_bytes())
    return folder


@pytest.mark.parametrize("opened_as", ["folder", "index"])
def test_header_names_the_folder_and_says_what_config_json_declares(tiny_llama: Path, opened_as: str) -> None:
    path = tiny_llama if opened_as == "folder" else tiny_llama / "model.safetensors.index.json"
    with ckptview.open(path) as ckpt:
        facts = summary(ckpt)
        html = header_html(facts)
    assert facts.name == "tiny-llama" and "<b style='font-size:16px'>tiny-llama</b>" in html
    assert dict(facts.config) == {"architecture": "LlamaForCausalLM", "model type": "llama", "dtype": "float32",
                                  "hidden size": "16", "layers": "4", "attention heads": "2", "vocabulary": "50",
                                  "parameters": "2,848 declared, 2,848 counted in the shards (the same)"}
    sizes = {p.name: p.stat().st_size for p in tiny_llama.glob("*.safetensors")}
    assert dict(facts.shards) == sizes and list(dict(facts.shards)) == sorted(sizes)
    assert "<summary>2 shards," in html and all(f"<code>{name}</code>" in html for name in sizes)
    assert "the index declares 11,392 bytes of tensor data (the same)" in html


def test_a_config_declaring_another_count_says_so(tmp_path: Path) -> None:
    folder = tmp_path / "partial"
    _save_sharded(folder, {"architectures": ["GPT2LMHeadModel"], "n_embd": 16, "n_layer": 12, "num_parameters": 10_000})
    with ckptview.open(folder) as ckpt:
        facts = dict(summary(ckpt).config)
    assert facts["hidden size"] == "16" and facts["layers"] == "12"
    assert facts["parameters"] == "10,000 declared, 2,848 counted in the shards (7,152 fewer counted)"


def test_a_set_without_config_json_says_it_has_none(tmp_path: Path) -> None:
    folder = tmp_path / "bare"
    _save_sharded(folder, None)
    with ckptview.open(folder) as ckpt:
        html = header_html(summary(ckpt))
    assert "no config.json beside the index" in html and "<summary>2 shards," in html


def test_explorer_header_and_compare_of_a_sharded_folder(tiny_llama: Path) -> None:
    app = explore(tiny_llama)
    assert "tiny-llama" in app.header.value and "LlamaForCausalLM" in app.header.value
    panel = app.select("Compare")
    panel.wait()
    offered = [Path(value).name for _, value in panel.siblings.options if value]
    assert "other.safetensors" in offered
    assert not [name for name in offered if name.startswith("model-0000")]


def test_a_hub_folder_with_both_formats_opens_what_from_pretrained_loads(tmp_path: Path) -> None:
    """Hub repositories often hold one model as model.safetensors and pytorch_model.bin (sharded or
    not): the folder opens as the safetensors copy, as `from_pretrained` loads it, and says so."""
    single = tmp_path / "single"
    single.mkdir()
    state = {"encoder.weight": torch.randn(4, 3), "encoder.bias": torch.zeros(4)}
    save_file(state, str(single / "model.safetensors"))
    torch.save(state, single / "pytorch_model.bin")
    (single / "config.json").write_text("{}")
    with ckptview.open(single) as ckpt:
        assert ckpt.format == "safetensors" and Path(ckpt.path).name == "model.safetensors"
        assert ckpt.details["chosen_from_folder"].startswith("model.safetensors, which from_pretrained loads")
        assert "pytorch_model.bin" in ckpt.details["chosen_from_folder"]
    (single / "model.safetensors").unlink()
    with ckptview.open(single) as ckpt:  # one format left: opened as before, nothing chosen
        assert ckpt.format == "torch-zip" and "chosen_from_folder" not in ckpt.details

    sharded = tmp_path / "sharded"
    saved = _save_sharded(sharded, {"architectures": ["LlamaForCausalLM"]})
    weight_map = {}
    for number, names in enumerate((list(saved)[:3], list(saved)[3:]), 1):
        shard = f"pytorch_model-{number:05d}-of-00002.bin"
        torch.save({k: saved[k] for k in names}, sharded / shard)
        weight_map |= {k: shard for k in names}
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with ckptview.open(sharded) as ckpt:
        assert Path(ckpt.path).name == "model.safetensors.index.json"
        assert "pytorch_model.bin.index.json" in ckpt.details["chosen_from_folder"]
        assert {entry.name for entry in ckpt.tensors()} == set(saved)

    mixed = tmp_path / "mixed"  # not the same weights by name: which to open stays the user's choice
    mixed.mkdir()
    save_file(state, str(mixed / "model.safetensors"))
    torch.save(state, mixed / "other.pt")
    with pytest.raises(UnsupportedFormatError, match="a directory, not a checkpoint file"):
        ckptview.open(mixed)
