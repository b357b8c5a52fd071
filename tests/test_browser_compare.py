"""
The Training state and Compare tabs in a real browser (JupyterLab on 127.0.0.1, headless Chromium, the
servers and helpers of tests/test_browser.py): the learning-rate schedule and the moments plot fit
their boxes in light and dark at 1280 and 640 px; "Copy fix code" puts the code on the clipboard;
"Save fixed checkpoint" writes a file; a notebook saved with widget state shows its explorer again
after a reload. Screenshots: test-artifacts/compare-*.png, training-*.png, reload-*.png.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from test_browser import (  # noqa: F401 - fixtures are used by name
    ARTIFACTS,
    EVERY_ROW,
    ROOT,
    browser,
    click_row,
    fitting_plots,
    free_port,
    lab,
    page,
    run_notebook,
    server_env,
    set_theme,
    tab,
    wait_for_http,
    workdir,
)

pytestmark = pytest.mark.browser

WIDGET_ERRORS = re.compile("Error displaying widget|model not found|Failed to initialize model")


def write_notebook(folder: Path, name: str, *codes: str) -> str:
    import nbformat

    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code) for code in codes])
    notebook.metadata["kernelspec"] = json.loads((ROOT / "notebooks" / "explore.ipynb").read_text())["metadata"]["kernelspec"]
    nbformat.write(notebook, folder / name)
    return name


@pytest.fixture(scope="module")
def compare_notebook(workdir: Path) -> str:  # noqa: F811 - the fixture imported above
    demo = workdir / "demo"
    return write_notebook(workdir, "compare.ipynb",
                          f"import ckptview\nckptview.explore({str(demo / 'training.pt')!r})",
                          f"ckptview.explore({str(demo / 'cnn_dataparallel.pt')!r}, model='ckptview.demo:build_model')")


def test_training_and_compare_tabs_fit_in_light_and_dark_at_1280_and_640(lab: str, compare_notebook: str, page) -> None:  # noqa: F811
    run_notebook(page, lab.replace("explore.ipynb", compare_notebook))
    explorer = page.locator(".ckptview-explorer:visible").first
    explorer.wait_for(timeout=90_000)
    tab(explorer, "Training state").click()
    explorer.get_by_text("LR scheduler 0: StepLR").wait_for(timeout=60_000)
    explorer.get_by_text("learning-rate schedule", exact=True).first.wait_for(timeout=30_000)
    explorer.get_by_text("optimizer moments per parameter", exact=True).first.wait_for(timeout=30_000)
    assert "inferred from its fields" in explorer.inner_text() and "_get_lr_called_within_step" not in explorer.inner_text()
    tab(explorer, "Compare").click()
    explorer.locator("select").filter(has_text="files next to this one").select_option(label="cnn_dataparallel.pt")
    explorer.get_by_role("button", name="Compare").click()
    explorer.get_by_text("strip_prefix").wait_for(timeout=60_000)
    explorer.get_by_role("button", name="Compute value diff").click()
    explorer.get_by_text("32 tensors compared, 0 differ").wait_for(timeout=60_000)
    checked = 0
    try:
        for theme in ("JupyterLab Light", "JupyterLab Dark"):
            set_theme(page, theme)
            for width in (1280, 640):
                page.set_viewport_size({"width": width, "height": 900})
                for title, shot in (("Training state", "training"), ("Compare", "compare")):
                    tab(explorer, title).click()
                    page.wait_for_timeout(1200)  # plotly relayouts on the window's resize event
                    boxes = fitting_plots(explorer, theme, width, title)
                    assert boxes, (theme, width, title)
                    checked += len(boxes)
                    mode = "dark" if "Dark" in theme else "light"
                    explorer.locator(".js-plotly-plot:visible").first.scroll_into_view_if_needed()
                    page.screenshot(path=str(ARTIFACTS / f"{shot}-{mode}-{width}.png"))
                    if title == "Compare":
                        explorer.get_by_text("Copy fix code").scroll_into_view_if_needed()
                        page.screenshot(path=str(ARTIFACTS / f"{shot}-{mode}-{width}-fix.png"))
    finally:
        set_theme(page, "JupyterLab Light")
        page.set_viewport_size({"width": 1400, "height": 1000})
    assert checked >= 2 * 2 * 3  # schedule + moments on Training, the value diff on Compare


def test_copy_fix_code_and_save_fixed_checkpoint(lab: str, compare_notebook: str, workdir: Path, page) -> None:  # noqa: F811
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    run_notebook(page, lab.replace("explore.ipynb", compare_notebook))
    doctor = page.locator(".ckptview-explorer:visible").nth(1)
    doctor.wait_for(timeout=90_000)
    doctor.scroll_into_view_if_needed()
    tab(doctor, "Compare").click()
    doctor.get_by_text("strip_prefix").wait_for(timeout=60_000)
    code = doctor.locator("textarea").first.input_value()
    assert "consume_prefix_in_state_dict_if_present" in code
    doctor.get_by_role("button", name="Copy fix code").click()
    doctor.get_by_role("button", name="Copied").wait_for(timeout=10_000)
    assert page.evaluate("navigator.clipboard.readText()") == code
    target = workdir / "demo" / "cnn_dataparallel.fixed.pt"
    assert doctor.locator("input[placeholder='path of the fixed checkpoint']").input_value() == str(target)
    doctor.get_by_role("button", name="Save fixed checkpoint").click()
    doctor.get_by_text("Wrote").wait_for(timeout=60_000)
    assert str(target) in doctor.inner_text()
    from ckptview.demo import build_model

    build_model().load_state_dict(torch.load(target, weights_only=True), strict=True)
    page.screenshot(path=str(ARTIFACTS / "compare-saved.png"))


def test_copy_fix_code_in_voila(workdir: Path, compare_notebook: str, page) -> None:  # noqa: F811
    import subprocess
    import sys

    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    port = free_port()
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "voila"), compare_notebook, "--no-browser", f"--port={port}",
         "--Voila.ip=127.0.0.1"],
        cwd=workdir, env=server_env(workdir), stdout=subprocess.DEVNULL, stderr=(workdir / "voila.log").open("wb"))
    try:
        wait_for_http(f"http://127.0.0.1:{port}/", process, timeout=60)
        page.goto(f"http://127.0.0.1:{port}/", timeout=120_000)
        doctor = page.locator(".ckptview-explorer").nth(1)
        doctor.wait_for(timeout=120_000)
        doctor.scroll_into_view_if_needed()
        tab(doctor, "Compare").click()
        doctor.get_by_text("strip_prefix").wait_for(timeout=60_000)
        code = doctor.locator("textarea").first.input_value()
        doctor.get_by_role("button", name="Copy fix code").click()
        doctor.get_by_role("button", name="Copied").wait_for(timeout=10_000)
        assert page.evaluate("navigator.clipboard.readText()") == code and "consume_prefix" in code
        page.screenshot(path=str(ARTIFACTS / "voila-compare-copy.png"))
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def reload_notebook(workdir: Path) -> str:  # noqa: F811
    return write_notebook(workdir, "reload.ipynb",
                          f"import ckptview\nckptview.explore({str(workdir / 'demo' / 'training.pt')!r})")


def save_widget_state(web) -> None:
    """Settings › Save Widget State Automatically on (ticked once), then File › Save, as a user would."""
    web.locator(".lm-MenuBar-item", has_text=re.compile("^Settings$")).first.click()
    item = web.locator(".lm-Menu-item", has_text="Save Widget State Automatically").first
    if item.get_attribute("aria-checked") != "true":
        item.click()
    else:
        web.keyboard.press("Escape")
    web.locator(".lm-MenuBar-item", has_text=re.compile("^File$")).first.click()
    web.locator(".lm-Menu-itemLabel", has_text=re.compile("^Save Notebook$")).first.click()


DRAWN = """explorer => [...explorer.querySelectorAll('.js-plotly-plot')].filter(p => p.offsetParent !== null).map(p => {
    const plot = p.getBoundingClientRect(), box = p.closest('.ckptview-plot-box').getBoundingClientRect();
    return {height: plot.height, svg: p.querySelector('.main-svg').getBoundingClientRect().height,
            right: plot.right, box: box.right};
})"""


def assert_plots_drawn(explorer, count: int) -> None:
    """The visible plots take their figure's height and stay inside their box. A figure drawn while its
    output was restored off-screen kept a 0 px container (plotly positions its SVG absolutely) until the
    tab was switched or the window resized; present/html.py's CSS gives the container the SVG's height."""
    plots = explorer.evaluate(DRAWN)
    assert len(plots) == count, plots
    for plot in plots:
        assert plot["height"] >= plot["svg"] > 100 and plot["right"] <= plot["box"] + 1, plots


def explorer_after_reload(web, name: str):
    web.locator(".lm-TabBar-tab.lm-mod-current", has_text=name).first.wait_for(timeout=60_000)
    panel = web.locator(".jp-NotebookPanel:not(.lm-mod-hidden)")
    panel.locator(".jp-OutputArea-output").first.wait_for(timeout=60_000)
    web.wait_for_timeout(3000)  # the widget manager restores models after the outputs are drawn
    return panel


def test_saved_notebook_shows_its_explorer_after_a_reload(lab: str, reload_notebook: str, workdir: Path, page) -> None:  # noqa: F811
    run_notebook(page, lab.replace("explore.ipynb", reload_notebook))
    explorer = page.locator(".ckptview-explorer:visible").first
    explorer.wait_for(timeout=90_000)
    page.get_by_text("parameters by module").first.wait_for(timeout=30_000)
    tab(explorer, "Tensors").click()
    explorer.get_by_text(EVERY_ROW).first.wait_for(timeout=60_000)
    click_row(explorer, 0)
    page.get_by_text("histogram of model_state_dict.conv1.weight").first.wait_for(timeout=30_000)
    tab(explorer, "Training state").click()
    explorer.get_by_text("learning-rate schedule", exact=True).first.wait_for(timeout=60_000)
    tab(explorer, "Compare").click()
    explorer.locator("select").filter(has_text="files next to this one").select_option(label="cnn_dataparallel.pt")
    explorer.get_by_role("button", name="Compare").click()
    explorer.get_by_text("strip_prefix").wait_for(timeout=60_000)
    explorer.get_by_role("button", name="Compute value diff").click()
    explorer.get_by_text("32 tensors compared, 0 differ").wait_for(timeout=60_000)
    save_widget_state(page)
    page.wait_for_function(f"![...document.querySelectorAll('.lm-TabBar-tab.jp-mod-dirty')]"
                           f".some(t => t.textContent.includes({reload_notebook!r}))", timeout=30_000)
    saved = json.loads((workdir / reload_notebook).read_text())
    assert saved["metadata"]["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]

    # the kernel still runs: the page gets its live widgets back, on the tab that was open (Compare)
    page.reload()
    panel = explorer_after_reload(page, reload_notebook)
    explorer = panel.locator(".ckptview-explorer").first
    explorer.wait_for(timeout=60_000)
    assert not WIDGET_ERRORS.search(panel.inner_text()), panel.inner_text()[:2000]
    assert "training.pt" in explorer.inner_text()
    explorer.get_by_text("32 tensors compared, 0 differ").wait_for(timeout=30_000)
    explorer.get_by_role("button", name="Copy fix code").wait_for(timeout=30_000)  # the anywidget, restored
    explorer.get_by_text("value difference per module").first.wait_for(timeout=30_000)
    assert_plots_drawn(explorer, 1)  # before any tab switch or resize
    page.screenshot(path=str(ARTIFACTS / "reload-live-kernel.png"))
    tab(explorer, "Training state").click()
    explorer.get_by_text("learning-rate schedule", exact=True).first.wait_for(timeout=30_000)
    assert_plots_drawn(explorer, 2)

    # the kernel gone: what the saved widget state holds, never "model not found"
    page.locator(".lm-MenuBar-item", has_text=re.compile("^Kernel$")).first.click()
    page.locator(".lm-Menu-itemLabel", has_text=re.compile("^Shut Down Kernel$")).first.click()
    page.wait_for_timeout(2000)
    page.reload()
    panel = explorer_after_reload(page, reload_notebook)
    text = panel.inner_text()
    assert not WIDGET_ERRORS.search(text), text[:2000]
    explorer = panel.locator(".ckptview-explorer").first
    explorer.wait_for(timeout=60_000)
    assert "training.pt" in explorer.inner_text() and "32 tensors compared, 0 differ" in explorer.inner_text()
    copy = explorer.get_by_role("button", name="Copy fix code")
    copy.wait_for(timeout=30_000)
    assert_plots_drawn(explorer, 1)  # the tab open when the notebook was saved, before any switch
    copy.scroll_into_view_if_needed()
    page.screenshot(path=str(ARTIFACTS / "reload-no-kernel.png"))
    tab(explorer, "Training state").click()  # tabs switch in the page, without a kernel
    explorer.get_by_text("learning-rate schedule", exact=True).first.wait_for(timeout=30_000)
    assert "LR scheduler 0: StepLR" in explorer.inner_text()
    assert_plots_drawn(explorer, 2)
    page.screenshot(path=str(ARTIFACTS / "reload-no-kernel-training.png"))
