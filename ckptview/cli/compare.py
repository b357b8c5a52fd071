"""`ckptview diff A B` and `ckptview doctor CHECKPOINT --model pkg.mod:factory`: compare, and make it load."""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any

from ckptview.cli import print_json
from ckptview.errors import printable
from ckptview.present.text import human_count, not_compared_text, shape_text, text_table

_TOP = 30


def add_commands(subparsers: Any) -> None:
    command = subparsers.add_parser(
        "diff", help="keys, shapes and (with --values) values of two checkpoints",
        description="Compare two checkpoints as load_state_dict(A) into a model shaped like B would: missing keys are "
                    "in B only, unexpected ones in A only. Formats may differ (.pt vs .safetensors).",
    )
    command.add_argument("a", metavar="A", help="checkpoint file, *.index.json, or directory")
    command.add_argument("b", metavar="B", help="checkpoint file, *.index.json, or directory")
    command.add_argument("--values", action="store_true", help="also compare values (reads both files)")
    command.add_argument("--ignore", action="append", default=[], metavar="PATTERN",
                         help="glob of keys to leave out of the value diff; 'bn' (BatchNorm running stats) and 'ema' "
                              "name presets; repeatable")
    command.add_argument("--threads", type=int, default=None, help="tensor pairs compared at once (default: CPUs)")
    command.add_argument("--json", action="store_true", help="print JSON instead of text")
    command.add_argument("--trust", action="store_true", help="allow code from the files to run (only for files you trust)")
    command.set_defaults(func=diff)

    command = subparsers.add_parser(
        "doctor", help="why a checkpoint does not load into a model, and the code that fixes it",
        description="Line the checkpoint's keys up with the model's and propose fixes as Python code, checked by "
                    "loading into a meta-device copy of the model (no memory for weights).",
    )
    command.add_argument("path", metavar="CHECKPOINT", help="checkpoint file, *.index.json, or directory")
    command.add_argument("--model", required=True, metavar="PACKAGE.MODULE:FACTORY",
                         help="a callable returning the nn.Module, built on the meta device; the current directory "
                              "is importable")
    command.add_argument("--save-fixed", metavar="PATH", help="write the repaired state dict to PATH (never overwrites)")
    command.add_argument("--json", action="store_true", help="print JSON instead of text")
    command.add_argument("--trust", action="store_true", help="allow code from the file to run (only for files you trust)")
    command.set_defaults(func=doctor)


def diff(args: argparse.Namespace) -> int:
    # imported here: they need torch, which the header-only commands sharing this parser do not
    from ckptview.analyzers.valuediff import IGNORE_BN_STATS, IGNORE_EMA, diff as run_diff

    presets = {"bn": IGNORE_BN_STATS, "ema": IGNORE_EMA}
    ignore = [pattern for name in args.ignore for pattern in presets.get(name, (name,))]
    result = run_diff(args.a, args.b, values=args.values, ignore=ignore, threads=args.threads,
                      progress=args.values and not args.json and sys.stderr.isatty(), trust=args.trust)
    if args.json:
        print_json(result.to_dict())
        return 0
    keys = result.keys
    print(f"A: {args.a}\nB: {args.b}\n")
    print(f"{keys.matched:,} tensors in both with the same shape; {len(keys.missing):,} only in B (missing), "
          f"{len(keys.unexpected):,} only in A (unexpected), {len(keys.shape_mismatches):,} with another shape")
    if not keys.ok:
        print(keys.message())
    if keys.dtype_mismatches:
        rows = [(m.key, str(m.left).removeprefix("torch."), str(m.right).removeprefix("torch."))
                for m in keys.dtype_mismatches[:_TOP]]
        print(f"\n{len(keys.dtype_mismatches):,} tensors differ in dtype (load_state_dict casts these):")
        print(text_table(rows, ("key", "A", "B")))
    if result.values is not None:
        _print_values(result.values)
    if result.matching is not None:
        _print_matching(result.matching)
    return 0


