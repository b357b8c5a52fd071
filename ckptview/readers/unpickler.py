"""
An allow-listed unpickler that builds no arbitrary objects.

torch writes checkpoints as pickles whose tensors point at storages by a persistent id. This
unpickler replaces torch's tensor-rebuild functions with ones that record shape, dtype, stride
and storage as `TensorInfo` (no bytes read), lets plain data types through, and turns every
other global into a `PickledObject` subclass that only remembers what it was given. Nothing the
file names is imported or called, so a malicious pickle is listed, not run.

One file must never change how the next is read. The pickle's BUILD opcode writes attributes
into whatever object is on its stack (through `__setstate__`, else `__dict__` and `setattr`), and
that object may be one the unpickler handed out: a global shared by every file (a storage type,
a rebuild function) or a record it built (`TensorInfo`). So every global handed out is either an
immutable built-in type or value, or a `_Sealed` object whose `__setstate__` refuses; records
refuse the same way; and the dict subclasses whose instances a pickle may BUILD (OrderedDict
carries `_metadata` that way) keep the state as data instead of applying it.
"""

from __future__ import annotations

import _compat_pickle
import io
import math
import pickle
import collections
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any

from ckptview.lazy import torch
from ckptview.readers.dtypes import ALIASES, ITEMSIZE, STORAGE_CLASSES, itemsize, numpy_dtype_name
from ckptview.readers.model import (
    MemorySource,
    PickledObject,
    PickleImport,
    RefusedPickle,
    Storage,
    TensorInfo,
    contiguous_stride,
    refuse_pickle_state,
)
from ckptview.readers.weights_only import TORCH_SAFE_CLASSES


class _Sealed:
    """An object the unpickler hands out: BUILD on it is refused, and with no `__dict__` nothing else can be set."""

    __slots__ = ()
    __setstate__ = refuse_pickle_state


class StorageType(_Sealed):
    """What `torch.FloatStorage` & co. stand for in a pickle: the element dtype of a storage."""

    __slots__ = ("dtype",)

    def __init__(self, dtype: str) -> None:
        self.dtype = dtype


class DTypeRef(_Sealed):
    """`torch.float32` & co. as a pickle names them: the dtype's name (no torch needed to list a file)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"torch.{self.name}"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DTypeRef) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)


class QScheme(_Sealed):
    """`torch.per_tensor_affine` & co. as a pickle names them."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __str__(self) -> str:
        return f"torch.{self.name}"


def _sealed_callable(call: Callable[..., Any]) -> _Sealed:
    """
    A function or Python class from the allow-list, as a pickle gets it: callable, nothing else.
    Its own class calls `call` (a static `__call__`), so no wrapper frame runs per call: a
    20,000-tensor file makes 40,000 such calls.
    """
    sealed = type("Allowed", (_Sealed,), {"__slots__": (), "__call__": staticmethod(call)})
    return sealed()


class _PickledOrderedDict(OrderedDict):  # type: ignore[type-arg]
    """OrderedDict as a pickle builds it: torch state dicts BUILD their `_metadata` onto it, kept here as data."""

    def __setstate__(self, state: Any) -> None:
        self.pickled_state = state


class _PickledCounter(Counter):  # type: ignore[type-arg]
    """Counter as a pickle builds it: a BUILT state is kept as data, never as attributes."""

    def __setstate__(self, state: Any) -> None:
        self.pickled_state = state


_STORAGE_TYPES = {name: StorageType(dtype) for name, dtype in STORAGE_CLASSES.items()}

_DTYPES = {name: DTypeRef(name) for name in ITEMSIZE} | {alias: DTypeRef(name) for alias, name in ALIASES.items()}

_QSCHEMES = {f"torch.{name}": QScheme(name) for name in (
    "per_tensor_affine", "per_tensor_symmetric", "per_channel_affine", "per_channel_symmetric",
    "per_channel_affine_float_qparams")}


class _Layout(_Sealed):
    __slots__ = ("name",)

    def __init__(self, name: Any) -> None:
        self.name = str(name)


MAX_ELEMENTS = 2**62  # beyond what any storage can hold; keeps numel * itemsize within int64


def _as_tuple(value: Any) -> tuple[int, ...]:
    # a plain loop: this runs twice per tensor, and all() over a generator cost a third of it
    if type(value) is not tuple:
        if not isinstance(value, (tuple, list)):
            raise RefusedPickle("a tensor's size or stride is not a list of integers")
        value = tuple(value)
    for item in value:
        if type(item) is not int:
            raise RefusedPickle("a tensor's size or stride is not a list of integers")
    return value


