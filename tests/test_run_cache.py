"""The run cache's Parquet file, rewritten by a re-run from the tables it read plus the new ones, reads back as computed."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import torch
from torch import nn

import ckptview


def _save_epochs(folder: Path, first: int, last: int) -> None:
    torch.manual_seed(first)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for epoch in range(first, last + 1):
        loss = model(torch.randn(4, 8)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        torch.save({"epoch": epoch, "loss": loss.item(), "model": model.state_dict(),
                    "optimizer": optimizer.state_dict()}, folder / f"epoch_{epoch}.pt")


def _analyze(folder: Path, cache: Path | bool) -> dict:
    return ckptview.open_run(folder, cache=cache).analyze(progress=False).to_dict()


def _run_files(cache: Path) -> list[Path]:
    """The run's table files in the order they are read: the first, then each re-run's addition."""
    return sorted(cache.rglob("*.parquet"), key=lambda path: (path.name.count("."), path.name))


def _rows(paths: list[Path]) -> dict:
    import pyarrow as pa

    return pa.concat_tables([pq.read_table(path).replace_schema_metadata() for path in paths]).to_pydict()


def test_rerun_keeps_the_stored_tables_it_read_and_adds_the_new_ones(tmp_path: Path) -> None:
    folder, cache, fresh_cache = tmp_path / "run", tmp_path / "cache", tmp_path / "fresh"
    folder.mkdir()
    _save_epochs(folder, 1, 4)
    _analyze(folder, cache)
    [first_file] = _run_files(cache)
    written = first_file.read_bytes()
    _save_epochs(folder, 5, 7)
    _analyze(folder, cache)  # epochs 1-4 from the file it read, 5-7 computed and added beside it
    assert first_file.read_bytes() == written  # the re-run wrote the new tables only
    first, added = _run_files(cache)
    files_of = {path: json.loads(pq.read_schema(path).metadata[b"ckptview"])["files"] for path in (first, added)}
    assert (len(files_of[first]), len(files_of[added])) == (4, 3)

    expected = _analyze(folder, False)
    assert json.dumps(_analyze(folder, cache)) == json.dumps(expected)  # every table read back from the files
    _analyze(folder, fresh_cache)
    [written_at_once] = _run_files(fresh_cache)
    at_once_table = pq.read_table(written_at_once)
    assert pq.read_schema(added).remove_metadata().equals(at_once_table.schema.remove_metadata())
    # by JSON: Arrow's equals finds a NaN unequal to itself, and the tables hold NaN where there is no previous
    assert json.dumps(_rows([first, added])) == json.dumps(_rows([written_at_once]))


def test_added_files_are_folded_back_into_the_first(tmp_path: Path) -> None:
    """Each re-run adds a file; past `_MAX_RUN_FILES` they are written into the first file again, and
    the tables read back as computed."""
    from ckptview.analyzers.run_engine import _MAX_RUN_FILES

    folder, cache = tmp_path / "run", tmp_path / "cache"
    folder.mkdir()
    _save_epochs(folder, 1, 4)
    _analyze(folder, cache)
    epoch = 4
    for added in range(1, _MAX_RUN_FILES):
        epoch += 1
        _save_epochs(folder, epoch, epoch)
        _analyze(folder, cache)
        assert len(_run_files(cache)) == added + 1
    _save_epochs(folder, epoch + 1, epoch + 1)
    assert json.dumps(_analyze(folder, cache)) == json.dumps(_analyze(folder, False))
    [folded] = _run_files(cache)
    assert len(json.loads(pq.read_schema(folded).metadata[b"ckptview"])["files"]) == epoch + 1
    assert json.dumps(_analyze(folder, cache)) == json.dumps(_analyze(folder, False))
