"""
The explorer in a real browser: headless Debian Chromium (driven by Playwright's Python package)
against a JupyterLab and a Voila server started here on 127.0.0.1. Screenshots go to test-artifacts/.

Runs on a copy of the demo notebook in a temporary folder, so the repository's notebook never gets
outputs saved into it.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import io
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import expect

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
# Jupyter refuses to run as root unless told; CI containers run as root.
ROOT_FLAG = ["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-sync"]

if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is missing (apt-get install -y chromium); CI installs it", allow_module_level=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, process: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with a copy of the demo notebook, its sample checkpoints, and a quiet Jupyter config."""
    folder = tmp_path_factory.mktemp("lab")
    shutil.copy(ROOT / "notebooks" / "explore.ipynb", folder / "explore.ipynb")
    from ckptview.demo import write_samples

    write_samples(folder / "demo")
    config = folder / "jupyter-config"
    (config / "labconfig").mkdir(parents=True)
    # No "would you like news?" toast covering the page in screenshots.
    (config / "labconfig" / "page_config.json").write_text(json.dumps(
        {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
    return folder


def server_env(workdir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(CKPTVIEW_DEMO_DIR=str(workdir / "demo"), JUPYTER_CONFIG_DIR=str(workdir / "jupyter-config"),
               JUPYTERLAB_WORKSPACES_DIR=str(workdir / "workspaces"), JUPYTERLAB_SETTINGS_DIR=str(workdir / "settings"))
    return env


@contextlib.contextmanager
def jupyter_lab(folder: Path, notebook: str) -> Iterator[str]:
    """JupyterLab serving `folder` on 127.0.0.1 (its log in folder/lab.log); yields the URL opening `notebook`."""
    port, token = free_port(), secrets.token_hex(16)
    bin_dir = Path(sys.executable).parent
    with (folder / "lab.log").open("wb") as log:
        process = subprocess.Popen(
            [str(bin_dir / "jupyter"), "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
             f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={folder}", *ROOT_FLAG],
            cwd=folder, env=server_env(folder), stdout=subprocess.DEVNULL, stderr=log)
        try:
            wait_for_http(f"http://127.0.0.1:{port}/api/status?token={token}", process)
            yield f"http://127.0.0.1:{port}/lab/tree/{notebook}?token={token}"
        finally:
            process.terminate()
            process.wait(timeout=30)


@pytest.fixture(scope="module")
def lab(workdir: Path) -> Iterator[str]:
    with jupyter_lab(workdir, "explore.ipynb") as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, request: pytest.FixtureRequest) -> Iterator[object]:
    """A fresh page; when the test fails, a screenshot of it is kept as test-artifacts/<test>-failure.png."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    failed_before = request.session.testsfailed
    yield page
    if request.session.testsfailed > failed_before:
        page.screenshot(path=str(ARTIFACTS / f"{request.node.name}-failure.png"), full_page=True)
    page.close()


def tab(explorer, title: str):
    return explorer.locator(".lm-TabBar-tab", has_text=re.compile(f"^{re.escape(title)}$")).first


def click_row(explorer, index: int = 0) -> None:
    """Click a body row of the first visible data grid in `explorer` (a canvas: rows are found by their height)."""
    from ckptview.ui.grid import HEADER_PX, ROW_PX

    grid = explorer.locator(".ckptview-table-grid .lm-DataGrid:visible").first
    grid.wait_for(timeout=30_000)
    grid.click(position={"x": 40, "y": HEADER_PX + ROW_PX * index + ROW_PX // 2})


def grid_rows(explorer, stem: str, count: int | None = None) -> list[dict[str, str]]:
    """
    The rows a grid shows, read from its CSV download link (the grid itself draws on a canvas).
    With `count`, waits (up to 30 s) for the link to hold that many: the link is a widget of its own,
    updated a moment after the count label a test may have waited for.
    """
    link = explorer.locator(f"a[download='{stem}.csv']:visible").first
    link.wait_for(timeout=30_000)
    deadline = time.monotonic() + 30
    while True:
        data = link.get_attribute("href").split(",", 1)[1]
        rows = list(csv.DictReader(io.StringIO(base64.b64decode(data).decode())))
        if count is None or len(rows) == count or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


def count_label(rows: int):
    """The Tensors tab's "N of M tensors" once the filter leaves `rows` rows."""
    return re.compile(f"^{rows:,} of [0-9,]+ tensors$")


# The Tensors tab's label once its unfiltered rows are in the grid: a click on the grid before then
# lands on no row (CI: no histogram within 60 s)
EVERY_ROW = re.compile(r"^([0-9,]+) of \1 tensors$")


def test_demo_notebook_in_jupyterlab(lab: str, page) -> None:
    run_notebook(page, lab)
    explorer = page.locator(".ckptview-explorer").first
    explorer.wait_for(timeout=90_000)
    explorer.locator("text=sections").first.wait_for()
    explorer.get_by_text("parameters by module").first.wait_for(timeout=30_000)
    for shown in ("training.pt", "torch-zip", "no foreign code needed", "epoch=3"):
        expect(explorer).to_contain_text(shown, use_inner_text=True)
    explorer.scroll_into_view_if_needed()
    page.screenshot(path=str(ARTIFACTS / "lab-overview.png"))

    tab(explorer, "Tensors").click()
    regex = explorer.locator("input[placeholder^='name regex']")
    regex.fill(r"layer1\..*weight$")  # $: not the optimizer state named after these weights
    regex.press("Enter")
    explorer.get_by_text(count_label(4)).wait_for(timeout=30_000)
    rows = grid_rows(explorer, "tensors", count=4)
    assert len(rows) == 4 and rows[0]["tensor"] == "model_state_dict.layer1.0.0.weight"
    click_row(explorer, 0)
    explorer.get_by_text("abs-max").first.wait_for(timeout=30_000)
    page.get_by_text("histogram of model_state_dict.layer1.0.0.weight").first.wait_for(timeout=30_000)
    explorer.get_by_text("abs-max").first.scroll_into_view_if_needed()
    page.screenshot(path=str(ARTIFACTS / "lab-tensors.png"), full_page=False)
    explorer.screenshot(path=str(ARTIFACTS / "explorer.png"))  # the README's picture (docs/explorer.png)

    tab(explorer, "Module tree").click()
    explorer.get_by_text("click a module to list its tensors").wait_for(timeout=30_000)
    modules = {row["path"]: row["module"] for row in grid_rows(explorer, "modules")}
    assert modules["model_state_dict.layer1.0"] == "      0…1 ×2"  # layer1.0 and layer1.1 folded
    page.screenshot(path=str(ARTIFACTS / "lab-tree.png"))

    tab(explorer, "Statistics").click()
    explorer.get_by_text("findings on").wait_for(timeout=60_000)
    assert "83 tensors" in explorer.inner_text()
    page.get_by_text("std and abs-max per tensor by depth").first.wait_for(timeout=30_000)
    page.screenshot(path=str(ARTIFACTS / "lab-statistics.png"))

    tab(explorer, "BatchNorm").click()
    explorer.get_by_text("BatchNorm layers").wait_for(timeout=30_000)
    assert "fusion_hint" in explorer.inner_text()
    page.screenshot(path=str(ARTIFACTS / "lab-batchnorm.png"))

    tab(explorer, "Training state").click()
    explorer.locator("h4", has_text="Adam").first.wait_for(timeout=30_000)
    page.screenshot(path=str(ARTIFACTS / "lab-training.png"))

    tab(explorer, "Inference").click()
    explorer.get_by_role("button", name="Run").wait_for(timeout=60_000)
    page.screenshot(path=str(ARTIFACTS / "lab-inference.png"))

    tab(explorer, "Compare").click()
    explorer.locator("select").filter(has_text="files next to this one").select_option(label="cnn_dataparallel.pt")
    explorer.get_by_role("button", name="Compare").click()
    explorer.get_by_text("strip_prefix").wait_for(timeout=60_000)
    text = explorer.inner_text()
    assert "Strip the prefix 'module.'" in text and "consume_prefix_in_state_dict_if_present" in text
    page.screenshot(path=str(ARTIFACTS / "lab-compare.png"))
    explorer.get_by_role("button", name="Compute value diff").click()
    explorer.get_by_text("32 tensors compared, 0 differ").wait_for(timeout=60_000)
    page.get_by_text("value difference per module").first.scroll_into_view_if_needed()
    page.screenshot(path=str(ARTIFACTS / "lab-compare-values.png"))

    # The second explorer opens on the DataParallel copy with a model: its Compare tab shows the doctor.
    second = page.locator(".ckptview-explorer").nth(1)
    second.scroll_into_view_if_needed()
    tab(second, "Compare").click()
    second.get_by_text("strip_prefix").wait_for(timeout=60_000)
    # The damaged file's explorer shows the CLI's message instead of tabs.
    broken = page.locator(".ckptview-explorer").nth(2)
    broken.scroll_into_view_if_needed()
    assert "ckptview: error:" in broken.inner_text() and "cut off" in broken.inner_text()
    page.screenshot(path=str(ARTIFACTS / "lab-broken.png"))


def test_demo_notebook_in_voila(workdir: Path, page) -> None:
    port = free_port()
    bin_dir = Path(sys.executable).parent
    process = subprocess.Popen(
        [str(bin_dir / "voila"), "explore.ipynb", "--no-browser", f"--port={port}", "--Voila.ip=127.0.0.1"],
        cwd=workdir, env=server_env(workdir), stdout=subprocess.DEVNULL, stderr=(workdir / "voila.log").open("wb"))
    try:
        wait_for_http(f"http://127.0.0.1:{port}/", process, timeout=60)
        page.goto(f"http://127.0.0.1:{port}/", timeout=120_000)
        explorer = page.locator(".ckptview-explorer").first
        explorer.wait_for(timeout=120_000)
        page.get_by_text("parameters by module").first.wait_for(timeout=60_000)
        assert "training.pt" in explorer.inner_text()
        tab(explorer, "Tensors").click()
        explorer.get_by_text("83 of 83 tensors").wait_for(timeout=30_000)
        page.screenshot(path=str(ARTIFACTS / "voila-tensors.png"))
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def onnx_notebook(workdir: Path) -> str:
    """A notebook opening the explorer on an ONNX export of the demo CNN (BatchNorm nodes kept)."""
    import contextlib
    import io
    import warnings

    import torch

    from conftest import SmallCNN, train_a_few_steps

    torch.manual_seed(0)
    model = SmallCNN()
    train_a_few_steps(model)
    path = workdir / "cnn.onnx"
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.randn(1, 3, 16, 16),), str(path), dynamo=True, optimize=False,
                          external_data=False)
    return write_notebook(workdir, "onnx.ipynb", f"import ckptview\nckptview.explore({str(path)!r})")


def write_notebook(workdir: Path, name: str, *cells: str) -> str:
    """A notebook of these code cells in `workdir`, on the demo notebook's kernel (so JupyterLab starts it
    instead of asking which one); returns its name."""
    import nbformat

    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code) for code in cells])
    notebook.metadata["kernelspec"] = json.loads((ROOT / "notebooks" / "explore.ipynb").read_text())["metadata"]["kernelspec"]
    nbformat.write(notebook, workdir / name)
    return name


