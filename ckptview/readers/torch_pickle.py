"""
torch.save files: the zip archive (torch >= 1.6) and the legacy stream of pickles.

Both are read with `SafeUnpickler`: the pickle is parsed, every tensor becomes a `TensorInfo`
pointing at its storage's bytes in the file, and nothing is read beyond the pickle itself.
"""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
from dataclasses import dataclass
from typing import Any

import torch

from ckptview.errors import CorruptCheckpointError, TruncatedCheckpointError, UnsupportedFormatError
from ckptview.readers.model import Checkpoint, FileSource, Storage
from ckptview.readers.unpickler import SafeUnpickler

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, then name and extra-field lengths at bytes 26..29

# What the C unpickler and our stand-ins raise on a malformed pickle; all become one clear error.
PICKLE_ERRORS = (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, KeyError,
                 IndexError, struct.error, UnicodeDecodeError, RecursionError, MemoryError, ImportError,
                 OverflowError, SystemError)


def unpickle(data: bytes | io.BufferedIOBase, path: str, what: str, storage_for: Any = None) -> tuple[Any, SafeUnpickler]:
    stream = io.BytesIO(data) if isinstance(data, bytes) else data
    unpickler = SafeUnpickler(stream, storage_for)
    try:
        return unpickler.load(), unpickler
    except CorruptCheckpointError:
        raise
    except PICKLE_ERRORS as exc:
        raise CorruptCheckpointError(
            path, f"{what} cannot be read as a pickle ({type(exc).__name__}: {str(exc)[:200]}): the file is damaged "
                  "or was not written by torch.save. Re-save it, or copy it again.",
        ) from exc


def _open_zip(path: str, size: int) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise TruncatedCheckpointError(
            path, f"the zip archive has no end-of-archive directory (the file is {size:,} bytes): it was cut off "
                  "while copying, downloading or saving. Copy it again or re-save it with torch.save.",
        ) from exc
    except (OSError, EOFError, ValueError, struct.error, NotImplementedError) as exc:
        # NotImplementedError: zipfile's answer to a damaged "version needed" field
        raise CorruptCheckpointError(path, f"the zip archive's directory is damaged ({exc}). Re-save it with torch.save.") from exc


def _read_member(archive: zipfile.ZipFile, path: str, member: str) -> bytes:
    try:
        return archive.read(member)
    except zipfile.BadZipFile as exc:
        raise CorruptCheckpointError(
            path, f"archive member {member} is damaged ({exc}): the file was corrupted after saving. "
                  "Copy it again or re-save it with torch.save.",
        ) from exc
    except (OSError, EOFError, ValueError, struct.error, NotImplementedError) as exc:
        raise CorruptCheckpointError(path, f"archive member {member} cannot be read ({exc}). Re-save the file.") from exc


def zip_prefix(names: list[str], marker: str) -> str | None:
    """The top folder of a torch zip ("archive/"), found by the member that marks the format."""
    for name in names:
        if name.endswith("/" + marker) and name.count("/") == 1:
            return name[: -len(marker)]
    return None


def member_data_offset(source: FileSource, info: zipfile.ZipInfo, size: int, base_offset: int = 0) -> int:
    """Where a stored member's bytes start in `source`: after its local header, whose extra field varies."""
    header_at = base_offset + info.header_offset
    header = source.read(header_at, _LOCAL_HEADER.size) if header_at + _LOCAL_HEADER.size <= size else b""
    if len(header) < _LOCAL_HEADER.size:
        raise TruncatedCheckpointError(source.path, f"archive member {info.filename} starts beyond the end of the "
                                                    "file: it was cut off. Copy it again.")
    signature, name_len, extra_len = _LOCAL_HEADER.unpack(header)
    if signature != b"PK\x03\x04":
        raise CorruptCheckpointError(source.path, f"archive member {info.filename} has a damaged local header: "
                                                  "the file was corrupted. Copy it again or re-save it.")
    return header_at + _LOCAL_HEADER.size + name_len + extra_len


