"""
A whole training run as one object: the checkpoints of a folder (a glob, a list, remote URLs) in
training order, what their scalars say over time (losses, metrics, learning rates, the best
checkpoint), and what their tensors say (per-module weight norm and drift, layers that stopped
moving, where NaN/Inf first appear, BatchNorm running statistics, optimizer moments).

    >>> run = ckptview.open_run("runs/resnet/")          # headers only: order, epochs, metrics
    >>> run.order_by, run.best                            # ("epoch", BestCheckpoint(...))
    >>> summary = run.analyze()                           # tensors: each file read once, in parallel
    >>> summary.nan_onset, summary.drift_frame()

The per-file work is in `run_tasks` (one task per checkpoint: headers; tensors with the previous
and the first checkpoint), where it runs and the per-file Parquet cache in `run_engine`. This
module orders the files and turns the small per-file tables into the run's results.
"""

from __future__ import annotations

import functools
import glob as globbing
import math
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any

from ckptview.analyzers.run_engine import Cancel, Progress, RunCache, default_cache_dir, engine_for
from ckptview.analyzers.run_tasks import (FIRST_CHECKPOINTS, OPEN_CHECKPOINTS, FileId, Scan, file_id, plan_chains, scan,
                                         summarize_chain)
from ckptview.analyzers.training import BUFFER_LEAVES
from ckptview.errors import CheckpointNotFoundError
from ckptview.readers.model import fast_init, gc_paused
from ckptview.readers.remote import is_url
from ckptview.readers.trainer_folder import is_trainer_folder

_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".tar", ".pkl", ".pth.tar")
_PARTIAL_SUFFIXES = (".tmp", ".part", ".partial", ".incomplete", ".crdownload", ".swp")
_SHARD = re.compile(r"-\d+-of-\d+\.\w+$")
# Files that copy one checkpoint of the run under another name: kept out of the timeline.
_ALIAS = re.compile(r"^(best|latest|last|final|current)([_\-.]|$)", re.IGNORECASE)
# A module whose weights changed by less than this (relative) over the last intervals has stopped moving:
# float32 keeps about 7 digits, so a smaller change is at most rounding.
STOPPED_BELOW = 1e-7
_STOPPED_INTERVALS = 3

ORDER_BY = ("epoch", "step", "name", "mtime")


@dataclass(frozen=True)
class RunCheckpoint:
    """One checkpoint of the run, from its headers: where it is, when in training, and its scalars."""

    path: str
    index: int  # position in the run
    epoch: float | None
    step: float | None
    format: str
    size: int
    scalars: Mapping[str, float] = field(repr=False)
    id: FileId = field(repr=False, compare=False)

    @property
    def name(self) -> str:
        return os.path.basename(self.path.rstrip("/")) or self.path


@dataclass(frozen=True)
class Skipped:
    """A file left out of the run, and why (still being written, cut off, not a checkpoint)."""

    path: str
    reason: str


@dataclass(frozen=True)
class Alias:
    """A file that copies one checkpoint of the run under another name (`best_model.pth`, `last.ckpt`)."""

    path: str
    epoch: float | None
    step: float | None
    note: str


@dataclass(frozen=True)
class BestCheckpoint:
    """The checkpoint with the best value of `metric`, and why that metric decided."""

    path: str
    metric: str
    value: float
    higher_is_better: bool
    epoch: float | None
    note: str


@dataclass(frozen=True)
class NanOnset:
    """The first checkpoint (in run order) holding NaN or Inf, and the tensors holding it."""

    path: str
    epoch: float | None
    step: float | None
    tensors: tuple[str, ...]  # model tensors as `model.state_dict()` names them, then other tensors by path
    nan_count: int
    inf_count: int


@fast_init  # one per module and checkpoint: a cached re-run of 200 checkpoints makes ~13,000
@dataclass(frozen=True)
class ModuleDrift:
    """
    One module's weights (its parameters, not running statistics) at one checkpoint.

    Attributes:
        weight_norm: L2 norm over the module's finite parameter values (NaN, as are the changes, when
            it has none).
        rel_change_prev: ||W - W_prev|| / ||W_prev|| (NaN at the first checkpoint or when absent before).
        rel_change_first: ||W - W_first|| / ||W_first||.
        update_ratio: ||W - W_prev|| / ||W||, divided by the optimizer steps between the two
            checkpoints when both record their step (`RunSummary.update_ratio_unit` says which);
            around 1e-3 per step is the usual healthy range.
    """

    module: str
    path: str
    epoch: float | None
    step: float | None
    weight_norm: float
    rel_change_prev: float
    rel_change_first: float
    update_ratio: float
    nan_count: int


@fast_init  # one per module and checkpoint: a cached re-run of 200 checkpoints makes ~13,000
@dataclass(frozen=True)
class BatchNormDrift:
    """A BatchNorm layer's running statistics at one checkpoint, and how they moved."""

    module: str
    path: str
    epoch: float | None
    running_mean_mean: float
    running_var_mean: float
    mean_change_prev: float  # ||running_mean - previous|| / ||previous||
    var_change_prev: float
    mean_change_first: float
    var_change_first: float


@fast_init  # one per module and checkpoint: a cached re-run of 200 checkpoints makes ~13,000
@dataclass(frozen=True)
class MomentNorm:
    """The L2 norm of one optimizer slot (Adam `exp_avg`, `exp_avg_sq`, SGD `momentum_buffer`) over a module's parameters."""

    module: str  # the parameters' module, "<all>" for the whole model, "<unmapped>" when ids have no names
    slot: str
    path: str
    epoch: float | None
    norm: float


