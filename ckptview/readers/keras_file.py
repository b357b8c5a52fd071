"""
Keras models and weights in HDF5, read with `h5py` and never with Keras: `keras.models.load_model`
rebuilds the model from its config, which runs a `Lambda` layer's marshalled bytecode and imports
custom classes.

Four layouts, told apart by what the file holds, not by its name:

- legacy full model (`model.save("m.h5")`, Keras 2 and 3): root attributes `model_config` and
  `training_config` (JSON), a `model_weights` group with `layer_names`, one group per layer with
  `weight_names` (`dense_1/kernel:0`, Keras 3 `dense_1/kernel`), and `optimizer_weights`;
- legacy weights only (`save_weights("w.h5")`): `layer_names` at the root (long lists split into
  `layer_names0`, `layer_names1`, ...), the layer groups beside it;
- Keras 3 `.weights.h5`: `layers/<layer>/vars/<i>` (the layer's real name in the `vars` group's
  `name` attribute; nested layers as `layers/<layer>/<part>/vars`), `optimizer/vars/<i>`;
- Keras 3 `.keras`: a zip of `config.json`, `metadata.json` and `model.weights.h5`, the last read
  inside the archive (in place when stored uncompressed, as Keras writes it).

Names are the ones users see (`dense_1/kernel:0` -> `dense_1.kernel`). A full model (or any file
with optimizer state) keeps the file's split: `model_weights.<name>` and `optimizer_weights`,
the latter shaped as torch's optimizer state (`state` per parameter name, `param_groups`), so
training views map it exactly. Each weight gets a `LayerRole` (Dense kernel `[in, out]` is a
Linear weight, BatchNormalization `moving_variance` a `running_var`, ...), so the tensor table and
`batchnorm_checks` read Keras models as they read PyTorch ones.

Contiguous, uncompressed datasets (what Keras writes) are read in place, like safetensors (a
deflated archive's `model.weights.h5` from a temporary copy inflated once); chunked or compressed
ones through h5py, a band of rows one chunk tall at a time.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import math
import mmap
import re
import struct
import tempfile
import threading
import zipfile
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any

from ckptview.errors import (
    CkptviewError,
    CorruptCheckpointError,
    TruncatedCheckpointError,
    UnsupportedFormatError,
    printable,
)
from ckptview.readers.hdf5_text import check_hdf5_text
from ckptview.readers.model import (
    Checkpoint,
    FileSource,
    LayerRole,
    PickleImport,
    Storage,
    TensorInfo,
    contiguous_stride,
)
from ckptview.readers.tf_ops import CHECKPOINT_OPS, CODE_OPS
from ckptview.readers.torch_pickle import naming
from ckptview.readers.zip_directory import BadZip, data_offset

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
# A compressed dataset inflating to more than this many times the whole file is a shape bomb:
# deflate's best ratio is about 1032:1.
_MAX_EXPANSION = 1100
_MAX_JSON_BYTES = 64 * 1024 * 1024
# HDF5 inflates a whole chunk to read any element of it: larger chunks, or bands of rows one chunk tall
# larger than this, are not read (h5py's own chunks are at most 1 MiB; Keras writes none).
_MAX_CHUNK_BYTES = 16 << 20
_MAX_BAND_BYTES = 64 << 20
_OVERVIEW_LAYERS = 24

_NUMERIC_KINDS = "fiub"
_DTYPES = {"float16": "float16", "float32": "float32", "float64": "float64", "int8": "int8", "int16": "int16",
           "int32": "int32", "int64": "int64", "uint8": "uint8", "uint16": "uint16", "uint32": "uint32",
           "uint64": "uint64", "bool": "bool"}

# Keras variable name -> (torch's leaf name, layer kind) when the layer class says what it is
_BATCHNORM = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_variance": "running_var"}
_KERAS3_VARS = {  # the order a Keras 3 layer creates its variables in, for `vars/<i>`
    "Dense": ("kernel", "bias"), "EinsumDense": ("kernel", "bias"),
    "Conv1D": ("kernel", "bias"), "Conv2D": ("kernel", "bias"), "Conv3D": ("kernel", "bias"),
    "Conv1DTranspose": ("kernel", "bias"), "Conv2DTranspose": ("kernel", "bias"),
    "Conv3DTranspose": ("kernel", "bias"), "DepthwiseConv2D": ("kernel", "bias"),
    "SeparableConv2D": ("depthwise_kernel", "pointwise_kernel", "bias"),
    "BatchNormalization": ("gamma", "beta", "moving_mean", "moving_variance"),
    "LayerNormalization": ("gamma", "beta"), "GroupNormalization": ("gamma", "beta"),
    "Embedding": ("embeddings",), "LSTMCell": ("kernel", "recurrent_kernel", "bias"),
    "GRUCell": ("kernel", "recurrent_kernel", "bias"), "SimpleRNNCell": ("kernel", "recurrent_kernel", "bias"),
    "PReLU": ("alpha",),
}
# the nested layers' groups (`layers/<layer>/<key>/vars`) of a Keras 3 layer class, in the order the class
# makes them: the order of the model's trainable variables, and so of the optimizer's
_NESTED_ORDER = {"MultiHeadAttention": ("query_dense", "key_dense", "value_dense", "output_dense")}
# Keras 3 optimizers: their slot variables per trainable variable, in creation order
_SLOTS = {"adam": ("momentum", "velocity"), "adamw": ("momentum", "velocity"), "nadam": ("momentum", "velocity"),
          "adamax": ("m", "u"), "sgd": ("momentum",), "rmsprop": ("velocity", "momentum"), "adagrad": ("accumulator",)}

_OPTIMIZER_CLASSES = {"adam": "Adam", "adamw": "AdamW", "nadam": "Nadam", "adamax": "Adamax", "sgd": "SGD",
                      "rmsprop": "RMSprop", "adagrad": "Adagrad"}


def local_only(path: str, what: str) -> None:
    """These readers need random access through libraries (h5py, the FlatBuffer bindings) that read
    local files: a URL is refused in one line rather than failing inside them."""
    from ckptview.readers.remote import is_url

    if is_url(path):
        raise UnsupportedFormatError(path, f"{what} can be read from a local file only: download it first (for "
                                           "example with `huggingface-cli download` or `curl -O`) and open the copy.")


def read_keras_h5(path: str, size: int, *, trust: bool) -> Checkpoint:
    local_only(path, "a Keras HDF5 file")
    import h5py

    source = FileSource(path)
    try:
        h5 = h5py.File(path, "r", locking=False)
    except OSError as exc:
        raise CorruptCheckpointError(path, f"an HDF5 file that h5py cannot open ({_first_line(exc)}): it is damaged or "
                                           "cut off. Copy or save it again.") from exc
    reader = _Reader(path, size, h5, source, base_offset=0, keep_open=(h5,))
    with open(path, "rb") as stream, mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ) as data:
        reader.heap_bytes = (data, 0, size)
        return reader.read(trust, config=None, metadata_json=None, format="keras-h5")


def read_keras_zip(path: str, size: int, *, trust: bool) -> Checkpoint:
    local_only(path, "a .keras archive")
    with zipfile.ZipFile(path) as archive:
        config = _zip_json(path, archive, "config.json")
    with _config_code_counts(code_in_config(config)):
        return _read_keras_zip(path, size, trust, config)


@contextlib.contextmanager
def _config_code_counts(code: list[PickleImport]) -> Iterator[None]:
    """load_model builds the model from its config before it reads a weight: a file refused past its
    config still runs the code the config holds, and the refusal names it (`scan` exits 3)."""
    try:
        yield
    except CkptviewError as exc:
        error = naming(exc, code, loader="keras.models.load_model")
        if error is exc:
            raise
        raise error from exc


def _read_keras_zip(path: str, size: int, trust: bool, config: Any) -> Checkpoint:
    import h5py

    with zipfile.ZipFile(path) as archive:
        metadata_json = _zip_json(path, archive, "metadata.json") if "metadata.json" in archive.namelist() else None
        member = archive.getinfo("model.weights.h5")
        if member.file_size > _MAX_EXPANSION * size:
            raise CorruptCheckpointError(path, f"model.weights.h5 claims {member.file_size:,} bytes inside a "
                                               f"{size:,}-byte archive: the archive is damaged or crafted. Save the "
                                               "model again.")
        stored = member.compress_type == zipfile.ZIP_STORED
        base_offset = _member_data_offset(path, member) if stored else 0
        if stored and base_offset + member.file_size > size:
            raise CorruptCheckpointError(path, "model.weights.h5 runs past the end of the archive: the file was cut "
                                               "off. Copy or save it again.")
    # A stored member is read in place through the archive's own file.
    if stored:
        stream: Any = _Window(path, base_offset, member.file_size)
        h5 = _weights_file(path, h5py, stream)
        reader = _Reader(path, size, h5, FileSource(path), base_offset=base_offset, inner_size=member.file_size,
                         keep_open=(h5, stream))
        with open(path, "rb") as raw, mmap.mmap(raw.fileno(), 0, access=mmap.ACCESS_READ) as data:
            reader.heap_bytes = (data, base_offset, base_offset + member.file_size)
            return reader.read(trust, config=config, metadata_json=metadata_json, format="keras")
    # A deflated one is inflated once, into a temporary file read in place from then on: h5py over the
    # archive's stream inflated it again from its start at every backward seek (statistics of a 186 MB
    # archive took 14 s, against 1 s stored). The file loses its name once the checkpoint is read; the
    # descriptors that read it keep it until the checkpoint closes, and nothing is left behind.
    with _inflated_copy(path, member) as spill:
        source = FileSource(spill.name)
        source.open()
        h5 = _weights_file(path, h5py, spill.name)
        reader = _Reader(path, size, h5, source, base_offset=0, inner_size=member.file_size, keep_open=(h5,))
        with mmap.mmap(spill.fileno(), 0, access=mmap.ACCESS_READ) as data:
            reader.heap_bytes = (data, 0, member.file_size)
            return reader.read(trust, config=config, metadata_json=metadata_json, format="keras")


def _weights_file(path: str, h5py: Any, name_or_stream: Any) -> Any:
    try:
        return h5py.File(name_or_stream, "r", locking=False)
    except OSError as exc:
        raise CorruptCheckpointError(path, "its model.weights.h5 is an HDF5 file h5py cannot open "
                                           f"({_first_line(exc)}): the archive is damaged. Save the model again.") from exc


def _inflated_copy(path: str, member: zipfile.ZipInfo) -> Any:
    """The archive's deflated model.weights.h5 inflated into a temporary file, named so that h5py can
    open it; removed when closed. A temporary folder that is missing, full or read-only is said to be
    the cause, not the archive."""
    spill = None
    try:
        spill = tempfile.NamedTemporaryFile(prefix="ckptview-", suffix=".weights.h5")  # noqa: SIM115 (the caller's)
        with zipfile.ZipFile(path) as archive, archive.open(member) as member_stream:
            while piece := member_stream.read(1 << 20):  # at most _MAX_EXPANSION times the archive in all
                spill.write(piece)
        spill.flush()
        return spill
    except OSError as exc:
        if spill is not None:
            spill.close()
        if exc.errno not in (errno.ENOENT, errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            raise
        raise CkptviewError(path, f"cannot inflate model.weights.h5 ({member.file_size:,} bytes) into a temporary "
                                  f"file in {tempfile.gettempdir()}: {exc.strerror or exc}. Free space there, point "
                                  "TMPDIR elsewhere, or store the archive uncompressed (as Keras saves it).") from exc
    except BaseException:
        if spill is not None:
            spill.close()
        raise


def _first_line(exc: BaseException) -> str:
    return printable(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)[:200]


def _zip_json(path: str, archive: zipfile.ZipFile, name: str) -> Any:
    info = archive.getinfo(name)
    if info.file_size > _MAX_JSON_BYTES:
        raise CorruptCheckpointError(path, f"{name} in the archive claims {info.file_size:,} bytes, far more than a "
                                           "Keras config: the archive is damaged or crafted. Save the model again.")
    with archive.open(name) as stream:
        raw = stream.read(_MAX_JSON_BYTES + 1)
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptCheckpointError(path, f"{name} in the .keras archive is not valid JSON: the archive is damaged. "
                                           "Save the model again.") from exc


def _member_data_offset(path: str, member: zipfile.ZipInfo) -> int:
    source = FileSource(path)
    try:
        return data_offset(source.read, member.orig_filename, member.header_offset)
    except (BadZip, TruncatedCheckpointError) as exc:
        raise CorruptCheckpointError(path, "the archive's directory points at a member header that is not there: the "
                                           ".keras file is damaged. Save the model again.") from exc
    finally:
        source.close()


class _Window(io.RawIOBase):
    """Bytes [start, start + size) of a file as a file of their own, for h5py to open a stored zip member."""

    def __init__(self, path: str, start: int, size: int) -> None:
        self._file = open(path, "rb")  # noqa: SIM115  (h5py reads it until the checkpoint is opened; closed by close())
        self._start, self._size, self._pos = start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        self._pos = {0: offset, 1: self._pos + offset, 2: self._size + offset}[whence]
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer: Any) -> int:
        count = max(0, min(len(buffer), self._size - self._pos))
        self._file.seek(self._start + self._pos)
        got = self._file.readinto(memoryview(buffer)[:count])
        self._pos += got
        return got

    def close(self) -> None:
        self._file.close()
        super().close()


class _RowSource:
    """
    A dataset h5py has to decode (chunked, compressed, or in a deflated archive), as a byte
    source. HDF5 inflates a whole chunk to give any part of it, so a chunked dataset is read a band
    of rows one chunk tall at a time (each chunk inflated once per pass), kept until its last byte
    has been read; any other is read as exactly the elements asked for (`_boxes`). Reading whole
    rows instead, a 2 MB file declaring one row of 2 GB in one chunk took 13 s and 4.3 GB per 2 MB
    read of statistics (`tensor` now refuses such chunks, `_MAX_CHUNK_BYTES`).
    """

    def __init__(self, path: str, dataset: Any, nbytes: int, bands: _Bands, keep_open: tuple[Any, ...] = ()) -> None:
        self.path = path
        self._dataset = dataset
        self._nbytes = nbytes
        self._keep_open = keep_open
        self._lock = threading.Lock()
        self._shape = tuple(dataset.shape)
        self._itemsize = dataset.dtype.itemsize
        self._row_bytes = self._itemsize * math.prod(self._shape[1:])
        self._band_rows = dataset.chunks[0] if dataset.chunks and self._shape else 0
        self._bands = bands

    def read_into(self, buffer: memoryview, offset: int) -> None:
        end = offset + len(buffer)
        with self._lock:
            if not self._shape:
                buffer[:] = self._dataset[()].tobytes()[offset:end]
            elif self._band_rows:
                self._read_bands(buffer, offset, end)
            else:
                first, last = offset // self._itemsize, -(-end // self._itemsize)
                raw = b"".join(self._dataset[box].tobytes() for box in _boxes(self._shape, first, last))
                skip = offset - first * self._itemsize
                buffer[:] = raw[skip:skip + len(buffer)]

    def _read_bands(self, buffer: memoryview, offset: int, end: int) -> None:
        band_bytes = self._band_rows * self._row_bytes
        position = offset
        while position < end:
            start = position // band_bytes * band_bytes
            band = self._bands.get(self, start)
            if band is None:
                row = start // self._row_bytes
                band = self._bands.put(self, start, self._dataset[row:row + self._band_rows].tobytes())
            stop = min(end, start + len(band))
            buffer[position - offset:stop - offset] = band[position - start:stop - start]
            position = stop
            if stop == start + len(band):  # read to its end: a pass moves on
                self._bands.drop(self, start)

    def read(self, offset: int, size: int) -> bytes:
        buffer = bytearray(size)
        self.read_into(memoryview(buffer), offset)
        return bytes(buffer)

    def close(self) -> None:
        for item in self._keep_open:  # h5py files and zip streams: closing twice is harmless
            item.close()


class _Bands:
    """
    The bands of rows a file's chunked datasets have read and not yet read to their end, the last
    few only: a band can be 64 MiB, and a preview of each of a hundred tensors would otherwise keep
    one each. A few, not one: statistics read two tensors at once, and each would evict the other's.
    """

    _KEPT = 4

    def __init__(self) -> None:
        self._bands: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, source: object, start: int) -> bytes | None:
        with self._lock:
            return self._bands.get((id(source), start))

    def put(self, source: object, start: int, band: bytes) -> bytes:
        with self._lock:
            self._bands[(id(source), start)] = band
            while len(self._bands) > self._KEPT:
                self._bands.popitem(last=False)
        return band

    def drop(self, source: object, start: int) -> None:
        with self._lock:
            self._bands.pop((id(source), start), None)


def _dataset_path(name: bytes) -> str:
    return repr(printable("/" + name.decode("utf-8", "replace")))


def _boxes(shape: tuple[int, ...], first: int, last: int) -> Iterator[tuple[slice, ...]]:
    """
    Hyperslabs of an array of `shape` that together hold its elements `first` to `last` (exclusive)
    in row-major order, in that order: a partial run of the first index's sub-array, whole indices,
    then a partial run again, each partial run cut the same way one dimension down (at most two
    boxes per dimension).
    """
    if first >= last:
        return
    if len(shape) == 1:
        yield (slice(first, last),)
        return
    inner = math.prod(shape[1:])
    if not inner:
        return
    head, head_at = divmod(first, inner)
    tail, tail_at = divmod(last, inner)
    if head == tail:
        for box in _boxes(shape[1:], head_at, tail_at):
            yield (slice(head, head + 1), *box)
        return
    if head_at:
        for box in _boxes(shape[1:], head_at, inner):
            yield (slice(head, head + 1), *box)
        head += 1
    if tail > head:
        yield (slice(head, tail), *(slice(None),) * (len(shape) - 1))
    if tail_at:
        for box in _boxes(shape[1:], 0, tail_at):
            yield (slice(tail, tail + 1), *box)


class _TextAttributes:
    """
    The attributes Keras keeps text in (names, configs, versions), each checked to be text before
    h5py reads it: a fuzzed file whose `weight_names` type said "variable-length sequence" instead of
    "variable-length string" crashed the HDF5 library (a segmentation fault) when read.
    """

    def __init__(self, path: str, obj: Any, h5py: Any) -> None:
        self.path, self.obj, self.h5py = path, obj, h5py

    def __contains__(self, key: str) -> bool:
        return key in self.obj.attrs

    def __getitem__(self, key: str) -> Any:
        attribute = self.h5py.h5a.open(self.obj.id, key.encode("utf-8"))
        # Keras writes an empty list as an empty float array: no elements, nothing to convert
        kind = attribute.get_type()
        if math.prod(attribute.shape or ()) and kind.get_class() != self.h5py.h5t.STRING:
            raise CorruptCheckpointError(self.path, f"the HDF5 attribute {printable(key)!r} of "
                                                    f"{printable(self.obj.name)} should hold text but its type says "
                                                    "otherwise: the file is damaged (reading it could crash the HDF5 "
                                                    "library). Get the original file.")
        if kind.committed():
            # its message names the type instead of holding it, so its text was not checked (`check_hdf5_text`)
            raise CorruptCheckpointError(self.path, f"the HDF5 attribute {printable(key)!r} of "
                                                    f"{printable(self.obj.name)} takes its type from one stored "
                                                    "elsewhere in the file (a committed type), which Keras never "
                                                    "writes and ckptview does not read. Get the original file.")
        return self.obj.attrs[key]

    def get(self, key: str, default: Any = None) -> Any:
        if key not in self.obj.attrs:
            return default
        return self[key]


class _Reader:
    def __init__(self, path: str, size: int, h5: Any, source: FileSource, *, base_offset: int,
                 inner_size: int | None = None, keep_open: tuple[Any, ...] = ()) -> None:
        import h5py

        self.h5py = h5py
        self.path, self.size, self.h5, self.source = path, size, h5, source
        self.base_offset = base_offset
        self.inner_size = size if inner_size is None else inner_size
        self.keep_open = keep_open
        self.sources: list[Any] = [source]
        self.bands = _Bands()  # shared by the file's chunked datasets
        self.layers: dict[str, LayerRole] = {}
        self.optimizer_name = ""
        self.heap_bytes: tuple[Any, int, int] | None = None  # (buffer, start, end) of the HDF5 file's bytes
        self.code: list[PickleImport] = []  # what the model's config would run, once it is read
        self.nested_order_unknown: list[str] = []  # layers whose nested layers' variable order is not known

    # -- safety --------------------------------------------------------------------------------

    def refuse_external_links(self) -> None:
        """HDF5 external links name other files; following one would read (and could echo) anything on
        the machine. Every link in the file is looked at (HDF5's own walk, which follows no external
        link) before any is followed."""
        found: list[bytes] = []
        external = self.h5py.h5l.TYPE_EXTERNAL

        def visit(name: bytes, info: Any) -> None:
            if info.type == external:
                found.append(name)

        self.h5.id.links.visit(visit, info=True)
        if found:
            raise CorruptCheckpointError(self.path, f"the HDF5 file links {printable(found[0].decode('utf-8', 'replace'))!r}"
                                                    " to another file; ckptview reads only what is inside the file. "
                                                    "Save the weights again without external links (Keras never "
                                                    "writes them).")

    def check_text(self) -> None:
        """`check_hdf5_text` over the file's bytes, told where its objects' headers are and where
        contiguous datasets keep their bytes (not searched for heaps: the weights are nearly all of a
        file), once those do not overlap. HDF5's visit reads object headers only, no attribute."""
        if self.heap_bytes is None:
            return
        data, start, end = self.heap_bytes
        self.heap_bytes = None
        extents: list[tuple[int, int, bytes]] = []
        # header address -> the object's path; h5py's visit leaves out the object it starts from
        headers = {self.h5py.h5o.get_info(self.h5.id).addr: b"."}
        contiguous = self.h5py.h5d.CONTIGUOUS

        def visit(name: bytes, info: Any) -> None:
            headers.setdefault(info.addr, name)
            if info.type != self.h5py.h5o.TYPE_DATASET:
                return
            dataset = self.h5py.h5o.open(self.h5.id, name)
            if dataset.get_create_plist().get_layout() == contiguous:
                offset = dataset.get_offset()
                if offset is not None:  # what `tensor` reads from there: the shape's bytes
                    nbytes = dataset.get_space().get_simple_extent_npoints() * dataset.get_type().get_size()
                    extents.append((start + offset, start + offset + max(nbytes, dataset.get_storage_size()), name))

        self.h5py.h5o.visit(self.h5.id, visit, info=True)
        extents.sort()
        for (_, first_end, first), (second_start, _, second) in zip(extents, extents[1:]):
            if second_start < first_end:
                # h5py and Keras write each dataset's bytes once; ten thousand datasets over one 100 MB range
                # would make statistics read a terabyte
                raise CorruptCheckpointError(self.path, f"datasets {_dataset_path(first)} and {_dataset_path(second)} "
                                                        "keep their values in overlapping bytes of the file: HDF5 "
                                                        "writes each once, so the file is crafted or damaged. Get the "
                                                        "original file.")
        h5a = self.h5py.h5a

        def attribute_names(header: int) -> list[bytes]:
            # opening an attribute decodes its message (the references, as stored); only reading converts them
            obj = self.h5py.h5o.open(self.h5.id, headers[header])
            return [h5a.open(obj, index=index).name for index in range(h5a.get_num_attrs(obj))]

        check_hdf5_text(self.path, data, start, end, data_extents=[extent[:2] for extent in extents],
                        object_headers=headers, dense_attribute_names=attribute_names)

    def attrs(self, obj: Any) -> _TextAttributes:
        return _TextAttributes(self.path, obj, self.h5py)

    def child(self, group: Any, name: str) -> Any:
        """`group[name]`, or None (external links were refused at open, so it stays in the file)."""
        try:
            return group[name]
        except (KeyError, ValueError):
            return None

    def dataset(self, group: Any, name: str) -> Any:
        """The low-level id of dataset `name` under `group`, or None: a high-level `h5py.Dataset` per
        weight cost as much as everything else at open."""
        try:
            found = self.h5py.h5o.open(group.id, name.encode("utf-8"))
        except (KeyError, ValueError):
            return None
        return found if isinstance(found, self.h5py.h5d.DatasetID) else None

    def tensor(self, dataset_id: Any, key: str) -> TensorInfo:
        """A `TensorInfo` over a dataset's bytes, refused when the dataset reaches outside the file or
        declares more data than the file could hold. Asked of HDF5's low-level API: the high-level
        properties read the creation property list again for each (a third of the time to open)."""
        h5d = self.h5py.h5d
        plist = dataset_id.get_create_plist()
        layout = plist.get_layout()
        if layout == h5d.VIRTUAL:
            raise CorruptCheckpointError(self.path, f"dataset {_dataset_name(dataset_id)} is a virtual dataset, assembled "
                                                    "from other datasets or files; ckptview reads only data stored in "
                                                    "the file. Save the weights again (Keras never writes virtual "
                                                    "datasets).")
        if plist.get_external_count():
            target = plist.get_external(0)[0].decode("utf-8", "replace")
            raise CorruptCheckpointError(self.path, f"dataset {_dataset_name(dataset_id)} keeps its data in external "
                                                    f"file(s) {printable(target)!r}; ckptview reads only data stored "
                                                    "in the file. Save the weights again.")
        dtype = dataset_id.dtype
        shape = tuple(int(dim) for dim in dataset_id.shape)
        nbytes = math.prod(shape) * dtype.itemsize
        torch_name = _DTYPES.get(dtype.newbyteorder("=").name) if dtype.kind in _NUMERIC_KINDS else None
        if torch_name is None:
            return TensorInfo(shape=shape, dtype="uint8", storage=None, layout="unsupported",
                              note=f"HDF5 type {dtype} has no torch dtype")
        offset = dataset_id.get_offset() if layout == h5d.CONTIGUOUS else None
        if offset is not None and nbytes and offset + nbytes > self.inner_size:
            raise CorruptCheckpointError(self.path, f"dataset {_dataset_name(dataset_id)} declares shape {list(shape)} "
                                                    f"({nbytes:,} bytes) from byte {offset:,}, past the end of the "
                                                    f"{self.inner_size:,}-byte file: it is cut off or its header lies. "
                                                    "Copy or save it again.")
        if nbytes > _MAX_EXPANSION * self.size:
            raise CorruptCheckpointError(self.path, f"dataset {_dataset_name(dataset_id)} declares shape {list(shape)} "
                                                    f"({nbytes:,} bytes), more than a {self.size:,}-byte file can hold "
                                                    "even compressed: its header is damaged or crafted. Get the "
                                                    "original file.")
        if layout == h5d.CHUNKED:
            chunk = plist.get_chunk()
            chunk_bytes = math.prod(chunk) * dtype.itemsize
            band_bytes = chunk[0] * dtype.itemsize * math.prod(shape[1:]) if shape else 0
            if chunk_bytes > _MAX_CHUNK_BYTES or band_bytes > _MAX_BAND_BYTES:
                return TensorInfo(shape=shape, dtype=torch_name, storage=None, layout="unsupported",
                                  note=f"stored in HDF5 chunks of shape {list(chunk)} ({chunk_bytes:,} bytes each, "
                                       f"{band_bytes:,} bytes for a band of rows one chunk tall), which HDF5 inflates "
                                       "whole to give any part; ckptview reads at most "
                                       f"{_MAX_CHUNK_BYTES >> 20} MiB chunks and {_MAX_BAND_BYTES >> 20} MiB bands. "
                                       "Save it again with h5py's default chunks")
        byteorder = "big" if dtype.byteorder == ">" else "little"
        if offset is not None and not plist.get_nfilters():
            storage = Storage(key=key, source=self.source, offset=self.base_offset + offset, nbytes=nbytes,
                              location="cpu", byteorder=byteorder)
        else:
            row_source = _RowSource(self.path, self.h5py.Dataset(dataset_id), nbytes, self.bands, self.keep_open)
            self.keep_open = ()  # closed once, with the first source that holds it
            self.sources.append(row_source)
            storage = Storage(key=key, source=row_source, offset=0, nbytes=nbytes, location="cpu",  # type: ignore[arg-type]
                              byteorder=byteorder)
        return TensorInfo(shape=shape, dtype=torch_name, storage=storage, stride=contiguous_stride(shape))

    # -- layouts -------------------------------------------------------------------------------

    def read(self, trust: bool, **kwargs: Any) -> Checkpoint:
        """The checkpoint; the HDF5 file stays open only when a dataset is read through h5py."""
        try:
            with _config_code_counts(self.code):
                return self.checkpoint(trust, **kwargs)
        finally:
            for item in self.keep_open:  # not handed to a row source: nothing reads through h5py later
                item.close()

    def checkpoint(self, trust: bool, *, config: Any, metadata_json: Any, format: str) -> Checkpoint:
        self.refuse_external_links()
        self.check_text()
        h5 = self.h5
        attrs = self.attrs(h5)
        model_config = config if config is not None else _json_attr(self.path, attrs, "model_config")
        self.code.extend(code_in_config(model_config))
        training_config = _json_attr(self.path, attrs, "training_config")
        if training_config is None and isinstance(config, dict):  # a .keras archive keeps it in its config
            training_config = config.get("compile_config")
        classes = _layer_classes(model_config)
        details: dict[str, Any] = {}
        optimizer: dict[str, Any] | None = None
        if "model_weights" in h5 and _layer_names(self.attrs(h5["model_weights"])) is not None:
            details["layout"] = "legacy full model (model.save to .h5)"
            weights = self.legacy_weights(h5["model_weights"], classes, prefix="model_weights.")
            if "optimizer_weights" in h5:
                optimizer = self.legacy_optimizer(h5["optimizer_weights"], weights, training_config)
            full = True
        elif _layer_names(attrs) is not None:
            details["layout"] = "legacy weights only (save_weights to .h5)"
            weights = self.legacy_weights(h5, classes, prefix="")
            full = False
        elif "layers" in h5 or "vars" in h5:
            details["layout"] = ("Keras 3 .keras archive" if config is not None
                                 else "Keras 3 weights (save_weights to .weights.h5)")
            has_optimizer = "optimizer" in h5 and "vars" in h5["optimizer"]
            full = config is not None or has_optimizer
            weights = self.keras3_weights(h5, model_config, prefix="model_weights." if full else "")
            if has_optimizer:
                optimizer = self.keras3_optimizer(h5["optimizer"]["vars"], weights, model_config, training_config)
        else:
            raise UnsupportedFormatError(self.path, "an HDF5 file without Keras weights (no model_weights, layer_names "
                                                    "or layers/ group): ckptview reads the HDF5 files Keras writes. "
                                                    "Open it with h5py to see what it holds.")
        self.name_layers(weights)
        if full:
            root: dict[str, Any] = {"model_weights": weights}
            if optimizer is not None:
                root["optimizer_weights"] = optimizer
            if model_config is not None:
                root["model_config"] = model_config
            if training_config is not None:
                root["training_config"] = training_config
        else:
            root = weights  # type: ignore[assignment]
        details.update(_describe(attrs, model_config, training_config, metadata_json, classes))
        if optimizer is not None and "optimizer" not in details and self.optimizer_name:
            details["optimizer"] = self.optimizer_name
        metadata = {key: str(value) for key, value in details.items()
                    if key in ("layout", "keras_version", "backend", "model", "loss", "optimizer", "metrics")}
        if details.get("layers"):  # the Overview shows metadata: the architecture in one line
            shown = [f"{layer['name']} ({layer['class']})" for layer in details["layers"][:_OVERVIEW_LAYERS]]
            more = len(details["layers"]) - len(shown)
            metadata["layers"] = ", ".join(shown) + (f", … {more} more" if more > 0 else "")
        return Checkpoint(self.path, format, root, file_size=self.size, sources=self.sources, trust=trust,
                          details=details, metadata=metadata, layers=self.layers,
                          pickle_imports=self.code)

    def legacy_weights(self, group: Any, classes: Mapping[str, str], *, prefix: str) -> dict[str, TensorInfo]:
        weights: dict[str, TensorInfo] = {}
        self.prefix = prefix
        self.kinds: dict[str, tuple[str, str, str]] = {}  # weight name -> (layer, class, keras leaf)
        for layer in _layer_names(self.attrs(group)) or []:
            layer_group = self.child(group, layer)
            if layer_group is None or not isinstance(layer_group, self.h5py.Group):
                raise CorruptCheckpointError(self.path, f"layer_names lists {printable(layer)!r} but the file has no "
                                                        "such group: the file is damaged. Save the weights again.")
            for weight_name in _strings(self.attrs(layer_group).get("weight_names", ())):
                dataset = self.dataset(layer_group, weight_name)
                if dataset is None:
                    raise CorruptCheckpointError(self.path, f"layer {printable(layer)!r} lists weight "
                                                            f"{printable(weight_name)!r}, which the file does not hold: "
                                                            "it is damaged. Save the weights again.")
                name = _readable(weight_name)
                if name in weights:  # a nested model's weights may repeat a name under two layers
                    name = f"{layer}.{name}"
                weights[name] = self.tensor(dataset, prefix + name)
                self.kinds[name] = (name.rpartition(".")[0] or layer, classes.get(layer, ""), name.rpartition(".")[2])
        return weights

    def keras3_weights(self, h5: Any, model_config: Any, *, prefix: str) -> dict[str, TensorInfo]:
        weights: dict[str, TensorInfo] = {}
        self.prefix = prefix
        self.kinds = {}
        configs = {str(layer.get("name") or (layer.get("config") or {}).get("name")): layer
                   for layer in _layer_configs(model_config)}
        groups = [(self._module_name(h5, path), path, group) for path, group in self._vars_groups(h5)
                  if path.split("/")[0] != "optimizer"]
        # HDF5 lists a group's members by name; the config has the model's own layer order, and a layer
        # class its nested layers' (the order of the optimizer's variables, which have no names)
        order = {name: index for index, name in enumerate(configs)}

        def nested_order(top: str) -> tuple[str, ...]:
            return _NESTED_ORDER.get(str((configs.get(top) or {}).get("class_name")), ())

        def made_before(item: tuple[str, str, Any]) -> tuple[int, int]:
            top = item[0].split(".")[0]
            nested, key = nested_order(top), item[1].split("/")[-1]
            return order.get(top, len(order)), nested.index(key) if key in nested else len(nested)

        groups.sort(key=made_before)
        # layers whose nested layers' order is not known: the optimizer's variables cannot be matched to them
        nested: dict[str, set[str]] = {}
        for module, path, _ in groups:
            if "." in module:
                nested.setdefault(module.split(".")[0], set()).add(path.split("/")[-1])
        self.nested_order_unknown = sorted(top for top, keys in nested.items()
                                           if len(keys) > 1 and not keys <= set(nested_order(top)))
        for module, path, group in groups:
            key = path.rpartition("/")[2]
            layer_config = configs.get(module) if "." not in module else None
            keras_class = (layer_config or {}).get("class_name") or _class_from_key(key)
            count = sum(1 for name in group if name.isdigit())
            for index, leaf in enumerate(_var_names(keras_class, count, (layer_config or {}).get("config"))):
                name = f"{module}.{leaf}" if module else leaf
                weights[name] = self.tensor(self.dataset(group, str(index)), prefix + name)
                self.kinds[name] = (module, keras_class, leaf)
        return weights

    def _module_name(self, h5: Any, path: str) -> str:
        """`layers/dense/vars` -> the layer's own name (the `vars` group's `name` attribute: Keras 3
        names the group after the class); nested parts (`layers/lstm/cell`) joined with dots."""
        parts = path.split("/") if path else []
        names: list[str] = []
        index = 0
        while index < len(parts):
            if parts[index] == "layers" and index + 1 < len(parts):
                key = "/".join(parts[:index + 2])
                vars_group = self.child(h5, key + "/vars")
                names.append(str(self.attrs(vars_group).get("name", parts[index + 1])) if vars_group is not None
                             else parts[index + 1])
                index += 2
            else:
                # a nested layer (`multi_head_attention/query_dense`): its own name too (`query`), as Keras's paths
                vars_group = self.child(h5, "/".join(parts[:index + 1]) + "/vars")
                names.append(str(self.attrs(vars_group).get("name", parts[index])) if vars_group is not None
                             else parts[index])
                index += 1
        return ".".join(names)

    def _vars_groups(self, h5: Any) -> list[tuple[str, Any]]:
        """Every `.../vars` group holding datasets, as (path of its owner, group), in the order Keras
        wrote the layers (the config's order when there is one; HDF5 lists names sorted)."""
        found: list[tuple[str, Any]] = []

        def visit(name: str, obj: Any) -> None:
            if name.rpartition("/")[2] == "vars" and isinstance(obj, self.h5py.Group) and len(obj):
                found.append((name.rpartition("/")[0], obj))

        h5.visititems(visit)
        return found

    def legacy_optimizer(self, group: Any, weights: Mapping[str, TensorInfo], training_config: Any) -> dict[str, Any]:
        names = _strings(self.attrs(group).get("weight_names", ()))
        slots: list[tuple[str, TensorInfo]] = []
        for weight_name in names:
            dataset = self.dataset(group, weight_name)
            if dataset is None:
                raise CorruptCheckpointError(self.path, f"optimizer_weights lists {printable(weight_name)!r}, which the "
                                                        "file does not hold: it is damaged. Save the model again.")
            slots.append((weight_name, self.tensor(dataset, "optimizer_weights." + _readable(weight_name))))
        return optimizer_state(slots, list(weights), training_config)

    def keras3_optimizer(self, group: Any, weights: Mapping[str, TensorInfo], model_config: Any,
                         training_config: Any) -> dict[str, Any]:
        count = sum(1 for name in group if name.isdigit())
        tensors = [self.tensor(self.dataset(group, str(index)), f"optimizer_weights.vars.{index}")
                   for index in range(count)]
        # Keras 3.15 names AdamW's group "adam_w" (the class name in snake case), older ones "adamw"
        kind = re.sub(r"_\d+$", "", str(self.attrs(group).get("name", ""))).lower().replace("_", "")
        self.optimizer_name = _OPTIMIZER_CLASSES.get(kind, kind)
        trainable = [name for name in weights if self.kinds.get(name, ("", "", ""))[2] not in
                     ("moving_mean", "moving_variance")]
        slot_names = _SLOTS.get(kind)
        named: list[tuple[str, TensorInfo]] = []
        rest = tensors[2:]
        # Keras 3 writes the iteration count and learning rate first, then each optimizer's slots
        # variable by variable, in the order of the model's trainable variables
        if (slot_names and len(tensors) >= 2 and len(rest) == len(slot_names) * len(trainable)
                and not self.nested_order_unknown
                and all(rest[i * len(slot_names) + j].shape == weights[param].shape
                        for i, param in enumerate(trainable) for j in range(len(slot_names)))):
            named = [("iteration", tensors[0]), ("learning_rate", tensors[1])]
            named += [(f"{param.replace('.', '_')}_{slot}", rest[i * len(slot_names) + j])
                      for i, param in enumerate(trainable) for j, slot in enumerate(slot_names)]
        else:
            named = [(f"vars/{index}", tensor) for index, tensor in enumerate(tensors)]
        return optimizer_state(named, list(weights), training_config)

    def name_layers(self, weights: Mapping[str, TensorInfo]) -> None:
        kinds = {name: self.kinds.get(name, (name.rpartition(".")[0], "", name.rpartition(".")[2])) for name in weights}
        for name, role in layer_roles({name: info.shape for name, info in weights.items()}, kinds).items():
            # the tensor table looks roles up by full name, the BatchNorm checks by the name relative
            # to the model section (`model_state_dict`): both are given
            self.layers[self.prefix + name] = role
            self.layers[name] = role


