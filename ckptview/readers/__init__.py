"""
Readers: the only code that opens files or knows formats. `open_checkpoint` looks at the
content (magic bytes, zip members, JSON), never at the extension, and returns a `Checkpoint`.
"""

from __future__ import annotations

import contextlib
import contextvars
import gc
import os
import stat
from collections.abc import Iterator

from ckptview.errors import (
    CheckpointNotFoundError,
    CheckpointPermissionError,
    CkptviewError,
    CorruptCheckpointError,
    ShardError,
    UnsupportedFormatError,
)
from ckptview.readers.model import (
    PROMOTE_AT,
    Checkpoint,
    PickledObject,
    PickleImport,
    TensorEntry,
    TensorInfo,
    gc_paused,
)
from ckptview.readers.pickle_opcodes import reads_as_pickle
from ckptview.readers.registry import EMPTY_ZIP_MAGIC, HEAD_BYTES, ZIP_MAGIC, Probe, find_format, supported
from ckptview.readers.remote import is_url
from ckptview.readers.sniff import not_a_checkpoint

__all__ = ["open_checkpoint", "Checkpoint", "TensorEntry", "TensorInfo", "PickledObject", "PickleImport"]

_CODE_VERDICT_ONLY = contextvars.ContextVar("ckptview_code_verdict_only", default=False)
_TAR_BLOCK = 512  # the smallest tar: one header block


@contextlib.contextmanager
def code_verdict_only() -> Iterator[None]:
    """
    Files opened inside are opened for `scan`: a reader may leave out checks that only say whether
    the file is well formed, never those that say whether loading it runs code. A safetensors
    file holds no code, and validating a million-tensor header took 2.4 of `scan`'s 3.3 s.
    """
    token = _CODE_VERDICT_ONLY.set(True)
    try:
        yield
    finally:
        _CODE_VERDICT_ONLY.reset(token)


def code_verdict_only_requested() -> bool:
    return _CODE_VERDICT_ONLY.get()


