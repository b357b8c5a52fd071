"""The unpickler's one-loop check of a tensor view (`_strided`) and its step-by-step check
(`_strided_checked`, which words the refusals) must accept and refuse the same views."""

from __future__ import annotations

import random

import pytest

from ckptview.readers.model import FileSource, RefusedPickle, Storage
from ckptview.readers.unpickler import MAX_ELEMENTS, StorageRef, _strided, _strided_checked


def _outcome(check, *args):  # type: ignore[no-untyped-def]
    try:
        return check(*args)
    except RefusedPickle:
        return "refused"


@pytest.mark.parametrize("seed", range(4))
def test_fast_and_checked_view_checks_agree(seed: int) -> None:
    rng = random.Random(seed)
    source = FileSource(__file__)
    dims = [0, 1, 2, 3, 5, 8, -1, MAX_ELEMENTS, 2**40, True, 2.0, "3"]
    for _ in range(3000):
        rank = rng.choice([0, 1, 2, 3])
        size = tuple(rng.choice(dims[:6]) if rng.random() < 0.9 else rng.choice(dims) for _ in range(rank))
        stride = tuple(rng.choice([0, 1, 2, 8, 40]) if rng.random() < 0.9 else rng.choice(dims) for _ in range(rank))
        if rng.random() < 0.05:
            stride = stride[:-1]
        container = rng.choice([tuple, tuple, tuple, list])
        offset = rng.choice([0, 0, 1, 7, -1, 2.0, None])
        dtype = rng.choice(["float32", "float16", "uint8", "float64"])
        storage = StorageRef(Storage("0", source, -1, rng.choice([0, 4, 64, 256, 10_000]), "cpu"), dtype)
        requires_grad = rng.choice([False, True, 1, None])
        args = (storage, offset, container(size), container(stride))
        fast = _outcome(_strided, *args, requires_grad)
        checked = _outcome(_strided_checked, *args, None, requires_grad)
        assert fast == checked, (args, requires_grad)
    assert _outcome(_strided, "not a storage", 0, (1,), (1,)) == "refused"