@dataclass(frozen=True)
class StoppedModule:
    """A module whose weights have stopped changing (or never changed) in the last checkpoints."""

    module: str
    since: str  # path of the first checkpoint of the still run
    last_change: float  # the largest rel_change_prev over the last intervals
    never_moved: bool


@dataclass(frozen=True)
class RunSummary:
    """
    What the tensors of a run say, with the run's order and best checkpoint. Frozen; every table
    has a `*_frame()` method, and `to_dict()` is the CLI's `timeline --json`.
    """

    checkpoints: tuple[RunCheckpoint, ...]
    order_by: str
    order_note: str
    skipped: tuple[Skipped, ...]
    aliases: tuple[Alias, ...]
    best: BestCheckpoint | None
    nan_onset: NanOnset | None
    drift: tuple[ModuleDrift, ...]
    stopped: tuple[StoppedModule, ...]
    batchnorm: tuple[BatchNormDrift, ...]
    moments: tuple[MomentNorm, ...]
    update_ratio_unit: str  # "per step" | "per checkpoint"
    nonfinite: tuple[str, ...] = ()  # the paths of the checkpoints holding NaN or Inf, the onset's and after

    def to_frame(self) -> Any:
        """The drift table (`drift_frame()`)."""
        return self.drift_frame()

    def drift_frame(self) -> Any:
        return _frame(self.drift)

    def largest_change(self) -> dict[str, tuple[float, str]]:
        """Per checkpoint path: the largest finite relative change from the previous checkpoint, and its module."""
        largest: dict[str, tuple[float, str]] = {}
        for item in self.drift:
            if math.isfinite(item.rel_change_prev) and item.rel_change_prev >= largest.get(item.path, (-1.0, ""))[0]:
                largest[item.path] = (item.rel_change_prev, item.module)
        return largest

    def batchnorm_frame(self) -> Any:
        return _frame(self.batchnorm)

    def moments_frame(self) -> Any:
        return _frame(self.moments)

    def metrics_frame(self) -> Any:
        return metrics_frame(self.checkpoints, self.best)

    def to_dict(self) -> dict[str, Any]:
        """Plain data: `checkpoints`, `order_by`, `order_note`, `best`, `nan_onset`, `nonfinite`, `drift`,
        `stopped`, `batchnorm`, `moments`, `skipped`, `aliases` (NaN stays NaN: JSON writers print it as NaN)."""
        return {
            "checkpoints": [{"path": c.path, "epoch": c.epoch, "step": c.step, "format": c.format, "size": c.size,
                             "scalars": dict(c.scalars)} for c in self.checkpoints],
            "order_by": self.order_by,
            "order_note": self.order_note,
            "best": None if self.best is None else _fields(self.best),
            "nan_onset": None if self.nan_onset is None else _fields(self.nan_onset),
            "nonfinite": list(self.nonfinite),
            "drift": [_fields(d) for d in self.drift],
            "update_ratio_unit": self.update_ratio_unit,
            "stopped": [_fields(s) for s in self.stopped],
            "batchnorm": [_fields(b) for b in self.batchnorm],
            "moments": [_fields(m) for m in self.moments],
            "skipped": [_fields(s) for s in self.skipped],
            "aliases": [_fields(a) for a in self.aliases],
        }


def _fields(item: Any) -> dict[str, Any]:
    return {name: (list(value) if isinstance(value, tuple) else value)
            for name, value in vars(item).items() if name not in ("id",)}


def _frame(items: Sequence[Any]) -> Any:
    import pandas as pd

    return pd.DataFrame([_fields(item) for item in items])


def metrics_frame(checkpoints: Sequence[RunCheckpoint], best: BestCheckpoint | None) -> Any:
    """One row per checkpoint: path, epoch, step, every scalar, and `best_so_far` of the deciding metric."""
    import pandas as pd

    rows = [{"path": c.path, "epoch": c.epoch, "step": c.step, **c.scalars} for c in checkpoints]
    frame = pd.DataFrame(rows)
    if best is not None and best.metric in frame:
        values = frame[best.metric]
        frame["best_so_far"] = values.cummax() if best.higher_is_better else values.cummin()
    return frame


