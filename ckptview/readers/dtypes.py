"""
Element types by name, so listing a file never imports torch (1.3 s of a 1.9 s `ckptview info`).

A `TensorInfo` records its dtype as torch's own name for it ("float32", "qint8", "float8_e4m3fn");
`torch_dtype(name)` turns it into a `torch.dtype` where tensor data is read or a model is built.
`tests/test_header_only.py` checks this table against the installed torch.
"""

from __future__ import annotations

from typing import Any

from ckptview.lazy import torch

# torch's dtype name -> bytes per element
ITEMSIZE: dict[str, int] = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2,
    "float8_e4m3fn": 1, "float8_e4m3fnuz": 1, "float8_e5m2": 1, "float8_e5m2fnuz": 1, "float8_e8m0fnu": 1,
    "float4_e2m1fn_x2": 1,
    "complex128": 16, "complex64": 8, "complex32": 4,
    "int64": 8, "int32": 4, "int16": 2, "int8": 1,
    "uint64": 8, "uint32": 4, "uint16": 2, "uint8": 1, "bool": 1,
    "qint32": 4, "qint8": 1, "quint8": 1, "quint4x2": 1, "quint2x4": 1,
    "bits16": 2, "bits8": 1, "bits1x8": 1, "bits2x4": 1, "bits4x2": 1,
    **{f"int{bits}": 1 for bits in range(1, 8)}, **{f"uint{bits}": 1 for bits in range(1, 8)},
}

# Dtypes torch lists and stores but cannot convert to any other (its copy kernels have no case for
# them: `.to(torch.float32)` raises NotImplementedError): two FP4 values packed per byte, the bit
# containers, the sub-byte integers. Their tensors are listed and loaded as torch loads them, with no
# statistics and no value comparison.
UNCONVERTIBLE: frozenset[str] = frozenset({
    "float4_e2m1fn_x2", "bits16", "bits8", "bits1x8", "bits2x4", "bits4x2",
    *(f"int{bits}" for bits in range(1, 8)), *(f"uint{bits}" for bits in range(1, 8)),
})

# other names torch gives the same dtypes (torch.float is torch.float32)
ALIASES: dict[str, str] = {
    "float": "float32", "double": "float64", "half": "float16", "cfloat": "complex64", "cdouble": "complex128",
    "chalf": "complex32", "long": "int64", "int": "int32", "short": "int16",
}

# torch.save names a storage by its class; the element type is the class's dtype
STORAGE_CLASSES: dict[str, str] = {
    "UntypedStorage": "uint8", "ByteStorage": "uint8", "CharStorage": "int8", "ShortStorage": "int16",
    "IntStorage": "int32", "LongStorage": "int64", "HalfStorage": "float16", "FloatStorage": "float32",
    "DoubleStorage": "float64", "BFloat16Storage": "bfloat16", "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64", "ComplexDoubleStorage": "complex128",
    "QUInt8Storage": "quint8", "QInt8Storage": "qint8", "QInt32Storage": "qint32",
    "QUInt4x2Storage": "quint4x2", "QUInt2x4Storage": "quint2x4",
}


def dtype_name(dtype: Any) -> str:
    """torch.float32 or "float32" -> "float32" (torch's own name, as `--json` output uses it)."""
    if isinstance(dtype, str):
        return dtype.removeprefix("torch.")
    return str(dtype).removeprefix("torch.")


def numpy_dtype_name(dtype: Any) -> str | None:
    """torch's name for a numpy dtype's element type (what `torch.from_numpy` gives), or None for
    strings, objects, records, datetimes and long doubles, which torch has no dtype for."""
    name = dtype.name
    if dtype.kind not in "biufc" or dtype.fields is not None or dtype.subdtype is not None:
        return None
    return name if ITEMSIZE.get(name) == dtype.itemsize else None


def itemsize(name: str) -> int:
    size = ITEMSIZE.get(name)
    if size is None:
        # a dtype newer than this table: the installed torch knows it
        size = torch_dtype(name).itemsize
    return size


def torch_dtype(name: str) -> Any:
    """"float32" -> torch.float32 (imports torch)."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"torch {torch.__version__} has no dtype {name!r}")
    return dtype
