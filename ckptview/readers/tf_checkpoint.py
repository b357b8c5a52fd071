"""
TensorFlow checkpoints (`tf.train.Checkpoint`, `Saver`, a SavedModel's `variables/`): a tensor
bundle, read without TensorFlow.

`<prefix>.index` is a sorted string table (LevelDB's table format: data blocks of prefix-compressed
key/value entries, an index block, a 48-byte footer ending in a magic number). The entry under the
empty key is a `BundleHeaderProto` (shard count, endianness); every other key is a tensor's
`BundleEntryProto` (dtype, shape, shard, offset, size, crc32c), decoded here from the protobuf wire
format by hand. The bytes live in `<prefix>.data-NNNNN-of-MMMMM` and are read in place when a
tensor is loaded; a full read is checked against the entry's crc32c.

Names: TensorFlow 2 keys follow the object graph (`model/layer_with_weights-0/kernel/.ATTRIBUTES/
VARIABLE_VALUE`; Keras 3 even saves a model's kernels under `optimizer/_trainable_variables/0`).
The graph itself is stored in the bundle (`_CHECKPOINTABLE_OBJECT_GRAPH`, a `TrackableObjectGraph`)
and gives each variable its `full_name` (`dense/kernel`), which is the name shown (`dense.kernel`);
the raw key stays in `details["checkpoint_keys"]`. Variables reachable only through the optimizer
are its slots, shaped as the training section.
"""

from __future__ import annotations

import math
import os
import re
import struct
import threading
from collections.abc import Iterator
from typing import Any

from ckptview.errors import CorruptCheckpointError, ShardError, TruncatedCheckpointError, printable
from ckptview.readers.model import (
    Checkpoint,
    FileSource,
    Storage,
    TensorInfo,
    contiguous_stride,
    dotted_name,
    walk_tensors,
)
from ckptview.readers.paths import resolve_inside

TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_BYTES = 48
OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
ATTRIBUTE_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
SLOT_MARKER = "/.OPTIMIZER_SLOT/"
SAVE_COUNTER_KEY = "save_counter" + ATTRIBUTE_SUFFIX  # tf.train.Checkpoint.save's own count, not the model's
_MAX_INDEX_BYTES = 1 << 30

# tensorflow/core/framework/types.proto DataType -> torch dtype name
TF_DTYPES: dict[int, str] = {
    1: "float32", 2: "float64", 3: "int32", 4: "uint8", 5: "int16", 6: "int8", 9: "int64", 10: "bool",
    8: "complex64", 14: "bfloat16", 17: "uint16", 18: "complex128", 19: "float16", 22: "uint32", 23: "uint64",
    24: "float8_e5m2", 25: "float8_e4m3fn",
}
TF_TYPE_NAMES = {7: "string", 11: "qint8", 12: "quint8", 13: "qint32", 15: "qint16", 16: "quint16", 20: "resource",
                 21: "variant"}


def looks_like_tensor_bundle_index(head: bytes, size: int, path: str) -> bool:
    """The first entry of the first block is the header under the empty key (shared 0, unshared 0),
    and the table's footer ends in LevelDB's magic number."""
    if size < FOOTER_BYTES or head[:2] != b"\x00\x00" or len(head) < 4:
        return False
    try:
        with open(path, "rb") as stream:
            stream.seek(size - 8)
            return struct.unpack("<Q", stream.read(8))[0] == TABLE_MAGIC
    except OSError:  # a URL: the head decides alone (registry)
        return False


