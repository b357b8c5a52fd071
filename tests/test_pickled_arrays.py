"""
Numpy arrays inside pickles are tensors: a Detectron2 model-zoo `.pkl` (`pickle.dump` of a dict of
arrays), arrays a training script saves beside torch tensors, every pickle protocol's way of writing
them (protocol 5 calls `numpy._core.numeric._frombuffer`), and pickles that abuse those records.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import ckptview
from ckptview.analyzers.training import plain
from ckptview.cli import main


def detectron_style(rng: np.random.Generator) -> dict[str, object]:
    """What Detectron2's model zoo ships: {"model": {name: ndarray}, "__author__": ...}, plus the odd layouts."""
    return {
        "model": {
            "backbone.bottom_up.stem.conv1.weight": rng.standard_normal((8, 3, 7, 7)).astype(np.float32),
            "backbone.bottom_up.stem.conv1.norm.running_var": rng.random(8).astype(np.float16),
            "roi_heads.box_predictor.cls_score.bias": np.arange(5, dtype=np.int64),
            "fortran": np.asfortranarray(rng.standard_normal((3, 4))),
            "big_endian": rng.standard_normal((2, 5)).astype(">f4"),
            "transposed": np.arange(24, dtype=np.int32).reshape(2, 3, 4).transpose(1, 0, 2),
            "mask": rng.random(6) > 0.5,
            "empty": np.zeros((0, 3), dtype=np.float32),
            "scalar_array": np.array(2.5),
        },
        "__author__": "Detectron2 Model Zoo",
        "classes": np.array(["person", "bicycle"]),  # a string array: values, not a tensor
        "matching_heuristics": True,
    }


def reference(saved: dict[str, object], path: tuple[object, ...]) -> np.ndarray:
    node: object = saved
    for key in path:
        node = node[key]  # type: ignore[index]
    assert isinstance(node, np.ndarray)
    return node


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_a_detectron2_pickle_lists_its_arrays_as_tensors(tmp_path: Path, protocol: int) -> None:
    saved = detectron_style(np.random.default_rng(protocol))
    path = tmp_path / "model_final.pkl"
    path.write_bytes(pickle.dumps(saved, protocol=protocol))
    with ckptview.open(path) as ckpt:
        assert ckpt.format == "pickle" and not ckpt.needs_trust
        entries = {entry.name: entry for entry in ckpt.tensors()}
        assert sorted(entries) == sorted(f"model.{name}" for name in saved["model"])  # type: ignore[attr-defined]
        for entry in entries.values():
            expected = reference(saved, entry.path)
            assert entry.shape == expected.shape and entry.dtype_name == expected.dtype.name
            loaded = entry.load()
            assert torch.equal(loaded, torch.from_numpy(expected.astype(expected.dtype.newbyteorder("="))))
        assert isinstance(ckpt.get(("classes",)), np.ndarray)  # strings stay values
        assert [s.kind for s in ckptview.sections(ckpt)][0] == "state_dict"
        conv = ckptview.stats(ckpt, filter="conv1.weight$", progress=False).tensors[0]
        weights = saved["model"]["backbone.bottom_up.stem.conv1.weight"]  # type: ignore[index]
        assert conv.min == pytest.approx(float(weights.min())) and conv.max == pytest.approx(float(weights.max()))
        assert conv.mean == pytest.approx(float(weights.mean()), rel=1e-5)
    assert main(["scan", str(path)]) == 0  # numpy's own constructors are data, not code


def test_arrays_in_a_torch_checkpoint_are_listed_beside_its_tensors(tmp_path: Path) -> None:
    path = tmp_path / "with_numpy.pt"
    anchors = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    torch.save({"state_dict": {"fc.weight": torch.ones(2, 2)}, "anchors": anchors, "epoch": np.int64(3)}, path)
    with ckptview.open(path) as ckpt:
        names = [entry.name for entry in ckpt.tensors()]
        assert names == ["state_dict.fc.weight", "anchors"]
        assert torch.equal(ckpt.tensor("anchors").load(), torch.from_numpy(anchors))
        assert not ckpt.needs_trust
    # shown as values where a checkpoint's metadata is shown: small arrays as numpy's tolist() gives them
    path = tmp_path / "history.pt"
    torch.save({"state_dict": {"fc.weight": torch.ones(2)}, "history": np.array([0.9, 0.8]), "big": np.zeros(40)}, path)
    with ckptview.open(path) as ckpt:
        assert plain(ckpt.root) == {"state_dict": {"fc.weight": "tensor[2] float32"}, "history": [0.9, 0.8],
                                    "big": "tensor[40] float64"}


