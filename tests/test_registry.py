"""The reader registry: the README's format table and the "not a checkpoint" message come from it."""

from __future__ import annotations

from pathlib import Path

import pytest

import ckptview
from ckptview.errors import UnsupportedFormatError
from ckptview.readers.registry import FORMATS, format_table, supported

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_format_table_is_the_registry() -> None:
    assert format_table() in README.read_text()


def test_every_format_is_in_the_unsupported_message(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("not a model\n")
    with pytest.raises(UnsupportedFormatError) as caught:
        ckptview.open(path)
    assert str(caught.value).endswith(supported() + ".")
    for fmt in FORMATS:
        assert fmt.label in str(caught.value)


def test_format_names_are_unique() -> None:
    names = [fmt.name for fmt in FORMATS]
    assert len(names) == len(set(names))