def _varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise IndexError(pos)
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) of a protobuf message: varints as ints, length-delimited as bytes."""
    pos, end = 0, len(buf)
    while pos < end:
        tag, pos = _varint(buf, pos, end)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos, end)
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            if pos + length > end:
                raise IndexError(pos)
            value, pos = buf[pos:pos + length], pos + length
        elif wire == 5:
            if pos + 4 > end:
                raise IndexError(pos)
            value, pos = struct.unpack_from("<I", buf, pos)[0], pos + 4
        elif wire == 1:
            if pos + 8 > end:
                raise IndexError(pos)
            value, pos = struct.unpack_from("<Q", buf, pos)[0], pos + 8
        elif wire == 3:
            # a group (proto2's nesting, deprecated): protobuf keeps one in a field it does not know as
            # an unknown field and reads on, so it is stepped over here, not refused
            start = pos
            pos = _group_end(buf, pos, end, number)
            value = buf[start:pos]
        else:
            raise ValueError(f"wire type {wire}")
        yield number, wire, value


def _group_end(buf: bytes, pos: int, end: int, number: int) -> int:
    """Where the group opened just before `pos` ends, past its end tag (groups nest; no recursion)."""
    open_groups = [number]
    while open_groups:
        tag, pos = _varint(buf, pos, end)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            _, pos = _varint(buf, pos, end)
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            pos += length
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        elif wire == 3:
            open_groups.append(field)
        elif wire != 4 or open_groups.pop() != field:
            raise ValueError(f"wire type {wire} in a group")
        if pos > end:
            raise IndexError(pos)
    return pos


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


class _Table:
    """The key/value entries of a LevelDB-format table file, in key order."""

    def __init__(self, path: str, data: bytes) -> None:
        self.path, self.data = path, data

    def corrupt(self, what: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(self.path, f"the checkpoint index is damaged ({what}): it was cut off or "
                                                 "overwritten. Copy the checkpoint again, with its .index and .data "
                                                 "files from the same save.")

    def entries(self) -> Iterator[tuple[str, bytes]]:
        data = self.data
        if len(data) < FOOTER_BYTES or struct.unpack_from("<Q", data, len(data) - 8)[0] != TABLE_MAGIC:
            raise TruncatedCheckpointError(self.path, "the checkpoint index does not end with the table footer: it "
                                                      "was cut off. Copy the .index file again.")
        footer = len(data) - FOOTER_BYTES
        try:
            _, pos = _varint(data, footer, len(data))  # metaindex offset
            _, pos = _varint(data, pos, len(data))     # metaindex size
            index_offset, pos = _varint(data, pos, len(data))
            index_size, pos = _varint(data, pos, len(data))
        except IndexError:
            raise self.corrupt("its footer's block handles do not decode") from None
        for _, handle in self.block(index_offset, index_size):
            try:
                offset, pos = _varint(handle, 0, len(handle))
                size, _ = _varint(handle, pos, len(handle))
            except IndexError:
                raise self.corrupt("an index entry's block handle does not decode") from None
            yield from self.block(offset, size)

    def block(self, offset: int, size: int) -> Iterator[tuple[str, bytes]]:
        if offset + size + 5 > len(self.data) - FOOTER_BYTES:
            raise self.corrupt(f"a block at bytes {offset:,}..{offset + size:,} runs past the table's end")
        if self.data[offset + size] != 0:
            raise self.corrupt(f"a block uses compression type {self.data[offset + size]}; TensorFlow writes "
                               "checkpoint indexes uncompressed")
        block = self.data[offset:offset + size]
        if size < 4:
            raise self.corrupt("a block is shorter than its restart count")
        (restarts,) = struct.unpack_from("<I", block, size - 4)
        limit = size - 4 - 4 * restarts
        if limit < 0:
            raise self.corrupt(f"a block claims {restarts:,} restart points, more than it holds")
        pos, key = 0, b""
        try:
            while pos < limit:
                shared, pos = _varint(block, pos, limit)
                unshared, pos = _varint(block, pos, limit)
                length, pos = _varint(block, pos, limit)
                if shared > len(key) or pos + unshared + length > limit:
                    raise IndexError(pos)
                key = key[:shared] + block[pos:pos + unshared]
                pos += unshared
                # surrogateescape: a sliced variable's keys carry binary slice specs that must round-trip
                yield key.decode("utf-8", "surrogateescape"), block[pos:pos + length]
                pos += length
        except IndexError:
            raise self.corrupt("an entry's lengths run past its block") from None


def _entry(path: str, key: str, value: bytes) -> dict[str, Any]:
    """A `BundleEntryProto` as a dict: dtype, shape, shard_id, offset, size, crc32c, slices."""
    entry: dict[str, Any] = {"dtype": 0, "shape": [], "shard_id": 0, "offset": 0, "size": 0, "crc32c": None,
                             "slices": [], "unknown_rank": False}
    try:
        for number, wire, field in _fields(value):
            if number == 1 and wire == 0:
                entry["dtype"] = field
            elif number == 2 and wire == 2:
                for dim_number, dim_wire, dim in _fields(field):
                    if dim_number == 2 and dim_wire == 2:
                        size = next((_signed(v) for n, w, v in _fields(dim) if n == 1 and w == 0), 0)
                        entry["shape"].append(size)
                    elif dim_number == 3 and dim_wire == 0:
                        entry["unknown_rank"] = bool(dim)
            elif number in (3, 4, 5) and wire == 0:
                entry[{3: "shard_id", 4: "offset", 5: "size"}[number]] = _signed(field)
            elif number == 6 and wire == 5:
                entry["crc32c"] = field
            elif number == 7 and wire == 2:  # TensorSliceProto: one Extent (start, length) per dimension
                extents = []
                for extent_number, extent_wire, extent in _fields(field):
                    if extent_number == 1 and extent_wire == 2:
                        parts = {n: _signed(v) for n, w, v in _fields(extent) if w == 0}
                        extents.append((parts.get(1, 0), parts.get(2, -1)))
                entry["slices"].append(tuple(extents))
    except (IndexError, ValueError):
        raise CorruptCheckpointError(path, f"the index entry of {printable(key)!r} does not decode: the index is "
                                           "damaged. Copy the checkpoint again.") from None
    return entry


def _slice_variable(key: str) -> str | None:
    """The variable a slice's key belongs to: TensorFlow encodes it with OrderedCode as a 0, the
    name (0x00 escaped as 00 ff, 0xff as ff 00, ended by 00 01), then the slice's extents."""
    raw = key.encode("utf-8", "surrogateescape")
    if not raw.startswith(b"\x00"):
        return None
    out, pos = bytearray(), 1
    while pos + 1 < len(raw):
        pair = raw[pos:pos + 2]
        if pair == b"\x00\x01":
            return out.decode("utf-8", "surrogateescape")
        if pair in (b"\x00\xff", b"\xff\x00"):
            out.append(pair[0])
            pos += 2
            continue
        out.append(raw[pos])
        pos += 1
    return None


