"""
Where a run's tasks execute, and the per-file cache of their results.

Engines: `LocalEngine` (threads of this process; the kernels and reads release the GIL) and
`DaskEngine` (one `dask.distributed` task per file; workers open the files themselves and send
back small tables). Both take the same task functions (`run_tasks`), so their results are equal.

Cache: one Parquet file per checkpoint, named by a hash of the file's identity (path, size,
modification time or ETag), so a changed file is recomputed and a new one is the only one read.
The table holds the per-tensor rows; the schema metadata the header scan and the identities of
the previous and first checkpoints the rows were compared with (a drift row is only valid for
that pair).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import CancelledError, ThreadPoolExecutor, as_completed
from dataclasses import asdict
from typing import Any, Union

from ckptview.analyzers.run_tasks import COLUMNS, FileId, Scan
from ckptview.errors import CkptviewError

Cancel = Union[threading.Event, Callable[[], bool], None]
Progress = Union[bool, Callable[[int, int], None]]

# Bumped whenever a task's results change meaning, so older cache files are ignored.
CACHE_VERSION = "1"


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
            cancel: Cancel = None, desc: str = "run", weights: Sequence[int] | None = None) -> list[Any]:
        """`function(*call)` for each call, in order; progress counts `weights[i]` (files) when call i ends."""
        results: list[Any] = [None] * len(calls)
        weights = weights or [1] * len(calls)
        reporter = _Reporter(progress, sum(weights), desc)
        with ThreadPoolExecutor(max_workers=min(self.workers, max(1, len(calls))),
                                thread_name_prefix="ckptview-run") as pool:
            futures = {pool.submit(call_task, function, *args): i for i, args in enumerate(calls)}
            try:
                for future in as_completed(futures):
                    index = futures[future]
                    results[index] = _unwrap(future.result())
                    reporter.step(weights[index])
                    if _cancelled(cancel):
                        raise CancelledError()
            except BaseException:  # cancel, an error or Ctrl-C: drop the queued tasks, let running ones end
                for future in futures:
                    future.cancel()
                raise
            finally:
                reporter.close()
        return results


class DaskEngine:
    """One task per call on a `dask.distributed` cluster; the workers read the files themselves."""

    name = "dask"

    def __init__(self, client: Any) -> None:
        self.client = client

    @property
    def workers(self) -> int:
        return max(1, len(self.client.scheduler_info().get("workers", {})))

    def map(self, function: Callable[..., Any], calls: Sequence[tuple[Any, ...]], *, progress: Progress = False,
            cancel: Cancel = None, desc: str = "run", weights: Sequence[int] | None = None) -> list[Any]:
        """`function(*call)` for each call, in order; progress counts `weights[i]` (files) when call i ends."""
        from distributed import as_completed as dask_completed

        if not calls:
            return []
        columns = list(zip(*calls))
        futures = self.client.map(call_task, [function] * len(calls), *columns, pure=False)
        position = {future.key: i for i, future in enumerate(futures)}
        results: list[Any] = [None] * len(calls)
        weights = weights or [1] * len(calls)
        reporter = _Reporter(progress, sum(weights), desc)
        try:
            for future in dask_completed(futures):
                index = position[future.key]
                results[index] = _unwrap(future.result())
                reporter.step(weights[index])
                if _cancelled(cancel):
                    raise CancelledError()
        except BaseException:
            self.client.cancel(futures)
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
    """Per-file Parquet results under `directory` (created on first write)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = os.fspath(directory)

    def _path(self, fid: FileId) -> str:
        digest = hashlib.sha256(f"{CACHE_VERSION}\x00{fid.key}".encode()).hexdigest()[:40]
        return os.path.join(self.directory, digest[:2], digest + ".parquet")

    def _meta(self, fid: FileId) -> dict[str, Any] | None:
        import pyarrow.parquet as pq

        path = self._path(fid)
        if not os.path.exists(path):
            return None
        try:
            metadata = pq.read_schema(path).metadata or {}
            meta = json.loads(metadata[b"ckptview"])
        except (OSError, KeyError, ValueError):  # an unreadable cache file is recomputed, never trusted
            return None
        return meta if meta.get("key") == fid.key else None

    def scan(self, fid: FileId) -> Scan | None:
        meta = self._meta(fid)
        if meta is None:
            return None
        scan = meta["scan"]
        return Scan(fid, scan["format"], scan["epoch"], scan["step"], scan["scalars"], scan["skipped"])

    def summary(self, fid: FileId, prev: FileId | None, first: FileId | None) -> dict[str, list[Any]] | None:
        import pyarrow.parquet as pq

        path = self._path(fid)
        if not os.path.exists(path):
            return None
        try:
            table = pq.read_table(path)  # one read: the metadata comes with the table
            meta = json.loads((table.schema.metadata or {})[b"ckptview"])
        except (OSError, KeyError, ValueError):
            return None
        if (meta.get("key") != fid.key or not meta.get("summary") or meta.get("prev") != _key(prev)
                or meta.get("first") != _key(first)):
            return None
        return table.to_pydict()

    def store(self, scan: Scan, summary: dict[str, list[Any]] | None = None, prev: FileId | None = None,
              first: FileId | None = None) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        fid = scan.id
        scan_meta = {k: v for k, v in asdict(scan).items() if k != "id"}
        meta = {"key": fid.key, "scan": scan_meta, "summary": summary is not None, "prev": _key(prev),
                "first": _key(first)}
        table = pa.Table.from_pydict(summary if summary is not None else {c: pa.array([], pa.null()) for c in COLUMNS})
        table = table.replace_schema_metadata({b"ckptview": json.dumps(meta).encode()})
        path = self._path(fid)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        # written beside and renamed: a reader never sees half a file, and two runs writing one entry agree
        handle, temporary = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        os.close(handle)
        try:
            pq.write_table(table, temporary)
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise


def _key(fid: FileId | None) -> str | None:
    return None if fid is None else fid.key