class Run:
    """
    The checkpoints of a training run, in training order. Made by `ckptview.open_run`; only headers
    have been read. `analyze()` reads the tensors.

    Attributes:
        checkpoints: `RunCheckpoint`s in run order.
        order_by: what decided the order: "epoch", "step", "name" or "mtime"; `order_note` says it in words.
        skipped: files left out, with why (still being written, cut off, not a checkpoint).
        aliases: copies of a run checkpoint under another name (`best_model.pth`), with what they hold.
        best: the best checkpoint by a validation metric, else by a score, else by the training loss (None
            without any).
    """

    def __init__(self, checkpoints: Sequence[RunCheckpoint], order_by: str, order_note: str,
                 skipped: Sequence[Skipped], aliases: Sequence[Alias], *, engine: Any, workers: int | None,
                 cache: RunCache | None, trust: bool) -> None:
        self.checkpoints = tuple(checkpoints)
        self.order_by = order_by
        self.order_note = order_note
        self.skipped = tuple(skipped)
        self.best = best_checkpoint(self.checkpoints)
        self.aliases = tuple(_alias_notes(aliases, self.checkpoints, self.best))
        self.engine = engine
        self.workers = workers
        self.cache = cache
        self.trust = trust
        self._summary: RunSummary | None = None

    def __len__(self) -> int:
        return len(self.checkpoints)

    def __iter__(self) -> Any:
        return iter(self.checkpoints)

    def __repr__(self) -> str:
        return f"<Run {len(self.checkpoints)} checkpoints ordered by {self.order_by}, {len(self.skipped)} skipped>"

    @property
    def paths(self) -> list[str]:
        return [c.path for c in self.checkpoints]

    def open(self, which: int | str) -> Any:
        """The checkpoint at position `which` (or with that path), opened with `ckptview.open`."""
        import ckptview

        path = self.checkpoints[which].path if isinstance(which, int) else which
        return ckptview.open(path, trust=self.trust)

    def metrics_frame(self) -> Any:
        """One row per checkpoint with every scalar it holds (needs only the headers)."""
        return metrics_frame(self.checkpoints, self.best)

    def to_frame(self) -> Any:
        return self.metrics_frame()

    def analyze(self, *, engine: Any = None, workers: int | None = None, progress: Progress = True,
                cancel: Cancel = None) -> RunSummary:
        """
        Read every checkpoint's tensors once (with the previous and the first checkpoint beside it)
        and return the run's `RunSummary`. Cached on the `Run`; cached per file on disk.

        Args:
            engine: where the tasks run (default: the engine `open_run` was given): "local", "dask"
                (a `LocalCluster` started for this call), a scheduler address or a `Client`.
            workers: threads (local) or worker processes (a started `LocalCluster`).
            progress: a progress bar (True), none (False), or a callable `(done, total)`.
            cancel: a `threading.Event` or a callable returning True to stop; raises `CancelledError`.

        Raises:
            concurrent.futures.CancelledError: `cancel` asked to stop (finished files stay cached).
            CkptviewError: a checkpoint's tensors cannot be read.
        """
        if self._summary is not None and engine is None:
            return self._summary
        summary = analyze_run(self, engine=self.engine if engine is None else engine,
                              workers=self.workers if workers is None else workers, progress=progress, cancel=cancel)
        self._summary = summary
        return summary


def open_run(path_or_glob: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], *, engine: Any = "local",
             workers: int | None = None, cache: bool | str | os.PathLike[str] = True, trust: bool = False,
             progress: Progress = False, cancel: Cancel = None) -> Run:
    """
    The checkpoints of a training run, in training order, from their headers.

    Args:
        path_or_glob: a folder (its checkpoint files, shard indexes and checkpoint sub-folders), a
            glob (`"runs/*.pt"`), a list of paths, or the same as fsspec URLs (`"s3://bucket/run/*.pt"`).
            Formats may be mixed.
        engine: where per-file work runs: "local" (threads), "dask" (a `LocalCluster` started for each
            call that needs one), a scheduler address, or a `dask.distributed.Client`.
        workers: threads, or worker processes of a started `LocalCluster`.
        cache: per-file results on disk: True for `$CKPTVIEW_CACHE_DIR` or ~/.cache/ckptview/runs, a
            folder, or False for none.
        trust: passed to `ckptview.open`.
        progress, cancel: as for `Run.analyze`.

    Returns:
        A `Run`. Its order comes from the epoch saved in every checkpoint, else the step, else the
        number in every file name, else modification time; `run.order_note` says which.

    Raises:
        CheckpointNotFoundError: nothing matches `path_or_glob`.

    Example:
        >>> run = ckptview.open_run("runs/resnet")
        >>> run.order_note
        'by the epoch saved in every checkpoint'
        >>> run.best.path, run.best.metric
    """
    candidates, skipped = list_checkpoints(path_or_glob)
    run_cache = None if cache is False else RunCache(default_cache_dir() if cache is True else cache)
    cached: dict[str, Scan] = {}
    todo: list[tuple[str, bool, bool]] = []
    # the local engine's tasks run in this process: the scan's parsed checkpoints are left for them
    keep = engine == "local"
    for path in candidates:
        found = _cached_scan(run_cache, path)
        if found is not None:
            cached[path] = found
        else:
            todo.append((path, trust, keep))
    if todo:
        # a LocalCluster for headers alone would cost more than it saves: they are read here
        header_engine = "local" if engine == "dask" else engine
        with engine_for(header_engine, _header_workers(candidates, workers) if header_engine == "local" else workers) \
                as runner, gc_paused():  # every file's records stay open for the pass: see gc_paused
            scans = runner.map(scan, todo, progress=progress, cancel=cancel, desc="headers")
        for (path, _, _), result in zip(todo, scans):
            cached[path] = result
            if run_cache is not None and not result.skipped:
                run_cache.store_scan(result)
        if run_cache is not None:
            run_cache.save_scans()
    scans = [cached[path] for path in candidates]
    skipped.extend(Skipped(s.id.path, s.skipped) for s in scans if s.skipped)
    good = [s for s in scans if not s.skipped]
    aliases = [s for s in good if _ALIAS.match(_stem(s.id.path)) and not re.search(r"\d", _stem(s.id.path))]
    timeline = [s for s in good if s not in aliases] or aliases
    if timeline is aliases:
        aliases = []
    ordered, order_by, note = order_checkpoints(timeline)
    checkpoints = [RunCheckpoint(s.id.path, i, s.epoch, s.step, s.format, s.id.size, dict(s.scalars), s.id)
                   for i, s in enumerate(ordered)]
    alias_list = [Alias(s.id.path, s.epoch, s.step, "") for s in aliases]
    return Run(checkpoints, order_by, note, skipped, alias_list, engine=engine, workers=workers, cache=run_cache,
               trust=trust)