def _dtype(value: Any) -> str:
    if not isinstance(value, DTypeRef):
        raise RefusedPickle("a tensor's dtype is not a torch dtype")
    return value.name


def _checked_shape(value: Any) -> tuple[int, ...]:
    shape = _as_tuple(value)
    numel = 1
    for size in shape:
        if size < 0:
            raise RefusedPickle(f"a tensor has a negative size {list(shape)}")
        numel *= size
        if numel > MAX_ELEMENTS:
            raise RefusedPickle(f"a tensor claims {numel:,}+ elements, more than any storage can hold")
    return shape


_new, _fill = object.__new__, object.__setattr__


def _rebuild_tensor(storage: Any, storage_offset: int, size: Any, stride: Any, *_: Any) -> TensorInfo:
    return _strided(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage: Any, storage_offset: int, size: Any, stride: Any, requires_grad: Any, backward_hooks: Any, dtype: Any, *_: Any) -> TensorInfo:
    return _strided(storage, storage_offset, size, stride, requires_grad, dtype=_dtype(dtype))


def _strided(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any = False, *_: Any,
             dtype: str | None = None) -> TensorInfo:
    """
    `torch._utils._rebuild_tensor_v2` as this unpickler runs it (20,000 calls for a 20,000-tensor
    file), so the common case is checked in one loop: sizes and strides tuples of non-negative
    ints, as many of each, and the view inside its storage. Anything else goes to
    `_strided_checked`, which says what is wrong.
    """
    if (type(storage) is StorageRef and type(size) is tuple and type(stride) is tuple and len(size) == len(stride)
            and type(storage_offset) is int and storage_offset >= 0):
        last, numel = storage_offset, 1
        for n, step in zip(size, stride):
            if type(n) is not int or type(step) is not int or n < 0 or step < 0:
                break
            last += (n - 1) * step
            numel *= n
            if numel > MAX_ELEMENTS:
                break
        else:
            stored, saved_dtype = storage
            dtype = dtype or saved_dtype
            if numel == 0:
                last = storage_offset - 1
            if (last + 1) * (ITEMSIZE.get(dtype) or itemsize(dtype)) <= stored.nbytes:
                # model.strided_tensor's body: its frame was a sixth of this function's time
                info = _new(TensorInfo)
                _fill(info, "__dict__", {"shape": size, "dtype": dtype, "storage": stored,
                                         "storage_offset": storage_offset, "stride": stride,
                                         "requires_grad": bool(requires_grad)})
                return info
    return _strided_checked(storage, storage_offset, size, stride, dtype, requires_grad)


def _strided_checked(storage: Any, storage_offset: int, size: Any, stride: Any, dtype: str | None, requires_grad: Any = False) -> TensorInfo:
    if not isinstance(storage, StorageRef):
        raise RefusedPickle(f"a tensor refers to {type(storage).__name__}, not to a storage")
    shape, strides = _checked_shape(size), _as_tuple(stride)
    offset = storage_offset if type(storage_offset) is int else -1
    if len(shape) != len(strides) or offset < 0:
        raise RefusedPickle(f"a tensor has size {list(shape)}, stride {list(strides)} and offset "
                                     f"{storage_offset!r}, which do not describe a tensor")
    stored, saved_dtype = storage
    dtype = dtype or saved_dtype
    # the view must lie inside its storage: checked here, before anything reads or allocates by it
    last, empty = offset, False
    for n, step in zip(shape, strides):
        if step < 0:
            raise RefusedPickle(f"a tensor has size {list(shape)}, stride {list(strides)} and offset "
                                f"{storage_offset!r}, which do not describe a tensor")
        last += (n - 1) * step
        empty = empty or n == 0
    if empty:
        last = offset - 1
    if (last + 1) * itemsize(dtype) > stored.nbytes:
        raise RefusedPickle(f"a tensor of size {list(shape)}, stride {list(strides)} and offset {offset} "
                                     f"reaches past the {stored.nbytes:,} bytes of its storage")
    return TensorInfo(
        shape=shape,
        dtype=dtype,
        storage=stored,
        storage_offset=offset,
        stride=strides,
        requires_grad=bool(requires_grad),
    )


