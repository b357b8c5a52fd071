"""
What `torch.load(weights_only=True)` reads, as far as a file's listing can tell: the pickle protocols
its unpickler steps through, and the globals it allows by default. ckptview's own allow-list is wider
(it calls nothing it resolves), so a file that needs no foreign code may still be refused by torch's
weights-only unpickler. `scan` and `info` then say what stands in the way, rather than promise a load
that fails ("Unsupported global: GLOBAL numpy.core.multiarray.scalar", "Unsupported operand 149").

`REFUSED_BY_DEFAULT` is ckptview's allow-list less torch's `_get_allowed_globals()` (torch 2.13);
tests/test_weights_only.py checks it against the torch installed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

# the opcodes of pickle protocols 2 and 3 (torch.save's default is 2); 0 and 1 write text opcodes
# (INT, LONG), 4 and 5 FRAME, and torch's unpickler reads none of those
READ_PROTOCOLS = (2, 3)

REFUSED_BY_DEFAULT = frozenset({
    "builtins.bool", "builtins.bytes", "builtins.dict", "builtins.float", "builtins.frozenset", "builtins.int",
    "builtins.list", "builtins.slice", "builtins.str", "builtins.tuple", "collections.defaultdict",
    "collections.deque", "copyreg._reconstructor", "numpy._core.multiarray._reconstruct",
    "numpy._core.multiarray.scalar", "numpy._core.numeric._frombuffer", "numpy.core.multiarray._reconstruct",
    "numpy.core.multiarray.scalar", "numpy.core.numeric._frombuffer",
    "numpy.dtype", "numpy.dtypes.BoolDType", "numpy.dtypes.ByteDType", "numpy.dtypes.BytesDType",
    "numpy.dtypes.CLongDoubleDType", "numpy.dtypes.Complex128DType", "numpy.dtypes.Complex64DType",
    "numpy.dtypes.DateTime64DType", "numpy.dtypes.Float16DType", "numpy.dtypes.Float32DType",
    "numpy.dtypes.Float64DType", "numpy.dtypes.Int16DType", "numpy.dtypes.Int32DType", "numpy.dtypes.Int64DType",
    "numpy.dtypes.Int8DType", "numpy.dtypes.IntDType", "numpy.dtypes.LongDType", "numpy.dtypes.LongDoubleDType",
    "numpy.dtypes.LongLongDType", "numpy.dtypes.ObjectDType", "numpy.dtypes.ShortDType", "numpy.dtypes.StrDType",
    "numpy.dtypes.StringDType", "numpy.dtypes.TimeDelta64DType", "numpy.dtypes.UByteDType",
    "numpy.dtypes.UInt16DType", "numpy.dtypes.UInt32DType", "numpy.dtypes.UInt64DType", "numpy.dtypes.UInt8DType",
    "numpy.dtypes.UIntDType", "numpy.dtypes.ULongDType", "numpy.dtypes.ULongLongDType", "numpy.dtypes.UShortDType",
    "numpy.dtypes.VoidDType", "numpy.ndarray", "torch.UntypedStorage", "torch._tensor._rebuild_from_type",
    "torch._utils._rebuild_mtia_tensor", "torch._utils._rebuild_sparse_csr_tensor",
    "torch._utils._rebuild_xla_tensor", "torch.cdouble", "torch.cfloat", "torch.chalf", "torch.cuda.QInt32Storage",
    "torch.cuda.QInt8Storage", "torch.cuda.QUInt2x4Storage", "torch.cuda.QUInt4x2Storage", "torch.cuda.QUInt8Storage",
    "torch.cuda.UntypedStorage", "torch.double", "torch.float", "torch.half", "torch.int",
    "torch.jit._pickle.build_boollist", "torch.jit._pickle.build_complexlist", "torch.jit._pickle.build_doublelist",
    "torch.jit._pickle.build_intlist", "torch.jit._pickle.build_tensorlist", "torch.jit._pickle.restore_type_tag",
    "torch.long", "torch.short", "torch.storage.BFloat16Storage", "torch.storage.BoolStorage",
    "torch.storage.ByteStorage", "torch.storage.CharStorage", "torch.storage.ComplexDoubleStorage",
    "torch.storage.ComplexFloatStorage", "torch.storage.DoubleStorage", "torch.storage.FloatStorage",
    "torch.storage.HalfStorage", "torch.storage.IntStorage", "torch.storage.LongStorage",
    "torch.storage.QInt32Storage", "torch.storage.QInt8Storage", "torch.storage.QUInt2x4Storage",
    "torch.storage.QUInt4x2Storage", "torch.storage.QUInt8Storage", "torch.storage.ShortStorage",
})


# torch's own classes (and one rebuild function) that its weights-only unpickler accepts once their
# package is imported (the package adds them with torch.serialization.add_safe_globals). A pickle naming
# them is not foreign code: ckptview's unpickler builds them as records, like any class a file names,
# never importing or calling them; torch.load(weights_only=True) needs the package imported first.
TORCH_SAFE_CLASSES: dict[str, str] = dict.fromkeys((  # class path -> the module torch.load needs imported first
    "torch.distributed.tensor.DTensor", "torch.distributed.device_mesh.DeviceMesh",
    "torch.distributed.tensor._dtensor_spec.DTensorSpec", "torch.distributed.tensor._dtensor_spec.TensorMeta",
    "torch.distributed.tensor._dtensor_spec.ShardOrderEntry", "torch.distributed.tensor.placement_types.Partial",
    "torch.distributed.tensor.placement_types.Replicate", "torch.distributed.tensor.placement_types.Shard",
    "torch.distributed.tensor.placement_types._StridedShard", "torch.distributed._mesh_layout._MeshLayout",
    "torch.distributed._mesh_layout._FlatLayout"), "torch.distributed.tensor") | {
    # nested jagged tensors: their class and rebuild function, and the dynamic-size marks they carry
    "torch.nested._internal.nested_tensor.NestedTensor": "torch.nested",
    "torch.nested._internal.nested_tensor._rebuild_njt": "torch.nested",
    "torch._dynamo.decorators._DimRange": "torch._dynamo",
}


def safe_loader_obstacle(details: Mapping[str, Any]) -> str:
    """Why the format's own safe loader (torch.load(weights_only=True), numpy.load, safetensors'
    load_file) refuses a file that needs no foreign code, from its reader's `details`; "" when it loads it."""
    return details.get("weights_only") or details.get("allow_pickle") or details.get("load_file") or ""