_REMOTE_HEADER_WORKERS = 8  # by URL a header scan waits on the network: overlap the requests


def _header_workers(paths: Sequence[str], workers: int | None) -> int | None:
    if workers is not None or not any(is_url(p) for p in paths):
        return workers
    return _REMOTE_HEADER_WORKERS


def _cached_scan(cache: RunCache | None, path: str) -> Scan | None:
    if cache is None:
        return None
    try:
        return cache.scan(file_id(path))
    except OSError:
        return None


# --- listing and ordering ------------------------------------------------------------------------

def _stem(path: str) -> str:
    name = os.path.basename(path.rstrip("/"))
    for suffix in sorted(_CHECKPOINT_SUFFIXES + (".index.json",), key=len, reverse=True):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def list_checkpoints(path_or_glob: Any) -> tuple[list[str], list[Skipped]]:
    """The candidate checkpoint paths of a folder, glob or list, and the files set aside (with why)."""
    if isinstance(path_or_glob, (list, tuple)):
        return [os.fspath(p) for p in path_or_glob], []
    target = os.fspath(path_or_glob)
    if is_url(target):
        return _list_remote(target)
    if any(ch in target for ch in "*?["):
        names = sorted(globbing.glob(target))
        if not names:
            raise CheckpointNotFoundError(target, "no file matches this pattern: check it (and the current "
                                                  f"directory, {os.getcwd()})")
        return _filter(names)
    if os.path.isdir(target) and not _is_checkpoint_folder(target):
        names = sorted(os.path.join(target, n) for n in os.listdir(target) if not n.startswith("."))
        found, skipped = _filter(names, folder=True)
        if not found and not skipped:
            raise CheckpointNotFoundError(target, "this folder holds no checkpoint files (.pt, .pth, .bin, .ckpt, "
                                                  ".safetensors, shard indexes or checkpoint folders)")
        return found, skipped
    if not os.path.exists(target):
        raise CheckpointNotFoundError(target, "no such file or folder: check the path (and the current directory, "
                                              f"{os.getcwd()})")
    return [target], []


def _is_checkpoint_folder(path: str) -> bool:
    names = os.listdir(path)
    return ".metadata" in names or any(n.endswith(".index.json") for n in names) or is_trainer_folder(names)


def _filter(names: Iterable[str], *, folder: bool = False) -> tuple[list[str], list[Skipped]]:
    found: list[str] = []
    skipped: list[Skipped] = []
    names = list(names)
    indexed = any(n.endswith(".index.json") for n in names)
    for name in names:
        base = os.path.basename(name)
        if base.endswith(_PARTIAL_SUFFIXES):
            skipped.append(Skipped(name, "a temporary name (the save or download is not finished); it joins the "
                                         "run once renamed"))
        elif indexed and _SHARD.search(base):
            continue  # read through its index
        elif os.path.isdir(name):
            if not folder or _is_checkpoint_folder(name) or _holds_checkpoint(name):
                found.append(name)
        elif base.endswith(_CHECKPOINT_SUFFIXES + (".index.json",)) or not folder:
            found.append(name)
    return found, skipped


def _holds_checkpoint(folder: str) -> bool:
    return any(n.endswith(_CHECKPOINT_SUFFIXES) for n in os.listdir(folder))


def _list_remote(url: str) -> tuple[list[str], list[Skipped]]:
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    protocol = url.split("://", 1)[0]

    def full(p: str) -> str:
        return p if is_url(p) else f"{protocol}://{p.lstrip('/')}" if protocol not in ("http", "https") else p

    if any(ch in path for ch in "*?["):
        names = [full(p) for p in sorted(fs.glob(path))]
    elif fs.isdir(path):
        names = [full(p) for p in sorted(fs.ls(path, detail=False))]
        names = [n for n in names if n.rstrip("/") != url.rstrip("/")]
    else:
        return [url], []
    if not names:
        raise CheckpointNotFoundError(url, "nothing matches this URL: check it")
    found, skipped = [], []
    indexed = any(n.endswith(".index.json") for n in names)
    for name in names:
        base = name.rstrip("/").rsplit("/", 1)[-1]
        if base.endswith(_PARTIAL_SUFFIXES):
            skipped.append(Skipped(name, "a temporary name (the upload is not finished)"))
        elif indexed and _SHARD.search(base):
            continue
        elif base.endswith(_CHECKPOINT_SUFFIXES + (".index.json",)):
            found.append(name)
    return found, skipped


def _name_number(path: str) -> float | None:
    numbers = re.findall(r"\d+", _stem(path))
    return float(numbers[-1]) if numbers else None