def _unmask(masked: int) -> int:
    rot = (masked - 0xA282EAD8) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


class _CheckedRange:
    """
    One tensor's bytes in its data shard, checked against the index's crc32c when they are read
    from first byte to last in order (`load()`, or `iter_chunks` run to the end): a mismatch is a
    `CorruptCheckpointError` naming the tensor. Reads of a part only are not checked.
    """

    def __init__(self, source: FileSource, start: int, size: int, expected: int | None, key: str, path: str) -> None:
        self.path = source.path
        self._source, self._start, self._size = source, start, size
        self._expected, self._key, self._index = expected, key, path
        self._lock = threading.Lock()
        self._next = start
        self._crc: int | None = None

    def read_into(self, buffer: memoryview, offset: int) -> None:
        self._source.read_into(buffer, offset)
        if self._expected is None:
            return
        import google_crc32c

        with self._lock:
            if offset == self._start:
                self._crc, self._next = 0, self._start
            if self._crc is None or offset != self._next:
                self._crc = None
                return
            # google_crc32c takes bytes only: the copy costs less than the read (hardware CRC, ~8 GB/s)
            self._crc = google_crc32c.extend(self._crc, bytes(buffer))
            self._next += len(buffer)
            if self._next == self._start + self._size:
                actual, self._crc = self._crc, None
                if actual != self._expected:
                    raise CorruptCheckpointError(self._index, f"tensor {printable(self._key)!r} fails its crc32c check "
                                                              f"(the index says {self._expected:08x}, its bytes in "
                                                              f"{os.path.basename(self.path)} give {actual:08x}): the "
                                                              "data file is damaged or from another save. Copy the "
                                                              "checkpoint again.")

    def read(self, offset: int, size: int) -> bytes:
        buffer = bytearray(size)
        self.read_into(memoryview(buffer), offset)
        return bytes(buffer)

    def close(self) -> None:
        pass  # the shard's FileSource is the checkpoint's to close


