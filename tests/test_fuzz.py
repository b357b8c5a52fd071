"""
The fuzzer (tests/fuzz.py) in every `make test`: a fixed seed and a fixed number of inputs, so the
suite is reproducible; `make fuzz` explores with fresh seeds for as long as asked. Its finds are
kept in tests/fuzz_findings/ as tests of their own.
"""

from __future__ import annotations

import pytest

import fuzz


@pytest.mark.slow
def test_fuzzer_finds_no_violation(tmp_path) -> None:
    summary = fuzz.run(600, seed=20261203, keep=tmp_path / "failing", log=lambda line: None, max_inputs=1500)
    assert summary["inputs"] == 1500
    assert summary["per_family"].get("opened", 0) > 100 and summary["per_family"].get("oracle-checked", 0) > 50
    assert not summary["violations"], summary["violations"][:5]