def kernel_state(url: str, notebook: str) -> str | None:
    """The execution state the Jupyter server holds for `notebook`'s kernel (None before it has a session)."""
    base, token = url.split("/lab/", 1)[0], url.split("token=", 1)[1]
    with urllib.request.urlopen(f"{base}/api/sessions?token={token}", timeout=10) as response:
        sessions = json.load(response)
    return next((session["kernel"]["execution_state"] for session in sessions
                 if session["path"].rsplit("/", 1)[-1] == notebook), None)


def run_notebook(page, url: str) -> None:
    """
    Open a notebook in JupyterLab and run all its cells once, from the menu (a key press can land
    before the cell has focus and run nothing). Run All is asked for only once the server reports the
    kernel idle, and asked again only if the kernel is idle and the first cell never ran: asking again
    while a slow kernel is still busy ran the notebook twice, and the second run replaced the outputs
    a test was reading (an empty explorer, in CI). Each call opens the notebook in a workspace of its
    own, reset: in the shared default one, the notebooks of earlier tests came back as tabs, and one of
    them could be brought to the front after this one had rendered (CI: the explorer hidden a moment
    after it was found). Everything is still looked up in this notebook's panel.
    """
    workspace = f"/lab/workspaces/t{uuid.uuid4().hex[:12]}/tree/"
    page.goto(url.replace("/lab/tree/", workspace, 1) + ("&" if "?" in url else "?") + "reset")
    name = url.split("?")[0].rsplit("/", 1)[-1]
    page.locator(".lm-TabBar-tab.lm-mod-current", has_text=name).first.wait_for(timeout=60_000)
    panel = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)")
    panel.locator(".jp-Notebook").first.wait_for(timeout=60_000)
    prompt = panel.locator(".jp-CodeCell .jp-InputPrompt").first  # markdown cells have an empty prompt

    def wait_until_idle() -> None:
        deadline = time.monotonic() + 180
        while kernel_state(url, name) != "idle":
            if time.monotonic() > deadline:
                raise AssertionError(f"the kernel of {name} is {kernel_state(url, name)}, not idle, after 180 s")
            page.wait_for_timeout(250)

    # A notebook an earlier test ran may come back autosaved with its outputs and "[1]:": the cell has
    # run this time only once its prompt changes (CI once took the saved prompt for a run and waited
    # 90 s for an explorer that Run All, clicked too early, never made).
    before = prompt.inner_text().strip()
    for _ in range(4):
        wait_until_idle()
        panel.locator(".jp-Cell").first.click()
        page.locator(".lm-MenuBar-item", has_text=re.compile("^Run$")).first.click()
        page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and prompt.inner_text().strip() in (before, "[ ]:", ""):
            page.wait_for_timeout(250)
        if prompt.inner_text().strip() not in (before, "[ ]:", "") or kernel_state(url, name) != "idle":
            return
    raise AssertionError("JupyterLab never ran the notebook's cell")