class Holder:
    """A class of the file's own: its instance is a stand-in, its attributes data."""

    def __init__(self, weights: np.ndarray) -> None:
        self.weights = weights


def test_an_array_shared_or_inside_tuples_and_objects_is_one_tensor(tmp_path: Path) -> None:
    shared = np.arange(6, dtype=np.float64)
    path = tmp_path / "shared.pkl"
    # a tuple holding the array (rebuilt around the tensor), a list holding the same array, a cycle, an object
    cyclic: list[object] = [shared]
    cyclic.append(cyclic)
    path.write_bytes(pickle.dumps({"pair": (shared, "label"), "again": [shared], "cycle": cyclic,
                                   "holder": Holder(shared)}, protocol=4))
    with ckptview.open(path) as ckpt:
        assert ckpt.needs_trust  # Holder is code pickle.load would import
        entries = ckpt.tensors()
        assert [e.name for e in entries] == ["pair.0", "again.0", "cycle.0", "holder.weights"]
        assert len({id(e.info.storage) for e in entries}) == 1
        assert ckpt.total_bytes == shared.nbytes
        assert ckpt.get(("pair", 1)) == "label"


def test_an_array_nested_deeper_than_the_stack_is_found(tmp_path: Path) -> None:
    path = tmp_path / "deep.pkl"
    path.write_bytes(_deep_pickle(50_000))
    with ckptview.open(path) as ckpt:
        (entry,) = ckpt.tensors()
        assert len(entry.path) == 50_000 and torch.equal(entry.load(), torch.ones(3))


def _deep_pickle(depth: int) -> bytes:
    """[[[...[array]...]]] `depth` lists deep, written opcode by opcode (pickle.dumps recurses too deep)."""
    array = pickle.dumps(np.ones(3, dtype=np.float32), protocol=2)
    body = array[2:-1]  # without PROTO and STOP
    return b"\x80\x02" + b"]" * depth + body + b"a" * depth + b"."


def _protocol5_record(data: bytes, shape: tuple[int, ...], order: str = "C",
                      axis_order: tuple[int, ...] | None = None) -> bytes:
    """A pickle calling numpy._core.numeric._frombuffer(data, float32, shape, order[, axis_order]) by hand."""
    out = io.BytesIO()
    out.write(b"\x80\x05")
    out.write(b"\x8c\x13numpy._core.numeric\x8c\x0b_frombuffer\x93(")
    out.write(b"\x96" + len(data).to_bytes(8, "little") + data)
    out.write(pickle.dumps(np.dtype("float32"), protocol=2)[2:-1])
    out.write(pickle.dumps(shape, protocol=2)[2:-1])
    out.write(pickle.dumps(order, protocol=2)[2:-1])
    if axis_order is not None:
        out.write(pickle.dumps(axis_order, protocol=2)[2:-1])
    out.write(b"tR.")
    return out.getvalue()


def test_protocol5_records_are_checked_before_numpy_sees_them(tmp_path: Path) -> None:
    good = tmp_path / "good.pkl"
    good.write_bytes(_protocol5_record(np.arange(6, dtype=np.float32).tobytes(), (2, 3)))
    assert np.array_equal(pickle.loads(good.read_bytes()), np.arange(6, dtype=np.float32).reshape(2, 3))
    with ckptview.open(good) as ckpt:
        assert torch.equal(ckpt.tensors()[0].load(), torch.arange(6.0).reshape(2, 3))
    for name, record, why in [
        ("short.pkl", _protocol5_record(b"\0" * 20, (2, 3)), "not that many bytes"),
        ("huge.pkl", _protocol5_record(b"\0" * 24, (2**40, 2**40)), "elements"),
        ("axes.pkl", _protocol5_record(b"\0" * 24, (2, 3), "K", (0, 0)), "permutation"),
        ("order.pkl", _protocol5_record(b"\0" * 24, (2, 3), "Z"), "protocol-5 record"),
    ]:
        bad = tmp_path / name
        bad.write_bytes(record)
        with pytest.raises(ckptview.CkptviewError, match=why):
            ckptview.open(bad)
