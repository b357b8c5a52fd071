"""safetensors files: the JSON header is read and checked; tensor bytes stay on disk."""

from __future__ import annotations

import json
import os
import struct
from typing import Any


from ckptview.errors import CkptviewError, CorruptCheckpointError, TruncatedCheckpointError
from ckptview.readers import code_verdict_only_requested
from ckptview.readers.dtypes import itemsize
from ckptview.readers.model import (
    Checkpoint,
    FileSource,
    LazyRoot,
    PickleImport,
    Storage,
    TensorInfo,
    contiguous_stride,
)
from ckptview.readers.registry import SAFETENSORS_MAX_HEADER
from ckptview.readers.remote import source_for

# safetensors' dtype names (the `Dtype` enum of the Rust crate) and the torch dtypes they hold
_DTYPE_NAMES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16", "F16": "float16",
    "BF16": "bfloat16", "I32": "int32", "U32": "uint32", "F32": "float32", "F64": "float64",
    "I64": "int64", "U64": "uint64", "C64": "complex64", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu",
}
SAFETENSORS_DTYPES: dict[str, str] = _DTYPE_NAMES


def read_header(source: FileSource, size: int) -> tuple[dict[str, Any], int]:
    """The parsed JSON header and the byte offset where the data region starts."""
    path = source.path
    if size < 8:
        raise TruncatedCheckpointError(path, f"the file is {size} bytes, too short to hold a safetensors header: "
                                             "it was cut off. Copy it again or re-save it.")
    (header_len,) = struct.unpack("<Q", source.read(0, 8))
    if header_len > SAFETENSORS_MAX_HEADER:
        raise CorruptCheckpointError(path, f"its safetensors header claims {header_len:,} bytes, more than the "
                                           f"{SAFETENSORS_MAX_HEADER // 2**20} MB safetensors allows: the header is "
                                           "damaged or the file is not safetensors. Re-save or re-download it.")
    if 8 + header_len > size:
        raise TruncatedCheckpointError(path, f"its safetensors header claims {header_len:,} bytes but the file has "
                                             f"only {size - 8:,} after the length: it was cut off. Copy it again.")
    raw = source.read(8, header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptCheckpointError(path, "its safetensors header is not valid JSON: the file is damaged. "
                                           "Re-save or re-download it.") from exc
    except RecursionError as exc:
        raise CorruptCheckpointError(path, "its safetensors header nests JSON values too deeply: the file is damaged "
                                           "or crafted. Re-save or re-download it.") from exc
    if not isinstance(header, dict):
        raise CorruptCheckpointError(path, "its safetensors header is not a JSON object: the file is damaged. "
                                           "Re-save or re-download it.")
    return header, 8 + header_len


def parse_tensors(path: str, header: dict[str, Any], data_start: int, size: int) -> tuple[dict[str, tuple[str, tuple[int, ...], int, int]], dict[str, str]]:
    """Validate the header: every tensor's (dtype, shape, begin, end), and the metadata."""
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise CorruptCheckpointError(path, "its safetensors __metadata__ is not a JSON object: re-save the file.")
    data_len = size - data_start
    tensors: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype_name, shape, (begin, end) = spec["dtype"], spec["shape"], spec["data_offsets"]
            shape = tuple(shape)
            valid = all(isinstance(v, int) and v >= 0 for v in (*shape, begin, end))
        except (TypeError, KeyError, ValueError) as exc:
            raise CorruptCheckpointError(path, f"its safetensors header entry for {name!r} lacks dtype, shape or "
                                               "data_offsets: the file is damaged. Re-save it.") from exc
        if not valid:
            raise CorruptCheckpointError(path, f"its safetensors header gives tensor {name!r} a negative or "
                                               "non-integer shape or offset: the file is damaged. Re-save it.")
        dtype = SAFETENSORS_DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
        if dtype is None:
            raise CorruptCheckpointError(path, f"tensor {name!r} has safetensors dtype {str(dtype_name)[:40]!r}, which "
                                               "ckptview does not know; convert the tensor, or upgrade ckptview.")
        expected = _prod(shape) * itemsize(dtype)
        if end < begin or end - begin != expected:
            raise CorruptCheckpointError(path, f"tensor {name!r} has data_offsets [{begin}, {end}] "
                                               f"({end - begin:,} bytes) but its shape {list(shape)} and dtype "
                                               f"{dtype_name} need {expected:,} bytes: the header is damaged. Re-save it.")
        tensors[name] = (dtype, shape, begin, end)
    spans = sorted((begin, end, name) for name, (_, _, begin, end) in tensors.items() if end > begin)
    for (b1, e1, n1), (b2, e2, n2) in zip(spans, spans[1:]):
        if b2 < e1:
            raise CorruptCheckpointError(path, f"tensors {n1!r} and {n2!r} overlap in the data region (bytes "
                                               f"{b2:,}..{e1:,}): the header lies about where data is. Re-save it.")
    last = max((end for _, end, _ in spans), default=0)
    if last > data_len:
        raise TruncatedCheckpointError(path, f"its header places data up to byte {data_start + last:,} but the file "
                                             f"ends at byte {size:,}: it was cut off. Copy it again or re-save it.")
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def _prod(shape: tuple[int, ...]) -> int:
    total = 1
    for dim in shape:
        total *= dim
    return total


def read_safetensors(path: str, size: int, *, trust: bool) -> Checkpoint:
    source = source_for(path)  # a URL reads through ranged requests
    if code_verdict_only_requested():
        # `scan`: no safetensors header runs code, and what torch.load would unpickle from the file
        # is checked below; the header is checked if something lists the tensors after all
        return Checkpoint(path, "safetensors", LazyRoot(lambda: _records(source, path, *_checked(source, path, size)[::2])),
                          file_size=size, sources=[source], trust=trust,
                          pickle_imports=_imports_if_read_as_pickle(path, size, source))
    metadata = _metadata_if_valid(path) if isinstance(source, FileSource) else None
    if metadata is not None:
        # the safetensors library has checked the header (in Rust, a million tensors in about a
        # second): the records are made when something lists them, never for `scan`
        root: Any = LazyRoot(lambda: _records(source, path, *_library_checked(source, path, size)))
    else:
        tensors, metadata, data_start = _checked(source, path, size)
        root = _records(source, path, tensors, data_start)
    return Checkpoint(path, "safetensors", root, file_size=size, sources=[source], metadata=metadata, trust=trust,
                      pickle_imports=_imports_if_read_as_pickle(path, size, source))


def _checked(source: FileSource, path: str, size: int) -> tuple[dict[str, Any], dict[str, str], int]:
    header, data_start = read_header(source, size)
    tensors, metadata = parse_tensors(path, header, data_start, size)
    return tensors, metadata, data_start


def _library_checked(source: FileSource, path: str, size: int) -> tuple[dict[str, Any], int]:
    """The tensors of a header the safetensors library has validated, without checking it again
    (ckptview's own checks cost 5 s on a million tensors); a dtype torch lacks takes the full path."""
    header, data_start = read_header(source, size)
    try:
        tensors = {name: (SAFETENSORS_DTYPES[spec["dtype"]], tuple(spec["shape"]), *spec["data_offsets"])
                   for name, spec in header.items() if name != "__metadata__"}
    except KeyError:
        tensors, _ = parse_tensors(path, header, data_start, size)
    return tensors, data_start


def _metadata_if_valid(path: str) -> dict[str, str] | None:
    """The header's metadata when the safetensors library accepts the file, else None (ckptview's own
    checks then say what is wrong, or accept what the library is stricter about)."""
    try:
        from safetensors import safe_open

        with safe_open(path, framework="numpy") as checked:
            return dict(checked.metadata() or {})
    except Exception:  # noqa: BLE001 - SafetensorError, or a dtype this safetensors does not know
        return None


def _records(source: FileSource, path: str, tensors: dict[str, Any], data_start: int) -> dict[str, TensorInfo]:
    root: dict[str, TensorInfo] = {}
    key_prefix = os.path.basename(path) + ":"
    for name, (dtype, shape, begin, end) in sorted(tensors.items(), key=lambda item: item[1][2]):
        storage = Storage(key=key_prefix + name, source=source, offset=data_start + begin, nbytes=end - begin,
                          location="cpu")
        root[name] = TensorInfo(shape=shape, dtype=dtype, storage=storage, stride=contiguous_stride(shape))
    return root


def _imports_if_read_as_pickle(path: str, size: int, source: FileSource) -> list[PickleImport]:
    """
    torch.load picks safetensors by the file name; under any other name it unpickles the bytes. When
    the header length happens to start like a pickle (0x80 0x02..0x05), scan that reading too: what
    it would import is reported, so `scan` never calls such a file safe.
    """
    if not isinstance(source, FileSource):  # torch.load takes no URL
        return []
    head = source.read(0, 2)
    if not (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
        return []
    from ckptview.readers.torch_pickle import read_pickle_stream

    try:
        with read_pickle_stream(path, size, trust=False) as as_pickle:
            return list(as_pickle.pickle_imports)
    except CkptviewError as exc:  # damaged as a pickle, but what it named before failing torch imports too
        return list(getattr(exc, "named_globals", []))