def test_explorer_on_an_onnx_file(lab: str, onnx_notebook: str, page) -> None:
    run_notebook(page, lab.replace("explore.ipynb", onnx_notebook))
    explorer = page.locator(".ckptview-explorer:visible").first
    explorer.wait_for(timeout=90_000)
    explorer.get_by_text("parameters by module").first.wait_for(timeout=30_000)
    header = explorer.inner_text()
    assert "cnn.onnx" in header and "onnx" in header and "error" not in header.lower()
    page.screenshot(path=str(ARTIFACTS / "lab-onnx-overview.png"))

    tab(explorer, "Tensors").click()
    regex = explorer.locator("input[placeholder^='name regex']")
    regex.fill(r"^bn1\.")
    regex.press("Enter")
    explorer.get_by_text(count_label(4)).wait_for(timeout=30_000)
    click_row(explorer, 0)
    explorer.get_by_text("histogram of bn1.").first.wait_for(timeout=30_000)
    assert "BatchNorm" in explorer.inner_text()
    page.screenshot(path=str(ARTIFACTS / "lab-onnx-tensors.png"))

    tab(explorer, "Statistics").click()
    explorer.get_by_text("findings on").wait_for(timeout=60_000)
    assert 'class="ckptview-banner-error"' not in explorer.inner_html()
    explorer.get_by_text("std and abs-max per tensor by depth").first.wait_for(timeout=30_000)
    page.screenshot(path=str(ARTIFACTS / "lab-onnx-statistics.png"))


