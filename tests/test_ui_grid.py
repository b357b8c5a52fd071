"""
The explorer's data grids (ckptview/ui/grid.py) in plain pytest, on files torch.save wrote: what each
grid holds, its sort, its CSV/JSON downloads, the checks column that statistics fill in, and a click on
a module tree or statistics row opening its tensors in the Tensors tab.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from test_ui_panels import demo, opened  # noqa: F401 - the demo files fixture, used by name

from ckptview.ui import explore
from ckptview.ui.grid import INLINE_DOWNLOAD_BYTES, Table


@pytest.fixture(scope="module")
def many_tensors(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20,000 small tensors (2,000 blocks of 10 layers), one of them far larger, one holding a NaN."""
    path = tmp_path_factory.mktemp("many") / "many.pt"
    torch.manual_seed(0)
    state = {f"blocks.{i}.layer{j}.weight": torch.randn(4, 4) for i in range(2000) for j in range(10)}
    state["blocks.1234.layer5.weight"] = torch.randn(64, 64)
    state["blocks.7.layer3.weight"][0, 0] = float("nan")
    torch.save(state, path)
    return path


def downloads(html: str) -> dict[str, bytes]:
    """The files behind the `<a download>` links: {file name: content}."""
    return {name: base64.b64decode(data) for name, data in
            re.findall(r"download='([^']+)' href='data:[^;]+;charset=utf-8;base64,([^']+)'", html)}


def test_tensor_grid_downloads_hold_its_rows_with_raw_numbers_and_file_names(demo: dict[str, Path]) -> None:
    tensors = opened(explore(demo["training.pt"]), "Tensors")
    tensors.name_filter.value = r"fc\.weight"
    files = downloads(tensors.rows.downloads.value)
    assert set(files) == {"tensors.csv", "tensors.json"}
    rows = list(csv.DictReader(io.StringIO(files["tensors.csv"].decode())))
    assert [row["name"] for row in rows] == ["model_state_dict.fc.weight", "fc.weight › step", "fc.weight › exp_avg",
                                             "fc.weight › exp_avg_sq"]
    assert rows[0]["tensor"] == "model_state_dict.fc.weight" and rows[0]["bytes"] == str(10 * 16 * 4)  # bytes, not "640 B"
    assert rows[2]["tensor"].startswith("optimizer_state_dict.state.") and rows[2]["tensor"].endswith(".exp_avg")
    assert rows[2]["shape"] == "[10, 16]" and rows[2]["bytes"] == rows[0]["bytes"]
    assert json.loads(files["tensors.json"]) == [
        {**{k: (int(v) if k in ("bytes", "elements") else v) for k, v in row.items()}} for row in rows]


def test_grid_sort_by_bytes_is_numeric_and_reaches_the_browser(many_tensors: Path) -> None:
    tensors = opened(explore(many_tensors), "Tensors")
    assert tensors.rows.frame["bytes"].dtype.kind == "i"  # drawn as "16.0 KiB" by the grid; sorted as a number
    tensors.rows.sort("bytes", descending=True)
    assert tensors.rows.sorted_frame()["name"].iloc[0] == "blocks.1234.layer5.weight"
    assert tensors.rows.grid._transforms == [{"type": "sort", "column": "bytes", "desc": True}]
    with pytest.raises(ValueError, match="no column 'size'"):
        tensors.rows.sort("size")


def test_20000_rows_in_the_grid_and_a_filter_change_stay_fast(many_tensors: Path) -> None:
    app = explore(many_tensors)
    start = time.perf_counter()
    tensors = opened(app, "Tensors")
    shown = time.perf_counter() - start
    start = time.perf_counter()
    tensors.name_filter.value = r"layer[12]\."
    filtered = time.perf_counter() - start
    assert len(tensors.rows.frame) == 4000
    print(f"20,000-tensor grid shown in {shown:.2f} s, filter change {filtered:.3f} s")
    # generous for a shared 2-core machine; measured about 0.5 s and 0.05 s
    assert shown < 5 and filtered < 1


