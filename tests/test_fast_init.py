"""`fast_init` makes the same records as a frozen dataclass's own __init__."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ckptview.readers.model import FileSource, Storage, TensorInfo, fast_init, strided_tensor


@dataclasses.dataclass(frozen=True)
class _Plain:
    a: int
    b: str = "x"
    c: tuple[int, ...] | None = dataclasses.field(default=None, repr=False)


_Fast = fast_init(dataclasses.dataclass(frozen=True)(type("_Fast", (), {
    "__annotations__": {"a": "int", "b": "str", "c": "tuple[int, ...] | None"},
    "b": "x", "c": dataclasses.field(default=None, repr=False)})))


def test_same_fields_defaults_equality_and_replace() -> None:
    plain, fast = _Plain(1), _Fast(1)
    assert dataclasses.asdict(plain) == dataclasses.asdict(fast) == {"a": 1, "b": "x", "c": None}
    assert _Fast(1, c=(2,)) == _Fast(a=1, b="x", c=(2,)) != _Fast(1)
    assert dataclasses.replace(fast, b="y") == _Fast(1, "y")
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.a = 2  # type: ignore[misc]
    with pytest.raises(TypeError):
        _Fast()  # type: ignore[call-arg]


def test_post_init_still_runs() -> None:
    # TensorInfo records a torch.dtype by its name in __post_init__
    info = TensorInfo((2, 3), torch.bfloat16, None)
    assert info.dtype == "bfloat16" and info.nbytes == 12
    assert dataclasses.replace(info, dtype=torch.float16).dtype == "float16"


def test_default_factory_is_refused() -> None:
    with pytest.raises(TypeError, match="default_factory"):
        fast_init(dataclasses.make_dataclass("_Bad", [("a", list, dataclasses.field(default_factory=list))], frozen=True))


def test_strided_tensor_is_the_record_the_keyword_init_makes() -> None:
    storage = Storage("0", FileSource(__file__), -1, 256, "cuda:1")
    made = strided_tensor((4, 8), "float16", storage, 3, (8, 1), True)
    expected = TensorInfo(shape=(4, 8), dtype="float16", storage=storage, storage_offset=3, stride=(8, 1),
                          requires_grad=True)
    assert made == expected and repr(made) == repr(expected) and hash(made) == hash(expected)
    fields = [f.name for f in dataclasses.fields(TensorInfo)]
    assert [getattr(made, name) for name in fields] == [getattr(expected, name) for name in fields]  # every default
    assert dataclasses.replace(made, is_parameter=True) == dataclasses.replace(expected, is_parameter=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.shape = (1,)  # type: ignore[misc]


def test_storage_fields_positional_and_by_keyword() -> None:
    source = FileSource(__file__)
    assert Storage("k", source, -1, 8, "cpu") == Storage(key="k", source=source, offset=-1, nbytes=8, location="cpu",
                                                         byteorder="little", locate=None)
