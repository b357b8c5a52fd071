"""
Checks every file format's tests share: each CLI command and each explorer tab runs on one file of
the format, without an error and without format checks of its own.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

from ckptview.cli import main as cli_main


def cli(*args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `ckptview ARGS`, run in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(list(args))
    return code, out.getvalue(), err.getvalue()


def check_every_command(path: Path) -> dict[str, Any]:
    """Run each command that takes one checkpoint (and diff against itself); return `info --json`."""
    for args in (["info"], ["tensors"], ["tensors", "--json"], ["scan"], ["training"], ["stats"], ["stats", "--json"],
                 ["bn"], ["tree"], ["tree", "--json"]):
        code, out, err = cli(*args, str(path))
        assert code == 0, (args, err)
        assert out.strip() and not err.strip(), (args, err)
    code, out, err = cli("diff", str(path), str(path), "--values")
    assert code == 0, err
    code, out, err = cli("info", "--json", str(path))
    assert code == 0, err
    return json.loads(out)


def check_every_tab(path: Path) -> Any:
    """Open every explorer tab on `path` (Compare against the file itself); no panel may show an error."""
    from ckptview.ui import explore

    app = explore(path)
    assert app.panels, app.header.value
    for title in app.tabs.titles:
        panel = app.select(title)
        if hasattr(panel, "wait"):
            panel.wait()
        if title == "Compare":
            panel.other_path.value = str(path)
            panel.compare.click()
            panel.wait()
            assert "ckptview-banner-error" not in panel.banner.value, (title, panel.banner.value)
        elif hasattr(panel, "banner"):
            assert "ckptview-banner-error" not in panel.banner.value, (title, panel.banner.value)
    return app
