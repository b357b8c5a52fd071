"""A short run of the fuzzer (tests/fuzz.py) in every `make test`; `make fuzz` runs it for as long as asked."""

from __future__ import annotations

import os
import random

import pytest

import fuzz


@pytest.mark.slow
def test_fuzzer_finds_no_violation(tmp_path) -> None:
    seconds = float(os.environ.get("CKPTVIEW_FUZZ_SECONDS", "60"))
    seed = random.SystemRandom().randrange(2**31)
    summary = fuzz.run(seconds, seed, keep=tmp_path / "failing", log=lambda line: None)
    assert summary["inputs"] > 100
    assert not summary["violations"], f"seed {seed}: {summary['violations'][:5]}"
