"""
NumPy `.npy` files and `.npz` archives (`numpy.savez`, `numpy.savez_compressed`).

Shapes and dtypes come from each array's header, parsed by `numpy.lib.format`. Data stays on
disk: a `.npy` file and a stored `.npz` member are read in place like any dense tensor; a
deflated member is inflated when asked, in bounded chunks for statistics and diffs, after its
sizes were checked against what deflate can produce (a zip bomb is refused, not inflated).
An object array's elements are a pickle, which `numpy.load(allow_pickle=True)` unpickles: ckptview
reads it with the same allow-listed unpickler as a torch file (nothing it names is imported or
called), so `scan` names every global numpy would import, and its data is never loaded.
"""

from __future__ import annotations

import io
import os
import struct
import zipfile
import zlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from ckptview.errors import (
    CkptviewError,
    CorruptCheckpointError,
    TruncatedCheckpointError,
    UnsupportedFormatError,
    printable,
)
from ckptview.readers.dtypes import numpy_dtype_name
from ckptview.readers.model import Checkpoint, FileSource, PickleImport, Storage, TensorInfo
from ckptview.readers.zip_directory import (
    LOCAL_HEADER_BYTES,
    BadZip,
    Member,
    data_offset,
    refuse_overlapping_members,
)

if TYPE_CHECKING:
    import torch

# Deflate cannot expand data more than ~1032:1; a member claiming more is a zip bomb or damaged.
_MAX_DEFLATE_RATIO = 1032
_INFLATE_READ = 1 << 20  # compressed bytes read at a time


def _header(stream: BinaryIO, path: str, where: str) -> tuple[tuple[int, ...], bool, np.dtype, str]:
    """(shape, fortran_order, dtype, version) from an array's first bytes, by numpy's own parser."""
    from numpy.lib import format as npformat

    try:
        version = npformat.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = npformat.read_array_header_1_0(stream)
        elif version in ((2, 0), (3, 0)):
            # 3.0 only allows UTF-8 in structured field names; shapes and dtypes parse as in 2.0
            shape, fortran, dtype = npformat.read_array_header_2_0(stream)
        else:
            raise ValueError(f"format version {version[0]}.{version[1]} is unknown")
    except (ValueError, EOFError, SyntaxError, TypeError, OSError, zlib.error, zipfile.BadZipFile) as exc:
        raise CorruptCheckpointError(path, f"{where} has a damaged .npy header ({str(exc).splitlines()[0][:200]}): "
                                           "re-save it with numpy.save / numpy.savez.") from exc
    if any(not isinstance(dim, int) or dim < 0 for dim in shape):
        raise CorruptCheckpointError(path, f"{where} has a .npy header with a negative or non-integer shape "
                                           f"{shape!r}: re-save it with numpy.save.")
    return tuple(shape), bool(fortran), dtype, f"{version[0]}.{version[1]}"


def _strides(shape: tuple[int, ...], fortran: bool) -> tuple[int, ...]:
    dims = list(reversed(shape)) if not fortran else list(shape)
    stride, running = [], 1
    for dim in dims:
        stride.append(running)
        running *= max(dim, 1)
    return tuple(reversed(stride)) if not fortran else tuple(stride)


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def _unloadable(shape: tuple[int, ...], dtype: np.dtype, nbytes: int) -> TensorInfo:
    if dtype.hasobject:
        note = ("an object array: its elements are pickled Python objects, and unpickling them "
                "(numpy.load(allow_pickle=True)) can run any code the file names, so ckptview never does. Load it "
                "with numpy only if you trust the file")
    else:
        note = f"numpy dtype {dtype.str} has no torch equivalent; read it with numpy.load"
    return TensorInfo(shape=shape, dtype="uint8", storage=None, stride=_strides(shape, False),
                      layout="unsupported", encoding="object" if dtype.hasobject else dtype.str,
                      stored_nbytes=nbytes, note=note)


def _size_check(path: str, where: str, shape: tuple[int, ...], dtype: np.dtype, available: int) -> int:
    nbytes = _numel(shape) * dtype.itemsize
    if not dtype.hasobject and nbytes > available:
        raise CorruptCheckpointError(path, f"{where}'s header claims shape {list(shape)} of {dtype.str} "
                                           f"({nbytes:,} bytes) but only {available:,} bytes of data follow: the "
                                           "header lies or the file was cut off. Re-save or copy it again.")
    return nbytes


