"""`gc_paused`: records made while the collector is paused go to the oldest generation, so no young
collection walks them again, and the collector's own state is left as the caller had it."""

from __future__ import annotations

import gc

from ckptview.readers.model import TensorInfo, gc_paused


def _made_while_paused() -> list[TensorInfo]:
    with gc_paused():
        return [TensorInfo((i,), "float32", None) for i in range(2000)]


def test_records_made_while_paused_skip_the_young_generations() -> None:
    gc.collect()
    made = _made_while_paused()
    assert gc.isenabled()
    young = {id(obj) for generation in (0, 1) for obj in gc.get_objects(generation)}
    assert not any(id(info) in young for info in made)
    assert {id(info) for info in made} <= {id(obj) for obj in gc.get_objects(2)}


def test_what_the_user_froze_stays_frozen_and_a_disabled_collector_stays_off() -> None:
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        _made_while_paused()
        assert gc.get_freeze_count() >= frozen
    finally:
        gc.unfreeze()
    gc.disable()
    try:
        _made_while_paused()
        assert not gc.isenabled()
    finally:
        gc.enable()