@pytest.fixture(scope="module")
def gguf_notebook(workdir: Path) -> str:
    """A notebook opening the explorer on a GGUF file of Q8_0, Q4_0, Q4_K and F16 tensors (tests/test_gguf.py)."""
    from test_gguf import write_model

    path = write_model(workdir / "llama.gguf")
    return write_notebook(workdir, "gguf.ipynb", f"import ckptview\nckptview.explore({str(path)!r})")


def test_explorer_on_a_gguf_file(lab: str, gguf_notebook: str, page) -> None:
    run_notebook(page, lab.replace("explore.ipynb", gguf_notebook))
    explorer = page.locator(".ckptview-explorer:visible").first
    explorer.wait_for(timeout=90_000)
    explorer.get_by_text("parameters by module").first.wait_for(timeout=30_000)
    overview = explorer.inner_text()
    assert "llama.gguf" in overview and "gguf" in overview and "error" not in overview.lower()
    assert "tokenizer.ggml.tokens" in overview and "300 × string" in overview  # the metadata table
    page.screenshot(path=str(ARTIFACTS / "lab-gguf-overview.png"), full_page=True)

    tab(explorer, "Tensors").click()
    regex = explorer.locator("input[placeholder^='name regex']")
    regex.fill(r"attn_v")
    regex.press("Enter")
    explorer.get_by_text(count_label(3)).wait_for(timeout=30_000)
    click_row(explorer, 0)
    explorer.get_by_text("histogram of blk.0.attn_v.weight").first.wait_for(timeout=30_000)
    text = explorer.inner_text()
    assert "Q4_K" in text and "attention.v" in text and "float32 (stored as Q4_K)" in text
    page.screenshot(path=str(ARTIFACTS / "lab-gguf-tensors.png"), full_page=True)

    tab(explorer, "Statistics").click()
    explorer.get_by_text("findings on").wait_for(timeout=60_000)
    assert 'class="ckptview-banner-error"' not in explorer.inner_html()
    explorer.get_by_text("std and abs-max per tensor by depth").first.wait_for(timeout=30_000)
    page.screenshot(path=str(ARTIFACTS / "lab-gguf-statistics.png"), full_page=True)