ALLOW_PICKLE = ("numpy.load refuses it unless allow_pickle=True, which unpickles its object arrays ({names}): "
                "load it so only if you trust the file")


def _scan_object_pickle(data: Any, path: str, where: str, start: int) -> Any:
    """
    The unpickler that read the pickle of an object array at `start` of `data`: its `pickle_imports`
    are what `numpy.load(allow_pickle=True)` would import, and may call. ckptview's unpickler builds
    no object the pickle names; a damaged pickle raises, naming the globals met before the damage.
    """
    from ckptview.readers.torch_pickle import unpickle

    _, unpickler, _ = unpickle(data, path, f"{where}'s object array", start=start, writer="numpy.save",
                               loader="numpy.load(allow_pickle=True)")
    return unpickler


def read_npy(path: str, size: int, *, trust: bool) -> Checkpoint:
    with open(path, "rb") as stream:
        shape, fortran, dtype, version = _header(stream, path, "the file")
        data_start = stream.tell()
    nbytes = _size_check(path, "the file", shape, dtype, size - data_start)
    source = FileSource(path)
    dtype_name = numpy_dtype_name(dtype)
    details: dict[str, Any] = {}
    imports: list[PickleImport] = []
    if dtype.hasobject:
        from ckptview.readers.torch_pickle import mapped

        with mapped(path) as data:
            imports = _scan_object_pickle(data, path, "the file", data_start).pickle_imports()
        details["allow_pickle"] = ALLOW_PICKLE.format(names="the file's array")
    if dtype_name is None:
        info = _unloadable(shape, dtype, size - data_start)
    else:
        storage = Storage(key=os.path.basename(path), source=source, offset=data_start, nbytes=nbytes,
                          location="cpu", byteorder="big" if dtype.byteorder == ">" else "little")
        info = TensorInfo(shape=shape, dtype=dtype_name, storage=storage, stride=_strides(shape, fortran))
    details.update({"npy_version": version, "numpy_dtype": dtype.str, "fortran_order": fortran,
                    "data_offset": data_start})
    return Checkpoint(path, "npy", info, file_size=size, sources=[source], pickle_imports=imports, trust=trust,
                      details=details)


def read_npz(path: str, size: int, *, trust: bool) -> Checkpoint:
    source = FileSource(path)
    root: dict[str, TensorInfo] = {}
    members: list[dict[str, Any]] = []
    unpicklers: list[Any] = []
    pickled: list[str] = []
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, struct.error, NotImplementedError) as exc:
        raise CorruptCheckpointError(path, f"its zip directory is damaged ({exc}): the .npz was cut off or "
                                           "corrupted. Copy it again or re-save it with numpy.savez.") from exc
    from ckptview.readers.torch_pickle import code_named_before_failing, merge_imports

    # numpy.load reads an .npz ckptview refuses (members compressed with bzip2 or lzma, which zipfile
    # inflates; members that overlap) and unpickles an object array as it is asked for one: what the
    # pickles of its object arrays import counts, and the refusal names it (`scan` exits 3)
    with archive, code_named_before_failing(lambda: _object_array_imports(archive, path), failure=None,
                                            loader="numpy.load(allow_pickle=True)"):
        refuse_overlapping_members(path, [Member(info.filename, info.header_offset, info.compress_type,
                                                 info.compress_size, info.file_size, info.flag_bits, info.CRC)
                                          for info in archive.infolist()], "the .npz")
        for info in archive.infolist():
            key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
            root[key], member, header_len = _member(archive, info, path, size, source)
            members.append({"name": key, **member})
            if root[key].encoding == "object":
                unpicklers.append(_scan_object_pickle(_member_bytes(archive, info, path), path,
                                                      f"member {info.filename}", header_len))
                pickled.append(key)
    details: dict[str, Any] = {"members": members}
    if pickled:
        details["allow_pickle"] = ALLOW_PICKLE.format(names=", ".join(pickled))
    return Checkpoint(path, "npz", root, file_size=size, sources=[source], pickle_imports=merge_imports(unpicklers),
                      trust=trust, details=details)


