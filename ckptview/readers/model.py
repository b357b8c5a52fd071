"""
The lazy tree every layer above the readers sees: `Checkpoint`, its `TensorEntry`s, and the
stand-ins for objects the file describes but ckptview does not build (`PickledObject`).

A reader turns a file into a tree of plain containers, numbers, strings, `TensorInfo` leaves
(shape, dtype and where the bytes live: nothing is read) and `PickledObject`s. Names are given
by walking the tree, so one stored tensor reachable under two names (tied weights) is one
`TensorInfo` with two `TensorEntry`s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import math
import os
import pickle
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ckptview.errors import CorruptCheckpointError, TensorDataError, TruncatedCheckpointError
from ckptview.lazy import torch
from ckptview.readers.dtypes import ITEMSIZE, UNCONVERTIBLE, dtype_name, itemsize, torch_dtype

DEFAULT_CHUNK_BYTES = 16 * 1024 * 1024


@contextlib.contextmanager
def gc_paused(*, long_lived: bool = False, collect_first: bool = True) -> Iterator[None]:
    """
    Pause the cyclic garbage collector while building many small objects (20,000 tensor records
    and their containers): none of them are garbage yet, and collections triggered by the
    allocations alone doubled the time to open a 20,000-tensor file.

    Pauses nest, also across threads (the collector is one per process): the last to end restores
    the collector as the first found it. A training run pauses once around all its files, each of
    whose opens pauses again: paused per file only, the run's records reached the oldest generation
    through the young ones, and the full collections that set off took a fifth of the run.

    `long_lived`: what the pause makes is a result the caller keeps (a run's summary, ~25,000
    records): it moves to the oldest generation at the end however few it is (see `_resume`), where
    the next young collection would walk it (5 ms) and the middle one again.

    `collect_first=False`: no young collection as the pause starts, for a caller whose own records are
    young then (a checkpoint listed after its open): that collection would move them to the oldest
    generation, whose growth sets off full collections of the whole process.
    """
    global _pauses, _resume_collector, _failed_while_paused, _promote
    with _PAUSE_LOCK:
        outermost = not _pauses
        if outermost:
            _resume_collector, _failed_while_paused, _promote = gc.isenabled(), False, False
            gc.disable()
        _promote = _promote or long_lived
        _pauses += 1
    try:
        if outermost and _resume_collector and collect_first:
            # Young garbage made before the pause (a failed read's traceback holding an open file, say)
            # is freed now: a young collection is cheap before the records exist (~10 µs), and at the
            # end everything young may move to the oldest generation with them. Outside the lock: a
            # finalizer it runs may wait on a thread that is entering a pause.
            gc.collect(1)
        yield
    except BaseException:
        with _PAUSE_LOCK:
            _pauses -= 1
            _failed_while_paused = True
            if not _pauses and _resume_collector:
                # what a failed read left behind (a traceback's frames holding an open file) is garbage
                # the next young collection should find, as if the collector had never paused
                gc.enable()
        raise
    with _PAUSE_LOCK:
        _pauses -= 1
        if not _pauses and _resume_collector:
            _resume(_failed_while_paused, _promote)


def _resume(after_a_failure: bool, long_lived: bool) -> None:
    # A pause that made many records (20,000 tensors: 180,000 objects) moves them straight to the
    # oldest generation (freeze, then unfreeze: two list splices). Re-enabled as they were, they
    # would sit in the youngest, walked by its next collection and again by the middle one's
    # (28 ms each for 20,000 tensors), though they live as long as the checkpoint. Only for
    # many: what moves there is collected only by a full collection, which what moved does not
    # bring nearer, so a reference cycle made while paused (a stand-in class for a global the
    # pickle names) would outlive its file; with every small file moved, the fuzzer's process
    # grew by 300 MB. And for what the caller keeps (`long_lived`): a run's summary is made once
    # per analysis, not once per file.
    promote = long_lived or gc.get_count()[0] >= PROMOTE_AT
    # else objects are frozen already, by the user or by the interpreter itself (CPython 3.12 keeps 375
    # statically allocated tuples there), and unfreezing would hand them all to the collector
    if promote and gc.get_freeze_count() == 0:
        if after_a_failure:
            # a read that failed inside the pause (a run's half-written file) left young garbage holding
            # its open file: one young collection over the pause's objects frees it before the rest
            # moves where only a full collection would find it
            gc.collect(0)
        gc.freeze()
        gc.unfreeze()
    gc.enable()


_PAUSE_LOCK = threading.RLock()
_pauses = 0  # gc_paused blocks entered and not yet left, in every thread
_resume_collector = False  # whether the outermost pause found the collector enabled
_failed_while_paused = False  # whether a pause inside the outermost one ended in an exception
_promote = False  # whether a pause inside the outermost one makes long-lived results
PROMOTE_AT = 100_000


class FileSource:
    """
    Positional reads from one file, shared by every storage in it. `os.preadv` reads straight
    into the caller's buffer and keeps no file position, so threads can read concurrently.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._fd: int | None = None
        self._lock = threading.Lock()

    def _fileno(self) -> int:
        if self._fd is None:
            with self._lock:
                if self._fd is None:
                    self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        return self._fd

    def open(self) -> None:
        """Open the file now rather than at the first read: a file about to lose its name (a temporary
        one) stays readable through the descriptor."""
        self._fileno()

    def read_into(self, buffer: memoryview, offset: int) -> None:
        fd = self._fileno()
        done = 0
        while done < len(buffer):
            got = os.preadv(fd, [buffer[done:]], offset + done)
            if got == 0:
                raise TruncatedCheckpointError(
                    self.path,
                    f"the file ends at byte {offset + done:,} but a tensor's data continues to byte "
                    f"{offset + len(buffer):,}: the file was cut off while copying or saving. "
                    "Copy it again or re-save it.",
                )
            done += got

    def read(self, offset: int, size: int) -> bytes:
        # one buffer the kernel fills: a zeroed bytearray copied into bytes touched three times the memory
        # (a 20,000-tensor file's 2.5 MB pickle, the 64 KiB every zip's directory search reads)
        data = os.pread(self._fileno(), size, offset)
        if len(data) < size:  # at the file's end (read_into says so), or a read the system cut short
            rest = bytearray(size - len(data))
            self.read_into(memoryview(rest), offset + len(data))
            data += rest
        return data

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __del__(self) -> None:
        # A reader that refuses a file has no Checkpoint to close it through; without this every
        # refused file kept a descriptor, and a long-lived kernel ran out of them (the fuzzer's
        # 20,000th input could no longer open anything). The descriptor is forgotten as it is closed:
        # a collection of a reference cycle runs this before the cycle's other finalizers, and an
        # explorer's, closing its checkpoint after, closed the number again (EBADF at a kernel's exit,
        # or another file's descriptor, had the number been reused in between).
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