def read_tf_index(path: str, size: int, *, trust: bool) -> Checkpoint:
    """The registry's entry point for a `.index` file."""
    from ckptview.readers.keras_file import local_only

    local_only(path, "a TensorFlow checkpoint")
    bundle = TensorBundle(path, size)
    return bundle.checkpoint(trust)


def read_checkpoint_state(path: str, size: int, *, trust: bool) -> Checkpoint:
    """The registry's entry point for a `checkpoint` state file: opens its latest checkpoint, lists the others."""
    from ckptview.readers.keras_file import local_only

    local_only(path, "a TensorFlow checkpoint")
    latest, others = parse_checkpoint_state(path, size)
    index = _state_prefix(path, latest) + ".index"
    if not os.path.isfile(index):
        raise ShardError(path, f"its latest checkpoint {printable(latest)!r} has no {os.path.basename(index)} beside "
                               "it: copy the checkpoint files with the state file.")
    ckpt = TensorBundle(index, os.path.getsize(index)).checkpoint(trust)
    ckpt.details["checkpoint_state"] = {"latest": latest, "all": others}
    return ckpt


def parse_checkpoint_state(path: str, size: int) -> tuple[str, list[str]]:
    if size > 1 << 20:
        raise CorruptCheckpointError(path, "a checkpoint state file of over 1 MB: it is not one TensorFlow wrote. "
                                           "Open the checkpoint's .index file instead.")
    with open(path, encoding="utf-8", errors="replace") as stream:
        text = stream.read()
    latest = re.search(r'^model_checkpoint_path:\s*"((?:[^"\\]|\\.)*)"', text, re.MULTILINE)
    if latest is None:
        raise CorruptCheckpointError(path, "the checkpoint state file names no model_checkpoint_path: open the "
                                           "checkpoint's .index file instead.")
    others = re.findall(r'^all_model_checkpoint_paths:\s*"((?:[^"\\]|\\.)*)"', text, re.MULTILINE)
    return latest.group(1), others


def _state_prefix(path: str, name: str) -> str:
    from ckptview.readers.paths import resolve_inside

    folder = os.path.dirname(os.path.abspath(path))
    # TF1's Saver writes absolute paths, stale once the folder is copied: the checkpoint is read from
    # beside the state file, by its file name
    if os.path.isabs(name):
        name = os.path.basename(name)
    # the prefix names files that do not exist as such (ckpt-2 -> ckpt-2.index); resolve its .index
    return resolve_inside(folder, name + ".index", named_by=path, what="the checkpoint")[: -len(".index")]