def layer_roles(shapes: Mapping[str, tuple[int, ...]],
                kinds: Mapping[str, tuple[str, str, str]]) -> dict[str, LayerRole]:
    """
    The `LayerRole` of each Keras variable: `shapes` by name, `kinds` name -> (layer, Keras class or
    "", Keras variable name). Also used for TensorFlow checkpoints of Keras models.
    """
    modules: dict[str, dict[str, tuple[str, tuple[int, ...], str]]] = {}
    for name, shape in shapes.items():
        module, keras_class, leaf = kinds[name]
        modules.setdefault(module, {})[leaf] = (name, shape, keras_class)
    roles_by_name: dict[str, LayerRole] = {}
    for module, leaves in modules.items():
        roles = {leaf: _role(module, keras_class, leaf, shape, set(leaves))
                 for leaf, (_, shape, keras_class) in leaves.items()}
        kernel = roles.get("kernel") or roles.get("depthwise_kernel")
        if "bias" in leaves and roles.get("bias") is None and kernel is not None:
            roles["bias"] = LayerRole(module, "bias", kernel.kind, kernel.detail)
        for leaf, role in roles.items():
            if role is not None:
                roles_by_name[leaves[leaf][0]] = role
    return roles_by_name


def _dataset_name(dataset_id: Any) -> str:
    import h5py

    return printable((h5py.h5i.get_name(dataset_id) or b"?").decode("utf-8", "replace"))