def _print_matching(matching: Any) -> None:
    counts = ", ".join(f"{n} {how.replace('_', ' ')}" for how, n in matching.counts().items())
    print(f"\nacross formats ({matching.left_format} → {matching.right_format}): {counts or 'nothing paired'}")
    rows = [(", ".join(m.left_keys) or "-", m.right or "-", m.how, "" if m.max_abs_diff is None else f"{m.max_abs_diff:.3g}",
             m.detail) for m in matching.matches if m.how != "name" or m.max_abs_diff][:_TOP]
    if rows:
        print(text_table(rows, ("A", "B", "how", "max |a-b|", "detail"), align_right=(3,)))
    for side, keys in (("A", matching.unexplained_left), ("B", matching.unexplained_right)):
        if keys:
            print(f"unexplained in {side}: {', '.join(keys[:_TOP])}{' …' if len(keys) > _TOP else ''}")
    if matching.complete:
        print("every tensor is paired or explained")


def _print_values(values: Any) -> None:
    changed = sorted(values.changed(), key=lambda t: -t.rel_change if math.isfinite(t.rel_change) else -math.inf)
    print(f"\nvalues: {len(changed):,} of {len(values.tensors):,} compared tensors differ"
          + (f" ({len(values.ignored):,} ignored)" if values.ignored else "")
          + not_compared_text(values.unreadable)
          + ("" if values.complete else " - cancelled before the end"))
    if not changed:
        return
    rows = [(t.key, shape_text(t.shape), f"{t.max_abs_diff:.3g}", f"{t.rel_change:.3g}", f"{t.cosine:.6f}",
             f"{t.fraction_changed:.1%}", _nan_text(t)) for t in changed[:_TOP]]
    print(text_table(rows, ("key", "shape", "max |a-b|", "rel change", "cosine", "changed", "NaN A/B"),
                     align_right=(2, 3, 4, 5)))
    if len(changed) > _TOP:
        print(f"... and {len(changed) - _TOP:,} more (--json lists all)")
    blocks = [g for g in values.by_block() if g.changed_tensors]
    if len(blocks) > 1:
        rows = [(g.name, f"{g.changed_tensors}/{g.tensors}", human_count(g.numel), f"{g.rel_change:.3g}",
                 f"{g.cosine:.6f}") for g in sorted(blocks, key=lambda g: -g.rel_change)[:_TOP]]
        print("\nby block:")
        print(text_table(rows, ("block", "changed", "elements", "rel change", "cosine"), align_right=(1, 2, 3, 4)))


def _nan_text(change: Any) -> str:
    return f"{change.nan_left}/{change.nan_right}" if change.nan_left or change.nan_right else ""


def doctor(args: argparse.Namespace) -> int:
    # Like uvicorn and gunicorn: a factory next to the user (`models:make`) should import.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    from ckptview.analyzers.doctor import doctor as run_doctor
    from ckptview.analyzers.keydiff import compress_keys

    report = run_doctor(args.path, args.model, trust=args.trust)
    saved = None
    if args.save_fixed and report.loads_after_fix and not report.ok:
        try:
            saved = report.save_fixed(args.save_fixed)
        except FileExistsError as exc:
            print(f"ckptview: error: {exc}", file=sys.stderr)
            return 1
    if args.json:
        data = report.to_dict()
        data["saved"] = saved
        print_json(data)
        return 0
    print(f"{printable(args.path)} into {printable(args.model)}:\n")
    print(report.summary())
    if report.leaves_missing:
        print("Left missing on purpose: " + ", ".join(compress_keys(report.leaves_missing)))
    if saved:
        print(f"\nWrote the repaired state dict to {saved}")
    elif args.save_fixed:
        print(f"\nNothing written to {args.save_fixed}: " + ("it loads as it is" if report.ok else "no fix makes it load"))
    return 0