class MemorySource:
    """
    Bytes a file holds inside a pickle (a numpy array's data in a Detectron2 `.pkl`, an array saved
    in a torch checkpoint), already in memory once the pickle is parsed: read as a file's would be.
    """

    def __init__(self, path: str, data: Any) -> None:
        self.path = path
        self._data = memoryview(data).cast("B")

    def read_into(self, buffer: memoryview, offset: int) -> None:
        end = offset + len(buffer)
        if end > len(self._data):
            raise CorruptCheckpointError(self.path, f"an array's data ends at byte {len(self._data):,} but a read "
                                                    f"reaches byte {end:,}: the file is damaged. Re-save it.")
        buffer[:] = self._data[offset:end]

    def read(self, offset: int, size: int) -> bytes:
        return bytes(self._data[offset:offset + size])

    def close(self) -> None:
        pass  # nothing to release: the bytes go with the checkpoint


class RefusedPickle(pickle.UnpicklingError):
    """A pickle ckptview refuses to read on, with a message in ckptview's words (shown to the user as is)."""


def refuse_pickle_state(obj: Any, state: Any) -> None:
    """`__setstate__` of every object ckptview's unpickler makes or hands out: a pickle's BUILD
    opcode calls it, and a file must not rewrite records (or globals) ckptview relies on."""
    raise RefusedPickle(f"the pickle tries to set the state of a {type(obj).__name__}, which ckptview "
                                 "made itself and does not let a file change")