@pytest.fixture(scope="module")
def pt2_notebook(workdir: Path) -> str:
    """A notebook opening the explorer on a torch.export program of the demo CNN (tests/test_pt2.py)."""
    import torch
    from torch.export import Dim

    from conftest import SmallCNN
    from test_pt2 import _export

    torch.manual_seed(0)
    path = _export(SmallCNN().eval(), (torch.randn(2, 3, 16, 16),), workdir / "cnn.pt2",
                   dynamic_shapes={"x": {0: Dim("batch", min=1, max=64)}})
    return write_notebook(workdir, "pt2.ipynb", f"import ckptview\nckptview.explore({str(path)!r})")


def test_explorer_on_a_torch_export_program(lab: str, pt2_notebook: str, page) -> None:
    run_notebook(page, lab.replace("explore.ipynb", pt2_notebook))
    explorer = page.locator(".ckptview-explorer:visible").first
    explorer.wait_for(timeout=90_000)
    explorer.get_by_text("parameters by module").first.wait_for(timeout=30_000)
    overview = explorer.inner_text()
    assert "cnn.pt2" in overview and "pt2" in overview and "error" not in overview.lower()
    # the program's inputs and ops, from its graph, in the metadata table
    assert "x: float32[2, 3, 16, 16]" in overview and "conv2d 2" in overview
    page.screenshot(path=str(ARTIFACTS / "lab-pt2-overview.png"), full_page=True)

    tab(explorer, "BatchNorm").click()
    explorer.get_by_text("running_stats_never_updated").first.wait_for(timeout=30_000)
    page.set_viewport_size({"width": 640, "height": 900})
    # beside the file browser the panel is ~250 px: every finding's cells, its meaning too, lie inside it
    # (a table scrolled sideways left the meaning off the screen and each row a column of single words)
    page.wait_for_timeout(500)
    cells = explorer.evaluate("""explorer => [...explorer.querySelectorAll('.ckptview-cards td')]
        .filter(td => td.offsetParent !== null).map(td => {
            const cell = td.getBoundingClientRect(), box = td.closest('.widget-html-content').getBoundingClientRect();
            return {label: td.dataset.label, text: td.innerText.slice(0, 40), width: cell.width,
                    right: cell.right, box: box.right};
        })""")
    meanings = [cell for cell in cells if cell["label"] == "what it means"]
    assert meanings and all(cell["width"] > 100 for cell in meanings), cells
    assert all(cell["right"] <= cell["box"] + 1 for cell in cells), cells
    page.screenshot(path=str(ARTIFACTS / "lab-pt2-batchnorm-narrow.png"), full_page=True)
    page.set_viewport_size({"width": 1400, "height": 1000})  # as the next test expects it
    page.wait_for_timeout(1500)  # and JupyterLab saves that layout, which the next notebook opened restores


def set_theme(page, name: str) -> None:
    """Switch JupyterLab's theme from its Settings menu, as a user would, and wait until the page wears it."""
    page.locator(".lm-MenuBar-item", has_text=re.compile("^Settings$")).first.click()
    page.locator(".lm-Menu-itemLabel", has_text=re.compile("^Theme$")).first.hover()
    page.locator(".lm-Menu-itemLabel", has_text=re.compile(f"^{re.escape(name)}$")).first.click()
    light = "true" if "Light" in name else "false"
    page.wait_for_function(f"document.body.dataset.jpThemeLight === '{light}'", timeout=30_000)
    page.wait_for_timeout(500)


def make_room_for_the_notebook(page) -> None:
    """At a narrow width, fold the file browser away when it leaves the notebook under 200 px. JupyterLab saves
    its layout (the file browser's share of the window) as tests resize the page, and restores it when the next
    test opens a notebook: a share saved at 640 px leaves a 640 px page no room for the notebook at all."""
    page.wait_for_timeout(1200)  # Lumino relayouts on the window's resize event
    widths = page.locator(".jp-NotebookPanel:visible").evaluate_all("ps => ps.map(p => p.getBoundingClientRect().width)")
    if not widths or max(widths) < 200:
        page.locator(".jp-SideBar.jp-mod-left .lm-TabBar-tab.lm-mod-current").first.click()
        page.wait_for_timeout(1200)


