"""Every notebook in notebooks/ runs top to bottom in a fresh kernel (nbclient), as a user would run it."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The demo notebook writes its sample checkpoints here instead of the repository's demo folder.
    monkeypatch.setenv("CKPTVIEW_DEMO_DIR", str(tmp_path / "demo"))
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    # Every explore() cell displayed the app as a widget, not a repr string.
    explore_cells = [cell for cell in notebook.cells if cell.cell_type == "code" and "ckptview.explore(" in cell.source]
    for cell in explore_cells:
        assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in cell.outputs), cell.source
