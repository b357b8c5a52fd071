"""The public surface is a contract: pin it, and pin the import direction of the layers."""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import ckptview

PACKAGE = Path(ckptview.__file__).parent


def test_foundation_names_are_exported() -> None:
    for name in ("open", "Checkpoint", "TensorEntry", "CkptviewError", "errors"):
        assert name in ckptview.__all__ and hasattr(ckptview, name)
    entry_fields = {"name", "shape", "dtype", "numel", "nbytes", "device", "load"}
    fields = {field.name for field in dataclasses.fields(ckptview.TensorEntry)}
    assert entry_fields <= fields | set(dir(ckptview.TensorEntry))


def test_every_exported_name_exists() -> None:
    assert sorted(set(ckptview.__all__)) == sorted(ckptview.__all__)
    for name in ckptview.__all__:
        assert hasattr(ckptview, name), name


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_layers_import_downward_only() -> None:
    """readers and analyzers never import presentation or UI libraries (DESIGN.md)."""
    forbidden = ("ipywidgets", "IPython", "plotly", "ckptview.ui", "ckptview.present", "ckptview.cli")
    for layer in ("readers", "analyzers", "inference"):
        for path in (PACKAGE / layer).rglob("*.py"):
            bad = {name for name in _imports(path) if name.startswith(forbidden)}
            assert not bad, f"{path.relative_to(PACKAGE)} imports {bad}"
    for path in (PACKAGE / "readers").rglob("*.py"):
        assert not {n for n in _imports(path) if n.startswith("ckptview.analyzers")}, path


def test_import_ckptview_needs_no_jupyter() -> None:
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, *args):\n"
            "        if name.split('.')[0] in ('ipywidgets', 'IPython', 'plotly', 'jupyterlab', 'pandas'):\n"
            "            raise ImportError(name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "import ckptview\n"
            "print('ok')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "ok", result.stderr
