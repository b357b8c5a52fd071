"""`ckptview export-check CKPT --model pkg.mod:factory`: will it deploy? ONNX, trace and script against eager."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from ckptview.cli import print_json
from ckptview.cli.run import _json_object, _positive, _shape
from ckptview.errors import printable
from ckptview.present.text import human_bytes, text_table

# Exit status when a target diverges from eager PyTorch or cannot be exported (0: all match).
DIVERGES = 4


def add_commands(subparsers: Any) -> None:
    command = subparsers.add_parser(
        "export-check", help="export to ONNX and TorchScript (trace, script) and compare each with eager PyTorch",
        description="Export the model to ONNX (run in ONNX Runtime), torch.jit.trace and torch.jit.script, and "
                    "compare each with eager PyTorch on the example input, another batch size, the sign flipped and "
                    "scaled. Exit 0 when every target matches, 4 when one diverges or cannot be exported.",
    )
    command.add_argument("path", metavar="CKPT", help="checkpoint file, *.index.json, or directory")
    command.add_argument("--model", metavar="PACKAGE.MODULE:FACTORY",
                         help="the model's code, when the file holds only weights; the current directory is importable")
    command.add_argument("--model-kwargs", metavar="JSON", type=_json_object, default=None,
                         help='keyword arguments for the factory, as JSON, e.g. \'{"num_classes": 10}\'')
    command.add_argument("--input-shape", metavar="N,C,H,W", type=_shape, default=None,
                         help="shape of the synthesised example input (default: inferred from the first layer)")
    command.add_argument("--targets", metavar="LIST", type=_targets, default=["onnx", "trace", "script"],
                         help="which exports to check, from onnx,trace,script (default: all three)")
    command.add_argument("--device", default=None, help="where eager PyTorch runs: cuda, cpu, ... (default: the best)")
    command.add_argument("--save-to", metavar="FOLDER", default=None,
                         help="keep the exported files in FOLDER, which must not exist yet (never overwrites)")
    command.add_argument("--atol", type=float, default=1e-4, help="absolute tolerance (default 1e-4)")
    command.add_argument("--rtol", type=float, default=1e-4,
                         help="tolerance relative to the largest eager output value (default 1e-4)")
    command.add_argument("--repeats", type=_positive, default=5, help="timed calls per latency (default 5)")
    command.add_argument("--json", action="store_true", help="print JSON instead of a table")
    command.add_argument("--trust", action="store_true", help="allow code from the file to run (only for files you trust)")
    command.set_defaults(func=export_check)


def _targets(text: str) -> list[str]:
    from ckptview.inference.export import Target

    try:
        return [Target(part.strip().lower()).value for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def export_check(args: argparse.Namespace) -> int:
    if os.getcwd() not in sys.path:  # a factory next to the user (`models:make`) should import
        sys.path.insert(0, os.getcwd())
    from ckptview.inference.export import export_check as run_check

    check = run_check(args.path, args.model, model_kwargs=args.model_kwargs, input_shape=args.input_shape,
                      targets=args.targets, device=args.device, save_to=args.save_to, trust=args.trust,
                      atol=args.atol, rtol=args.rtol, repeats=args.repeats)
    if args.json:
        print_json(check.to_dict())
    else:
        print(render(check, args.path))
    return 0 if check.ok else DIVERGES


def render(check: Any, path: str) -> str:
    """The terminal report of `ckptview export-check`."""
    spec = check.input
    lines = [printable(path), f"  input       {spec.describe()}", f"  device      {check.device}",
             f"  tolerance   |diff| <= {check.atol:g} + {check.rtol:g} × max |eager|", ""]
    rows = [(r.target, r.status, _number(r.max_abs_diff), _number(r.cosine, 6), _percent(r.top1_agreement),
             _ms(r.latency_ms), _ms(r.eager_latency_ms), human_bytes(r.file_size) if r.file_size else "-")
            for r in check.results]
    lines.append(text_table(rows, ("target", "status", "max |diff|", "cosine", "top-1 agree", "latency", "eager",
                                   "size"), align_right=(2, 3, 4, 5, 6, 7)))
    for result in check.results:
        lines.append("")
        lines.append(f"{result.target}: {result.tool}")
        for probe in result.probes:
            how = probe.error or f"max |diff| {probe.max_abs_diff:.3g}, cosine {probe.cosine:.6f}"
            lines.append(f"  {'ok  ' if probe.ok else 'DIFF'} {probe.input}: {how}")
        if result.message:
            lines.append(f"  {printable(result.message)}")
        for warning in result.warnings[:5]:
            lines.append(f"  warning: {printable(warning.describe())}")
    if check.folder:
        lines.append(f"\nexports saved in {printable(check.folder)}")
    lines.append(f"\n{'every target matches eager PyTorch' if check.ok else 'NOT every target matches'} "
                 f"({check.seconds:.1f} s)")
    return "\n".join(lines)


def _number(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} ms"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"