def order_checkpoints(scans: Sequence[Scan]) -> tuple[list[Scan], str, str]:
    """
    Scans in training order, what decided it and a sentence saying so: the epoch every checkpoint
    holds (ties by step), else the step every checkpoint holds, else the number in every file name
    (`epoch_9.pt` before `epoch_10.pt`), else modification time.
    """
    def mtime(s: Scan) -> float:
        try:
            return float(s.id.version)
        except ValueError:
            return math.inf

    def tie(value: float | None) -> float:
        return math.inf if value is None else value

    if not scans:
        return [], "epoch", "no checkpoints"
    epochs = all(s.epoch is not None for s in scans)
    steps = all(s.step is not None for s in scans)
    numbers = all(_name_number(s.id.path) is not None for s in scans)
    missing = lambda attr: sum(1 for s in scans if getattr(s, attr) is None)  # noqa: E731
    if epochs:
        by, note = "epoch", "by the epoch saved in every checkpoint" + (" (ties by step)" if steps else "")
        key = lambda s: (s.epoch, tie(s.step), tie(_name_number(s.id.path)), mtime(s), s.id.path)  # noqa: E731
    elif steps:
        by, note = "step", f"by the step saved in every checkpoint ({missing('epoch')} of {len(scans)} have no epoch)"
        key = lambda s: (s.step, tie(_name_number(s.id.path)), mtime(s), s.id.path)  # noqa: E731
    elif numbers:
        by = "name"
        note = (f"by the number in each file name: {missing('epoch')} of {len(scans)} checkpoints save no epoch "
                f"and {missing('step')} no step")
        key = lambda s: (_name_number(s.id.path), mtime(s), s.id.path)  # noqa: E731
    else:
        by = "mtime"
        note = "by modification time: neither the checkpoints (no epoch or step in every one) nor their names give an order"
        key = lambda s: (mtime(s), s.id.path)  # noqa: E731
    return sorted(scans, key=key), by, note


# --- the best checkpoint -------------------------------------------------------------------------

_HIGHER = ("acc", "accuracy", "top1", "top5", "acc1", "acc5", "f1", "auc", "auroc", "map", "precision", "recall",
           "iou", "miou", "dice", "bleu", "rouge", "r2", "psnr", "ssim", "fitness")  # fitness: YOLO's best_fitness
_LOWER = ("loss", "error", "err", "perplexity", "ppl", "mae", "mse", "rmse", "wer", "cer", "nll", "fid")
_VALIDATION = ("val", "valid", "validation", "eval", "test", "dev")


@functools.lru_cache(maxsize=4096)  # asked for every scalar of every checkpoint: a run names a few dozen
def metric_direction(name: str) -> bool | None:
    """True when higher is better (accuracies), False when lower is (losses), None when the name does not say."""
    words = re.split(r"[^a-z0-9]+", name.lower())
    # whole words ("top1", "f1") and their letters apart from their digits ("mAP50", "acc1")
    tokens = words + [part for word in words for part in re.split(r"(?<=[a-z])(?=\d)", word)]
    if any(t in _LOWER for t in tokens):
        return False
    if any(t in _HIGHER for t in tokens):
        return True
    return None


def best_checkpoint(checkpoints: Sequence[RunCheckpoint]) -> BestCheckpoint | None:
    """
    The best checkpoint by a validation metric where one is saved (accuracies higher, losses lower;
    `val_*` before `best_*`, the metric saved in most checkpoints first), else by a score whose name
    does not say on which data (`top1`), else by the training loss.
    """
    counts: dict[str, int] = defaultdict(int)
    for checkpoint in checkpoints:
        for name, value in checkpoint.scalars.items():
            if math.isfinite(value):
                counts[name] += 1

    def rank(name: str) -> tuple[int, int, str] | None:
        direction = metric_direction(name)
        leaf = name.rsplit(".", 1)[-1].lower()
        tokens = set(re.split(r"[^a-z0-9]+", name.lower()))
        if direction is None:
            return None
        if tokens & set(_VALIDATION) and not leaf.startswith("best"):
            return (0 if direction else 1, -counts[name], name)
        if leaf.startswith("best"):
            return (2, -counts[name], name)
        if direction and not tokens & {"train", "training"}:  # timm's top1, a saved miou or f1: on which data, unsaid
            return (3, -counts[name], name)
        if leaf in ("loss", "train_loss", "training_loss", "train.loss"):
            return (4, -counts[name], name)
        return None

    ranked = sorted((r, name) for name in counts if (r := rank(name)) is not None)
    if not ranked:
        return None
    (group, _, _), metric = ranked[0]
    higher = bool(metric_direction(metric))
    # a checkpoint whose loss is NaN or Inf has diverged: its accuracy (often a constant guess) does not count
    having = [c for c in checkpoints if math.isfinite(c.scalars.get(metric, math.nan))
              and all(math.isfinite(v) for k, v in c.scalars.items() if metric_direction(k) is False)]
    if not having:
        return None
    best = (max if higher else min)(having, key=lambda c: c.scalars[metric])  # the first of equal values
    why = {0: "a validation accuracy", 1: "a validation loss", 2: "the best-so-far value the run saved",
           3: "a score whose name does not say on which data: no validation metric is saved",
           4: "the training loss: no validation metric is saved"}[group]
    note = (f"by {metric} ({'higher' if higher else 'lower'} is better), {why}; {len(having)} of "
            f"{len(checkpoints)} checkpoints save it with finite losses")
    return BestCheckpoint(best.path, metric, best.scalars[metric], higher, best.epoch, note)


def _alias_notes(aliases: Sequence[Alias], checkpoints: Sequence[RunCheckpoint],
                 best: BestCheckpoint | None) -> list[Alias]:
    noted = []
    for alias in aliases:
        same = [c for c in checkpoints if alias.epoch is not None and c.epoch == alias.epoch
                and (alias.step is None or c.step == alias.step)]
        holds = f"holds epoch {_num(alias.epoch)}" if alias.epoch is not None else "saves no epoch"
        note = f"{holds}" + (f", like {same[0].name}" if same else "")
        if best is not None and _ALIAS.match(_stem(alias.path)).group(1).lower() == "best":
            agrees = same and same[0].path == best.path
            note += (f"; the best by {best.metric} is {os.path.basename(best.path)}"
                     + (" (the same)" if agrees else f" (epoch {_num(best.epoch)}): they differ"))
        noted.append(Alias(alias.path, alias.epoch, alias.step, note))
    return noted


