"""
A torch.save archive's zip directory, read the way Python's zipfile reads it, without one
`ZipInfo` object per member.

Why not zipfile: a torch archive has one member per storage, and `zipfile.ZipFile` builds a
`ZipInfo` (with its extra fields decoded, dates, flags...) for each: 0.10 s of the 0.5 s it took to
list a 20,000-tensor file, and a third of opening a 2 GB LLM state dict. The torch readers need a
member's name, where its local header is, its sizes, method, flags and checksum; this reads those
in one pass over the central directory. Where the zip format leaves room for two readings, the
choices are zipfile's (the end record is the last one in the file's final 64 KiB; bytes before
the archive shift every offset by the same amount; ZIP64 records replace the 32-bit fields), so a
file lists as it did when zipfile read it, and the checks in torch_pickle (repeated names,
members outside the archive's folder) keep their meaning. Other zips (npz, .keras) still go
through zipfile: they have few members.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from typing import NamedTuple

from ckptview.errors import CorruptCheckpointError, printable

STORED, DEFLATED = 0, 8

_END = struct.Struct("<4s4H2LH")  # signature, disk numbers, entry counts, directory size and offset, comment length
_END64_LOCATOR = struct.Struct("<4sLQL")
_END64 = struct.Struct("<4sQ2H2L4Q")
# a central directory entry, unpacking only the fields read (20,000 entries for a 20,000-tensor file):
# signature, version needed to extract, flags, method, crc, sizes, name/extra/comment lengths, header offset
_ENTRY = struct.Struct("<4s2xBxHH4xLLLHHH8xL")
_LOCAL = struct.Struct("<4s2xH18xHH")  # signature, flags at bytes 6..7, name and extra-field lengths at 26..29
LOCAL_HEADER_BYTES = _LOCAL.size  # before a member's name: a header starting later than size - this is cut off
_MAX_COMMENT = 65535
_UTF8_NAMES = 0x800
_MAX_EXTRACT_VERSION = 63  # zipfile's limit
_ZIP64_EXTRA = 0x0001
_NO_32BIT_VALUE = 0xFFFFFFFF


class BadZip(Exception):
    """The bytes are not a zip archive zipfile would read; the message says which part is wrong."""


class ChecksumMismatch(BadZip):
    """A member whose bytes disagree with its recorded CRC-32; `data` holds them (readers that check
    no CRC, as torch's, read them as they are)."""

    def __init__(self, data: bytes) -> None:
        super().__init__("a checksum that does not match")
        self.data = data


class NoEndRecord(BadZip):
    """No end-of-archive record in the file's last 64 KiB: a zip cut off before its directory was written."""


class Member(NamedTuple):
    name: str
    header_offset: int  # of its local header, from the archive's first byte
    compress_type: int
    compress_size: int
    file_size: int
    flag_bits: int
    crc: int


def read_directory(read: Callable[[int, int], bytes], size: int) -> list[Member]:
    """
    The members of the zip archive whose bytes `read(offset, count)` gives, `size` bytes long, in
    central-directory order.

    Raises:
        BadZip: no end record (a cut-off file), or a directory that is not where the end record says.
    """
    return _entries(*directory_bytes(read, size))


def directory_bytes(read: Callable[[int, int], bytes], size: int) -> tuple[bytes, int]:
    """The archive's central directory as stored, and how far bytes prepended to the archive shift
    its offsets (`read_directory` without making a record per member).

    Raises:
        BadZip: as `read_directory`.
    """
    tail_size = min(size, _END.size + _MAX_COMMENT)
    tail = read(size - tail_size, tail_size)
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) < tail_size or at + _END.size > len(tail):
        raise NoEndRecord("no end-of-archive record")
    _, _, _, _, _, dir_size, dir_offset, _ = _END.unpack_from(tail, at)
    end_at = size - tail_size + at
    located_at = end_at - dir_size - dir_offset
    locator_at = at - _END64_LOCATOR.size
    if locator_at >= 0 and tail[locator_at:locator_at + 4] == b"PK\x06\x07":
        end64_at = end_at - _END64_LOCATOR.size - _END64.size
        end64 = read(end64_at, _END64.size) if end64_at >= 0 else b""
        if len(end64) < _END64.size or end64[:4] != b"PK\x06\x06":
            raise BadZip("a ZIP64 locator without its end record")
        _, _, _, _, _, _, _, _, dir_size, dir_offset = _END64.unpack(end64)
        located_at = end64_at - dir_size - dir_offset
    # bytes prepended to the archive (a self-extracting stub) shift every offset alike; zipfile allows it
    shift = located_at
    if shift < 0 or dir_offset + shift + dir_size > size:
        raise BadZip("the directory lies outside the file")
    directory = read(dir_offset + shift, dir_size)
    if len(directory) < dir_size:
        raise BadZip("the directory is cut off")
    return directory, shift


def _entries(directory: bytes, shift: int) -> list[Member]:
    members = []
    unpack = _ENTRY.unpack_from
    new_member = tuple.__new__  # a NamedTuple's own __new__ is a Python function: a third of this loop
    entry_size = _ENTRY.size
    position, end = 0, len(directory)
    while position + entry_size <= end:
        (signature, extract_version, flags, method, crc, compress_size, file_size, name_len, extra_len, comment_len,
         header_offset) = unpack(directory, position)
        if signature != b"PK\x01\x02":
            raise BadZip("a directory entry without its signature")
        if extract_version > _MAX_EXTRACT_VERSION:
            raise BadZip(f"a member that needs zip version {extract_version / 10:.1f} to extract")
        position += entry_size
        raw_name = directory[position:position + name_len]
        # ASCII reads the same in both encodings, and decodes ten times faster than cp437 (whose
        # charmap decode was a third of this loop: torch writes no UTF-8 flag)
        name = raw_name.decode("ascii" if raw_name.isascii() else "utf-8" if flags & _UTF8_NAMES else "cp437")
        if "\x00" in name:
            # zipfile cuts a name at its NUL, torch's reader does not: the two would read different members
            raise BadZip("a member name with a NUL byte")
        if _NO_32BIT_VALUE in (file_size, compress_size, header_offset):
            extra = directory[position + name_len:position + name_len + extra_len]
            file_size, compress_size, header_offset = _zip64_values(extra, file_size, compress_size, header_offset)
        position += name_len + extra_len + comment_len
        members.append(new_member(Member, (name, header_offset + shift, method, compress_size, file_size, flags, crc)))
    if position != end:
        raise BadZip("the directory's entries do not fill it")
    return members