def open_checkpoint(path: str | os.PathLike[str], *, trust: bool = False, shard_of: str | None = None) -> Checkpoint:
    """`ckptview.open`. `shard_of` names the index a shard is opened for: a shard must be a
    checkpoint file itself (not a folder or another index), and messages about it never quote
    its content, since the user did not name it."""
    path = os.fsdecode(path)  # a bytes path too, as open() takes one
    if is_url(path):
        from ckptview.readers.remote import open_remote

        return open_remote(path, trust=trust)
    if path.startswith("~") and not os.path.lexists(path):
        # "~/models/x.pt" typed in a notebook: no shell expands it there (a folder really named "~" wins)
        path = os.path.expanduser(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise CheckpointNotFoundError(path, "no such file or directory: check the path (and the current directory, "
                                            f"{os.getcwd()})") from None
    except PermissionError as exc:
        raise CheckpointPermissionError(path, "permission denied while looking it up: check the permissions of "
                                              "its folders") from exc
    except OSError as exc:
        raise CkptviewError(path, f"cannot look it up: {exc.strerror or exc}") from exc
    if stat.S_ISDIR(info.st_mode) and shard_of is None:
        from ckptview.readers.directory import open_directory

        with gc_paused(), _errors_as_ours(path, "this checkpoint folder"):
            return open_directory(path, trust=trust)
    if not stat.S_ISREG(info.st_mode):
        raise UnsupportedFormatError(path, "not a regular file (a device, socket or pipe); give the path of a "
                                           "checkpoint file")
    if shard_of is None and os.path.basename(path) == ".metadata" and _beside_dcp_data(path):
        # a DCP checkpoint's index, which dcp.load reads with its data files: alone it read as a bare pickle,
        # whose classes (DCP's own, pathlib's) were called foreign code
        from ckptview.readers.dcp import read_dcp

        with gc_paused(), _errors_as_ours(path, "this checkpoint folder"):
            return read_dcp(os.path.dirname(os.path.abspath(path)), trust=trust)
    try:
        with open(path, "rb") as stream:
            head = stream.read(HEAD_BYTES)
    except PermissionError as exc:
        raise CheckpointPermissionError(path, "permission denied: this user may not read the file. Fix its "
                                              "permissions (chmod/chown) or copy it somewhere readable") from exc
    except OSError as exc:
        raise CkptviewError(path, f"cannot read it: {exc.strerror or exc}") from exc
    with gc_paused():
        made_before = gc.get_count()[0]  # not zero inside a caller's pause (a training run's)
        ckpt = _open_file(path, head, info.st_size, trust=trust, shard_of=shard_of)
        if gc.get_count()[0] - made_before >= PROMOTE_AT and not code_verdict_only_requested():
            # listed now, inside the pause, the entries move to the oldest generation with the records
            # they name; listed later, in a pause of their own, they are too few to move, and the next
            # young collection walked all of them (8 ms for 20,000)
            ckpt.tensors()
        return ckpt


def _beside_dcp_data(path: str) -> bool:
    try:
        with os.scandir(os.path.dirname(os.path.abspath(path))) as entries:
            return any(entry.name.endswith(".distcp") for entry in entries)
    except OSError:
        return False


def _open_file(path: str, head: bytes, size: int, *, trust: bool, shard_of: str | None) -> Checkpoint:
    if size == 0:
        raise CorruptCheckpointError(path, "the file is empty (0 bytes): the save or copy that made it never wrote "
                                           "any data. Save or copy it again.")
    fmt = find_format(Probe(path, head, size))
    if shard_of is not None and (fmt is None or fmt.name == "sharded"):
        raise ShardError(shard_of, f"its shard {os.path.basename(path)} is not a checkpoint file ckptview reads "
                                   "(shards are safetensors or torch.save files, not indexes): re-download the set.")
    if fmt is not None:
        read_as_pickle_too = fmt.name != "torch-legacy" and not head.startswith(ZIP_MAGIC)
        try:
            with _errors_as_ours(path, fmt.label):
                ckpt = fmt.read(path, size, trust=trust)
        except CkptviewError as exc:
            # a file torch.load would read as a pickle (no zip): what that reading imports counts
            error = exc
            if read_as_pickle_too and not getattr(exc, "named_globals", None):
                from ckptview.readers.torch_pickle import naming

                error = naming(exc, _named_when_read_as_pickle(path, head, size))
            if error is exc:
                raise
            raise error from exc
        if read_as_pickle_too:
            _scan_pickle_reading(ckpt, head, size)
        return ckpt
    if head.startswith(EMPTY_ZIP_MAGIC):
        raise UnsupportedFormatError(path, f"an empty zip archive, not a checkpoint; {supported()}.")
    from ckptview.readers.torch_pickle import legacy_tar_imports, naming

    # torch.load reads any tar that holds a `storages` member as its pre-1.0 format, and any other file
    # that is no zip as a pickle, importing what it names until it fails
    named = (legacy_tar_imports(path) if size >= _TAR_BLOCK else None)
    if named is None:
        named = _named_when_read_as_pickle(path, head, size)
    raise naming(UnsupportedFormatError(path, not_a_checkpoint(head)), named)


def _scan_pickle_reading(ckpt: Checkpoint, head: bytes, size: int) -> None:
    """
    torch.load(weights_only=False) unpickles every file that is not a zip or tar archive, whatever
    its name: a safetensors, GGUF, TFLite or HDF5 file whose first bytes also step as pickle opcodes
    (a header length of 0x80 0x02 'c'..., a userblock) would import what that reading names. When
    the first bytes read so, the file is scanned as a pickle too and what it names joins the
    checkpoint's `pickle_imports`, so `scan` never calls such a polyglot safe.
    """
    named = _named_when_read_as_pickle(ckpt.path, head, size)
    if named:
        known = {imp.name for imp in ckpt.pickle_imports}
        ckpt.pickle_imports = ckpt.pickle_imports + tuple(imp for imp in named if imp.name not in known)
        ckpt.details["imports_when_read_as_pickle"] = [imp.name for imp in named]


def _named_when_read_as_pickle(path: str, head: bytes, size: int) -> list[PickleImport]:
    """What torch.load(weights_only=False) imports reading the file as a pickle, when its first bytes read as one."""
    if not reads_as_pickle(head, whole=size <= len(head)):
        return []
    from ckptview.readers.torch_pickle import read_pickle_stream

    try:
        with read_pickle_stream(path, size, trust=False) as as_pickle:
            return list(as_pickle.pickle_imports)
    except CkptviewError as exc:  # damaged as a pickle, but what it named before failing torch imports too
        return list(getattr(exc, "named_globals", []))


@contextlib.contextmanager
def _errors_as_ours(path: str, what: str) -> Iterator[None]:
    """
    The last line of defence behind each reader's own checks: whatever a damaged or hostile file
    makes a library raise becomes a CkptviewError in our words (the original stays its cause).
    """
    try:
        yield
    except CkptviewError:
        raise
    except MemoryError as exc:
        raise CorruptCheckpointError(path, f"reading it as {what} would need more memory than this machine has: its "
                                           "headers declare sizes the file cannot hold. It is damaged or "
                                           "crafted; get the original file.") from exc
    except RecursionError as exc:
        raise CorruptCheckpointError(path, f"read as {what}, its structure is nested too deeply: it is damaged or "
                                           "crafted. Get the original file.") from exc
    except Exception as exc:  # the readers' libraries (zipfile, json, struct, protobuf...) raise many kinds
        raise CorruptCheckpointError(path, f"it looks like {what} but its structure is damaged or unlike what the "
                                           f"writer produces ({type(exc).__name__} while reading it). Re-save or "
                                           "re-download it.") from exc
