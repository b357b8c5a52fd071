"""
Compare's "Save fixed checkpoint" and copy button, in plain pytest on real files: the doctor's fixed
state dict written to a new file beside the checkpoint (never over an existing one unless asked),
which then loads with strict=True; the copy button holds the same code; a new comparison takes both away.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ckptview.demo import build_model, write_samples
from ckptview.ui import explore
from ckptview.ui.compare import ComparePanel, fixed_path


@pytest.fixture()
def demo(tmp_path: Path) -> dict[str, Path]:
    return write_samples(tmp_path / "demo")


def _compare_with_model(path: Path) -> ComparePanel:
    panel = explore(path, model="ckptview.demo:build_model").select("Compare")
    panel.wait()
    return panel


def test_save_fixed_writes_a_new_file_that_loads_strictly(demo: dict[str, Path]) -> None:
    source = demo["cnn_dataparallel.pt"]
    before = source.read_bytes()
    panel = _compare_with_model(source)
    assert panel.save_row.layout.display == "" and panel.copy_code.layout.display == ""
    assert panel.copy_code.text == panel.code.value and "module." in panel.copy_code.text
    target = source.parent / "cnn_dataparallel.fixed.pt"
    assert panel.save_path.value == str(target)
    panel.save_button.click()
    panel.wait()
    assert not panel.banner.value and f"Wrote <code>{target}</code>" in panel.saved.value
    build_model().load_state_dict(torch.load(target, weights_only=True), strict=True)
    assert source.read_bytes() == before
    # the next click would write a new file, not over the one just written
    assert panel.save_path.value == str(source.parent / "cnn_dataparallel.fixed-2.pt")


def test_save_fixed_never_overwrites_unless_asked(demo: dict[str, Path]) -> None:
    source = demo["cnn_dataparallel.pt"]
    panel = _compare_with_model(source)
    existing = source.parent / "keep.pt"
    existing.write_bytes(b"keep me")
    panel.save_path.value = str(existing)
    panel.save_button.click()
    panel.wait()
    assert "exists; nothing was written" in panel.banner.value and not panel.saved.value
    assert existing.read_bytes() == b"keep me"
    assert sorted(p.name for p in source.parent.iterdir() if p.name.startswith(".")) == []  # no temporary left
    panel.overwrite.value = True
    panel.save_button.click()
    panel.wait()
    assert not panel.banner.value and "Wrote" in panel.saved.value
    build_model().load_state_dict(torch.load(existing, weights_only=True), strict=True)


def test_save_fixed_of_a_sibling_checkpoint_writes_the_other_file_fixed(demo: dict[str, Path]) -> None:
    panel = explore(demo["cnn.pt"]).select("Compare")
    panel.wait()
    panel.other_path.value = str(demo["cnn_dataparallel.pt"])
    panel.compare.click()
    panel.wait()
    target = demo["cnn_dataparallel.pt"].parent / "cnn_dataparallel.fixed.pt"
    assert panel.save_path.value == str(target)
    panel.save_button.click()
    panel.wait()
    fixed = torch.load(target, weights_only=True)
    assert sorted(fixed) == sorted(torch.load(demo["cnn.pt"], weights_only=True))


def test_a_new_comparison_takes_the_fix_copy_and_save_away(demo: dict[str, Path]) -> None:
    panel = _compare_with_model(demo["cnn_dataparallel.pt"])
    panel.save_button.click()
    panel.wait()
    assert panel.saved.value
    panel.model_factory.value = ""
    panel.other_path.value = str(demo["broken.pt"])
    panel.compare.click()
    panel.wait()
    assert "ckptview: error" in panel.banner.value
    assert not (panel.fixes.value or panel.code.value or panel.copy_code.text or panel.saved.value)
    assert panel.save_row.layout.display == panel.copy_code.layout.display == "none"
    panel.other_path.value = str(demo["cnn_dataparallel.pt"])  # the same keys: nothing to fix, nothing to save
    panel.compare.click()
    panel.wait()
    assert "Keys and shapes match" in panel.key_report.value and panel.save_row.layout.display == "none"


def test_fixed_path_keeps_the_format_and_never_names_an_existing_file(tmp_path: Path) -> None:
    (tmp_path / "set").mkdir()
    assert fixed_path(str(tmp_path / "model.safetensors")) == str(tmp_path / "model.fixed.safetensors")
    assert fixed_path(str(tmp_path / "set" / "model.safetensors.index.json")) == str(tmp_path / "set" / "model.fixed.safetensors")
    assert fixed_path(str(tmp_path / "set")) == str(tmp_path / "set.fixed.pt")
    (tmp_path / "ckpt.fixed.pt").write_bytes(b"")
    assert fixed_path(str(tmp_path / "ckpt.bin")) == str(tmp_path / "ckpt.fixed-2.pt")
    assert fixed_path(str(tmp_path / "ckpt.fixed.pt")) == str(tmp_path / "ckpt.fixed-2.pt")
