"""
The Compare tab on two formats ("did my export keep my weights"), driven as a user would: a trained
CNN saved with torch.save and its ONNX export (constant folding on, so every BatchNorm is folded
into its convolution), set as the second checkpoint, Compare, then Compute value diff.
"""

from __future__ import annotations

import contextlib
import html
import io
import re
import warnings
from pathlib import Path

import pytest
import torch
from conftest import SmallCNN, train_a_few_steps
from safetensors.torch import save_file

import ckptview
from ckptview.ui import explore
from ckptview.ui.compare import ComparePanel

# What every tensor of SmallCNN becomes in its folded ONNX export: (left keys, right key, how).
# The exporter names the folded biases after their convolution; a graph constant's name is its own
# numbering (val_27), so those rows are checked apart.
EXPECTED = [
    ("conv1.weight, bn1.weight, bn1.running_var", "conv1.weight", "folded"),
    ("bn1.bias, bn1.running_mean, bn1.weight, bn1.running_var", "conv1.weight_bias", "folded"),
    ("bn1.num_batches_tracked", "", "dropped"),
    ("layer1.0.weight, layer1.1.weight, layer1.1.running_var", "layer1.0.weight", "folded"),
    ("layer1.1.bias, layer1.1.running_mean, layer1.1.weight, layer1.1.running_var", "layer1.0.weight_bias", "folded"),
    ("layer1.1.num_batches_tracked", "", "dropped"),
    ("fc.weight", "fc.weight", "name"),
    ("fc.bias", "fc.bias", "name"),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    torch.manual_seed(0)
    model = SmallCNN()
    train_a_few_steps(model)  # running statistics away from 0/1, so a fold really changes the kernel
    model.eval()
    folder = tmp_path_factory.mktemp("crossformat")
    paths = {"pt": folder / "cnn.pt", "onnx": folder / "cnn.onnx", "safetensors": folder / "cnn.safetensors",
             "altered": folder / "altered" / "cnn.pt"}
    torch.save(model.state_dict(), paths["pt"])
    save_file(model.state_dict(), str(paths["safetensors"]))
    # optimize=True is the exporter's default graph optimisation: constant folding folds each BatchNorm into its Conv
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, 3, 16, 16),), str(paths["onnx"]), dynamo=True, external_data=False,
                          optimize=True)
    # A checkpoint the export was not made from: one running variance differs, so its fold fails to match.
    altered = model.state_dict()
    altered["bn1.running_var"] = altered["bn1.running_var"] * 1.5
    paths["altered"].parent.mkdir()
    torch.save(altered, paths["altered"])
    return paths


def compare_values_with(panel: ComparePanel, other: Path) -> None:
    panel.other_path.value = str(other)
    panel.compare.click()
    panel.wait()
    panel.values_button.click()
    panel.wait()


def table_rows(fragment: str) -> list[tuple[str, ...]]:
    """The matching table's body rows as plain text, a cell's keys (one per line) joined by ", "."""
    rows = []
    for row in re.findall(r"<tr>(.*?)</tr>", fragment)[1:]:  # [0] is the header
        cells = re.findall(r"<td[^>]*>(.*?)</td>", row)
        rows.append(tuple(html.unescape(re.sub(r"<[^>]+>", "", cell.replace("<br>", ", "))) for cell in cells))
    return rows