def test_a_large_table_builds_its_downloads_on_request(many_tensors: Path) -> None:
    tensors = opened(explore(many_tensors), "Tensors")
    assert tensors.rows.downloads.value == "" and tensors.rows.prepare.layout.display == ""
    assert "20,000 rows" in tensors.rows.prepare.description
    tensors.rows.prepare.click()
    rows = list(csv.DictReader(io.StringIO(downloads(tensors.rows.downloads.value)["tensors.csv"].decode())))
    assert len(rows) == 20_000 and rows[-1]["tensor"] == "blocks.1999.layer9.weight"
    assert tensors.rows.prepare.layout.display == "none"
    tensors.name_filter.value = r"^blocks\.1\."  # small again: the links come at once
    assert len(downloads(tensors.rows.downloads.value)) == 2 and tensors.rows.prepare.layout.display == "none"


def test_table_download_size_threshold() -> None:
    table = Table("numbers", formats={"n": "count"})
    table.show(pd.DataFrame({"n": range(10)}))
    assert list(csv.reader(io.StringIO(downloads(table.downloads.value)["numbers.csv"].decode())))[1:3] == [["0"], ["1"]]
    table.show(pd.DataFrame({"n": range(INLINE_DOWNLOAD_BYTES)}))
    assert table.downloads.value == "" and table.prepare.layout.display == ""
    with pytest.raises(ValueError, match="unknown column format 'size'"):
        Table("x", formats={"n": "size"})


def test_statistics_fill_the_tensor_grids_checks_column(many_tensors: Path) -> None:
    app = explore(many_tensors)
    tensors = opened(app, "Tensors")
    assert set(tensors.rows.frame["checks"]) == {""}  # nothing computed just to show the table
    statistics = opened(app, "Statistics")
    checks = statistics.rows.frame.set_index("name")["checks"]
    assert checks["blocks.7.layer3.weight"] == "non_finite"
    assert checks["blocks.1234.layer5.weight"] == ""  # larger, but no sibling of its kind to compare with
    assert statistics.rows.frame.set_index("name").loc["blocks.7.layer3.weight", "NaN"] == 1
    marked = tensors.rows.frame[tensors.rows.frame["checks"] != ""]
    assert list(marked["name"]) == ["blocks.7.layer3.weight"] and marked["checks"].iloc[0] == "NaN/Inf"


def test_a_clicked_tensors_own_statistics_mark_its_row(many_tensors: Path) -> None:
    tensors = opened(explore(many_tensors), "Tensors")
    tensors.name_filter.value = r"^blocks\.7\."
    tensors.rows.select_row(3)  # blocks.7.layer3.weight, the one holding a NaN
    tensors.wait()
    assert tensors.rows.frame["checks"].iloc[3] == "NaN/Inf" and set(tensors.rows.frame["checks"].drop(3)) == {""}
    assert tensors.rows.grid._data["data"]["checks"].iloc[3] == "NaN/Inf"  # what the browser was sent
    rows = list(csv.DictReader(io.StringIO(downloads(tensors.rows.downloads.value)["tensors.csv"].decode())))
    assert rows[3]["checks"] == "NaN/Inf"
    tensors.name_filter.value = ""  # the mark stays with the tensor, not with the row position
    assert tensors.rows.frame.set_index("name").loc["blocks.7.layer3.weight", "checks"] == "NaN/Inf"