def _var_names(keras_class: str, count: int, config: Any) -> list[str]:
    """The names of a Keras 3 layer's `vars/<i>`, from the order its class creates them; layers built
    without some (Dense(use_bias=False), BatchNormalization(center=False)) have fewer."""
    known = _KERAS3_VARS.get(keras_class)
    if known is not None and count == len(known):
        return list(known)
    if known is not None and keras_class == "BatchNormalization":
        config = config if isinstance(config, dict) else {}
        present = [leaf for leaf, flag in (("gamma", config.get("scale", count != 3)), ("beta", config.get("center", True)),
                                           ("moving_mean", True), ("moving_variance", True)) if flag]
        if len(present) == count:
            return present
    if known is not None and count == 1 and known[0] in ("kernel", "embeddings", "gamma"):
        return [known[0]]
    return [f"vars_{index}" for index in range(count)]


def _class_from_key(key: str) -> str:
    """`batch_normalization_3` -> "BatchNormalization": Keras 3 names a layer's group after its class."""
    base = re.sub(r"_\d+$", "", key)
    special = {"conv1d": "Conv1D", "conv2d": "Conv2D", "conv3d": "Conv3D", "depthwise_conv2d": "DepthwiseConv2D",
               "separable_conv2d": "SeparableConv2D", "conv2d_transpose": "Conv2DTranspose", "re_lu": "ReLU",
               "p_re_lu": "PReLU", "lstm_cell": "LSTMCell", "gru_cell": "GRUCell", "simple_rnn_cell": "SimpleRNNCell",
               "cell": "LSTMCell", "query_dense": "EinsumDense", "key_dense": "EinsumDense",
               "value_dense": "EinsumDense", "output_dense": "EinsumDense"}
    return special.get(base, "".join(part.capitalize() for part in base.split("_")))


