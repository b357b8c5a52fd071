"""Streaming statistics against torch references on real files written by torch.save and safetensors."""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import CancelledError
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import ckptview
from ckptview.analyzers.kernels import BLOCK
from ckptview.analyzers import stats as stats_module
from ckptview.analyzers.stats import bin_counts

REL = 1e-5


def _mixed_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    with_nonfinite = randn(300, 70)
    with_nonfinite.view(-1)[[3, 500, 20_000]] = float("nan")
    with_nonfinite.view(-1)[[7, 8]] = float("inf")
    with_nonfinite.view(-1)[9] = -float("inf")
    with_nonfinite.view(-1)[100:150] = 0.0
    signed_zeros = (randn(3000) * 0.1).bfloat16()
    signed_zeros[:300] = 0.0
    signed_zeros[300:500] = -0.0
    half_zeros = (randn(3000) * 0.1).half()
    half_zeros[1000:1100] = -0.0
    half_nonfinite = (randn(5000) * 3).half()
    half_nonfinite[[1, 2]] = float("nan")
    half_nonfinite[4] = -float("inf")
    # 3 kernel blocks and a ragged end, with NaN/Inf starting a block and zeros across a border.
    across_blocks = (randn(3 * BLOCK + 17) * 0.02).bfloat16()
    across_blocks[BLOCK] = float("nan")
    across_blocks[-1] = float("inf")
    across_blocks[2 * BLOCK - 2 : 2 * BLOCK + 2] = 0.0
    # Values whose float32 sum, or sum of squares, overflows: the exact float64 path must take over.
    near_float32_max = randn(9000) * 1e37
    near_float32_max[::500] = 3.4e38
    # Block means drifting up by a tenth of the spread: each block is centred on the mean of the
    # blocks before it, so the single-pass sums must subtract that offset, at ~16 float32 steps
    # of spread around 1000.
    drifting = 1000 + randn(6, BLOCK) * 1e-3 + torch.arange(6).unsqueeze(1) * 1e-4
    # A jump far beyond the spread: the block must be re-centred on its own mean.
    jumping = torch.cat([randn(BLOCK + 100), 1e4 + randn(2 * BLOCK) * 1e-2, -50 + randn(BLOCK)])
    return {
        "f32_drifting_mean": drifting,
        "f32_jumping_mean": jumping,
        "f32": randn(257, 129) * 0.02 + 0.5,
        "f32_zero_mean": randn(40_000),
        "f16": (randn(64, 300) * 0.1 - 2).half(),
        "bf16": (randn(128, 333) * 0.05 + 1).bfloat16(),
        "f64": randn(1000).double() * 1e3,
        "i64": torch.randint(-(2**40), 2**40, (3000,), generator=generator),
        "i8": torch.randint(-128, 127, (5000,), generator=generator).to(torch.int8),
        # torch has no CPU min/max for these unsigned types: statistics must not depend on it.
        "u16": torch.randint(0, 2**16, (3000,), generator=generator).to(torch.uint16),
        "u32": torch.randint(0, 2**32, (3000,), generator=generator).to(torch.uint32),
        "u64": torch.randint(0, 2**62, (3000,), generator=generator).to(torch.uint64),
        "bool": randn(2000) > 0.4,
        "nonfinite": with_nonfinite,
        "f16_nonfinite": half_nonfinite,
        "bf16_signed_zeros": signed_zeros,
        "f16_signed_zeros": half_zeros,
        "all_nan": torch.full((10,), float("nan")),
        "empty": torch.empty(0, 8),
        "scalar": torch.tensor(2.5),
        "zeros": torch.zeros(64),
        "transposed": randn(50, 80).t(),  # a non-contiguous view, saved as such by torch.save
        # A spread of ~16 float32 steps around a large mean: the float32 block mean's rounding error
        # is then as large as the spread, and the corrected two-pass formula must remove it.
        "f32_tiny_spread": 1000 + randn(20_000) * 1e-3,
        "bf16_across_blocks": across_blocks,
        "f32_near_max": near_float32_max,
    }


