"""`ckptview report`: one self-contained HTML page of a checkpoint, to attach to a bug report or a pull request."""

from __future__ import annotations

import argparse
import os
from typing import Any

from ckptview.present.text import human_bytes


def add_commands(subparsers: Any) -> None:
    help_text = ("write one self-contained HTML file (works offline) with the overview, tensors, module tree, "
                 "statistics, BatchNorm findings and training state; with --compare the key and value diff")
    command = subparsers.add_parser("report", help=help_text, description=help_text)
    command.add_argument("path", metavar="PATH", help="checkpoint file, *.index.json, or directory")
    command.add_argument("-o", "--output", required=True, metavar="OUT", help="the HTML file to write")
    command.add_argument("--compare", metavar="OTHER", help="a second checkpoint to compare with")
    command.add_argument("--force", action="store_true", help="replace OUT if it exists")
    command.add_argument("--trust", action="store_true", help="allow code from the files to run (only for files you trust)")
    command.set_defaults(func=_report)


def _report(args: argparse.Namespace) -> int:
    from ckptview.present.report import write_report

    written = write_report(args.path, args.output, compare=args.compare, force=args.force, trust=args.trust)
    print(f"wrote {written} ({human_bytes(os.path.getsize(written))})")
    return 0