def fast_init(cls: type) -> type:
    """
    Give a frozen dataclass an `__init__` that fills the instance's `__dict__` in one step.

    Why: readers and analyzers make one record per tensor (a million for a large safetensors
    file), and the generated `__init__` of a frozen dataclass sets each field through
    `object.__setattr__`: 3.1 µs for a 17-field TensorInfo, 0.9 µs this way. The objects are the
    same (eq, repr, hash and `replace` come from the dataclass; `replace` calls this `__init__`),
    and `__post_init__` still runs. Fields with a `default_factory` are not supported.
    """
    fields = dataclasses.fields(cls)
    defaults = {f"_default_{f.name}": f.default for f in fields if f.default is not dataclasses.MISSING}
    if any(f.default_factory is not dataclasses.MISSING for f in fields):
        raise TypeError(f"{cls.__name__}: fast_init takes no default_factory fields")
    params = ", ".join(f.name + (f" = _default_{f.name}" if f"_default_{f.name}" in defaults else "") for f in fields)
    values = ", ".join(f"{f.name!r}: {f.name}" for f in fields)
    post_init = "\n    self.__post_init__()" if hasattr(cls, "__post_init__") else ""
    source = f"def __init__(self, {params}):\n    _set(self, '__dict__', {{{values}}}){post_init}\n"
    namespace: dict[str, Any] = {"_set": object.__setattr__, **defaults}
    exec(source, namespace)  # as dataclasses itself makes __init__
    init = namespace["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    cls.__init__ = init  # type: ignore[misc]
    return cls


@fast_init
@dataclass(frozen=True)
class Storage:
    """One stored block of bytes that tensors view; `key` is unique within its checkpoint."""

    __setstate__ = refuse_pickle_state

    key: str
    source: FileSource
    offset: int  # absolute byte offset in `source`; -1 until `locate` has found it
    nbytes: int
    location: str  # the device it was saved on, as torch wrote it: "cpu", "cuda:7", "mps"
    byteorder: str = "little"
    # Finding a zip member's data means reading its local header: done on first read, not at
    # open, so listing 20,000 tensors costs no 20,000 reads. One function serves every storage of
    # a file (given the storage), so a listing makes no object per storage for it.
    locate: Callable[[Storage, Callable[[int, int], bytes] | None], int] | None = field(
        default=None, compare=False, repr=False)
    # torch.save under torch.serialization.skip_data() writes zeros where a storage's bytes go (to be
    # filled in a later pass): its tensors have shapes, not values
    unsaved: bool = False

    def data_offset(self, read: Callable[[int, int], bytes] | None = None) -> int:
        """Where the bytes start in `source`. `read(offset, count)` reads the same bytes as the source
        does, without a system call (a map of the file): what locating needs is read through it."""
        if self.offset < 0:
            assert self.locate is not None
            object.__setattr__(self, "offset", self.locate(self, read))
        return self.offset


@fast_init
@dataclass(frozen=True)
class TensorInfo:
    """A tensor as the file describes it; its data stays on disk until an entry loads it."""

    __setstate__ = refuse_pickle_state

    shape: tuple[int, ...]
    # torch's name for the element type ("float32"): listing needs no torch. A torch.dtype given
    # here is recorded by its name; `torch_dtype` gives it back.
    dtype: str
    storage: Storage | None
    storage_offset: int = 0  # in elements of `dtype`
    stride: tuple[int, ...] = ()
    layout: str = "strided"  # strided | quantized | sparse_coo | sparse_csr | ... | meta | encoded | unsupported
    requires_grad: bool = False
    is_parameter: bool = False
    quantizer: tuple[Any, ...] | None = None  # (qscheme name, scale(s), zero point(s)[, axis])
    components: Mapping[str, TensorInfo] | None = None  # sparse: indices/values/...
    subclass: str | None = None  # class path of a tensor subclass the file names
    note: str | None = None  # why the data cannot be loaded, for unsupported layouts
    # layout "encoded": bytes in an encoding torch has no dtype for (GGUF "Q4_K", ONNX int8 with a
    # scale and zero point, ...). `dtype` is what `decode()` returns (the dequantized values),
    # `encoding` names the stored form, `encoding_params` its parameters, `stored_nbytes` its size.
    encoding: str | None = None
    encoding_params: Mapping[str, Any] | None = None
    stored_nbytes: int | None = None
    decode: Callable[[], torch.Tensor] | None = field(default=None, compare=False, repr=False)
    # encoded: the decoded values in memory order, `chunk_bytes` of them at a time, so statistics and
    # diffs stream through a large quantized tensor instead of decoding it whole (`iter_chunks`)
    decode_chunks: Callable[[int], Iterator[torch.Tensor]] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if type(self.dtype) is not str or self.dtype.startswith("torch."):
            object.__setattr__(self, "dtype", dtype_name(self.dtype))

    @property
    def torch_dtype(self) -> Any:
        return torch_dtype(self.dtype)

    # plain properties: functools.cached_property takes a lock on every first access (Python 3.11),
    # which cost more than computing these again
    @property
    def itemsize(self) -> int:
        return ITEMSIZE.get(self.dtype) or itemsize(self.dtype)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes as stored in the file."""
        if self.stored_nbytes is not None:
            return self.stored_nbytes
        if self.components:
            return sum(part.nbytes for part in self.components.values())
        # without the two properties it reads: asked for every tensor by a listing's --json
        return math.prod(self.shape) * (ITEMSIZE.get(self.dtype) or itemsize(self.dtype))

    @property
    def device(self) -> str:
        if self.layout == "meta":
            return "meta"
        if self.storage is not None:
            return self.storage.location
        if self.components:
            return next(iter(self.components.values())).device
        return "cpu"

    def is_contiguous(self) -> bool:
        expected = 1
        for size, stride in zip(reversed(self.shape), reversed(self.stride)):
            if size != 1 and stride != expected:
                return False
            expected *= size
        return True

    def with_flags(self, **changes: Any) -> TensorInfo:
        return replace(self, **changes)


def strided_tensor(shape: tuple[int, ...], dtype: str, storage: Storage, storage_offset: int, stride: tuple[int, ...],
                   requires_grad: bool) -> TensorInfo:
    """
    `TensorInfo(shape=..., dtype=..., storage=..., storage_offset=..., stride=..., requires_grad=...)`
    for a `dtype` that is already a plain name ("float32"), made in a fifth of the time: the
    unpickler makes one per tensor, and a keyword call of the 17-field `__init__` was 1.8 µs of it.
    Its `__dict__` holds these six fields; the others read their defaults from the class, where the
    dataclass keeps them (equality, hash, repr and `replace` read every field by name). Copying all
    17 into each record was a fifth of building it.
    """
    info = object.__new__(TensorInfo)
    object.__setattr__(info, "__dict__", {"shape": shape, "dtype": dtype, "storage": storage,
                                          "storage_offset": storage_offset, "stride": stride,
                                          "requires_grad": requires_grad})
    return info


@fast_init
@dataclass(frozen=True)
class TensorEntry:
    """
    A named tensor of a checkpoint. Everything but `load()`/`iter_chunks()` comes from headers.

    Example:
        >>> entry = ckpt.tensor("conv1.weight")
        >>> entry.shape, entry.dtype, entry.device
        ((64, 3, 7, 7), torch.float32, 'cuda:0')
        >>> entry.load().std()
    """

    name: str
    info: TensorInfo = field(repr=False)
    path: tuple[Any, ...] = field(default=(), repr=False, compare=False)  # keys from the root

    @property
    def shape(self) -> tuple[int, ...]:
        return self.info.shape

    @property
    def dtype(self) -> torch.dtype:
        """The `torch.dtype` (imports torch); `dtype_name` is the same without it."""
        return self.info.torch_dtype

    @property
    def dtype_name(self) -> str:
        """torch's name for the dtype, e.g. "float32" (as `--json` output writes it)."""
        return self.info.dtype

    @property
    def numel(self) -> int:
        return self.info.numel

    @property
    def nbytes(self) -> int:
        return self.info.nbytes

    @property
    def device(self) -> str:
        return self.info.device

    @property
    def layout(self) -> str:
        return self.info.layout

    @property
    def encoding(self) -> str | None:
        """The stored encoding when torch has no dtype for it (e.g. "Q4_K"); `load()` then dequantizes."""
        return self.info.encoding

    @property
    def storage_key(self) -> str | None:
        return None if self.info.storage is None else self.info.storage.key

    def load(self) -> torch.Tensor:
        """Read this tensor's bytes and return it as a CPU `torch.Tensor` (strides as saved).
        A tensor with an `encoding` (block quants, int8 with scale and zero point) is returned
        dequantized, as `dtype` (float32 unless the reader says otherwise)."""
        return load_tensor(self.info, self.name)

    def iter_chunks(self, chunk_bytes: int = DEFAULT_CHUNK_BYTES, *, reuse_buffer: bool = False,
                    buffer: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
        """
        Yield the tensor's elements in memory order as 1-D tensors of at most `chunk_bytes`.

        Memory stays bounded by one chunk. With `reuse_buffer=True` every chunk is written into
        the same buffer, so a chunk is valid only until the next one is requested; that saves
        an allocation per chunk when the caller only reduces each chunk (statistics, diffs).
        `buffer`, a uint8 tensor of at least `chunk_bytes`, is that buffer supplied by the caller
        (and implies `reuse_buffer`), e.g. from the thread's `ScratchBuffers`.
        """
        return iter_tensor_chunks(self.info, self.name, chunk_bytes, reuse_buffer=reuse_buffer, buffer=buffer)


class PickledObject:
    """
    Stand-in for an object of a class the pickle names but ckptview will not import.

    Subclasses are made per class path by the unpickler, so `type(obj).class_path` says what
    the file wanted; the constructor arguments and state are kept as data, never acted on.
    """

    class_path = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> PickledObject:
        obj = super().__new__(cls)
        obj.args = args
        obj.kwargs = kwargs
        obj.state = None
        obj.items = {}
        obj.list_items = []
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass  # REDUCE calls the class; __new__ has recorded the arguments already

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items[key] = value

    def append(self, value: Any) -> None:
        self.list_items.append(value)

    def extend(self, values: Sequence[Any]) -> None:
        self.list_items.extend(values)

    def __repr__(self) -> str:
        return f"<{self.class_path} (not imported)>"

    @property
    def attributes(self) -> dict[str, Any]:
        """The object's `__dict__` as the pickle stored it (empty when it stored none)."""
        state = self.state
        if isinstance(state, tuple) and len(state) == 2 and (state[0] is None or isinstance(state[0], dict)):
            merged = dict(state[0] or {})
            merged.update(state[1] or {})
            return merged
        return dict(state) if isinstance(state, dict) else {}

    def is_module(self) -> bool:
        """True for a pickled `nn.Module`: its state has the module's parameter/buffer/child dicts."""
        attributes = self.attributes
        return "_parameters" in attributes and "_modules" in attributes

    def children(self) -> Iterator[tuple[Any, Any]]:
        """(key, value) pairs under this object, named as `state_dict()` would for a module."""
        attributes = self.attributes
        if self.is_module():
            for group in ("_parameters", "_buffers", "_modules"):
                for key, value in _mapping_items(attributes.get(group)):
                    if value is not None:
                        yield key, value
            return
        if attributes:
            yield from attributes.items()
        elif self.state is not None:
            yield "state", self.state
        yield from self.items.items()
        yield from enumerate(self.list_items)
        if not attributes and self.state is None and self.args:
            yield from enumerate(self.args)


def _mapping_items(value: Any) -> Iterator[tuple[Any, Any]]:
    if isinstance(value, Mapping):
        yield from value.items()
    elif isinstance(value, PickledObject):
        yield from value.items.items()


def children_of(node: Any) -> Iterator[tuple[Any, Any]] | None:
    """The (key, child) pairs of a container node, or None for a leaf."""
    if isinstance(node, dict):  # the common case, ahead of the slower abstract-class check
        return iter(node.items())
    if isinstance(node, (list, tuple)):
        return iter(enumerate(node))
    if isinstance(node, Mapping):
        return iter(node.items())
    if isinstance(node, PickledObject):
        return node.children()
    return None


def walk_tensors(root: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], TensorInfo]]:
    """
    Every (path, TensorInfo) under `root`, depth first, in the file's order; cycles visited once.
    Paths are kept as (parent, key) links and turned into tuples only at tensors, so the walk is
    linear in the tree's size however deep a file nests it (100,000 nested lists included).
    """
    stack: list[tuple[Any, Any]] = [(None, root)]
    seen_containers: set[int] = set()
    while stack:
        link, node = stack.pop()
        if isinstance(node, TensorInfo):
            yield prefix + _unlink(link), node
            continue
        children = children_of(node)
        if children is None or id(node) in seen_containers:
            continue
        seen_containers.add(id(node))
        stack.extend(reversed([((link, key), child) for key, child in children]))