def _rebuild_parameter(data: Any, requires_grad: Any = True, *_: Any) -> Any:
    if isinstance(data, TensorInfo):
        return data.with_flags(is_parameter=True, requires_grad=bool(requires_grad))
    return data


def _rebuild_qtensor(storage: Any, storage_offset: int, size: Any, stride: Any, quantizer_params: Any, requires_grad: Any = False, *_: Any) -> TensorInfo:
    info = _strided(storage, storage_offset, size, stride, requires_grad)
    scheme, *params = quantizer_params
    if len(params) != (2 if "per_tensor" in str(scheme) else 3):
        raise RefusedPickle(f"quantized tensor with scheme {scheme} has {len(params)} parameters")
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
    dtype = values_info.dtype if isinstance(values_info, TensorInfo) else "float32"
    return TensorInfo(
        shape=_checked_shape(size),
        dtype=dtype,
        storage=None,
        layout=name,
        components={k: v for k, v in components.items() if isinstance(v, TensorInfo)},
    )


def _rebuild_meta_tensor_no_storage(dtype: Any, size: Any, stride: Any, requires_grad: Any = False, *_: Any) -> TensorInfo:
    return TensorInfo(shape=_checked_shape(size), dtype=_dtype(dtype), storage=None, stride=_as_tuple(stride),
                      layout="meta", requires_grad=bool(requires_grad))


def _unsupported(kind: str) -> Callable[..., TensorInfo]:
    def rebuild(*args: Any) -> TensorInfo:
        tensors = [a for a in args if isinstance(a, TensorInfo)]
        shape = tensors[0].shape if tensors else ()
        dtype = next((a.name for a in args if isinstance(a, DTypeRef)), tensors[0].dtype if tensors else "float32")
        return TensorInfo(shape=shape, dtype=dtype, storage=None, layout="unsupported", note=kind)

    return rebuild


DTENSOR = "torch.distributed.tensor.DTensor"
# where torch 2.4 and earlier kept it (torch.distributed._tensor.api): listed alike, though foreign to
# torch's weights-only loader today, which registers only the new name
_DTENSOR_CLASSES = frozenset({DTENSOR, "torch.distributed._tensor.api.DTensor"})


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    if getattr(new_type, "class_path", None) in _DTENSOR_CLASSES:
        fields = _state_fields(state)
        if isinstance(fields.get("_local_tensor"), TensorInfo):
            return _dtensor(args, fields)
    result = func(*args)
    if isinstance(result, TensorInfo):
        if new_type is _PARAMETER:
            return result.with_flags(is_parameter=True)
        if isinstance(new_type, type) and issubclass(new_type, PickledObject):
            return result.with_flags(subclass=new_type.class_path)
    return result


def _state_fields(state: Any) -> dict[str, Any]:
    """An object's pickled state as one dict: torch writes a tensor subclass's as `(dict or None, slots)`."""
    if isinstance(state, dict):
        return state
    if isinstance(state, tuple) and len(state) == 2:
        return {**(state[0] if isinstance(state[0], dict) else {}), **(state[1] if isinstance(state[1], dict) else {})}
    return {}


def _dtensor(args: Any, state: dict[str, Any]) -> TensorInfo:
    """
    A DTensor (FSDP2 and tensor-parallel state dicts) as what the file holds of it: its local tensor,
    the part this rank kept, whose shape and values are the file's. The global shape (the wrapper's
    size) and the placements go into its note: "DTensor Shard(dim=0) of [6, 4]".
    """
    local: TensorInfo = state["_local_tensor"]
    size = args[2] if isinstance(args, tuple) and len(args) > 2 else None
    whole = list(size) if isinstance(size, (tuple, list)) and all(type(n) is int for n in size) else "?"
    spec = state.get("_spec")
    placements = _state_fields(spec.state).get("placements", ()) if isinstance(spec, PickledObject) else ()
    placed = (", ".join(_placement_text(p) for p in placements[:4]) + (", ..." if len(placements) > 4 else "")
              if isinstance(placements, (tuple, list)) else "?")
    return local.with_flags(subclass=DTENSOR, requires_grad=bool(state.get("requires_grad", local.requires_grad)),
                            note=f"DTensor {placed or 'placements unknown'} of {whole}")


def _placement_text(placement: Any) -> str:
    """Shard(dim=0), Replicate(), Partial(reduce_op='sum'), from a placement's record."""
    if not isinstance(placement, PickledObject):
        return "?"
    plain = [f"{k[:20]}={v!r:.20}" for k, v in _state_fields(placement.state).items()
             if isinstance(k, str) and isinstance(v, (int, str, bool))]
    return f"{placement.class_path.rsplit('.', 1)[-1]}({', '.join(plain[:4])})"


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
    raise RefusedPickle(f"bytes/bytearray from {type(data).__name__} is not accepted")


