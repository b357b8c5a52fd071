"""`gc_paused`: records made while the collector is paused go to the oldest generation, so no young
collection walks them again, and the collector's own state is left as the caller had it."""

from __future__ import annotations

import gc
import os
import zipfile
from pathlib import Path

import pytest
import torch

import ckptview
from ckptview.errors import CorruptCheckpointError
from ckptview.readers.model import TensorInfo, gc_paused


# CPython 3.12 starts with objects of its own in the permanent generation (375 statically allocated
# tuples): gc_paused then never unfreezes, which would hand those to the collector, and promotes nothing.
# The records are then walked by young collections as they would be without ckptview: slower, not wrong.
promotes = pytest.mark.skipif(
    gc.get_freeze_count() != 0, reason="this interpreter keeps frozen objects of its own: gc_paused promotes nothing")


def _made_while_paused(count: int = 50_000) -> list[TensorInfo]:
    with gc_paused():
        return [TensorInfo((i,), "float32", None) for i in range(count)]


@promotes
def test_many_records_made_while_paused_skip_the_young_generations() -> None:
    gc.collect()
    made = _made_while_paused()
    assert gc.isenabled()
    young = {id(obj) for generation in (0, 1) for obj in gc.get_objects(generation)}
    assert not any(id(info) in young for info in made)
    assert {id(info) for info in made} <= {id(obj) for obj in gc.get_objects(2)}


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def test_a_cycle_made_in_a_small_pause_stays_young() -> None:
    # a small file's pause moves nothing: its reference cycles (a stand-in class per foreign global)
    # must be freed by young collections, or a process reading many small files grows without end
    gc.collect()
    with gc_paused():
        made = [TensorInfo((i,), "float32", None) for i in range(100)]
        cycle = _Cycle()
    assert id(cycle) in {id(obj) for obj in gc.get_objects(0)} and made


@promotes
def test_a_small_pause_for_long_lived_results_moves_them_to_the_oldest_generation() -> None:
    # a run's summary (~25,000 records, fewer than a big file's) is kept by the caller: an inner
    # pause (a file opened while analysing) does not undo what the outer one asked for
    gc.collect()
    with gc_paused(long_lived=True):
        with gc_paused():
            made = [TensorInfo((i,), "float32", None) for i in range(100)]
    young = {id(obj) for generation in (0, 1) for obj in gc.get_objects(generation)}
    assert made and not any(id(info) in young for info in made)
    with gc_paused():  # and the next pause is a small one again
        again = [TensorInfo((i,), "float32", None) for i in range(100)]
    assert id(again[0]) in {id(obj) for obj in gc.get_objects(0)}


def test_what_the_user_froze_stays_frozen_and_a_disabled_collector_stays_off() -> None:
    # a container of the user's, frozen with the rest: a pause must not hand it back to the collector
    # (the frozen count itself may drop: a frozen object a cache evicts is freed by its count)
    users = [object()]
    gc.freeze()
    try:
        _made_while_paused()
        assert not any(tracked is users for tracked in gc.get_objects())
    finally:
        gc.unfreeze()
    gc.disable()
    try:
        _made_while_paused()
        assert not gc.isenabled()
    finally:
        gc.enable()