PLOT_BOXES = """explorer => [...explorer.querySelectorAll('.js-plotly-plot')].filter(p => p.offsetParent !== null).map(p => {
    const plot = p.getBoundingClientRect(), box = p.closest('.ckptview-plot-box').getBoundingClientRect();
    const svg = p.querySelector('.main-svg').getBoundingClientRect();
    const tick = p.querySelector('g[class*="tick"] > text, .gtitle');
    const title = p.closest('.ckptview-plot-box').querySelector('.ckptview-plot-title');  // a treemap has no ticks
    return {plot: [plot.left, plot.right], svg: [svg.left, svg.right], box: [box.left, box.right],
            view: explorer.getBoundingClientRect().right,
            fill: tick ? getComputedStyle(tick).fill : title ? getComputedStyle(title).color : ''};
})"""


def luminance(css_colour: str) -> float:
    red, green, blue = (int(v) for v in re.findall(r"\d+", css_colour)[:3])
    return (0.2126 * red + 0.7152 * green + 0.0722 * blue) / 255


def fitting_plots(root, theme: str, width: int, *where: object) -> list[dict]:
    """The visible plots under `root`, each checked to fit its box and the view at `width` with axis
    text readable on `theme`'s background."""
    boxes = root.evaluate(PLOT_BOXES)
    for box in boxes:
        at = (theme, width, *where, box)
        assert box["svg"][1] <= box["box"][1] + 1 and box["plot"][1] <= box["box"][1] + 1, at
        assert box["box"][1] <= box["view"] + 1 and box["svg"][1] <= width, at
        assert (luminance(box["fill"]) < 0.5) == ("Light" in theme), at
    return boxes


def test_plots_fit_their_boxes_in_light_and_dark_at_1280_and_640(lab: str, page) -> None:
    run_notebook(page, lab)
    # the notebook's first explorer (training.pt) by its place in this notebook: the first *visible* one
    # depends on how far a restored layout left the notebook scrolled (CI once got the next cell's)
    explorer = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .ckptview-explorer").first
    explorer.wait_for(timeout=90_000)
    explorer.scroll_into_view_if_needed()
    page.get_by_text("parameters by module").first.wait_for(timeout=30_000)
    tab(explorer, "Tensors").click()
    explorer.get_by_text(EVERY_ROW).first.wait_for(timeout=60_000)
    click_row(explorer, 0)
    # the first histogram of the session pays the plotting imports: over 30 s on 2 loaded cores (a CI run beside
    # a fuzzer), as the Statistics tab's first figure below
    page.get_by_text("histogram of model_state_dict.conv1.weight").first.wait_for(timeout=60_000)
    tab(explorer, "Statistics").click()
    page.get_by_text("std and abs-max per tensor by depth").first.wait_for(timeout=60_000)
    tab(explorer, "BatchNorm").click()
    page.get_by_text("BatchNorm running statistics per layer").first.wait_for(timeout=30_000)
    checked = 0
    try:
        for theme in ("JupyterLab Light", "JupyterLab Dark"):
            set_theme(page, theme)
            for width in (1280, 640):
                page.set_viewport_size({"width": width, "height": 900})
                make_room_for_the_notebook(page)
                for title in ("Overview", "Tensors", "Statistics", "BatchNorm"):
                    tab(explorer, title).click()
                    page.wait_for_timeout(1200)  # plotly relayouts on the window's resize event
                    boxes = fitting_plots(explorer, theme, width, title)
                    assert boxes, (theme, width, title)
                    checked += len(boxes)
                    shot = f"lab-{'dark' if 'Dark' in theme else 'light'}-{width}-{title.lower()}.png"
                    explorer.locator(".js-plotly-plot:visible").first.scroll_into_view_if_needed()
                    page.screenshot(path=str(ARTIFACTS / shot))
    finally:
        set_theme(page, "JupyterLab Light")
        page.set_viewport_size({"width": 1400, "height": 1000})
    assert checked >= 4 * 2 * 2


@pytest.fixture(scope="module")
def deploy_notebook(workdir: Path) -> str:
    """A notebook opening the explorer on the demo CNN's state dict with the demo's model factory (Deploy needs one)."""
    code = f"import ckptview\nckptview.explore({str(workdir / 'demo' / 'cnn.pt')!r}, model='ckptview.demo:build_model')"
    return write_notebook(workdir, "deploy.ipynb", code)