def weights_only_obstacle(protocol: int | None, allowed_globals: Iterable[str]) -> str:
    """Why torch.load(weights_only=True) would refuse a pickle of `protocol` (None: 0 or 1, no PROTO
    opcode) that names `allowed_globals` (all on ckptview's allow-list); empty when it would not."""
    if protocol not in READ_PROTOCOLS:
        written = "0 or 1" if protocol is None else str(protocol)
        return (f"torch.load(weights_only=True) cannot read its pickle (protocol {written}; it reads protocols 2 and "
                "3): re-save it with torch.save's default protocol")
    named = set(allowed_globals)
    packages = sorted({TORCH_SAFE_CLASSES[name] for name in named & TORCH_SAFE_CLASSES.keys()})
    if packages:
        return (f"torch.load(weights_only=True) reads it only once {' and '.join(packages)} "
                f"{'is' if len(packages) == 1 else 'are'} imported: import {'it' if len(packages) == 1 else 'them'} "
                "before loading")
    refused = sorted(named & REFUSED_BY_DEFAULT)
    if refused:
        names = ", ".join(refused[:3]) + (f" and {len(refused) - 3} more" if len(refused) > 3 else "")
        return (f"torch.load(weights_only=True) refuses {names} by default: allow them with "
                "torch.serialization.safe_globals")
    return ""