class TensorBundle:
    """A tensor bundle's index, read and checked against its data shards."""

    def __init__(self, index_path: str, size: int) -> None:
        self.path = index_path
        if size > _MAX_INDEX_BYTES:
            raise CorruptCheckpointError(index_path, "a checkpoint index of over 1 GB: it is not one TensorFlow "
                                                     "wrote. Copy the checkpoint again.")
        with open(index_path, "rb") as stream:
            self.data = stream.read()
        self.size = size
        self.entries = dict(_Table(index_path, self.data).entries())
        if "" not in self.entries:
            raise CorruptCheckpointError(index_path, "the checkpoint index has no bundle header: it is damaged or not "
                                                     "a TensorFlow checkpoint index. Copy the checkpoint again.")
        self.num_shards, self.big_endian = 1, False
        try:
            for number, wire, value in _fields(self.entries[""]):
                if number == 1 and wire == 0:
                    self.num_shards = value
                elif number == 2 and wire == 0:
                    self.big_endian = value == 1
        except (IndexError, ValueError):
            raise CorruptCheckpointError(index_path, "the checkpoint's bundle header does not decode: the index is "
                                                     "damaged. Copy the checkpoint again.") from None
        if not 1 <= self.num_shards <= 100_000:
            raise CorruptCheckpointError(index_path, f"the bundle header claims {self.num_shards:,} data shards: the "
                                                     "index is damaged. Copy the checkpoint again.")
        prefix = index_path.removesuffix(".index")
        self.shards = [f"{prefix}.data-{i:05d}-of-{self.num_shards:05d}" for i in range(self.num_shards)]
        self.sources: list[FileSource] = []
        self.shard_sizes: list[int] = []
        folder = os.path.dirname(os.path.abspath(index_path))
        for shard in self.shards:
            if not os.path.lexists(shard):
                raise ShardError(index_path, f"data shard {os.path.basename(shard)} is missing from {folder}: copy "
                                             f"every {os.path.basename(prefix)}.data-* file beside the index.")
            # a shard that is a symlink leading out of the folder would make ckptview read any file
            resolved = resolve_inside(folder, os.path.basename(shard), named_by=index_path, what="the data shard")
            try:
                self.shard_sizes.append(os.path.getsize(resolved))
            except OSError:
                raise ShardError(index_path, f"data shard {os.path.basename(shard)} in {folder} cannot be read: copy "
                                             "it again.") from None
            self.sources.append(FileSource(resolved))
        self.ranges: list[tuple[int, int, int, str]] = []  # (shard, offset, end, key) of each tensor read

    def tensors(self) -> Iterator[tuple[str, dict[str, Any], TensorInfo | None]]:
        """(key, entry, TensorInfo or None for strings and other untensorable entries) in key order."""
        pieces: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        for key, value in self.entries.items():
            name = _slice_variable(key)
            if name is not None:
                pieces.setdefault(name, []).append((key, _entry(self.path, key, value)))
        for key, value in self.entries.items():
            if key == "" or key.startswith("\x00"):
                continue
            entry = _entry(self.path, key, value)
            if entry["slices"]:
                yield key, entry, self.sliced(key, entry, pieces.get(key, []))
            else:
                yield key, entry, self.tensor(key, entry)

    def sliced(self, key: str, entry: dict[str, Any], pieces: list[tuple[str, dict[str, Any]]]) -> TensorInfo | None:
        """A variable saved in slices (a sharding policy splits large ones): its pieces, in the order of
        their keys (which encode each slice's extents, in increasing order), assembled on load."""
        dtype = TF_DTYPES.get(entry["dtype"])
        shape = tuple(entry["shape"])
        name = printable(key)
        extents = sorted(entry["slices"])
        if len(pieces) != len(extents):
            raise CorruptCheckpointError(self.path, f"variable {name!r} is saved in {len(extents)} slices but the "
                                                    f"index holds {len(pieces)}: the index is damaged. Copy the "
                                                    "checkpoint again.")
        if dtype is None or any(len(extent) != len(shape) for extent in extents):
            return None
        parts = []
        for (piece_key, piece), extent in zip(pieces, extents):
            region = tuple(slice(start, start + length) if length >= 0 else slice(0, size)
                           for (start, length), size in zip(extent, shape))
            wanted = tuple(r.stop - r.start for r in region)
            if tuple(piece["shape"]) != wanted or any(r.stop > size for r, size in zip(region, shape)):
                raise CorruptCheckpointError(self.path, f"a slice of {name!r} is {piece['shape']} but its extent "
                                                        f"in {list(shape)} needs {list(wanted)}: the index is "
                                                        "damaged. Copy the checkpoint again.")
            info = self.tensor(key, piece)
            assert info is not None
            parts.append((region, info))
        if sum(math.prod(info.shape) for _, info in parts) != math.prod(shape):
            raise CorruptCheckpointError(self.path, f"the slices of {name!r} do not cover its shape {list(shape)}: "
                                                    "the index is damaged. Copy the checkpoint again.")

        def decode() -> Any:
            from ckptview.lazy import torch
            from ckptview.readers.model import load_tensor

            whole = torch.empty(shape, dtype=parts[0][1].torch_dtype)
            for region, info in parts:
                whole[region] = load_tensor(info, key)
            return whole

        return TensorInfo(shape=shape, dtype=dtype, storage=None, stride=contiguous_stride(shape), layout="encoded",
                          encoding="slices", encoding_params={"slices": [list(extent) for extent in extents]},
                          stored_nbytes=sum(info.nbytes for _, info in parts), decode=decode)

    def tensor(self, key: str, entry: dict[str, Any]) -> TensorInfo | None:
        shape = tuple(entry["shape"])
        dtype = TF_DTYPES.get(entry["dtype"])
        name = printable(key)
        if any(d < 0 for d in shape) or entry["offset"] < 0 or entry["size"] < 0:
            raise CorruptCheckpointError(self.path, f"the index entry of {name!r} has a negative dimension, offset or "
                                                    "size: the index is damaged. Copy the checkpoint again.")
        shard = entry["shard_id"]
        if not 0 <= shard < self.num_shards:
            raise CorruptCheckpointError(self.path, f"tensor {name!r} is in shard {shard}, but the checkpoint has "
                                                    f"{self.num_shards}: the index is damaged. Copy the checkpoint "
                                                    "again.")
        end = entry["offset"] + entry["size"]
        if end > self.shard_sizes[shard]:
            raise CorruptCheckpointError(self.path, f"tensor {name!r} reads bytes {entry['offset']:,}..{end:,} of "
                                                    f"{os.path.basename(self.shards[shard])}, which has "
                                                    f"{self.shard_sizes[shard]:,}: the data file is cut off or from "
                                                    "another save. Copy the checkpoint again.")
        if dtype is None or entry["unknown_rank"]:
            return None
        nbytes = math.prod(shape) * _itemsize(dtype)
        if nbytes != entry["size"]:
            raise CorruptCheckpointError(self.path, f"tensor {name!r} is {list(shape)} {dtype} ({nbytes:,} bytes) but "
                                                    f"its index entry says {entry['size']:,} bytes: the index is "
                                                    "damaged. Copy the checkpoint again.")
        if nbytes:
            self.ranges.append((shard, entry["offset"], end, key))
        expected = _unmask(entry["crc32c"]) if entry["crc32c"] is not None else None
        source = _CheckedRange(self.sources[shard], entry["offset"], entry["size"], expected, key, self.path)
        storage = Storage(key=key, source=source, offset=entry["offset"], nbytes=entry["size"],  # type: ignore[arg-type]
                          location="cpu", byteorder="big" if self.big_endian else "little")
        return TensorInfo(shape=shape, dtype=dtype, storage=storage, stride=contiguous_stride(shape))

    def refuse_overlaps(self) -> None:
        """
        Tensors whose bytes overlap in a data shard: TensorFlow writes each once, one after another. A
        crafted index could have ten thousand entries read one 100 MB range, and statistics would read
        a terabyte for a checkpoint of 100 MB.
        """
        self.ranges.sort()
        for (shard, _, end, first), (next_shard, start, _, second) in zip(self.ranges, self.ranges[1:]):
            if shard == next_shard and start < end:
                raise CorruptCheckpointError(self.path, f"tensors {printable(first)!r} and {printable(second)!r} read "
                                                        "overlapping bytes of their data shard: TensorFlow writes "
                                                        "each tensor once, so the index is crafted or damaged. Copy "
                                                        "the checkpoint again.")

    def string_value(self, key: str) -> bytes | None:
        """A scalar string tensor's bytes (the object graph): TensorFlow stores the length as a varint,
        a checksum of the lengths, then the bytes."""
        if key not in self.entries:
            return None
        entry = _entry(self.path, key, self.entries[key])
        if entry["dtype"] != 7 or entry["shape"] or not 0 <= entry["shard_id"] < self.num_shards:
            return None
        if entry["offset"] + entry["size"] > self.shard_sizes[entry["shard_id"]]:
            raise CorruptCheckpointError(self.path, f"{key} runs past the end of its data file: the checkpoint is "
                                                    "cut off. Copy it again.")
        raw = self.sources[entry["shard_id"]].read(entry["offset"], entry["size"])
        try:
            length, pos = _varint(raw, 0, len(raw))
        except IndexError:
            return None
        pos += 4
        return raw[pos:pos + length] if pos + length <= len(raw) else None

    def checkpoint(self, trust: bool, *, format: str = "tf-checkpoint", details: dict[str, Any] | None = None,
                   pickle_imports: Any = (), path: str | None = None, extra_size: int = 0) -> Checkpoint:
        """The bundle as a Checkpoint; a SavedModel passes its own `path`, details and code found."""
        from ckptview.readers.keras_file import layer_roles, optimizer_state

        graph = _object_graph(self.path, self.string_value(OBJECT_GRAPH_KEY))
        listed = [(key, entry, info) for key, entry, info in self.tensors() if key != OBJECT_GRAPH_KEY]
        self.refuse_overlaps()
        full_names, optimizer_keys = _graph_names(graph)
        slot_names: dict[str, str] = {}
        if graph is None:
            slot_names = _tf1_slots([key for key, _, info in listed if info is not None])
            optimizer_keys = set(slot_names)
        names: dict[str, str] = {}
        used: set[str] = set()
        for key, _, _ in listed:
            readable = full_names.get(key) or key.removesuffix(ATTRIBUTE_SUFFIX)
            readable = re.sub(r":\d+$", "", readable).replace("/", ".")
            if readable in used:
                readable = key.removesuffix(ATTRIBUTE_SUFFIX).replace("/", ".")
            used.add(readable)
            names[key] = readable
        model: dict[str, TensorInfo] = {}
        slots: list[tuple[str, TensorInfo]] = []
        other: dict[str, Any] = {}
        bookkeeping: dict[str, TensorInfo] = {}
        for key, entry, info in listed:
            if info is None:
                other[names[key]] = {"dtype": TF_TYPE_NAMES.get(entry["dtype"], entry["dtype"]),
                                     "shape": entry["shape"]}
            elif key == SAVE_COUNTER_KEY:
                bookkeeping["save_counter"] = info
            elif SLOT_MARKER in key:
                # a legacy optimizer's slot, saved under its variable: <variable>/.OPTIMIZER_SLOT/<opt>/m/...
                variable, _, rest = key.partition(SLOT_MARKER)
                param = names.get(variable + ATTRIBUTE_SUFFIX, variable.replace("/", "."))
                slot = rest.removesuffix(ATTRIBUTE_SUFFIX).rpartition("/")[2]
                slots.append((f"optimizer/{param.replace('.', '/')}/{slot}", info))
            elif key in optimizer_keys:
                slots.append((slot_names.get(key) or full_names.get(key) or key.removesuffix(ATTRIBUTE_SUFFIX), info))
            else:
                model[names[key]] = info
        kinds = {name: (name.rpartition(".")[0], "", name.rpartition(".")[2]) for name in model}
        roles = layer_roles({name: info.shape for name, info in model.items()}, kinds)
        if slots or bookkeeping:
            root: Any = {"model": model, **bookkeeping}
            if slots:
                root["optimizer"] = optimizer_state(slots, list(model), None)
            layers = {**{f"model.{name}": role for name, role in roles.items()}, **roles}
        else:
            root, layers = model, roles
        key_of = {id(info): key for key, _, info in listed if info is not None}
        all_details = {
            "num_shards": self.num_shards, "data_files": [os.path.basename(s) for s in self.shards],
            "byteorder": "big" if self.big_endian else "little",
            # each tensor's name as listed -> the key TensorFlow saved it under
            "checkpoint_keys": {dotted_name(path): key_of[id(info)] for path, info in walk_tensors(root)},
            "object_graph": graph is not None,
            "not_tensors": other,
            **(details or {}),
        }
        return Checkpoint(path or self.path, format, root, file_size=self.size + sum(self.shard_sizes) + extra_size,
                          sources=self.sources,
                          trust=trust, details=all_details, layers=layers, pickle_imports=pickle_imports)


