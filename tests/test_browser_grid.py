"""
The explorer's data grid in a real browser (JupyterLab on 127.0.0.1, headless Chromium, the servers and
helpers of tests/test_browser.py): the Tensors grid shows the bytes column and its header menu sorts
by bytes, largest first; a click on a row shows that tensor; a module tree row opens its tensors;
the CSV download holds the rows; at 1280 and 640 px, light and dark. Screenshots: test-artifacts/grid-*.png.
"""

from __future__ import annotations

import csv
import io
import json
import re
import time
from pathlib import Path

import pytest
from test_browser import (  # noqa: F401
    ARTIFACTS,
    ROOT,
    browser,
    count_label,
    lab,
    luminance,
    page,
    run_notebook,
    set_theme,
    tab,
    workdir,
)

pytestmark = pytest.mark.browser

# In file order the largest tensor is neither first nor last, so a sort has to move it.
SIZES = {"embed.weight": (64, 8), "blocks.0.proj.weight": (48, 48), "blocks.0.norm.weight": (48,),
         "blocks.1.proj.weight": (300, 200), "blocks.1.norm.weight": (48,), "head.weight": (10, 48), "head.bias": (10,)}
LARGEST = "blocks.1.proj.weight"
POISONED = "blocks.0.norm.weight"  # holds a NaN: a click on its row marks it in the checks column


@pytest.fixture(scope="module")
def grid_notebook(workdir: Path) -> tuple[str, Path]:  # noqa: F811 - the fixture imported above
    import nbformat
    import torch

    torch.manual_seed(0)
    path = workdir / "grid.pt"
    state = {name: torch.randn(shape) for name, shape in SIZES.items()}
    state[POISONED][3] = float("nan")
    torch.save(state, path)
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(f"import ckptview\nckptview.explore({str(path)!r})")])
    notebook.metadata["kernelspec"] = json.loads((ROOT / "notebooks" / "explore.ipynb").read_text())["metadata"]["kernelspec"]
    nbformat.write(notebook, workdir / "grid.ipynb")
    return "grid.ipynb", path


def tensor_widths(path: Path) -> tuple[list[str], dict[str, int]]:
    """The Tensors grid's columns and the widths the kernel sends for them (the same code on the same file)."""
    from ckptview.ui import explore

    app = explore(path)
    panel = app.select("Tensors")
    panel.wait()
    columns, widths = list(panel.rows.frame.columns), dict(panel.rows.grid.column_widths)
    app.close()
    return columns, widths


def column_right(columns: list[str], widths: dict[str, int], column: str) -> int:
    return sum(widths[c] for c in columns[:columns.index(column) + 1])


def grid_pixel(grid, x: int, y: int) -> str:
    """The colour the grid paints at (x, y) of its box (a canvas: read from its pixels)."""
    return grid.evaluate(PIXEL, [x, y])


PIXEL = """(g, [x, y]) => { const canvas = g.querySelector('canvas'); const scale = window.devicePixelRatio || 1;
    const pixel = canvas.getContext('2d').getImageData(Math.round(x * scale), Math.round(y * scale), 1, 1).data;
    return `rgb(${pixel[0]}, ${pixel[1]}, ${pixel[2]})`; }"""