def _encode(text: str, encoding: str = "latin1") -> bytes:
    # protocol 2 pickles bytes as _codecs.encode(str, "latin1"); refuse every other use
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise RefusedPickle("_codecs.encode is only accepted for latin1-encoded bytes")
    return text.encode("latin1")


# torch.nn.Parameter, called or named as the type of a rebuilt tensor
_PARAMETER = _sealed_callable(lambda data=None, requires_grad=True: _rebuild_parameter(data, requires_grad))


def _numpy_globals() -> dict[str, Any]:
    """
    The numpy globals numpy's own pickles name (arrays, dtypes, scalars), as stand-ins that check
    what the pickle gives them before numpy sees it: numpy's C code trusts a pickle's state, and a
    dtype BUILT with a state numpy never writes, or an object array whose list is shorter than its
    shape (a fuzzed `.npy`: `numpy.load(allow_pickle=True)` crashes on it too), crashed the process.
    """
    try:
        import numpy
    except ImportError:
        return {}
    reconstruct = numpy.ndarray.__reduce__(numpy.zeros(0))[0]  # numpy.core / numpy._core, whichever this numpy has
    numpy_scalar = numpy.float64(0).__reduce__()[0]

    class PickledDtype(_Sealed):
        """`numpy.dtype(spec, align, copy)` as a pickle calls it; BUILD may only set what numpy writes for a
        plain dtype: its byte order."""

        __slots__ = ("dtype",)

        def __init__(self, spec: Any, align: Any = False, copy: Any = True) -> None:
            # copy=False would hand out numpy's shared dtype object, which a later BUILD could change
            self.dtype = numpy.dtype(spec, bool(align), True)

        def __setstate__(self, state: Any) -> None:
            own = self.dtype.__reduce__()[2]  # the state numpy itself writes for this dtype
            if not (type(state) is tuple and len(state) == len(own) and state[0] == own[0] and state[2:] == own[2:]
                    and state[1] in ("<", ">", "=", "|") and (own[1] != "|" or state[1] == "|")):
                raise RefusedPickle("it holds a numpy structured dtype (or a damaged one), which ckptview does not "
                                    "read: numpy's own unpickling of a damaged dtype state crashes the process")
            self.dtype.__setstate__(state)

        def __repr__(self) -> str:
            return repr(self.dtype)

    def plain_objects(dtype: Any) -> bool:
        """numpy's object dtype itself, not a structured one with object fields."""
        return dtype.kind == "O" and dtype.fields is None

    def real_dtype(value: Any) -> Any:
        if type(value) is not PickledDtype:
            raise RefusedPickle("a numpy array or scalar whose dtype is not a numpy dtype")
        return value.dtype

    class PickledArray(numpy.ndarray):
        """An ndarray as a pickle builds it: BUILD's state is checked to be one numpy writes, data matching shape."""

        def __setstate__(self, state: Any) -> None:
            if type(state) is not tuple or len(state) != 5:
                raise RefusedPickle("a numpy array whose pickled state is not (version, shape, dtype, order, data)")
            version, shape, dtype, fortran, data = state
            dtype = real_dtype(dtype)
            if type(shape) is not tuple:
                raise RefusedPickle("a numpy array whose shape is not a tuple of sizes")
            count = math.prod(_checked_shape(shape))
            if dtype.hasobject:
                if not plain_objects(dtype) or type(data) is not list or len(data) != count:
                    raise RefusedPickle(f"a numpy object array of shape {list(shape)} whose pickled elements do "
                                        "not fill it")
            elif not isinstance(data, (bytes, bytearray)) or len(data) != count * dtype.itemsize:
                raise RefusedPickle(f"a numpy array of shape {list(shape)} and dtype {dtype} whose pickled data is "
                                    "not that many bytes")
            super().__setstate__((version, shape, dtype, bool(fortran), data))

    def reconstruct_empty(subtype: Any, shape: Any, typecode: Any) -> Any:
        # numpy pickles an array as _reconstruct(ndarray, (0,), b"b") and then BUILDs its data, whose
        # length numpy checks; any other shape would allocate before anything is checked
        if subtype is not ndarray or tuple(shape) != (0,) or not isinstance(typecode, bytes) or len(typecode) != 1:
            raise RefusedPickle("numpy's _reconstruct is accepted only as numpy itself writes it "
                                "(an empty ndarray)")
        return reconstruct(PickledArray, (0,), typecode)

    def frombuffer(data: Any, dtype: Any, shape: Any, order: Any, axis_order: Any = None) -> Any:
        # what pickle protocol 5 writes for a contiguous array: numpy.core.numeric._frombuffer(bytes, dtype,
        # shape, order[, axis_order]), checked as BUILD's state is before numpy sees it
        dtype = real_dtype(dtype)
        if type(shape) is not tuple or order not in ("C", "F", "K") or dtype.hasobject:
            raise RefusedPickle("a numpy array whose protocol-5 record is not (data, dtype, shape, order)")
        count = math.prod(_checked_shape(shape))
        if not isinstance(data, (bytes, bytearray)) or len(data) != count * dtype.itemsize:
            raise RefusedPickle(f"a numpy array of shape {list(shape)} and dtype {dtype} whose pickled data is not "
                                "that many bytes")
        array = numpy.frombuffer(data, dtype=dtype)
        if order != "K" or axis_order is None:
            return array.reshape(shape, order="F" if order == "F" else "C")
        if (type(axis_order) is not tuple or not all(type(axis) is int for axis in axis_order)
                or sorted(axis_order) != list(range(len(shape)))):
            raise RefusedPickle("a numpy array whose axis order is not a permutation of its axes")
        return array.reshape(shape).transpose(axis_order)

    def scalar(dtype: Any, data: Any = None) -> Any:
        dtype = real_dtype(dtype)
        if dtype.hasobject:
            if not plain_objects(dtype):
                raise RefusedPickle("a structured numpy scalar holding objects")
            return data  # numpy's own scalar() of an object dtype is its object
        if not isinstance(data, bytes) or len(data) != dtype.itemsize:
            raise RefusedPickle(f"a numpy {dtype} scalar whose pickled data is not {dtype.itemsize} bytes")
        return numpy_scalar(dtype, data)

    def refuse_call(*args: Any) -> Any:
        raise RefusedPickle("a numpy class called by the pickle, which numpy's own pickles never do")

    # numpy.ndarray is only ever _reconstruct's first argument: called, it would allocate whatever shape it is given
    ndarray = _sealed_callable(refuse_call)
    allowed: dict[str, Any] = {"numpy.ndarray": ndarray, "numpy.dtype": _sealed_callable(PickledDtype)}
    for core in ("numpy.core", "numpy._core"):
        allowed[f"{core}.multiarray._reconstruct"] = _sealed_callable(reconstruct_empty)
        allowed[f"{core}.multiarray.scalar"] = _sealed_callable(scalar)
        allowed[f"{core}.numeric._frombuffer"] = _sealed_callable(frombuffer)
    for name in dir(getattr(numpy, "dtypes", None) or ()):
        if name.endswith("DType"):
            allowed[f"numpy.dtypes.{name}"] = _sealed_callable(refuse_call)
    return allowed


