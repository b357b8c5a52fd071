"""
torch.save files: the zip archive (torch >= 1.6) and the legacy stream of pickles.

Both are read with `SafeUnpickler`: the pickle is parsed, every tensor becomes a `TensorInfo`
pointing at its storage's bytes in the file, and nothing is read beyond the pickle itself.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import pickle
import struct
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import repeat
from typing import Any

from ckptview.errors import (
    CkptviewError,
    CorruptCheckpointError,
    TruncatedCheckpointError,
    UnsupportedFormatError,
    printable,
)
from ckptview.readers.dtypes import ITEMSIZE, itemsize
from ckptview.readers.model import Checkpoint, FileSource, PickleImport, RefusedPickle, Storage
from ckptview.readers.pickle_opcodes import globals_named
from ckptview.readers.pickle_scan import MemoryBomb, RefusedAt, pickle_extent, unframed
from ckptview.readers.registry import supported
from ckptview.readers.remote import source_for
from ckptview.readers.unpickler import (
    MAX_ELEMENTS,
    SafeUnpickler,
    StorageRef,
    StorageType,
    arrays_as_tensors,
    built_numpy_arrays,
    foreign_globals,
    resolve_persistent_id,
)
from ckptview.readers.weights_only import weights_only_obstacle
from ckptview.readers.zip_directory import (
    DEFLATED,
    LOCAL_HEADER_BYTES,
    STORED,
    BadZip,
    ChecksumMismatch,
    Member,
    NoEndRecord,
    data_offset,
    refuse_overlapping_members,
    read_directory,
    read_member,
)

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

# What the C unpickler and our stand-ins raise on a malformed pickle; all become one clear error.
PICKLE_ERRORS = (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, KeyError,
                 IndexError, struct.error, UnicodeDecodeError, RecursionError, MemoryError, ImportError,
                 OverflowError, SystemError, AssertionError, RuntimeError, MemoryBomb)

# A zip member holding a pickle may not declare more than this (2 GiB: 300 times a 20,000-tensor data.pkl).
_MAX_PICKLE_BYTES = 1 << 31
# A legacy file's views are checked in the first pass against this, the storage's own size in the second.
_STORAGE_SIZE_NOT_YET_KNOWN = 1 << 62


# What a refused pickle "imports" when torch.load could read on from the refusal in more than one way:
# anything, so a polyglot's scan (a safetensors file that is also a pickle) never calls it safe.
UNKNOWN_IMPORTS = "<unknown: a pickle frame splits an opcode>"
UNRESOLVED_IMPORT = "<unknown: a damaged pickle names globals ckptview cannot tell>"
TORCHSCRIPT_CODE = "<TorchScript code: torch.load runs it through torch.jit.load>"


def _why(exc: BaseException) -> str:
    """What a pickle failure means, in our words (the library's own text stays in the exception's cause)."""
    if isinstance(exc, (RefusedPickle, MemoryBomb)):
        return str(exc)
    if isinstance(exc, EOFError) or "truncated" in str(exc):
        return "it ends in the middle of a pickle (the file was cut off)"
    if isinstance(exc, MemoryError):
        return "it declares more data than the file holds"
    if isinstance(exc, RecursionError):
        return "it is nested too deeply"
    return "its pickle opcodes do not form a valid pickle"


def unpickle(data: bytes | mmap.mmap, path: str, what: str, storage_for: Any = None,
             unpicklers: list[SafeUnpickler] | None = None, start: int = 0, *, writer: str = "torch.save",
             loader: str = "torch.load(weights_only=False)",
             persistent_load: Callable[[Any], Any] | None = None,
             own_classes: frozenset[str] = frozenset()) -> tuple[Any, SafeUnpickler, int]:
    """
    Unpickle the pickle at `start` of `data`; return its value, its unpickler and the offset just
    past it. `unpicklers`, when given, collects the unpickler even when the pickle is damaged, so
    the globals it named before failing are known. `writer` and `loader` name, in the message
    about a damaged pickle, what writes such files and what would unpickle this one.
    `persistent_load`: see `SafeUnpickler`. `own_classes`: the loader's own, which a damaged pickle's
    message does not count as code (DCP's metadata classes).
    """
    refused = None
    try:
        end, frames = pickle_extent(data, start)
    except RefusedAt as exc:
        # the C unpickler must not see what was refused, but what torch.load imports on the way to it counts
        end, frames, refused = exc.offset, exc.frames, exc
    unpickler = SafeUnpickler(unframed(data, start, end, frames), storage_for, persistent_load)
    if unpicklers is not None:
        unpicklers.append(unpickler)
    try:
        if refused is not None:
            with contextlib.suppress(CkptviewError, *PICKLE_ERRORS):
                unpickler.load()
            raise refused
        value = unpickler.load()
    except CkptviewError:
        raise
    except PICKLE_ERRORS as exc:
        # pickle imports a global's module when it meets the opcode, before the pickle fails; so do the
        # pickles unpickled before this one
        named = merge_imports(unpicklers) if unpicklers is not None else unpickler.pickle_imports()
        if isinstance(exc, RefusedAt) and exc.unknown_after:
            named.append(PickleImport(UNKNOWN_IMPORTS, 1))
        if type(exc) is not pickle.UnpicklingError and not isinstance(exc, EOFError):
            # not where every unpickler stops (no such opcode, a stack underflow, the end of the data):
            # torch's may read on where this one refused, or its stand-ins failed where real objects
            # would not, so the globals the rest of the pickle names count too
            named += _named_without_unpickling(data, start, known={imp.name for imp in named})
        named = [imp for imp in named if imp.name not in own_classes]
        error = CorruptCheckpointError(
            path, f"{what} cannot be read: {_why(exc)}. The file is damaged or was not written by {writer}; "
                  f"re-save it, or copy it again.{_named_sentence(named, 'the damage', loader)}",
        )
        error.named_globals = named
        raise error from exc
    if built_numpy_arrays(unpickler):
        value = arrays_as_tensors(value, path)
    return value, unpickler, end


# Read opcode by opcode in Python (~3 MB/s), so a damaged pickle's failure costs at most ~3 s; what lies
# beyond counts as an unknown global.
_READ_WITHOUT_UNPICKLING = 8 << 20


def _named_without_unpickling(data: Any, start: int, known: set[str]) -> list[PickleImport]:
    """The foreign globals the opcodes from `start` to the pickle's STOP name (`globals_named`), less `known`."""
    pairs, unresolved, stopped = globals_named(data, start, start + _READ_WITHOUT_UNPICKLING)
    counts = foreign_globals(pairs)
    if unresolved or not stopped:
        counts[UNRESOLVED_IMPORT] += 1
    return [PickleImport(name, count) for name, count in sorted(counts.items()) if name not in known]


def _named_sentence(named: list[PickleImport], failure: str | None,
                   loader: str = "torch.load(weights_only=False)") -> str:
    """The sentence that says what a refused file's pickles name, `failure` saying up to where (None: all of it)."""
    if not named:
        return ""
    listed = ", ".join(printable(imp.name) for imp in named[:5]) + (" …" if len(named) > 5 else "")
    return (f" {f'Before {failure} it' if failure else 'It'} names {listed}, which {loader} would import and may "
            "call: do not load it.")


def naming(exc: CkptviewError, named: list[PickleImport], failure: str | None = None,
           loader: str = "torch.load(weights_only=False)") -> CkptviewError:
    """`exc` again, its message saying what the file's pickles name (`_named_sentence`) and carrying them
    as `named_globals`, which `scan` reports as code; `exc` itself where it names some already."""
    if not named or getattr(exc, "named_globals", None) or type(exc).__init__ is not CkptviewError.__init__:
        return exc
    error = type(exc)(exc.path, exc.reason + _named_sentence(named, failure, loader))
    error.named_globals = named
    return error


@contextlib.contextmanager
def code_named_before_failing(named_so_far: list[SafeUnpickler] | Callable[[], list[PickleImport]],
                              loader: str = "torch.load(weights_only=False)",
                              failure: str | None = "that point") -> Iterator[None]:
    """
    torch.load unpickles as it reads and fails where ckptview does (a storage the archive lacks, a
    protocol record it does not know, storages cut off after the data pickle), having imported and
    perhaps called what the pickles named up to there. An error raised inside carries those globals
    (`named_globals`, which `scan` reports as code) and says so (`naming`, with `failure`). `named_so_far`:
    the unpicklers of the pickles read, or what gives the globals they named, asked only when the error
    names none yet (it may read the file again).
    """
    try:
        yield
    except CkptviewError as exc:
        if getattr(exc, "named_globals", None):
            raise
        error = naming(exc, named_so_far() if callable(named_so_far) else merge_imports(named_so_far), failure,
                       loader)
        if error is exc:
            raise
        raise error from exc


def zip_members(path: str, read: Callable[[int, int], bytes], size: int, *, writer: str = "torch.save") -> list[Member]:
    """The archive's directory (`read_directory`), its failures said in one line naming `writer`."""
    try:
        return read_directory(read, size)
    except NoEndRecord as exc:
        raise TruncatedCheckpointError(
            path, f"the zip archive has no end-of-archive directory (the file is {size:,} bytes): it was cut off "
                  f"while copying, downloading or saving. Copy it again or re-save it with {writer}.",
        ) from exc
    except (BadZip, UnicodeDecodeError, struct.error) as exc:
        raise CorruptCheckpointError(path, f"the zip archive's directory is damaged ({exc}). Re-save it with "
                                           f"{writer}.") from exc


# torch.save never compresses; a re-zipped archive may deflate (miniz, torch's zip reader, inflates
# it). Real pickles deflate a few times over; a member claiming more is a bomb, refused unread.
_MAX_INFLATION = 100
_SLACK_BYTES = 1 << 20


def checked_member_bytes(read: Callable[[int, int], bytes], member: Member, path: str,
                         limit: int = _MAX_PICKLE_BYTES, *, writer: str = "torch.save",
                         loader: str = "torch.load(weights_only=False)") -> bytes:
    """A member's bytes, checked before any inflation: method, encryption and declared size. `loader` is
    named where a pickle member fails its checksum: it unpickles the member all the same."""
    name = printable(member.name)
    if member.flag_bits & 0x1:
        raise CorruptCheckpointError(path, f"archive member {name} is encrypted; {writer} never encrypts, so "
                                           "the file was re-packed. Get the original file.")
    if member.compress_type not in (STORED, DEFLATED):
        raise CorruptCheckpointError(path, f"archive member {name} is compressed with a method torch cannot read "
                                           f"(zip method {member.compress_type}); {writer} never compresses. Get "
                                           "the original file.")
    ratio_limit = member.compress_size * _MAX_INFLATION + _SLACK_BYTES
    if member.file_size > limit or (member.compress_type != STORED and member.file_size > ratio_limit):
        raise CorruptCheckpointError(path, f"archive member {name} declares {member.file_size:,} bytes from "
                                           f"{member.compress_size:,} stored: far beyond what a checkpoint's pickle "
                                           "needs (a zip bomb?). ckptview did not inflate it.")
    try:
        # torch reads no CRC (its miniz is built with MINIZ_DISABLE_ZIP_READER_CRC32_CHECKS) and writes 0
        # where it computed none: only a recorded one that disagrees says the bytes changed
        return read_member(read, member, zero_crc_unchecked=True)
    except BadZip as exc:
        # torch unpickles a pickle member whatever its checksum: what it names counts
        named = (_named_without_unpickling(exc.data, 0, known=set())
                 if isinstance(exc, ChecksumMismatch) and member.name.endswith(".pkl") else [])
        error = CorruptCheckpointError(
            path, f"archive member {name} is damaged (its stored checksum or header does not match): the file was "
                  f"corrupted after saving. Copy it again or re-save it with {writer}."
                  + _named_sentence(named, None, loader),
        )
        if named:
            error.named_globals = named
        raise error from exc
    except (OSError, EOFError, ValueError, zlib.error) as exc:
        raise CorruptCheckpointError(path, f"archive member {name} cannot be read: its compressed data is "
                                           "damaged. Re-save the file.") from exc


def archive_prefix(path: str, names: list[str], *, loader: str = "torch.load") -> str:
    """
    The folder every member of a torch zip sits in, found as torch finds it: the first central
    directory entry's folder (torch's PyTorchStreamReader). Archives torch would read differently
    from Python's zipfile are refused: repeated names (torch reads one copy, zipfile the other)
    and members outside that folder (torch refuses the archive).
    """
    if not names or "/" not in names[0]:
        raise UnsupportedFormatError(path, "a zip archive, but not one written by torch.save (its first member is "
                                           f"not in a folder); {supported()}.")
    prefix = names[0].split("/", 1)[0] + "/"
    if len(set(names)) != len(names):
        counts = Counter(names)
        repeated = next(name for name, count in counts.items() if count > 1)
        raise CorruptCheckpointError(path, f"the archive holds {counts[repeated]} members named "
                                           f"{printable(repeated)}: zip readers disagree on which one is read, so "
                                           f"what ckptview lists is not what {loader} would run. Do not load this file.")
    if not all(map(str.startswith, names, repeat(prefix))):  # in C: a torch archive has a member per storage
        outside = next(name for name in names if not name.startswith(prefix))
        raise CorruptCheckpointError(path, f"member {printable(outside)} lies outside the archive's folder "
                                           f"{printable(prefix)}: torch's writers never write that, and {loader} "
                                           "refuses it. Re-save the file.")
    return prefix


def _named_in_data_pkl(read: Callable[[int, int], bytes], listed: list[Member], path: str) -> list[PickleImport]:
    """What the data.pkl torch.load would unpickle names, read without unpickling: every copy of it
    where the archive repeats the name (torch reads one of them, which one depends on its zip reader);
    and, for a TorchScript archive, the code torch.jit.load runs."""
    prefix = listed[0].name.split("/", 1)[0] + "/" if listed else ""
    wanted = prefix + "data.pkl"
    counts: Counter[str] = Counter()
    if listed and is_torchscript_archive([member.name for member in listed], prefix):
        counts[TORCHSCRIPT_CODE] += 1
    for member in listed:
        if member.name != wanted:
            continue
        if member.file_size > _READ_WITHOUT_UNPICKLING:
            counts[UNRESOLVED_IMPORT] += 1
            continue
        try:
            named = _named_without_unpickling(checked_member_bytes(read, member, path), 0, known=set())
        except CkptviewError as exc:  # one torch cannot read either (encrypted, bzip2), or its checksum fails
            named = getattr(exc, "named_globals", [])
        for imported in named:
            counts[imported.name] += imported.count
    return [PickleImport(name, count) for name, count in sorted(counts.items())]


def is_torchscript_archive(names: list[str], prefix: str) -> bool:
    """torch.jit.save writes constants.pkl and a code/ folder beside data.pkl; torch.save does not.
    torch.load hands any archive with a constants.pkl to torch.jit.load, which runs its code."""
    return prefix + "constants.pkl" in names or any(map(str.startswith, names, repeat(prefix + "code/")))


def read_torch_zip(path: str, size: int, *, trust: bool) -> Checkpoint:
    """A torch.save zip archive, or a TorchScript archive (format "torchscript")."""
    source = source_for(path)  # a URL reads through ranged requests
    parsed = parse_torch_zip(source, path, size)
    format_name = "torchscript" if is_torchscript_archive(parsed.names, parsed.prefix) else "torch-zip"
    details: dict[str, Any] = {"archive_prefix": parsed.prefix.rstrip("/"), "byteorder": parsed.byteorder,
                               "members": len(parsed.names),
                               "weights_only": weights_only_obstacle(parsed.protocol, parsed.unpickler.allowed_named)}
    if parsed.unsaved_storages:
        details["problems"] = [
            f"{parsed.unsaved_storages:,} storage(s) hold no values: torch.save ran under "
            "torch.serialization.skip_data(), which writes zeros where their bytes go, to be filled later. The "
            "shapes and dtypes are real, the values are not (torch.load reads them as zeros): fill them, or save "
            "the model again without skip_data."]
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
    protocol: int | None  # of data.pkl; None: 0 or 1 (no PROTO opcode)
    unsaved_storages: int  # storages torch.save skipped (`Storage.unsaved`)


def parse_torch_zip(source: Any, path: str, file_size: int, base_offset: int = 0, length: int | None = None) -> ParsedZip:
    """
    Parse the data.pkl of a torch zip whose `length` bytes (to the end of the file when None) start
    at `base_offset` of `source` (0 for a file; DCP embeds one torch.save archive per item inside
    its .distcp files). `path` names the file in messages.
    """
    archive_size = file_size - base_offset if length is None else length

    def archive_reader(read_source: Callable[[int, int], bytes]) -> Callable[[int, int], bytes]:
        """Reads of the archive's bytes (offsets from its start, cut at its end) from reads of the file's."""
        return lambda offset, count: read_source(base_offset + offset, max(0, min(count, archive_size - offset)))

    read = archive_reader(source.read)

    listed = zip_members(path, read, archive_size)
    # refused where torch.load would unpickle data.pkl all the same (members that overlap, a repeated
    # name, a storage re-zipped with deflate, ...): what data.pkl names counts
    with code_named_before_failing(lambda: _named_in_data_pkl(read, listed, path), failure=None):
        return _parse_listed(source, path, file_size, base_offset, archive_reader, listed)


def _parse_listed(source: Any, path: str, file_size: int, base_offset: int,
                  archive_reader: Callable[[Callable[[int, int], bytes]], Callable[[int, int], bytes]],
                  listed: list[Member]) -> ParsedZip:
    """`parse_torch_zip` past the archive's directory (`listed`)."""
    read = archive_reader(source.read)
    refuse_overlapping_members(path, listed, "the archive")
    names = [member.name for member in listed]
    members = {member.name: member for member in listed}
    prefix = archive_prefix(path, names)
    if prefix + "data.pkl" not in members:
        if prefix + "byteorder" in members or prefix + ".data/serialization_id" in members:  # torch.save's own records
            raise CorruptCheckpointError(path, "a torch.save archive without its data.pkl: torch.save stopped before "
                                               "writing it (the object could not be pickled, or the save was "
                                               "interrupted), so it holds no checkpoint. Save it again.")
        sample = ", ".join(printable(name) for name in names[:5]) + (" …" if len(names) > 5 else "")
        raise UnsupportedFormatError(path, f"a zip archive, but not one written by torch.save (no data.pkl; it "
                                           f"holds {sample}); {supported()}.")
    byteorder = "little"
    if prefix + "byteorder" in members:
        byteorder = checked_member_bytes(read, members[prefix + "byteorder"], path, limit=64).decode("ascii", "replace").strip()
        if byteorder not in ("little", "big"):
            raise CorruptCheckpointError(path, "the archive's byteorder record is neither 'little' nor 'big': the "
                                               "file is damaged. Re-save it.")

    data_folder = prefix + "data/"
    # torch.save records every member's CRC-32, except with compute_crc32 off (all 0) and, under
    # torch.serialization.skip_data(), the storages whose bytes it left as zeros (0 beside a data.pkl
    # that has one)
    crc_checked = members[prefix + "data.pkl"].crc != 0
    unsaved_keys: set[str] = set()
    key_prefix = f"{base_offset}:" if base_offset else ""  # DCP: keys unique across the archives of one file

    # storage key -> where its member's local header is: ints, which the garbage collector never
    # walks, where keeping the archive's Member records alive for locate would add one per storage
    header_offsets: dict[str, int] = {}

    def locate(storage: Storage, read_source: Callable[[int, int], bytes] | None) -> int:
        key = storage.key[len(key_prefix):]
        return _storage_offset(read if read_source is None else archive_reader(read_source), data_folder + key,
                               header_offsets[key], path, storage.nbytes, base_offset, file_size)

    new, fill, new_ref = object.__new__, object.__setattr__, tuple.__new__

    def storage_for(dtype: str, key: str, location: str, numel: int, view_metadata: Any) -> Storage:
        member = members.get(data_folder + key)
        if member is None:
            raise CorruptCheckpointError(path, f"data.pkl refers to storage {key!r} but the archive has no "
                                               f"member {prefix}data/{key}: the file is incomplete. Re-save it.")
        nbytes = numel * (ITEMSIZE.get(dtype) or itemsize(dtype))
        if member.compress_type != STORED:
            raise UnsupportedFormatError(path, f"archive member {prefix}data/{key} is compressed; torch.save never "
                                               "compresses, so the file was re-zipped. Unzip and re-zip it with "
                                               "`zip -0` (store only), or re-save it with torch.save.")
        if member.file_size < nbytes:
            raise CorruptCheckpointError(path, f"storage {key!r} should hold {nbytes:,} bytes but its archive "
                                               f"member has {member.file_size:,}: the file is damaged. Re-save it.")
        header_offsets[key] = member.header_offset
        unsaved = crc_checked and member.crc == 0 and member.file_size > 0
        if unsaved:
            unsaved_keys.add(key)
        return Storage(key_prefix + key, source, -1, nbytes, location, byteorder, locate, unsaved)

    def persistent_load(saved_id: Any) -> Any:
        """
        A storage reference as torch.save writes it, resolved in this one call (a 20,000-tensor
        file makes 20,000): every field plain and in bounds, its member present, stored and large
        enough. Anything else goes the general way, which says what is wrong.
        """
        if type(saved_id) is tuple and len(saved_id) == 5:
            kind, storage_type, key, location, numel = saved_id
            if (kind == "storage" and type(storage_type) is StorageType and type(key) is str
                    and type(location) is str and type(numel) is int and 0 <= numel <= MAX_ELEMENTS):
                member = members.get(data_folder + key)
                dtype = storage_type.dtype
                nbytes = numel * (ITEMSIZE.get(dtype) or itemsize(dtype))
                if (member is not None and member.compress_type == STORED and member.file_size >= nbytes
                        and (member.crc or not crc_checked)):
                    header_offsets[key] = member.header_offset
                    # what storage_for returns, made without Storage.__init__'s frame
                    storage = new(Storage)
                    fill(storage, "__dict__", {"key": key_prefix + key, "source": source, "offset": -1,
                                               "nbytes": nbytes, "location": location, "byteorder": byteorder,
                                               "locate": locate})
                    return new_ref(StorageRef, (storage, dtype))
        return resolve_persistent_id(saved_id, storage_for)

    data = checked_member_bytes(read, members[prefix + "data.pkl"], path)
    unpicklers: list[SafeUnpickler] = []
    with code_named_before_failing(unpicklers):
        root, unpickler, _ = unpickle(data, path, "its data.pkl", storage_for, unpicklers,
                                      persistent_load=persistent_load)
    return ParsedZip(root, unpickler, names, prefix, byteorder, pickle_protocol(data), len(unsaved_keys))


def _storage_offset(read: Callable[[int, int], bytes], name: str, header_offset: int, path: str, nbytes: int,
                    base_offset: int, file_size: int) -> int:
    """Where a storage's bytes start in the file, from its member's local header (read on first use)."""
    try:
        offset = base_offset + data_offset(read, name, header_offset)
    except BadZip as exc:
        if base_offset + header_offset + LOCAL_HEADER_BYTES > file_size:
            raise TruncatedCheckpointError(path, f"archive member {printable(name)} starts beyond the end of the "
                                                 "file: it was cut off. Copy it again.") from exc
        raise CorruptCheckpointError(path, f"archive member {printable(name)} has a damaged local header (it "
                                           "disagrees with the archive's directory): the file was corrupted or "
                                           "tampered with. Get the original file.") from exc
    if offset + nbytes > file_size:
        key = name.rsplit("/", 1)[-1]
        raise TruncatedCheckpointError(path, f"storage {key!r} runs to byte {offset + nbytes:,} but the file ends at "
                                             f"{file_size:,}: it was cut off. Copy it again.")
    return offset


def _refuse_tar(path: str) -> None:
    """torch.load first tries a file as the pre-1.0 tar format and unpickles the tar's members; a
    pickle-looking file that is also a valid tar would be read as the tar, so it is refused."""
    named = legacy_tar_imports(path)
    if named is None:
        return
    raise naming(UnsupportedFormatError(path, "a tar archive (the pre-1.0 torch.save format): torch.load would "
                                              "unpickle its members, which ckptview does not list. Load it once with "
                                              "torch.load in a trusted environment and re-save it with torch.save."),
                 named)


def legacy_tar_imports(path: str) -> list[PickleImport] | None:
    """
    What torch.load(weights_only=False) would import from a file it reads as its pre-1.0 tar format,
    or None when Python's tarfile (torch's reader) does not open it. torch unpickles, in this order:
    in the `storages` member a count, then per storage its (key, location, storage type) before the
    storage's count and bytes, then the views; in `tensors` a count, then per tensor its (key,
    storage, type) before its sizes; then the `pickle` member. They are read here the same way, up
    to where torch would fail; a member that is no regular file counts as unknown globals.
    """
    import tarfile  # only tar-looking files get here: its import (and bz2's, lzma's) is 1.5 ms of every command

    members: dict[str, Any] = {}  # the last member of each name torch reads, as its getmember finds it
    try:
        with open(path, "rb") as raw, tarfile.open(fileobj=_HeaderReads(raw), mode="r:") as tar:
            while (member := tar.next()) is not None:
                if member.name in ("storages", "tensors", "pickle"):
                    members[member.name] = member
                tar.members.clear()  # a tar of a million files is stepped through, not held
    except _HeaderTooLarge:
        # torch would read it whole and go on: what lies past it is not known
        return [PickleImport("<unknown: a tar header of more than 16 MB, which ckptview does not read>", 1)]
    except (tarfile.TarError, OSError, EOFError, ValueError, UnicodeDecodeError):
        return None
    unpicklers: list[SafeUnpickler] = []
    unknown: list[PickleImport] = []
    try:
        with mapped(path) as data:
            _step_legacy_tar(data, path, members, unpicklers, unknown)
    except CkptviewError as exc:
        named = getattr(exc, "named_globals", None)
        if named:
            return named + unknown
    return merge_imports(unpicklers) + unknown


class _HeaderTooLarge(Exception):
    pass


class _HeaderReads:
    """A file for tarfile to step through headers with: it reads a pax or GNU long-name header whole,
    so a header claiming gigabytes would be read into memory; a read of more than 16 MB raises."""

    _LIMIT = 16 << 20

    def __init__(self, raw: Any) -> None:
        self._raw = raw

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0 or size > self._LIMIT:
            raise _HeaderTooLarge()
        return self._raw.read(size)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()


def _step_legacy_tar(data: Any, path: str, members: dict[str, Any], unpicklers: list[SafeUnpickler],
                     unknown: list[PickleImport]) -> None:
    def member_at(name: str) -> tuple[int, int] | None:
        member = members.get(name)
        if member is None:
            return None  # torch's extract fails (KeyError) before reading on
        if not member.isfile() or member.issparse():
            unknown.append(PickleImport(f"<unknown: tar member {printable(name)} is no regular file; torch.load "
                                        "would read what it points to>", 1))
            return None
        return member.offset_data, member.offset_data + member.size

    def load(position: int, what: str) -> tuple[Any, int]:
        value, _, after = unpickle(data, path, what, unpicklers=unpicklers, start=position)
        return value, after

    def records(member: str, what: str, length_after: Callable[[Any, int], int | None]) -> int | None:
        """A count, then that many records, each before as many bytes as `length_after(record, offset)`
        says; where the member's pickles end, or None where torch stops reading."""
        bounds = member_at(member)
        if bounds is None:
            return None
        position, end = bounds
        count, position = load(position, f"the tar's {what} count")
        for _ in range(count if type(count) is int else 0):
            if position >= end:
                return None  # torch meets the member's end: EOFError
            record, position = load(position, f"a {what} record of the tar")
            length = length_after(record, position)
            if length is None or position + length > end:
                return None
            position += length
        return position

    def storage_bytes(record: Any, position: int) -> int | None:
        if not (type(record) is tuple and len(record) == 3 and isinstance(record[2], StorageType)):
            return None  # torch fails taking it apart, or on a stand-in's _dtype
        numel = int.from_bytes(data[position:position + 8], "little", signed=True)
        return 8 + numel * itemsize(record[2].dtype) if numel >= 0 else None

    def tensor_sizes(record: Any, position: int) -> int | None:
        ndim = int.from_bytes(data[position:position + 4], "little", signed=True)
        return 4 + 4 + 16 * ndim + 8 if ndim >= 0 else None  # ndim, padding, sizes and strides, offset

    views_at = records("storages", "storage", storage_bytes)
    if views_at is None:
        return
    load(views_at, "the tar's storage views")
    if records("tensors", "tensor", tensor_sizes) is None:
        return
    pickled = member_at("pickle")
    if pickled is not None:
        load(pickled[0], "the tar's pickle")


@contextlib.contextmanager
def mapped(path: str) -> Iterator[mmap.mmap | bytes]:
    """A file's bytes, mapped: the pickles in it are sliced out, never the data after them."""
    with open(path, "rb") as raw:
        if os.fstat(raw.fileno()).st_size == 0:
            yield b""  # an empty file cannot be mapped
            return
        with mmap.mmap(raw.fileno(), 0, access=mmap.ACCESS_READ) as data:
            yield data


def read_pickle_stream(path: str, size: int, *, trust: bool) -> Checkpoint:
    """A legacy torch.save file (magic number, protocol, sys info, data, storage keys, raw storages),
    or any other pickle, listed the same safe way. Every pickle torch.load would unpickle is scanned."""
    _refuse_tar(path)
    unpicklers: list[SafeUnpickler] = []
    with code_named_before_failing(unpicklers):
        return _read_pickle_stream(path, size, trust, unpicklers)


def _read_pickle_stream(path: str, size: int, trust: bool, unpicklers: list[SafeUnpickler]) -> Checkpoint:
    with mapped(path) as data:
        first, first_unpickler, offset = unpickle(data, path, "its first pickle", unpicklers=unpicklers)
        protocol_used = pickle_protocol(data)
        if first != _LEGACY_MAGIC:
            # torch.load unpickles this first pickle, then stops: it is not a torch file
            return Checkpoint(path, "pickle", first, file_size=size, pickle_imports=first_unpickler.pickle_imports(),
                              trust=trust, details={"note": "a plain Python pickle, not written by torch.save"})
        protocol, _, offset = unpickle(data, path, "its protocol version", unpicklers=unpicklers, start=offset)
        if protocol != _LEGACY_PROTOCOL:
            raise CorruptCheckpointError(path, f"legacy torch file with unknown protocol version {printable(protocol)}"
                                               "; load it with the torch that wrote it and re-save it.")
        sys_info, _, offset = unpickle(data, path, "its system-info record", unpicklers=unpicklers, start=offset)
        little_endian = not isinstance(sys_info, dict) or sys_info.get("little_endian", True) is not False

        # Storage bytes follow the pickles, so their offsets are known only after the key list:
        # record the storages first, then read the data pickle again with their offsets.
        data_start = offset
        described: dict[str, tuple[str, str]] = {}

        def record(dtype: str, key: str, location: str, numel: int, view_metadata: Any) -> Storage:
            described.setdefault(key, (dtype, location))
            # the size a view is checked against: the storage's own count is read in the second pass
            return Storage(key=key, source=None, offset=0, nbytes=_STORAGE_SIZE_NOT_YET_KNOWN,  # type: ignore[arg-type]
                           location=location)

        # counted here, where a failure after it is raised, and not again in the second reading
        _, _, offset = unpickle(data, path, "its data pickle", record, unpicklers, start=data_start)
        keys, _, offset = unpickle(data, path, "its storage key list", unpicklers=unpicklers, start=offset)
        data_pickle = data[data_start:offset]
    if not isinstance(keys, list) or not all(isinstance(key, (str, int)) for key in keys):
        raise CorruptCheckpointError(path, "its storage key list is not a list of keys: the file is damaged. "
                                           "Re-save it.")
    source = FileSource(path)
    storages: dict[str, Storage] = {}
    for key in map(str, keys):
        dtype, location = described.get(key, ("uint8", "cpu"))
        count_bytes = source.read(offset, 8) if offset + 8 <= size else b""
        if len(count_bytes) < 8:
            raise TruncatedCheckpointError(path, f"the file ends at byte {size:,} before storage {printable(key)}: it "
                                                 "was cut off. Copy it again or re-save it.")
        (numel,) = struct.unpack("<q" if little_endian else ">q", count_bytes)
        nbytes = numel * itemsize(dtype)
        if numel < 0 or offset + 8 + nbytes > size:
            raise TruncatedCheckpointError(path, f"storage {printable(key)} needs {nbytes:,} bytes from byte "
                                                 f"{offset + 8:,} but the file ends at {size:,}: it was cut off. "
                                                 "Copy it again.")
        storages[key] = Storage(key=key, source=source, offset=offset + 8, nbytes=nbytes, location=location,
                                byteorder="little" if little_endian else "big")
        offset += 8 + nbytes

    def storage_for(dtype: str, key: str, location: str, numel: int, view_metadata: Any) -> Storage:
        storage = storages.get(key)
        if storage is None:
            raise CorruptCheckpointError(path, f"the data refers to storage {printable(key)}, which the file does not "
                                               "hold: it is incomplete. Re-save it.")
        if view_metadata:
            if not (isinstance(view_metadata, tuple) and len(view_metadata) == 3
                    and all(type(v) is int for v in view_metadata[1:])):
                raise RefusedPickle("a storage view is not (key, offset, size)")
            _, view_offset, view_size = view_metadata
            element = itemsize(dtype)
            if view_offset < 0 or view_size < 0 or (view_offset + view_size) * element > storage.nbytes:
                raise RefusedPickle(f"a storage view of {view_size:,} elements at {view_offset:,} reaches past its "
                                    f"storage of {storage.nbytes:,} bytes")
            return Storage(key=f"{key}@{view_offset}", source=source, offset=storage.offset + view_offset * element,
                           nbytes=view_size * element, location=location, byteorder=storage.byteorder)
        return storage

    root, _, _ = unpickle(data_pickle, path, "its data pickle", storage_for)
    imports = merge_imports(unpicklers)
    allowed_named = set().union(*(unpickler.allowed_named for unpickler in unpicklers))
    return Checkpoint(path, "torch-legacy", root, file_size=size, sources=[source], pickle_imports=imports,
                      trust=trust, details={"storages": len(storages),
                                            "weights_only": weights_only_obstacle(protocol_used, allowed_named)})


def pickle_protocol(data: bytes | mmap.mmap) -> int | None:
    """The protocol the pickle at the start of `data` declares with its PROTO opcode; None for
    protocols 0 and 1, which write none."""
    return data[1] if data[:1] == b"\x80" and len(data) > 1 else None


def merge_imports(unpicklers: list[SafeUnpickler]) -> list[PickleImport]:
    """The globals every one of these pickles names outside the allow-list, counted together."""
    counts: Counter[str] = Counter()
    for unpickler in unpicklers:
        for imported in unpickler.pickle_imports():
            counts[imported.name] += imported.count
    return [PickleImport(name, count) for name, count in sorted(counts.items())]