def is_torchscript_archive(names: list[str], prefix: str) -> bool:
    """torch.jit.save writes constants.pkl and a code/ folder beside data.pkl; torch.save does not."""
    return prefix + "constants.pkl" in names or any(n.startswith(prefix + "code/") for n in names)


def read_torch_zip(path: str, size: int, *, trust: bool) -> Checkpoint:
    """A torch.save zip archive, or a TorchScript archive (format "torchscript")."""
    source = FileSource(path)
    archive = _open_zip(path, size)
    with archive:
        parsed = parse_torch_zip(archive, path, source, size)
    format_name = "torchscript" if is_torchscript_archive(parsed.names, parsed.prefix) else "torch-zip"
    details: dict[str, Any] = {"archive_prefix": parsed.prefix.rstrip("/"), "byteorder": parsed.byteorder,
                               "members": len(parsed.names)}
    script_classes = parsed.unpickler.script_classes()
    if script_classes:
        details["script_classes"] = script_classes
        details["code_files"] = sorted(n[len(parsed.prefix):] for n in parsed.names
                                       if n.startswith(parsed.prefix + "code/") and n.endswith(".py"))
    return Checkpoint(path, format_name, parsed.root, file_size=size, sources=[source],
                      pickle_imports=parsed.unpickler.pickle_imports(), trust=trust, details=details)


@dataclass
class ParsedZip:
    root: Any
    unpickler: SafeUnpickler
    names: list[str]
    prefix: str
    byteorder: str


def parse_torch_zip(archive: zipfile.ZipFile, path: str, source: FileSource, size: int, base_offset: int = 0) -> ParsedZip:
    """
    Parse the data.pkl of a torch zip whose bytes start at `base_offset` of `source` (0 for a file;
    DCP embeds one torch.save archive per item inside its .distcp files).
    """
    names = archive.namelist()
    prefix = zip_prefix(names, "data.pkl")
    if prefix is None:
        from ckptview.readers.registry import supported

        sample = ", ".join(names[:5]) + (" …" if len(names) > 5 else "")
        raise UnsupportedFormatError(path, f"a zip archive, but not one written by torch.save (no data.pkl; it "
                                           f"holds {sample or 'nothing'}); {supported()}.")
    byteorder = "little"
    if prefix + "byteorder" in names:
        byteorder = _read_member(archive, path, prefix + "byteorder").decode("ascii", "replace").strip() or "little"
    members = {info.filename: info for info in archive.infolist()}

    def storage_for(dtype: torch.dtype, key: str, location: str, numel: int, view_metadata: Any) -> Storage:
        member = f"{prefix}data/{key}"
        info = members.get(member)
        if info is None:
            raise CorruptCheckpointError(path, f"data.pkl refers to storage {key!r} but the archive has no "
                                               f"member {member}: the file is incomplete. Re-save it.")
        nbytes = numel * dtype.itemsize
        if info.compress_type != zipfile.ZIP_STORED:
            raise UnsupportedFormatError(path, f"archive member {member} is compressed; torch.save never "
                                               "compresses, so the file was re-zipped. Unzip and re-zip it with "
                                               "`zip -0` (store only), or re-save it with torch.save.")
        if info.file_size < nbytes:
            raise CorruptCheckpointError(path, f"storage {key!r} should hold {nbytes:,} bytes but its archive "
                                               f"member has {info.file_size:,}: the file is damaged. Re-save it.")
        def locate() -> int:
            offset = member_data_offset(source, info, size, base_offset)
            if offset + nbytes > size:
                raise TruncatedCheckpointError(path, f"storage {key!r} runs to byte {offset + nbytes:,} but the file "
                                                     f"ends at {size:,}: it was cut off. Copy it again.")
            return offset

        return Storage(key=f"{base_offset}:{key}" if base_offset else key, source=source, offset=-1,
                       nbytes=nbytes, location=location, byteorder=byteorder, locate=locate)

    data = _read_member(archive, path, prefix + "data.pkl")
    root, unpickler = unpickle(data, path, "its data.pkl", storage_for)
    return ParsedZip(root, unpickler, names, prefix, byteorder)


