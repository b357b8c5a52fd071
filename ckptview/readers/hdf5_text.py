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
- an object with more attributes than its header keeps (version 2 headers, h5py's `libver="latest"`)
  keeps them in a "dense storage" fractal heap, whose blocks are checksummed, so a fuzzed reference
  there fails HDF5's checksum first, but a crafted one with its checksum recomputed made h5py
  allocate 3.9 GB for a 7 KB file. Those attributes are found by name, wherever their message lies
  in the file, and held to the same rule; a heap that would keep them compressed is refused (h5py
  writes none; nothing in one could be found);
- elsewhere (dataset values), a reference is found by its collection's address and held to the
  same rule.

Addresses are 8 bytes, lengths 4 (what HDF5 writes by default and the only sizes h5py creates).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Collection, Iterable, Iterator
from typing import Any

from ckptview.errors import CorruptCheckpointError

_GCOL_HEADER = 16       # "GCOL", version 1, 3 reserved bytes, the collection's size
_GCOL_MIN_SIZE = 4096   # HDF5 never writes a smaller collection (H5HG_MINSIZE)
_GCOL_OBJECT_HEADER = 16  # index, reference count, reserved, size
_REFERENCE = struct.Struct("<IQI")  # a variable-length element on disk: length, collection address, object index

# What a damaged reference may make the HDF5 library allocate before it fails; fuzzed ones claimed 0.5-4 GB.
_HARMLESS_ALLOCATION = 256 << 20

_CONTINUATION, _ATTRIBUTE, _ATTRIBUTE_INFO = 0x0010, 0x000C, 0x0015
_UNDEFINED_ADDRESS = (1 << 64) - 1
# Attributes in dense storage are found by searching the whole file for their names, once per name: at
# most this many bytes searched (a few seconds), so a crafted file with thousands of names is refused.
_DENSE_SEARCH_BYTES = 16 << 30
_VARIABLE_LENGTH = 9  # the datatype class


def check_hdf5_text(path: str, data: Any, start: int, end: int, *, data_extents: Iterable[tuple[int, int]] = (),
                    object_headers: Iterable[int] = (),
                    dense_attribute_names: Callable[[int], Iterable[bytes]] | None = None) -> None:
    """
    Refuse an HDF5 file (`data[start:end]`) whose global heaps or variable-length references do
    not add up, in one line, before h5py reads an attribute.

    Args:
        data_extents: absolute byte ranges known to hold dataset values, where no collection or
            reference is searched for (the weights are nearly all of a file: a 508 MB file costs
            0.03 s instead of 0.7 s).
        object_headers: the addresses (relative to `start`) of the objects' headers whose
            attributes are checked element by element.
        dense_attribute_names: the names of the attributes of the object whose header is at the
            given address, asked for an object that keeps them in dense storage (h5py lists them
            from their messages without reading their values).

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
    dense_names: set[bytes] = set()
    for address in object_headers:
        in_header = []
        for kind, body, body_end in walk.messages(address, (_ATTRIBUTE, _ATTRIBUTE_INFO)):
            if kind == _ATTRIBUTE:
                in_header.append((body, body_end))
            elif _keeps_dense_attributes(path, data, start, end, body, body_end) and dense_attribute_names:
                dense_names.update(dense_attribute_names(address))
        _check_references(path, data, start, collections, _attribute_elements(data, in_header))
    if len(dense_names) * (end - start) > _DENSE_SEARCH_BYTES:
        raise CorruptCheckpointError(path, f"the HDF5 file keeps {len(dense_names):,} differently named attributes in "
                                           "dense storage, too many to check in a file this size (Keras keeps every "
                                           "attribute in its object's header). Get the original file.")
    for name in sorted(dense_names):
        _check_references(path, data, start, collections,
                          _attribute_elements(data, _messages_named(data, start, end, name)))
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


def _check_references(path: str, data: Any, start: int, collections: dict[int, dict[int, int]],
                      elements: Iterable[tuple[int, int]]) -> None:
    for pos, item_size in elements:
        length, collection, index = _REFERENCE.unpack_from(data, pos)
        held = collections.get(collection, {}).get(index)
        if length * item_size > _HARMLESS_ALLOCATION and (held is None or length * item_size > held):
            raise _greedy_reference(path, pos - start, length * item_size, held)


def _keeps_dense_attributes(path: str, data: Any, start: int, end: int, body: int, body_end: int) -> bool:
    """Whether an attribute info message (version 0: flags, an optional maximum creation index, then
    the fractal heap's address) names a heap; refused when that heap keeps its attributes compressed."""
    if body_end - body < 10 or data[body] != 0:
        return False
    heap_field = body + 2 + (2 if data[body + 1] & 0x01 else 0)
    if heap_field + 8 > body_end:
        return False
    (heap,) = struct.unpack_from("<Q", data, heap_field)
    if heap == _UNDEFINED_ADDRESS:
        return False
    header = start + heap
    # "FRHP", version, heap ID length (2 bytes), then the length of its I/O filter description
    if header + 9 <= end and data[header:header + 4] == b"FRHP" and struct.unpack_from("<H", data, header + 7)[0]:
        raise CorruptCheckpointError(path, "the HDF5 file keeps an object's attributes compressed (a filtered dense "
                                           "attribute heap), where ckptview cannot check their text before the HDF5 "
                                           "library reads it; Keras never writes that. Get the original file.")
    return True


def _messages_named(data: Any, start: int, end: int, name: bytes) -> Iterator[tuple[int, int]]:
    """
    Every place in `data[start:end]` an attribute message named `name` could start (its name, null
    included, follows the version byte and the size fields: 8 bytes on in versions 1 and 2, 9 in
    version 3). Searched in the whole file, not where its heap's index says: a copy found there
    could be a decoy, with the one HDF5 reads elsewhere. The end of each is unknown: `end`.
    """
    needle = name + b"\0"
    pos = data.find(needle, start, end)
    while pos >= 0:
        for body, version in ((pos - 9, 3), (pos - 8, 2), (pos - 8, 1)):
            if body >= start and data[body] == version and struct.unpack_from("<H", data, body + 2)[0] == len(needle):
                yield body, end
        pos = data.find(needle, pos + 1, end)


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

    def messages(self, header: int, wanted: Collection[int]) -> Iterator[tuple[int, int, int]]:
        """(type, start, end) of the bodies of the messages of the `wanted` types in the header at `header`."""
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
                elif kind in wanted and size:
                    yield kind, body, body_end
                block = body_end
