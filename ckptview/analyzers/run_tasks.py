"""
The work of a run, one task per file: what a worker (a thread here, a Dask worker elsewhere) does
with one checkpoint, returning small plain data. The tasks are top-level functions of picklable
arguments, so Dask can send them to other processes and machines, where they open the files
themselves.

- `scan(path)`: headers only: the file's identity (size and modification time), format, epoch,
  step and the scalars it holds (losses, metrics, learning rates). Run order comes from these.
- `summarize(cur, prev, first)`: reads the checkpoint's tensors once, in chunks, and for each
  chunk of a model tensor also the same chunk of the previous checkpoint and of the first, so
  three compiled kernels (`kernels.moments`, and `kernels.diff` twice) see it while it is in the
  CPU cache: norms, NaN/Inf counts, and the change from the previous and from the first
  checkpoint in one pass. Optimizer tensors (Adam moments) get the moments only.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import math
import mmap
import os
import re
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np
from ckptview.lazy import torch

from ckptview.analyzers.sections import find_sections, model_state_dict
from ckptview.analyzers.training import optimizer_parameter_names, plain, training_state
from ckptview.errors import CkptviewError
from ckptview.readers.model import (
    Checkpoint,
    FileSource,
    ScratchBuffers,
    TensorEntry,
    TensorInfo,
    repeated_view,
    storage_identity,
    view_identity,
    views_beyond_their_storage,
)
from ckptview.readers.remote import RemoteSource

# Elements per chunk: 1 MiB of float32, so a chunk is still in L2 when the second and third kernel read it.
CHUNK_ELEMENTS = 256 * 1024

# Where training scripts keep their scalars; the container's own name is dropped (metrics.val_acc -> val_acc).
_SCALAR_CONTAINERS = {"metrics", "progress", "stats", "log", "logs", "results", "scores", "train", "training"}
_EPOCH_KEYS = ("epoch", "epochs", "current_epoch")
_STEP_KEYS = ("global_step", "step", "steps", "iteration", "iter", "iterations", "num_updates", "total_steps")
_MAX_SCALARS = 200  # a checkpoint with thousands of numbers in its metadata is not logging metrics


@dataclass(frozen=True)
class FileId:
    """
    A checkpoint file as it is now. `version` changes whenever the file does (its modification time
    in ns, or a remote ETag), so results cached under a `FileId` are never reused for changed bytes.
    """

    path: str
    size: int
    version: str

    @property
    def key(self) -> str:
        return f"{self.path}\x00{self.size}\x00{self.version}"


def file_id(path: str) -> FileId:
    """The identity of `path` now: for a folder (a sharded or DCP checkpoint), its files' sizes and times together."""
    from ckptview.readers.remote import is_url, remote_file_id

    if is_url(path):
        size, version = remote_file_id(path)
        return FileId(path, size, version)
    info = os.stat(path)
    if not os.path.isdir(path):
        return FileId(path, info.st_size, str(info.st_mtime_ns))
    size, latest = 0, info.st_mtime_ns
    for entry in os.scandir(path):
        if entry.is_file():
            child = entry.stat()
            size += child.st_size
            latest = max(latest, child.st_mtime_ns)
    return FileId(path, size, str(latest))


@dataclass(frozen=True)
class Scan:
    """What the headers of one file say (or, with `skipped`, why it is left out of the run)."""

    id: FileId
    format: str = ""
    epoch: float | None = None
    step: float | None = None
    scalars: Mapping[str, float] = field(default_factory=dict)
    skipped: str = ""


def scan(path: str, trust: bool = False, keep: bool = False) -> Scan:
    """Open `path` (headers only) and read its epoch, step and scalars; a file that cannot be read, or that
    changes while it is read (still being written), comes back with `skipped` saying why. `keep`: leave the
    parsed checkpoint in `OPEN_CHECKPOINTS` for this process's tasks (the local engine), not parse it twice."""
    import ckptview

    try:
        before = file_id(path)
    except OSError as exc:
        return Scan(FileId(path, -1, ""), skipped=f"cannot be read: {exc.strerror or exc}")
    try:
        with OPEN_CHECKPOINTS.use(before, trust) if keep else ckptview.open(path, trust=trust) as ckpt:
            fmt = ckpt.format
            scalars = checkpoint_scalars(ckpt)
    except CkptviewError as exc:
        return Scan(before, skipped=_still_being_written(path, before) or exc.reason)
    changed = _still_being_written(path, before)
    if changed:
        return Scan(before, skipped=changed)
    return Scan(before, fmt, _first_of(scalars, _EPOCH_KEYS), _first_of(scalars, _STEP_KEYS), scalars)


def _still_being_written(path: str, before: FileId) -> str:
    try:
        after = file_id(path)
    except OSError:
        return "it disappeared while being read"
    if after != before:
        return (f"it is still being written (its size went from {before.size:,} to {after.size:,} bytes while "
                "ckptview read it); it joins the run once the save has finished")
    return ""


def _first_of(scalars: Mapping[str, float], keys: tuple[str, ...]) -> float | None:
    for key in keys:
        value = scalars.get(key)
        if value is not None and math.isfinite(value):
            return value
    return None


