"""
The Run view (`ckptview.explore_run`) in a real browser: JupyterLab on 127.0.0.1 with headless Chromium, the
servers and helpers of tests/test_browser.py, on a small CNN really trained and saved every epoch until its
learning rate is raised and it diverges (tests/test_run.py). The metrics plot and the drift heatmap are drawn
and fit their boxes in light and dark at 1280 and 640 px, the NaN onset is marked on both, and choosing a
checkpoint opens the single-checkpoint explorer below the run. Screenshots: test-artifacts/run-*.png.
"""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest

from test_browser import (  # noqa: F401 - fixtures are used by name
    ARTIFACTS, ROOT, browser, fitting_plots, lab, page, run_notebook, set_theme, workdir,
)
from test_run import DIVERGE_AT, EPOCHS, _train

pytestmark = pytest.mark.browser

# The NaN onset line of both figures: plotly draws `add_vline` as a shape path and its annotation as text.
ONSET = """view => [...view.querySelectorAll('.js-plotly-plot')].filter(p => p.offsetParent !== null).map(p => ({
    title: (p.closest('.ckptview-plot-box').querySelector('.ckptview-plot-title') || {}).textContent || '',
    labels: [...p.querySelectorAll('.annotation-text')].map(t => t.textContent),
    lines: [...p.querySelectorAll('.shapelayer path')].filter(s => getComputedStyle(s).stroke === 'rgb(217, 48, 37)').length,
}))"""


@pytest.fixture(scope="module")
def run_view_notebook(workdir: Path) -> str:  # noqa: F811 - the fixture imported above
    folder = workdir / "cnn-run"
    folder.mkdir()
    _train(folder)
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        f"import ckptview\nckptview.explore_run({str(folder)!r}, cache=False)")])
    notebook.metadata["kernelspec"] = json.loads((ROOT / "notebooks" / "explore.ipynb").read_text())["metadata"]["kernelspec"]
    nbformat.write(notebook, workdir / "run.ipynb")
    return "run.ipynb"


def test_run_view_plots_fit_onset_is_marked_and_a_checkpoint_opens(lab: str, run_view_notebook: str, page) -> None:  # noqa: F811
    run_notebook(page, lab.replace("explore.ipynb", run_view_notebook))
    view = page.locator(".ckptview-explorer:visible").first
    view.wait_for(timeout=90_000)
    view.get_by_text(f"{EPOCHS} checkpoints").first.wait_for(timeout=60_000)
    page.get_by_text("metrics over the run").first.wait_for(timeout=120_000)
    page.get_by_text("weight change per module").first.wait_for(timeout=30_000)
    text = view.inner_text()
    assert "NaN/Inf first in" in text and f"epoch_{DIVERGE_AT}.pt" in text and "best:" in text

    onset = view.evaluate(ONSET)
    assert [o["title"] for o in onset] == ["metrics over the run", "weight change per module"]
    for plot in onset:  # each figure: the dashed red line at the onset epoch and its "NaN/Inf" label
        assert plot["labels"].count("NaN/Inf") == 1 and plot["lines"] == 1, plot

    checked = 0
    try:
        for theme in ("JupyterLab Light", "JupyterLab Dark"):
            set_theme(page, theme)
            for width in (1280, 640):
                page.set_viewport_size({"width": width, "height": 900})
                page.wait_for_timeout(1200)  # plotly relayouts on the window's resize event
                boxes = fitting_plots(view, theme, width)
                assert len(boxes) == 2, (theme, width, boxes)
                checked += len(boxes)
                name = f"run-{'dark' if 'Dark' in theme else 'light'}-{width}"
                view.locator(".js-plotly-plot:visible").first.scroll_into_view_if_needed()
                page.screenshot(path=str(ARTIFACTS / f"{name}-metrics.png"))
                view.locator(".js-plotly-plot:visible").nth(1).scroll_into_view_if_needed()
                page.screenshot(path=str(ARTIFACTS / f"{name}-heatmap.png"))
    finally:
        set_theme(page, "JupyterLab Light")
        page.set_viewport_size({"width": 1400, "height": 1000})
    assert checked == 2 * 2 * 2

    chosen = f"epoch_{DIVERGE_AT}.pt"
    view.locator("select").first.select_option(label=chosen)
    view.get_by_role("button", name="Open in explorer").click()
    inner = view.locator(".ckptview-explorer").first  # the single-checkpoint explorer, inside the run view
    inner.wait_for(timeout=60_000)
    inner.get_by_text("parameters by module").first.wait_for(timeout=60_000)
    header = inner.inner_text()
    assert chosen in header and "torch-zip" in header
    inner.scroll_into_view_if_needed()
    page.screenshot(path=str(ARTIFACTS / "run-opened-checkpoint.png"))
