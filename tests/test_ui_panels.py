"""
The explorer in plain pytest: build `explore(...)` on real checkpoints, drive its widgets by setting
`.value` and clicking, and check what the widgets then hold (tables, figure data, banners).
"""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ckptview
from ckptview.cli import main as cli_main
from ckptview.demo import build_model, write_samples
from ckptview.present.figures import MAX_TREE_NODES
from ckptview.ui import Explorer, explore


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_samples(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def many_tensors(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20,000 small tensors: 2,000 blocks of 10 layers, a few of them poisoned."""
    path = tmp_path_factory.mktemp("many") / "many.pt"
    torch.manual_seed(0)
    state = {f"blocks.{i}.layer{j}.weight": torch.randn(4, 4) for i in range(2000) for j in range(10)}
    state["blocks.7.layer3.weight"][0, 0] = float("nan")
    state["blocks.9.layer1.weight"] = state["blocks.9.layer1.weight"].to(torch.float16)
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2,000 small tensors, one holding a NaN, one scaled far above its siblings."""
    path = tmp_path_factory.mktemp("poisoned") / "poisoned.pt"
    torch.manual_seed(0)
    state = {f"blocks.{i}.layer{j}.weight": torch.randn(8, 8) for i in range(200) for j in range(10)}
    state["blocks.7.layer3.weight"][0, 0] = float("nan")
    state["blocks.50.layer2.weight"] *= 1000
    torch.save(state, path)
    return path


def opened(app: Explorer, title: str):
    panel = app.select(title)
    panel.wait()
    return panel


def cli_error(path: Path) -> str:
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        assert cli_main(["info", str(path)]) == 1
    return stderr.getvalue().strip()


def test_import_ckptview_does_not_import_widgets() -> None:
    code = "import sys, ckptview; print(any(m.split('.')[0] in ('ipywidgets', 'IPython', 'plotly') for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
    assert "explore" in ckptview.__all__


def test_header_says_what_the_file_is(demo: dict[str, Path]) -> None:
    app = ckptview.explore(demo["training.pt"])
    header = app.header.value
    assert "training.pt" in header and "torch-zip" in header
    with ckptview.open(demo["training.pt"]) as ckpt:
        assert f"{ckpt.tensor_count:,} tensors" in header
    assert "no foreign code needed" in header
    assert "optimizer" in header and "state_dict" in header
    assert app.tabs.titles == ("Overview", "Tensors", "Module tree", "Statistics", "BatchNorm", "Training state",
                               "Compare", "Inference", "Deploy")


def test_header_badge_lists_the_code_a_pickled_module_wants(tmp_path: Path) -> None:
    path = tmp_path / "whole.pt"
    torch.save(build_model(), path)
    header = explore(path).header.value
    assert "needs foreign code" in header and "ckptview.demo.DemoCNN" in header


def test_broken_file_shows_the_cli_message_and_no_tabs(demo: dict[str, Path]) -> None:
    app = explore(demo["broken.pt"])
    assert not app.panels
    assert cli_error(demo["broken.pt"]) in app.header.value.replace("&#x27;", "'")


def test_tabs_compute_only_when_opened(demo: dict[str, Path]) -> None:
    app = explore(demo["training.pt"])
    tensors = app.panels["Tensors"]
    assert not tensors.activated and tensors.frame.empty and tensors.rows.frame.empty
    opened(app, "Tensors")
    assert len(tensors.frame) == 83


def test_overview_lists_sections_with_their_values_and_a_treemap(demo: dict[str, Path]) -> None:
    overview = opened(explore(demo["training.pt"]), "Overview")
    assert "epoch=3" in overview.sections.value and "arch=DemoCNN" in overview.sections.value
    assert "optimizer_state_dict" in overview.sections.value
    treemap = overview.treemap.data[0]
    assert treemap.type == "treemap"
    assert "layer1 ×2" in treemap.labels or "layer1" in treemap.labels
    assert treemap.values[0] == sum(v for v, parent in zip(treemap.values, treemap.parents, strict=True) if parent == treemap.ids[0])


def test_a_filter_typed_while_the_table_loads_is_what_the_table_shows(demo: dict[str, Path], monkeypatch) -> None:
    """The worker drawing the first rows and the filter's handler redraw one table: the last filter wins."""
    import threading

    from ckptview.ui import tensors as tensors_module

    drawn, release = threading.Event(), threading.Event()
    unfiltered = tensors_module.filter_frame

    def filter_then_stall_in_the_worker(*args, **kwargs):
        rows = unfiltered(*args, **kwargs)
        if threading.current_thread().name.startswith("ckptview-ui") and not drawn.is_set():
            drawn.set()
            release.wait(10)  # the worker has chosen its rows; the user types now
        return rows

    monkeypatch.setattr(tensors_module, "filter_frame", filter_then_stall_in_the_worker)
    app = explore(demo["training.pt"])
    panel = app.select("Tensors")
    assert drawn.wait(30)
    typing = threading.Thread(target=lambda: setattr(panel.name_filter, "value", r"layer1\..*weight$"))
    typing.start()
    typing.join(0.5)
    release.set()
    typing.join(30)
    panel.wait()
    assert panel.count_label.value == "4 of 83 tensors"
    assert list(panel.rows.frame["name"]) == [f"model_state_dict.layer1.{i}.{j}.weight" for i in (0, 1) for j in (0, 1)]
    assert "title='4 rows" in panel.rows.downloads.value  # the CSV the browser test reads


def test_overview_shows_a_loss_saved_as_a_tensor_by_its_value(tmp_path: Path) -> None:
    path = tmp_path / "tutorial.pt"
    torch.save({"epoch": 4, "model_state_dict": torch.nn.Linear(2, 1).state_dict(), "loss": torch.tensor(0.25)}, path)
    overview = opened(explore(path), "Overview")
    assert "loss=0.25" in overview.sections.value and "tensor []" not in overview.sections.value


def test_tensor_grid_holds_and_filters_20000_tensors(many_tensors: Path) -> None:
    app = explore(many_tensors)
    panel = opened(app, "Tensors")
    assert len(panel.rows.frame) == 20_000 and panel.count_label.value == "20,000 of 20,000 tensors"
    assert list(panel.rows.frame.columns) == ["name", "bytes", "shape", "dtype", "elements", "layer kind", "role", "checks"]
    assert panel.rows.frame["bytes"].iloc[0] == 64 and panel.rows.frame["shape"].iloc[0] == "[4, 4]"
    panel.name_filter.value = r"^blocks\.1\d\.layer[12]\."
    assert list(panel.rows.frame["name"][:3]) == ["blocks.10.layer1.weight", "blocks.10.layer2.weight",
                                                   "blocks.11.layer1.weight"]
    assert panel.count_label.value == "20 of 20,000 tensors"
    panel.name_filter.value = ""
    panel.dtype_filter.value = "float16"
    assert list(panel.rows.frame["name"]) == ["blocks.9.layer1.weight"]
    assert panel.rows.frame["bytes"].iloc[0] == 32
    panel.dtype_filter.value = ""
    panel.rows.sort("name", descending=True)
    assert panel.rows.sorted_frame()["name"].iloc[0] == "blocks.999.layer9.weight"
    panel.name_filter.value = "(("
    assert "not a valid regular expression" in panel.banner.value


def test_tensor_kind_filter_uses_inferred_layer_kinds(demo: dict[str, Path]) -> None:
    panel = opened(explore(demo["cnn.pt"]), "Tensors")
    assert "Conv2d" in [value for _, value in panel.kind_filter.options]
    panel.kind_filter.value = "Linear"
    assert list(panel.rows.frame["name"]) == ["fc.weight", "fc.bias"]


def test_selecting_a_tensor_shows_its_statistics_histogram_and_heatmap(demo: dict[str, Path]) -> None:
    panel = opened(explore(demo["cnn.pt"]), "Tensors")
    panel.rows.select_row(list(panel.rows.frame["name"]).index("fc.weight"))  # as a click on its row
    panel.wait()
    assert panel.selected == "fc.weight"
    weight = torch.load(demo["cnn.pt"], weights_only=True)["fc.weight"]
    assert f"{weight.std().item():.6g}" in panel.detail.value
    assert f"{weight.abs().max().item():.6g}" in panel.detail.value
    histogram = panel.histogram.data[0]
    assert sum(histogram.y) == weight.numel()
    heatmap = panel.heatmap.data[0]
    assert heatmap.type == "heatmap" and len(heatmap.z) == 10 and len(heatmap.z[0]) == 16
    assert heatmap.z[3][5] == pytest.approx(weight[3, 5].item())
    panel.selected = "conv1.weight"  # 4-D: statistics and histogram, no heatmap
    panel.wait()
    assert "conv1.weight" in panel.detail.value and not panel.heatmap.data and panel.heatmap.layout.display == "none"


def test_large_weights_are_downsampled_for_the_heatmap(tmp_path: Path) -> None:
    path = tmp_path / "wide.pt"
    torch.save({"proj.weight": torch.randn(1000, 300)}, path)
    panel = opened(explore(path), "Tensors")
    panel.selected = "proj.weight"
    panel.wait()
    z = panel.heatmap.data[0].z
    assert (len(z), len(z[0])) == (96, 96)
    assert "block means" in panel.heatmap.figure.layout.title.text


@pytest.mark.skipif(not hasattr(torch, "float4_e2m1fn_x2"), reason="torch 2.8+ dtype")
def test_a_tensor_without_values_to_read_shows_why_and_no_heatmap(tmp_path: Path) -> None:
    """A 2-D floating-point tensor torch cannot convert (float4_e2m1fn_x2, two FP4 values a byte): its
    detail says why there are no statistics, with no heatmap and no error."""
    path = tmp_path / "fp4.pt"
    torch.save({"fp4.weight": torch.arange(16, dtype=torch.uint8).reshape(4, 4).view(torch.float4_e2m1fn_x2),
                "w": torch.ones(2, 2)}, path)
    panel = opened(explore(path), "Tensors")
    panel.selected = "fp4.weight"
    panel.wait()
    assert "torch converts it to no other dtype" in panel.detail.value and not panel.heatmap.data
    assert "ckptview-banner-error" not in panel.banner.value


def test_module_tree_folds_repeated_blocks_and_expands(many_tensors: Path, demo: dict[str, Path]) -> None:
    tree = opened(explore(many_tensors), "Module tree")
    # Block 9 holds a float16 tensor, so it breaks the run: 0…8 and 10…1999 fold, 9 stands alone.
    modules = [name.strip() for name in tree.rows.frame["module"]]
    assert "0…8 ×9" in modules and "10…1999 ×1990" in modules
    assert len(modules) < 40
    small = opened(explore(demo["cnn.pt"]), "Module tree")
    small.open_depth.value = 1
    rows = small.rows.frame.set_index("path")  # layer1's two blocks, folded, not their layers
    assert rows.loc["layer1.0", "module"] == "   0…1 ×2" and "layer1.0.0" not in rows.index
    assert rows.loc["layer1", "bytes"] == rows.loc["layer1.0", "bytes"] == 18_960  # a folded run counts every block
    small.open_depth.value = 2
    assert small.rows.frame.set_index("path").loc["layer1.0.0", "module"] == "      0"
    small.open_depth.value = 0
    assert list(small.rows.frame["module"]) == ["conv1", "bn1", "layer1", "layer2", "fc"]


def test_statistics_plot_by_depth_and_flag_outliers(poisoned: Path) -> None:
    panel = opened(explore(poisoned), "Statistics")
    assert "<b>2,000</b> tensors" in panel.summary.value
    assert "1 tensors hold NaN or Inf" in panel.summary.value
    std, _, flagged = panel.figure.data
    assert set(flagged.text) == {"blocks.7.layer3.weight", "blocks.50.layer2.weight"}
    assert len(std.x) == 2000 and std.y[1] == pytest.approx(torch.load(poisoned)["blocks.0.layer1.weight"].std().item())
    assert "non_finite" in panel.outliers.value and "abs_max_outlier" in panel.outliers.value
    panel.name_filter.value = r"^blocks\.7\."
    panel.wait()
    assert "<b>10</b> tensors" in panel.summary.value
    assert list(panel.figure.data[0].x) == list(range(10))


def test_statistics_cancel_stops_and_says_so(poisoned: Path) -> None:
    app = explore(poisoned)
    panel = app.panels["Statistics"]
    panel.activated = True  # open the tab without its automatic start, to press the buttons ourselves
    panel.compute.click()
    panel.cancel_button.click()
    panel.wait()
    assert "cancelled" in panel.banner.value
    assert panel.result is None and not panel.compute.disabled
    panel.compute.click()
    panel.wait()
    assert "<b>2,000</b> tensors" in panel.summary.value


def test_batchnorm_findings_by_severity_and_running_stat_plots(tmp_path: Path, demo: dict[str, Path]) -> None:
    state = torch.load(demo["cnn.pt"], weights_only=True)
    state["layer1.0.1.running_var"][2] = -1.0
    path = tmp_path / "bad_bn.pt"
    torch.save(state, path)
    panel = opened(explore(path), "BatchNorm")
    html = panel.findings.value
    assert "<b>5</b> BatchNorm layers" in html
    first_row = html.split("</th></tr>", 1)[1]
    assert first_row.startswith("<tr><td data-label='severity' class='sev-error'>error</td>") and "layer1.0.1" in first_row.split("</tr>")[0]
    boxes = [trace for trace in panel.figure.data if trace.type == "box"]
    assert len(boxes) == 10
    assert min(boxes[3].y) == -1.0  # the second layer's running_var box holds the negative value


def test_training_state_shows_optimizer_mapped_to_names(demo: dict[str, Path]) -> None:
    panel = opened(explore(demo["training.pt"]), "Training state")
    html = panel.content.value
    assert "</code>: Adam</h4>" in html and "<td>conv1.weight</td>" in html  # the demo trains with Adam, not AdamW
    assert "<th>epoch</th><td>3</td>" in html and "<th>step_size</th><td>2</td>" in html
    lightning = opened(explore(demo["lightning.ckpt"]), "Training state")
    assert "<h4>Lightning</h4>" in lightning.content.value and "2.4.0" in lightning.content.value
    weights_only = opened(explore(demo["cnn.pt"]), "Training state")
    assert "No training state" in weights_only.content.value


def test_compare_with_a_model_gives_code_that_loads(demo: dict[str, Path]) -> None:
    app = explore(demo["cnn_dataparallel.pt"], model="ckptview.demo:build_model")
    panel = opened(app, "Compare")
    assert "Loading this checkpoint into the model" in panel.key_report.value
    assert "32 only in this checkpoint (unexpected)" in panel.key_report.value
    assert "module." in panel.fixes.value and "strict=True" in panel.fixes.value
    scope = {"state_dict": torch.load(demo["cnn_dataparallel.pt"], weights_only=True)}
    exec(panel.code.value, scope)
    model = build_model()
    model.load_state_dict(scope["state_dict"], strict=True)


def test_compare_with_a_sibling_checkpoint_keys_fix_and_values(demo: dict[str, Path]) -> None:
    panel = opened(explore(demo["cnn.pt"]), "Compare")
    assert "give a second checkpoint" in panel.banner.value
    siblings = [value for _, value in panel.siblings.options]
    assert str(demo["cnn_dataparallel.pt"]) in siblings and str(demo["sharded/model.safetensors.index.json"]) in siblings
    panel.siblings.value = str(demo["cnn.safetensors"])
    panel.compare.click()
    panel.wait()
    assert "Keys and shapes match: 32 tensors in both" in panel.key_report.value and not panel.fixes.value
    panel.values_button.click()
    panel.wait()
    assert "32 tensors compared, 0 differ" in panel.banner.value  # the .pt and its safetensors conversion are equal
    heatmap = panel.values.data[0]
    assert "layer1.0.1" in heatmap.y and float(max(max(row) for row in heatmap.z)) == 0.0

    panel.siblings.value = str(demo["cnn_dataparallel.pt"])
    panel.compare.click()
    panel.wait()
    assert "module.conv1.weight" in panel.key_report.value
    assert "strip_prefix" in panel.fixes.value and "consume_prefix_in_state_dict_if_present" in panel.code.value
    scope = {"state_dict": torch.load(demo["cnn_dataparallel.pt"], weights_only=True)}
    exec(panel.code.value, scope)
    assert scope["state_dict"].keys() == torch.load(demo["cnn.pt"], weights_only=True).keys()
    panel.values_button.click()  # values line up through the fix: the same weights
    panel.wait()
    assert "32 tensors compared, 0 differ" in panel.banner.value


def test_errors_stay_inside_their_panel(demo: dict[str, Path]) -> None:
    app = explore(demo["cnn.pt"])
    compare = opened(app, "Compare")
    compare.other_path.value = str(demo["broken.pt"])
    compare.compare.click()
    compare.wait()
    assert cli_error(demo["broken.pt"]) in compare.banner.value.replace("&#x27;", "'")
    compare.other_path.value = ""
    compare.model_factory.value = "no_such_package.models:resnet"
    compare.compare.click()
    compare.wait()
    assert "ckptview: error: cannot import 'no_such_package.models'" in compare.banner.value.replace("&#x27;", "'")
    tensors = opened(app, "Tensors")  # the rest keeps working
    assert len(tensors.rows.frame) == 32 and not tensors.banner.value


def test_treemap_stays_small_on_a_20000_tensor_file(many_tensors: Path) -> None:
    overview = opened(explore(many_tensors), "Overview")
    assert len(overview.treemap.data[0].ids) <= MAX_TREE_NODES


def test_inference_tab_builds_its_panel_when_opened(demo: dict[str, Path]) -> None:
    from ckptview.ui.inference_panel import InferencePanel

    app = explore(demo["cnn.pt"])
    tab = app.panels["Inference"]
    assert tab is app.tabs.children[list(app.panels).index("Inference")] and tab.panel is None
    panel = app.select("Inference")
    assert isinstance(panel, InferencePanel) and panel is tab.panel and tab.children == (panel,)


def test_explore_accepts_an_open_checkpoint_and_leaves_it_open(demo: dict[str, Path]) -> None:
    with ckptview.open(demo["cnn.safetensors"]) as ckpt:
        app = explore(ckpt)
        panel = opened(app, "Tensors")
        assert panel.count_label.value == "32 of 32 tensors"
        app.close()
        assert ckpt.tensor("fc.weight").load().shape == (10, 16)  # the caller's checkpoint stays open
        with pytest.raises(RuntimeError):  # the explorer's worker threads are gone
            app.state.submit(lambda: None)


def test_compare_to_prefills_and_runs_when_the_tab_opens(demo: dict[str, Path]) -> None:
    app = explore(demo["cnn.pt"], compare_to=demo["lightning.ckpt"])
    panel = app.panels["Compare"]
    assert panel.other_path.value == str(demo["lightning.ckpt"]) and not panel.key_report.value
    opened(app, "Compare")
    assert "model.conv1.weight" in panel.key_report.value
    assert "section" in panel.fixes.value and "strict=True" in panel.fixes.value  # take ['state_dict'], strip 'model.'


def test_optimizer_state_is_named_by_its_parameter_and_kept_out_of_model_views(demo: dict[str, Path]) -> None:
    app = explore(demo["training.pt"])
    tensors = opened(app, "Tensors")
    tensors.name_filter.value = "^fc.weight ›"
    assert list(tensors.rows.frame["name"]) == ["fc.weight › step", "fc.weight › exp_avg", "fc.weight › exp_avg_sq"]
    assert tensors.shown["name"][1].startswith("optimizer_state_dict.state.") and tensors.shown["name"][1].endswith(".exp_avg")
    # the module tree's shares are of the model (optimizer moments are twice its size beside it)
    tree = ckptview.module_tree(ckptview.open(demo["training.pt"]))
    top = {node.name: node for node in tree.root.children}
    model, optimizer = top["model_state_dict"], top["optimizer_state_dict"]
    assert (model.share, model.share_of) == (1.0, "model") and optimizer.share_of == "file"
    layer1 = {node.name: node for node in model.children}["layer1"]
    assert layer1.share == pytest.approx(layer1.parameter_count / model.parameter_count)
    assert set(opened(app, "Module tree").rows.frame.set_index("module")["of"][["model_state_dict", "optimizer_state_dict"]]) == {
        "model", "file"}
    # the statistics plot draws the model by default; the optimizer's moments only when asked
    stats = opened(app, "Statistics")
    drawn = {name for trace in stats.figure.data for name in trace.text}
    assert "model_state_dict.fc.weight" in drawn and not any("›" in name for name in drawn)
    assert {trace.name for trace in stats.figure.data} >= {"std", "abs-max", "abs-max (buffers)"}
    stats.training_too.value = True
    drawn = {name for trace in stats.figure.data for name in trace.text}
    assert "fc.weight › exp_avg_sq" in drawn
    assert stats.figure.figure.layout.yaxis.title.text and stats.figure.figure.layout.xaxis.title.text


def test_statistics_findings_are_grouped_by_check(poisoned: Path, tmp_path: Path) -> None:
    state = torch.load(poisoned, weights_only=True)
    for i in range(13):
        state[f"blocks.{i}.layer0.weight"] = torch.zeros(8, 8)
    path = tmp_path / "zeros.pt"
    torch.save(state, path)
    panel = opened(explore(path), "Statistics")
    html = panel.outliers.value
    # one row: the meaning once, the first 12 tensors named (each with its own message on hover)
    assert html.count("<td data-label='finding' class='sev-warning'>all_zero</td>") == 1 \
        and "<td data-label='tensors' class='num'>13</td>" in html
    assert html.count("every value is 0") == 12 + 1 and "and 1 more" in html


def test_compare_shows_only_the_latest_result(demo: dict[str, Path]) -> None:
    panel = opened(explore(demo["cnn.pt"]), "Compare")
    panel.other_path.value = str(demo["cnn_dataparallel.pt"])
    panel.compare.click()
    panel.wait()
    panel.values_button.click()
    panel.wait()
    assert panel.fixes.value and panel.code.value and panel.values.data
    panel.other_path.value = str(demo["broken.pt"])
    panel.compare.click()
    panel.wait()
    assert "ckptview: error" in panel.banner.value
    assert not (panel.key_report.value or panel.fixes.value or panel.code.value or panel.values.data or panel.counters.value)
    assert panel.code.layout.display == "none" and panel.values_button.layout.display == "none"
    panel.other_path.value = str(demo["cnn.safetensors"])
    panel.compare.click()
    panel.wait()
    assert "Keys and shapes match" in panel.key_report.value and not panel.fixes.value and not panel.banner.value


def test_value_diff_reports_integer_buffers_as_counters(demo: dict[str, Path], tmp_path: Path) -> None:
    state = torch.load(demo["cnn.pt"], weights_only=True)
    before = int(state["bn1.num_batches_tracked"])
    later = {k: (v + 2 if k.endswith("num_batches_tracked") else v) for k, v in state.items()}
    later["fc.weight"] = later["fc.weight"] * 1.01
    path = tmp_path / "later.pt"
    torch.save(later, path)
    panel = opened(explore(demo["cnn.pt"]), "Compare")
    panel.other_path.value = str(path)
    panel.compare.click()
    panel.wait()
    panel.values_button.click()
    panel.wait()
    assert f"<td><code>bn1.num_batches_tracked</code></td><td class='num'>{before}</td><td class='num'>{before + 2}</td>" \
        in panel.counters.value
    heatmap = panel.values.data[0]
    rows = dict(zip(heatmap.y, heatmap.z))
    assert max(rows["fc"]) == 1.0 and max(rows["bn1"]) == 0.0  # BatchNorm rows stay white: only counters moved


def test_overview_explains_each_kind_of_section_once(demo: dict[str, Path]) -> None:
    html = opened(explore(demo["training.pt"]), "Overview").sections.value
    assert html.count("<td data-label='section'><b>progress</b></td>") == 4 and html.count("training progress: epoch, step") == 1
    assert "step_size=2" in html and "_last_lr.0=0.00025" in html and "_get_lr_called_within_step" not in html


def test_compare_never_offers_a_sharded_sets_own_shards(demo: dict[str, Path]) -> None:
    index = demo["sharded/model.safetensors.index.json"]
    offered = [value for _, value in opened(explore(index), "Compare").siblings.options if value]
    shards = sorted(p.name for p in index.parent.glob("*.safetensors"))
    assert len(shards) == 2 and not [p for p in offered if Path(p).name in shards]


def test_a_plot_title_is_shown_above_it_as_html_that_wraps_and_names_tensors_as_text() -> None:
    """plotly draws a title on one line and clipped it in a narrow panel; the title is HTML above the plot instead.
    It names tensors, and a file names its tensors: only the tags the figures use are markup."""
    import numpy as np

    from ckptview.present import figures
    from ckptview.ui.base import FigureBox

    box = FigureBox()
    name = "conv<img src=x onerror=alert(1)>.weight"
    figure = figures.histogram(np.linspace(0, 1, 5), np.array([1, 2, 3, 4]), f"histogram of {name}<br>a subtitle")
    box.show(figure)
    title, plot = box.outputs
    html = title["data"]["text/html"]
    assert "&lt;img src=x onerror=alert(1)&gt;" in html and "<img" not in html and "a subtitle" in html
    assert "<br>" in html and title["data"]["text/plain"].startswith("histogram of conv<img")
    layout = plot["data"]["application/vnd.plotly.v1+json"]["layout"]
    assert "title" not in layout and box.figure.layout.title.text.startswith("histogram of")  # the figure keeps it
    # the room the title took goes with it, the plot area (which legends are placed by) keeps its height
    assert layout["margin"]["t"] == 12 and layout["height"] == figure.layout.height - (figure.layout.margin.t - 12)


def test_statistics_of_a_file_without_values_say_why_instead_of_drawing_empty_axes(tmp_path: Path) -> None:
    path = tmp_path / "skipped.pt"
    with torch.serialization.skip_data():
        torch.save({"w": torch.randn(3, 4), "b": torch.arange(3)}, path)
    stats = opened(explore(path), "Statistics")
    assert stats.figure.data == () and stats.figure.layout.display == "none"
    assert "2 without statistics: no values saved" in stats.summary.value
