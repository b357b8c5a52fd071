"""
TFLite models (`.tflite`): a FlatBuffer `Model` with subgraphs of tensors and operators, and
buffers holding the constant tensors' bytes. Read with the `tflite` package's generated bindings
over a memory map, never with TensorFlow: the tables are walked, each constant tensor's bytes are
located (inside the flatbuffer, or after it at `offset`/`size` as models over 2 GB store them) and
read in place when loaded.

Quantized tensors (int8/uint8/int16/int32 with a scale and zero point, per tensor or per channel
along `quantized_dimension`) keep their stored form visible (`encoding`, `encoding_params`) and
`load()` returns the values TFLite's Dequantize kernel computes: `float(scale * (q - zero_point))`,
the scale widened to double. Operators give each weight its layer (`Checkpoint.layers`): TFLite
stores a fully-connected weight `[out, in]` (as torch does) and a convolution `[out, kh, kw, in]`,
and its converter folds BatchNorm into the convolution before them, so a TFLite file has no
BatchNorm statistics to check.
"""

from __future__ import annotations

import math
import mmap
import struct
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np

from ckptview.errors import CorruptCheckpointError, TruncatedCheckpointError, printable
from ckptview.lazy import torch
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

TFLITE_IDENTIFIER = b"TFL3"

# TensorType -> (torch dtype name, numpy dtype); types torch cannot hold are listed but not loaded
_TYPES: dict[str, tuple[str, str]] = {
    "FLOAT32": ("float32", "<f4"), "FLOAT16": ("float16", "<f2"), "FLOAT64": ("float64", "<f8"),
    "BFLOAT16": ("bfloat16", "<u2"), "INT8": ("int8", "i1"), "UINT8": ("uint8", "u1"), "INT16": ("int16", "<i2"),
    "UINT16": ("uint16", "<u2"), "INT32": ("int32", "<i4"), "UINT32": ("uint32", "<u4"), "INT64": ("int64", "<i8"),
    "UINT64": ("uint64", "<u8"), "BOOL": ("bool", "?"), "COMPLEX64": ("complex64", "<c8"),
    "COMPLEX128": ("complex128", "<c16"),
}
_QUANTIZABLE = ("INT8", "UINT8", "INT16", "INT32", "INT64")
# operator -> (input index of the weight, layer kind, how the weight is laid out)
_WEIGHTED_OPS = {
    "CONV_2D": (1, "Conv2d", "out, kh, kw, in"), "DEPTHWISE_CONV_2D": (1, "Conv2d", "1, kh, kw, out (depthwise)"),
    "CONV_3D": (1, "Conv3d", "kd, kh, kw, in, out"), "TRANSPOSE_CONV": (1, "ConvTranspose2d", "out, kh, kw, in"),
    "FULLY_CONNECTED": (1, "Linear", "out×in, as torch stores it"), "EMBEDDING_LOOKUP": (1, "Embedding", "rows×dim"),
}


def is_tflite(head: bytes) -> bool:
    return head[4:8] == TFLITE_IDENTIFIER


def read_tflite(path: str, size: int, *, trust: bool) -> Checkpoint:
    from ckptview.readers.keras_file import local_only

    local_only(path, "a TFLite model")
    import tflite

    with open(path, "rb") as stream:
        data = mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        return _Reader(path, size, data, tflite).checkpoint(trust)
    except (struct.error, IndexError, ValueError, OverflowError) as exc:
        # the generated bindings follow offsets without checking them against the buffer
        raise CorruptCheckpointError(path, "the FlatBuffer's tables point outside the file: it was cut off or is "
                                           "damaged. Copy or convert the model again.") from exc
    finally:
        try:
            data.close()
        except BufferError:  # a view the bindings made is still referenced (by a traceback): freed with it
            pass


# The vectors the reader walks entry by entry, by their vtable offsets in the schema's tables
_MODEL_LISTS = ((8, "subgraph list"), (16, "metadata list"), (18, "signature list"))
_SUBGRAPH_LISTS = ((4, "tensor list", True), (6, "input list", False), (8, "output list", False),
                   (10, "operator list", True))
_SIGNATURE_LISTS = ((4, "input list"), (6, "output list"))


