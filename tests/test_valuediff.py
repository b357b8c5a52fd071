"""Value diff on real files: equal to a float64 torch reference, zero across formats, NaNs, groups, cancel."""

from __future__ import annotations

import math
import threading
from pathlib import Path

import pytest
import torch
from models_for_tests import make_cnn
from safetensors.torch import save_file
from torch import nn

import ckptview
from ckptview.analyzers.kernels import BLOCK
from ckptview.analyzers.sections import model_state_dict
from ckptview.analyzers.valuediff import IGNORE_BN_STATS, value_diff
from ckptview.cli import main


def reference(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """The figures, the plain torch way: whole tensors in float64."""
    a, b = a.double().flatten(), b.double().flatten()
    finite = a.isfinite() & b.isfinite()
    fa, fb = a[finite], b[finite]
    d = fa - fb
    return {
        "max_abs_diff": d.abs().max().item() if d.numel() else 0.0,
        "rel_change": (d.norm() / fa.norm()).item() if d.norm() > 0 else 0.0,
        "cosine": torch.nn.functional.cosine_similarity(fa, fb, dim=0, eps=0).item() if fa.norm() > 0 else 1.0,
        "fraction_changed": ((a != b) & ~(a.isnan() & b.isnan())).double().mean().item(),
        "nan_left": int(a.isnan().sum()),
        "nan_right": int(b.isnan().sum()),
    }


def assert_matches_reference(change, a: torch.Tensor, b: torch.Tensor) -> None:
    expected = reference(a, b)
    assert change.max_abs_diff == pytest.approx(expected["max_abs_diff"], rel=1e-6, abs=1e-12), change.key
    assert change.rel_change == pytest.approx(expected["rel_change"], rel=1e-4, abs=1e-9), change.key
    assert change.cosine == pytest.approx(expected["cosine"], rel=1e-5), change.key
    assert change.fraction_changed == pytest.approx(expected["fraction_changed"]), change.key
    assert (change.nan_left, change.nan_right) == (expected["nan_left"], expected["nan_right"]), change.key


@pytest.fixture
def epochs(tmp_path: Path) -> tuple[Path, Path, dict, dict]:
    """Two epochs of a real training run: the second after a few more Adam steps."""
    model = make_cnn()
    torch.manual_seed(1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)

    def train(steps: int) -> None:
        for _ in range(steps):
            loss = model(torch.randn(4, 3, 12, 12)).logsumexp(1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    train(2)
    first = {k: v.clone() for k, v in model.state_dict().items()}
    train(3)
    second = {k: v.clone() for k, v in model.state_dict().items()}
    paths = tmp_path / "epoch1.pt", tmp_path / "epoch2.pt"
    torch.save(first, paths[0])
    torch.save(second, paths[1])
    return paths[0], paths[1], first, second


def test_two_epochs_equal_the_torch_reference(epochs) -> None:
    path_a, path_b, first, second = epochs
    result = ckptview.diff(path_a, path_b, values=True)
    assert result.keys.ok and result.values is not None and result.values.complete
    assert [t.key for t in result.values.tensors] == list(first)
    for change in result.values.tensors:
        assert_matches_reference(change, first[change.key], second[change.key])
    assert {t.key for t in result.values.changed()} == {k for k in first if not torch.equal(first[k], second[k])}


def test_many_small_chunks_and_threads_give_the_same_figures(epochs) -> None:
    path_a, path_b, first, second = epochs
    with ckptview.open(path_a) as a, ckptview.open(path_b) as b:
        small = value_diff(model_state_dict(a), model_state_dict(b), chunk_elements=7, threads=3)
        whole = value_diff(model_state_dict(a), model_state_dict(b), threads=1)
    for s, w in zip(small.tensors, whole.tensors):
        assert s.key == w.key and s.max_abs_diff == w.max_abs_diff and s.fraction_changed == w.fraction_changed
        assert s.rel_change == pytest.approx(w.rel_change, rel=1e-5) and s.cosine == pytest.approx(w.cosine, rel=1e-6)
        assert_matches_reference(s, first[s.key], second[s.key])


def test_pt_and_its_safetensors_conversion_show_zero_difference(tmp_path: Path, epochs) -> None:
    path_a, _, first, _ = epochs
    converted = tmp_path / "epoch1.safetensors"
    save_file(first, converted)
    result = ckptview.diff(path_a, converted, values=True)
    assert result.keys.ok and len(result.values.tensors) == len(first)
    assert result.values.changed() == ()
    assert {(t.max_abs_diff, t.rel_change, t.cosine, t.fraction_changed) for t in result.values.tensors} == {(0.0, 0.0, 1.0, 0.0)}


def test_lightning_file_against_its_exported_weights(tmp_path: Path, epochs) -> None:
    _, _, first, _ = epochs
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": first, "epoch": 1, "optimizer_states": []}, ckpt)
    exported = tmp_path / "model.safetensors"
    save_file(first, exported)
    assert ckptview.diff(ckpt, exported, values=True).values.changed() == ()


def test_nan_appearing_and_disappearing(tmp_path: Path) -> None:
    base = make_cnn().state_dict()
    broken = {k: v.clone() for k, v in base.items()}
    broken["conv1.weight"][0, 0] = float("nan")
    broken["conv1.weight"][1, 1, 1, 1] += 3.0
    broken["fc.weight"][2, :] = float("inf")
    for name, state in (("base.pt", base), ("broken.pt", broken)):
        torch.save(state, tmp_path / name)
    forward = ckptview.diff(tmp_path / "base.pt", tmp_path / "broken.pt", values=True).values
    backward = ckptview.diff(tmp_path / "broken.pt", tmp_path / "base.pt", values=True).values
    conv = {t.key: t for t in forward.tensors}["conv1.weight"]
    assert conv.nan_appeared and not conv.nan_disappeared and conv.nan_right == 9
    assert conv.max_abs_diff == pytest.approx(3.0, rel=1e-6)
    assert {t.key: t for t in backward.tensors}["conv1.weight"].nan_disappeared
    for change in forward.tensors:
        assert_matches_reference(change, base[change.key], broken[change.key])
    assert [t.key for t in forward.changed()] == ["conv1.weight", "fc.weight"]


def test_values_that_are_not_real_numbers_are_said_not_compared(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Complex tensors differing only in their imaginary parts read as equal once copied to real numbers:
    they are left out of the comparison and named, never reported unchanged."""
    left = {"w": torch.arange(4.0), "freqs": torch.polar(torch.ones(3), torch.arange(3.0))}
    right = {"w": torch.arange(4.0), "freqs": left["freqs"].conj()}
    for name, state in (("a.pt", left), ("b.pt", right)):
        torch.save(state, tmp_path / name)
    result = ckptview.diff(tmp_path / "a.pt", tmp_path / "b.pt", values=True)
    assert [t.key for t in result.values.tensors] == ["w"] and result.values.unreadable == ("freqs",)
    assert result.to_dict()["not_compared"] == ["freqs"]
    assert main(["diff", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--values"]) == 0
    assert "1 not compared (no values to compare as real numbers): freqs" in capsys.readouterr().out


def test_bf16_against_float32_compares_in_float32(tmp_path: Path) -> None:
    base = {k: v for k, v in make_cnn().state_dict().items() if v.is_floating_point()}
    save_file(base, tmp_path / "fp32.safetensors")
    save_file({k: v.bfloat16() for k, v in base.items()}, tmp_path / "bf16.safetensors")
    result = ckptview.diff(tmp_path / "fp32.safetensors", tmp_path / "bf16.safetensors", values=True)
    assert [(m.left, m.right) for m in result.keys.dtype_mismatches][:1] == [(torch.float32, torch.bfloat16)]
    for change in result.values.tensors:
        assert_matches_reference(change, base[change.key], base[change.key].bfloat16())
    assert max(t.rel_change for t in result.values.tensors) < 1e-2  # bf16 keeps ~3 significant digits


def test_edge_values_equal_the_reference_in_every_dtype(tmp_path: Path) -> None:
    """NaN/Inf starting a block of the kernel, ragged ends, -0 against +0, float32 sums that overflow."""
    generator = torch.Generator().manual_seed(3)
    left = torch.randn(3 * BLOCK + 17, generator=generator) * 0.02
    right = left + torch.randn(left.shape, generator=generator) * 1e-3
    left[BLOCK], right[BLOCK + 1], right[-1] = float("nan"), float("inf"), float("nan")
    left[100], right[100] = 0.0, -0.0  # equal: not a change
    right[200:300] = left[200:300]
    huge_left = torch.randn(9000, generator=generator) * 1e37
    huge_left[::500] = 3.4e38
    huge_right = huge_left * 0.5
    pairs = {
        "f32": (left, right),
        "bf16": (left.bfloat16(), right.bfloat16()),
        "f16": (left.half(), right.half()),
        "f64": (left.double(), right.double()),
        "bf16_vs_f16": (left.bfloat16(), right.half()),
        "f32_near_max": (huge_left, huge_right),
        "i64": (torch.arange(5000), torch.arange(5000) * 2 - 7),
    }
    torch.save({key: a for key, (a, _) in pairs.items()}, tmp_path / "a.pt")
    torch.save({key: b for key, (_, b) in pairs.items()}, tmp_path / "b.pt")
    with ckptview.open(tmp_path / "a.pt") as a, ckptview.open(tmp_path / "b.pt") as b:
        result = value_diff(model_state_dict(a), model_state_dict(b), chunk_elements=BLOCK + 5000)
    for change in result.tensors:
        assert_matches_reference(change, *pairs[change.key])
    assert {t.key: t.nan_left for t in result.tensors}["bf16"] == 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_random_bit_patterns_equal_the_reference(tmp_path: Path, dtype: torch.dtype) -> None:
    """NaNs with any payload and sign, ±Inf, ±0, subnormals and the largest values on both sides."""
    int_type = {2: torch.int16, 4: torch.int32}[dtype.itemsize]
    info = torch.iinfo(int_type)
    generator = torch.Generator().manual_seed(11)
    left, right = (torch.randint(info.min, info.max, (2 * BLOCK + 5,), dtype=int_type, generator=generator).view(dtype)
                   for _ in range(2))
    right[::3] = left[::3]  # some positions equal, NaN payloads included
    torch.save({"random": left}, tmp_path / "a.pt")
    torch.save({"random": right}, tmp_path / "b.pt")
    change = ckptview.diff(tmp_path / "a.pt", tmp_path / "b.pt", values=True).values.tensors[0]
    assert_matches_reference(change, left, right)


def test_ignore_patterns_and_mismatched_keys_are_left_out(tmp_path: Path, epochs) -> None:
    path_a, _, first, second = epochs
    renamed = dict(second)
    renamed["head.weight"] = renamed.pop("fc.weight")
    renamed["fc.bias"] = torch.zeros(3)
    torch.save(renamed, tmp_path / "renamed.pt")
    result = ckptview.diff(path_a, tmp_path / "renamed.pt", values=True, ignore=IGNORE_BN_STATS)
    assert result.keys.missing == ("head.weight",) and result.keys.unexpected == ("fc.weight",)
    assert [(m.key, m.left, m.right) for m in result.keys.shape_mismatches] == [("fc.bias", (10,), (3,))]
    stats = [k for k in first if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert result.values.ignored == tuple(stats)
    assert [t.key for t in result.values.tensors] == [k for k in first if k not in stats and not k.startswith("fc.")]


def test_module_and_block_aggregates_equal_the_concatenated_reference(epochs) -> None:
    path_a, path_b, first, second = epochs
    values = ckptview.diff(path_a, path_b, values=True).values
    blocks = {g.name: g for g in values.by_block()}
    assert list(blocks) == ["conv1", "bn1", "layer1.0", "layer1.1", "fc"]
    modules = {g.name: g for g in values.by_module()}
    # weight, bias, running_mean, running_var; num_batches_tracked is a counter, not drift
    assert "layer1.0.1" in modules and modules["layer1.0.1"].tensors == 4
    for name, group in [("layer1.1", blocks["layer1.1"]), ("layer1.0.1", modules["layer1.0.1"]), ("fc", modules["fc"])]:
        keys = [k for k in first if k.startswith(name + ".") and first[k].is_floating_point()]
        a = torch.cat([first[k].double().flatten() for k in keys])
        b = torch.cat([second[k].double().flatten() for k in keys])
        expected = reference(a, b)
        assert group.tensors == len(keys) and group.numel == a.numel()
        assert group.rel_change == pytest.approx(expected["rel_change"], rel=1e-4)
        assert group.cosine == pytest.approx(expected["cosine"], rel=1e-5)
        assert group.max_abs_diff == pytest.approx(expected["max_abs_diff"], rel=1e-6)
        assert group.fraction_changed == pytest.approx(expected["fraction_changed"])


def test_progress_reports_every_byte_and_cancel_stops_early(epochs) -> None:
    path_a, path_b, first, _ = epochs
    seen: list[tuple[int, int]] = []
    ckptview.diff(path_a, path_b, values=True, progress=lambda done, total: seen.append((done, total)))
    total = 2 * sum(v.numel() * v.element_size() for v in first.values())
    assert seen[-1] == (total, total) and len(seen) == len(first)

    stop = threading.Event()
    cancelled = ckptview.diff(path_a, path_b, values=True, threads=1, cancel=stop,
                              progress=lambda done, total: stop.set())
    assert not cancelled.values.complete
    assert 1 <= len(cancelled.values.tensors) < len(first)


def test_in_memory_state_dicts_and_to_frame(epochs) -> None:
    _, _, first, second = epochs
    result = ckptview.diff(first, nn.Module.state_dict(make_cnn()), values=True)
    frame = result.to_frame()
    assert list(frame["key"]) == list(first)
    assert {"max_abs_diff", "rel_change", "cosine", "fraction_changed", "nan_left", "nan_right"} <= set(frame.columns)
    assert all(math.isfinite(x) for x in frame["rel_change"])
    assert ckptview.diff(first, second).values is None


def test_integer_buffers_are_counters_compared_exactly_and_kept_out_of_module_drift(epochs) -> None:
    path_a, path_b, first, second = epochs
    values = ckptview.diff(path_a, path_b, values=True).values
    counters = {t.key: t for t in values.counters()}
    tracked = [k for k in first if k.endswith("num_batches_tracked")]
    assert sorted(counters) == sorted(tracked)
    for key in tracked:
        moved = int(second[key]) - int(first[key])
        assert moved == 3 and counters[key].max_abs_diff == moved and counters[key].changed
    # the BatchNorm module's change is its float tensors' alone: 2 -> 5 batches would otherwise
    # dominate its relative change (|3| against running statistics that moved by a few hundredths)
    bn = {g.name: g for g in values.by_module()}["bn1"]
    keys = [k for k in first if k.startswith("bn1.") and first[k].is_floating_point()]
    expected = reference(torch.cat([first[k].double().flatten() for k in keys]),
                         torch.cat([second[k].double().flatten() for k in keys]))
    assert bn.rel_change == pytest.approx(expected["rel_change"], rel=1e-4) and bn.rel_change < 0.5
