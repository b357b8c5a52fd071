"""
The shareable HTML report (`ckptview.report`, `ckptview report`): written from real torch.save
files, atomically, never over an existing file without force, and rendered by an offline Chromium.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ckptview
from ckptview.present.report import ReportExistsError
from conftest import SmallCNN, train_a_few_steps

SECTIONS = ("overview", "tensors", "tree", "statistics", "batchnorm", "training")
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-sync"]


@pytest.fixture(scope="module")
def epochs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two training checkpoints of one run, three optimizer steps apart; the later one has a NaN in fc.bias."""
    folder = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    model = SmallCNN()
    paths = []
    for epoch, seed in ((1, 0), (2, 1)):
        optimizer = train_a_few_steps(model, steps=3, seed=seed)
        state = model.state_dict()
        if epoch == 2:
            state["fc.bias"][0] = float("nan")
        path = folder / f"epoch_{epoch}.pt"
        torch.save({"epoch": epoch, "model_state_dict": state, "optimizer_state_dict": optimizer.state_dict()}, path)
        paths.append(path)
    return paths[0], paths[1]


def cli(*args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ckptview", *map(str, args)], capture_output=True, text=True, timeout=300)


def test_report_holds_every_section_and_embeds_plotly_once(epochs: tuple[Path, Path], tmp_path: Path) -> None:
    first, second = epochs
    before = first.read_bytes()
    out = tmp_path / "report.html"
    assert ckptview.report(first, out, compare=second) == str(out)
    page = out.read_text(encoding="utf-8")
    for anchor in (*SECTIONS, "compare"):
        assert f"<section id='{anchor}'>" in page
    # plotly's bundle once, a figure each for the treemap, depth plot, BatchNorm, the optimizer's moments
    # and the value diff, and nothing the page would fetch from elsewhere
    assert len(re.findall(r"plotly\.js v\d", page)) == 1
    assert page.count("Plotly.newPlot(") == 5
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=", page)
    assert "model_state_dict.fc.weight" in page and "layer1.1" in page
    assert "non_finite" not in page  # the first epoch is clean; the NaN is only in the file compared with
    assert "Keys and shapes match" in page and "tensors compared" in page
    assert first.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]  # no temporary file left behind


def test_report_of_two_formats_pairs_every_tensor(epochs: tuple[Path, Path], tmp_path: Path) -> None:
    from safetensors.torch import save_file

    state = torch.load(epochs[0], weights_only=True)["model_state_dict"]
    copy = tmp_path / "model.safetensors"
    save_file(state, str(copy))
    out = tmp_path / "report.html"
    result = cli("report", epochs[0], "--compare", copy, "-o", out)
    assert result.returncode == 0, result.stderr
    page = out.read_text(encoding="utf-8")
    assert "What each tensor became across formats" in page
    assert (f"epoch_1.pt (torch-zip) → model.safetensors (safetensors): every tensor paired or explained "
            f"({len(state):,} by name)") in page
    assert page.count("<td>name</td>") == len(state)


def test_report_draws_the_lr_schedule(tmp_path: Path) -> None:
    model = SmallCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=30)
    for _ in range(12):
        optimizer.step()
        scheduler.step()
    path = tmp_path / "cosine.pt"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, path)
    page = Path(ckptview.report(path, tmp_path / "report.html")).read_text(encoding="utf-8")
    assert "LR scheduler 0: CosineAnnealingLR" in page and "learning-rate schedule" in page
    assert "saved at step 12" in page and "_get_lr_called_within_step" not in page


def test_report_refuses_to_overwrite_without_force(epochs: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    out.write_text("keep me")
    with pytest.raises(ReportExistsError, match="force"):
        ckptview.report(epochs[0], out)
    result = cli("report", epochs[0], "-o", out)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("ckptview: error: ") and "--force" in result.stderr
    assert out.read_text() == "keep me"
    result = cli("report", epochs[0], "-o", out, "--force")
    assert result.returncode == 0, result.stderr
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]


def test_report_of_a_broken_input_writes_nothing(epochs: tuple[Path, Path], tmp_path: Path) -> None:
    broken = tmp_path / "broken.pt"
    broken.write_bytes(epochs[0].read_bytes()[:300])
    result = cli("report", epochs[0], "-o", tmp_path / "r.html", "--compare", broken)
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "cut off" in result.stderr
    result = cli("report", epochs[0], "-o", tmp_path / "missing" / "r.html")
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "cannot write the report" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.pt"]


@pytest.mark.browser
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is missing (apt-get install -y chromium)")
def test_report_renders_offline_in_chromium(epochs: tuple[Path, Path], tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    out = tmp_path / "report.html"
    ckptview.report(epochs[0], out, compare=epochs[1])
    artifacts = Path(__file__).resolve().parent.parent / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            context = browser.new_context(offline=True, viewport={"width": 1280, "height": 900})
            page = context.new_page()
            problems: list[str] = []
            requests: list[str] = []
            page.on("pageerror", lambda error: problems.append(str(error)))
            page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
            page.on("request", lambda request: requests.append(request.url))
            page.goto(out.as_uri())
            page.wait_for_function("document.querySelectorAll('.js-plotly-plot .main-svg').length >= 8", timeout=30_000)
            for anchor in (*SECTIONS, "compare"):
                assert page.locator(f"section#{anchor} h2").is_visible()
            plots = page.locator(".js-plotly-plot")
            assert plots.count() == 5
            for index in range(plots.count()):
                plot = plots.nth(index)
                # drawn: an SVG with marks in it (treemap slices, lines, boxes, heatmap image)
                assert plot.locator(".main-svg").count() >= 1
                assert plot.locator("g.slice, g.trace, image, path.box").count() > 0, index
                box, container = plot.bounding_box(), plot.locator("xpath=..").bounding_box()
                assert box["width"] > 600 and box["x"] + box["width"] <= container["x"] + container["width"] + 1
            assert page.evaluate("document.documentElement.scrollWidth") <= 1280
            assert not problems, problems
            assert all(url.startswith(("file:", "data:", "blob:")) for url in requests), requests
            page.screenshot(path=str(artifacts / "report.png"), full_page=True)
        finally:
            browser.close()