def _enum_names(enum_class: Any) -> dict[int, str]:
    return {value: name for name, value in vars(enum_class).items() if not name.startswith("_") and isinstance(value, int)}


class _Reader:
    def __init__(self, path: str, size: int, data: mmap.mmap, tflite: Any) -> None:
        self.path, self.size, self.data = path, size, data
        if size < 8 or not is_tflite(bytes(data[:8])):
            raise CorruptCheckpointError(path, "not a TFLite flatbuffer (no TFL3 identifier): re-export the model.")
        (root,) = struct.unpack_from("<I", data, 0)
        if root + 4 > size:
            raise TruncatedCheckpointError(path, f"the flatbuffer's root table is at byte {int(root):,}, past the end of "
                                                 f"the {size:,}-byte file: it was cut off. Copy or convert it again.")
        self.model = tflite.Model.GetRootAs(data, 0)
        self.types = _enum_names(tflite.TensorType)
        self.ops = _enum_names(tflite.BuiltinOperator)
        self.source = FileSource(path)
        self.buffer_ranges: dict[int, tuple[int, int]] = {}

    def buffer_range(self, index: int, what: str) -> tuple[int, int]:
        """(absolute offset, size) of buffer `index`'s bytes, checked against the file."""
        if index in self.buffer_ranges:
            return self.buffer_ranges[index]
        if not 0 <= index < self.model.BuffersLength():
            raise CorruptCheckpointError(self.path, f"{what} uses buffer {index}, but the model has "
                                                    f"{self.model.BuffersLength()}: the file is damaged. Convert the "
                                                    "model again.")
        buffer = self.model.Buffers(index)
        offset, length = buffer.Offset(), buffer.Size()
        if offset > 1:  # stored after the flatbuffer (models over 2 GB): an offset from the file's start
            start = offset
        else:
            vector = buffer._tab.Offset(4)
            if not vector:
                self.buffer_ranges[index] = (0, 0)
                return 0, 0
            start, length = buffer._tab.Vector(vector), buffer._tab.VectorLen(vector)
        if start + length > self.size:
            raise CorruptCheckpointError(self.path, f"{what} keeps its data at bytes {start:,}..{start + length:,} "
                                                    f"but the file ends at byte {self.size:,}: it was cut off or its "
                                                    "buffer table is damaged. Copy or convert the model again.")
        self.buffer_ranges[index] = (start, length)
        return start, length

    def refuse_repeats(self, table: Any, field: int, what: str, *, of_tables: bool = True) -> None:
        """
        A vector the reader walks entry by entry (of tables, or of tensor indices) that names one entry
        more than once: the converter writes each tensor, operator or signature once and lists each
        input once, and the bindings parse an entry in ~8 µs of Python, so at 4 bytes an entry a
        crafted 4 MB file listed one tensor a million times for 7.7 s (400 MB: 13 minutes).
        """
        vector = table._tab.Offset(field)
        if not vector:
            return
        start, count = table._tab.Vector(vector), table._tab.VectorLen(vector)
        if start + 4 * count > self.size:
            raise TruncatedCheckpointError(self.path, f"{what} runs past the end of the file: it was cut off. Copy or "
                                                      "convert the model again.")
        entries = np.frombuffer(self.data, "<u4", count, start).astype(np.int64)
        if of_tables:  # each entry is an offset from its own position to its table
            entries += np.arange(start, start + 4 * count, 4)
        repeats = count - len(np.unique(entries))
        if repeats:
            raise CorruptCheckpointError(self.path, f"{what} names the same entry more than once ({repeats:,} "
                                                    f"repeats among {count:,} entries): TFLite's converter lists "
                                                    "each once, so the file is crafted or damaged. Convert the model "
                                                    "again.")

    def refuse_overlapping_buffers(self) -> None:
        """
        Buffers whose bytes overlap: the converter writes each buffer's data once (tensors that share
        data share the buffer's index, and read as one storage). Distinct buffers over one 100 MB range
        would make statistics read it once per buffer.
        """
        ranges = sorted((start, start + length, index)
                        for index, (start, length) in self.buffer_ranges.items() if length)
        for (_, end, first), (start, _, second) in zip(ranges, ranges[1:]):
            if start < end:
                raise CorruptCheckpointError(self.path, f"buffers {first} and {second} keep their data in overlapping "
                                                        "bytes of the file: the converter writes each buffer once, so "
                                                        "the model is crafted or damaged. Convert it again.")

    def checkpoint(self, trust: bool) -> Checkpoint:
        model = self.model
        root: dict[str, TensorInfo] = {}
        layers: dict[str, LayerRole] = {}
        op_counts: Counter[str] = Counter()
        subgraphs = []
        quantized = 0
        for field, what in _MODEL_LISTS:
            self.refuse_repeats(model, field, f"the model's {what}")
        for graph_index in range(model.SubgraphsLength()):
            graph = model.Subgraphs(graph_index)
            for field, what, of_tables in _SUBGRAPH_LISTS:
                self.refuse_repeats(graph, field, f"subgraph {graph_index}'s {what}", of_tables=of_tables)
            prefix = "" if graph_index == 0 else f"subgraph{graph_index}."
            names: dict[int, str] = {}
            for index in range(graph.TensorsLength()):
                tensor = graph.Tensors(index)
                name = (tensor.Name() or b"").decode("utf-8", "replace") or f"tensor_{index}"
                key = prefix + name
                if key in root:
                    key = f"{key}#{index}"
                info = self.tensor(tensor, key)
                if info is not None:
                    root[key] = info
                    names[index] = key
                    quantized += info.layout == "encoded"
            operators = []
            for op_index in range(graph.OperatorsLength()):
                op = graph.Operators(op_index)
                op_name = self.op_name(op.OpcodeIndex())
                op_counts[op_name] += 1
                inputs = op.InputsAsNumpy().tolist() if op.InputsLength() else []
                operators.append(op_name)
                self.roles(op_name, inputs, names, root, layers, graph)
            subgraphs.append({
                "name": (graph.Name() or b"").decode("utf-8", "replace"),
                "tensors": graph.TensorsLength(), "operators": graph.OperatorsLength(),
                "inputs": [self.describe(graph, i) for i in graph.InputsAsNumpy().tolist()] if graph.InputsLength() else [],
                "outputs": [self.describe(graph, i) for i in graph.OutputsAsNumpy().tolist()]
                if graph.OutputsLength() else [],
            })
        self.refuse_overlapping_buffers()
        details = {
            "schema_version": model.Version(),
            "description": (model.Description() or b"").decode("utf-8", "replace"),
            "subgraphs": subgraphs,
            "inputs": subgraphs[0]["inputs"] if subgraphs else [],
            "outputs": subgraphs[0]["outputs"] if subgraphs else [],
            "op_counts": dict(op_counts),
            "quantized_tensors": quantized,
            "metadata": [(model.Metadata(i).Name() or b"").decode("utf-8", "replace")
                         for i in range(model.MetadataLength())],
            "signatures": self.signatures(),
            "notes": [("TFLite's converter folds BatchNorm into the convolution before it: there are no BatchNorm "
                       "statistics to check"), "fully-connected weights are stored [out, in], as torch stores them"],
        }
        metadata = {"description": details["description"], "subgraphs": str(len(subgraphs)),
                    "operators": ", ".join(f"{name} ×{count}" for name, count in op_counts.most_common(8)),
                    "note": "; ".join(details["notes"])}  # the explorer's Overview shows metadata
        return Checkpoint(self.path, "tflite", root, file_size=self.size, sources=[self.source], trust=trust,
                          details=details, metadata=metadata, layers=layers, pickle_imports=_flex_code(op_counts))

    def signatures(self) -> dict[str, Any]:
        """The model's SignatureDefs (what `interpreter.get_signature_list()` names): per signature key,
        its subgraph and each input/output name with the tensor it maps to."""
        out: dict[str, Any] = {}
        for index in range(self.model.SignatureDefsLength()):
            signature = self.model.SignatureDefs(index)
            for field, what in _SIGNATURE_LISTS:
                self.refuse_repeats(signature, field, f"signature {index}'s {what}")
            key = (signature.SignatureKey() or b"").decode("utf-8", "replace") or f"signature_{index}"
            sides = {}
            for side, count, item in (("inputs", signature.InputsLength(), signature.Inputs),
                                      ("outputs", signature.OutputsLength(), signature.Outputs)):
                sides[side] = {(item(j).Name() or b"").decode("utf-8", "replace"): item(j).TensorIndex()
                               for j in range(count)}
            out[key] = {"subgraph": signature.SubgraphIndex(), **sides}
        return out

    def op_name(self, opcode_index: int) -> str:
        if not 0 <= opcode_index < self.model.OperatorCodesLength():
            raise CorruptCheckpointError(self.path, f"an operator uses opcode {opcode_index}, but the model has "
                                                    f"{self.model.OperatorCodesLength()}: the file is damaged. Convert "
                                                    "the model again.")
        code = self.model.OperatorCodes(opcode_index)
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        name = self.ops.get(builtin, f"BUILTIN_{builtin}")
        if name == "CUSTOM":
            return "CUSTOM:" + (code.CustomCode() or b"?").decode("utf-8", "replace")
        return name

    def describe(self, graph: Any, index: int) -> dict[str, Any]:
        if not 0 <= index < graph.TensorsLength():
            return {"index": index}
        tensor = graph.Tensors(index)
        return {"name": (tensor.Name() or b"").decode("utf-8", "replace"), "index": index,
                "shape": tensor.ShapeAsNumpy().tolist() if tensor.ShapeLength() else [],
                "dtype": self.types.get(tensor.Type(), str(tensor.Type())).lower()}

    def tensor(self, tensor: Any, key: str) -> TensorInfo | None:
        """The constant tensor's record, or None for an activation (buffer 0 or empty)."""
        start, length = self.buffer_range(tensor.Buffer(), f"tensor {printable(key)!r}")
        if not length:
            return None
        shape = tuple(tensor.ShapeAsNumpy().tolist()) if tensor.ShapeLength() else ()
        if any(d < 0 for d in shape):
            raise CorruptCheckpointError(self.path, f"constant tensor {printable(key)!r} has a negative dimension "
                                                    f"{list(shape)}: the file is damaged. Convert the model again.")
        type_name = self.types.get(tensor.Type(), f"type {tensor.Type()}")
        torch_name, numpy_dtype = _TYPES.get(type_name, (None, None))
        # keyed by buffer: the converter shares one buffer between tensors (and subgraphs) holding the
        # same constant, and a shared buffer counts once, as tied weights do
        storage = Storage(key=f"buffer{tensor.Buffer()}", source=self.source, offset=start, nbytes=length,
                          location="cpu")
        if torch_name is None:
            return TensorInfo(shape=shape, dtype="uint8", storage=storage, layout="encoded", encoding=type_name.lower(),
                              stored_nbytes=length, note=f"TFLite {type_name} tensors have no torch dtype")
        if tensor.Sparsity() is not None:
            # block-sparse weights (TFLite's sparsity format: traversal order, block map, CSR-like
            # dimension metadata) hold fewer bytes than their shape: listed, not decoded
            return TensorInfo(shape=shape, dtype=torch_name, storage=storage, layout="unsupported",
                              stored_nbytes=length, note="a sparse TFLite tensor (stored in TFLite's block-sparse "
                                                         "format), which ckptview lists but does not decode")
        itemsize = np.dtype(numpy_dtype).itemsize
        if math.prod(shape) * itemsize != length:
            raise CorruptCheckpointError(self.path, f"constant tensor {printable(key)!r} is {list(shape)} "
                                                    f"{type_name} ({math.prod(shape) * itemsize:,} bytes) but its "
                                                    f"buffer holds {length:,}: the file is damaged. Convert the model "
                                                    "again.")
        quant = tensor.Quantization()
        # copied out of the map at once: a numpy view left on it (in a traceback too) keeps the map from closing
        scales = quant.ScaleAsNumpy().copy() if quant is not None and quant.ScaleLength() else None
        if scales is None or type_name not in _QUANTIZABLE:
            return TensorInfo(shape=shape, dtype=torch_name, storage=storage, stride=contiguous_stride(shape))
        zero_points = quant.ZeroPointAsNumpy().copy() if quant.ZeroPointLength() else np.zeros(len(scales), np.int64)
        axis = quant.QuantizedDimension()
        if len(scales) > 1 and (not 0 <= axis < len(shape) or shape[axis] != len(scales)
                                or len(zero_points) not in (1, len(scales))):
            raise CorruptCheckpointError(self.path, f"tensor {printable(key)!r} has {len(scales)} scales along "
                                                    f"dimension {axis} of shape {list(shape)}: its quantization "
                                                    "parameters are damaged. Convert the model again.")
        dequantizer = _Dequantizer(storage, shape, numpy_dtype, scales, zero_points, axis)
        params = {"scheme": "per-channel" if len(scales) > 1 else "per-tensor", "quantized_dimension": axis,
                  "channels": len(scales), "scale": [float(s) for s in scales[:16]],
                  "zero_point": [int(z) for z in zero_points[:16]]}
        return TensorInfo(shape=shape, dtype="float32", storage=storage, stride=contiguous_stride(shape),
                          layout="encoded", encoding=torch_name, encoding_params=params, stored_nbytes=length,
                          decode=dequantizer.decode, decode_chunks=dequantizer.chunks)

    def roles(self, op_name: str, inputs: list[int], names: dict[int, str], root: dict[str, TensorInfo],
              layers: dict[str, LayerRole], graph: Any) -> None:
        spec = _WEIGHTED_OPS.get(op_name)
        if spec is None or len(inputs) <= spec[0]:
            return
        weight = names.get(inputs[spec[0]])
        if weight is None:
            return
        position, kind, layout = spec
        shape = root[weight].shape
        module = weight.rpartition("/")[0] or weight
        layers[weight] = LayerRole(module, "weight", kind, f"{'×'.join(map(str, shape))} ({layout})")
        if len(inputs) > position + 1 and names.get(inputs[position + 1]) is not None:
            layers[names[inputs[position + 1]]] = LayerRole(module, "bias", kind, "")


