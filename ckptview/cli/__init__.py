"""
The `ckptview` command. Each group of subcommands lives in its own module with an
`add_commands(subparsers)` function; a command returns its exit code.

Exit codes: 0 success; 1 an error about the input (message on stderr); 2 usage error;
3 `scan` found that the file needs foreign code; 4 `export-check` found an export that diverges;
130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys
import threading
from collections.abc import Sequence
from typing import Any, NoReturn

from ckptview.errors import CkptviewError, printable

_COMMAND_MODULES = (
    "ckptview.cli.inspect",
    "ckptview.cli.analyze",
    "ckptview.cli.compare",
    "ckptview.cli.run",
    "ckptview.cli.timeline",
    "ckptview.cli.report",
    "ckptview.cli.export",
)


def build_parser() -> argparse.ArgumentParser:
    from ckptview import __version__

    parser = argparse.ArgumentParser(
        prog="ckptview",
        description="Open, inspect, check, compare and run deep-learning checkpoints without running their code.",
    )
    parser.add_argument("--version", action="version", version=f"ckptview {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in _COMMAND_MODULES:
        importlib.import_module(module_name).add_commands(subparsers)
    return parser


def add_path_command(subparsers: Any, name: str, help: str, *, json_help: str = "print JSON instead of a table") -> argparse.ArgumentParser:
    """A subcommand taking one checkpoint PATH, `--json` and `--trust`."""
    command = subparsers.add_parser(name, help=help, description=help)
    command.add_argument("path", metavar="PATH", help="checkpoint file, *.index.json, or directory")
    command.add_argument("--json", action="store_true", help=json_help)
    command.add_argument("--trust", action="store_true", help="allow code from the file to run (only for files you trust)")
    return command


def print_json(data: Any) -> None:
    """
    `--json` output in one write (json.dump writes each token on its own: 840,000 writes for
    20,000 tensors). A list is written one element per line by the C encoder: `indent` makes json
    fall back to its Python encoder, 160 s for the statistics of a million tensors.
    """
    if isinstance(data, list) and data:
        encode = item_encoder()
        print_json_lines([encode(item) for item in data])
    else:
        sys.stdout.write(strict_json(json.dumps(data, indent=2, default=_json_default, allow_nan=True)) + "\n")


def print_json_lines(items: list[str]) -> None:
    """A JSON list whose elements are already encoded (`item_encoder`), laid out as `print_json` lays one out."""
    text = ",\n  ".join(items)
    if "NaN" in text or "Infinity" in text:  # only the elements that hold one are looked at again
        text = ",\n  ".join(map(strict_json, items))
    sys.stdout.write("[\n  " + text + "\n]\n" if items else "[]\n")


# a JSON string (skipped whole: a name may read "NaN"; unrolled, so a long one is one match, not one per
# character) or one of the bare tokens json writes for non-finite floats
_STRING_OR_NON_FINITE = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|-?Infinity|NaN')


def strict_json(text: str) -> str:
    """
    `text` (json's output with `allow_nan`) with NaN, Infinity and -Infinity written as null: they are
    no JSON, and `JSON.parse`, Go and Rust refuse them (the statistics of a skipped tensor, a run's
    first change). Encoded with `allow_nan` and fixed here, not converted first: the C encoder writes
    a million statistics rows in a second, a pass over the values in Python would add as much again.
    """
    if "NaN" not in text and "Infinity" not in text:
        return text
    return _STRING_OR_NON_FINITE.sub(lambda match: "null" if match[0][0] != '"' else match[0], text)


def item_encoder() -> Any:
    """`JSONEncoder.encode` for one list element. json's C encoder, called directly where this Python has
    it: `encode` makes a new one per call, a third of writing 20,000 tensors' `tensors --json`."""
    encoder = json.JSONEncoder(default=_json_default, allow_nan=True)
    make_encoder = getattr(json.encoder, "c_make_encoder", None)
    if make_encoder is None:
        return encoder.encode
    # the arguments JSONEncoder.iterencode passes for these settings (no indent, sort_keys or skipkeys)
    chunks = make_encoder({}, encoder.default, json.encoder.encode_basestring_ascii, None, encoder.key_separator,
                          encoder.item_separator, False, False, True)
    return lambda item: "".join(chunks(item, 0))


def _json_default(value: Any) -> Any:
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


_PRINTABLE_ASCII = bytes(range(0x20, 0x7F)) + b"\n\t"


class _TerminalSafe:
    """stdout as the commands write it: control characters other than newline and tab (ANSI escapes
    in a tensor name, say) are written as escapes, whatever a command forgot to escape itself."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        # the check runs in C on the whole text; only text that holds a control character is rebuilt.
        # ASCII text (all `--json` output) is checked as bytes: 3 ms for 20,000 tensors' listing, not 11
        if text.isascii():
            clean = not text.encode("ascii").translate(None, _PRINTABLE_ASCII)
        else:
            clean = text.replace("\n", "").replace("\t", "").isprintable()
        if not clean:
            text = "".join(char if char.isprintable() or char in "\n\t" else printable(char) for char in text)
        return self._stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    stdout, sys.stdout = sys.stdout, _TerminalSafe(sys.stdout)
    try:
        return int(args.func(args) or 0)
    except CkptviewError as exc:
        print(f"ckptview: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ckptview: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `ckptview tensors big.pt | head`
        sys.stderr.close()
        return 0
    except Exception as exc:  # a bug of ours, or a file shape no check foresaw: still one line, never a traceback
        if os.environ.get("CKPTVIEW_DEBUG"):
            raise
        where = printable(getattr(args, "path", "") or "")
        print(f"ckptview: error: {where + ': ' if where else ''}ckptview failed on this input ({type(exc).__name__}); "
              "this is a bug in ckptview: please report it (CKPTVIEW_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1
    finally:
        sys.stdout = stdout


def run() -> NoReturn:
    """
    The `ckptview` command (and `python -m ckptview`): `main`, its output flushed, then an exit that
    skips tearing the interpreter down, as mypy's command does. Freeing every module at exit took
    12 ms of each command (`ckptview tensors --json` on 20,000 tensors: 0.30 s in all), paid once per
    file by a pre-commit hook that scans a folder. Only when nothing else runs: with a thread alive
    (fsspec's event loop for a URL, a Dask client) the interpreter exits as usual, so whatever it
    runs at exit still runs. `main` itself, what tests and other Python code call, exits nothing.
    """
    code = main()
    try:
        for stream in (sys.stdout, sys.stderr):
            if not stream.closed:  # main closes stderr when the reader of its output has gone
                stream.flush()
    except BrokenPipeError:  # `ckptview tensors big.pt | head`: the reader left before the last bytes
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # or the exit would flush them again
    if threading.active_count() == 1:
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