def _role(module: str, keras_class: str, leaf: str, shape: tuple[int, ...], leaves: set[str]) -> LayerRole | None:
    is_batchnorm = keras_class == "BatchNormalization" or (not keras_class and {"moving_mean", "moving_variance"} <= leaves)
    if is_batchnorm and leaf in _BATCHNORM:
        return LayerRole(module, _BATCHNORM[leaf], "BatchNorm", f"{shape[0] if shape else 1} channels")
    if keras_class in ("LayerNormalization", "GroupNormalization") and leaf in ("gamma", "beta"):
        kind = "LayerNorm" if keras_class == "LayerNormalization" else "GroupNorm"
        return LayerRole(module, "weight" if leaf == "gamma" else "bias", kind, f"{shape[0] if shape else 1} channels")
    if leaf == "embeddings" and len(shape) == 2:
        return LayerRole(module, "weight", "Embedding", f"{shape[0]}×{shape[1]} (vocabulary×dim)")
    if "recurrent_kernel" in leaves or keras_class in ("LSTMCell", "GRUCell", "SimpleRNNCell"):
        kind = {"LSTMCell": "LSTM", "GRUCell": "GRU"}.get(keras_class, "RNN")
        return LayerRole(module, leaf, kind, "×".join(map(str, shape)) + " (Keras: [in, gates×units])")
    if leaf == "kernel" and len(shape) == 2:
        return LayerRole(module, "weight", "Linear", f"{shape[0]}×{shape[1]} (in×out: Keras stores the kernel "
                                                     "transposed from torch's Linear)")
    if leaf in ("kernel", "depthwise_kernel") and len(shape) in (3, 4, 5):
        spatial = "×".join(map(str, shape[:-2]))
        return LayerRole(module, "weight", f"Conv{len(shape) - 2}d",
                         f"{spatial}, {shape[-2]}, {shape[-1]} (kernel, in, out: Keras order)")
    return None