def test_deploy_tab_runs_a_trace_check(lab: str, deploy_notebook: str, page) -> None:
    run_notebook(page, lab.replace("explore.ipynb", deploy_notebook))
    explorer = page.locator(".ckptview-explorer:visible").first
    explorer.wait_for(timeout=90_000)
    set_theme(page, "JupyterLab Light")  # the plots test switches themes; settings outlive its page
    tab(explorer, "Deploy").click()
    explorer.get_by_text("Run exports the model").wait_for(timeout=60_000)
    # trace only: it takes about a second on the demo CNN, ONNX and script many more
    for target in ("onnx", "script"):
        explorer.get_by_role("checkbox", name=target, exact=True).uncheck()
    explorer.get_by_role("button", name="Run").click()  # not exact: the play icon is part of its name
    explorer.get_by_text("every export matches eager PyTorch").wait_for(timeout=120_000)
    results = explorer.locator("table.ckptview-table", has_text="exported and run by").first
    rows = [row.locator("td").all_inner_texts() for row in results.locator("tbody tr").all()]
    assert len(rows) == 1 and rows[0][:2] == ["trace", "ok"] and rows[0][-1] == "torch.jit.trace", rows
    assert float(rows[0][2]) < 1e-5  # max |diff| against eager
    assert explorer.locator("input[placeholder^='from the first layer']").input_value() == "1,3,224,224"
    page.screenshot(path=str(ARTIFACTS / "lab-light-1280-deploy.png"))
    # this table's own node: after the relayout a `:visible` lookup can land on another notebook's explorer
    table_node = results.element_handle()
    try:
        page.set_viewport_size({"width": 640, "height": 900})
        make_room_for_the_notebook(page)
        widths = ("t => [t, t.closest('.ckptview-explorer'), t.closest('.jp-NotebookPanel')]"
                  ".map(e => e.getBoundingClientRect().width)")
        table_node.scroll_into_view_if_needed()
        page.screenshot(path=str(ARTIFACTS / "lab-light-640-deploy.png"))
        # the table scrolls inside the explorer, which stays inside the notebook (widths, so a horizontal
        # scroll of the notebook cannot hide an overflow); a hidden notebook (width 0) would prove nothing
        table, explorer_width, notebook = table_node.evaluate(widths)
        assert 200 <= notebook <= 640 and table > 0, (table, explorer_width, notebook)
        assert table <= explorer_width + 1 <= notebook + 1, (table, explorer_width, notebook)
    finally:
        page.set_viewport_size({"width": 1400, "height": 1000})


@pytest.fixture(scope="module")
def tf_notebook(workdir: Path) -> str:
    """A notebook opening the explorer on the trained Keras 3 .h5 (BatchNormalization, Adam state) and on the
    converter's int8 TFLite model: the committed fixtures TensorFlow made (tests/fixtures/tf/)."""
    fixtures = ROOT / "tests" / "fixtures" / "tf"
    return write_notebook(workdir, "tf_formats.ipynb", *(f"import ckptview\nckptview.explore({str(fixtures / name)!r})"
                                                         for name in ("keras3_trained.h5", "int8.tflite")))


def show_rows(explorer, pattern: str, rows: int) -> None:
    """Filter the Tensors tab by a name regex, wait for `rows` rows, and select the first."""
    regex = explorer.locator("input[placeholder^='name regex']")
    regex.fill(pattern)
    regex.press("Enter")
    explorer.get_by_text(count_label(rows)).wait_for(timeout=30_000)
    click_row(explorer, 0)