@pytest.fixture(params=["torch", "safetensors"])
def mixed_file(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    tensors = _mixed_tensors()
    if request.param == "torch":
        path = tmp_path / "mixed.pt"
        torch.save(tensors, path)
    else:
        path = tmp_path / "mixed.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    return path, tensors


def reference(tensor: torch.Tensor) -> dict[str, float]:
    values = tensor.double().reshape(-1)
    finite = values[torch.isfinite(values)]
    n = finite.numel()
    nan = math.nan
    return {
        "min": float(finite.min()) if n else nan,
        "max": float(finite.max()) if n else nan,
        "mean": float(finite.mean()) if n else nan,
        "std": float(finite.std()) if n > 1 else (0.0 if n == 1 else nan),
        "abs_max": float(finite.abs().max()) if n else nan,
        "l2_norm": float(torch.linalg.vector_norm(finite)),
        "zero_fraction": float((values == 0).double().mean()) if values.numel() else nan,
        "nan_count": int(torch.isnan(values).sum()),
        "posinf_count": int((values == math.inf).sum()),
        "neginf_count": int((values == -math.inf).sum()),
    }


def assert_matches(item: ckptview.analyzers.stats.TensorStats, tensor: torch.Tensor) -> None:
    expected = reference(tensor)
    for key, value in expected.items():
        got = getattr(item, key)
        if isinstance(value, float) and math.isnan(value):
            assert math.isnan(got), (item.name, key, got)
        elif key == "mean":
            # The mean is compared relative to the data's spread: a mean of ~0 has no relative precision.
            scale = max(abs(value), expected["std"] if math.isfinite(expected["std"]) else 0.0)
            assert abs(got - value) <= REL * scale, (item.name, key, got, value)
        else:
            assert got == pytest.approx(value, rel=REL, abs=0), (item.name, key, got, value)


@pytest.mark.parametrize("chunk_bytes", [4096, 1 << 20])
def test_statistics_equal_torch_reference(mixed_file: tuple[Path, dict[str, torch.Tensor]], chunk_bytes: int) -> None:
    path, tensors = mixed_file
    with ckptview.open(path) as ckpt:
        result = ckptview.stats(ckpt, progress=False, chunk_bytes=chunk_bytes)
    assert sorted(item.name for item in result.tensors) == sorted(tensors)  # safetensors orders by offset
    for item in result.tensors:
        assert_matches(item, tensors[item.name])
        assert item.numel == tensors[item.name].numel()
        assert item.shape == tuple(tensors[item.name].shape)


def test_nan_and_inf_do_not_hide_the_rest(mixed_file: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, _ = mixed_file
    with ckptview.open(path) as ckpt:
        item = ckptview.stats(ckpt, progress=False)["nonfinite"]
    assert (item.nan_count, item.posinf_count, item.neginf_count, item.inf_count) == (3, 2, 1, 3)
    assert math.isfinite(item.mean) and math.isfinite(item.std) and 3 < item.abs_max < 6
    assert item.finite_count == 300 * 70 - 6


def test_negative_zero_counts_as_zero(mixed_file: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, _ = mixed_file
    with ckptview.open(path) as ckpt:
        result = ckptview.stats(ckpt, progress=False, chunk_bytes=1000)
    assert result["bf16_signed_zeros"].zero_fraction == 500 / 3000
    assert result["f16_signed_zeros"].zero_fraction == 100 / 3000


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_random_bit_patterns_equal_reference(tmp_path: Path, dtype: torch.dtype) -> None:
    """Every class of float at once: NaNs with any payload and sign, ±Inf, ±0, subnormals, the largest values."""
    int_type = {2: torch.int16, 4: torch.int32}[dtype.itemsize]
    info = torch.iinfo(int_type)
    bits = torch.randint(info.min, info.max, (3 * BLOCK + 11,), dtype=int_type, generator=torch.Generator().manual_seed(7))
    tensor = bits.view(dtype)
    torch.save({"random": tensor}, tmp_path / "random.pt")
    with ckptview.open(tmp_path / "random.pt") as ckpt:
        item = ckptview.stats(ckpt, progress=False, chunk_bytes=10_000)["random"]
    assert_matches(item, tensor)


def test_integer_and_bool_statistics_are_exact(tmp_path: Path) -> None:
    big = torch.tensor([2**62, -(2**62), 5, 0])
    flags = torch.tensor([True, False, True, True])
    path = tmp_path / "ints.pt"
    torch.save({"big": big, "flags": flags}, path)
    with ckptview.open(path) as ckpt:
        result = ckptview.stats(ckpt, progress=False)
    assert (result["big"].min, result["big"].max) == (-(2**62), 2**62)  # not rounded through float32
    assert (result["flags"].min, result["flags"].max, result["flags"].mean) == (0, 1, 0.75)
    assert result["flags"].zero_fraction == 0.25


def test_histogram_counts_every_value_of_small_tensors(mixed_file: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, tensors = mixed_file
    with ckptview.open(path) as ckpt:
        result = ckptview.stats(ckpt, progress=False, bins=32, chunk_bytes=8192, histogram_sample=50_000)
    for name in ("f32", "bf16", "f16", "nonfinite", "i8", "bool"):
        item = result[name]
        values = tensors[name].double().reshape(-1)
        values = values[torch.isfinite(values)]
        expected = torch.histogram(values, 32, range=(item.min, item.max)).hist
        assert item.histogram.stride == 1
        assert list(item.histogram.counts) == expected.long().tolist(), name
        assert item.histogram.edges[0] == item.min and item.histogram.edges[-1] == item.max
    assert result["empty"].histogram is None and result["all_nan"].histogram is None


def test_histogram_of_large_tensor_is_an_every_kth_sample_unless_exact(tmp_path: Path) -> None:
    tensor = torch.randn(100_003, generator=torch.Generator().manual_seed(1))
    tensor[10] = float("nan")
    path = tmp_path / "big.pt"
    torch.save({"w": tensor}, path)
    with ckptview.open(path) as ckpt:
        sampled = ckptview.stats(ckpt, progress=False, histogram_sample=1000, chunk_bytes=4000)["w"]
        exact = ckptview.stats(ckpt, progress=False, histogram_sample=None, chunk_bytes=4000)["w"]
    stride = math.ceil(100_003 / 1000)
    picked = tensor[::stride].double()
    picked = picked[torch.isfinite(picked)]
    assert sampled.histogram.stride == stride
    assert list(sampled.histogram.counts) == torch.histogram(picked, 64, range=(sampled.min, sampled.max)).hist.long().tolist()
    finite = tensor[torch.isfinite(tensor)].double()
    assert list(exact.histogram.counts) == torch.histogram(finite, 64, range=(exact.min, exact.max)).hist.long().tolist()
    assert exact.histogram.stride == 1 and sum(exact.histogram.counts) == 100_002
    assert exact.histogram.log_counts()[0] == pytest.approx(math.log10(1 + exact.histogram.counts[0]))


def test_bin_counts_agree_with_torch_histogram_on_edges() -> None:
    values = torch.arange(0, 65, dtype=torch.float64)  # every value on a bin edge
    assert bin_counts(values, 64, 0.0, 64.0).tolist() == torch.histogram(values, 64, range=(0.0, 64.0)).hist.tolist()


def test_second_call_reads_nothing(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    torch.save({"a": torch.randn(1000), "b": torch.randn(1000)}, path)
    with ckptview.open(path) as ckpt:
        first = ckptview.stats(ckpt, progress=False, filter="a")
        os.truncate(path, 0)  # any further read of tensor data now fails
        again = ckptview.stats(ckpt, progress=False, filter="a")
        assert again.tensors == first.tensors
        with pytest.raises(ckptview.errors.CorruptCheckpointError):
            ckptview.stats(ckpt, progress=False, filter="b")


def test_filter_by_regex_and_predicate(mixed_file: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, _ = mixed_file
    with ckptview.open(path) as ckpt:
        assert {t.name for t in ckptview.stats(ckpt, progress=False, filter=r"^f(16|32)$").tensors} == {"f32", "f16"}
        by_dtype = ckptview.stats(ckpt, progress=False, filter=lambda entry: entry.dtype == torch.bfloat16)
    assert {t.name for t in by_dtype.tensors} == {"bf16", "bf16_signed_zeros", "bf16_across_blocks"}


def test_cancel_stops_and_caches_nothing(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    torch.save({f"t{i}": torch.randn(20_000) for i in range(8)}, path)
    with ckptview.open(path) as ckpt:
        stop = threading.Event()
        stop.set()
        with pytest.raises(CancelledError):
            ckptview.stats(ckpt, progress=False, cancel=stop, chunk_bytes=4096)
        calls = []
        with pytest.raises(CancelledError):
            ckptview.stats(ckpt, progress=False, cancel=lambda: calls.append(1) or len(calls) > 3, chunk_bytes=4096)
        result = ckptview.stats(ckpt, progress=False, chunk_bytes=4096)
    assert len(result) == 8 and all(math.isfinite(t.std) for t in result.tensors)


def test_worker_count_does_not_change_results(mixed_file: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, _ = mixed_file
    with ckptview.open(path) as one_ckpt, ckptview.open(path) as four_ckpt:
        one = ckptview.stats(one_ckpt, progress=False, workers=1, chunk_bytes=4096)
        four = ckptview.stats(four_ckpt, progress=False, workers=4, chunk_bytes=4096)
    frame_one, frame_four = one.to_frame(), four.to_frame()
    assert frame_one.equals(frame_four)


def test_tied_weights_are_reported_under_both_names(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 50, bias=False))
    model[1].weight = model[0].weight
    path = tmp_path / "tied.pt"
    torch.save(model.state_dict(), path)
    with ckptview.open(path) as ckpt:
        result = ckptview.stats(ckpt, progress=False)
    assert [t.name for t in result.tensors] == ["0.weight", "1.weight"]
    assert result["0.weight"].l2_norm == result["1.weight"].l2_norm == pytest.approx(float(model[0].weight.detach().norm()), rel=REL)


def test_outliers_flag_nonfinite_zero_constant_and_exploded_tensors(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(32, 32) for _ in range(5)], nn.LayerNorm(32))
    with torch.no_grad():
        model[3].weight.mul_(1000)
        model[1].bias.zero_()
        model[2].weight[0, 0] = float("nan")
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    with ckptview.open(path) as ckpt:
        result = ckptview.stats(ckpt, progress=False)
    flagged = {(o.name, o.check) for o in result.outliers}
    assert flagged == {
        ("3.weight", "abs_max_outlier"),
        ("1.bias", "all_zero"),
        ("2.weight", "non_finite"),
        ("5.weight", "collapsed_std"),  # LayerNorm weight at init: all ones
        ("5.bias", "all_zero"),
    }
    frame = result.to_frame().set_index("name")
    assert frame.loc["3.weight", "outliers"] == "abs_max_outlier"
    assert {"name", "min", "max", "mean", "std", "nan_count", "inf_count", "zero_fraction"} <= set(frame.reset_index())


def test_trained_model_has_no_outliers(cnn_state_dict_path: Path) -> None:
    with ckptview.open(cnn_state_dict_path) as ckpt:
        result = ckptview.stats(ckpt, progress=False)
    assert [o for o in result.outliers if o.check != "all_zero"] == []


def test_invalid_arguments_are_value_errors(cnn_state_dict_path: Path) -> None:
    with ckptview.open(cnn_state_dict_path) as ckpt:
        with pytest.raises(ValueError, match="bins"):
            ckptview.stats(ckpt, bins=0)
        with pytest.raises(KeyError, match="filter"):
            ckptview.stats(ckpt, progress=False, filter="fc")["conv1.weight"]


@pytest.mark.parametrize("kind", ["torch", "safetensors"])
def test_many_small_tensors_reduced_in_batches_equal_torch(tmp_path: Path, kind: str) -> None:
    # thousands of small tensors go through kernels.segment_stats, several per read; each must still
    # equal torch's own statistics and histogram
    generator = torch.Generator().manual_seed(7)
    tensors: dict[str, torch.Tensor] = {}
    for i in range(1200):
        dtype = (torch.float32, torch.bfloat16, torch.float16, torch.float64)[i % 4]
        values = torch.randn(1 + i % 97, generator=generator) * 10 ** (i % 5 - 2)
        if i % 50 == 3:
            values[0], values[-1] = float("nan"), float("-inf")
        if i % 50 == 7:
            values.fill_(0.25)
        tensors[f"block{i}.w"] = values.to(dtype)
    path = tmp_path / ("small.pt" if kind == "torch" else "small.safetensors")
    torch.save(tensors, path) if kind == "torch" else save_file(tensors, path)
    with ckptview.open(path) as ckpt:
        batches, singles = stats_module._small_batches(list(enumerate(ckpt.tensors())), None, 1 << 20)
        assert not singles and len(batches) < 20
        result = ckptview.stats(ckpt, progress=False, bins=16, chunk_bytes=1 << 20)
    for name, tensor in tensors.items():
        item = result[name]
        assert_matches(item, tensor)
        finite = tensor.double()[torch.isfinite(tensor.double())]
        if finite.numel():
            assert list(item.histogram.counts) == torch.histogram(finite, 16, range=(item.min, item.max) if item.min < item.max else (item.min - 0.5, item.max + 0.5)).hist.long().tolist(), name


def test_all_zero_is_a_finding_for_float_weights_only(tmp_path: Path) -> None:
    path = tmp_path / "zeros.safetensors"
    save_file({"fc.weight": torch.zeros(4, 4), "shape": torch.zeros(3, dtype=torch.int64),
               "fc.bias": torch.ones(4)}, path)
    with ckptview.open(path) as ckpt:
        found = {(o.name, o.check) for o in ckptview.stats(ckpt, progress=False).outliers}
    assert ("fc.weight", "all_zero") in found and not any(name == "shape" for name, _ in found)


def test_stats_text_shows_the_first_rows_and_every_outlier(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # a million rows of text nobody reads took 5 s of `ckptview stats` on a million tensors: the table
    # stops at STATS_ROWS and says how many more there are; --all prints them, outliers are always all listed
    from ckptview.cli import main
    from ckptview.cli.analyze import STATS_ROWS

    count = STATS_ROWS + 5
    tensors = {f"t{i:05d}": torch.full((2,), float(i)) for i in range(count)}
    tensors[f"t{count - 1:05d}"][0] = float("nan")
    path = tmp_path / "many.safetensors"
    save_file(tensors, path)
    assert main(["stats", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[2 : 2 + STATS_ROWS]] == list(tensors)[:STATS_ROWS]
    assert lines[2 + STATS_ROWS] == "... and 5 more tensors (--all prints every row, --json lists them, --filter picks some)"
    assert any(line.startswith(f"  t{count - 1:05d}: non_finite:") for line in lines)
    assert main(["stats", "--all", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[2 : 2 + count]] == list(tensors)
    assert not any(line.startswith("... and") for line in lines)


def test_views_reading_one_storage_many_times_over_are_read_up_to_a_budget(tmp_path: Path) -> None:
    """`[x[i:] for i in range(n)]` saves one storage and n views of it: torch loads it at once, and
    statistics of every view read the storage n times (10,000 views of 100 MB: a terabyte). Distinct
    views read more than 16 times their storage (past 64 MiB) are skipped, the first ones read, the
    same whatever filter is given."""
    x = torch.arange(1 << 22, dtype=torch.float32)  # 16 MiB
    path = tmp_path / "views.pt"
    torch.save([x[i:] for i in range(40)], path)
    with ckptview.open(path) as ckpt:
        result = ckptview.stats(ckpt, progress=False)
        read = [row for row in result.tensors if not row.skipped]
        skipped = [row for row in result.tensors if row.skipped]
        assert len(read) == 16 and len(skipped) == 24
        assert read[0].name == "0" and read[0].mean == pytest.approx(((1 << 22) - 1) / 2)
        assert "read it more than 16 times over" in skipped[0].skipped and skipped[0].name == "16"
    with ckptview.open(path) as ckpt:  # asked for the last view alone, it is still skipped
        (row,) = ckptview.stats(ckpt, filter="^39$", progress=False).tensors
        assert row.skipped
    from ckptview.analyzers.valuediff import value_diff

    with ckptview.open(path) as left, ckptview.open(path) as right:  # and a value diff reads as many
        changes = value_diff({e.name: e for e in left.tensors()}, {e.name: e for e in right.tensors()})
        assert changes.unreadable == tuple(str(i) for i in range(16, 40)) and len(changes.tensors) == 16