def _device(*args: Any) -> str:
    try:
        return str(torch.device(*args))
    except (RuntimeError, TypeError, ValueError) as exc:
        raise RefusedPickle("a tensor names a device that torch does not know") from exc


def _build_allow_list() -> dict[str, Any]:
    functions: dict[str, Callable[..., Any]] = {
        "collections.OrderedDict": _PickledOrderedDict,
        "collections.Counter": _PickledCounter,
        "builtins.bytearray": lambda *args: bytearray(_bytes_source(*args)),
        "builtins.bytes": lambda *args: bytes(_bytes_source(*args)),
        "_codecs.encode": _encode,
        "copyreg._reconstructor": _reconstructor,
        "torch.device": _device,
        "torch.serialization._get_layout": _Layout,
        "torch._utils._rebuild_tensor": _rebuild_tensor,
        "torch._utils._rebuild_tensor_v2": _strided,
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
        "torch.jit._pickle.restore_type_tag": lambda value, type_str: value,
    }
    allowed: dict[str, Any] = {name: _sealed_callable(function) for name, function in functions.items()}
    allowed["torch.nn.parameter.Parameter"] = _PARAMETER
    for tensor_class in ("Tensor", "FloatTensor", "DoubleTensor", "HalfTensor", "BFloat16Tensor", "LongTensor",
                         "IntTensor", "ShortTensor", "CharTensor", "ByteTensor", "BoolTensor"):
        allowed[f"torch.{tensor_class}"] = _PLAIN_TENSOR_TYPE
    # Built-in types are immutable (no attribute of theirs can be set), so they are handed out as they are.
    allowed.update({f"builtins.{t.__name__}": t for t in (set, frozenset, complex, slice, dict, list, tuple, int,
                                                           float, str, bool)})
    allowed.update({"collections.defaultdict": collections.defaultdict, "collections.deque": collections.deque,
                    "torch.Size": tuple})
    # TorchScript archives wrap typed lists; the value itself is plain data
    allowed.update({f"torch.jit._pickle.build_{kind}list": list
                    for kind in ("int", "double", "bool", "tensor", "complex")})
    allowed.update({f"torch.{name}": dtype for name, dtype in _DTYPES.items()})
    for prefix in ("torch.", "torch.storage.", "torch.cuda."):
        allowed.update({prefix + name: storage for name, storage in _STORAGE_TYPES.items()})
    allowed.update(_QSCHEMES)
    return allowed


