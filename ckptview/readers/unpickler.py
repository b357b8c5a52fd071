"""
An allow-listed unpickler that builds no arbitrary objects.

torch writes checkpoints as pickles whose tensors point at storages by a persistent id. This
unpickler replaces torch's tensor-rebuild functions with ones that record shape, dtype, stride
and storage as `TensorInfo` (no bytes read), lets plain data types through, and turns every
other global into a `PickledObject` subclass that only remembers what it was given. Nothing the
file names is imported or called, so a malicious pickle is listed, not run.
"""

from __future__ import annotations

import _compat_pickle
import io
import pickle
import collections
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from ckptview.readers.model import PickledObject, PickleImport, Storage, TensorInfo



class StorageType:
    """What `torch.FloatStorage` & co. stand for in a pickle: the element dtype of a storage."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


def _storage_types() -> dict[str, StorageType]:
    types = {"UntypedStorage": StorageType(torch.uint8), "ByteStorage": StorageType(torch.uint8)}
    for dtype, name in torch.storage._dtype_to_storage_type_map().items():
        types[name] = StorageType(dtype)
    return types


def _dtypes() -> dict[str, torch.dtype]:
    return {name: value for name, value in vars(torch).items() if isinstance(value, torch.dtype)}


_QSCHEMES = {
    str(scheme): scheme
    for scheme in (
        torch.per_tensor_affine,
        torch.per_tensor_symmetric,
        torch.per_channel_affine,
        torch.per_channel_symmetric,
        torch.per_channel_affine_float_qparams,
    )
}


class _Layout:
    def __init__(self, name: str) -> None:
        self.name = name


def _as_tuple(value: Any) -> tuple[int, ...]:
    return tuple(map(int, value))


def _rebuild_tensor(storage: Any, storage_offset: int, size: Any, stride: Any, *_: Any) -> TensorInfo:
    return _strided(storage, storage_offset, size, stride, None)


def _rebuild_tensor_v2(storage: Any, storage_offset: int, size: Any, stride: Any, requires_grad: Any = False, *_: Any) -> TensorInfo:
    return _strided(storage, storage_offset, size, stride, None, requires_grad)


def _rebuild_tensor_v3(storage: Any, storage_offset: int, size: Any, stride: Any, requires_grad: Any, backward_hooks: Any, dtype: torch.dtype, *_: Any) -> TensorInfo:
    return _strided(storage, storage_offset, size, stride, dtype, requires_grad)


def _strided(storage: Any, storage_offset: int, size: Any, stride: Any, dtype: torch.dtype | None, requires_grad: Any = False) -> TensorInfo:
    if not isinstance(storage, _StorageRef):
        raise pickle.UnpicklingError(f"a tensor refers to {type(storage).__name__}, not to a storage")
    shape, strides, offset = _as_tuple(size), _as_tuple(stride), int(storage_offset)
    if len(shape) != len(strides) or min((*shape, *strides, offset), default=0) < 0:
        raise pickle.UnpicklingError(f"a tensor has size {list(shape)}, stride {list(strides)} and offset {offset}, "
                                     "which do not describe a tensor")
    return TensorInfo(
        shape=shape,
        dtype=dtype if isinstance(dtype, torch.dtype) else storage.dtype,
        storage=storage.storage,
        storage_offset=offset,
        stride=strides,
        requires_grad=bool(requires_grad),
    )


def _rebuild_parameter(data: Any, requires_grad: Any = True, *_: Any) -> Any:
    if isinstance(data, TensorInfo):
        return data.with_flags(is_parameter=True, requires_grad=bool(requires_grad))
    return data


def _rebuild_qtensor(storage: Any, storage_offset: int, size: Any, stride: Any, quantizer_params: Any, requires_grad: Any = False, *_: Any) -> TensorInfo:
    info = _strided(storage, storage_offset, size, stride, None, requires_grad)
    scheme, *params = quantizer_params
    if len(params) != (2 if "per_tensor" in str(scheme) else 3):
        raise pickle.UnpicklingError(f"quantized tensor with scheme {scheme} has {len(params)} parameters")
    return info.with_flags(layout="quantized", quantizer=(str(scheme).replace("torch.", ""), *params))


def _rebuild_sparse_tensor(layout: Any, data: Any) -> TensorInfo:
    name = getattr(layout, "name", str(layout)).replace("torch.", "")
    if name == "sparse_coo":
        indices, values, size = data[0], data[1], data[2]
        components = {"indices": indices, "values": values}
    else:
        compressed, plain, values, size = data[0], data[1], data[2], data[3]
        names = {"sparse_csr": ("crow_indices", "col_indices"), "sparse_csc": ("ccol_indices", "row_indices"),
                 "sparse_bsr": ("crow_indices", "col_indices"), "sparse_bsc": ("ccol_indices", "row_indices")}
        first, second = names.get(name, ("compressed_indices", "plain_indices"))
        components = {first: compressed, second: plain, "values": values}
    values_info = components["values"]
    dtype = values_info.dtype if isinstance(values_info, TensorInfo) else torch.float32
    return TensorInfo(
        shape=_as_tuple(size),
        dtype=dtype,
        storage=None,
        layout=name,
        components={k: v for k, v in components.items() if isinstance(v, TensorInfo)},
    )


def _rebuild_meta_tensor_no_storage(dtype: torch.dtype, size: Any, stride: Any, requires_grad: Any = False, *_: Any) -> TensorInfo:
    return TensorInfo(shape=_as_tuple(size), dtype=dtype, storage=None, stride=_as_tuple(stride), layout="meta", requires_grad=bool(requires_grad))


def _unsupported(kind: str) -> Callable[..., TensorInfo]:
    def rebuild(*args: Any) -> TensorInfo:
        tensors = [a for a in args if isinstance(a, TensorInfo)]
        shape = tensors[0].shape if tensors else ()
        dtype = next((a for a in args if isinstance(a, torch.dtype)), tensors[0].dtype if tensors else torch.float32)
        return TensorInfo(shape=shape, dtype=dtype, storage=None, layout="unsupported", note=kind)

    return rebuild


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    result = func(*args)
    if isinstance(result, TensorInfo):
        if new_type is _PARAMETER:
            return result.with_flags(is_parameter=True)
        if isinstance(new_type, type) and issubclass(new_type, PickledObject):
            return result.with_flags(subclass=new_type.class_path)
    return result


def _rebuild_device_tensor_from_cpu_tensor(data: Any, dtype: Any, device: Any, requires_grad: Any) -> Any:
    if isinstance(data, TensorInfo) and data.storage is not None:
        return data.with_flags(requires_grad=bool(requires_grad))
    return data


def _bytes_source(data: Any = b"", encoding: str | None = None, *_: Any) -> bytes | bytearray:
    # bytes(n) / bytearray(n) allocate n zero bytes: a 16-byte pickle could ask for terabytes
    if isinstance(data, (bytes, bytearray)):
        return data
    if isinstance(data, str):
        return data.encode(encoding or "latin1")
    if isinstance(data, (list, tuple)) and all(isinstance(b, int) for b in data):
        return bytes(data)
    raise pickle.UnpicklingError(f"bytes/bytearray from {type(data).__name__} is not accepted")


def _encode(text: str, encoding: str = "latin1") -> bytes:
    # protocol 2 pickles bytes as _codecs.encode(str, "latin1"); refuse every other use
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode is only accepted for latin1-encoded bytes")
    return text.encode("latin1")


def _make_parameter(data: Any = None, requires_grad: Any = True) -> Any:
    return _rebuild_parameter(data, requires_grad)


_PARAMETER = _make_parameter  # torch.nn.Parameter, called or named as the type of a rebuilt tensor


def _numpy_globals() -> dict[str, Any]:
    try:
        import numpy
    except ImportError:
        return {}
    reconstruct = numpy.ndarray.__reduce__(numpy.zeros(0))[0]  # numpy.core / numpy._core, whichever this numpy has
    scalar = numpy.float64(0).__reduce__()[0]
    allowed: dict[str, Any] = {"numpy.ndarray": numpy.ndarray, "numpy.dtype": numpy.dtype}
    for core in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[f"{core}._reconstruct"] = reconstruct
        allowed[f"{core}.scalar"] = scalar
    for name in dir(getattr(numpy, "dtypes", None) or ()):
        if name.endswith("DType"):
            allowed[f"numpy.dtypes.{name}"] = getattr(numpy.dtypes, name)
    return allowed


def _build_allow_list() -> dict[str, Any]:
    allowed: dict[str, Any] = {
        "collections.OrderedDict": OrderedDict,
        "collections.Counter": Counter,
        "builtins.set": set,
        "builtins.frozenset": frozenset,
        "builtins.complex": complex,
        "builtins.bytearray": lambda *args: bytearray(_bytes_source(*args)),
        "builtins.slice": slice,
        # plain types named as values (config objects record the type of a field) or used as factories
        **{f"builtins.{t.__name__}": t for t in (dict, list, tuple, int, float, str, bool)},
        "builtins.bytes": lambda *args: bytes(_bytes_source(*args)),
        "collections.defaultdict": collections.defaultdict,
        "collections.deque": collections.deque,
        "_codecs.encode": _encode,
        "torch.Size": tuple,
        "torch.device": lambda *args: str(torch.device(*args)),
        "torch.nn.parameter.Parameter": _PARAMETER,
        "torch.serialization._get_layout": lambda name: _Layout(name),
        "torch._utils._rebuild_tensor": _rebuild_tensor,
        "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
        "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
        "torch._utils._rebuild_parameter": _rebuild_parameter,
        "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
        "torch._utils._rebuild_qtensor": _rebuild_qtensor,
        "torch._utils._rebuild_sparse_tensor": _rebuild_sparse_tensor,
        "torch._utils._rebuild_sparse_csr_tensor": _rebuild_sparse_tensor,
        "torch._utils._rebuild_meta_tensor_no_storage": _rebuild_meta_tensor_no_storage,
        "torch._utils._rebuild_nested_tensor": _unsupported("nested tensor"),
        "torch._utils._rebuild_wrapper_subclass": _unsupported("tensor wrapper subclass"),
        "torch._utils._rebuild_device_tensor_from_numpy": _unsupported("tensor rebuilt from a numpy array"),
        "torch._utils._rebuild_device_tensor_from_cpu_tensor": _rebuild_device_tensor_from_cpu_tensor,
        "torch._utils._rebuild_xla_tensor": _unsupported("XLA tensor"),
        "torch._utils._rebuild_mtia_tensor": _unsupported("MTIA tensor"),
        "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
        "torch._tensor._rebuild_from_type": lambda func, new_type, args, state=None: _rebuild_from_type_v2(func, new_type, args, state),
        # TorchScript archives wrap typed lists and tag types; the value itself is plain data
        "torch.jit._pickle.build_intlist": list,
        "torch.jit._pickle.build_doublelist": list,
        "torch.jit._pickle.build_boollist": list,
        "torch.jit._pickle.build_tensorlist": list,
        "torch.jit._pickle.build_complexlist": list,
        "torch.jit._pickle.restore_type_tag": lambda value, type_str: value,
    }
    allowed.update({f"torch.{name}": dtype for name, dtype in _dtypes().items()})
    allowed.update({f"torch.{name}": storage for name, storage in _storage_types().items()})
    allowed.update({f"torch.storage.{name}": storage for name, storage in _storage_types().items()})
    allowed.update({f"torch.cuda.{name}": storage for name, storage in _storage_types().items()})
    allowed.update(_QSCHEMES)
    allowed.update(_numpy_globals())
    for tensor_class in ("Tensor", "FloatTensor", "DoubleTensor", "HalfTensor", "BFloat16Tensor", "LongTensor",
                         "IntTensor", "ShortTensor", "CharTensor", "ByteTensor", "BoolTensor"):
        allowed[f"torch.{tensor_class}"] = _PlainTensorType
    return allowed


class _PlainTensorType:
    """torch.Tensor named as the type in `_rebuild_from_type_v2`: a plain tensor, nothing to do."""


class _StorageRef:
    """What a persistent id resolves to: a storage and the dtype its elements were saved as."""

    def __init__(self, storage: Storage, dtype: torch.dtype) -> None:
        self.storage = storage
        self.dtype = dtype


_ALLOWED: dict[str, Any] | None = None


def _allowed() -> dict[str, Any]:
    global _ALLOWED
    if _ALLOWED is None:
        _ALLOWED = _build_allow_list()
    return _ALLOWED


def is_allowed_global(name: str) -> bool:
    return name in _allowed()


SCRIPT_CLASS_PREFIX = "__torch__."

PersistentLoader = Callable[[StorageType, str, str, int, Any], Storage]


class SafeUnpickler(pickle.Unpickler):
    """
    Unpickle torch checkpoint pickles without importing or calling anything the file names.

    `storage_for(storage_type_dtype, key, location, numel, view_metadata)` maps a persistent
    storage id to a `Storage` (the reader knows where its bytes are); `imports` counts every
    global outside the allow-list.
    """

    def __init__(self, file: io.BufferedIOBase | io.BytesIO, storage_for: Callable[..., Storage] | None = None) -> None:
        super().__init__(file, encoding="utf-8")
        self._storage_for = storage_for
        self.imports: Counter[str] = Counter()
        self._stand_ins: dict[str, type[PickledObject]] = {}

    def find_class(self, module: str, name: str) -> Any:
        # Python 2 era names (__builtin__.long, copy_reg), mapped as pickle's fix_imports does
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        else:
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        full_name = f"{module}.{name}"
        allowed = _allowed()
        if full_name in allowed:
            return allowed[full_name]
        if full_name == "copyreg._reconstructor":
            return _reconstructor
        return self._stand_in(full_name)

    def _stand_in(self, full_name: str) -> type[PickledObject]:
        stand_in = self._stand_ins.get(full_name)
        if stand_in is None:
            counter = self.imports
            module, _, qualname = full_name.rpartition(".")

            def __new__(cls: type[PickledObject], *args: Any, **kwargs: Any) -> PickledObject:
                counter[full_name] += 1
                return PickledObject.__new__(cls, *args, **kwargs)

            stand_in = type(qualname or full_name, (PickledObject,), {
                "class_path": full_name, "__module__": "ckptview.pickled." + module, "__new__": __new__,
            })
            self._stand_ins[full_name] = stand_in
            counter[full_name] += 0  # named, even if never called
        return stand_in

    def persistent_load(self, saved_id: Any) -> Any:
        if not isinstance(saved_id, tuple) or not saved_id:
            raise pickle.UnpicklingError(f"unknown persistent id {saved_id!r}")
        kind = saved_id[0].decode("ascii") if isinstance(saved_id[0], bytes) else saved_id[0]
        if kind == "module":  # legacy format records a module's class (and its source) here
            return saved_id[1]
        if kind != "storage" or self._storage_for is None:
            raise pickle.UnpicklingError(f"unknown persistent id kind {kind!r}")
        storage_type, key, location = saved_id[1], str(saved_id[2]), saved_id[3]
        location = location.decode("ascii") if isinstance(location, bytes) else str(location)
        numel = int(saved_id[4])
        view_metadata = saved_id[5] if len(saved_id) > 5 else None
        dtype = storage_type.dtype if isinstance(storage_type, StorageType) else torch.uint8
        return _StorageRef(self._storage_for(dtype, key, location, numel, view_metadata), dtype)

    def pickle_imports(self) -> list[PickleImport]:
        """Globals outside the allow-list. TorchScript's own classes (`__torch__.…`) are not Python
        imports (their code is in the archive, run only by torch.jit.load) and are left out."""
        return [PickleImport(name, max(count, 1)) for name, count in sorted(self.imports.items())
                if not name.startswith(SCRIPT_CLASS_PREFIX)]

    def script_classes(self) -> list[str]:
        return sorted(name for name in self.imports if name.startswith(SCRIPT_CLASS_PREFIX))


def _reconstructor(cls: Any, base: Any, state: Any = None) -> Any:
    # protocol 0/1 pickles build objects through copyreg._reconstructor; only stand-ins and
    # allowed containers get built
    if isinstance(cls, type) and issubclass(cls, PickledObject):
        return cls(state) if state is not None else cls()
    if cls in (OrderedDict, dict, list, set):
        return cls()
    raise pickle.UnpicklingError(f"copyreg._reconstructor of {cls!r} is not allowed")
