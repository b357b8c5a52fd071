"""
GGUF files (llama.cpp / ggml): metadata key-value pairs, then a table of tensors, then their data.

By URL (`https://…/model.gguf`, any fsspec URL) the header and tensor table are read as a growing
prefix of the file (64 KiB, doubled while the walk needs more), so a listing moves about the
header's size, and each tensor's bytes are one exact range.

The header is walked by hand rather than with `gguf.GGUFReader`, which builds a numpy view per
array element: a 150,000-token vocabulary costs it a second or more. Here an array's body is
skipped by size (strings by their length prefixes) and only its first items are decoded; the
byte range is recorded so `metadata_value` decodes the whole array when asked. The type tables
and the dequantization of block quants (Q4_0, Q4_K, ...) are the `gguf` package's own.

Dimensions: GGUF lists them innermost first; `TensorInfo.shape` is in numpy/torch order, as
`gguf.GGUFReader` tensors' `data` arrays have them.
"""

from __future__ import annotations

import functools
import importlib.metadata
import mmap
import os
import struct
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from ckptview.errors import CorruptCheckpointError, TensorDataError, TruncatedCheckpointError
from ckptview.readers.model import Checkpoint, FileSource, Storage, TensorInfo, contiguous_stride
from ckptview.readers.remote import is_url, source_for

if TYPE_CHECKING:
    import gguf
    import torch

SUPPORTED_VERSIONS = (2, 3)  # version 1 had 32-bit counts; llama.cpp dropped it too
GGML_MAX_DIMS = 4  # llama.cpp refuses tensors with more
DEFAULT_ALIGNMENT = 32
FIRST_ITEMS = 5  # items of an array decoded at open, for the metadata table
# Smallest encodings of a key-value pair and a tensor-table entry: a count claiming more than the
# rest of the file could hold is refused before any loop over it.
_MIN_KV_BYTES = 8 + 4 + 1
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8
_MAX_KEY_BYTES = 1 << 16  # keys and tensor names are short identifiers; llama.cpp caps names at 64 bytes
_FIRST_PREFIX = 64 * 1024  # a remote header's first request; most GGUF headers without a vocabulary fit

# torch dtypes of the GGML types stored as plain arrays, read in place like any dense tensor
_PLAIN = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64",
          "I8": "int8", "I16": "int16", "I32": "int32", "I64": "int64"}


class _Header:
    """
    A cursor over the file's header that turns every read past its end into one clear error. `data`
    is the mapped file, or for a URL the prefix read so far, which `fetch(offset, size)` extends.
    """

    def __init__(self, path: str, data: Any, size: int, order: str, fetch: Any = None) -> None:
        self.path = path
        self.data = data
        self.size = size
        self.pos = 0
        self.u32 = struct.Struct(order + "I")
        self.u64 = struct.Struct(order + "Q")
        self.order = order
        self._fetch = fetch

    def grow(self, end: int) -> bool:
        """Extend a remote prefix to hold byte `end - 1` (at least doubling it, so the requests stay
        few and the bytes moved at most twice the header); False when there is nothing more to read."""
        have = len(self.data)
        if self._fetch is None or end <= have or have >= self.size:
            return False
        want = min(self.size, max(end, 2 * have))
        self.data += self._fetch(have, want - have)
        return True

    def truncated(self, what: str) -> TruncatedCheckpointError:
        return TruncatedCheckpointError(self.path, f"the GGUF header ends inside {what} (at byte {self.pos:,} of "
                                                   f"{self.size:,}): the file was cut off while downloading or "
                                                   "copying. Download or copy it again.")

    def unpack(self, fmt: struct.Struct, what: str) -> int:
        if self.pos + fmt.size > self.size:
            raise self.truncated(what)
        if self.pos + fmt.size > len(self.data):
            self.grow(self.pos + fmt.size)
        (value,) = fmt.unpack_from(self.data, self.pos)
        self.pos += fmt.size
        return value

    def string(self, what: str, limit: int | None = None) -> str:
        length = self.unpack(self.u64, what)
        if limit is not None and length > limit:
            raise CorruptCheckpointError(self.path, f"{what} claims {length:,} bytes (at most {limit:,} expected): "
                                                    "the GGUF header is damaged. Download the file again.")
        if self.pos + length > self.size:
            raise self.truncated(what)
        if self.pos + length > len(self.data):
            self.grow(self.pos + length)
        raw = self.data[self.pos:self.pos + length]
        self.pos += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CorruptCheckpointError(self.path, f"{what} is not valid UTF-8: the GGUF header is damaged. "
                                                    "Download the file again.") from exc