def _flex_code(op_counts: Counter[str]) -> list[PickleImport]:
    """
    TensorFlow ops the converter kept as Flex ops (`SELECT_TF_OPS`: custom ops named "Flex" + the op)
    that touch the file system: a TFLite runtime with TensorFlow's select ops runs their TensorFlow
    kernels, `FlexWriteFile` writing where its input says. tf.lite.Interpreter without the Flex
    delegate refuses the model, so they count only as what such a runtime would do.
    """
    found = []
    for name, count in op_counts.items():
        op = name.removeprefix("CUSTOM:Flex") if name.startswith("CUSTOM:Flex") else ""
        what = CODE_OPS.get(op) or CHECKPOINT_OPS.get(op, ("", ""))[1]
        if what:
            found.append(PickleImport(f"tf.raw_ops.{op} as the Flex op {name.removeprefix('CUSTOM:')} ({what}, in a "
                                      "TFLite runtime with TensorFlow's select ops)", count))
    return found


class _Dequantizer:
    """A quantized tensor's stored integers, dequantized as TFLite's Dequantize kernel does."""

    def __init__(self, storage: Storage, shape: tuple[int, ...], numpy_dtype: str, scales: np.ndarray,
                 zero_points: np.ndarray, axis: int) -> None:
        self.storage, self.shape, self.dtype = storage, shape, np.dtype(numpy_dtype)
        self.scales = scales.astype(np.float32).astype(np.float64)
        self.zero_points = zero_points.astype(np.int64)
        if len(self.zero_points) == 1 and len(self.scales) > 1:
            self.zero_points = np.repeat(self.zero_points, len(self.scales))
        self.inner = math.prod(shape[axis + 1:]) if len(scales) > 1 else 1
        self.numel = math.prod(shape)

    def _values(self, first: int, count: int) -> np.ndarray:
        raw = self.storage.source.read(self.storage.offset + first * self.dtype.itemsize, count * self.dtype.itemsize)
        q = np.frombuffer(raw, self.dtype).astype(np.int64)
        if len(self.scales) == 1:
            return (self.scales[0] * (q - self.zero_points[0])).astype(np.float32)
        channel = (np.arange(first, first + count) // self.inner) % len(self.scales)
        return (self.scales[channel] * (q - self.zero_points[channel])).astype(np.float32)

    def decode(self) -> Any:
        return torch.from_numpy(self._values(0, self.numel).reshape(self.shape))

    def chunks(self, chunk_bytes: int) -> Iterator[Any]:
        step = max(1, chunk_bytes // 4)
        for start in range(0, self.numel, step):
            yield torch.from_numpy(self._values(start, min(step, self.numel - start)))