def _unlink(link: Any) -> tuple[Any, ...]:
    keys = []
    while link is not None:
        link, key = link
        keys.append(key)
    return tuple(reversed(keys))


ROOT_NAME = "<root>"  # the name of a tensor saved on its own (torch.save(tensor)): it has no path


def dotted_name(path: Sequence[Any]) -> str:
    return ".".join(str(part) for part in path)


@dataclass(frozen=True)
class LayerRole:
    """
    What a tensor is to the layer using it, when the file records that (an ONNX graph's nodes)
    and names alone may not tell: `val_14` feeding a MatMul is a Linear weight stored [in, out].
    """

    module: str  # the layer: the weights' shared name prefix ("bn1") or the node's name
    leaf: str    # its part, named as torch names it: weight, bias, running_mean, running_var
    kind: str    # "Conv2d", "Linear", "BatchNorm", "Embedding", "LayerNorm", ...
    detail: str  # the shape read as that layer: "768×3072 (in×out)"


@dataclass(frozen=True)
class PickleImport:
    """A global the file's pickle names beyond the allow-list, and how often it is used."""

    name: str  # "module.qualname", e.g. "posix.system"
    count: int


@dataclass(frozen=True)
class LazyRoot:
    """A checkpoint tree a reader builds only when asked: a million-tensor header is checked at open
    (fast) but its million records are made only by whatever lists them."""

    build: Callable[[], Any]