# torch.Tensor named as the type in `_rebuild_from_type_v2`: a plain tensor, nothing to do
_PLAIN_TENSOR_TYPE = _sealed_callable(lambda *args: None)


class StorageRef(tuple):  # type: ignore[type-arg]
    """
    What a persistent id resolves to: (the storage, the dtype its elements were saved as). A tuple,
    which `tuple.__new__` makes in C: a 20,000-tensor file makes 20,000, and an `__init__` was a
    Python frame for each.
    """

    __slots__ = ()
    __setstate__ = refuse_pickle_state

    def __new__(cls, storage: Storage, dtype: str) -> StorageRef:
        return _new_tuple(cls, (storage, dtype))


_new_tuple = tuple.__new__  # what `StorageRef(storage, dtype)` calls, called directly where one per tensor is made


_ALLOWED: dict[str, Any] | None = None
_ALLOWED_WITH_NUMPY: dict[str, Any] | None = None


def _allowed(numpy_too: bool = True) -> dict[str, Any]:
    """The allow-list; numpy's entries (importing numpy, 0.2 s) only where a pickle names numpy."""
    global _ALLOWED, _ALLOWED_WITH_NUMPY
    if _ALLOWED is None:
        _ALLOWED = _build_allow_list()
    if not numpy_too:
        return _ALLOWED
    if _ALLOWED_WITH_NUMPY is None:
        _ALLOWED_WITH_NUMPY = _ALLOWED | _numpy_globals()
    return _ALLOWED_WITH_NUMPY


SCRIPT_CLASS_PREFIX = "__torch__."

class SafeUnpickler(pickle.Unpickler):
    """
    Unpickle torch checkpoint pickles without importing or calling anything the file names.

    `storage_for(storage_type_dtype, key, location, numel, view_metadata)` maps a persistent
    storage id to a `Storage` (the reader knows where its bytes are); `persistent_load`, when given,
    is called for each persistent id instead: a reader that resolves the ids torch.save writes
    itself, into `StorageRef(storage, dtype)`, makes one Python call per tensor where this class's
    method and `storage_for` were two, and hands every other id to `resolve_persistent_id`.
    `imports` counts every global outside the allow-list.
    """

    def __init__(self, file: io.BufferedIOBase | io.BytesIO, storage_for: Callable[..., Storage] | None = None,
                 persistent_load: Callable[[Any], Any] | None = None) -> None:
        super().__init__(file, encoding="utf-8")
        self._storage_for = storage_for
        if persistent_load is not None:
            # what the C unpickler calls for each persistent id, in place of the method: a reader's own
            # resolver of its common ids saves a Python call per tensor (see torch_pickle.parse_torch_zip)
            pickle.Unpickler.persistent_load.__set__(self, persistent_load)  # type: ignore[attr-defined]
        self.imports: Counter[str] = Counter()
        self.allowed_named: set[str] = set()  # allow-listed globals the pickle names (see readers/weights_only.py)
        self._stand_ins: dict[str, type[PickledObject]] = {}

    def find_class(self, module: str, name: str) -> Any:
        module, name = _current_name(module, name)
        full_name = f"{module}.{name}"
        allowed = _allowed(numpy_too=module.partition(".")[0] == "numpy")
        if full_name in allowed:
            self.allowed_named.add(full_name)
            return allowed[full_name]
        if full_name in TORCH_SAFE_CLASSES:
            self.allowed_named.add(full_name)
            return self._stand_in(full_name, foreign=False)
        return self._stand_in(full_name)

    def _stand_in(self, full_name: str, foreign: bool = True) -> type[PickledObject]:
        """The record class standing in for `full_name`; a `foreign` one counts among the pickle's imports."""
        stand_in = self._stand_ins.get(full_name)
        if stand_in is None:
            counter = self.imports
            module, _, qualname = full_name.rpartition(".")
            namespace: dict[str, Any] = {"class_path": full_name, "__module__": "ckptview.pickled." + module}
            if foreign:
                def __new__(cls: type[PickledObject], *args: Any, **kwargs: Any) -> PickledObject:
                    counter[full_name] += 1
                    return PickledObject.__new__(cls, *args, **kwargs)

                namespace["__new__"] = __new__
                counter[full_name] += 0  # named, even if never called
            stand_in = type(qualname or full_name, (PickledObject,), namespace)
            self._stand_ins[full_name] = stand_in
        return stand_in

    def persistent_load(self, saved_id: Any) -> Any:
        return resolve_persistent_id(saved_id, self._storage_for)

    def pickle_imports(self) -> list[PickleImport]:
        """Globals outside the allow-list. TorchScript's own classes (`__torch__.…`) are not Python
        imports (their code is in the archive, run only by torch.jit.load) and are left out."""
        return [PickleImport(name, max(count, 1)) for name, count in sorted(self.imports.items())
                if not name.startswith(SCRIPT_CLASS_PREFIX)]

    def script_classes(self) -> list[str]:
        return sorted(name for name in self.imports if name.startswith(SCRIPT_CLASS_PREFIX))