def _object_array_imports(archive: zipfile.ZipFile, path: str) -> list[PickleImport]:
    """What the pickles of the archive's object arrays import, read member by member as numpy.load would."""
    from ckptview.readers.torch_pickle import merge_imports

    unpicklers, unknown = [], []
    for info in archive.infolist():
        try:
            with archive.open(info) as stream:
                _, _, dtype, _ = _header(stream, path, f"member {info.filename}")  # type: ignore[arg-type]
                header_len = stream.tell()
            if not dtype.hasobject:
                continue
            if info.file_size > _MAX_REFUSED_OBJECT_PICKLE_BYTES:
                unknown.append(PickleImport(f"<unknown: member {printable(info.filename)}'s object array, "
                                            "too large to read for a refused .npz>", 1))
                continue
            unpicklers.append(_scan_object_pickle(archive.read(info), path, f"member {info.filename}", header_len))
        except CkptviewError as damaged:
            unknown.extend(getattr(damaged, "named_globals", []))
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error, NotImplementedError):
            continue  # numpy.load cannot read it either
    return merge_imports(unpicklers) + unknown


_MAX_REFUSED_OBJECT_PICKLE_BYTES = 64 << 20

# An object array's pickle is read whole into memory to be scanned; a bigger one is refused, not read.
_MAX_OBJECT_PICKLE_BYTES = 1 << 31


def _member_bytes(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: str) -> bytes:
    """A member's bytes, inflated by zipfile (its CRC checked), after `_member` checked its sizes."""
    if info.file_size > _MAX_OBJECT_PICKLE_BYTES:
        raise UnsupportedFormatError(path, f"member {info.filename} is an object array of {info.file_size:,} bytes, "
                                           "more than ckptview reads to scan its pickle. Do not load it with "
                                           "allow_pickle=True unless you trust the file.")
    try:
        return archive.read(info)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error) as exc:
        raise CorruptCheckpointError(path, f"member {info.filename} cannot be read ({exc}): the .npz is damaged. "
                                           "Copy it again or re-save it.") from exc


def _member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: str, size: int,
            source: FileSource) -> tuple[TensorInfo, dict[str, Any], int]:
    """The member's tensor, its details, and the length of its .npy header."""
    where = f"member {info.filename}"
    if info.flag_bits & 0x1:
        raise UnsupportedFormatError(path, f"{where} is encrypted; decrypt the archive first.")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise UnsupportedFormatError(path, f"{where} uses zip compression method {info.compress_type}; numpy.savez "
                                           "writes stored or deflated members only. Re-save it with numpy.savez.")
    data_start = _local_data_start(source, info, path, size)
    if data_start + info.compress_size > size:
        raise TruncatedCheckpointError(path, f"{where}'s data runs past the end of the file: the .npz was cut off. "
                                             "Copy it again.")
    deflated = info.compress_type == zipfile.ZIP_DEFLATED
    if deflated and info.file_size > _MAX_DEFLATE_RATIO * info.compress_size + 1024:
        raise CorruptCheckpointError(path, f"{where} claims to inflate {info.compress_size:,} bytes into "
                                           f"{info.file_size:,}, more than deflate can produce: a zip bomb or a damaged "
                                           "archive. ckptview does not inflate it; get the file from its source.")
    with archive.open(info) as stream:
        shape, fortran, dtype, version = _header(stream, path, where)  # type: ignore[arg-type]
        header_len = stream.tell()
    nbytes = _size_check(path, where, shape, dtype, info.file_size - header_len)
    member = {"numpy_dtype": dtype.str, "shape": list(shape), "fortran_order": fortran, "npy_version": version,
              "compression": "deflated" if deflated else "stored", "stored_bytes": info.compress_size}
    dtype_name = numpy_dtype_name(dtype)
    if dtype_name is None:
        return _unloadable(shape, dtype, info.compress_size), member, header_len
    byteorder = "big" if dtype.byteorder == ">" else "little"
    if not deflated:
        storage = Storage(key=info.filename, source=source, offset=data_start + header_len, nbytes=nbytes,
                          location="cpu", byteorder=byteorder)
        tensor = TensorInfo(shape=shape, dtype=dtype_name, storage=storage, stride=_strides(shape, fortran))
        return tensor, member, header_len
    inflater = _Deflated(source, path, info, data_start, header_len, shape, fortran, np.dtype(dtype))
    tensor = TensorInfo(shape=shape, dtype=dtype_name, storage=None, stride=_strides(shape, fortran),
                        layout="encoded", encoding="deflate",
                        encoding_params={"numpy_dtype": dtype.str, "fortran_order": fortran},
                        stored_nbytes=info.compress_size, decode=inflater.decode,
                        # chunks come in memory order, which is the element order only for C-ordered arrays
                        decode_chunks=None if fortran else inflater.chunks)
    return tensor, member, header_len


