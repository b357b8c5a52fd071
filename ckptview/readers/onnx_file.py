"""
ONNX models, read lazily by walking the protobuf wire format: no weight is read at open.

`onnx.load` parses the whole ModelProto, copying every initializer's bytes into memory. Here a
small walker reads only field headers, names, shapes and graph nodes, and records where each
tensor's bytes sit: `raw_data` (and packed `float_data`/`double_data`, whose wire bytes are the
little-endian values) becomes a `Storage` over a range of the model file, external data one over
a range of its data file, both read in place like safetensors. Only the rare tensors stored as
varints (`int32_data`, `int64_data`, ...), 4-bit/6-bit packed types and `DequantizeLinear`
weights are decoded, when loaded, by the `onnx` package itself (imported then, not at open).

By URL (any fsspec URL) the same walk runs over ranged requests. Protobuf has no index: the graph,
names and shapes are read wherever they are, in requests that start at 4 KiB and double while the
walk reads on (nodes), and every weight's payload is stepped over unread. So a listing moves the
file's bytes minus its weights (plus at most one 4 KiB request per skipped payload); a model that
stores its weights as varints (`int64_data`) is read for them too. External data files are found
beside the model's URL and read by exact ranges.

What the file holds becomes one flat mapping name -> tensor: initializers, sparse initializers
and `Constant` outputs of the main graph by their names, those of `If`/`Loop`/`Scan` (any graph
attribute) subgraphs under their graph path (`<node>.<attribute>.<name>`). The graph's nodes give
each weight its layer (`Checkpoint.layers`): Conv/Gemm/MatMul/Gather/normalisation inputs, seen
through `Transpose` and `DequantizeLinear`, so tables and BatchNorm checks work on any names.
"""

from __future__ import annotations

import math
import os
import stat
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ckptview.errors import CheckpointNotFoundError, CorruptCheckpointError, TensorDataError, \
    TruncatedCheckpointError, printable
from ckptview.readers.dtypes import ITEMSIZE, torch_dtype
from ckptview.readers.model import Checkpoint, FileSource, LayerRole, Storage, TensorInfo, contiguous_stride
from ckptview.readers.paths import confined_path
from ckptview.readers.remote import RemoteSource, is_url, remote_file_id, source_for

if TYPE_CHECKING:
    import torch

# TensorProto.DataType (onnx/onnx.proto) -> torch dtype name, for the types torch holds bit for bit.
# Kept here rather than asked of `onnx.helper` so opening a model never imports onnx (0.8 s), and by
# name so listing one imports no torch (1 s); tests/test_onnx.py checks the table against
# onnx.helper.tensor_dtype_to_np_dtype.
ONNX_DTYPES: dict[int, str] = {
    1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64", 9: "bool", 10: "float16",
    11: "float64", 12: "uint32", 13: "uint64", 14: "complex64", 15: "complex128", 16: "bfloat16",
    17: "float8_e4m3fn", 18: "float8_e4m3fnuz", 19: "float8_e5m2", 20: "float8_e5m2fnuz", 24: "float8_e8m0fnu",
}
# Types torch has no dtype for: stored packed (or as strings) and decoded by onnx on load into
# the torch dtype named here. The name is `entry.encoding`.
ONNX_ENCODED: dict[int, tuple[str, str]] = {
    21: ("uint4", "uint8"), 22: ("int4", "int8"), 23: ("float4e2m1", "float32"),
    25: ("uint2", "uint8"), 26: ("int2", "int8"), 27: ("float6e2m3", "float32"),
    28: ("float6e3m2", "float32"),
}
STRING = 8
ONNX_TYPE_NAMES = {
    1: "float", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64", 8: "string", 9: "bool",
    10: "float16", 11: "double", 12: "uint32", 13: "uint64", 14: "complex64", 15: "complex128", 16: "bfloat16",
    17: "float8e4m3fn", 18: "float8e4m3fnuz", 19: "float8e5m2", 20: "float8e5m2fnuz", 21: "uint4", 22: "int4",
    23: "float4e2m1", 24: "float8e8m0", 25: "uint2", 26: "int2", 27: "float6e2m3", 28: "float6e3m2",
}
# Domains the ONNX standard defines; nodes in any other domain need a runtime that registers it.
STANDARD_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "ai.onnx.preview.training"})

# ModelProto fields and the wire type each must have, for recognising a model by its first bytes.
_MODEL_FIELDS = {1: 0, 2: 2, 3: 2, 4: 2, 5: 0, 6: 2, 7: 2, 8: 2, 14: 2, 20: 2, 25: 2, 26: 2}
_GRAPH_FIELDS = {1: 2, 2: 2, 5: 2, 10: 2, 11: 2, 12: 2, 13: 2, 14: 2, 15: 2, 16: 2}
_SHORT_STRING = 4096  # producer name/version and domain are short; longer means another proto
_BLOCK = 256 * 1024  # read-ahead for field headers: many small nodes per read, one read per initializer
# By URL every read-ahead byte is sent over the network: start small after a skipped payload, double
# while the walk reads on.
_REMOTE_BLOCK = 4 * 1024
_MAX_DEPTH = 64  # subgraphs nested deeper than this are crafted, not exported
_SMALL_MESSAGE = 16 * 1024 * 1024  # value infos and attribute lists are parsed from memory up to this


def looks_like_onnx(head: bytes, size: int) -> bool:
    """
    True when `head` parses as the start of a ModelProto: every top-level field is one ModelProto
    has with its wire type, `ir_version` comes with a plausible value, the short strings are
    UTF-8, and the graph starts with a GraphProto field. A TensorProto or TF SavedModel that also
    starts with field 1 fails on its second field (other wire type, or a long binary "string").
    """
    pos, seen_version, length_field = 0, False, False
    try:
        while pos < len(head):
            tag, pos = _varint(head, pos)
            number, wire = tag >> 3, tag & 7
            if _MODEL_FIELDS.get(number) != wire:
                return False
            if wire == 0:
                value, pos = _varint(head, pos)
                if number == 1:
                    if not 1 <= value <= 64:
                        return False
                    seen_version = True
                continue
            length, pos = _varint(head, pos)
            # the graph may run past the end of a cut-off file: the reader then says it was cut off
            if not seen_version or pos + length > size and number != 7:
                return False
            if number in (2, 3, 4):
                if length > _SHORT_STRING or pos + length > len(head):
                    return False
                head[pos:pos + length].decode("utf-8")
            elif number == 7:
                if pos >= len(head):
                    return False
                inner, _ = _varint(head, pos)
                return _GRAPH_FIELDS.get(inner >> 3) == inner & 7
            elif pos + length > len(head):
                # a long doc string or metadata before the graph: accept it only as text
                if number != 6:
                    return False
                head[pos:].decode("utf-8", errors="ignore")
                return True
            length_field = True
            pos += length
    except (IndexError, UnicodeDecodeError, _VarintError):
        return False
    return seen_version and length_field