def _gguf() -> Any:
    # Imported with the first GGUF file, not with ckptview: the package and its tables cost ~0.1 s.
    import gguf

    return gguf


# struct codes of gguf's fixed-size value types (`gguf.GGUFValueType` names them)
_SCALAR_CODES = {"UINT8": "B", "INT8": "b", "UINT16": "H", "INT16": "h", "UINT32": "I", "INT32": "i",
                 "FLOAT32": "f", "BOOL": "?", "UINT64": "Q", "INT64": "q", "FLOAT64": "d"}


class _Walker:
    """Walks the key-value section: scalars decoded, arrays skipped with their first items kept."""

    def __init__(self, header: _Header, gguf: Any) -> None:
        self.h = header
        self.types = gguf.GGUFValueType
        self.formats = {vtype: struct.Struct(header.order + _SCALAR_CODES[vtype.name])
                        for vtype in gguf.GGUFValueType if vtype.name in _SCALAR_CODES}
        self.string_type = gguf.GGUFValueType.STRING
        self.array_type = gguf.GGUFValueType.ARRAY

    def value_type(self, raw: int, key: str) -> Any:
        try:
            return self.types(raw)
        except ValueError:
            raise CorruptCheckpointError(self.h.path, f"GGUF metadata key {key!r} has value type {raw}, which is "
                                                      "not a GGUF type: the header is damaged, or the file is newer "
                                                      "than the installed gguf package (pip install -U gguf).") from None

    def value(self, vtype: Any, key: str) -> Any:
        if vtype == self.string_type:
            return self.h.string(f"the value of {key!r}")
        fmt = self.formats.get(vtype)
        if fmt is not None:
            return self.h.unpack(fmt, f"the value of {key!r}")
        return self.array(key)

    def array(self, key: str) -> dict[str, Any]:
        h = self.h
        element = self.value_type(h.unpack(h.u32, f"the element type of {key!r}"), key)
        length = h.unpack(h.u64, f"the length of {key!r}")
        start = h.pos
        fmt = self.formats.get(element)
        smallest = fmt.size if fmt is not None else (8 if element == self.string_type else 12)
        if length * smallest > h.size - start:
            raise CorruptCheckpointError(h.path, f"GGUF metadata array {key!r} claims {length:,} elements, more "
                                                 f"than the {h.size - start:,} bytes left in the file can hold: the "
                                                 "header is damaged. Download the file again.")
        first: list[Any] = []
        if fmt is not None:
            count = min(length, FIRST_ITEMS)
            first = [self.value(element, key) for _ in range(count)]
            h.pos = start + length * fmt.size
        elif element == self.string_type:
            count = min(length, FIRST_ITEMS)
            first = [h.string(f"an element of {key!r}") for _ in range(count)]
            h.pos = _skip_strings(h, length - count, key)
        else:  # arrays of arrays: rare (no llama.cpp key uses them); walked one by one
            for index in range(length):
                item = self.array(key)
                if index < FIRST_ITEMS:
                    first.append(f"[{item['length']:,} × {item['element_type']}]")
        return {"element_type": element.name.lower(), "length": length, "first": first, "offset": start,
                "nbytes": h.pos - start}


def _skip_strings(h: _Header, count: int, key: str) -> int:
    """Step over `count` length-prefixed strings without decoding them; the position after them."""
    unpack = h.u64.unpack_from
    pos, left = h.pos, count
    while left:
        data = h.data
        try:
            while left:
                pos += 8 + unpack(data, pos)[0]
                left -= 1
        except struct.error:
            if not h.grow(pos + 8):  # the end of a remote prefix: read on; else the file's end
                h.pos = min(pos, h.size)
                raise h.truncated(f"the array {key!r}") from None
    if pos > h.size:
        h.pos = h.size
        raise h.truncated(f"the array {key!r}")
    return pos


def read_gguf(path: str, size: int, *, trust: bool) -> Checkpoint:
    gguf = _gguf()
    if is_url(path):
        source = source_for(path)
        prefix = bytearray(source.read(0, min(size, _FIRST_PREFIX)))
        return _read(path, size, prefix, gguf, trust, source, fetch=source.read)
    with open(path, "rb") as stream, mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return _read(path, size, data, gguf, trust, FileSource(path))


