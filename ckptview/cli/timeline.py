"""`ckptview timeline`: a training run's checkpoints in order, its metrics, best checkpoint, NaN onset and weight drift."""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import TYPE_CHECKING, Any

import ckptview
from ckptview.cli import print_json
from ckptview.present.text import text_table

if TYPE_CHECKING:
    from ckptview.analyzers.run import RunSummary


def add_commands(subparsers: Any) -> None:
    help_text = "a training run: checkpoints in order, metrics, best checkpoint, NaN onset, per-module weight drift"
    command = subparsers.add_parser("timeline", help=help_text, description=help_text)
    command.add_argument("path", metavar="PATH_OR_GLOB",
                         help="a folder of checkpoints, a glob ('runs/*.pt', quoted), or an fsspec URL")
    command.add_argument("--dask", metavar="ADDRESS",
                         help="run one task per checkpoint on this Dask scheduler ('tcp://host:8786'), or 'local' "
                              "for a LocalCluster started for the command")
    command.add_argument("--workers", type=int, help="threads, or worker processes of a started LocalCluster")
    command.add_argument("--no-cache", action="store_true", help="neither read nor write the per-file result cache")
    command.add_argument("--json", action="store_true", help="print JSON instead of tables")
    command.add_argument("--trust", action="store_true", help="allow code from the files to run (only for files you trust)")
    command.set_defaults(func=timeline_command)


def timeline_command(args: argparse.Namespace) -> int:
    engine = "local" if args.dask is None else ("dask" if args.dask == "local" else args.dask)
    run = ckptview.open_run(args.path, engine=engine, workers=args.workers, cache=not args.no_cache,
                            trust=args.trust, progress=sys.stderr.isatty())
    summary = run.analyze(progress=sys.stderr.isatty())
    if args.json:
        print_json(summary.to_dict())
        return 0
    print(render_timeline(summary))
    return 0


def _num(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # a diverged run's saved loss: nan, inf
    if isinstance(value, float) and not (value.is_integer() and abs(value) < 1e15):
        return f"{value:.4g}"  # a diverged run's 5.23747e+30 reads as 5.237e+30, like the other figures
    # integers (a long run's step 1234567) whole; `:g` wrote 1.23457e+06
    return str(int(value)) if isinstance(value, (int, float)) else f"{value:g}"


def render_timeline(summary: RunSummary) -> str:
    """The run as text: one row per checkpoint (epoch, step, the best metric, largest module change), then findings."""
    # the metric that decided the best checkpoint gets a column of its own, unless it is the loss
    metric = summary.best.metric if summary.best and summary.best.metric != "loss" else None
    largest = summary.largest_change()
    nonfinite = set(summary.nonfinite)
    rows = []
    for checkpoint in summary.checkpoints:
        change, module = largest.get(checkpoint.path, (None, ""))
        marks = []
        if summary.best and checkpoint.path == summary.best.path:
            marks.append("best")
        if checkpoint.path in nonfinite:
            marks.append("NaN/Inf")
        rows.append((checkpoint.name, _num(checkpoint.epoch), _num(checkpoint.step),
                     _num(checkpoint.scalars.get("loss")),
                     *((_num(checkpoint.scalars.get(metric)),) if metric else ()),
                     _num(checkpoint.scalars.get("lr")), f"{_num(change)} {module}".strip(), " ".join(marks)))
    header = ("checkpoint", "epoch", "step", "loss", *((metric,) if metric else ()), "lr", "largest change (module)",
              "marks")
    count = len(summary.checkpoints)
    lines = [f"{count} checkpoint{'' if count == 1 else 's'}, ordered {summary.order_note}",
             text_table(rows, header, align_right=tuple(range(1, header.index("lr") + 1)))]
    if summary.best:
        lines.append(f"best: {os.path.basename(summary.best.path)} ({summary.best.metric} = "
                     f"{_num(summary.best.value)}), {summary.best.note}")
    else:
        lines.append("best: none (no validation metric or training loss is saved)")
    onset = summary.nan_onset
    if onset:
        shown = ", ".join(onset.tensors[:8]) + (f" and {len(onset.tensors) - 8} more" if len(onset.tensors) > 8 else "")
        lines.append(f"NaN/Inf first in {os.path.basename(onset.path)} (epoch {_num(onset.epoch)}): "
                     f"{onset.nan_count:,} NaN, {onset.inf_count:,} Inf in {shown}")
    else:
        lines.append("no NaN or Inf in any checkpoint")
    from ckptview.analyzers.run import STOPPED_BELOW, describe_skipped

    for stopped in summary.stopped:
        what = "never moved" if stopped.never_moved else f"stopped moving after {os.path.basename(stopped.since)}"
        # the figure said "relative change below 0" of a module whose changes were all exactly 0
        lines.append(f"{stopped.module}: {what} (last relative change {_num(stopped.last_change)}; under "
                     f"{STOPPED_BELOW:g} counts as not moving)")
    for alias in summary.aliases:
        lines.append(f"{os.path.basename(alias.path)}: {alias.note}")

    for line in describe_skipped(summary.skipped):
        lines.append(f"skipped {line}")
    return "\n".join(lines)