class Checkpoint:
    """
    An opened checkpoint: a lazy tree of the file's contents. Use as a context manager.

    Attributes:
        path: the file (or index / directory) opened.
        format: what the content is, e.g. "torch-zip", "torch-legacy", "safetensors".
        root: the tree: dicts, lists, numbers, strings, `TensorInfo` leaves, `PickledObject`s.
        metadata: free-form string metadata (safetensors `__metadata__`), else empty.
        pickle_imports: globals outside the allow-list the file names (empty when it needs no code).
        layers: tensor name -> `LayerRole`, for formats whose file says which layer uses a tensor
            (ONNX); analyzers prefer it to guessing from names. Empty for state dicts.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        format: str,
        root: Any | LazyRoot,
        *,
        file_size: int,
        sources: Sequence[FileSource] = (),
        metadata: Mapping[str, str] | None = None,
        pickle_imports: Sequence[PickleImport] = (),
        trust: bool = False,
        details: Mapping[str, Any] | None = None,
        layers: Mapping[str, LayerRole] | None = None,
    ) -> None:
        self.path = os.fspath(path)
        self.format = format
        self._root = root
        self.file_size = file_size
        self.metadata = dict(metadata or {})
        self.pickle_imports = tuple(pickle_imports)
        self.trust = trust
        self.details = dict(details or {})
        self.layers = dict(layers or {})
        self._sources = list(sources)
        self._tensors: list[TensorEntry] | None = None
        self._by_name: dict[str, TensorEntry] | None = None
        self._cache: dict[str, Any] = {}
        self._cache_lock = threading.Lock()

    @property
    def root(self) -> Any:
        """The tree (built on first use when the reader deferred it: `scan` never needs it)."""
        if isinstance(self._root, LazyRoot):
            with self._cache_lock:
                if isinstance(self._root, LazyRoot):
                    self._root = self._root.build()
        return self._root

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        for source in self._sources:
            source.close()

    def __repr__(self) -> str:
        return f"<Checkpoint {self.format} {os.path.basename(self.path)!r}: {len(self.tensors())} tensors>"

    @property
    def needs_trust(self) -> bool:
        """True when the pickle names globals outside the allow-list (code ckptview did not run)."""
        return bool(self.pickle_imports)

    def tensors(self) -> list[TensorEntry]:
        """Every tensor in the file, named by its dotted path in the tree, in file order."""
        if self._tensors is None:
            # a root built at open holds young records: the young collection a pause starts with moved them
            # to the oldest generation, and the full collections that set off (2 ms in a notebook's process)
            # came every few listings of a 300-tensor checkpoint
            with gc_paused(collect_first=isinstance(self._root, LazyRoot)):
                self._tensors = _flat_entries(self.root)
                if self._tensors is None:
                    self._tensors = [TensorEntry(dotted_name(path) or ROOT_NAME, info, path)
                                     for path, info in walk_tensors(self.root)]
        return self._tensors

    def tensor(self, name: str) -> TensorEntry:
        """The tensor called `name`; KeyError names the closest existing names."""
        if self._by_name is None:
            self._by_name = {entry.name: entry for entry in self.tensors()}
        try:
            return self._by_name[name]
        except KeyError:
            import difflib

            close = difflib.get_close_matches(name, list(self._by_name), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise KeyError(f"no tensor named {name!r} in {os.path.basename(self.path)}{hint}") from None

    def get(self, path: Sequence[Any]) -> Any:
        """The node of the tree at `path` (a sequence of keys/indices from the root)."""
        node = self.root
        for key in path:
            node = dict(children_of(node) or ())[key]
        return node

    @property
    def tensor_count(self) -> int:
        return len(self.tensors())

    def unique_tensors(self) -> list[TensorEntry]:
        """One entry per distinct stored view: tied weights (the same storage, offset, shape) count once."""
        return self.cached("unique_tensors", self._unique_tensors)

    def _unique_tensors(self) -> list[TensorEntry]:
        # parameter_count, total_bytes, info and the stats panel all ask; the tree never changes
        entries = self.tensors()
        # most files store one tensor per storage: then every view is its own, and no identity is needed
        # (storage_identity inline: a call per tensor was a tenth of `info` on 20,000 tensors)
        storages = [entry.info.storage for entry in entries]
        if len({(id(storage.source), storage.key) for storage in storages if storage is not None}) == len(entries):
            with self._cache_lock:
                self._cache["a storage per view"] = True
            return list(entries)
        seen: set[Any] = set()
        unique = []
        for entry in entries:
            identity = view_identity(entry.info)
            if identity not in seen:
                seen.add(identity)
                unique.append(entry)
        return unique

    @property
    def parameter_count(self) -> int:
        """Elements over all tensors, counting a storage view shared by several names once."""
        return sum(entry.numel for entry in self.unique_tensors())

    @property
    def total_bytes(self) -> int:
        """Bytes of tensor data, each stored block counted once."""
        unique = self.unique_tensors()
        if self._cache.get("a storage per view"):  # no storage counted twice: no identities to compare
            return sum(entry.info.storage.nbytes for entry in unique)  # type: ignore[union-attr]
        storages: dict[tuple[int, str], int] = {}
        loose = 0
        for entry in unique:
            storage = entry.info.storage
            if storage is not None:
                storages[storage_identity(storage)] = storage.nbytes
            else:
                loose += entry.nbytes
        return sum(storages.values()) + loose

    def cached(self, key: str, compute: Any) -> Any:
        """Memoise an analysis of this checkpoint (analyzers call this; the second call is free)."""
        with self._cache_lock:
            if key in self._cache:
                return self._cache[key]
        value = compute()
        with self._cache_lock:
            return self._cache.setdefault(key, value)


def _flat_entries(root: Any) -> list[TensorEntry] | None:
    """The entries of a root that is one dict of tensors (safetensors, most state dicts): named by
    their keys, without walking paths (a million-tensor file lists in a third of the time)."""
    if not isinstance(root, dict):
        return None
    entries = []
    new, fill = object.__new__, object.__setattr__  # what TensorEntry's __init__ does, without its frame
    for key, info in root.items():
        if type(info) is not TensorInfo:
            return None
        entry = new(TensorEntry)
        fill(entry, "__dict__", {"name": (key if type(key) is str else str(key)) or ROOT_NAME, "info": info,
                                 "path": (key,)})
        entries.append(entry)
    return entries


@functools.lru_cache(maxsize=4096)
def contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The strides of a row-major (C-contiguous) tensor of `shape`, in elements, as torch gives them."""
    stride, running = [], 1
    for dim in reversed(shape):
        stride.append(running)
        running *= max(dim, 1)
    return tuple(reversed(stride))