def _zip64_values(extra: bytes, file_size: int, compress_size: int, header_offset: int) -> tuple[int, int, int]:
    """The 64-bit sizes and offset a ZIP64 extra field holds for the fields marked 0xFFFFFFFF, in that order."""
    position = 0
    while position + 4 <= len(extra):
        kind, length = struct.unpack_from("<HH", extra, position)
        body = extra[position + 4:position + 4 + length]
        if kind == _ZIP64_EXTRA:
            values = [file_size, compress_size, header_offset]
            taken = 0
            for index, value in enumerate(values):
                if value == _NO_32BIT_VALUE:
                    if taken + 8 > len(body):
                        raise BadZip("a ZIP64 extra field too short for the sizes it replaces")
                    (values[index],) = struct.unpack_from("<Q", body, taken)
                    taken += 8
            return values[0], values[1], values[2]
        position += 4 + length
    raise BadZip("a member marked ZIP64 without its ZIP64 extra field")


def overlapping_members(members: list[Member]) -> tuple[str, str] | None:
    """
    The names of two members whose bytes overlap, or None, from the directory alone. A member holds
    at least its 30-byte local header, its name (at least a byte a character) and its stored bytes,
    so a member starting before that much past the previous one overlaps it (the local extra field,
    not in the directory, only adds to it). Zip writers lay members one after another; members nested
    in one another make every reader read the shared bytes once per member: a "quoted overlap" zip
    bomb, or a torch archive whose storages all read one 100 MB range (statistics would read a
    terabyte for a 100 MB file).
    """
    # writers list members in the order they wrote them: in order already, as a rule (one pass, 20,000
    # members in ~2 ms)
    ordered = members
    previous_start = -1
    for member in members:
        if member[1] < previous_start:
            ordered = sorted(members, key=lambda item: item[1])
            break
        previous_start = member[1]
    previous_end, previous_name = -1, ""
    for name, start, _, size, _, _, _ in ordered:
        if start < previous_end:
            return previous_name, name
        previous_end, previous_name = start + _LOCAL.size + len(name) + size, name
    return None


def refuse_overlapping_members(path: str, members: list[Member], what: str) -> None:
    """`overlapping_members`, said in one line naming `what` (the archive, the .npz)."""
    overlap = overlapping_members(members)
    if overlap is not None:
        raise CorruptCheckpointError(path, f"{what}'s members {printable(overlap[0])} and {printable(overlap[1])} "
                                           "overlap: zip writers lay members one after another, so it is crafted (a "
                                           "zip bomb, or tensors reading the same bytes many times over). Do not "
                                           "load it; get the original file.")


def data_offset(read: Callable[[int, int], bytes], name: str, header_offset: int) -> int:
    """Where the bytes of member `name` start: after its local header, whose name must be the directory's.

    Raises:
        BadZip: the local header is missing, cut off, or names another member.
    """
    # the header and as many bytes as the directory's name takes, in one read: a torch file locates
    # each of its storages this way, and a second read for the name doubled the system calls
    header = read(header_offset, _LOCAL.size + len(name))
    if len(header) < _LOCAL.size:
        raise BadZip("cut off")
    signature, flags, name_len, extra_len = _LOCAL.unpack_from(header)
    local_name = header[_LOCAL.size:_LOCAL.size + name_len]
    if len(local_name) < name_len:  # a longer name in the local header (or non-ASCII bytes): read the rest
        local_name += read(header_offset + _LOCAL.size + len(local_name), name_len - len(local_name))
    # decoded as zipfile decodes it: UTF-8 when the header says so, else cp437
    if signature != b"PK\x03\x04" or local_name.decode("utf-8" if flags & _UTF8_NAMES else "cp437", "replace") != name:
        raise BadZip("a local header that disagrees with the directory")
    return header_offset + _LOCAL.size + name_len + extra_len


def read_member(read: Callable[[int, int], bytes], member: Member, *, zero_crc_unchecked: bool = False) -> bytes:
    """A stored or deflated member's bytes, checked against its CRC-32 (as zipfile checks them).
    `zero_crc_unchecked`: a CRC of 0 means none was computed, as torch's zip writer records it when
    told not to compute them (`torch.utils.serialization.config.save.compute_crc32 = False`).

    Raises:
        BadZip: a damaged header, a cut-off member, or a checksum that does not match.
        zlib.error: deflated data that does not inflate.
    """
    start = data_offset(read, member.name, member.header_offset)
    stored = read(start, member.compress_size)
    if len(stored) < member.compress_size:
        raise BadZip("cut off")
    if member.compress_type == DEFLATED:
        # stops at the declared size: a member that inflates further is cut there
        data = zlib.decompressobj(-15).decompress(stored, member.file_size)
    else:
        data = stored[:member.file_size]
    if len(data) != member.file_size:
        raise BadZip("shorter than its directory entry says")
    if zlib.crc32(data) != member.crc and (member.crc or not zero_crc_unchecked):
        raise ChecksumMismatch(data)
    return data