def test_explorer_on_keras_h5_and_int8_tflite(lab: str, tf_notebook: str, page) -> None:
    run_notebook(page, lab.replace("explore.ipynb", tf_notebook))
    keras = page.locator(".ckptview-explorer:visible").first
    keras.wait_for(timeout=90_000)
    keras.get_by_text("parameters by module").first.wait_for(timeout=30_000)
    overview = keras.inner_text()
    assert "keras3_trained.h5" in overview and "keras-h5" in overview and "no foreign code needed" in overview
    assert "model_weights" in overview and "optimizer_weights" in overview  # weights and Adam's state, as sections
    assert 'class="ckptview-banner-error"' not in keras.inner_html()
    keras.screenshot(path=str(ARTIFACTS / "lab-keras-overview.png"))
    keras.get_by_text("parameters by module").first.scroll_into_view_if_needed()  # below the model's config
    page.screenshot(path=str(ARTIFACTS / "lab-keras-overview-treemap.png"))

    tab(keras, "Tensors").click()
    show_rows(keras, r"^model_weights\.bn\.", 4)  # gamma, beta, moving_mean, moving_variance
    assert "model_weights.bn.moving_variance" in [row["tensor"] for row in grid_rows(keras, "tensors")]
    keras.get_by_text("histogram of model_weights.bn.gamma").first.wait_for(timeout=30_000)
    assert "BatchNorm" in keras.inner_text()
    keras.screenshot(path=str(ARTIFACTS / "lab-keras-tensors.png"))

    tab(keras, "Statistics").click()
    keras.get_by_text("findings on").first.wait_for(timeout=60_000)
    keras.get_by_text("std and abs-max per tensor by depth").first.wait_for(timeout=30_000)
    assert "28 tensors" in keras.inner_text() and "No outliers" in keras.inner_text()
    keras.screenshot(path=str(ARTIFACTS / "lab-keras-statistics.png"))

    tab(keras, "BatchNorm").click()
    keras.get_by_text("BatchNorm running statistics per layer").first.wait_for(timeout=30_000)
    text = keras.inner_text()
    # trained for 3 steps: moving statistics updated, nothing wrong (the untrained file's check is in test_keras.py)
    assert "1 BatchNorm layers" in text and "0 error, 0 warning" in text and "look healthy" in text
    keras.screenshot(path=str(ARTIFACTS / "lab-keras-batchnorm.png"))

    tflite = page.locator(".ckptview-explorer:visible").nth(1)
    tflite.scroll_into_view_if_needed()
    tflite.get_by_text("parameters by module").first.wait_for(timeout=60_000)
    overview = tflite.inner_text()
    assert "int8.tflite" in overview and "tflite" in overview and "FULLY_CONNECTED ×2, CONV_2D ×1" in overview
    assert "folds BatchNorm into the convolution" in overview
    tflite.screenshot(path=str(ARTIFACTS / "lab-tflite-overview.png"))

    tab(tflite, "Tensors").click()
    show_rows(tflite, r"MatMul$", 2)  # the two fully-connected weights, int8 per channel
    tflite.get_by_text("histogram of small_cnn_1/logits_1/MatMul").first.wait_for(timeout=30_000)
    assert "float32 (stored as int8)" in tflite.inner_text() and "Linear" in tflite.inner_text()
    tflite.screenshot(path=str(ARTIFACTS / "lab-tflite-tensors.png"))

    tab(tflite, "Statistics").click()
    tflite.get_by_text("findings on").first.wait_for(timeout=60_000)
    tflite.get_by_text("std and abs-max per tensor by depth").first.wait_for(timeout=30_000)
    assert "9 tensors" in tflite.inner_text() and 'class="ckptview-banner-error"' not in tflite.inner_html()
    tflite.screenshot(path=str(ARTIFACTS / "lab-tflite-statistics.png"))

    tab(tflite, "BatchNorm").click()
    tflite.get_by_text("No BatchNorm layers").first.wait_for(timeout=30_000)  # folded by the converter
    tflite.screenshot(path=str(ARTIFACTS / "lab-tflite-batchnorm.png"))


@pytest.fixture(scope="module")
def optimizer_notebook(workdir: Path) -> str:
    """A notebook opening the explorer on an AdamW state_dict saved on its own, as Hugging Face's Trainer saves
    optimizer.pt beside the model."""
    import torch

    from conftest import SmallCNN

    torch.manual_seed(0)
    model = SmallCNN()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        model(torch.randn(4, 3, 16, 16)).sum().backward()
        optimizer.step()
    torch.save(optimizer.state_dict(), workdir / "optimizer.pt")
    return write_notebook(workdir, "optimizer.ipynb", f"import ckptview\nckptview.explore({str(workdir / 'optimizer.pt')!r})")


def test_training_tab_on_an_optimizer_saved_on_its_own(lab: str, optimizer_notebook: str, page) -> None:
    run_notebook(page, lab.replace("explore.ipynb", optimizer_notebook))
    explorer = page.locator(".ckptview-explorer:visible").first
    explorer.wait_for(timeout=90_000)
    tab(explorer, "Training state").click()
    explorer.get_by_text("AdamW").first.wait_for(timeout=60_000)
    text = explorer.inner_text()
    assert "Optimizer <root>: AdamW" in text and "weights only" not in text, text[:2000]
    try:
        for theme in ("JupyterLab Light", "JupyterLab Dark"):
            set_theme(page, theme)
            for width in (1400, 640):
                page.set_viewport_size({"width": width, "height": 900})
                page.wait_for_timeout(1200)
                assert fitting_plots(explorer, theme, width, "Training state")  # the moments per parameter
                explorer.locator(".js-plotly-plot:visible").first.scroll_into_view_if_needed()
                page.screenshot(path=str(ARTIFACTS / f"lab-{'dark' if 'Dark' in theme else 'light'}-{width}-optimizer.png"))
    finally:
        set_theme(page, "JupyterLab Light")
        page.set_viewport_size({"width": 1400, "height": 1000})