def storage_identity(storage: Storage) -> tuple[int, str]:
    """
    What tells a stored block from every other one of a checkpoint: its key, which is unique only
    within its file, and its file's source. The shards of a sharded torch set each number their
    storages from "0": by key alone, layers.1.weight in the second shard was layers.0.weight in the
    first, and its statistics and the weights an inference run loaded were that tensor's.
    """
    return id(storage.source), storage.key


def view_identity(info: TensorInfo) -> Any:
    if info.storage is None:
        return id(info)
    return (storage_identity(info.storage), info.storage_offset, info.shape, info.stride, info.dtype)


# --- reading tensor data -------------------------------------------------------------------------

# A view may repeat its stored elements (stride 0, overlapping strides: torch.expand). Reading one
# that presents this many more elements than it stores costs time out of all proportion to the file.
_REPEAT_FACTOR_LIMIT = 16
_REPEATED_ELEMENTS_LIMIT = 1 << 24


def not_decoded(info: TensorInfo) -> bool:
    """Whether the tensor is stored in an encoding ckptview lists but does not decode (safetensors F6,
    some TFLite types): its bytes are known, its values are not."""
    return info.layout == "encoded" and info.decode is None


def without_numbers(info: TensorInfo) -> bool:
    """Whether the tensor's values cannot be had as numbers: no data to read (meta, unsupported layouts,
    bytes torch.save skipped), an encoding listed but not decoded, or a dtype torch converts to nothing
    else (`UNCONVERTIBLE`).
    What statistics, diffs and plots leave out, saying so."""
    return (info.layout in ("unsupported", "meta") or not_decoded(info) or info.dtype in UNCONVERTIBLE
            or (info.storage is not None and info.storage.unsaved))