def _num(value: float | None) -> str:
    if value is None:
        return "?"
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


# --- reading the tensors -------------------------------------------------------------------------

def analyze_run(run: Run, *, engine: Any = "local", workers: int | None = None, progress: Progress = True,
                cancel: Cancel = None) -> RunSummary:
    """`Run.analyze`: chains of consecutive checkpoints, each file read once, tables cached per run."""
    # every checkpoint's tables and rows, and the summary's records, live on: see gc_paused
    with gc_paused(long_lived=True):
        return _analyze_run(run, engine, workers, progress, cancel)


def _analyze_run(run: Run, engine: Any, workers: int | None, progress: Progress, cancel: Cancel) -> RunSummary:
    ids = [c.id for c in run.checkpoints]
    prevs = [ids[i - 1] if i else None for i in range(len(ids))]
    stored = run.cache.summaries(ids[0]) if run.cache is not None and ids else {}
    tables: list[dict[str, list[Any]] | None] = []
    for fid, prev in zip(ids, prevs):
        hit = stored.get(fid.key)
        tables.append(hit[1] if hit is not None and hit[0] == (prev.key if prev else None) else None)
    todo = [i for i, table in enumerate(tables) if table is None]
    if not todo:
        OPEN_CHECKPOINTS.clear()  # the header scan's checkpoints, not needed: every table was cached
    if todo:
        chains: list[list[int]] = []

        def finished(index: int, chain_tables: list[dict[str, list[Any]]]) -> None:
            for i, table in zip(chains[index], chain_tables):
                tables[i] = table

        try:
            with engine_for(engine, workers) as runner:
                chains = plan_chains(todo, runner.workers)
                calls = [(tuple(ids[i] for i in chain), prevs[chain[0]], ids[0] if chain[0] else None, run.trust)
                         for chain in chains]
                runner.map(summarize_chain, calls, progress=progress, cancel=cancel, desc="checkpoints",
                           weights=[len(chain) for chain in chains], finished=finished)
        finally:
            OPEN_CHECKPOINTS.clear()
            FIRST_CHECKPOINTS.clear()
            if run.cache is not None:  # also when cancelled: finished checkpoints stay cached
                run.cache.store_summaries(ids[0], [(fid, prev, table) for fid, prev, table in zip(ids, prevs, tables)
                                                   if table is not None])
    return summarize_run(run, [t for t in tables if t is not None])