def _readable(weight_name: str) -> str:
    """`dense_1/kernel:0` -> `dense_1.kernel`, as people name Keras weights."""
    return re.sub(r":\d+$", "", weight_name).replace("/", ".")


def _strings(value: Any) -> list[str]:
    if isinstance(value, (bytes, str)):
        value = [value]
    try:
        items = list(value)
    except TypeError:
        return []
    return [item.decode("utf-8", "replace") if isinstance(item, bytes) else str(item) for item in items]


def _layer_names(attrs: Any) -> list[str] | None:
    """`layer_names`, or the pieces `layer_names0`, `layer_names1`, ... Keras splits a long list into
    (an HDF5 attribute header holds at most 64 KiB)."""
    if "layer_names" in attrs:
        return _strings(attrs["layer_names"])
    if "layer_names0" not in attrs:
        return None
    names: list[str] = []
    index = 0
    while f"layer_names{index}" in attrs:
        names.extend(_strings(attrs[f"layer_names{index}"]))
        index += 1
    return names


def _json_attr(path: str, attrs: Any, key: str) -> Any:
    if key not in attrs:
        return None
    raw = attrs[key]
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    try:
        return json.loads(str(raw))
    except json.JSONDecodeError as exc:
        raise CorruptCheckpointError(path, f"the {key} attribute is not valid JSON: the file is damaged. Save the "
                                           "model again.") from exc