def repeated_view(info: TensorInfo) -> str:
    """Why the view is too repetitive to stream in full (empty when it is not): a 256 KiB storage
    can be viewed as 4 billion elements, which statistics or a diff would have to visit one by one."""
    if info.layout != "strided" or info.storage is None or info.numel <= _REPEATED_ELEMENTS_LIMIT:
        return ""
    stored = _span_elements(info)
    if info.numel <= stored * _REPEAT_FACTOR_LIMIT:
        return ""
    return (f"a view that repeats its {stored:,} stored elements to show {info.numel:,} (stride "
            f"{list(info.stride)}): skipped, reading it would visit every repeat")


def views_beyond_their_storage(infos: Iterable[TensorInfo]) -> dict[Any, str]:
    """
    The views (by `view_identity`) to skip, each with why, among distinct views that together would
    read their storage more than `_REPEAT_FACTOR_LIMIT` times over (past 64 MiB): `[x[i:] for i in
    range(10_000)]` over a 100 MB `x` is a 100 MB file that torch loads at once, and statistics would
    read a terabyte. Views are counted in the order given, so the first ones are kept.
    """
    read: dict[Any, int] = {}
    skipped: dict[Any, str] = {}
    for info in infos:
        storage = info.storage
        if storage is None or info.layout != "strided":
            continue
        key = storage_identity(storage)
        total = read.get(key, 0) + info.nbytes
        read[key] = total
        if total > max(_REPEAT_FACTOR_LIMIT * storage.nbytes, 64 << 20):
            skipped[view_identity(info)] = (f"one of the views of a {storage.nbytes:,}-byte storage that together "
                                            f"read it more than {_REPEAT_FACTOR_LIMIT} times over: skipped, the "
                                            "views before it were read")
    return skipped


def _span_elements(info: TensorInfo) -> int:
    """Elements from the first to the last one the view touches, inclusive."""
    if info.numel == 0:
        return 0
    return 1 + sum((size - 1) * abs(stride) for size, stride in zip(info.shape, info.stride))


