"""
Every Python example in the README runs as written on the files `make demo` writes (in a fresh
process, from a folder holding `demo_checkpoints/`), so a reader who copies one gets no error.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_examples_use_no_file_make_demo_does_not_write() -> None:
    examples = python_examples()
    assert len(examples) >= 6
    for example in examples:
        assert "torchvision" not in example and "resnet" not in example.lower(), example


def test_every_readme_python_example_runs_after_make_demo(tmp_path: Path) -> None:
    # One process and one namespace for all, as a reader pastes them in order into one notebook
    # (the first example imports ckptview; later ones use it).
    script = (
        "import sys\n"
        "from ckptview.demo import main\n"
        "main(['demo_checkpoints'])  # what make demo runs: the samples and the run\n"
        "namespace = {}\n"
        "for number, example in enumerate(sys.argv[1:], 1):\n"
        "    try:\n"
        "        exec(compile(example, f'README example {number}', 'exec'), namespace)\n"
        "    except Exception as exc:\n"
        "        raise SystemExit(f'README example {number} failed: {type(exc).__name__}: {exc}\\n{example}')\n"
    )
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"), CKPTVIEW_CACHE_DIR=str(tmp_path / "cache"))
    result = subprocess.run([sys.executable, "-c", script, *python_examples()], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-2000:]
    assert (tmp_path / "report.html").exists() and (tmp_path / "fixed.pt").exists()