def _layer_configs(model_config: Any) -> list[dict[str, Any]]:
    if not isinstance(model_config, dict):
        return []
    config = model_config.get("config")
    layers = config.get("layers") if isinstance(config, dict) else None
    return [layer for layer in layers if isinstance(layer, dict)] if isinstance(layers, list) else []


def _layer_classes(model_config: Any) -> dict[str, str]:
    classes = {}
    for layer in _layer_configs(model_config):
        name = layer.get("name") or (layer.get("config") or {}).get("name")
        if isinstance(name, str) and isinstance(layer.get("class_name"), str):
            classes[name] = layer["class_name"]
    return classes


def _walk_dicts(node: Any) -> Iterator[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """Every dict in a JSON document with the dicts above it, without recursion."""
    stack: list[tuple[Any, list[dict[str, Any]]]] = [(node, [])]
    while stack:
        item, parents = stack.pop()
        if isinstance(item, dict):
            yield item, parents
            stack.extend((value, parents + [item]) for value in item.values())
        elif isinstance(item, list):
            stack.extend((value, parents) for value in item)


# the packages a config names as Keras's own (the top of its `module`; "kerasfoo" is not one of them)
_KERAS_PACKAGES = frozenset({"keras", "tf_keras", "tensorflow", "keras_hub", "keras_nlp", "keras_cv"})
# parts of Keras that act on the machine, not on tensors: a config naming a function or class from them
# has load_model call it, and Keras versions before 3.11 did so in safe mode too (keras.utils.get_file
# downloads a file where its arguments say; keras.config.enable_unsafe_deserialization turns safe mode
# off for the Lambda layers read after it)
_KERAS_UTILITY_PARTS = frozenset({"utils", "config", "saving"})


# TensorFlow functions a Keras 2 TFOpLambda layer may name (its `function`, a TF API name) that act on the
# machine when the model is built or run, not on tensors: files (tf.io.write_file, tf.io.gfile.rmtree,
# tf.print's output_stream "file://..."), Python (tf.py_function), op libraries, summaries, checkpoints
_MACHINE_TF_FUNCTIONS = ("io.write_file", "io.read_file", "io.gfile", "io.matching_files", "write_file", "read_file",
                         "matching_files", "gfile", "saved_model", "summary", "train", "data", "keras", "print", "Print",
                         "py_function", "numpy_function", "py_func", "debugging.experimental", "config",
                         "load_op_library", "load_library", "sysconfig", "lite", "distribute", "tpu", "autograph",
                         "function")


def _machine_tf_function(name: str) -> bool:
    for version in ("compat.v1.", "compat.v2."):
        name = name.removeprefix(version)
    if name.startswith("raw_ops."):
        return name.removeprefix("raw_ops.") in CODE_OPS.keys() | CHECKPOINT_OPS.keys()
    return any(name == prefix or name.startswith(prefix + ".") for prefix in _MACHINE_TF_FUNCTIONS)


def code_in_config(model_config: Any) -> list[PickleImport]:
    """
    What loading the model would run: a `Lambda` layer holds marshalled Python bytecode that
    `load_model` executes (Keras 3 refuses it only in safe mode), a class from outside Keras
    (Keras 3 configs name its module; `registered_name` "package>Class") is imported and called,
    and so is a Keras utility (`_KERAS_UTILITY_PARTS`) a config names where a layer, initializer or
    activation belongs, and a Keras 2 `TFOpLambda` layer calling a TensorFlow function that acts
    on the machine (`_MACHINE_TF_FUNCTIONS`).
    """
    found: dict[str, int] = {}
    for item, parents in _walk_dicts(model_config):
        class_name = item.get("class_name")
        if not isinstance(class_name, str):
            continue
        config = item.get("config") if isinstance(item.get("config"), dict) else {}
        if class_name == "Lambda":
            layer = config.get("name", "?")
            found[f"keras.layers.Lambda {printable(layer)!r}: a Python function stored as marshalled bytecode"] = 1
        elif class_name == "TFOpLambda" and isinstance(config.get("function"), str) and _machine_tf_function(
                config["function"]):
            label = f"tf.{printable(config['function'])} (a TFOpLambda layer: the model calls it, and it acts on the machine)"
            found[label] = found.get(label, 0) + 1
        elif class_name == "__lambda__" and not any(parent.get("class_name") == "Lambda" for parent in parents):
            found["a Python lambda stored as marshalled bytecode (__lambda__)"] = found.get(
                "a Python lambda stored as marshalled bytecode (__lambda__)", 0) + 1
        module = item.get("module")
        registered = item.get("registered_name")
        parts = module.split(".") if isinstance(module, str) and module else []
        if parts and parts[0] in _KERAS_PACKAGES and _KERAS_UTILITY_PARTS.intersection(parts[1:]):
            called = item["config"] if class_name == "function" and isinstance(item.get("config"), str) else class_name
            label = f"{printable(module)}.{printable(called)} (a Keras utility, not a layer: load_model calls it)"
            found[label] = found.get(label, 0) + 1
            continue
        custom = (parts and parts[0] not in _KERAS_PACKAGES or isinstance(registered, str) and ">" in registered)
        if custom and class_name not in ("Lambda", "__lambda__", "__keras_tensor__", "__tensor__"):
            label = f"{module}.{class_name}" if isinstance(module, str) and module else str(registered)
            found[f"{printable(label)} (a custom Keras object: load_model imports and calls it)"] = found.get(
                f"{printable(label)} (a custom Keras object: load_model imports and calls it)", 0) + 1
    return [PickleImport(name, count) for name, count in found.items()]


def optimizer_state(slots: list[tuple[str, TensorInfo]], parameters: list[str],
                     training_config: Any) -> dict[str, Any]:
    """Optimizer variables shaped as torch's `optimizer.state_dict()`: per-parameter slots under the
    parameter's name (exact, from the variable names), the rest (iteration count, learning rate) in
    the one param group, with the optimizer config's options."""
    by_flat = {name.replace(".", "_"): name for name in parameters}
    by_path = {name.replace(".", "/"): name for name in parameters}
    state: dict[str, dict[str, TensorInfo]] = {}
    group: dict[str, Any] = {}
    for raw, info in slots:
        name = re.sub(r":\d+$", "", raw)
        parts = name.split("/")
        match = None
        # Keras 2 (new optimizers): Adam/m/dense/kernel; Keras 2 legacy: Adam/dense/kernel/m;
        # Keras 3: adam/dense_kernel_momentum
        if len(parts) >= 3 and "/".join(parts[2:]) in by_path:
            match = (by_path["/".join(parts[2:])], parts[1])
        elif len(parts) >= 3 and "/".join(parts[1:-1]) in by_path:
            match = (by_path["/".join(parts[1:-1])], parts[-1])
        else:
            last = parts[-1]
            for flat, param in by_flat.items():
                longest = match is None or len(flat) > len(match[0].replace(".", "_"))
                if last.startswith(flat + "_") and last[len(flat) + 1:] and longest:
                    match = (param, last[len(flat) + 1:])
        if match is not None:
            state.setdefault(match[0], {})[match[1]] = info
        else:
            # unnamed (`vars/7` of a .weights.h5 whose model config is not at hand): kept by position
            group[f"var_{parts[-1]}" if parts[-1].isdigit() else parts[-1]] = info
    optimizer_config = (training_config or {}).get("optimizer_config") if isinstance(training_config, dict) else None
    options = optimizer_config.get("config", {}) if isinstance(optimizer_config, dict) else {}
    if isinstance(options, dict):
        group.update({key: value for key, value in options.items()
                      if isinstance(value, (int, float, str, bool)) and key not in group})
    if isinstance(options, dict) and isinstance(options.get("learning_rate"), (int, float)):
        group["lr"] = options["learning_rate"]
    params = [name for name in parameters if name in state]
    group["params"] = params
    group["param_names"] = params
    return {"state": state, "param_groups": [group]}


def _describe(attrs: Any, model_config: Any, training_config: Any, metadata_json: Any,
              classes: Mapping[str, str]) -> dict[str, Any]:
    details: dict[str, Any] = {}
    for key in ("keras_version", "backend"):
        if key in attrs:
            details[key] = _strings(attrs[key])[0] if _strings(attrs[key]) else None
    if isinstance(metadata_json, dict):
        details.update({key: value for key, value in metadata_json.items() if isinstance(value, (str, int, float))})
    if isinstance(model_config, dict):
        config = model_config.get("config") if isinstance(model_config.get("config"), dict) else {}
        layers = _layer_configs(model_config)
        details["model"] = f"{model_config.get('class_name', '?')} {config.get('name', '')!r} ({len(layers)} layers)"
        details["layers"] = [{"name": layer.get("name") or (layer.get("config") or {}).get("name"),
                              "class": layer.get("class_name"),
                              "shape": (layer.get("build_config") or {}).get("input_shape")
                              or (layer.get("config") or {}).get("batch_shape")
                              or (layer.get("config") or {}).get("batch_input_shape")}
                             for layer in layers]
    if isinstance(training_config, dict):
        loss = training_config.get("loss")
        details["loss"] = loss.get("class_name") if isinstance(loss, dict) else loss
        optimizer = training_config.get("optimizer_config")
        if isinstance(optimizer, dict):
            options = optimizer.get("config") if isinstance(optimizer.get("config"), dict) else {}
            rate = options.get("learning_rate")
            details["optimizer"] = (str(optimizer.get("class_name", "?")).removeprefix("Custom>")
                                    + (f" (learning_rate {rate:.6g})" if isinstance(rate, (int, float)) else ""))
        metrics = training_config.get("metrics")
        if metrics is not None:
            details["metrics"] = json.dumps(metrics)[:200]
    return details