def _read_elements(info: TensorInfo, name: str, first: int, count: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """`count` elements from element `first` of the storage, as a 1-D tensor of `info.dtype`."""
    storage = info.storage
    assert storage is not None
    itemsize = info.itemsize
    start, size = first * itemsize, count * itemsize
    if start + size > storage.nbytes:
        raise CorruptCheckpointError(
            storage.source.path,
            f"tensor {name!r} reaches byte {start + size:,} of its storage, which holds only "
            f"{storage.nbytes:,} bytes: the file's index and data disagree. Re-save the checkpoint.",
        )
    raw = out[:size] if out is not None else torch.empty(size, dtype=torch.uint8)
    if size:
        storage.source.read_into(memoryview(raw.numpy()).cast("B"), storage.data_offset() + start)
    if storage.byteorder == "big" and itemsize > 1:
        raw = raw.view(-1, itemsize).flip(1).reshape(-1)
    return raw.view(info.torch_dtype)


def load_tensor(info: TensorInfo, name: str) -> torch.Tensor:
    try:
        return _load_tensor(info, name)
    except (RuntimeError, ValueError, IndexError, TypeError) as exc:
        # torch refusing the sizes, strides or quantizer the file describes: the file is at fault
        source = info.storage.source.path if info.storage is not None else None
        raise TensorDataError(source, f"tensor {name!r} cannot be rebuilt from what the file says "
                                      f"({str(exc).splitlines()[0][:200]}): the file is damaged. Re-save it.") from exc


def _load_tensor(info: TensorInfo, name: str) -> torch.Tensor:
    if info.layout == "meta":
        return torch.empty_strided(info.shape, info.stride, dtype=info.torch_dtype, device="meta")
    if info.layout == "quantized":
        return _load_quantized(info, name)
    if info.layout == "encoded" and info.decode is not None:
        return _decoded(info, name)
    if info.components is not None and info.layout.startswith("sparse"):
        return _load_sparse(info, name)
    if info.layout != "strided" or info.storage is None:
        raise TensorDataError(
            None, f"tensor {name!r} has layout {info.layout} whose data ckptview cannot load"
            + (f" ({info.note})" if info.note else "")
        )
    if info.numel == 0:
        return torch.empty(info.shape, dtype=info.torch_dtype)
    flat = _read_elements(info, name, info.storage_offset, _span_elements(info))
    if info.is_contiguous():
        return flat.view(info.shape)
    return flat.as_strided(info.shape, info.stride)


def _decoded(info: TensorInfo, name: str) -> torch.Tensor:
    tensor = info.decode()  # type: ignore[misc]
    if tuple(tensor.shape) != info.shape:
        raise TensorDataError(None, f"tensor {name!r} decodes to shape {list(tensor.shape)} but the file declares "
                                    f"{list(info.shape)}: the file is damaged. Re-export it.")
    return tensor.to(info.torch_dtype)


def _load_quantized(info: TensorInfo, name: str) -> torch.Tensor:
    int_dtype = {"qint8": "int8", "quint8": "uint8", "qint32": "int32"}.get(info.dtype)
    if int_dtype is None or info.quantizer is None:
        raise TensorDataError(None, f"tensor {name!r} uses quantized dtype {info.dtype}, which ckptview cannot load")
    raw = _load_tensor(replace(info, dtype=int_dtype, layout="strided"), name)
    scheme = info.quantizer[0]
    if scheme in ("per_tensor_affine", "per_tensor_symmetric"):
        return torch._make_per_tensor_quantized_tensor(raw, float(info.quantizer[1]), int(info.quantizer[2]))
    scales, zero_points, axis = info.quantizer[1], info.quantizer[2], info.quantizer[3]
    scales = _load_tensor(scales, name + ".scales") if isinstance(scales, TensorInfo) else torch.as_tensor(scales)
    zero_points = _load_tensor(zero_points, name + ".zero_points") if isinstance(zero_points, TensorInfo) else torch.as_tensor(zero_points)
    return torch._make_per_channel_quantized_tensor(raw, scales, zero_points, int(axis))


def _load_sparse(info: TensorInfo, name: str) -> torch.Tensor:
    parts = {key: _load_tensor(part, f"{name}.{key}") for key, part in (info.components or {}).items()}
    if info.layout == "sparse_coo":
        # invariants checked: a sparse tensor with out-of-range indices would read outside its memory
        return torch.sparse_coo_tensor(parts["indices"], parts["values"], info.shape, check_invariants=True)
    if info.layout == "sparse_csr":
        return torch.sparse_csr_tensor(parts["crow_indices"], parts["col_indices"], parts["values"], info.shape,
                                       check_invariants=True)
    raise TensorDataError(None, f"tensor {name!r} has sparse layout {info.layout}, which ckptview cannot load")


class ScratchBuffers:
    """
    Buffers one worker thread reuses across the tensors it reads (`iter_chunks(buffer=...)`) and
    converts: a fresh multi-MiB allocation per tensor is faulted in page by page, 6,600 page faults
    per pass over a 2 GB file. Not thread-safe: one instance per thread.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, purpose: str, count: int, dtype: torch.dtype) -> torch.Tensor:
        """`count` elements of `dtype` for `purpose`, valid until the next `get` of that purpose."""
        buffer = self._buffers.get((purpose, dtype))
        if buffer is None or buffer.numel() < count:
            buffer = self._buffers[(purpose, dtype)] = torch.empty(count, dtype=dtype)
        return buffer[:count]


def _strided_chunks(view: torch.Tensor, step: int) -> Iterator[torch.Tensor]:
    """The elements of `view` in memory order, at most `step` at a time, copying one block of rows
    at a time: a view that repeats its storage is never made contiguous whole."""
    if view.numel() <= step or view.dim() <= 1:
        flat = view.reshape(-1)
        for start in range(0, flat.numel(), step):
            yield flat[start : start + step]
        return
    inner = view[0].numel()
    if inner == 0:
        return
    if inner <= step:
        rows = step // inner
        for start in range(0, view.shape[0], rows):
            yield view[start : start + rows].reshape(-1)
        return
    for row in view:
        yield from _strided_chunks(row, step)


def iter_tensor_chunks(info: TensorInfo, name: str, chunk_bytes: int, *, reuse_buffer: bool,
                       buffer: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
    if info.layout == "encoded" and info.decode_chunks is not None:
        yield from info.decode_chunks(chunk_bytes)
        return
    if info.layout != "strided" or info.storage is None or not info.is_contiguous():
        tensor = load_tensor(info, name)
        yield from _strided_chunks(tensor, max(1, chunk_bytes // max(1, tensor.element_size())))
        return
    itemsize = info.itemsize
    step = max(1, chunk_bytes // itemsize)
    size = min(step, info.numel) * itemsize
    if buffer is not None and (buffer.dtype != torch.uint8 or buffer.dim() != 1 or not buffer.is_contiguous()
                               or buffer.numel() < size):
        raise ValueError(f"buffer must be a contiguous 1-D uint8 tensor of at least {size:,} bytes")
    if buffer is None and reuse_buffer:
        buffer = torch.empty(size, dtype=torch.uint8)
    for start in range(0, info.numel, step):
        count = min(step, info.numel - start)
        yield _read_elements(info, name, info.storage_offset + start, count, buffer)