def _read(path: str, size: int, data: Any, gguf: Any, trust: bool, source: Any, fetch: Any = None) -> Checkpoint:
    if size < 4 + 4 + 8 + 8:
        raise TruncatedCheckpointError(path, f"the file is {size} bytes, too short for a GGUF header: it was cut "
                                             "off. Download or copy it again.")
    # Big-endian files (s390x builds) store every number byte-swapped; the version tells which.
    order = "<" if struct.unpack_from("<I", data, 4)[0] & 0xFFFF else ">"
    h = _Header(path, data, size, order, fetch)
    h.pos = 4
    version = h.unpack(h.u32, "the version")
    if version not in SUPPORTED_VERSIONS:
        raise CorruptCheckpointError(path, f"GGUF version {version} is not one ckptview reads (versions "
                                           f"{', '.join(map(str, SUPPORTED_VERSIONS))}): re-convert the model with a "
                                           "current llama.cpp, or the header is damaged.")
    tensor_count = h.unpack(h.u64, "the tensor count")
    kv_count = h.unpack(h.u64, "the metadata count")
    for count, what, smallest in ((kv_count, "metadata entries", _MIN_KV_BYTES),
                                  (tensor_count, "tensors", _MIN_TENSOR_INFO_BYTES)):
        if count * smallest > size - h.pos:
            raise CorruptCheckpointError(path, f"the GGUF header claims {count:,} {what}, more than the "
                                               f"{size:,}-byte file can hold: the header is damaged. Download the "
                                               "file again.")

    walker = _Walker(h, gguf)
    metadata: dict[str, Any] = {}
    types: dict[str, str] = {}
    for _ in range(kv_count):
        key = h.string("a metadata key", _MAX_KEY_BYTES)
        vtype = walker.value_type(h.unpack(h.u32, f"the type of {key!r}"), key)
        if key in metadata:
            raise CorruptCheckpointError(path, f"GGUF metadata key {key!r} appears twice: the header is damaged. "
                                               "Download the file again.")
        metadata[key] = walker.value(vtype, key)
        types[key] = vtype.name.lower()

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 or alignment & (alignment - 1):
        raise CorruptCheckpointError(path, f"general.alignment is {alignment!r}, not a power of two: the header is "
                                           "damaged. Download the file again.")

    infos = [_tensor_info(h, gguf) for _ in range(tensor_count)]
    data_start = -(-h.pos // alignment) * alignment
    root = _tensors(path, infos, data_start, size, alignment, source, order, gguf)

    details = {
        "gguf_version": version,
        "byteorder": "little" if order == "<" else "big",
        "alignment": alignment,
        "tensor_data_offset": data_start,
        "architecture": metadata.get("general.architecture"),
        "ggml_types": _type_counts(root),
        "metadata": [_row(key, types[key], value) for key, value in metadata.items()],
        "gguf_package": importlib.metadata.version("gguf"),
    }
    return Checkpoint(path, "gguf", root, file_size=size, sources=[source], trust=trust, details=details,
                      metadata={key: _short(value) for key, value in metadata.items()})


def _tensor_info(h: _Header, gguf: Any) -> tuple[str, tuple[int, ...], Any, int]:
    name = h.string("a tensor name", _MAX_KEY_BYTES)
    n_dims = h.unpack(h.u32, f"the dimension count of tensor {name!r}")
    if n_dims > GGML_MAX_DIMS:
        raise CorruptCheckpointError(h.path, f"tensor {name!r} claims {n_dims:,} dimensions (GGUF allows at most "
                                             f"{GGML_MAX_DIMS}): the tensor table is damaged. Download the file again.")
    dims = tuple(h.unpack(h.u64, f"the dimensions of tensor {name!r}") for _ in range(n_dims))
    raw_type = h.unpack(h.u32, f"the type of tensor {name!r}")
    offset = h.unpack(h.u64, f"the data offset of tensor {name!r}")
    try:
        ggml_type = gguf.GGMLQuantizationType(raw_type)
        gguf.GGML_QUANT_SIZES[ggml_type]
    except (ValueError, KeyError):
        raise CorruptCheckpointError(h.path, f"tensor {name!r} has GGML type {raw_type}, which gguf "
                                             f"{importlib.metadata.version('gguf')} does not know: upgrade it "
                                             "(pip install -U gguf), or the tensor table is damaged.") from None
    return name, dims, ggml_type, offset


def _tensors(path: str, infos: list[tuple[str, tuple[int, ...], Any, int]], data_start: int, size: int,
             alignment: int, source: Any, order: str, gguf: Any) -> dict[str, TensorInfo]:
    root: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    data_len = max(0, size - data_start)
    for name, dims, ggml_type, offset in infos:
        if name in root:
            raise CorruptCheckpointError(path, f"tensor {name!r} appears twice in the GGUF tensor table: the file is "
                                               "damaged. Download it again.")
        block_size, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
        shape = tuple(reversed(dims))
        numel = 1
        for dim in dims:
            numel *= dim
        if dims and dims[0] % block_size:
            raise CorruptCheckpointError(path, f"tensor {name!r} is {ggml_type.name} (blocks of {block_size}) but its "
                                               f"rows have {dims[0]:,} elements: the tensor table is damaged. "
                                               "Download the file again.")
        nbytes = numel // block_size * type_size
        if offset % alignment:
            raise CorruptCheckpointError(path, f"tensor {name!r} starts at data offset {offset:,}, not a multiple of "
                                               f"the file's alignment {alignment}: the tensor table is damaged. "
                                               "Download the file again.")
        if offset + nbytes > data_len:
            raise TruncatedCheckpointError(path, f"tensor {name!r} ({shape_name(shape)} {ggml_type.name}, "
                                                 f"{nbytes:,} bytes) would end at byte {data_start + offset + nbytes:,}"
                                                 f" but the file ends at byte {size:,}: the file was cut off, or its "
                                                 "tensor table is damaged. Download or copy it again.")
        if nbytes:
            spans.append((offset, offset + nbytes, name))
        storage = Storage(key=name, source=source, offset=data_start + offset, nbytes=nbytes, location="cpu",
                          byteorder="little" if order == "<" else "big")
        root[name] = _info(ggml_type, shape, storage, block_size, type_size, path, name)
    spans.sort()
    for (_, end1, name1), (begin2, _, name2) in zip(spans, spans[1:]):
        if begin2 < end1:
            raise CorruptCheckpointError(path, f"tensors {name1!r} and {name2!r} overlap in the data section: the "
                                               "tensor table lies about where data is. Download the file again.")
    return root


def shape_name(shape: tuple[int, ...]) -> str:
    return "×".join(map(str, shape)) or "scalar"


def _info(ggml_type: Any, shape: tuple[int, ...], storage: Storage, block_size: int, type_size: int, path: str,
          name: str) -> TensorInfo:
    plain = _PLAIN.get(ggml_type.name)
    if plain is not None:
        return TensorInfo(shape=shape, dtype=plain, storage=storage, stride=contiguous_stride(shape))
    quant = _Quantized(ggml_type, shape, storage, block_size, type_size, name)
    decodable = _dequantizes(ggml_type, type_size)
    return TensorInfo(
        shape=shape, dtype="float32", storage=storage, stride=contiguous_stride(shape), layout="encoded",
        encoding=ggml_type.name,
        encoding_params={"ggml_type": int(ggml_type), "block_size": block_size, "type_size": type_size},
        stored_nbytes=storage.nbytes, decode=quant.decode if decodable else None,
        decode_chunks=quant.chunks if decodable else None,
        note=None if decodable else (f"{ggml_type.name} blocks, which gguf {importlib.metadata.version('gguf')} "
                                     "cannot dequantize (listed, not decoded): upgrade gguf (pip install -U gguf)"),
    )


@functools.cache
def _dequantizes(ggml_type: Any, type_size: int) -> bool:
    """Whether the installed gguf dequantizes this block type (it lists types it has no decoder for, such as
    Q8_1, an intermediate of llama.cpp's matrix products): asked once per type with one zero block, so a
    file holding one such tensor still gets statistics and diffs of the others."""
    try:
        _gguf().quants.dequantize(np.zeros(type_size, dtype=np.uint8), ggml_type)
    except NotImplementedError:
        return False
    return True


class _Quantized:
    """One block-quantized tensor: its blocks read from the file and dequantized by `gguf.quants`."""

    def __init__(self, ggml_type: Any, shape: tuple[int, ...], storage: Storage, block_size: int, type_size: int,
                 name: str) -> None:
        self.ggml_type = ggml_type
        self.shape = shape
        self.storage = storage
        self.block_size = block_size
        self.type_size = type_size
        self.name = name

    def _dequantize(self, raw: np.ndarray) -> np.ndarray:
        if self.storage.byteorder != "little":
            raise TensorDataError(self.storage.source.path, f"tensor {self.name!r} is {self.ggml_type.name} in a "
                                                            "big-endian GGUF file, which gguf cannot dequantize: "
                                                            "convert the model for a little-endian machine.")
        try:
            return _gguf().quants.dequantize(raw, self.ggml_type)
        except NotImplementedError as exc:
            raise TensorDataError(self.storage.source.path, f"tensor {self.name!r} is {self.ggml_type.name}, which "
                                                            f"gguf {importlib.metadata.version('gguf')} cannot "
                                                            "dequantize: upgrade gguf (pip install -U gguf).") from exc

    def _blocks(self, first: int, count: int) -> np.ndarray:
        raw = np.empty(count * self.type_size, dtype=np.uint8)
        self.storage.source.read_into(memoryview(raw), self.storage.data_offset() + first * self.type_size)
        return raw

    def decode(self) -> torch.Tensor:
        """The whole tensor dequantized to float32, as `gguf.quants.dequantize` gives it."""
        raw = self._blocks(0, self.storage.nbytes // self.type_size)
        rows = raw.reshape(*self.shape[:-1], -1) if self.shape else raw
        import torch  # listing needs no torch (it takes a second to import); values do

        return torch.from_numpy(self._dequantize(rows).reshape(self.shape))

    def chunks(self, chunk_bytes: int) -> Iterator[torch.Tensor]:
        """The dequantized values in memory order, `chunk_bytes // 4` at a time, decoding only the blocks each
        chunk touches: memory stays bounded by a chunk, however large the tensor."""
        import torch

        numel = self.storage.nbytes // self.type_size * self.block_size
        step = max(1, chunk_bytes // 4)
        for start in range(0, numel, step):
            stop = min(numel, start + step)
            first_block, end_block = start // self.block_size, -(-stop // self.block_size)
            values = self._dequantize(self._blocks(first_block, end_block - first_block))
            offset = start - first_block * self.block_size
            yield torch.from_numpy(values.reshape(-1)[offset:offset + stop - start])


def _type_counts(root: dict[str, TensorInfo]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for info in root.values():
        kind = info.encoding or _dtype_ggml_name(info.dtype)
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def _dtype_ggml_name(dtype: str) -> str:
    return next(name for name, plain in _PLAIN.items() if plain == dtype)


def _row(key: str, value_type: str, value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return {"key": key, "type": f"array[{value['element_type']}]", "length": value["length"],
                "first": value["first"], "offset": value["offset"], "nbytes": value["nbytes"]}
    return {"key": key, "type": value_type, "value": value}


def _item(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    return f"{value:.6g}" if isinstance(value, float) else str(value)  # float32 values read as float64


def _short(value: Any) -> str:
    if isinstance(value, dict):
        first = ", ".join(_item(item) for item in value["first"])
        more = ", …" if value["length"] > len(value["first"]) else ""
        return f"[{value['length']:,} × {value['element_type']}: {first}{more}]"
    return _item(value) if isinstance(value, float) else str(value)


def metadata_value(checkpoint: Checkpoint, key: str) -> Any:
    """
    The full value of a GGUF metadata key; arrays (a tokenizer's vocabulary, its merges and scores)
    are decoded now, from the byte range the open recorded.

    Raises:
        KeyError: the file has no such key.
        CorruptCheckpointError: the array's bytes no longer decode (the file changed since it was opened).

    Example:
        >>> with ckptview.open("qwen2.gguf") as ckpt:
        ...     tokens = metadata_value(ckpt, "tokenizer.ggml.tokens")
    """
    rows = {row["key"]: row for row in checkpoint.details.get("metadata", ())}
    if key not in rows:
        raise KeyError(f"no GGUF metadata key {key!r} in {os.path.basename(checkpoint.path)}")
    row = rows[key]
    if "value" in row:
        return row["value"]
    gguf = _gguf()
    order = "<" if checkpoint.details["byteorder"] == "little" else ">"
    # the element type and length precede the body
    raw = source_for(checkpoint.path).read(row["offset"] - 12, row["nbytes"] + 12)
    h = _Header(checkpoint.path, raw, len(raw), order)  # type: ignore[arg-type]
    walker = _Walker(h, gguf)
    element = walker.value_type(h.unpack(h.u32, f"the element type of {key!r}"), key)
    length = h.unpack(h.u64, f"the length of {key!r}")
    return _decode_all(walker, element, length, key)


def _decode_all(walker: _Walker, element: Any, length: int, key: str) -> list[Any]:
    h = walker.h
    fmt = walker.formats.get(element)
    if fmt is not None:
        if h.pos + length * fmt.size > h.size:
            raise h.truncated(f"the array {key!r}")
        values = np.frombuffer(h.data, dtype=np.dtype(fmt.format), count=length, offset=h.pos)
        h.pos += length * fmt.size
        return values.tolist()
    if element == walker.string_type:
        return [h.string(f"an element of {key!r}") for _ in range(length)]
    out = []
    for _ in range(length):
        inner = walker.value_type(h.unpack(h.u32, f"the element type of {key!r}"), key)
        out.append(_decode_all(walker, inner, h.unpack(h.u64, f"the length of {key!r}"), key))
    return out