def read_pickle_stream(path: str, size: int, *, trust: bool) -> Checkpoint:
    """A legacy torch.save file (magic number, protocol, sys info, data, storage keys, raw storages),
    or any other pickle, listed the same safe way."""
    with open(path, "rb") as stream:
        first, _ = unpickle(stream, path, "its first pickle")
        if first != _LEGACY_MAGIC:
            stream.seek(0)
            root, unpickler = unpickle(stream, path, "the pickle")
            return Checkpoint(path, "pickle", root, file_size=size, pickle_imports=unpickler.pickle_imports(),
                              trust=trust, details={"note": "a plain Python pickle, not written by torch.save"})
        protocol, _ = unpickle(stream, path, "its protocol version")
        if protocol != _LEGACY_PROTOCOL:
            raise CorruptCheckpointError(path, f"legacy torch file with unknown protocol version {protocol!r}; "
                                               "load it with the torch that wrote it and re-save it.")
        sys_info, _ = unpickle(stream, path, "its system-info record")
        little_endian = not isinstance(sys_info, dict) or sys_info.get("little_endian", True)

        # Storage bytes follow the pickles, so their offsets are known only after the key list:
        # record the storages first, then read the data pickle again with their offsets.
        data_start = stream.tell()
        described: dict[str, tuple[torch.dtype, str]] = {}

        def record(dtype: torch.dtype, key: str, location: str, numel: int, view_metadata: Any) -> Storage:
            described.setdefault(key, (dtype, location))
            return Storage(key=key, source=None, offset=0, nbytes=0, location=location)  # type: ignore[arg-type]

        unpickle(stream, path, "its data pickle", record)
        keys, _ = unpickle(stream, path, "its storage key list")
        offset = stream.tell()
    source = FileSource(path)
    storages: dict[str, Storage] = {}
    for key in keys if isinstance(keys, list) else []:
        key = str(key)
        dtype, location = described.get(key, (torch.uint8, "cpu"))
        count_bytes = source.read(offset, 8) if offset + 8 <= size else b""
        if len(count_bytes) < 8:
            raise TruncatedCheckpointError(path, f"the file ends at byte {size:,} before storage {key!r}: it was cut "
                                                 "off. Copy it again or re-save it.")
        (numel,) = struct.unpack("<q" if little_endian else ">q", count_bytes)
        nbytes = numel * dtype.itemsize
        if numel < 0 or offset + 8 + nbytes > size:
            raise TruncatedCheckpointError(path, f"storage {key!r} needs {nbytes:,} bytes from byte {offset + 8:,} "
                                                 f"but the file ends at {size:,}: it was cut off. Copy it again.")
        storages[key] = Storage(key=key, source=source, offset=offset + 8, nbytes=nbytes, location=location,
                                byteorder="little" if little_endian else "big")
        offset += 8 + nbytes

    def storage_for(dtype: torch.dtype, key: str, location: str, numel: int, view_metadata: Any) -> Storage:
        storage = storages.get(key)
        if storage is None:
            raise CorruptCheckpointError(path, f"the data refers to storage {key!r}, which the file does not hold: "
                                               "it is incomplete. Re-save it.")
        if view_metadata:
            _, view_offset, view_size = view_metadata
            itemsize = dtype.itemsize
            return Storage(key=f"{key}@{view_offset}", source=source, offset=storage.offset + view_offset * itemsize,
                           nbytes=view_size * itemsize, location=location, byteorder=storage.byteorder)
        return storage

    with open(path, "rb") as stream:
        stream.seek(data_start)
        root, unpickler = unpickle(stream, path, "its data pickle", storage_for)
    return Checkpoint(path, "torch-legacy", root, file_size=size, sources=[source],
                      pickle_imports=unpickler.pickle_imports(), trust=trust, details={"storages": len(storages)})