def grid_background(grid) -> str:
    """The colour of the grid's second row, left of its text."""
    from ckptview.ui.grid import HEADER_PX, ROW_PX

    return grid_pixel(grid, 6, HEADER_PX + ROW_PX * 3 // 2)


def test_grid_sorts_by_bytes_and_selects_rows_in_light_and_dark_at_1280_and_640(lab: str, grid_notebook, page) -> None:  # noqa: F811
    from ckptview.ui.grid import HEADER_PX, ROW_PX

    name, path = grid_notebook
    columns, widths = tensor_widths(path)
    run_notebook(page, lab.replace("explore.ipynb", name))
    explorer = page.locator(".ckptview-explorer:visible").first
    explorer.wait_for(timeout=90_000)
    tab(explorer, "Tensors").click()
    explorer.get_by_text(f"{len(SIZES)} of {len(SIZES)} tensors").wait_for(timeout=30_000)
    grid = explorer.locator(".ckptview-table-grid .lm-DataGrid").first
    grid.wait_for(timeout=30_000)
    page.wait_for_timeout(500)
    try:
        for theme in ("JupyterLab Light", "JupyterLab Dark"):
            set_theme(page, theme)
            shade = "dark" if "Dark" in theme else "light"
            for width in (1280, 640):
                page.set_viewport_size({"width": width, "height": 900})
                page.wait_for_timeout(1200)  # Lumino relayouts on the window's resize event
                notebook = explorer.evaluate("e => e.closest('.jp-NotebookPanel').getBoundingClientRect().width")
                if notebook < 400:
                    # the file browser leaves a 640 px page a 300 px notebook: fold it, as a user would
                    page.screenshot(path=str(ARTIFACTS / f"grid-{shade}-{width}-file-browser-open.png"))
                    page.locator(".jp-SideBar.jp-mod-left .lm-TabBar-tab.lm-mod-current").first.click()
                    page.wait_for_timeout(1200)
                tab(explorer, "Tensors").click()
                grid.scroll_into_view_if_needed()
                box = grid.bounding_box()
                # the bytes column is drawn inside the grid's box, not scrolled out of view
                assert box["width"] >= column_right(columns, widths, "bytes"), (theme, width, box, widths)
                background = luminance(grid_background(grid))
                assert (background < 0.5) == (shade == "dark"), (theme, width, background)
                page.screenshot(path=str(ARTIFACTS / f"grid-{shade}-{width}-tensors.png"))
    finally:
        set_theme(page, "JupyterLab Light")
        page.set_viewport_size({"width": 1400, "height": 1000})

    # the bytes header's menu (the funnel at its right end): Sort Descending puts the largest tensor first
    page.wait_for_timeout(1200)
    grid.scroll_into_view_if_needed()
    box = grid.bounding_box()
    page.mouse.click(box["x"] + column_right(columns, widths, "bytes") - 7, box["y"] + HEADER_PX - 7)
    page.get_by_text("Sort Descending").first.click()
    page.wait_for_timeout(500)
    grid.click(position={"x": 40, "y": HEADER_PX + ROW_PX // 2})  # the first row as drawn now
    explorer.get_by_text(f"histogram of {LARGEST}").first.wait_for(timeout=30_000)
    grid.scroll_into_view_if_needed()
    page.screenshot(path=str(ARTIFACTS / "grid-light-1280-sorted-by-bytes.png"))

    # Ctrl+C copies the selected row, tab-separated, as the grid draws it
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    page.keyboard.press("Control+c")
    copied = page.evaluate("navigator.clipboard.readText()")
    assert copied.split("\t")[:4] == [LARGEST, str(300 * 200 * 4), "[300, 200]", "float32"], copied

    # the CSV link downloads the table's rows, bytes as numbers
    with page.expect_download() as download:
        explorer.locator("a[download='tensors.csv']:visible").first.click()
    rows = list(csv.DictReader(io.StringIO(Path(download.value.path()).read_text())))
    assert download.value.suggested_filename == "tensors.csv"
    assert {row["tensor"]: int(row["bytes"]) for row in rows} == {
        name: 4 * torch_numel(shape) for name, shape in SIZES.items()}

    # a module tree row opens the Tensors tab on that module's tensors
    tab(explorer, "Module tree").click()
    explorer.get_by_text("click a module to list its tensors").wait_for(timeout=30_000)
    tree = explorer.locator(".ckptview-table-grid .lm-DataGrid:visible").first
    tree.wait_for(timeout=30_000)
    page.wait_for_timeout(500)
    page.screenshot(path=str(ARTIFACTS / "grid-light-1280-tree.png"))
    modules = [row["path"] for row in csv.DictReader(io.StringIO(_link_text(explorer, "modules.csv")))]
    tree.click(position={"x": 40, "y": HEADER_PX + ROW_PX * modules.index("head") + ROW_PX // 2})
    explorer.get_by_text("2 of 7 tensors").wait_for(timeout=30_000)
    assert explorer.locator("input[placeholder^='name regex']").input_value() == r"^head\."
    page.screenshot(path=str(ARTIFACTS / "grid-light-1280-tree-picked-head.png"))

    # a click on the NaN tensor's row marks its checks cell (one cell sent, drawn on a red badge)
    regex = explorer.locator("input[placeholder^='name regex']")
    regex.fill(f"^{POISONED}$")
    regex.press("Enter")
    explorer.get_by_text(f"1 of {len(SIZES)} tensors").wait_for(timeout=30_000)
    grid = explorer.locator(".ckptview-table-grid .lm-DataGrid:visible").first
    page.wait_for_timeout(500)
    badge = (column_right(columns, widths, "checks") - 6, HEADER_PX + ROW_PX // 2)
    assert grid_pixel(grid, *badge) == grid_pixel(grid, 6, HEADER_PX + ROW_PX // 2)  # no mark yet
    grid.click(position={"x": 40, "y": HEADER_PX + ROW_PX // 2})
    explorer.get_by_text(f"histogram of {POISONED}").first.wait_for(timeout=30_000)
    page.wait_for_timeout(500)
    red, green, _ = (int(v) for v in re.findall(r"\d+", grid_pixel(grid, *badge)))
    assert red > green + 30, grid_pixel(grid, *badge)
    grid.scroll_into_view_if_needed()
    page.screenshot(path=str(ARTIFACTS / "grid-light-1280-nan-checked.png"))


def torch_numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _link_text(explorer, file_name: str) -> str:
    import base64

    href = explorer.locator(f"a[download='{file_name}']:visible").first.get_attribute("href")
    return base64.b64decode(href.split(",", 1)[1]).decode()


@pytest.fixture(scope="module")
def many_notebook(workdir: Path) -> str:  # noqa: F811
    """A notebook opening the explorer on 20,000 small tensors (2,000 blocks of 10 layers)."""
    import nbformat
    import torch

    path = workdir / "many.pt"
    torch.save({f"blocks.{i}.layer{j}.weight": torch.zeros(4, 4) for i in range(2000) for j in range(10)}, path)
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        f"import ckptview\napp = ckptview.explore({str(path)!r})\napp.select('Tensors')\napp")])
    notebook.metadata["kernelspec"] = json.loads((ROOT / "notebooks" / "explore.ipynb").read_text())["metadata"]["kernelspec"]
    nbformat.write(notebook, workdir / "many.ipynb")
    return "many.ipynb"


def test_20000_rows_show_scroll_and_filter_in_the_browser(lab: str, many_notebook: str, page) -> None:  # noqa: F811
    from ckptview.ui.grid import HEADER_PX, ROW_PX

    run_notebook(page, lab.replace("explore.ipynb", many_notebook))
    start = time.monotonic()
    explorer = page.locator(".ckptview-explorer:visible").first
    explorer.get_by_text("20,000 of 20,000 tensors").wait_for(timeout=90_000)
    grid = explorer.locator(".ckptview-table-grid .lm-DataGrid").first
    grid.wait_for(timeout=30_000)
    shown = time.monotonic() - start
    grid.scroll_into_view_if_needed()
    page.screenshot(path=str(ARTIFACTS / "grid-light-20000-shown.png"))
    grid.hover(position={"x": 100, "y": 100})
    start = time.monotonic()
    for _ in range(20):
        page.mouse.wheel(0, 2000)
    page.wait_for_timeout(100)
    scrolled = time.monotonic() - start
    page.screenshot(path=str(ARTIFACTS / "grid-light-20000-scrolled.png"))
    regex = explorer.locator("input[placeholder^='name regex']")
    start = time.monotonic()
    regex.fill(r"^blocks\.1999\.")
    regex.press("Enter")
    explorer.get_by_text("10 of 20,000 tensors").wait_for(timeout=30_000)
    filtered = time.monotonic() - start
    grid.click(position={"x": 40, "y": HEADER_PX + ROW_PX * 9 + ROW_PX // 2})  # the last of the 10 rows
    explorer.get_by_text("histogram of blocks.1999.layer9.weight").first.wait_for(timeout=30_000)
    page.screenshot(path=str(ARTIFACTS / "grid-light-20000-filtered.png"))
    start = time.monotonic()  # all 20,000 rows again, then a click on the first: the page still answers at once
    regex.fill("")
    regex.press("Enter")
    explorer.get_by_text("20,000 of 20,000 tensors").wait_for(timeout=30_000)
    grid.click(position={"x": 40, "y": HEADER_PX + ROW_PX // 2})
    explorer.get_by_text("histogram of blocks.0.layer0.weight").first.wait_for(timeout=30_000)
    unfiltered = time.monotonic() - start
    print(f"20,000 rows: grid shown {shown:.1f} s after the cell started (kernel imports included), 20 wheel scrolls "
          f"of 2,000 px {scrolled:.2f} s, filter to 10 rows {filtered:.2f} s, back to 20,000 rows and a row click "
          f"to its histogram {unfiltered:.2f} s")
    # Bounds that catch a frozen page, not a slow machine: on the shared 2-core machine (load 5-9)
    # these ran 6-17 s, 2-13 s, 0.2-1.2 s and 1.4-4.1 s. A wheel step costs about the same with 200
    # rows as with 20,000 (10 steps: 3.2 s and 4.1 s there): the grid draws only what is visible.
    assert shown < 60 and scrolled < 30 and filtered < 10 and unfiltered < 20


def test_plot_clicks_open_tensors(lab: str, grid_notebook, page) -> None:  # noqa: F811
    """A leaf tile of the Overview treemap lists that module's tensors; a Statistics point opens its tensor."""
    name, _ = grid_notebook
    run_notebook(page, lab.replace("explore.ipynb", name))
    explorer = page.locator(".ckptview-explorer:visible").first
    explorer.wait_for(timeout=90_000)
    tile = explorer.locator(".treemaplayer g.slice", has_text=re.compile(r"^head")).first
    tile.wait_for(timeout=60_000)
    tile.click()
    explorer.get_by_text(count_label(2)).wait_for(timeout=30_000)  # head.weight and head.bias
    assert "lm-mod-current" in (tab(explorer, "Tensors").get_attribute("class") or "")
    page.screenshot(path=str(ARTIFACTS / "grid-light-1280-treemap-picked.png"))

    tab(explorer, "Statistics").click()
    point = explorer.locator(".scatterlayer .point").locator("visible=true").first
    point.wait_for(timeout=60_000)
    box = point.bounding_box()
    page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    # the first point is the first tensor in file order, shown alone with its histogram
    explorer.get_by_text("histogram of embed.weight").first.wait_for(timeout=30_000)
    explorer.get_by_text(count_label(1)).wait_for(timeout=30_000)
    page.screenshot(path=str(ARTIFACTS / "grid-light-1280-point-picked.png"))
