"""
Checks on the bytes behind an HDF5 file's text, made before h5py reads any attribute.

Every Keras name and config is a variable-length string: its attribute holds, per element, a
reference (its length, a global heap collection's address, an object index), and the object's bytes
live in that collection. The HDF5 library trusts both: in fuzzed copies of the fixtures, a damaged
collection made an attribute read loop forever, and a damaged reference's length made the library
allocate up to 4 GB before it failed. So, over the file's bytes:

- each collection (its `GCOL` signature, version 1, a size inside the file) must hold objects whose
  sizes stay inside it, with distinct indices no larger than its object count allows;
- each variable-length element of each attribute in the objects' headers (HDF5's version 1 and 2
  object headers, attributes kept in the header: what h5py writes unless told otherwise) may claim
  more than `_HARMLESS_ALLOCATION` bytes only from an object that holds them;
- elsewhere (dataset values, attributes kept in a dense-storage heap), a reference is found by its
  collection's address and held to the same rule.

Addresses are 8 bytes, lengths 4 (what HDF5 writes by default and the only sizes h5py creates).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Iterator
from typing import Any

from ckptview.errors import CorruptCheckpointError

_GCOL_HEADER = 16       # "GCOL", version 1, 3 reserved bytes, the collection's size
_GCOL_MIN_SIZE = 4096   # HDF5 never writes a smaller collection (H5HG_MINSIZE)
_GCOL_OBJECT_HEADER = 16  # index, reference count, reserved, size
_REFERENCE = struct.Struct("<IQI")  # a variable-length element on disk: length, collection address, object index

# What a damaged reference may make the HDF5 library allocate before it fails; fuzzed ones claimed 0.5-4 GB.
_HARMLESS_ALLOCATION = 256 << 20

_CONTINUATION, _ATTRIBUTE = 0x0010, 0x000C
_VARIABLE_LENGTH = 9  # the datatype class


def check_hdf5_text(path: str, data: Any, start: int, end: int, *, data_extents: Iterable[tuple[int, int]] = (),
                    object_headers: Iterable[int] = ()) -> None:
    """
    Refuse an HDF5 file (`data[start:end]`) whose global heaps or variable-length references do
    not add up, in one line, before h5py reads an attribute.

    Args:
        data_extents: absolute byte ranges known to hold dataset values, where no collection or
            reference is searched for (the weights are nearly all of a file: a 508 MB file costs
            0.03 s instead of 0.7 s).
        object_headers: the addresses (relative to `start`) of the objects' headers whose
            attributes are checked element by element.

    Raises:
        CorruptCheckpointError: what is damaged, at which byte.
    """
    gaps, cursor = [], start
    for first, last in sorted(data_extents):
        if first > cursor:
            gaps.append((cursor, min(first, end)))
        cursor = max(cursor, last)
    gaps.append((cursor, end))
    collections: dict[int, dict[int, int]] = {}
    for gap_start, gap_end in gaps:
        pos = data.find(b"GCOL", gap_start, gap_end)
        while pos >= 0:
            if pos + _GCOL_HEADER <= end and data[pos + 4:pos + 8] == b"\x01\x00\x00\x00":
                (size,) = struct.unpack_from("<Q", data, pos + 8)
                if _GCOL_MIN_SIZE <= size <= end - pos:
                    collections[pos - start] = _check_collection(path, data, pos, pos + size, start)
            pos = data.find(b"GCOL", pos + 4, gap_end)
    walk = _HeaderWalk(path, data, start, end)
    for address in object_headers:
        for pos, item_size in _attribute_elements(data, walk.messages(address, _ATTRIBUTE)):
            length, collection, index = _REFERENCE.unpack_from(data, pos)
            held = collections.get(collection, {}).get(index)
            if length * item_size > _HARMLESS_ALLOCATION and (held is None or length * item_size > held):
                raise _greedy_reference(path, pos - start, length * item_size, held)
    for gap_start, gap_end in gaps:
        for collection, objects in collections.items():
            # the address alone also occurs in other structures (a virtual dataset's mapping), after bytes that are
            # no length: refused only where the index names one of the collection's objects and the length exceeds it
            needle = struct.pack("<Q", collection)
            pos = data.find(needle, gap_start + 4, gap_end - 4)
            while pos >= 0:
                length, _, index = _REFERENCE.unpack_from(data, pos - 4)
                if length > _HARMLESS_ALLOCATION and length > objects.get(index, length):
                    raise _greedy_reference(path, pos - 4 - start, length, objects[index])
                pos = data.find(needle, pos + 1, gap_end - 4)


def _greedy_reference(path: str, offset: int, claimed: int, held: int | None) -> CorruptCheckpointError:
    target = f"an HDF5 heap object that holds {held:,}" if held is not None else "an HDF5 heap object that is not there"
    return CorruptCheckpointError(path, f"a variable-length value at byte {offset:,} claims {claimed:,} bytes of "
                                        f"{target}: the file is damaged, and the HDF5 library would allocate that "
                                        "much reading it. Get the original file.")


def _check_collection(path: str, data: Any, start: int, end: int, file_start: int) -> dict[int, int]:
    """The collection's objects, index -> size in bytes, once they add up."""
    pos, seen = start + _GCOL_HEADER, {}
    while pos + _GCOL_OBJECT_HEADER <= end:
        index, _, _, length = struct.unpack_from("<HHIQ", data, pos)
        if index == 0:  # the free-space object: exactly the rest of the collection
            if length != end - pos:
                raise _damaged_heap(path, start - file_start)
            break
        if index in seen or length > end - pos - _GCOL_OBJECT_HEADER:
            raise _damaged_heap(path, start - file_start)
        seen[index] = length
        pos += _GCOL_OBJECT_HEADER + -(-length // 8) * 8
    else:  # a full collection: its objects end within its last 16 bytes
        if pos > end:
            raise _damaged_heap(path, start - file_start)
    if seen and max(seen) > 2 * len(seen) + 16:
        raise _damaged_heap(path, start - file_start)
    return seen


def _damaged_heap(path: str, offset: int) -> CorruptCheckpointError:
    return CorruptCheckpointError(path, f"the HDF5 global heap at byte {offset:,} (where the file keeps its names and "
                                        "configs) is damaged: its objects' sizes or numbers do not add up, and the "
                                        "HDF5 library can hang or exhaust memory reading it. Get the original file.")


def _attribute_elements(data: Any, attributes: Iterable[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """
    (position, bytes per unit of length) of each variable-length element of the attribute messages
    whose bodies are `data[start:end]` for each (start, end) in `attributes`. The layouts are the
    HDF5 file format specification's (the attribute, datatype and dataspace messages); what does not
    parse is skipped, and the HDF5 library refuses it itself.
    """
    for body, body_end in attributes:
        version = data[body]
        if version not in (1, 2, 3) or body_end - body < 9:
            continue
        flags = data[body + 1] if version > 1 else 0
        name_size, type_size, space_size = struct.unpack_from("<HHH", data, body + 2)
        pad = 8 if version == 1 else 1  # version 1 aligns each part to 8 bytes
        datatype = body + 8 + (version == 3) + -(-name_size // pad) * pad  # version 3 adds the name's encoding
        dataspace = datatype + -(-type_size // pad) * pad
        values = dataspace + -(-space_size // pad) * pad
        # flags 0x03: a shared datatype or dataspace, kept in another message; a datatype takes 8 bytes at least
        if flags & 0x03 or values > body_end or datatype + 8 > dataspace or data[datatype] & 0x0F != _VARIABLE_LENGTH:
            continue
        is_string = data[datatype + 1] & 0x0F == 1
        # a sequence's base type follows the 8-byte type header; its size is 4 bytes in
        item_size = struct.unpack_from("<I", data, datatype + 12)[0] if not is_string and datatype + 16 <= values else 1
        count = min(_element_count(data, dataspace, values), (body_end - values) // _REFERENCE.size)
        for element in range(count):
            yield values + element * _REFERENCE.size, max(item_size, 1)


def _element_count(data: Any, dataspace: int, dataspace_end: int) -> int:
    if dataspace + 4 > dataspace_end:
        return 0
    version, rank = data[dataspace], data[dataspace + 1]
    dims = dataspace + (8 if version == 1 else 4)
    if version == 2 and data[dataspace + 3] == 2:  # a null dataspace: no elements
        return 0
    if dims + 8 * rank > dataspace_end:
        return 0
    return math.prod(struct.unpack_from(f"<{rank}Q", data, dims))


class _HeaderWalk:
    """
    The messages of the file's object headers (version 1, and version 2's "OHDR"), continuation
    blocks included. The blocks of a well-formed file are disjoint, so together they span at most the
    file: a crafted one whose blocks overlap or repeat (one continuation chain shared by thousands of
    headers) is refused once its blocks span more, instead of being walked again and again.
    """

    def __init__(self, path: str, data: Any, start: int, end: int) -> None:
        self.path, self.data, self.start, self.end = path, data, start, end
        self.walked: set[int] = set()
        self.bytes_left = end - start

    def messages(self, header: int, wanted: int) -> Iterator[tuple[int, int]]:
        """(start, end) of the bodies of the messages of type `wanted` in the header at `header`."""
        data, start, end = self.data, self.start, self.end
        pos = start + header
        if pos + 16 > end:
            return
        if data[pos:pos + 4] == b"OHDR":  # version 2: "OHDR", version, flags, optional fields, the first block's size
            flags = data[pos + 5]
            pos += 6 + (16 if flags & 0x20 else 0) + (4 if flags & 0x10 else 0)
            width = 1 << (flags & 0x03)
            first_size = int.from_bytes(data[pos:pos + width], "little")
            blocks = [(pos + width, pos + width + first_size)]
            entry, prefix = struct.Struct("<BHB"), 4 + (2 if flags & 0x04 else 0)  # + creation order when tracked
        elif data[pos] == 1:  # version 1: version, reserved, message count, reference count, the first block's size
            (first_size,) = struct.unpack_from("<I", data, pos + 8)
            blocks = [(pos + 16, pos + 16 + first_size)]
            entry, prefix = struct.Struct("<HHB"), 8
        else:
            return
        while blocks:
            block, block_end = blocks.pop()
            if block in self.walked or block < start or block_end > end:
                continue
            self.walked.add(block)
            self.bytes_left -= block_end - block
            if self.bytes_left < 0:
                raise CorruptCheckpointError(self.path, "the HDF5 file's object headers overlap or repeat (their "
                                                        "blocks span more bytes than the file holds): it is damaged "
                                                        "or crafted. Get the original file.")
            while block + prefix <= block_end:
                kind, size, _ = entry.unpack_from(data, block)
                body, body_end = block + prefix, block + prefix + size
                if body_end > block_end:
                    break
                if kind == _CONTINUATION and size >= 16:
                    address, length = struct.unpack_from("<QQ", data, body)
                    if prefix == 8:
                        blocks.append((start + address, start + address + length))
                    elif data[start + address:start + address + 4] == b"OCHK":  # "OCHK", messages, a checksum
                        blocks.append((start + address + 4, start + address + length - 4))
                elif kind == wanted and size:
                    yield body, body_end
                block = body_end