def test_a_module_tree_row_lists_its_tensors_and_a_statistics_row_selects_its_tensor(demo: dict[str, Path]) -> None:
    app = explore(demo["cnn.pt"])
    tree = opened(app, "Module tree")
    tree.rows.select_row(list(tree.rows.frame["path"]).index("layer2.0.1"))  # as a click on the row
    tensors = app.panels["Tensors"]
    tensors.wait()
    assert app.tabs.selected_index == list(app.panels).index("Tensors")
    assert list(tensors.rows.frame["name"]) == [f"layer2.0.1.{leaf}" for leaf in
                                                ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
    statistics = opened(app, "Statistics")
    statistics.rows.select_row(list(statistics.rows.frame["name"]).index("fc.weight"))
    tensors.wait()
    assert tensors.selected == "fc.weight" and list(tensors.rows.frame["name"]) == ["fc.weight"]
    assert "histogram of fc.weight" in tensors.histogram.figure.layout.title.text
    assert app.show_tensor("conv1.weight") is tensors
    tensors.wait()
    assert "<h4 style='margin:6px 0'>conv1.weight</h4>" in tensors.detail.value
    app.show_tensor("layer1")  # a module: its rows, and no detail of a tensor they no longer show
    assert len(tensors.rows.frame) == 12 and tensors.selected == "" and not tensors.detail.value
    assert not tensors.histogram.data and tensors.name_filter.value == r"^layer1\."


def test_plot_points_carry_what_a_click_opens(demo: dict[str, Path]) -> None:
    """The treemap's tiles carry their module paths and the Statistics points their tensor names; a click
    the page reports (PlotClicks, tested in the browser in test_browser_grid.py) opens it in the Tensors tab."""
    app = explore(demo["cnn.pt"])
    treemap = opened(app, "Overview").treemap.figure.data[0]
    assert {"conv1", "layer2.0", "fc"} <= set(treemap.customdata) and len(treemap.customdata) == len(treemap.ids)
    statistics = opened(app, "Statistics")
    names = {name for trace in statistics.figure.data for name in trace.customdata}
    assert "fc.weight" in names and names <= {entry.name for entry in app.state.checkpoint.tensors()}
    app.plot_clicks.target = "fc"
    app.plot_clicks.clicks += 1  # as the page reports a click on that tile
    tensors = app.panels["Tensors"]
    tensors.wait()
    assert app.tabs.selected_index == list(app.panels).index("Tensors")
    assert list(tensors.rows.frame["name"]) == ["fc.weight", "fc.bias"]


def test_overview_and_batchnorm_tables_can_be_downloaded(demo: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "tagged.safetensors"
    save_file({"w": torch.zeros(2)}, path, metadata={f"key{i}": str(i) for i in range(100)})
    metadata = json.loads(downloads(opened(explore(path), "Overview").metadata_downloads.value)["metadata.json"])
    assert len(metadata) == 100 and {"metadata": "key99", "value": "99"} in metadata  # beyond the rows drawn
    app = explore(demo["training.pt"])
    sections = downloads(opened(app, "Overview").downloads.value)
    assert "progress" in sections["sections.csv"].decode() and json.loads(sections["sections.json"])
    findings = json.loads(downloads(opened(app, "BatchNorm").downloads.value)["batchnorm-findings.json"])
    assert {"check", "severity", "module", "tensors", "message"} <= set(findings[0])


def test_compare_and_training_tables_can_be_downloaded(demo: dict[str, Path]) -> None:
    compare = opened(explore(demo["cnn_dataparallel.pt"], model="ckptview.demo:build_model"), "Compare")
    key_diff = json.loads(downloads(compare.downloads.value)["key-diff.json"])
    assert any(row["key"].startswith("module.") for row in key_diff)  # the 32 keys only the checkpoint has
    app = explore(demo["cnn.pt"], compare_to=demo["cnn.safetensors"])
    compare = opened(app, "Compare")
    compare.values_button.click()
    compare.wait()
    files = downloads(compare.downloads.value)
    assert {"key-diff.csv", "value-diff.csv", "value-diff.json"} <= set(files)
    assert "conv1.weight" in files["value-diff.csv"].decode()
    training = opened(explore(demo["training.pt"]), "Training state")
    training.wait()
    files = downloads(training.downloads.value + training.moments_table.value)
    optimizer = next(name for name in files if name.startswith("optimizer-") and name.endswith(".json"))
    assert "conv1.weight" in {row["name"] for row in json.loads(files[optimizer])}
    assert {"moment-norms.csv", "moment-norms.json"} <= set(files)