def checkpoint_scalars(ckpt: Checkpoint) -> dict[str, float]:
    """
    The numbers a checkpoint holds beside its tensors, by name: epoch, step, losses and metrics
    (from its progress and metadata entries, `metrics.val_acc` named `val_acc`), the learning rate
    of each optimizer group (`lr`, `lr_group1`, ...; the scheduler's last lr when there is no
    optimizer), the score a Lightning `ModelCheckpoint` monitors (named by its monitor), and
    numeric safetensors metadata.
    """
    scalars: dict[str, float] = {}
    for key, value in ckpt.metadata.items():
        number = _number(value)
        if number is not None:
            scalars[key] = number
    sections = find_sections(ckpt)
    for section in sections:
        if section.kind in ("progress", "metadata") and len(section.path) == 1:
            _collect(ckpt.get(section.path), section.path, scalars)
    optimizers = [s for s in sections if s.kind == "optimizer"]
    if optimizers:
        groups = ckpt.get(optimizers[0].path).get("param_groups") or []
        for index, group in enumerate(groups):
            lr = _number(plain(group.get("lr"))) if isinstance(group, Mapping) else None
            if lr is not None:
                scalars["lr" if index == 0 else f"lr_group{index}"] = lr
    else:
        for scheduler in training_state(ckpt).schedulers:
            last = scheduler.get("_last_lr") if isinstance(scheduler, Mapping) else None
            if isinstance(last, list) and last and _number(last[0]) is not None:
                scalars["lr"] = _number(last[0])  # type: ignore[assignment]
                break
    _lightning_scores(ckpt.root, scalars)
    return scalars


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, np.generic) and np.issubdtype(type(value), np.number):
        return float(value)
    # a loss saved as the tensor itself (`"loss": loss`, as PyTorch's own checkpoint tutorial saves it)
    if isinstance(value, TensorInfo) and value.numel == 1 and value.layout == "strided" and value.storage is not None \
            and not value.dtype.startswith("complex") and value.dtype != "bool":
        return float(plain(value))
    if isinstance(value, str) and re.fullmatch(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*", value):
        return float(value)
    return None


def _collect(node: Any, path: tuple[Any, ...], out: dict[str, float], depth: int = 0) -> None:
    if len(out) >= _MAX_SCALARS or depth > 3:
        return
    number = _number(node)
    if number is not None:
        parts = [str(p) for p in path]
        if len(parts) > 1 and parts[0].lower() in _SCALAR_CONTAINERS:
            parts = parts[1:]
        out.setdefault(".".join(parts), number)
        return
    if isinstance(node, Mapping):
        for key, value in node.items():
            _collect(value, path + (key,), out, depth + 1)


def _lightning_scores(root: Any, out: dict[str, float]) -> None:
    callbacks = root.get("callbacks") if isinstance(root, Mapping) else None
    if not isinstance(callbacks, Mapping):
        return
    for key, state in callbacks.items():
        if not str(key).startswith("ModelCheckpoint") or not isinstance(state, Mapping):
            continue
        monitor = state.get("monitor")
        if not isinstance(monitor, str):
            found = re.search(r"'monitor': '([^']+)'", str(key))
            monitor = found.group(1) if found else None
        score = _number(plain(state.get("current_score")))
        if monitor and score is not None:
            out.setdefault(monitor, score)


# --- the per-checkpoint pass ---------------------------------------------------------------------

# One row per floating-point tensor; every value a plain number or string, so a result is a table.
COLUMNS = ("name", "part", "param", "slot", "dtype", "numel", "finite", "mean", "m2", "min", "max", "nan", "posinf",
           "neginf", "prev_dd", "prev_aa", "first_dd", "first_aa")


class _OpenCheckpoints:
    """
    Checkpoints kept open between tasks of one process: task i reads checkpoints i, i-1 and 0, so
    the first stays open for the whole run and each file is opened about once, not three times
    (opening a 25 MB training checkpoint parses its pickle: ~3 ms). The header scan leaves its
    parsed checkpoints here too, so a file's task does not parse it again. One is closed only when
    no task is reading it: closing a file another thread reads would hand its descriptor number to
    the next file opened.

    Bounds: at most `capacity` checkpoints holding `max_tensors` tensors in all (the oldest idle ones
    go first); idle ones beyond the `files` most recently used keep no file descriptor (a
    `FileSource` opens its file again on the next read), so a run of thousands of files does not
    exhaust them. A checkpoint with another kind of source (HDF5, a decoded tensor) is closed, not
    kept, once it falls out of those `files`.
    """

    def __init__(self, capacity: int = 1024, files: int = 8, max_tensors: int = 250_000) -> None:
        self.capacity = capacity
        self.files = files
        self.max_tensors = max_tensors
        # key -> [checkpoint, users, its tensor count, whether it may hold descriptors]
        self._entries: OrderedDict[tuple[FileId, bool], list[Any]] = OrderedDict()
        # the idle ones that may hold descriptors, least recently used first: what a release looks at, so
        # it costs the same with 10 or 10,000 checkpoints open (a walk of them all was 0.4 ms per file of 200)
        self._holding: OrderedDict[tuple[FileId, bool], None] = OrderedDict()
        self._tensors = 0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def use(self, fid: FileId, trust: bool) -> Iterator[Checkpoint]:
        import ckptview

        key = (fid, trust)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                entry[1] += 1
                self._entries.move_to_end(key)
                self._holding.pop(key, None)
        if entry is None:
            opened = ckptview.open(fid.path, trust=trust)
            with self._lock:
                entry = self._entries.get(key)
                if entry is None:
                    entry = self._entries[key] = [opened, 1, len(opened.tensors()), True]
                    self._tensors += entry[2]
                else:  # another thread opened it meanwhile
                    entry[1] += 1
                    opened.close()
        entry[3] = True  # may hold descriptors again
        try:
            yield entry[0]
        finally:
            with self._lock:
                entry[1] -= 1
                if not entry[1]:
                    self._holding[key] = None
                    self._holding.move_to_end(key)
                self._evict()

    def _evict(self) -> None:
        if len(self._entries) > self.capacity or self._tensors > self.max_tensors:
            victims, entries, tensors = [], len(self._entries), self._tensors
            for key, entry in self._entries.items():  # least recently used first
                if entries <= self.capacity and tensors <= self.max_tensors:
                    break
                if not entry[1]:
                    victims.append(key)
                    entries, tensors = entries - 1, tensors - entry[2]
            for key in victims:
                self._drop(key)
        while len(self._holding) > self.files:
            key, _ = self._holding.popitem(last=False)
            entry = self._entries[key]
            if all(type(source) in (FileSource, RemoteSource) for source in entry[0]._sources):
                entry[0].close()  # its descriptors only: the sources reopen on their next read
                entry[3] = False
            else:
                self._drop(key)

    def _drop(self, key: tuple[FileId, bool]) -> None:
        checkpoint, _, tensors, _ = self._entries.pop(key)
        self._holding.pop(key, None)
        self._tensors -= tensors
        checkpoint.close()

    def clear(self) -> None:
        with self._lock:
            for key in [key for key, entry in self._entries.items() if entry[1] == 0]:
                self._drop(key)


OPEN_CHECKPOINTS = _OpenCheckpoints()


# A checkpoint whose floating-point tensors take at most this is read whole into memory and its
# model tensors kept for the next checkpoint of the chain (as its previous) and, for the first, for
# every task: each file is then read once. A larger one is streamed in chunks beside its previous
# and first checkpoint, read again from the file, in memory bounded by a few chunks.
HOLD_BYTES = 256 * 2**20


@dataclass
class _Row:
    """A floating-point tensor of a checkpoint and what its row says about it."""

    entry: TensorEntry
    name: str
    part: str
    param: str = ""
    slot: str = ""


def _tensor_rows(ckpt: Checkpoint) -> list[_Row]:
    """The checkpoint's readable floating-point tensors: its model's (by state-dict name), then the others by path."""
    def compute() -> list[_Row]:
        model = _model(ckpt)
        rows = [_Row(entry, name, "model") for name, entry in model.items() if _readable_float(entry)]
        model_paths = {entry.path for entry in model.values()}
        param_names = _optimizer_names(ckpt, model)
        for entry in ckpt.tensors():  # made once per checkpoint (the open checkpoints count them), not walked again
            path = entry.path
            if path in model_paths:
                continue
            owner = path[:-1]
            if not _readable_float(entry) or (owner in param_names and path[-1] == "step"):
                continue  # Adam's step counter is a float tensor, not a moment
            if owner in param_names:
                rows.append(_Row(entry, entry.name, "optimizer", param_names[owner], str(path[-1])))
            else:
                rows.append(_Row(entry, entry.name, "other"))
        if len({storage_identity(row.entry.info.storage) for row in rows}) == len(rows):
            return rows  # a storage per tensor, as nearly every file has: no view repeats another's bytes
        # views that would read their storage many times over are left out, as statistics leave them
        distinct: dict[Any, TensorInfo] = {}
        for row in rows:
            distinct.setdefault(view_identity(row.entry.info), row.entry.info)
        beyond = views_beyond_their_storage(distinct.values())
        return [row for row in rows
                if view_identity(row.entry.info) not in beyond and not repeated_view(row.entry.info)]

    return ckpt.cached("run:tensor_rows", compute)


def _fits_in_memory(rows: list[_Row]) -> bool:
    return (all(row.entry.info.is_contiguous() for row in rows)
            and sum(row.entry.nbytes for row in rows) <= HOLD_BYTES)


# Model tensors of one checkpoint in memory, by state-dict name: (shape, the values as a flat tensor).
Held = dict[str, tuple[tuple[int, ...], "torch.Tensor"]]


def _read_whole(entry: TensorEntry, buffer: torch.Tensor) -> torch.Tensor:
    """The tensor's values as a flat tensor of its dtype, read into `buffer` (uint8, its byte size) in one read."""
    if entry.numel == 0:
        return torch.empty(0, dtype=entry.dtype)
    return next(iter(entry.iter_chunks(max(entry.nbytes, 1), buffer=buffer)))


_ALIGN = 64  # every tensor in a held buffer starts on a cache line, so its bit patterns are aligned views

# Held tensors of a local file are views of a memory map of it rather than copies read out of it:
# the copy was a fifth of a warm run's time (23.5 MB per checkpoint at 4-8 GB/s on this machine),
# and MADV_POPULATE_READ maps every page of the page cache in one call instead of a fault per page.
# The cost is a window: a file cut short while its map is read raises SIGBUS, which ends the
# process, where a read raises TruncatedCheckpointError. The window is the milliseconds between
# the populate (which itself fails cleanly, EFAULT, on a file already shorter than its header
# says) and the end of the reduction; a run's files are ones whose size did not change across the
# header scan. Set to False to read every tensor with pread.
MAP_FILES = True
_MADV_POPULATE_READ = 22  # Linux >= 5.14; Python 3.11 does not name it
# madvise through ctypes, which lets go of the GIL for the call (mmap.madvise keeps it): populating a
# 25 MB map takes ~1.5 ms, time the other thread's Python would otherwise wait for.
_MADVISE = None
if sys.platform == "linux":
    _MADVISE = ctypes.CDLL(None, use_errno=True).madvise
    _MADVISE.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


class _FileMaps:
    """Whole-file maps of one checkpoint's local files as uint8 tensors, each made on first use."""

    def __init__(self, fid: FileId | None = None) -> None:
        self._fid = fid
        self._maps: dict[str, tuple[torch.Tensor, Callable[[int, int], bytes]] | None] = {}

    def view(self, entry: TensorEntry) -> torch.Tensor | None:
        """The entry's values as a flat tensor over the map, or None where it is read instead (another
        kind of source, another byte order, a view, a range the read will report as damaged)."""
        info = entry.info
        storage = info.storage
        numel = info.numel
        if (not MAP_FILES or storage is None or type(storage.source) is not FileSource or info.layout != "strided"
                or storage.byteorder != sys.byteorder or not info.is_contiguous() or not numel):
            return None
        itemsize = info.itemsize
        start, size = info.storage_offset * itemsize, numel * itemsize
        if start + size > storage.nbytes:
            return None
        path = storage.source.path
        if path not in self._maps:
            expected = self._fid.size if self._fid is not None and self._fid.path == path else None
            self._maps[path] = _map_file(path, expected)
        mapped = self._maps[path]
        if mapped is None:
            return None
        whole, read_map = mapped
        # a zip member's local header read from the map, not by a system call per tensor (8 % of a profile of the pass)
        offset = storage.data_offset(read_map) + start
        if offset + size > whole.numel() or offset % itemsize:
            return None
        dtype = _TORCH_DTYPES.get(info.dtype) or _TORCH_DTYPES.setdefault(info.dtype, info.torch_dtype)
        return whole[offset:offset + size].view(dtype)


# torch dtypes by name, looked up once: `TensorInfo.torch_dtype` goes through a lazy module attribute,
# 6 us for each of a checkpoint's ~100 tensors
_TORCH_DTYPES: dict[str, torch.dtype] = {}


def _map_file(path: str, expected_size: int | None) -> tuple[torch.Tensor, Callable[[int, int], bytes]] | None:
    """The file's map as a uint8 tensor, and a positional read of its bytes (`FileSource.read`'s shape)."""
    try:
        with open(path, "rb") as stream:
            size = os.fstat(stream.fileno()).st_size
            if not size or (expected_size is not None and size != expected_size):
                return None  # changed since the scan: the reads report what happened
            mapped = mmap.mmap(stream.fileno(), size, access=mmap.ACCESS_COPY)  # private: writable, never written
    except (OSError, ValueError):
        return None
    whole = np.frombuffer(mapped, dtype=np.uint8)
    # EINVAL: a kernel before 5.14, where pages fault in as they are touched
    if _MADVISE is not None and _MADVISE(whole.ctypes.data, size, _MADV_POPULATE_READ) and \
            ctypes.get_errno() == errno.EFAULT:  # cut short since the fstat: read instead, which says so
        del whole  # the map cannot close while an array exports it
        mapped.close()
        return None
    return torch.from_numpy(whole), lambda offset, count: mapped[offset:offset + count]


def _read_rows(rows: list[_Row], buffer: torch.Tensor | None = None,
               maps: _FileMaps | None = None) -> tuple[Held, torch.Tensor]:
    """The rows' values as flat tensors: views of the file's map where `maps` gives one, else read back to
    back into `buffer` (replaced when too small), which is returned too."""
    held: Held = {}
    reads = []
    for row in rows:
        view = maps.view(row.entry) if maps is not None else None
        if view is not None:
            held[row.name] = (row.entry.shape, view)
        else:
            reads.append(row)
    total = _held_bytes(reads)
    space = buffer if buffer is not None and buffer.numel() >= total else torch.empty(total, dtype=torch.uint8)
    offset = 0
    for row in reads:
        held[row.name] = (row.entry.shape, _read_whole(row.entry, space[offset:offset + row.entry.nbytes]))
        offset += -(-row.entry.nbytes // _ALIGN) * _ALIGN
    return held, space


def _read_model(rows: list[_Row], buffer: torch.Tensor | None = None,
                maps: _FileMaps | None = None) -> tuple[Held, torch.Tensor]:
    """The model rows' values (see `_read_rows`) and the buffer of those read."""
    return _read_rows([row for row in rows if row.part == "model"], buffer, maps)


def _held_bytes(rows: list[_Row]) -> int:
    return sum(-(-row.entry.nbytes // _ALIGN) * _ALIGN for row in rows)


class _FirstCheckpoints:
    """The first checkpoint's model tensors, read once per process and shared by every chain. One run's: a
    Dask worker keeps it after the run (at most `HOLD_BYTES`), and a run reading it again saves a read."""

    def __init__(self, capacity: int = 1) -> None:
        self.capacity = capacity
        self._held: OrderedDict[tuple[FileId, bool], Held | None] = OrderedDict()
        self._lock = threading.Lock()  # held while reading: a second chain waits for the first's read

    def get(self, fid: FileId, trust: bool, compute: Any) -> Held | None:
        with self._lock:
            key = (fid, trust)
            if key not in self._held:
                self._held[key] = compute()
                while len(self._held) > self.capacity:
                    self._held.popitem(last=False)
            self._held.move_to_end(key)
            return self._held[key]

    def put(self, fid: FileId, trust: bool, held: Held) -> None:
        # copied out of the file's map or the chain's buffer, back to back in one buffer of its own, so
        # the fused kernel finds every tensor in one array and no map outlives the run
        sizes = [values.numel() * values.element_size() for _, values in held.values()]
        copy = torch.empty(sum(-(-n // _ALIGN) * _ALIGN for n in sizes), dtype=torch.uint8)
        kept: Held = {}
        offset = 0
        for (name, (shape, values)), size in zip(held.items(), sizes):
            part = copy[offset:offset + size]
            part.copy_(values.reshape(-1).view(torch.uint8))
            kept[name] = (shape, part.view(values.dtype))
            offset += -(-size // _ALIGN) * _ALIGN
        with self._lock:
            self._held[(fid, trust)] = kept
            while len(self._held) > self.capacity:
                self._held.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._held.clear()


FIRST_CHECKPOINTS = _FirstCheckpoints()


_MIN_CHAIN = 8  # checkpoints: a chain's re-read previous checkpoint costs about half a checkpoint's pass


def plan_chains(indices: list[int], workers: int) -> list[list[int]]:
    """
    Consecutive run positions cut into chains, one task each: a chain reads each of its files once
    and keeps the model tensors of one for the next, so only a chain's first file reads its previous
    checkpoint again. About four chains per worker: enough to balance the workers and to see
    progress and cancel between chains, few enough that re-read previous checkpoints cost ~1 %. A
    chain is not cut shorter than `_MIN_CHAIN` unless the workers would go without one: a re-run
    after 10 new checkpoints read 5 previous checkpoints again in chains of 2, now 2 in chains of 5.
    """
    runs: list[list[int]] = []
    for index in indices:
        if runs and runs[-1][-1] == index - 1:
            runs[-1].append(index)
        else:
            runs.append([index])
    workers = max(1, workers)
    length = max(1, min(max(math.ceil(len(indices) / (4 * workers)), _MIN_CHAIN), math.ceil(len(indices) / workers)))
    return [run[start:start + length] for run in runs for start in range(0, len(run), length)]


def summarize_chain(ids: tuple[FileId, ...], prev: FileId | None, first: FileId | None,
                    trust: bool = False) -> list[dict[str, list[Any]]]:
    """
    `summarize` for consecutive checkpoints `ids` of a run, each read once: the model tensors of one
    are kept in memory as the next one's previous, and the first checkpoint's once per process.
    `prev`: the checkpoint before `ids[0]`; `first`: the run's first, None when `ids[0]` is it.
    Results equal `summarize` on each checkpoint with its previous and first.
    """
    from ckptview.analyzers import kernels  # numba takes ~0.25 s to import; `import ckptview` should not pay it

    tables = []
    last: tuple[FileId, Held] | None = None  # the previous checkpoint of this chain, in memory
    spare: list[torch.Tensor | None] = [None, None]  # model buffers: one is read into, one holds the previous
    buffers = ScratchBuffers()
    for position, cur in enumerate(ids):
        p = prev if position == 0 else ids[position - 1]
        f = first if first is not None else (ids[0] if position else None)
        with OPEN_CHECKPOINTS.use(cur, trust) as ckpt:
            rows = _tensor_rows(ckpt)
            sides = _held_sides(rows, p, f, last, trust)
            if sides is None:  # this checkpoint, its previous or the first is too large to hold: streamed
                tables.append(summarize(cur, p, f, trust))
                last = None
                continue
            prev_held, first_held = sides
            maps = _FileMaps(cur)
            held, spare[position % 2] = _read_model(rows, spare[position % 2], maps)
            if f is None:
                FIRST_CHECKPOINTS.put(cur, trust, held)
            others = [row for row in rows if row.part != "model"]
            rest, _ = _read_rows(others, buffers.get("read rest", _held_bytes(others), torch.uint8), maps)
            values, prevs, firsts = [], [], []
            for row in rows:
                values.append((held if row.part == "model" else rest)[row.name][1])
                prev_values = first_values = None
                if row.part == "model":
                    prev_values = _same_held(prev_held, row)
                    first_values = prev_values if first_held is prev_held else _same_held(first_held, row)
                prevs.append(prev_values)
                firsts.append(first_values)
            tables.append(_reduce_rows(rows, values, prevs, firsts, kernels, buffers))
            last = (cur, held)
    return tables


# read as bit patterns; float16 is converted. Torch's dtypes, made on first use: a run whose every
# table is cached (`ckptview timeline` after new files land) needs no torch, ~1 s of a process's start
_KERNEL_DTYPE_NAMES = ("bfloat16", "float32", "float64")


def _reduce_rows(rows: list[_Row], values: list[torch.Tensor], prevs: list[torch.Tensor | None],
                 firsts: list[torch.Tensor | None], kernels: Any, buffers: ScratchBuffers) -> dict[str, list[Any]]:
    """
    The table of rows whose values (and previous/first values) are in memory: one compiled call
    (`run_kernels.reduce_segments`) per buffer and float width for the rows whose three sides share
    a dtype the kernels read, `_row_cells` for the others; equal results either way.
    """
    from ckptview.analyzers import run_kernels

    kernel_dtypes = tuple(getattr(torch, name) for name in _KERNEL_DTYPE_NAMES)
    cells: list[tuple[Any, ...] | None] = [None] * len(rows)
    groups: dict[tuple[int, torch.dtype], list[int]] = {}
    for i, (value, prev, first) in enumerate(zip(values, prevs, firsts)):
        if value.dtype in kernel_dtypes and all(v is None or v.dtype == value.dtype for v in (prev, first)):
            groups.setdefault((value.untyped_storage().data_ptr(), value.dtype), []).append(i)
    for (_, dtype), members in groups.items():
        sides = [_Side([values[i] for i in members], dtype), _Side([prevs[i] for i in members], dtype),
                 _Side([firsts[i] for i in members], dtype)]
        if not all(side.ok for side in sides):
            continue  # a side spread over several buffers: the rows go the Python way
        size = len(members)
        shared = [prevs[i] is firsts[i] for i in members]
        first_starts = np.where(shared, run_kernels.SAME_AS_PREV, sides[2].starts)
        acc = np.zeros((size, kernels.MOMENT_SLOTS))
        keys = np.repeat(kernels.new_moments()[1][None], size, axis=0)
        prev_sums = np.zeros((size, kernels.DIFF_SLOTS))
        first_sums = np.zeros((size, kernels.DIFF_SLOTS))
        samples = np.empty(0, dtype=np.float64 if dtype == torch.float64 else np.float32)
        run_kernels.reduce_segments(sides[0].bits, sides[0].starts, sides[0].counts, sides[1].bits, sides[1].starts,
                                    sides[2].bits, first_starts, CHUNK_ELEMENTS, samples, acc, keys, prev_sums,
                                    first_sums)
        # the cells of the whole group from its arrays at once: per row, numpy scalars and key conversions
        # cost more than the compiled pass over a small tensor
        extremes = _keys_to_floats(keys, 8 if dtype == torch.float64 else 4).tolist()
        sums = acc.tolist()
        to_prev = prev_sums[:, 1:3].tolist()
        to_first = first_sums[:, 1:3].tolist()
        for k, i in enumerate(members):
            count, mean, m2, _, nan, posinf, neginf = sums[k]
            low, high = extremes[k] if count else (math.nan, math.nan)
            prev_dd, prev_aa = to_prev[k] if prevs[i] is not None else (math.nan, math.nan)
            first_dd, first_aa = (prev_dd, prev_aa) if shared[k] else to_first[k] if firsts[i] is not None else \
                (math.nan, math.nan)
            row = rows[i]
            cells[i] = (row.name, row.part, row.param, row.slot, row.entry.dtype_name, row.entry.numel, int(count),
                        mean if count else math.nan, m2, low, high, int(nan), int(posinf), int(neginf),
                        prev_dd, prev_aa, first_dd, first_aa)
    for i, row in enumerate(rows):
        if cells[i] is None:
            cells[i] = _row_cells(kernels, buffers, row, values[i], prevs[i], firsts[i])
    return _table(cells)


class _Side:
    """One side (this checkpoint, its previous, the first) of a group of rows: the buffer holding every
    present tensor as bit patterns, and each tensor's element offset in it (`run_kernels.NONE` if absent)."""

    def __init__(self, tensors: list[torch.Tensor | None], dtype: torch.dtype) -> None:
        from ckptview.analyzers import kernels, run_kernels

        itemsize = dtype.itemsize
        present = [t for t in tensors if t is not None and t.numel()]
        self.ok = True
        self.starts = np.full(len(tensors), run_kernels.NONE, dtype=np.int64)
        self.counts = np.array([t.numel() if t is not None else 0 for t in tensors], dtype=np.int64)
        if not present:
            self.bits = kernels.bit_patterns(torch.empty(0, dtype=dtype))
            self.starts = np.array([0 if t is not None else run_kernels.NONE for t in tensors], dtype=np.int64)
            return
        storage = present[0].untyped_storage()
        base = storage.data_ptr()
        usable = storage.nbytes() // itemsize * itemsize
        whole = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (usable,))
        starts = self.starts.tolist()
        for k, (tensor, count) in enumerate(zip(tensors, self.counts.tolist())):
            if tensor is None:
                continue
            # by address, not by asking each tensor for its storage (a new Python object each time): memory
            # inside this storage's range is this storage's
            offset = tensor.data_ptr() - base if count else 0
            if count and (offset < 0 or offset + count * itemsize > usable or offset % itemsize
                          or not tensor.is_contiguous()):
                self.ok = False
                return
            starts[k] = offset // itemsize
        self.starts = np.array(starts, dtype=np.int64)
        self.bits = kernels.bit_patterns(whole.view(dtype))


def _held_of(fid: FileId, trust: bool) -> Held | None:
    """A checkpoint's model tensors read into memory, or None when it is too large to hold (then it is streamed)."""
    with OPEN_CHECKPOINTS.use(fid, trust) as ckpt:
        rows = _tensor_rows(ckpt)
        return _read_model(rows, maps=_FileMaps(fid))[0] if _fits_in_memory(rows) else None


def _held_sides(rows: list[_Row], prev: FileId | None, first: FileId | None, last: tuple[FileId, Held] | None,
                trust: bool) -> tuple[Held | None, Held | None] | None:
    """The previous and first checkpoints' model tensors in memory (the chain's last one, or read now), or
    None when one of the three checkpoints is too large to hold."""
    if not _fits_in_memory(rows):
        return None
    prev_held = None
    if prev is not None:
        prev_held = last[1] if last is not None and last[0] == prev else _held_of(prev, trust)
        if prev_held is None:
            return None
    if first is None or first == prev:
        return prev_held, prev_held
    first_held = FIRST_CHECKPOINTS.get(first, trust, lambda: _held_of(first, trust))
    return None if first_held is None else (prev_held, first_held)


def _same_held(held: Held | None, row: _Row) -> torch.Tensor | None:
    found = held.get(row.name) if held is not None else None
    return found[1] if found is not None and found[0] == row.entry.shape else None


def _table(cells: list[tuple[Any, ...]]) -> dict[str, list[Any]]:
    """The column-wise table of rows of cells (one tuple per row, in `COLUMNS` order)."""
    columns = zip(*cells) if cells else [()] * len(COLUMNS)
    return {column: list(values) for column, values in zip(COLUMNS, columns)}


def summarize(cur: FileId, prev: FileId | None, first: FileId | None, trust: bool = False) -> dict[str, list[Any]]:
    """
    One checkpoint's tensors, streamed in chunks: a column-wise table (`COLUMNS`) with a row per
    floating-point tensor. `part` is "model" (named as `model.state_dict()` names it), "optimizer"
    (with the parameter it belongs to, when known, and its slot, e.g. "exp_avg_sq") or "other".
    Moments are over the finite values (`kernels.moments`); `prev_dd`/`prev_aa` are the sums of
    (cur - prev)**2 and prev**2 over positions finite on both sides (NaN where the previous
    checkpoint has no tensor of that name and shape), `first_*` the same against the first
    checkpoint. The previous and first checkpoints are read beside it, chunk by chunk: memory stays
    bounded by a few chunks whatever the checkpoints' size (`summarize_chain` holds small ones instead).
    """
    from ckptview.analyzers import kernels

    with contextlib.ExitStack() as stack:
        ckpt = stack.enter_context(OPEN_CHECKPOINTS.use(cur, trust))
        prev_model = _model(stack.enter_context(OPEN_CHECKPOINTS.use(prev, trust))) if prev else {}
        if first == prev:
            first_model = prev_model
        else:
            first_model = _model(stack.enter_context(OPEN_CHECKPOINTS.use(first, trust))) if first else {}
        cells = []
        buffers = ScratchBuffers()
        for row in _tensor_rows(ckpt):
            prev_entry = first_entry = None
            if row.part == "model":
                prev_entry, first_entry = _same(prev_model.get(row.name), row.entry), _same(first_model.get(row.name), row.entry)
            cells.append(_row_cells(kernels, buffers, row, row.entry, prev_entry, first_entry))
    return _table(cells)


def _model(ckpt: Checkpoint) -> dict[str, TensorEntry]:
    # a checkpoint stays open across tasks (as cur, then prev, and the first for all): its names are found once
    return ckpt.cached("run:model_state_dict", lambda: model_state_dict(ckpt))


# Floating-point dtypes the run reduces, by torch's name: asking each entry for its torch.dtype cost
# more than the name lookup (float8 types are left out: no kernel reads them, and they hold no moments)
_FLOAT_NAMES = frozenset({"float16", "bfloat16", "float32", "float64"})


def _readable_float(entry: TensorEntry) -> bool:
    info = entry.info
    return info.layout == "strided" and info.storage is not None and info.dtype in _FLOAT_NAMES


def _same(other: TensorEntry | None, entry: TensorEntry) -> TensorEntry | None:
    if other is None or other.shape != entry.shape or not _readable_float(other):
        return None
    return other


def _optimizer_names(ckpt: Checkpoint, model: Mapping[str, TensorEntry]) -> dict[tuple[Any, ...], str]:
    """Path of each parameter's optimizer state (`(..., "state", 3)`) -> the parameter's name ("" when unmapped)."""
    names: dict[tuple[Any, ...], str] = {}
    for path, by_id in optimizer_parameter_names(ckpt, model).items():
        state = ckpt.get(path).get("state")
        if not isinstance(state, Mapping):
            continue
        for key in state:
            names[path + ("state", key)] = by_id.get(str(key), "")
    return names


def _work_dtype(*dtypes: torch.dtype) -> torch.dtype:
    if all(d == torch.bfloat16 for d in dtypes):
        return torch.bfloat16  # the kernels widen bfloat16 in registers: no float32 copy
    return torch.float64 if torch.float64 in dtypes else torch.float32


# Values of a tensor: a `TensorEntry` (streamed from its file) or a flat tensor already in memory.
Values = Union[TensorEntry, "torch.Tensor"]


def _chunks(values: Values, buffers: ScratchBuffers, purpose: str) -> Iterator[torch.Tensor]:
    # The same chunks either way, so the kernels sum in the same order and the results are equal.
    if isinstance(values, torch.Tensor):
        return (values[start:start + CHUNK_ELEMENTS] for start in range(0, values.numel(), CHUNK_ELEMENTS))
    size = CHUNK_ELEMENTS * values.dtype.itemsize
    return values.iter_chunks(size, buffer=buffers.get(purpose, size, torch.uint8))


def _as(chunk: torch.Tensor, buffers: ScratchBuffers, purpose: str, dtype: torch.dtype) -> np.ndarray:
    from ckptview.analyzers import kernels

    if chunk.dtype != dtype:
        chunk = buffers.get(purpose, chunk.numel(), dtype).copy_(chunk)
    return kernels.bit_patterns(chunk)


def _row_cells(kernels: Any, buffers: ScratchBuffers, row: _Row, values: Values, prev: Values | None,
               first: Values | None) -> tuple[Any, ...]:
    from ckptview.analyzers import run_kernels

    dtype = _work_dtype(*(v.dtype for v in (values, prev, first) if v is not None))
    acc, keys = kernels.new_moments()
    samples = np.empty(0, dtype=np.float64 if dtype == torch.float64 else np.float32)
    prev_sums = np.zeros(kernels.DIFF_SLOTS) if prev is not None else None
    # the second checkpoint's previous one is the first: compared once
    first_sums = prev_sums if first is prev else (np.zeros(kernels.DIFF_SLOTS) if first is not None else None)
    sides = [(prev, prev_sums)] if prev is not None else []
    if first is not None and first is not prev:
        sides.append((first, first_sums))
    streams = [_chunks(values, buffers, "read cur")]
    streams += [_chunks(side, buffers, f"read {i}") for i, (side, _) in enumerate(sides)]
    none = np.zeros(1, dtype=np.int64) + run_kernels.NONE
    here = np.zeros(1, dtype=np.int64)
    scratch = np.zeros((1, kernels.DIFF_SLOTS))
    for chunks in zip(*streams):
        bits = _as(chunks[0], buffers, "work cur", dtype)
        other = [_as(chunk, buffers, f"work {i}", dtype) for i, chunk in enumerate(chunks[1:])]
        # the compiled code `_reduce_rows` runs, one chunk at a time: the same results to the last bit
        run_kernels.reduce_segments(
            bits, here, np.array([bits.shape[0]]), other[0] if other else bits[:0], here if other else none,
            other[1] if len(other) > 1 else bits[:0], here if len(other) > 1 else none, max(1, bits.shape[0]),
            samples, acc[None], keys[None], sides[0][1][None] if sides else scratch,
            sides[1][1][None] if len(sides) > 1 else scratch)
    return _cells(kernels, row, dtype, acc, keys, prev_sums, first_sums)


def _keys_to_floats(keys: np.ndarray, width: int) -> np.ndarray:
    """`kernels.key_to_float` over an (n, 2) array of [min key, max key] rows, as float64."""
    if width == 4:
        return (keys ^ ((keys >> 31) & 0x7FFFFFFF)).astype(np.int32).view(np.float32).astype(np.float64)
    return (keys ^ ((keys >> 63) & 0x7FFFFFFFFFFFFFFF)).view(np.float64)


def _cells(kernels: Any, row: _Row, dtype: torch.dtype, acc: np.ndarray, keys: np.ndarray,
           prev_sums: np.ndarray | None, first_sums: np.ndarray | None) -> tuple[Any, ...]:
    entry = row.entry
    count, mean, m2, _, nan, posinf, neginf = acc.tolist()
    width = 8 if dtype == torch.float64 else 4
    low, high = (kernels.key_to_float(k, width) for k in keys.tolist()) if count else (math.nan, math.nan)
    prev_dd, prev_aa = (float(prev_sums[1]), float(prev_sums[2])) if prev_sums is not None else (math.nan, math.nan)
    first_dd, first_aa = (float(first_sums[1]), float(first_sums[2])) if first_sums is not None else (math.nan, math.nan)
    return (row.name, row.part, row.param, row.slot, entry.dtype_name, entry.numel, int(count),
            mean if count else math.nan, m2, low, high, int(nan), int(posinf), int(neginf),
            prev_dd, prev_aa, first_dd, first_aa)
