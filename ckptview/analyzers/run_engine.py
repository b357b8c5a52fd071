"""
Where a run's tasks execute, and the per-file cache of their results.

Engines: `LocalEngine` (threads of this process; the kernels and reads release the GIL) and
`DaskEngine` (one `dask.distributed` task per file; workers open the files themselves and send
back small tables). Both take the same task functions (`run_tasks`), so their results are equal.

Cache (`RunCache`): each file's header scan in a small JSON file named by a hash of the file's
identity (path, size, modification time or ETag), and a run's per-tensor tables in one Parquet
file named by its first checkpoint's identity, each table with the identities of its file and of
the previous checkpoint it was compared with (a drift row is only valid for that pair). A
changed file is recomputed, a new one is the only one read, and a re-run reads one cache file
for its tables: with one Parquet file per checkpoint, reading them took longer than analysing
the new checkpoints.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import CancelledError, ThreadPoolExecutor, as_completed
from dataclasses import asdict
from pathlib import Path
from typing import Any, Union

from ckptview.analyzers.run_tasks import COLUMNS, FileId, Scan
from ckptview.errors import CkptviewError

Cancel = Union[threading.Event, Callable[[], bool], None]
Progress = Union[bool, Callable[[int, int], None]]

# Bumped whenever a task's results change (meaning or last bits), so older cache files are ignored.
CACHE_VERSION = "4"  # 4: the run kernel inlines its kernels (run_kernels: one copy of the code)


def _cancelled(cancel: Cancel) -> bool:
    if cancel is None:
        return False
    return cancel.is_set() if isinstance(cancel, threading.Event) else bool(cancel())


def call_task(function: Callable[..., Any], *args: Any) -> tuple[str, Any]:
    """
    Run a task and return ("ok", result) or ("error", (path, reason)). A `CkptviewError` does not
    survive pickling (its constructor takes two arguments), so a Dask worker sends back its parts.
    """
    try:
        return "ok", function(*args)
    except CkptviewError as exc:
        return "error", (exc.path, exc.reason)


class _Reporter:
    def __init__(self, progress: Progress, total: int, desc: str) -> None:
        self.done = 0
        self.total = total
        self.callback = progress if callable(progress) else None
        self.bar = None
        if progress is True:
            from tqdm.auto import tqdm  # imported here: in a notebook tqdm.auto pulls in ipywidgets

            self.bar = tqdm(total=total, desc=desc, unit="file", leave=False)

    def step(self, count: int = 1) -> None:
        self.done += count
        if self.bar is not None:
            self.bar.update(count)
        if self.callback is not None:
            self.callback(self.done, self.total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _unwrap(outcome: tuple[str, Any]) -> Any:
    status, value = outcome
    if status == "error":
        raise CkptviewError(*value)
    return value


class LocalEngine:
    """Tasks on threads of this process (default: one per CPU)."""

    name = "local"

    def __init__(self, workers: int | None = None) -> None:
        self.workers = max(1, workers or os.cpu_count() or 1)

    def map(self, function: Callable[..., Any], calls: Sequence[tuple[Any, ...]], *, progress: Progress = False,
            cancel: Cancel = None, desc: str = "run", weights: Sequence[int] | None = None,
            finished: Callable[[int, Any], None] | None = None) -> list[Any]:
        """`function(*call)` for each call, in order; as call i ends, `finished(i, result)` (so a cancelled
        map keeps what was done) and progress counts `weights[i]` (files)."""
        with ThreadPoolExecutor(max_workers=min(self.workers, max(1, len(calls))),
                                thread_name_prefix="ckptview-run") as pool:
            futures = {pool.submit(call_task, function, *args): i for i, args in enumerate(calls)}

            def drop_queued() -> None:  # cancel, an error or Ctrl-C: running tasks end, queued ones never start
                for future in futures:
                    future.cancel()

            return _gather(((futures[f], f) for f in as_completed(futures)), len(calls), drop_queued,
                           progress=progress, cancel=cancel, desc=desc, weights=weights, finished=finished)


class DaskEngine:
    """One task per call on a `dask.distributed` cluster; the workers read the files themselves."""

    name = "dask"

    def __init__(self, client: Any) -> None:
        self.client = client

    @property
    def workers(self) -> int:
        return max(1, len(self.client.scheduler_info().get("workers", {})))

    def map(self, function: Callable[..., Any], calls: Sequence[tuple[Any, ...]], *, progress: Progress = False,
            cancel: Cancel = None, desc: str = "run", weights: Sequence[int] | None = None,
            finished: Callable[[int, Any], None] | None = None) -> list[Any]:
        """`function(*call)` for each call, in order; as call i ends, `finished(i, result)` (so a cancelled
        map keeps what was done) and progress counts `weights[i]` (files)."""
        from distributed import as_completed as dask_completed

        if not calls:
            return []
        columns = list(zip(*calls))
        futures = self.client.map(call_task, [function] * len(calls), *columns, pure=False)
        position = {future.key: i for i, future in enumerate(futures)}
        return _gather(((position[f.key], f) for f in dask_completed(futures)), len(calls),
                       lambda: self.client.cancel(futures), progress=progress, cancel=cancel, desc=desc,
                       weights=weights, finished=finished)


def _gather(completed: Iterator[tuple[int, Any]], count: int, drop: Callable[[], None], *, progress: Progress,
            cancel: Cancel, desc: str, weights: Sequence[int] | None,
            finished: Callable[[int, Any], None] | None) -> list[Any]:
    """Results by call index as (index, future) pairs complete, for either engine: `finished` and progress
    per task, and `drop()` (the engine's way to cancel the rest) on cancel, an error or Ctrl-C."""
    results: list[Any] = [None] * count
    weights = weights or [1] * count
    reporter = _Reporter(progress, sum(weights), desc)
    try:
        for index, future in completed:
            results[index] = _unwrap(future.result())
            if finished is not None:
                finished(index, results[index])
            reporter.step(weights[index])
            if _cancelled(cancel):
                raise CancelledError()
    except BaseException:
        drop()
        raise
    finally:
        reporter.close()
    return results


@contextlib.contextmanager
def engine_for(engine: Any, workers: int | None = None) -> Iterator[LocalEngine | DaskEngine]:
    """
    The engine `engine` names, for the duration of a call: "local"; "dask" (a `LocalCluster` of
    `workers` processes, default 2, started now and closed after); a scheduler address
    ("tcp://host:8786"); or a `dask.distributed.Client`.
    """
    if engine in (None, "local"):
        yield LocalEngine(workers)
        return
    if isinstance(engine, (LocalEngine, DaskEngine)):
        yield engine
        return
    try:
        from distributed import Client, LocalCluster
    except ImportError as exc:
        raise CkptviewError(None, "engine='dask' needs dask.distributed: pip install 'ckptview[dask]'") from exc
    if isinstance(engine, Client):
        yield DaskEngine(engine)
        return
    if engine == "dask":
        import logging

        with LocalCluster(n_workers=workers or 2, threads_per_worker=1, processes=True, dashboard_address=None,
                          silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
            yield DaskEngine(client)
        return
    if isinstance(engine, str):
        try:
            client = Client(engine, timeout="10s")
        except OSError as exc:
            raise CkptviewError(None, f"cannot reach the Dask scheduler at {engine} ({exc}): check the address, "
                                      "or leave engine out to run on this machine") from exc
        with client:
            yield DaskEngine(client)
        return
    raise ValueError(f"engine must be 'local', 'dask', a scheduler address or a dask.distributed.Client, not {engine!r}")


def default_cache_dir() -> str:
    """$CKPTVIEW_CACHE_DIR, else ckptview/runs in the user's cache directory ($XDG_CACHE_HOME or ~/.cache)."""
    explicit = os.environ.get("CKPTVIEW_CACHE_DIR")
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ckptview", "runs")


class RunCache:
    """
    Results on disk under `directory` (created on first write):
    - the header scans of the files of a folder, a JSON file named by a hash of the folder's path,
      each scan under its file's identity (a changed file is another key);
    - the tensor tables of a run, in Parquet files named by a hash of its first checkpoint's identity
      (every drift row of a run is measured against that checkpoint), holding each file's table
      with the identities of the file and of the previous checkpoint it was compared with: the
      first file, and one more for each re-run that added tables (folded back into the first
      now and then). A re-run reads them and recomputes only the tables whose file or previous
      checkpoint changed.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = os.fspath(directory)
        # header scans by folder (folder -> file identity key -> the scan's fields): one file per folder, read
        # once, where a file per checkpoint took 200 opens (~10 ms) of a re-run after ten new checkpoints
        self._scans: dict[str, dict[str, Any]] = {}
        self._unsaved_scans: set[str] = set()
        # what `summaries` last read, for `store_summaries` to copy from: (first checkpoint's key, the Arrow
        # table of each run file read, id of each table handed out -> (that table, its file's index in the
        # list, its first row there, its row count))
        self._read: tuple[str, list[Any], dict[int, tuple[dict[str, list[Any]], int, int, int]]] = ("", [], {})

    def _path(self, fid: FileId, suffix: str) -> str:
        digest = hashlib.sha256(f"{CACHE_VERSION}\x00{fid.key}".encode()).hexdigest()[:40]
        return os.path.join(self.directory, digest[:2], digest + suffix)

    def scan(self, fid: FileId) -> Scan | None:
        stored = self._scan_index(_folder_of(fid.path)).get(fid.key)
        try:
            return Scan(fid, stored["format"], stored["epoch"], stored["step"], stored["scalars"], stored["skipped"])
        except (KeyError, TypeError):  # missing or unreadable: recomputed, never trusted
            return None

    def store_scan(self, scan: Scan) -> None:
        """Keep `scan` for `save_scans` to write."""
        folder = _folder_of(scan.id.path)
        self._scan_index(folder)[scan.id.key] = {k: v for k, v in asdict(scan).items() if k != "id"}
        self._unsaved_scans.add(folder)

    def save_scans(self) -> None:
        """Write the scan index of each folder `store_scan` added to."""
        for folder in sorted(self._unsaved_scans):
            text = json.dumps({"folder": folder, "scans": self._scans[folder]})
            _write_replacing(self._folder_index(folder), lambda path: Path(path).write_text(text, encoding="utf-8"))
        self._unsaved_scans.clear()

    def _scan_index(self, folder: str) -> dict[str, Any]:
        """The folder's stored scans, file identity key -> the scan's fields (read once per folder)."""
        index = self._scans.get(folder)
        if index is None:
            index = {}
            with contextlib.suppress(OSError, ValueError):
                with open(self._folder_index(folder), encoding="utf-8") as handle:
                    stored = json.load(handle)
                if (isinstance(stored, dict) and stored.get("folder") == folder
                        and isinstance(stored.get("scans"), dict)):
                    index = stored["scans"]
            self._scans[folder] = index
        return index

    def _folder_index(self, folder: str) -> str:
        digest = hashlib.sha256(f"{CACHE_VERSION}\x00scans\x00{folder}".encode()).hexdigest()[:40]
        return os.path.join(self.directory, digest[:2], digest + ".scans.json")

    def summaries(self, first: FileId) -> dict[str, tuple[str | None, dict[str, list[Any]]]]:
        """The run's stored tables: file identity key -> (the previous checkpoint's key, the table)."""
        import pyarrow.parquet as pq

        found: dict[str, tuple[str | None, dict[str, list[Any]]]] = {}
        pieces, slices = [], {}
        for path in self._run_files(first):
            try:
                # one read: the metadata comes with it. ParquetFile, not read_table: read_table imports
                # pyarrow.dataset (and pandas), ~0.23 s, more than a re-run after ten new checkpoints takes
                with pq.ParquetFile(path) as stored:
                    table = stored.read()
                meta = json.loads((table.schema.metadata or {})[b"ckptview"])
                if meta.get("first") != first.key or not table.schema.remove_metadata().equals(_schema()):
                    break
                columns = {c: _column_values(table.column(c)) for c in COLUMNS} if table.num_rows else {}
                start, tables = 0, {}
                for key, prev, rows in meta["files"]:
                    tables[key] = (prev, {c: columns[c][start:start + rows] if columns else [] for c in COLUMNS},
                                   start, rows)
                    start += rows
            except (OSError, KeyError, TypeError, ValueError):
                break  # missing or unreadable: what it held is recomputed, never trusted
            for key, (prev, values, start, rows) in tables.items():
                # a later file's table for a checkpoint replaces an earlier one (its previous checkpoint changed)
                found[key] = (prev, values)
                slices[id(values)] = (values, len(pieces), start, rows)
            pieces.append(table)
        self._read = (first.key, pieces, slices)
        return found

    def store_summaries(self, first: FileId, entries: Sequence[tuple[FileId, FileId | None, dict[str, list[Any]]]]) -> None:
        """
        Store the run's tables, `entries`: (file, the previous checkpoint, its table) each. Tables this
        cache returned from `summaries` stay where they were read: the new ones go to one more small
        file beside them (a re-run after ten new checkpoints writes their rows, not the run's: rewriting
        every row was the largest fixed cost of such a re-run). Past `_MAX_RUN_FILES` files, or when the
        new tables outweigh the stored ones, everything is written into the first file again, taken from
        the files read as they were (not converted again).
        """
        read_first, pieces, slices = self._read
        if read_first != first.key:
            pieces, slices = [], {}

        def place_of(table: dict[str, list[Any]]) -> tuple[Any, int, int, int] | None:
            place = slices.get(id(table))
            return place if place is not None and place[0] is table else None

        placed = [(fid, prev, table, place_of(table)) for fid, prev, table in entries]
        held = [place for *_, place in placed if place is not None]
        new = [(fid, prev, table) for fid, prev, table, place in placed if place is None]
        if not new:
            return  # every table is in the files already
        held_rows = sum(place[3] for place in held)
        new_rows = sum(len(table[COLUMNS[0]]) for _, _, table in new)
        files = self._run_files(first)
        if held and len(pieces) < _MAX_RUN_FILES and new_rows <= held_rows:
            self._write_run_file(files[len(pieces)], first, [_arrow_table([table for _, _, table in new])],
                                 [(fid, prev, len(table[COLUMNS[0]])) for fid, prev, table in new])
            return
        parts, rows_of, run = [], [], []
        for fid, prev, table, place in placed:
            if place is not None:
                if run:
                    parts.append(_arrow_table(run))
                    run = []
                parts.append(pieces[place[1]].slice(place[2], place[3]))
            else:
                run.append(table)
            rows_of.append((fid, prev, len(table[COLUMNS[0]])))
        if run or not parts:
            parts.append(_arrow_table(run))
        self._write_run_file(files[0], first, parts, rows_of)
        for added in files[1:]:  # what they held is in the first file now (or was computed again)
            with contextlib.suppress(OSError):
                os.unlink(added)

    def _run_files(self, first: FileId) -> list[str]:
        """The run's table files: the first, then the ones each re-run added, in the order to read them."""
        base = self._path(first, "")
        return [base + ".run.parquet"] + [f"{base}.run.{number}.parquet" for number in range(1, _MAX_RUN_FILES)]

    def _write_run_file(self, path: str, first: FileId, parts: list[Any],
                        files: list[tuple[FileId, FileId | None, int]]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        meta = {"first": first.key, "files": [(fid.key, _key(prev), rows) for fid, prev, rows in files]}
        table = pa.concat_tables(parts).replace_schema_metadata({b"ckptview": json.dumps(meta).encode()})
        # dictionary pages for the names only: tried on the float columns too (pyarrow's default) they
        # doubled the write, each value being distinct
        _write_replacing(path, lambda temporary: pq.write_table(table, temporary, use_dictionary=list(_TEXT_COLUMNS),
                                                                write_statistics=False))


# A run's tables live in its first file and up to this many minus one added by re-runs
_MAX_RUN_FILES = 8


# Each column's Arrow type, given rather than inferred: a table read back and one made from new rows concatenate
_TEXT_COLUMNS = ("name", "part", "param", "slot", "dtype")
_TYPES = {**dict.fromkeys(_TEXT_COLUMNS, "string"), "numel": "int64", "finite": "int64", "nan": "int64",
          "posinf": "int64", "neginf": "int64"}


def _schema() -> Any:
    import pyarrow as pa

    return pa.schema([(c, pa.type_for_alias(_TYPES.get(c, "float64"))) for c in COLUMNS])


def _arrow_table(tables: Sequence[Mapping[str, list[Any]]]) -> Any:
    import pyarrow as pa

    return pa.Table.from_pydict({c: [value for t in tables for value in t[c]] for c in COLUMNS}, schema=_schema())


def _column_values(column: Any) -> Sequence[Any]:
    import pyarrow as pa

    if column.null_count:
        return column.to_pylist()
    if column.type in (pa.int64(), pa.float64()):
        return _numpy_view(column.combine_chunks())  # the run's summary reads each checkpoint's rows as one array
    if pa.types.is_string(column.type):
        # a run's names repeat in every checkpoint: each distinct one made once, in half the time of to_pylist
        import numpy as np

        encoded = column.combine_chunks().dictionary_encode()
        return np.asarray(encoded.dictionary.to_pylist(), dtype=object)[_numpy_view(encoded.indices)].tolist()
    return column.to_pylist()


def _numpy_view(array: Any) -> Any:
    """A numpy view of an Arrow array of integers or floats without nulls: to_numpy() imports pandas
    (~0.3 s of a `ckptview timeline` re-run, whose tables all come from this cache)."""
    import numpy as np
    import pyarrow as pa

    kind = "f" if pa.types.is_floating(array.type) else "i"
    dtype = np.dtype(f"={kind}{array.type.bit_width // 8}")  # Arrow keeps native byte order
    return np.frombuffer(array.buffers()[1], dtype=dtype, count=len(array), offset=array.offset * dtype.itemsize)


def _write_replacing(path: str, write: Callable[[str], Any]) -> None:
    # written beside and renamed: a reader never sees half a file, and two runs writing one entry agree
    os.makedirs(os.path.dirname(path), exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    os.close(handle)
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _folder_of(path: str) -> str:
    """The folder of a path or URL (a URL's path is split at its last slash)."""
    return path.rpartition("/")[0] if "://" in path else os.path.dirname(os.path.abspath(path))


def _key(fid: FileId | None) -> str | None:
    return None if fid is None else fid.key