def _current_name(module: str, name: str) -> tuple[str, str]:
    """Python 2 era names (__builtin__.long, copy_reg) mapped as pickle's fix_imports does."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


def foreign_globals(pairs: list[tuple[str, str]]) -> Counter[str]:
    """Of these (module, name) globals, those `SafeUnpickler.pickle_imports` would report, counted."""
    counts: Counter[str] = Counter()
    for module, name in pairs:
        module, name = _current_name(module, name)
        full_name = f"{module}.{name}"
        if (full_name not in _allowed(numpy_too=module.partition(".")[0] == "numpy")
                and full_name not in TORCH_SAFE_CLASSES and not full_name.startswith(SCRIPT_CLASS_PREFIX)):
            counts[full_name] += 1
    return counts


def resolve_persistent_id(saved_id: Any, storage_for: Callable[..., Storage] | None) -> Any:
    """What a persistent id stands for: a storage reference (`storage_for` makes its `Storage`), or a
    legacy file's module record; anything else is refused, saying what it is."""
    if isinstance(saved_id, str) and saved_id.startswith("('storage',"):
        raise RefusedPickle("its storage references are written as text, as torch.save with pickle_protocol=0 "
                            "writes them, and torch.load cannot read them back either; re-save it with the "
                            "default protocol")
    if not isinstance(saved_id, tuple) or not saved_id:
        raise RefusedPickle(f"unknown persistent id {saved_id!r}")
    kind = saved_id[0].decode("ascii") if isinstance(saved_id[0], bytes) else saved_id[0]
    if kind == "module":  # legacy format records a module's class (and its source) here
        return saved_id[1]
    if kind != "storage" or storage_for is None:
        raise RefusedPickle(f"unknown persistent id kind {kind!r}")
    if len(saved_id) < 5:
        raise RefusedPickle("a storage reference has too few fields")
    storage_type, key, location, numel = saved_id[1], saved_id[2], saved_id[3], saved_id[4]
    location = location.decode("ascii", "replace") if isinstance(location, bytes) else location
    if not isinstance(key, (str, int)) or not isinstance(location, str) or type(numel) is not int:
        raise RefusedPickle("a storage reference's key, device or size is not plain data")
    if not 0 <= numel <= MAX_ELEMENTS:
        raise RefusedPickle(f"a storage claims {numel:,} elements")
    view_metadata = saved_id[5] if len(saved_id) > 5 else None
    dtype = storage_type.dtype if isinstance(storage_type, StorageType) else "uint8"
    return _new_tuple(StorageRef, (storage_for(dtype, str(key), location, numel, view_metadata), dtype))


