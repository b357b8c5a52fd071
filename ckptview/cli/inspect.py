"""`ckptview info`, `ckptview tensors`, `ckptview scan`: what a file holds and whether it needs code."""

from __future__ import annotations

import argparse
from collections import Counter
from typing import Any

import ckptview
from ckptview.analyzers.sections import find_sections
from ckptview.cli import add_path_command, print_json
from ckptview.present.text import dtype_name, human_bytes, human_count, shape_text, text_table
from ckptview.readers.model import Checkpoint

EXIT_NEEDS_CODE = 3


def add_commands(subparsers: Any) -> None:
    add_path_command(subparsers, "info", "format, size, sections and totals of a checkpoint").set_defaults(func=info)
    add_path_command(subparsers, "tensors", "every tensor: name, shape, dtype, parameters, size").set_defaults(func=tensors)
    add_path_command(subparsers, "scan", "list the code (pickle imports) a file wants to run; exit 3 if any").set_defaults(func=scan)


def info_data(ckpt: Checkpoint) -> dict[str, Any]:
    dtypes = Counter()
    for entry in ckpt.unique_tensors():
        dtypes[dtype_name(entry.dtype)] += entry.numel
    return {
        "path": ckpt.path,
        "format": ckpt.format,
        "file_size": ckpt.file_size,
        "tensor_count": ckpt.tensor_count,
        "parameter_count": ckpt.parameter_count,
        "total_bytes": ckpt.total_bytes,
        "dtypes": dict(dtypes),
        "devices": sorted({entry.device for entry in ckpt.tensors()}),
        "sections": [
            {"kind": s.kind, "path": list(s.path), "name": s.name, "tensor_count": s.tensor_count, "explanation": s.explanation}
            for s in find_sections(ckpt)
        ],
        "metadata": ckpt.metadata,
        "needs_code": needs_code(ckpt),
        "pickle_imports": [{"name": imp.name, "count": imp.count} for imp in ckpt.pickle_imports],
        "details": ckpt.details,
    }


def needs_code(ckpt: Checkpoint) -> bool:
    return ckpt.needs_trust or ckpt.format == "torchscript"


def info(args: argparse.Namespace) -> int:
    with ckptview.open(args.path, trust=args.trust) as ckpt:
        data = info_data(ckpt)
    if args.json:
        print_json(data)
        return 0
    print(f"{data['path']}")
    print(f"  format      {data['format']}, {human_bytes(data['file_size'])} on disk")
    print(f"  tensors     {data['tensor_count']:,} ({human_count(data['parameter_count'])} elements, "
          f"{human_bytes(data['total_bytes'])} of data)")
    if data["dtypes"]:
        print("  dtypes      " + ", ".join(f"{name} {human_count(n)}" for name, n in data["dtypes"].items()))
    if data["devices"]:
        print("  saved on    " + ", ".join(data["devices"]))
    print(f"  code        {_safety_line(data)}")
    for problem in data["details"].get("problems", []):
        print(f"  problem     {problem}")
    if data["metadata"]:
        print("  metadata    " + ", ".join(f"{k}={v}" for k, v in list(data["metadata"].items())[:8]))
    print()
    rows = [(s["kind"], s["name"], s["tensor_count"], s["explanation"]) for s in data["sections"]]
    print(text_table(rows, ("section", "path", "tensors", "what it is"), align_right=(2,)))
    return 0


def _safety_line(data: dict[str, Any]) -> str:
    if data["pickle_imports"]:
        names = ", ".join(imp["name"] for imp in data["pickle_imports"][:4])
        more = f" and {len(data['pickle_imports']) - 4} more" if len(data["pickle_imports"]) > 4 else ""
        return f"needs foreign code to load: {names}{more} (run `ckptview scan` for the list)"
    if data["format"] == "torchscript":
        return "TorchScript: torch.jit.load runs the archive's code"
    return "none needed: loads with torch.load(weights_only=True) / safetensors"


def tensors(args: argparse.Namespace) -> int:
    with ckptview.open(args.path, trust=args.trust) as ckpt:
        entries = ckpt.tensors()
        if args.json:
            print_json([
                {"name": e.name, "shape": list(e.shape), "dtype": dtype_name(e.dtype), "numel": e.numel,
                 "nbytes": e.nbytes, "device": e.device, "layout": e.layout, "storage_key": e.storage_key}
                for e in entries
            ])
            return 0
        rows = [(e.name, shape_text(e.shape), dtype_name(e.dtype), f"{e.numel:,}", human_bytes(e.nbytes)) for e in entries]
        print(text_table(rows, ("name", "shape", "dtype", "params", "size"), align_right=(3, 4)))
        shared = ckpt.tensor_count - len(ckpt.unique_tensors())
        note = f"; {shared} shared with another name, counted once" if shared else ""
        print(f"\n{ckpt.tensor_count:,} tensors, {ckpt.parameter_count:,} elements, "
              f"{human_bytes(ckpt.total_bytes)}{note}")
    return 0


def scan(args: argparse.Namespace) -> int:
    with ckptview.open(args.path, trust=args.trust) as ckpt:
        imports = [{"name": imp.name, "count": imp.count} for imp in ckpt.pickle_imports]
        code_files = ckpt.details.get("code_files", [])
        verdict = needs_code(ckpt)
        if args.json:
            print_json({"path": ckpt.path, "format": ckpt.format, "needs_code": verdict, "imports": imports,
                        "torchscript_code": code_files})
        elif imports:
            print(f"{ckpt.path}: the pickle imports {len(imports)} global(s) outside the allow-list; torch.load("
                  "weights_only=False) would import and may call them:")
            print(text_table([(i["name"], i["count"]) for i in imports], ("import", "uses"), align_right=(1,)))
            print("ckptview listed the file without running any of them. Load it with trust only if you trust its source.")
        elif ckpt.format == "torchscript":
            print(f"{ckpt.path}: a TorchScript archive; torch.jit.load runs its code ({len(code_files)} files: "
                  + ", ".join(code_files[:5]) + ")")
        else:
            print(f"{ckpt.path}: needs no foreign code ({ckpt.format}); safe to load with torch.load(weights_only=True)"
                  if ckpt.format.startswith("torch") else f"{ckpt.path}: needs no foreign code ({ckpt.format})")
    return EXIT_NEEDS_CODE if verdict else 0