@pytest.mark.parametrize("opened_on", ["pt", "onnx"])
def test_a_pt_and_its_folded_onnx_export_pair_every_tensor(files: dict[str, Path], opened_on: str) -> None:
    other = files["onnx" if opened_on == "pt" else "pt"]
    app = explore(files[opened_on])
    try:
        panel = app.select("Compare")
        panel.wait()
        assert str(other) in [value for _, value in panel.siblings.options]  # the export is offered beside the .pt
        compare_values_with(panel, other)
        # Whichever file the explorer shows, the PyTorch file is the left side: folds are found from it.
        matching = panel.format_matching.matching
        assert (matching.left_format, matching.right_format) == ("torch-zip", "onnx")
        assert matching.unexplained_left == () and matching.unexplained_right == ()
        assert "cnn.pt (torch-zip) → cnn.onnx (onnx): every tensor paired or explained (2 by name, 4 folded, " \
               "2 dropped, 2 graph constants)" in html.unescape(panel.matching.value)
        assert "Unexplained" not in panel.matching.value
        # the value diff pairs by name only: the folded kernels "differ", and the banner points at the pairing
        assert "4 tensors compared, 2 differ. Below: what each tensor of cnn.pt became in cnn.onnx." \
               in panel.banner.value

        rows = table_rows(panel.matching.value)
        assert [row[:3] for row in rows if row[2] != "graph_constant"] == EXPECTED
        by_right = {row[1]: row for row in rows}
        assert float(by_right["conv1.weight"][3]) < 1e-6 and float(by_right["fc.weight"][3]) == 0.0
        assert by_right["conv1.weight"][4] == "BatchNorm bn1 folded into conv1, eps 1e-05: w·γ/√(var+ε)"
        with ckptview.open(files["onnx"]) as exported:
            names, used = [e.name for e in exported.tensors()], set(exported.layers)
        constants = [row[1] for row in rows if row[2] == "graph_constant"]
        assert len(constants) == 2 and not set(constants) & used  # tensors no layer of the graph uses
        assert sorted(row[1] for row in rows if row[1]) == sorted(names)  # every ONNX tensor has its row
    finally:
        app.close()


def test_a_safetensors_copy_pairs_every_tensor_by_name_exactly(files: dict[str, Path]) -> None:
    app = explore(files["pt"])
    try:
        panel = app.select("Compare")
        panel.wait()
        compare_values_with(panel, files["safetensors"])
        rows = table_rows(panel.matching.value)
        assert [row[0] for row in rows] == list(torch.load(files["pt"], weights_only=True))
        assert all(row[0] == row[1] and row[2] == "name" and float(row[3]) == 0.0 for row in rows)
        assert "every tensor paired or explained (14 by name)" in panel.matching.value
    finally:
        app.close()


def test_a_checkpoint_the_export_was_not_made_from_is_left_unexplained(files: dict[str, Path]) -> None:
    app = explore(files["altered"])
    try:
        panel = app.select("Compare")
        panel.wait()
        compare_values_with(panel, files["onnx"])
        matching = panel.format_matching.matching
        # bn1's fold no longer reproduces the exported kernel and bias: conv1's kernel pairs only by name
        # (its values differ), bn1 stays unexplained on the left and the folded bias on the right
        assert matching.unexplained_left == ("bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var")
        assert matching.unexplained_right == ("conv1.weight_bias",)
        text = re.sub(r"<[^>]+>", "", html.unescape(panel.matching.value))
        assert "cnn.pt (torch-zip) → cnn.onnx (onnx): 5 unexplained (4 in cnn.pt, 1 in cnn.onnx)" in text
        assert "Unexplained in cnn.pt (nothing in the other file matches them): bn1.weight, bn1.bias, " \
               "bn1.running_mean, bn1.running_var" in text
        assert "Unexplained in cnn.onnx (nothing in the other file matches them): conv1.weight_bias" in text
        rows = {row[1]: row for row in table_rows(panel.matching.value)}
        assert rows["conv1.weight"][:3] == ("conv1.weight", "conv1.weight", "name")
        assert float(rows["conv1.weight"][3]) > 1e-3 and rows["conv1.weight"][4] == "values differ"
        assert rows["layer1.0.weight"][:3] == ("layer1.0.weight, layer1.1.weight, layer1.1.running_var",
                                               "layer1.0.weight", "folded")

        # A new comparison takes the matching down with the rest; two files of one format have none.
        compare_values_with(panel, files["pt"])
        assert panel.format_matching is None and panel.matching.value == ""
        assert "14 tensors compared, 1 differ." in panel.banner.value and "Below" not in panel.banner.value
    finally:
        app.close()