def built_numpy_arrays(unpickler: SafeUnpickler) -> bool:
    """Whether the pickle named numpy's array constructor, so its value may hold numpy arrays."""
    return any(name.endswith(("multiarray._reconstruct", "numeric._frombuffer")) for name in unpickler.allowed_named)


def arrays_as_tensors(root: Any, path: str) -> Any:
    """
    `root` with every numpy array of a numeric dtype in it replaced by a `TensorInfo` over the
    array's bytes, so arrays a pickle holds are tensors like a `.npy` file's: a Detectron2 `.pkl`
    is a dict of arrays, and training scripts save numpy arrays beside torch tensors. Arrays of
    strings, objects or records stay arrays (values, not tensors). Dicts and lists are changed in
    place; a tuple holding an array is rebuilt. Iterative, so a deeply nested pickle does not
    exhaust the stack; an array referenced twice becomes one `TensorInfo` (one storage).
    """
    import numpy

    replaced: dict[int, Any] = {}
    entered: set[int] = set()
    visited: list[Any] = []  # alive until the end: a freed tuple's id could be reused by a new one
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            _put_back(node, replaced)
            continue
        if key in replaced or key in entered:
            continue
        if isinstance(node, numpy.ndarray):
            info = _array_tensor(node, path, numpy)
            if info is not None:
                replaced[key] = info
                visited.append(node)
            continue
        children = _replaceable_children(node)
        if children is None:
            continue
        entered.add(key)
        visited.append(node)
        stack.append((node, True))
        stack.extend((child, False) for child in children)
    return replaced.get(id(root), root)


def _replaceable_children(node: Any) -> list[Any] | None:
    if isinstance(node, dict):
        return list(node.values())
    if isinstance(node, list) or type(node) is tuple:
        return list(node)
    if isinstance(node, PickledObject):
        return [node.args, node.kwargs, node.state, node.items, node.list_items]
    return None


def _put_back(node: Any, replaced: dict[int, Any]) -> None:
    """Put the replacements of `node`'s children into it (a tuple's replacement is a new tuple)."""
    if isinstance(node, dict):
        for name, value in list(node.items()):
            new = replaced.get(id(value))
            if new is not None:
                node[name] = new
    elif isinstance(node, list):
        for index, value in enumerate(node):
            new = replaced.get(id(value))
            if new is not None:
                node[index] = new
    elif type(node) is tuple:
        if any(id(value) in replaced for value in node):
            replaced[id(node)] = tuple(replaced.get(id(value), value) for value in node)
    elif isinstance(node, PickledObject):
        for attribute in ("args", "state"):
            new = replaced.get(id(getattr(node, attribute)))
            if new is not None:
                setattr(node, attribute, new)


def _array_tensor(array: Any, path: str, numpy: Any) -> TensorInfo | None:
    dtype = array.dtype
    name = numpy_dtype_name(dtype)
    if name is None:
        return None  # strings, objects, records, datetimes, long doubles: no torch dtype
    shape = tuple(array.shape)
    itemsize = dtype.itemsize
    # A pickled array is its bytes in C or Fortran order, or (protocol 5, order "K") a permutation of
    # C order: each a block its strides cover exactly once from its first byte, which ravel("K") gives
    # in memory order. Anything else is copied to C order.
    strides = array.strides
    if array.size and (any(step < 0 or step % itemsize for step in strides)
                       or 1 + sum((n - 1) * step for n, step in zip(shape, strides)) // itemsize != array.size):
        array = numpy.ascontiguousarray(array)
        strides = array.strides
    stride = tuple(step // itemsize for step in strides) if array.size else contiguous_stride(shape)
    big = dtype.byteorder == ">" or (dtype.byteorder == "=" and not numpy.little_endian)
    raw = array.ravel(order="K").view(numpy.uint8)
    storage = Storage(key="numpy", source=MemorySource(path, raw), offset=0, nbytes=raw.nbytes, location="cpu",
                      byteorder="big" if big else "little")
    return TensorInfo(shape=shape, dtype=name, storage=storage, stride=stride)


def _reconstructor(cls: Any, base: Any, state: Any = None) -> Any:
    # protocol 0/1 pickles build objects through copyreg._reconstructor; only stand-ins and
    # allowed containers get built
    if isinstance(cls, type) and issubclass(cls, PickledObject):
        return cls(state) if state is not None else cls()
    if cls in (dict, list, set) or cls is _allowed(numpy_too=False)["collections.OrderedDict"]:
        return cls()
    raise RefusedPickle("copyreg._reconstructor is accepted only for plain containers")