def _damaged_pickle(folder: Path) -> None:
    """good.pt, and broken.pt: the same with a byte of its data.pkl changed, so the unpickler fails."""
    torch.save({"weight": torch.ones(3)}, folder / "good.pt")
    with zipfile.ZipFile(folder / "good.pt") as good, zipfile.ZipFile(folder / "broken.pt", "w") as broken:
        for member in good.infolist():
            data = good.read(member)
            if member.filename.endswith("data.pkl"):
                data = data[:len(data) // 2] + b"\xff" + data[len(data) // 2 + 1:]
            broken.writestr(member, data)


def test_a_failed_read_leaves_its_garbage_to_the_young_collection(tmp_path: Path) -> None:
    # a torch file whose data.pkl is damaged: the open file its reader made sits in a cycle with the
    # traceback, and must close at the next young collection, as before the pause, even when a good
    # file is opened next (a folder of broken files must not run out of descriptors; moved to the
    # oldest generation with the good file's records, each failed open kept its file open)
    _damaged_pickle(tmp_path)
    gc.collect()
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        with pytest.raises(CorruptCheckpointError, match="data.pkl cannot be read"):
            ckptview.open(tmp_path / "broken.pt")
        # a good file opened next must not carry the failed one's garbage to the oldest generation
        ckptview.open(tmp_path / "good.pt").close()
        [[] for _ in range(2000)]  # tracked allocations, which let young collections run as a program's would
    assert len(os.listdir("/proc/self/fd")) <= before + 2


@promotes
def test_a_large_files_entries_move_with_its_records(tmp_path: Path) -> None:
    # the entries are made in the open's own pause: made later, in a pause of their own, they are too few
    # to move, and the next young collection walked every one of them
    torch.save({f"layer{i}.weight": torch.ones(1) for i in range(16_000)}, tmp_path / "many.pt")
    gc.collect()
    with ckptview.open(tmp_path / "many.pt") as ckpt:
        entries = ckpt.tensors()
        young = {id(obj) for generation in (0, 1) for obj in gc.get_objects(generation)}
        assert len(entries) == 16_000 and not any(id(entry) in young for entry in entries)


def test_listing_a_checkpoint_after_its_open_leaves_its_records_young(tmp_path: Path) -> None:
    # a 300-tensor file's records are young when it is listed after its open; the young collection a
    # pause starts with moved them to the oldest generation, and a notebook listing one file after
    # another paid a full collection of its whole process every few files
    torch.save({f"layer{i}.weight": torch.ones(2) for i in range(300)}, tmp_path / "small.pt")
    gc.collect()
    with ckptview.open(tmp_path / "small.pt") as ckpt:
        entries = ckpt.tensors()
        oldest = {id(obj) for obj in gc.get_objects(2)}
        assert len(entries) == 300
        assert not any(id(entry.info) in oldest or id(entry.info.storage) in oldest for entry in entries)


def test_pauses_nest_across_threads_and_the_last_to_end_restores_the_collector() -> None:
    # a training run's worker threads open files, each pausing, while the run pauses around them all:
    # a pause that began first but ends first must leave the collector off for the one still running
    import threading

    gc.collect()
    entered, leave = threading.Event(), threading.Event()

    def worker() -> None:
        with gc_paused():
            entered.set()
            leave.wait()

    thread = threading.Thread(target=worker)
    thread.start()
    entered.wait()
    with gc_paused():
        leave.set()
        thread.join()
        assert not gc.isenabled()
        made = [TensorInfo((i,), "float32", None) for i in range(50_000)]
    assert gc.isenabled()
    if gc.get_freeze_count() == 0:  # see `promotes`
        assert {id(info) for info in made} <= {id(obj) for obj in gc.get_objects(2)}


def test_a_read_failed_inside_a_long_pause_closes_its_file_when_the_pause_ends(tmp_path: Path) -> None:
    # a run's half-written checkpoint fails to open inside the run's pause, beside many records that move
    # to the oldest generation when it ends: the failed read's garbage (holding its open file) must be
    # freed first, not moved with them, where only a full collection would close the file
    _damaged_pickle(tmp_path)
    gc.collect()
    before = len(os.listdir("/proc/self/fd"))
    with gc_paused():
        made = [TensorInfo((i,), "float32", None) for i in range(150_000)]
        for _ in range(20):
            with pytest.raises(CorruptCheckpointError, match="data.pkl cannot be read"):
                ckptview.open(tmp_path / "broken.pt")
    assert made and gc.isenabled()
    assert len(os.listdir("/proc/self/fd")) <= before + 2