# TF1 optimizers' own variables, beside the slots they keep under each variable's name
_TF1_OPTIMIZER_VARIABLES = frozenset({"beta1_power", "beta2_power", "global_step"})


def _tf1_slots(keys: list[str]) -> dict[str, str]:
    """A name-based (TF1 `Saver`) checkpoint's optimizer variables: a slot is saved under the variable's
    own key (`dense/kernel/Adam`, `dense/kernel/Momentum`), so a key below another variable's is one.
    Given the `optimizer/<param>/<slot>` form the Keras optimizer shapes use."""
    present = set(keys)
    slots = {}
    for key in keys:
        parent, _, slot = key.rpartition("/")
        if parent in present:
            slots[key] = f"optimizer/{parent}/{slot}"
        elif key in _TF1_OPTIMIZER_VARIABLES:
            slots[key] = f"optimizer/{key}"
    return slots if any(name.count("/") > 1 for name in slots.values()) else {}


def _itemsize(dtype: str) -> int:
    from ckptview.readers.dtypes import itemsize

    return itemsize(dtype)


def _object_graph(path: str, raw: bytes | None) -> list[dict[str, Any]] | None:
    """`TrackableObjectGraph.nodes`: children (local name, node id) and attributes (full name, key)."""
    if raw is None:
        return None
    nodes = []
    try:
        for number, wire, node in _fields(raw):
            if number != 1 or wire != 2:
                continue
            children, attributes = [], []
            for field, field_wire, value in _fields(node):
                if field == 1 and field_wire == 2:
                    parts = {n: v for n, _, v in _fields(value)}
                    children.append((parts.get(2, b"").decode("utf-8", "replace"), parts.get(1, -1)))
                elif field == 2 and field_wire == 2:
                    parts = {n: v for n, _, v in _fields(value)}
                    attributes.append((parts.get(2, b"").decode("utf-8", "replace"),
                                       parts.get(3, b"").decode("utf-8", "replace")))
            nodes.append({"children": children, "attributes": attributes})
    except (IndexError, ValueError, AttributeError):
        raise CorruptCheckpointError(path, "the checkpoint's object graph does not decode: the data file is damaged. "
                                           "Copy the checkpoint again.") from None
    return nodes


def _graph_names(graph: list[dict[str, Any]] | None) -> tuple[dict[str, str], set[str]]:
    """Each checkpoint key's `full_name`, and the keys of variables reachable only through an optimizer."""
    if not graph:
        return {}, set()
    full_names = {key: full for node in graph for full, key in node["attributes"] if full and key}

    def reachable(starts: list[int]) -> set[int]:
        seen: set[int] = set()
        stack = list(starts)
        while stack:
            node = stack.pop()
            if node in seen or not 0 <= node < len(graph):
                continue
            seen.add(node)
            stack.extend(child for name, child in graph[node]["children"] if "optimizer" not in name.lower())
        return seen

    root_children = graph[0]["children"] if graph else []
    from_model = reachable([child for name, child in root_children if "optimizer" not in name.lower()])
    optimizer_keys = {key for index, node in enumerate(graph) if index not in from_model
                      for _, key in node["attributes"]
                      if any(key.startswith(name + "/") for name, _ in root_children if "optimizer" in name.lower())}
    return full_names, optimizer_keys
