"""
How quickly the explorer answers in a real browser: headless Chromium against JupyterLab on
127.0.0.1, a warm kernel (one explorer already shown in it, so imports and compiled kernels are
paid), the demo's training checkpoint. Each figure is the time from the user's action to the
drawn result on the page (not the kernel's computation alone):

  * cell run -> explorer header shown, and -> Overview treemap drawn;
  * each tab's first click -> its first content (grid, plot or table);
  * a row click in the Tensors grid -> that tensor's histogram drawn (median of several rows).

    python bench/browser_bench.py [--rounds 3]

Needs /usr/bin/chromium (apt-get install -y chromium) and the `lab` extra; the server, notebook and
click helpers are the browser tests' own (tests/test_browser.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from test_browser import CHROMIUM, CHROMIUM_ARGS, click_row, jupyter_lab, run_notebook, tab  # noqa: E402

# What shows that a tab has its first content: a drawn plot, a grid, or a table.
FIRST_CONTENT = {
    "Tensors": ".ckptview-table-grid .lm-DataGrid",
    "Module tree": ".ckptview-table-grid .lm-DataGrid",
    "Statistics": ".js-plotly-plot .main-svg",
    "BatchNorm": ".js-plotly-plot .main-svg",
    "Training state": "h4:has-text('Optimizer')",
}


def _notebook(folder: Path, path: Path) -> str:
    import nbformat

    source = f"import ckptview\nckptview.explore({str(path)!r})"
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source), nbformat.v4.new_code_cell(source)])
    notebook.metadata["kernelspec"] = json.loads((ROOT / "notebooks" / "explore.ipynb").read_text())["metadata"]["kernelspec"]
    nbformat.write(notebook, folder / "bench.ipynb")
    return "bench.ipynb"


def _visible(explorer, selector: str):  # noqa: ANN001, ANN202
    return explorer.locator(selector).locator("visible=true").first


def measure(page, url: str, rounds: int) -> dict[str, list[float]]:  # noqa: ANN001
    run_notebook(page, url)  # both cells: the first warms the kernel
    panel = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)")
    panel.locator(".ckptview-explorer").nth(1).wait_for(timeout=120_000)
    figures: dict[str, list[float]] = {}
    for _ in range(rounds):
        cell = panel.locator(".jp-CodeCell").nth(1)
        cell.locator(".ckptview-explorer").first.evaluate("element => { element.dataset.benchOld = '1' }")
        cell.locator(".jp-InputArea-editor").click()
        page.wait_for_timeout(300)
        start = time.monotonic()
        page.keyboard.press("Control+Enter")
        explorer = cell.locator(".ckptview-explorer:not([data-bench-old])").first
        explorer.wait_for(timeout=60_000)
        figures.setdefault("cell run -> header", []).append(time.monotonic() - start)
        _visible(explorer, ".js-plotly-plot .treemaplayer").wait_for(timeout=60_000)
        figures.setdefault("cell run -> Overview treemap drawn", []).append(time.monotonic() - start)
        for title, selector in FIRST_CONTENT.items():
            start = time.monotonic()
            tab(explorer, title).click()
            _visible(explorer, selector).wait_for(timeout=60_000)
            figures.setdefault(f"{title} tab -> first content", []).append(time.monotonic() - start)
        tab(explorer, "Tensors").click()
        shown = ""
        for row in range(4):
            start = time.monotonic()
            click_row(explorer, row)
            # the histogram's title names its tensor: a new title is the clicked row's plot, drawn
            shown = page.wait_for_function(
                """([root, before]) => [...root.querySelectorAll('.js-plotly-plot .gtitle')]
                       .map(t => t.textContent).find(t => t.startsWith('histogram of') && t !== before)""",
                arg=[explorer.element_handle(), shown], timeout=30_000).json_value()
            figures.setdefault("row click -> histogram drawn", []).append(time.monotonic() - start)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    from ckptview.demo import write_samples

    with tempfile.TemporaryDirectory(prefix="ckptview-browser-bench-") as tmp:
        folder = Path(tmp)
        write_samples(folder / "demo")
        (folder / "jupyter-config" / "labconfig").mkdir(parents=True)
        name = _notebook(folder, folder / "demo" / "training.pt")
        with jupyter_lab(folder, name) as url, sync_playwright() as playwright:
            chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            page = chromium.new_page(viewport={"width": 1280, "height": 800})
            figures = measure(page, url, args.rounds)
            chromium.close()
    print(f"{'what (demo training.pt, JupyterLab, warm kernel, 1280x800)':<48} {'median':>8} {'min':>7} {'max':>7}  runs")
    for label, values in figures.items():
        print(f"{label:<48} {statistics.median(values):7.2f}s {min(values):6.2f}s {max(values):6.2f}s  {len(values)}")


if __name__ == "__main__":
    main()