class _VarintError(Exception):
    pass


def _varint(buf: bytes | memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise _VarintError


def _signed(value: int) -> int:
    """int64 fields arrive as two's complement in 64 bits."""
    return value - (1 << 64) if value >= 1 << 63 else value


class _Wire:
    """
    Protobuf fields of one file, read through a small read-ahead buffer: field headers and small
    messages come from it, large payloads (tensor bytes) are skipped by offset, never read.
    """

    def __init__(self, source: Any, size: int, path: str) -> None:
        self.source, self.size, self.path = source, size, path
        self._buf = b""
        self._start = 0
        self._first_block = _REMOTE_BLOCK if isinstance(source, RemoteSource) else _BLOCK
        self._block = self._first_block

    def _ensure(self, pos: int, count: int) -> tuple[bytes, int]:
        """The buffer holding bytes [pos, pos + count) (fewer at the file's end) and pos's index in it."""
        end = self._start + len(self._buf)
        if pos < self._start or pos + count > end:
            reading_on = self._buf and self._start <= pos <= end
            self._block = min(_BLOCK, 2 * self._block) if reading_on else self._first_block
            self._buf = self.source.read(pos, min(max(count, self._block), self.size - pos))
            self._start = pos
        return self._buf, pos - self._start

    def bytes(self, pos: int, length: int) -> bytes:
        if length > _BLOCK:
            return self.source.read(pos, length)
        buf, index = self._ensure(pos, length)
        return buf[index:index + length]

    def fields(self, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
        """(field number, wire type, value, length) for each field in [start, end): the value of a
        varint, else the absolute offset of the payload (length 8/4 for fixed64/fixed32)."""
        pos = start
        while pos < end:
            buf, index = self._ensure(pos, min(24, end - pos))
            try:
                tag, after = _varint(buf, index)
                number, wire = tag >> 3, tag & 7
                if wire == 0:
                    value, after = _varint(buf, after)
                    pos += after - index
                    if pos > end:
                        raise IndexError
                    yield number, 0, value, 0
                    continue
                if wire == 2:
                    length, after = _varint(buf, after)
                elif wire in (1, 5):
                    length = 8 if wire == 1 else 4
                else:
                    self.corrupt(f"byte {pos:,} holds protobuf wire type {wire}, which ONNX never writes")
            except IndexError:
                self.cut_off(pos, end)
            except _VarintError:
                self.corrupt(f"byte {pos:,} starts a protobuf number longer than 10 bytes")
            payload = pos + (after - index)
            if payload + length > end:
                self.cut_off(payload + length, end)
            yield number, wire, payload, length
            pos = payload + length

    def varints(self, wire: int, value: int, length: int) -> list[int]:
        """A repeated integer field's values, packed (wire type 2) or one per field (0)."""
        if wire == 0:
            return [value]
        data, pos, out = self.bytes(value, length), 0, []
        try:
            while pos < len(data):
                number, pos = _varint(data, pos)
                out.append(number)
        except (IndexError, _VarintError):
            self.corrupt(f"the packed integers at byte {value:,} end in the middle of a number")
        return out

    def string(self, pos: int, length: int) -> str:
        return self.bytes(pos, length).decode("utf-8", errors="replace")

    def cut_off(self, needed: int, end: int) -> None:
        """A field runs to byte `needed`, past `end`: at the file's end the file was cut off, inside
        the file a length field lies (every enclosing message was checked against its own end)."""
        if end >= self.size:
            raise TruncatedCheckpointError(self.path, f"the ONNX protobuf ends at byte {self.size:,} in the middle of a "
                                                      "field: the file was cut off while copying or saving. Copy it "
                                                      "again or re-export it.")
        self.corrupt(f"a field runs to byte {needed:,}, past the end of the message holding it (byte {end:,}): "
                     "a length field lies")

    def corrupt(self, what: str) -> None:
        raise CorruptCheckpointError(self.path, f"its ONNX protobuf is damaged: {what}. Re-export the model or "
                                                "download it again.")


# --- what the walk collects ------------------------------------------------------------------------

@dataclass
class _Tensor:
    """A TensorProto as located in the file: nothing of its data is read."""

    name: str = ""
    dims: list[int] = field(default_factory=list)
    data_type: int = 0
    raw: tuple[int, int] | None = None          # (offset, length) of raw_data
    packed: tuple[int, int] | None = None       # float_data/double_data as one packed run
    typed: bool = False                         # values in varint fields (int32_data, ...) or string_data
    string_bytes: int = 0
    external: dict[str, str] = field(default_factory=dict)
    location: int = 0                           # data_location: 1 = EXTERNAL
    span: tuple[int, int] = (0, 0)              # the TensorProto message itself


@dataclass
class _Node:
    op_type: str = ""
    domain: str = ""
    name: str = ""
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    ints: dict[str, int] = field(default_factory=dict)
    int_lists: dict[str, list[int]] = field(default_factory=dict)
    tensors: list[tuple[str, _Tensor]] = field(default_factory=list)   # attribute name, tensor
    sparse: list[tuple[str, _Tensor, _Tensor, list[int]]] = field(default_factory=list)
    floats: dict[str, list[float]] = field(default_factory=dict)
    strings: dict[str, list[bytes]] = field(default_factory=dict)
    graphs: list[tuple[str, int, int]] = field(default_factory=list)    # attribute label, span


@dataclass
class _Graph:
    prefix: str
    nodes: list[_Node] = field(default_factory=list)
    initializers: list[_Tensor] = field(default_factory=list)
    sparse: list[tuple[_Tensor, _Tensor, list[int]]] = field(default_factory=list)
    inputs: list[tuple[int, int]] = field(default_factory=list)
    outputs: list[tuple[int, int]] = field(default_factory=list)
    name: str = ""


class _Walker:
    def __init__(self, wire: _Wire) -> None:
        self.wire = wire
        self.graphs: list[_Graph] = []

    def model(self) -> dict[str, Any]:
        wire = self.wire
        model: dict[str, Any] = {"opset_import": {}, "metadata_props": {}, "functions": [], "graphs": []}
        for number, kind, value, length in wire.fields(0, wire.size):
            if number == 1 and kind == 0:
                model["ir_version"] = value
            elif number in (2, 3, 4, 6) and kind == 2:
                key = {2: "producer_name", 3: "producer_version", 4: "domain", 6: "doc_string"}[number]
                model[key] = wire.string(value, min(length, _SHORT_STRING))
            elif number == 5 and kind == 0:
                model["model_version"] = _signed(value)
            elif number == 7 and kind == 2:
                model["graphs"].append((value, length))
            elif number == 8 and kind == 2:
                domain, version = self.opset(value, length)
                model["opset_import"][domain] = version
            elif number == 14 and kind == 2:
                key, text = self.string_pair(value, length)
                model["metadata_props"][key] = text
            elif number == 25 and kind == 2:
                model["functions"].append(self.function_name(value, length))
        if not model["graphs"]:
            wire.corrupt("the model has no graph")
        # Several graph fields merge into one (protobuf semantics); each is walked into the same graph.
        main = _Graph("")
        for start, length in model["graphs"]:
            self.graph(start, start + length, main, 0)
        self.graphs.insert(0, main)
        return model

    def opset(self, start: int, length: int) -> tuple[str, int]:
        domain, version = "", 0
        for number, kind, value, size in self.wire.fields(start, start + length):
            if number == 1 and kind == 2:
                domain = self.wire.string(value, size)
            elif number == 2 and kind == 0:
                version = _signed(value)
        return domain, version

    def string_pair(self, start: int, length: int) -> tuple[str, str]:
        key = text = ""
        for number, kind, value, size in self.wire.fields(start, start + length):
            if number == 1 and kind == 2:
                key = self.wire.string(value, size)
            elif number == 2 and kind == 2:
                text = self.wire.string(value, size)
        return key, text

    def function_name(self, start: int, length: int) -> str:
        name = domain = ""
        for number, kind, value, size in self.wire.fields(start, start + length):
            if number == 1 and kind == 2:
                name = self.wire.string(value, size)
            elif number == 10 and kind == 2:
                domain = self.wire.string(value, size)
        return f"{domain}:{name}" if domain else name

    def graph(self, start: int, end: int, graph: _Graph, depth: int) -> None:
        if depth > _MAX_DEPTH:
            self.wire.corrupt(f"its subgraphs nest more than {_MAX_DEPTH} deep")
        for number, kind, value, length in self.wire.fields(start, end):
            if kind != 2:
                continue
            if number == 1:
                graph.nodes.append(self.node(value, value + length))
            elif number == 2:
                graph.name = self.wire.string(value, length)
            elif number == 5:
                graph.initializers.append(self.tensor(value, value + length))
            elif number == 15:
                graph.sparse.append(self.sparse_tensor(value, value + length))
            elif number == 11:
                graph.inputs.append((value, length))
            elif number == 12:
                graph.outputs.append((value, length))
        for index, node in enumerate(graph.nodes):
            label = node.name or f"{node.op_type}_{index}"
            for attribute, sub_start, sub_length in node.graphs:
                sub = _Graph(f"{graph.prefix}{label}.{attribute}.")
                self.graphs.append(sub)
                self.graph(sub_start, sub_start + sub_length, sub, depth + 1)

    def tensor(self, start: int, end: int) -> _Tensor:
        wire, tensor = self.wire, _Tensor(span=(start, end - start))
        for number, kind, value, length in wire.fields(start, end):
            if number == 1:
                tensor.dims.extend(_signed(v) for v in wire.varints(kind, value, length))
            elif number == 2 and kind == 0:
                tensor.data_type = value
            elif number == 8 and kind == 2:
                tensor.name = wire.string(value, length)
            elif number == 9 and kind == 2:
                tensor.raw = (value, length)
            elif number in (4, 10):
                # packed float/double wire bytes are the little-endian values themselves
                if kind == 2 and tensor.packed is None and not tensor.typed:
                    tensor.packed = (value, length)
                else:
                    tensor.typed = True
            elif number in (5, 7, 11):
                tensor.typed = True
            elif number == 6 and kind == 2:
                tensor.typed = True
                tensor.string_bytes += length
            elif number == 13 and kind == 2:
                key, text = self.string_pair(value, length)
                tensor.external[key] = text
            elif number == 14 and kind == 0:
                tensor.location = value
        if tensor.typed:
            tensor.packed = None  # split or mixed fields: onnx decodes them on load
        if any(dim < 0 for dim in tensor.dims):
            wire.corrupt(f"tensor {tensor.name!r} has a negative dimension {tensor.dims}")
        return tensor

    def sparse_tensor(self, start: int, end: int) -> tuple[_Tensor, _Tensor, list[int]]:
        values = indices = None
        dims: list[int] = []
        for number, kind, value, length in self.wire.fields(start, end):
            if number == 1 and kind == 2:
                values = self.tensor(value, value + length)
            elif number == 2 and kind == 2:
                indices = self.tensor(value, value + length)
            elif number == 3:
                dims.extend(_signed(v) for v in self.wire.varints(kind, value, length))
        if values is None or indices is None or any(dim < 0 for dim in dims):
            self.wire.corrupt("a sparse tensor lacks its values or indices, or has a negative dimension")
        return values, indices, dims

    def node(self, start: int, end: int) -> _Node:
        wire, node = self.wire, _Node()
        for number, kind, value, length in wire.fields(start, end):
            if kind != 2:
                continue
            if number == 1:
                node.inputs.append(wire.string(value, length))
            elif number == 2:
                node.outputs.append(wire.string(value, length))
            elif number == 3:
                node.name = wire.string(value, length)
            elif number == 4:
                node.op_type = wire.string(value, length)
            elif number == 7:
                node.domain = wire.string(value, length)
            elif number == 5:
                self.attribute(value, value + length, node)
        return node

    def attribute(self, start: int, end: int, node: _Node) -> None:
        wire = self.wire
        name, ints, floats, strings, graphs = "", [], [], [], []
        tensors: list[_Tensor] = []
        sparse: list[tuple[_Tensor, _Tensor, list[int]]] = []
        single_int = None
        for number, kind, value, length in wire.fields(start, end):
            if number == 1 and kind == 2:
                name = wire.string(value, length)
            elif number == 3 and kind == 0:
                single_int = _signed(value)
            elif number == 8:
                ints.extend(_signed(v) for v in wire.varints(kind, value, length))
            elif number == 2 and kind == 5:
                floats.append(float(np.frombuffer(wire.bytes(value, 4), "<f4")[0]))
            elif number == 7:
                raw = wire.bytes(value, length) if kind == 2 else wire.bytes(value, 4)
                floats.extend(np.frombuffer(raw[: len(raw) // 4 * 4], "<f4").tolist())
            elif number in (4, 9) and kind == 2:
                strings.append(wire.bytes(value, min(length, _SMALL_MESSAGE)))
            elif number in (5, 10) and kind == 2:
                tensors.append(self.tensor(value, value + length))
            elif number in (22, 23) and kind == 2:
                sparse.append(self.sparse_tensor(value, value + length))
            elif number in (6, 11) and kind == 2:
                graphs.append((value, length))
        if single_int is not None:
            node.ints[name] = single_int
        if ints:
            node.int_lists[name] = ints
        if floats:
            node.floats[name] = floats
        if strings:
            node.strings[name] = strings
        node.tensors.extend((name, tensor) for tensor in tensors)
        node.sparse.extend((name, *item) for item in sparse)
        for index, (sub_start, sub_length) in enumerate(graphs):
            label = name if len(graphs) == 1 else f"{name}.{index}"
            node.graphs.append((label, sub_start, sub_length))

    def value_info(self, start: int, length: int) -> dict[str, Any]:
        """A graph input/output: name, element type and shape (symbolic dimensions by name)."""
        wire, name, dtype, shape = self.wire, "", "", None
        for number, kind, value, size in wire.fields(start, start + length):
            if number == 1 and kind == 2:
                name = wire.string(value, size)
            elif number == 2 and kind == 2:
                for type_number, type_kind, type_value, type_size in wire.fields(value, value + size):
                    if type_number in (1, 8) and type_kind == 2:  # tensor_type, sparse_tensor_type
                        dtype, shape = self._tensor_type(type_value, type_size)
                    elif type_kind == 2:
                        dtype = {4: "sequence", 5: "map", 9: "optional", 7: "opaque"}.get(type_number, "?")
        return {"name": name, "dtype": dtype, "shape": shape}

    def _tensor_type(self, start: int, length: int) -> tuple[str, list[Any] | None]:
        wire, dtype, shape = self.wire, "", None
        for number, kind, value, size in wire.fields(start, start + length):
            if number == 1 and kind == 0:
                dtype = ONNX_TYPE_NAMES.get(value, str(value))
            elif number == 2 and kind == 2:
                shape = []
                for dim_number, dim_kind, dim_value, dim_size in wire.fields(value, value + size):
                    if dim_number != 1 or dim_kind != 2:
                        continue
                    dim: Any = None
                    for part, part_kind, part_value, part_size in wire.fields(dim_value, dim_value + dim_size):
                        if part == 1 and part_kind == 0:
                            dim = _signed(part_value)
                        elif part == 2 and part_kind == 2:
                            dim = wire.string(part_value, part_size)
                    shape.append(dim)
        return dtype, shape


# --- sources for bytes not stored as they are used ------------------------------------------------

class _DecodedSource:
    """
    The little-endian bytes of a tensor the file stores in another form (varints, packed
    nibbles), made by `decode` on the first read. Kept until a read reaches the last byte, so a
    chunked pass decodes once and the bytes do not outlive it.
    """

    def __init__(self, path: str, decode: Callable[[], bytes]) -> None:
        self.path = path
        self._decode = decode
        self._data: bytes | None = None
        self._lock = threading.Lock()

    def read_into(self, buffer: memoryview, offset: int) -> None:
        with self._lock:
            data = self._data if self._data is not None else self._decode()
            end = offset + len(buffer)
            if end > len(data):
                raise TensorDataError(self.path, f"a tensor decodes to {len(data):,} bytes but its shape needs {end:,}: "
                                                 "the file is damaged. Re-export it.")
            buffer[:] = data[offset:end]
            self._data = None if end == len(data) else data

    def read(self, offset: int, size: int) -> bytes:
        out = bytearray(size)
        self.read_into(memoryview(out), offset)
        return bytes(out)

    def close(self) -> None:
        self._data = None


# --- building the checkpoint ----------------------------------------------------------------------

class _Builder:
    def __init__(self, path: str, wire: _Wire, source: Any) -> None:
        self.path, self.wire, self.source = path, wire, source
        self.folder = path.rsplit("/", 1)[0] if is_url(path) else os.path.dirname(os.path.abspath(path))
        self.external: dict[str, tuple[Any, int]] = {}
        self.root: dict[str, TensorInfo] = {}
        self.names: dict[int, str] = {}  # id(_Tensor) -> its name in root
        self.data_types: dict[str, int] = {}  # root name -> ONNX data type as stored
        # (data file's source, offset, length) -> the storage over those bytes, and the name of its tensor
        self.external_ranges: dict[tuple[int, int, int], tuple[Storage, str]] = {}

    # -- tensors --
    def add(self, name: str, tensor: _Tensor) -> None:
        base, count = name, 1
        while name in self.root:  # invalid ONNX, but listing both beats dropping one
            count += 1
            name = f"{base}#{count}"
        self.root[name] = self.info(name, tensor)
        self.names[id(tensor)] = name
        self.data_types[name] = tensor.data_type

    def info(self, name: str, tensor: _Tensor) -> TensorInfo:
        shape = tuple(tensor.dims)
        numel = math.prod(shape)
        key = f"{os.path.basename(self.path)}:{name}"
        dtype = ONNX_DTYPES.get(tensor.data_type)
        if tensor.data_type == STRING:
            return TensorInfo(shape=shape, dtype="uint8", storage=None, stride=contiguous_stride(shape),
                              layout="encoded", encoding="string", stored_nbytes=tensor.string_bytes,
                              note="an ONNX string tensor: torch has no strings; read it with "
                                   "onnx.numpy_helper.to_array")
        if tensor.data_type in ONNX_ENCODED:
            encoding, decoded_dtype = ONNX_ENCODED[tensor.data_type]
            stored = self.located(name, tensor, (numel * _bits(tensor.data_type) + 7) // 8, key)
            return TensorInfo(shape=shape, dtype=decoded_dtype, storage=stored, stride=contiguous_stride(shape),
                              layout="encoded", encoding=encoding,
                              stored_nbytes=stored.nbytes if stored is not None else tensor.span[1],
                              decode=self.onnx_decoder(tensor, stored))
        if dtype is None:
            return TensorInfo(shape=shape, dtype="uint8", storage=None, stride=contiguous_stride(shape),
                              layout="unsupported", note=f"ONNX data type {tensor.data_type}, which this ckptview does "
                                                         "not know")
        nbytes = numel * ITEMSIZE[dtype]
        storage = self.located(name, tensor, nbytes, key)
        if storage is None and tensor.typed:
            storage = Storage(key=key, source=_DecodedSource(self.path, self.typed_decoder(tensor)),
                              offset=0, nbytes=nbytes, location="cpu")
        if storage is None and numel:
            return TensorInfo(shape=shape, dtype=dtype, storage=None, stride=contiguous_stride(shape),
                              layout="unsupported", note="the file gives no data for it")
        return TensorInfo(shape=shape, dtype=dtype, storage=storage, stride=contiguous_stride(shape))

    def located(self, name: str, tensor: _Tensor, nbytes: int, key: str) -> Storage | None:
        """A Storage over the bytes stored as they are used (raw_data, packed floats, external data)."""
        if tensor.location == 1 or (tensor.external and tensor.raw is None):
            source, offset, length = self.external_range(name, tensor, nbytes)
            same = self.external_ranges.get((id(source), offset, length))
            if same is not None and length == nbytes:
                # two initializers stored at one place are one storage: statistics and diffs read it once
                return same[0]
        elif tensor.raw is not None:
            (offset, length), source = tensor.raw, self.source
        elif tensor.packed is not None:
            (offset, length), source = tensor.packed, self.source
        else:
            return None
        if length != nbytes:
            raise CorruptCheckpointError(self.path, f"tensor {name!r} holds {length:,} bytes but its shape "
                                                    f"{list(tensor.dims)} and type "
                                                    f"{ONNX_TYPE_NAMES.get(tensor.data_type, tensor.data_type)} need "
                                                    f"{nbytes:,}: the file is damaged. Re-export it.")
        storage = Storage(key=key, source=source, offset=offset, nbytes=length, location="cpu")
        if source is not self.source:
            self.external_ranges[(id(source), offset, length)] = (storage, name)
        return storage

    def refuse_overlapping_external_data(self) -> None:
        """
        Initializers whose external data overlap without being the same bytes: an exporter writes each
        tensor once, one after another. A crafted model could have ten thousand initializers read one
        100 MB range, and statistics would read a terabyte for a file of 100 MB.
        """
        by_source: dict[int, list[tuple[int, int, str]]] = {}
        for (source, offset, length), (_, name) in self.external_ranges.items():
            by_source.setdefault(source, []).append((offset, offset + length, name))
        for ranges in by_source.values():
            ranges.sort()
            for (_, end, first), (start, _, second) in zip(ranges, ranges[1:]):
                if start < end:
                    raise CorruptCheckpointError(self.path, f"tensors {first!r} and {second!r} read overlapping bytes "
                                                            "of their external data file: an exporter writes each "
                                                            "tensor's data once, so the model is crafted or damaged. "
                                                            "Re-export it.")

    def external_range(self, name: str, tensor: _Tensor, nbytes: int) -> tuple[Any, int, int]:
        location = tensor.external.get("location", "")
        source, size = self.external_file(name, location)
        try:
            offset = int(tensor.external.get("offset", "0"))
            length = int(tensor.external["length"]) if "length" in tensor.external else min(nbytes, size - offset)
        except ValueError:
            raise CorruptCheckpointError(self.path, f"tensor {name!r} gives a non-numeric external data offset or "
                                                    "length: the model is damaged. Re-export it.") from None
        if offset < 0 or length < 0 or offset + length > size:
            raise CorruptCheckpointError(self.path, f"tensor {name!r} reads bytes {offset:,}..{offset + length:,} of "
                                                    f"its external data file {location!r}, which has {size:,}: the "
                                                    "data file is cut off or does not belong to this model. Copy "
                                                    "the model with its data file again.")
        return source, offset, length

    def external_file(self, name: str, location: str) -> tuple[Any, int]:
        if location in self.external:
            return self.external[location]
        if is_url(self.path):
            return self.external_url(name, location)
        # onnx's path-traversal CVEs (CVE-2022-25882, CVE-2024-27318): a location is a file in
        # the model's own folder, checked after resolving `..` and symlinks.
        target = confined_path(self.folder, location)
        if target is None:
            raise CorruptCheckpointError(self.path, f"tensor {name!r} keeps its data in {location!r}, which is not a "
                                                    "file in the model's folder: ckptview reads external data only "
                                                    "from beside the model. Move the data file next to the model "
                                                    "and re-export with a relative location.")
        try:
            info = os.stat(target)
        except OSError:
            raise CorruptCheckpointError(self.path, f"tensor {name!r} keeps its data in {location!r} next to the model, "
                                                    "which cannot be read (missing?): copy the model together with "
                                                    "its data file.") from None
        if not stat.S_ISREG(info.st_mode):
            raise CorruptCheckpointError(self.path, f"tensor {name!r} keeps its data in {location!r}, which is not a "
                                                    "regular file: give the model its real data file.")
        self.external[location] = (FileSource(target), info.st_size)
        return self.external[location]

    def external_url(self, name: str, location: str) -> tuple[Any, int]:
        # The same rule as on disk, for URLs: a relative path below the model's own "folder".
        parts = location.replace("\\", "/").split("/")
        if not location or location.startswith("/") or is_url(location) or any(p in ("", ".", "..") for p in parts):
            raise CorruptCheckpointError(self.path, f"tensor {name!r} keeps its data in {location!r}, which is not a "
                                                    "file beside the model: ckptview reads external data only from "
                                                    "beside the model. Re-export with a relative location.")
        url = f"{self.folder}/{location}"
        try:
            size = remote_file_id(url)[0]
        except CheckpointNotFoundError:
            raise CorruptCheckpointError(self.path, f"tensor {name!r} keeps its data in {location!r} beside the model, "
                                                    "which the server does not have: upload the model together with "
                                                    "its data file.") from None
        self.external[location] = (RemoteSource(url, size), size)
        return self.external[location]

    # -- decoders (onnx imported only here, when such a tensor is loaded) --
    def tensor_proto(self, tensor: _Tensor) -> Any:
        import onnx

        start, length = tensor.span
        if length > 1 << 31:
            raise TensorDataError(self.path, "a tensor stored as protobuf varints is over 2 GiB, more than protobuf "
                                             "can parse: re-export it with raw data.")
        from google.protobuf.message import DecodeError

        try:
            return onnx.TensorProto.FromString(self.wire.source.read(start, length))
        except DecodeError as exc:
            raise TensorDataError(self.path, f"tensor {printable(tensor.name)} is not a valid TensorProto (its protobuf "
                                             "bytes are damaged): the file is corrupt. Re-export it.") from exc

    def typed_decoder(self, tensor: _Tensor) -> Callable[[], bytes]:
        def decode() -> bytes:
            array = self.to_array(tensor, self.tensor_proto(tensor))
            return np.ascontiguousarray(array).tobytes()
        return decode

    def onnx_decoder(self, tensor: _Tensor, stored: Storage | None) -> Callable[[], torch.Tensor]:
        def decode() -> torch.Tensor:
            return numpy_to_torch(self.onnx_array(tensor, stored))
        return decode

    def onnx_array(self, tensor: _Tensor, stored: Storage | None) -> np.ndarray:
        """The tensor as `onnx.numpy_helper.to_array` returns it (ml_dtypes for the small float and int types)."""
        import onnx

        if stored is None:
            proto = self.tensor_proto(tensor)
        else:
            proto = onnx.TensorProto(data_type=tensor.data_type, dims=tensor.dims)
            proto.raw_data = stored.source.read(stored.data_offset(), stored.nbytes)
        return self.to_array(tensor, proto)

    def to_array(self, tensor: _Tensor, proto: Any) -> np.ndarray:
        """`onnx.numpy_helper.to_array`, which fails on values that do not fill the dims (numpy's reshape)."""
        from onnx import numpy_helper

        try:
            return numpy_helper.to_array(proto)
        except ValueError as exc:
            raise TensorDataError(self.path, f"tensor {printable(tensor.name)} holds values that do not fill its "
                                             f"dims {list(tensor.dims)}: the file is corrupt. Re-export it.") from exc


def _bits(data_type: int) -> int:
    return {21: 4, 22: 4, 23: 4, 25: 2, 26: 2, 27: 6, 28: 6}[data_type]


def numpy_to_torch(array: np.ndarray) -> torch.Tensor:
    """An onnx/numpy array as a torch tensor of the same values; ml_dtypes floats by their bits."""
    import torch  # listing needs no torch (it takes a second to import); values do

    name = array.dtype.name
    if name in ("int4", "int2"):
        return torch.from_numpy(np.ascontiguousarray(array.astype(np.int8)))
    if name in ("uint4", "uint2"):
        return torch.from_numpy(np.ascontiguousarray(array.astype(np.uint8)))
    if name.startswith(("float4", "float6")):
        return torch.from_numpy(np.ascontiguousarray(array.astype(np.float32)))
    by_bits = getattr(torch, name, None) if name in ("bfloat16", "float8_e4m3fn", "float8_e4m3fnuz",
                                                     "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu") else None
    if by_bits is not None:
        bits = np.ascontiguousarray(array).view(np.uint16 if array.dtype.itemsize == 2 else np.uint8)
        return torch.from_numpy(bits.copy()).view(by_bits)
    return torch.from_numpy(np.ascontiguousarray(array).copy())


def torch_to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """The inverse of `numpy_to_torch` for the dtypes onnx's reference code computes with."""
    import torch

    if tensor.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.float8_e5m2,
                        torch.float8_e5m2fnuz) or tensor.dtype == getattr(torch, "float8_e8m0fnu", None):
        import ml_dtypes

        name = str(tensor.dtype).removeprefix("torch.")
        bits = tensor.contiguous().view(torch.uint16 if tensor.dtype.itemsize == 2 else torch.uint8).numpy()
        return bits.view(getattr(ml_dtypes, name))
    return tensor.contiguous().numpy()


# --- DequantizeLinear ------------------------------------------------------------------------------

def _reshape_input(value: np.ndarray, shape: tuple[int, ...], axis: int, block_size: int) -> Any:
    """onnx.reference's `reshape_input` (onnx/reference/ops/_quant_utils.py), step for step, so the
    dequantized values are those of onnx's reference DequantizeLinear bit for bit."""
    if len(value.shape) == 0:
        return value
    if value.size == 1:
        return value[0]
    if not block_size:
        dims = [1] * len(shape)
        dims[axis] = value.size
        return value.reshape(tuple(dims))
    value = np.repeat(value, repeats=block_size, axis=axis)
    if shape[axis] != value.shape[axis]:
        value = value.take(indices=range(shape[axis]), axis=axis)
    if value.shape != shape:
        raise ValueError(f"block-quantization scale of shape {value.shape} does not fit {shape}")
    return value


_FLOAT8 = (17, 18, 19, 20)


def dequantize(x: np.ndarray, x_type: int, scale: np.ndarray, zero_point: np.ndarray | None, axis: int,
               block_size: int, output_dtype: Any) -> np.ndarray:
    """DequantizeLinear as onnx's reference implementation computes it."""
    axis = axis + len(x.shape) if axis < 0 else axis
    if zero_point is not None and x_type not in _FLOAT8 and x_type != 23:
        dx = x.astype(np.float32) - _reshape_input(zero_point, x.shape, axis, block_size)
    else:
        dx = x.astype(np.float32)
    y = dx * _reshape_input(scale, x.shape, axis, block_size)
    return y.astype(output_dtype if output_dtype is not None else scale.dtype)


# --- the graph's meaning for the tensors ------------------------------------------------------------

_NORMS = {"BatchNormalization": "BatchNorm", "LayerNormalization": "LayerNorm", "InstanceNormalization": "InstanceNorm",
          "GroupNormalization": "GroupNorm", "RMSNormalization": "RMSNorm", "SimplifiedLayerNormalization": "RMSNorm",
          "SkipLayerNormalization": "LayerNorm", "SkipSimplifiedLayerNormalization": "RMSNorm"}
_NORM_LEAVES = {"BatchNormalization": {1: "weight", 2: "bias", 3: "running_mean", 4: "running_var"}}
_LEAF_SUFFIXES = ("weight", "bias", "running_mean", "running_var", "scale", "gamma", "beta", "kernel",
                  "moving_mean", "moving_variance")


class _Scope:
    """Names visible in one graph: its own tensors and producers first, then the enclosing graphs'."""

    def __init__(self, graph: _Graph, parent: _Scope | None, tensors: dict[str, str]) -> None:
        self.parent = parent
        self.tensors = tensors                      # ONNX name -> root name
        self.producers = {output: node for node in graph.nodes for output in node.outputs if output}

    def tensor(self, name: str) -> str | None:
        scope: _Scope | None = self
        while scope is not None:
            if name in scope.tensors:
                return scope.tensors[name]
            if name in scope.producers:
                return None
            scope = scope.parent
        return None

    def producer(self, name: str) -> _Node | None:
        scope: _Scope | None = self
        while scope is not None:
            if name in scope.producers:
                return scope.producers[name]
            if name in scope.tensors:
                return None
            scope = scope.parent
        return None


def _module_of(names: list[str], node: _Node, label: str) -> str:
    """The layer's name: the dotted prefix its weights share when they are named like
    `conv1.weight` (torch exports), else the node's name."""
    prefixes = set()
    for name in names:
        prefix, _, leaf = name.rpartition(".")
        if not prefix or leaf.lower() not in _LEAF_SUFFIXES:
            break
        prefixes.add(prefix)
    else:
        if len(prefixes) == 1:
            return prefixes.pop()
    return label


def _resolve(scope: _Scope, name: str, transposed: bool = False, depth: int = 0) -> tuple[str | None, bool]:
    """The tensor feeding input `name`, looking through Transpose (2-D), DequantizeLinear, Cast and
    Identity nodes; and whether a Transpose was crossed."""
    tensor = scope.tensor(name)
    if tensor is not None or depth > 8:
        return tensor, transposed
    node = scope.producer(name)
    if node is None or not node.inputs:
        return None, transposed
    if node.op_type in ("DequantizeLinear", "Cast", "Identity", "DynamicQuantizeLinear"):
        return _resolve(scope, node.inputs[0], transposed, depth + 1)
    if node.op_type == "Transpose" and node.int_lists.get("perm", [1, 0]) == [1, 0]:
        return _resolve(scope, node.inputs[0], not transposed, depth + 1)
    return None, transposed


def _roles(graphs: list[_Graph], scopes: list[_Scope], root: dict[str, TensorInfo]) -> dict[str, LayerRole]:
    roles: dict[str, LayerRole] = {}
    for graph, scope in zip(graphs, scopes):
        for index, node in enumerate(graph.nodes):
            label = graph.prefix + (node.name or f"{node.op_type}_{index}")
            for slot, role in _node_roles(node, scope, root, label).items():
                roles.setdefault(slot, role)
    return roles


def _node_roles(node: _Node, scope: _Scope, root: dict[str, TensorInfo], label: str) -> dict[str, LayerRole]:
    op = node.op_type
    inputs = [_resolve(scope, name) if name else (None, False) for name in node.inputs]

    def tensor(i: int) -> tuple[str | None, bool]:
        return inputs[i] if i < len(inputs) else (None, False)

    def shape(name: str) -> tuple[int, ...]:
        return root[name].shape

    found: dict[str, tuple[str, str, str]] = {}  # root name -> (leaf, kind, detail)
    if op in ("Conv", "ConvTranspose", "ConvInteger", "QLinearConv"):
        w_slot, b_slot = (3, 8) if op == "QLinearConv" else (1, 2)
        weight, _ = tensor(w_slot)
        if weight is not None and 3 <= len(shape(weight)) <= 5:
            dims = shape(weight)
            kernel = "×".join(str(k) for k in dims[2:])
            if op == "ConvTranspose":
                found[weight] = ("weight", f"ConvTranspose{len(dims) - 2}d",
                                 f"{dims[0]}, {dims[1]}, {kernel} (in, out/groups, kernel)")
            else:
                found[weight] = ("weight", f"Conv{len(dims) - 2}d", f"{dims[0]}, {dims[1]}, {kernel} (out, in/groups, kernel)")
            bias, _ = tensor(b_slot)
            if bias is not None:
                found[bias] = ("bias", found[weight][1], found[weight][2])
    elif op in ("Gemm", "MatMul", "MatMulInteger", "MatMulNBits"):
        weight, crossed = tensor(1)
        trans = bool(node.ints.get("transB", 0)) if op == "Gemm" else False
        if op == "MatMulNBits":  # onnxruntime's 4-bit weights are stored [out, blocks, bytes]
            trans, crossed = True, False
        if weight is not None and len(shape(weight)) == 2:
            rows, cols = shape(weight)
            out_in = trans != crossed
            detail = f"{rows}×{cols} (out×in)" if out_in else f"{rows}×{cols} (in×out)"
            found[weight] = ("weight", "Linear", detail)
            bias, _ = tensor(2) if op == "Gemm" else (None, False)
            if bias is not None:
                found[bias] = ("bias", "Linear", detail)
    elif op == "Gather":
        table, _ = tensor(0)
        if table is not None and len(shape(table)) == 2 and node.ints.get("axis", 0) == 0:
            rows, cols = shape(table)
            found[table] = ("weight", "Embedding", f"{rows}×{cols} (vocab×dim)")
    elif op in _NORMS:
        kind = _NORMS[op]
        first = 2 if op.startswith("Skip") else 1
        leaves = _NORM_LEAVES.get(op, {first: "weight", first + 1: "bias"})
        for slot, leaf in leaves.items():
            name, _ = tensor(slot)
            if name is not None:
                found[name] = (leaf, kind, f"{shape(name)[0] if shape(name) else 1} channels" if kind == "BatchNorm"
                               else f"{shape(name)[0] if shape(name) else 1} features")
    if not found:
        return {}
    module = _module_of(list(found), node, label)
    return {name: LayerRole(module, leaf, kind, detail) for name, (leaf, kind, detail) in found.items()}


def _quantized(builder: _Builder, graphs: list[_Graph], scopes: list[_Scope]) -> int:
    """Give each weight that a DequantizeLinear node reads its stored encoding, scale and zero
    point; `load()` then returns the dequantized values. Returns how many were found."""
    root, count = builder.root, 0
    for graph, scope in zip(graphs, scopes):
        for index, node in enumerate(graph.nodes):
            if node.op_type != "DequantizeLinear" or len(node.inputs) < 2:
                continue
            x_name, scale_name = scope.tensor(node.inputs[0]), scope.tensor(node.inputs[1])
            zp_name = scope.tensor(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] else None
            if x_name is None or scale_name is None or root[x_name].layout == "encoded" and \
                    root[x_name].encoding_params is not None:
                continue
            x, scale = root[x_name], root[scale_name]
            if x.layout not in ("strided", "encoded") or scale.layout != "strided":
                continue
            output_type = node.ints.get("output_dtype", 0)
            out_dtype = ONNX_DTYPES.get(output_type) if output_type else scale.dtype
            if out_dtype is None:
                continue
            axis, block = node.ints.get("axis", 1), node.ints.get("block_size", 0)
            x_type = builder.data_types[x_name]
            params = {"scale": scale_name, "zero_point": zp_name, "axis": axis, "block_size": block,
                      "node": graph.prefix + (node.name or f"DequantizeLinear_{index}")}
            root[x_name] = x.with_flags(
                layout="encoded", dtype=out_dtype, encoding=ONNX_TYPE_NAMES.get(x_type, str(x_type)),
                encoding_params=params, stored_nbytes=x.nbytes,
                decode=_dequantizer(x, x_type, scale, root.get(zp_name) if zp_name else None, axis, block,
                                    out_dtype if output_type else None, x_name))
            count += 1
    return count


def _dequantizer(x: TensorInfo, x_type: int, scale: TensorInfo, zero_point: TensorInfo | None, axis: int,
                 block: int, output_dtype: str | None, name: str) -> Callable[[], torch.Tensor]:
    from ckptview.readers.model import load_tensor

    def decode() -> torch.Tensor:
        stored = x.decode() if x.decode is not None else load_tensor(x, name)
        values = torch_to_numpy(stored)
        scales = torch_to_numpy(load_tensor(scale, name + " scale"))
        zeros = torch_to_numpy(load_tensor(zero_point, name + " zero point")) if zero_point is not None else None
        import torch

        out = torch_to_numpy(torch.empty(0, dtype=torch_dtype(output_dtype))).dtype if output_dtype else None
        return numpy_to_torch(dequantize(values, x_type, scales, zeros, axis, block, out))
    return decode


# --- entry point ----------------------------------------------------------------------------------

def read_onnx(path: str, size: int, *, trust: bool) -> Checkpoint:
    """An ONNX model as a `Checkpoint`: headers and graph walked, no tensor data read."""
    source = source_for(path)
    wire = _Wire(source, size, path)
    walker = _Walker(wire)
    model = walker.model()
    builder = _Builder(path, wire, source)
    scopes: list[_Scope] = []
    scope_of: dict[str, _Scope] = {}
    for graph in walker.graphs:
        named: dict[str, str] = {}
        for tensor in graph.initializers:
            builder.add(graph.prefix + tensor.name, tensor)
            named[tensor.name] = builder.names[id(tensor)]
        for values, indices, dims in graph.sparse:
            _add_sparse(builder, graph.prefix + values.name, values, indices, dims)
            named[values.name] = builder.names[id(values)]
        for node in graph.nodes:
            if node.op_type == "Constant" and node.outputs and not node.domain:
                _add_constant(builder, graph.prefix + node.outputs[0], node)
                if graph.prefix + node.outputs[0] in builder.root:
                    named[node.outputs[0]] = graph.prefix + node.outputs[0]
        scope = _Scope(graph, _parent_scope(graph.prefix, scope_of), named)
        scope_of[graph.prefix] = scope
        scopes.append(scope)
    quantized = _quantized(builder, walker.graphs, scopes)
    layers = _roles(walker.graphs, scopes, builder.root)

    op_types: Counter[str] = Counter()
    custom: set[str] = set()
    for graph in walker.graphs:
        for node in graph.nodes:
            op_types[f"{node.domain}:{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type] += 1
            if node.domain not in STANDARD_DOMAINS:
                custom.add(node.domain)
    main = walker.graphs[0]
    details = {
        "ir_version": model.get("ir_version"),
        "opset_import": model["opset_import"],
        "producer_name": model.get("producer_name", ""),
        "producer_version": model.get("producer_version", ""),
        "domain": model.get("domain", ""),
        "model_version": model.get("model_version", 0),
        "graph_name": main.name,
        "inputs": [info for info in (walker.value_info(start, length) for start, length in main.inputs)
                   if info["name"] not in _initializer_names(main)],
        "outputs": [walker.value_info(start, length) for start, length in main.outputs],
        "node_count": sum(op_types.values()),
        "op_types": dict(op_types.most_common()),
        "custom_domains": sorted(custom),
        "subgraphs": [graph.prefix.rstrip(".") for graph in walker.graphs[1:]],
        "functions": model["functions"],
        "external_data": sorted(builder.external),
        "quantized_tensors": quantized,
        "metadata_props": model["metadata_props"],
    }
    builder.refuse_overlapping_external_data()
    sources = [source] + [src for src, _ in builder.external.values()]
    return Checkpoint(path, "onnx", builder.root, file_size=size, sources=sources, metadata=model["metadata_props"],
                      trust=trust, details=details, layers=layers)


def _initializer_names(graph: _Graph) -> set[str]:
    # IR < 4 lists every initializer among the graph inputs too; those are weights, not inputs
    return {tensor.name for tensor in graph.initializers}


def _parent_scope(prefix: str, scope_of: dict[str, _Scope]) -> _Scope | None:
    if not prefix:
        return None
    best = None
    for candidate in scope_of:
        if prefix.startswith(candidate) and candidate != prefix and (best is None or len(candidate) > len(best)):
            best = candidate
    return scope_of[best] if best is not None else None


def _add_constant(builder: _Builder, name: str, node: _Node) -> None:
    if node.tensors:
        builder.add(name, node.tensors[0][1])
        return
    if node.sparse:
        _, values, indices, dims = node.sparse[0]
        _add_sparse(builder, name, values, indices, dims)
        return
    array: np.ndarray | None = None
    if "value_float" in node.floats:
        array = np.array(node.floats["value_float"][0], dtype=np.float32)
    elif "value_floats" in node.floats:
        array = np.array(node.floats["value_floats"], dtype=np.float32)
    elif "value_int" in node.ints:
        array = np.array(node.ints["value_int"], dtype=np.int64)
    elif "value_ints" in node.int_lists:
        array = np.array(node.int_lists["value_ints"], dtype=np.int64)
    if array is not None:
        data = array.tobytes()
        storage = Storage(key=f"{os.path.basename(builder.path)}:{name}",
                          source=_DecodedSource(builder.path, lambda data=data: data), offset=0, nbytes=len(data),
                          location="cpu")
        shape = tuple(array.shape)
        builder.root[name] = TensorInfo(shape=shape, dtype=ONNX_DTYPES[1 if array.dtype == np.float32 else 7],
                                        storage=storage, stride=contiguous_stride(shape))
        return
    for key in ("value_string", "value_strings"):
        if key in node.strings:
            values = node.strings[key]
            shape = () if key == "value_string" else (len(values),)
            builder.root[name] = TensorInfo(shape=shape, dtype="uint8", storage=None, layout="encoded",
                                            encoding="string", stored_nbytes=sum(map(len, values)),
                                            stride=contiguous_stride(shape),
                                            note="an ONNX string constant: torch has no strings")
            return


def _add_sparse(builder: _Builder, name: str, values: _Tensor, indices: _Tensor, dims: list[int]) -> None:
    """A SparseTensorProto as a sparse COO tensor: ONNX's [NNZ, rank] indices are read in place as
    torch's [rank, NNZ] through strides; linearised [NNZ] indices are unravelled on load."""
    values_info = builder.info(name + ".values", values)
    indices_info = builder.info(name + ".indices", indices)
    rank, nnz = len(dims), math.prod(values.dims)
    if len(indices.dims) == 2 and indices_info.layout == "strided":
        indices_info = indices_info.with_flags(shape=(indices.dims[1], indices.dims[0]), stride=(1, indices.dims[1]))
    elif len(indices.dims) == 1 and indices_info.layout == "strided":
        from ckptview.readers.model import load_tensor

        flat = indices_info

        def unravel() -> torch.Tensor:
            import torch

            linear = load_tensor(flat, name + ".indices").numpy()
            return torch.from_numpy(np.stack(np.unravel_index(linear, dims)).astype(np.int64))

        indices_info = flat.with_flags(shape=(rank, nnz), stride=(nnz, 1), layout="encoded", encoding="linear indices",
                                       stored_nbytes=flat.nbytes, decode=unravel)
    builder.root[name] = TensorInfo(shape=tuple(dims), dtype=values_info.dtype, storage=None, layout="sparse_coo",
                                    components={"indices": indices_info, "values": values_info})
    builder.names[id(values)] = name