def summarize_run(run: Run, tables: Sequence[Mapping[str, Sequence[Any]]]) -> RunSummary:
    """The run's results from each checkpoint's table (`run_tasks.summarize`), in run order."""
    import numpy as np

    checkpoints = run.checkpoints
    per_step = all(c.step is not None for c in checkpoints) and len(checkpoints) > 1
    drift: list[ModuleDrift] = []
    batchnorm: list[BatchNormDrift] = []
    moments: list[MomentNorm] = []
    nan_onset: NanOnset | None = None
    nonfinite_paths: list[str] = []
    # The checkpoints of a run mostly list the same tensors: consecutive ones that do are summarized
    # together, each column one (checkpoints x rows) array, which rows make which module worked out once
    # per distinct list. A Python loop over every row of every checkpoint was most of a cached re-run.
    layouts: dict[tuple[tuple[str, ...], ...], _Layout] = {}
    for start, stop, layout in _same_layout_spans(tables, layouts):
        group = checkpoints[start:stop]
        columns = {c: np.array([table[c] for table in tables[start:stop]],
                               dtype=np.int64 if c in _COUNT_COLUMNS else np.float64) for c in _SUMMARIZED_COLUMNS}
        nonfinite = columns["nan"] + columns["posinf"] + columns["neginf"]
        holds_nan = np.flatnonzero(nonfinite.any(axis=1))
        if nan_onset is None and holds_nan.size:
            nan_onset = _nan_onset(group[holds_nan[0]], tables[start + holds_nan[0]])
        nonfinite_paths.extend(group[i].path for i in holds_nan.tolist())
        finite, mean = columns["finite"], columns["mean"]
        # a tensor with no finite value (a diverged run's) has no norm and no change, nor has the next
        # checkpoint's from it: the sums over its finite values, all 0, said it had stopped moving.
        # The previous checkpoint's counts, row by row: the span's first row looks at the table before it
        finite_before, nonfinite_before = _counts_before(tables, start)
        finite_prev = np.vstack([finite_before, finite[:-1]])
        nonfinite_prev = np.vstack([nonfinite_before, nonfinite[:-1]])
        unfinite, unfinite_prev = _no_finite(finite, nonfinite), _no_finite(finite_prev, nonfinite_prev)
        with np.errstate(all="ignore"):
            squares = np.where(finite > 0, columns["m2"] + finite * mean ** 2, 0.0)  # over the finite values
        steps = np.ones((len(group), 1))
        if per_step:
            for row, i in enumerate(range(start, stop)):
                if i:  # steps between the two checkpoints: 0 (a step saved twice) divides by nothing
                    steps[row] = (checkpoints[i].step - checkpoints[i - 1].step) or 1.0  # type: ignore[operator]
        times = [(c.path, c.epoch, c.step) for c in group]
        if layout.modules:
            def by_module(column: Any) -> Any:
                return np.add.reduceat(column[:, layout.module_rows], layout.module_starts, axis=1)

            prev_dd, first_dd = by_module(columns["prev_dd"]), by_module(columns["first_dd"])
            module_unfinite = _no_finite(by_module(finite), by_module(nonfinite))
            module_unfinite_prev = _no_finite(by_module(finite_prev), by_module(nonfinite_prev))
            with np.errstate(all="ignore"):
                norm = np.where(module_unfinite, np.nan, np.sqrt(by_module(squares)))
                update = np.where((norm > 0) & np.isfinite(prev_dd), np.sqrt(prev_dd) / norm, np.nan) / steps
            rel_prev = np.where(module_unfinite | module_unfinite_prev, np.nan,
                                _relative(prev_dd, by_module(columns["prev_aa"])))
            rel_first = np.where(module_unfinite, np.nan, _relative(first_dd, by_module(columns["first_aa"])))
            update = np.where(module_unfinite_prev, np.nan, update)
            values = zip(norm.tolist(), rel_prev.tolist(), rel_first.tolist(), update.tolist(),
                         by_module(columns["nan"]).tolist())
            for (path, epoch, step), per_module in zip(times, values):
                drift.extend(map(ModuleDrift, layout.modules, repeat(path), repeat(epoch), repeat(step), *per_module))
        if layout.batchnorm:
            mean_rows, var_rows = layout.running_mean_rows, layout.running_var_rows

            def relative(to: str, rows: Any) -> list[list[float]]:
                without = unfinite[:, rows] | (unfinite_prev[:, rows] if to == "prev" else False)
                change = _relative(columns[to + "_dd"][:, rows], columns[to + "_aa"][:, rows])
                return np.where(without, np.nan, change).tolist()

            values = zip(mean[:, mean_rows].tolist(), mean[:, var_rows].tolist(), relative("prev", mean_rows),
                         relative("prev", var_rows), relative("first", mean_rows), relative("first", var_rows))
            for (path, epoch, _), per_module in zip(times, values):
                batchnorm.extend(map(BatchNormDrift, layout.batchnorm, repeat(path), repeat(epoch), *per_module))
        if layout.moments:
            def by_slot(column: Any) -> Any:
                return np.add.reduceat(column[:, layout.moment_rows], layout.moment_starts, axis=1)

            no_finite = _no_finite(by_slot(finite), by_slot(nonfinite))
            norms = np.where(no_finite, np.nan, np.sqrt(by_slot(squares))).tolist()
            for (path, epoch, _), per_slot in zip(times, norms):
                moments.extend(map(MomentNorm, layout.moment_modules, layout.moment_slots, repeat(path), repeat(epoch),
                                   per_slot))
    return RunSummary(
        checkpoints=checkpoints, order_by=run.order_by, order_note=run.order_note, skipped=run.skipped,
        aliases=run.aliases, best=run.best, nan_onset=nan_onset, drift=tuple(drift),
        stopped=tuple(_stopped(drift, checkpoints)), batchnorm=tuple(batchnorm), moments=tuple(moments),
        update_ratio_unit="per step" if per_step else "per checkpoint", nonfinite=tuple(nonfinite_paths),
    )


_COUNT_COLUMNS = ("finite", "nan", "posinf", "neginf")
_SUMMARIZED_COLUMNS = _COUNT_COLUMNS + ("mean", "m2", "prev_dd", "prev_aa", "first_dd", "first_aa")


def _no_finite(finite: Any, nonfinite: Any) -> Any:
    """Where counts (of a tensor, or summed over a module's) say: values, and none of them finite."""
    return (finite == 0) & (nonfinite > 0)


def _counts_before(tables: Sequence[Mapping[str, Sequence[Any]]], start: int) -> tuple[Any, Any]:
    """One row each: the finite and the NaN/Inf counts each tensor of `tables[start]` had in the table
    before it, found by name (that table may list other tensors: a span starts where the list
    changes); a tensor it lacks, or the run's first, counts as finite."""
    import numpy as np

    before = {}
    if start:
        table = tables[start - 1]
        before = {name: (finite, nan + posinf + neginf) for name, finite, nan, posinf, neginf
                  in zip(table["name"], table["finite"], table["nan"], table["posinf"], table["neginf"])}
    counts = [before.get(name, (1, 0)) for name in tables[start]["name"]]
    return (np.array([[finite for finite, _ in counts]], dtype=np.int64),
            np.array([[nonfinite for _, nonfinite in counts]], dtype=np.int64))


def _relative(dd: Any, aa: Any) -> Any:
    """sqrt(dd / aa) elementwise: 0 where dd is, inf where only aa is, NaN where either is not finite."""
    import numpy as np

    with np.errstate(all="ignore"):
        ratio = np.where(aa > 0, np.sqrt(dd) / np.sqrt(aa), np.inf)
    return np.where(np.isfinite(dd) & np.isfinite(aa), np.where(dd == 0, 0.0, ratio), np.nan)


@dataclass(frozen=True)
class _Layout:
    """Which rows of a checkpoint's table make what, by row index (as arrays, to index a column's array)."""

    modules: tuple[str, ...]
    module_rows: Any  # the rows of each module's parameters (running statistics apart), module after module
    module_starts: Any  # where each module's rows start in `module_rows`
    batchnorm: tuple[str, ...]  # BatchNorm modules with both running statistics
    running_mean_rows: Any
    running_var_rows: Any
    moment_modules: tuple[str, ...]  # the parameter's module or "<all>", for each (module, slot) pair
    moment_slots: tuple[str, ...]  # an optimizer slot, in the order each pair first appears
    moment_rows: Any
    moment_starts: Any

    @property
    def moments(self) -> bool:
        return bool(self.moment_slots)