def _local_data_start(source: FileSource, info: zipfile.ZipInfo, path: str, size: int) -> int:
    if info.header_offset + LOCAL_HEADER_BYTES > size:
        raise TruncatedCheckpointError(path, f"member {info.filename} starts past the end of the file: the .npz was "
                                             "cut off. Copy it again.")
    try:
        return data_offset(source.read, info.orig_filename, info.header_offset)
    except BadZip as exc:
        raise CorruptCheckpointError(path, f"member {info.filename} has a damaged local header: the .npz is "
                                           "corrupted. Copy it again or re-save it.") from exc


class _Deflated:
    """A deflated `.npz` member: inflated from its compressed bytes in the file, never more than declared."""

    def __init__(self, source: FileSource, path: str, info: zipfile.ZipInfo, data_start: int, header_len: int,
                 shape: tuple[int, ...], fortran: bool, dtype: np.dtype) -> None:
        self.source = source
        self.path = path
        self.name = info.filename
        self.start = data_start
        self.compressed = info.compress_size
        self.inflated = info.file_size
        self.crc = info.CRC
        self.header_len = header_len
        self.shape = shape
        self.fortran = fortran
        self.dtype = dtype.newbyteorder("=") if dtype.byteorder == ">" else dtype
        self.swap = dtype.byteorder == ">"
        self.nbytes = _numel(shape) * dtype.itemsize

    def _inflate(self) -> Iterator[bytes]:
        """The member's bytes after the .npy header, in pieces; the total and the CRC checked at the end."""
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        done, crc, skip = 0, 0, self.header_len
        for offset in range(0, self.compressed, _INFLATE_READ):
            raw = self.source.read(self.start + offset, min(_INFLATE_READ, self.compressed - offset))
            while raw:
                try:
                    piece = inflater.decompress(raw, _INFLATE_READ)
                except zlib.error as exc:
                    raise self._error(f"does not inflate ({exc})") from exc
                raw = inflater.unconsumed_tail
                done += len(piece)
                if done > self.inflated:
                    raise self._error(f"inflates to more than the {self.inflated:,} bytes its zip entry declares "
                                      "(a zip bomb or a damaged archive); ckptview stopped inflating it")
                crc = zlib.crc32(piece, crc)
                if skip:
                    piece, skip = piece[skip:], max(0, skip - len(piece))
                if piece:
                    yield piece
        if done != self.inflated or crc != self.crc:
            raise self._error(f"inflates to {done:,} bytes (declared {self.inflated:,}) with a checksum that does "
                              "not match: the archive is damaged")

    def _error(self, what: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(self.path, f"member {self.name} {what}. Copy the file again or re-save it "
                                                 "with numpy.savez_compressed.")

    def _array(self, data: bytes | bytearray) -> np.ndarray:
        values = np.frombuffer(data, dtype=self.dtype)
        return values.byteswap() if self.swap else values

    def decode(self) -> torch.Tensor:
        buffer = bytearray(self.nbytes)
        view, at = memoryview(buffer), 0
        for piece in self._inflate():
            if at + len(piece) > self.nbytes:
                raise self._error("holds more data than its header's shape")
            view[at:at + len(piece)] = piece
            at += len(piece)
        values = self._array(buffer).reshape(self.shape, order="F" if self.fortran else "C")
        import torch  # listing needs no torch (it takes a second to import); values do

        return torch.from_numpy(values.copy() if self.swap else values)

    def chunks(self, chunk_bytes: int) -> Iterator[torch.Tensor]:
        """The elements in order, `chunk_bytes // itemsize` at a time; memory bounded by a chunk and one read."""
        import torch

        step = max(1, chunk_bytes // self.dtype.itemsize) * self.dtype.itemsize
        pending = io.BytesIO()
        for piece in self._inflate():
            pending.write(piece)
            if pending.tell() >= step:
                data = pending.getvalue()
                whole = len(data) // step * step
                for start in range(0, whole, step):
                    yield torch.from_numpy(self._array(data[start:start + step]).copy())
                pending = io.BytesIO()
                pending.write(data[whole:])
        rest = pending.getvalue()
        if len(rest) % self.dtype.itemsize:
            raise self._error("ends inside an element")
        if rest:
            yield torch.from_numpy(self._array(rest).copy())

