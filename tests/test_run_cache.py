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


def test_rerun_keeps_the_stored_tables_it_read_and_adds_the_new_ones(tmp_path: Path) -> None:
    folder, cache, fresh_cache = tmp_path / "run", tmp_path / "cache", tmp_path / "fresh"
    folder.mkdir()
    _save_epochs(folder, 1, 4)
    _analyze(folder, cache)
    _save_epochs(folder, 5, 7)
    _analyze(folder, cache)  # epochs 1-4 from the file it read, 5-7 computed

    expected = _analyze(folder, False)
    assert json.dumps(_analyze(folder, cache)) == json.dumps(expected)  # every table read back from the file
    _analyze(folder, fresh_cache)
    [stored] = cache.rglob("*.parquet")
    [written_at_once] = fresh_cache.rglob("*.parquet")
    stored_table, at_once_table = pq.read_table(stored), pq.read_table(written_at_once)
    assert stored_table.schema.equals(at_once_table.schema, check_metadata=True)
    # by JSON: Arrow's equals finds a NaN unequal to itself, and the tables hold NaN where there is no previous
    assert json.dumps(stored_table.to_pydict()) == json.dumps(at_once_table.to_pydict())