def _same_layout_spans(tables: Sequence[Mapping[str, Sequence[Any]]],
                       layouts: dict[tuple[tuple[str, ...], ...], _Layout]) -> Iterator[tuple[int, int, _Layout]]:
    """(start, stop, layout) for each run of consecutive tables that list the same tensors."""
    start, key = 0, None
    for i, table in enumerate(tables):
        table_key = (tuple(table["name"]), tuple(table["part"]), tuple(table["param"]), tuple(table["slot"]))
        if table_key != key:
            if key is not None:
                yield start, i, layouts[key]
            start, key = i, table_key
            if key not in layouts:
                layouts[key] = _layout(*key)
    if key is not None:
        yield start, len(tables), layouts[key]


def _layout(names: Sequence[str], parts: Sequence[str], params: Sequence[str], slots: Sequence[str]) -> _Layout:
    modules: dict[str, list[int]] = defaultdict(list)
    statistics: dict[str, dict[str, int]] = defaultdict(dict)
    moments: dict[tuple[str, str], list[int]] = {}
    for i, (name, part, param, slot) in enumerate(zip(names, parts, params, slots)):
        if part == "model":
            module, _, leaf = name.rpartition(".")
            if leaf in ("running_mean", "running_var"):
                statistics[module][leaf] = i
            if leaf not in BUFFER_LEAVES:
                modules[_module_of(name)].append(i)
        elif part == "optimizer" and slot != "step":
            moments.setdefault((_module_of(param) if param else "<unmapped>", slot), []).append(i)
            moments.setdefault(("<all>", slot), []).append(i)
    pairs = {module: pair for module, pair in statistics.items() if len(pair) == 2}
    module_rows, module_starts = _segments(modules.values())
    moment_rows, moment_starts = _segments(moments.values())
    return _Layout(tuple(modules), module_rows, module_starts, tuple(pairs),
                   _indices(pair["running_mean"] for pair in pairs.values()),
                   _indices(pair["running_var"] for pair in pairs.values()),
                   tuple(module for module, _ in moments), tuple(slot for _, slot in moments), moment_rows, moment_starts)


def _segments(groups: Iterable[list[int]]) -> tuple[Any, Any]:
    """The groups' rows one after another, and where each group starts (for `numpy.add.reduceat`;
    every group has a row)."""
    rows: list[int] = []
    starts = []
    for group in groups:
        starts.append(len(rows))
        rows.extend(group)
    return _indices(rows), _indices(starts)


def _indices(values: Iterable[int]) -> Any:
    import numpy as np

    return np.fromiter(values, dtype=np.intp)


def _module_of(name: str) -> str:
    return name.rpartition(".")[0] or name


def _nan_onset(checkpoint: RunCheckpoint, table: Mapping[str, Sequence[Any]]) -> NanOnset | None:
    nan, posinf, neginf = table["nan"], table["posinf"], table["neginf"]
    bad = [i for i, counts in enumerate(zip(nan, posinf, neginf)) if any(counts)]
    if not bad:
        return None
    part, name, param = table["part"], table["name"], table["param"]
    bad.sort(key=lambda i: part[i] != "model")  # stable: model tensors first, each group in file order
    names = tuple(name[i] + (f" ({param[i]})" if param[i] else "") for i in bad)
    return NanOnset(checkpoint.path, checkpoint.epoch, checkpoint.step, names,
                    int(sum(nan[i] for i in bad)), int(sum(posinf[i] + neginf[i] for i in bad)))


def _stopped(drift: Sequence[ModuleDrift], checkpoints: Sequence[RunCheckpoint]) -> list[StoppedModule]:
    if len(checkpoints) < 2:
        return []
    by_module: dict[str, dict[str, ModuleDrift]] = defaultdict(dict)
    for item in drift:
        by_module[item.module][item.path] = item
    last = [c.path for c in checkpoints[1:]][-_STOPPED_INTERVALS:]
    out = []
    for module, items in by_module.items():
        changes = [items[p].rel_change_prev if p in items else math.nan for p in last]
        if not all(math.isfinite(c) and c < STOPPED_BELOW for c in changes) or any(items[p].nan_count for p in last):
            continue
        series = [items[c.path].rel_change_prev for c in checkpoints[1:] if c.path in items]
        still = len(series)
        while still and math.isfinite(series[still - 1]) and series[still - 1] < STOPPED_BELOW:
            still -= 1
        since = checkpoints[still].path  # the checkpoint before the first still interval
        out.append(StoppedModule(module, since, max(changes), never_moved=still == 0))
    return out


def describe_skipped(skipped: Iterable[Skipped]) -> list[str]:
    """One line per skipped file, for the CLI and the explorer."""
    return [f"{os.path.basename(s.path.rstrip('/'))}: {s.reason}" for s in skipped]


__all__ = ["Run", "RunSummary", "RunCheckpoint", "BestCheckpoint", "NanOnset", "ModuleDrift", "BatchNormDrift",
           "MomentNorm", "StoppedModule", "Skipped", "Alias", "open_run", "order_checkpoints", "best_checkpoint",
           "metric_direction", "ORDER_BY"]
