"""`ckptview info`, `ckptview tensors`, `ckptview scan`: what a file holds and whether it needs code."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import ckptview
from ckptview.analyzers.sections import find_sections, pickled_modules
from ckptview.cli import add_path_command, item_encoder, print_json, print_json_lines
from ckptview.errors import CkptviewError, printable
from ckptview.present.text import human_bytes, human_count, shape_text, text_table
from ckptview.readers import code_verdict_only
from ckptview.readers.model import ROOT_NAME, Checkpoint, PickleImport, TensorEntry, TensorInfo, dotted_name
from ckptview.readers.registry import unpickled_by_its_loader
from ckptview.readers.weights_only import safe_loader_obstacle

EXIT_NEEDS_CODE = 3


def add_commands(subparsers: Any) -> None:
    _many_paths(add_path_command(subparsers, "info", "format, size, sections and totals of a checkpoint; with "
                                                     "several paths (or a folder), one line each")).set_defaults(func=info)
    add_path_command(subparsers, "tensors", "every tensor: name, shape, dtype, parameters, size").set_defaults(func=tensors)
    _many_paths(add_path_command(subparsers, "scan", "list the code (pickle imports) a file wants to run; exit 3 if "
                                                     "any. Several paths or folders: one line each, the worst exit "
                                                     "status (3 over 1 over 0)")).set_defaults(func=scan)
    add_path_command(subparsers, "training", "optimizer groups and state by parameter name, schedulers, progress, "
                                             "hyper-parameters").set_defaults(func=training)


def _many_paths(command: argparse.ArgumentParser) -> argparse.ArgumentParser:
    for action in command._actions:
        if action.dest == "path":
            action.nargs = "+"
            action.help = "checkpoint files, *.index.json, or folders (a folder that is no checkpoint itself is walked)"
    return command


# What a walked folder's files are checked for: content decides the format, this only picks files
# (a config.json or README beside the weights is not a checkpoint to report on).
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar", ".pkl", ".safetensors", ".index.json", ".onnx",
                        ".gguf", ".npy", ".npz", ".engine", ".plan", ".h5", ".keras", ".tflite", ".index", ".pt2")


def expand_paths(paths: list[str]) -> list[str]:
    """The checkpoints the command-line paths name: files as given; a folder that is a checkpoint
    itself (DCP, a sharded set, a SavedModel) as one, followed by every other checkpoint file in it;
    any other folder walked for checkpoint files, in the order people number them (epoch_2.pt before
    epoch_10.pt; a Trainer's checkpoint-N/ file by file, so `scan` names training_args.bin as the
    file that needs code)."""
    expanded: list[str] = []
    for path in paths:
        if not os.path.isdir(path):
            expanded.append(path)
            continue
        if _is_checkpoint_folder(path):
            expanded.extend(_folder_and_strays(path))
            continue
        for folder, folders, files in os.walk(path):
            folders.sort(key=natural_order)
            found = [name for name in folders if _is_checkpoint_folder(os.path.join(folder, name))]
            for name in found:
                expanded.extend(_folder_and_strays(os.path.join(folder, name)))
            folders[:] = [name for name in folders if name not in found and not name.startswith(".")]
            expanded.extend(os.path.join(folder, name) for name in sorted(files, key=natural_order)
                            if _walked_checkpoint(folder, name))
    return _once_each(expanded)


def _once_each(paths: list[str]) -> list[str]:
    """`paths` with each file once, by the name it has as a checkpoint: the Hugging Face hub's cache holds
    each file as a blob named by its hash and as a link named `pytorch_model.bin` to it, and a folder
    walk found both (the blob by its content)."""
    chosen: dict[str, str] = {}
    for path in paths:
        real = os.path.realpath(path)
        if real not in chosen or (not chosen[real].lower().endswith(_CHECKPOINT_SUFFIXES)
                                  and path.lower().endswith(_CHECKPOINT_SUFFIXES)):
            chosen[real] = path
    kept = set(chosen.values())
    return [path for path in dict.fromkeys(paths) if path in kept]


# Names no loader unpickles, left unread in a folder walk (a dataset's images, a repository's text)
_NOT_CHECKPOINT_SUFFIXES = (".json", ".txt", ".md", ".rst", ".py", ".yaml", ".yml", ".toml", ".cfg", ".ini", ".csv",
                            ".tsv", ".log", ".html", ".png", ".jpg", ".jpeg", ".gif", ".webp", ".svg", ".ipynb",
                            ".gitattributes", ".gitignore", ".lock", ".sh")


def _walked_checkpoint(folder: str, name: str) -> bool:
    """Whether a file met walking a folder is judged: a checkpoint by its name, or any other file (a
    `model.torchscript`, a `weights.pickle`, a hub blob without a suffix) whose content a loader unpickles."""
    lowered = name.lower()
    if lowered.endswith(_CHECKPOINT_SUFFIXES):
        return True
    return not lowered.endswith(_NOT_CHECKPOINT_SUFFIXES) and unpickled_by_its_loader(os.path.join(folder, name))


def natural_order(name: str) -> tuple[tuple[tuple[int, int | str], ...], str]:
    """A key that sorts the numbers in names by value: epoch_2.pt before epoch_10.pt, as a run saved them
    (ties, x1.pt and x01.pt, by the name itself)."""
    parts = tuple((0, int(part)) if part.isdecimal() else (1, part) for part in _DIGIT_RUNS.split(name) if part)
    return parts, name


_DIGIT_RUNS = re.compile(r"(\d+)")


def _is_checkpoint_folder(path: str) -> bool:
    try:
        names = os.listdir(path)
    except OSError:
        return False
    # a SavedModel is one model however many files it holds (scan must not walk past its saved_model.pb)
    return (".metadata" in names or sum(name.endswith(".index.json") for name in names) == 1
            or "saved_model.pb" in names)


def _folder_and_strays(folder: str) -> list[str]:
    """
    A folder that is one checkpoint, then each checkpoint file in it (at any depth) that checkpoint
    does not read: a pickle dropped beside a sharded set is no shard, and `scan` of the folder must
    judge it on its own (it called such a folder safe). What the checkpoint reads is asked of it (its
    files' sources), so a folder it cannot open has every file judged on its own.
    """
    read: set[str] = set()
    with contextlib.suppress(CkptviewError), code_verdict_only(), ckptview.open(folder) as ckpt:
        named = [os.path.join(folder, name) for name in ckpt.details.get("files", ())]
        read = {os.path.realpath(file) for file in [ckpt.path, *named,
                                                    *(getattr(source, "path", "") for source in ckpt._sources)]}
    strays = []
    for parent, folders, files in os.walk(folder):
        folders[:] = sorted((name for name in folders if not name.startswith(".")), key=natural_order)
        strays.extend(os.path.join(parent, name) for name in sorted(files, key=natural_order)
                      if os.path.realpath(os.path.join(parent, name)) not in read and _walked_checkpoint(parent, name))
    return [folder, *strays]


def _each(paths: list[str], trust: bool, *, for_scan: bool = False) -> Iterator[tuple[str, Checkpoint | None, CkptviewError | None]]:
    for path in paths:
        try:
            with code_verdict_only() if for_scan else contextlib.nullcontext():
                ckpt = ckptview.open(path, trust=trust)
        except CkptviewError as error:
            yield path, None, error
            continue
        with ckpt:
            yield path, ckpt, None


def _worst(codes: list[int]) -> int:
    return max(codes, key=lambda code: {3: 2, 1: 1}.get(code, 0), default=0)


def info_data(ckpt: Checkpoint) -> dict[str, Any]:
    dtypes = Counter()
    for entry in ckpt.unique_tensors():
        dtypes[entry.dtype_name] += entry.numel
    return {
        "path": ckpt.path,
        "format": ckpt.format,
        "file_size": ckpt.file_size,
        "tensor_count": ckpt.tensor_count,
        "parameter_count": sum(dtypes.values()),  # ckpt.parameter_count, without a second pass
        "total_bytes": ckpt.total_bytes,
        "dtypes": dict(dtypes),
        "devices": sorted({entry.device for entry in ckpt.tensors()}),
        "sections": [
            {"kind": s.kind, "path": list(s.path), "name": s.name, "tensor_count": s.tensor_count, "explanation": s.explanation}
            for s in find_sections(ckpt)
        ],
        "metadata": ckpt.metadata,
        "needs_code": needs_code(ckpt),
        "pickle_imports": _imports_json(ckpt.pickle_imports),
        "details": ckpt.details,
        "modules": [{"name": m.name, "class_path": m.class_path, "parameters": list(m.parameters),
                     "buffers": list(m.buffers)} for m in pickled_modules(ckpt)],
    }


def needs_code(ckpt: Checkpoint) -> bool:
    return ckpt.needs_trust or ckpt.format == "torchscript"


def info(args: argparse.Namespace) -> int:
    paths = expand_paths(args.path)
    if not paths:
        return _nothing_found(args)
    if paths != args.path or len(paths) > 1:  # several files, or a folder walked: one line each
        return _info_many(paths, args)
    args.path = paths[0]
    with ckptview.open(args.path, trust=args.trust) as ckpt:
        data = info_data(ckpt)
        if ckpt.format == "torchscript" and args.trust:
            from ckptview.readers.torchscript import describe_script_module

            script = describe_script_module(ckpt)
            data["script_modules"] = [{"name": name, "type": kind} for name, kind in script.modules]
            data["forward_code"] = script.forward_code
    if args.json:
        print_json(data)
        return 0
    print(printable(data["path"]))
    print(f"  format      {data['format']}, {human_bytes(data['file_size'])} on disk")
    print(f"  tensors     {data['tensor_count']:,} ({human_count(data['parameter_count'])} elements, "
          f"{human_bytes(data['total_bytes'])} of data)")
    if data["dtypes"]:
        print("  dtypes      " + ", ".join(f"{name} {human_count(n)}" for name, n in data["dtypes"].items()))
    if data["devices"]:
        print("  saved on    " + ", ".join(data["devices"]))
    print(f"  code        {_safety_line(data)}")
    for problem in data["details"].get("problems", []):
        print(f"  problem     {printable(problem)}")
    if data["metadata"]:
        print("  metadata    " + printable(", ".join(f"{k}={v}" for k, v in list(data["metadata"].items())[:8])))
    print()
    rows = [(s["kind"], s["name"], s["tensor_count"], s["explanation"]) for s in data["sections"]]
    if rows:
        print(text_table(rows, ("section", "path", "tensors", "what it is"), align_right=(2,)))
    else:  # a bare tensor or array, or values none of whose shapes is a section: a header over nothing said less
        print("no sections (state dict, optimizer, training progress) recognised: `ckptview tensors` lists every "
              "tensor by name")
    if data["modules"]:
        print("\nwhole pickled module (classes named by the pickle, not imported):")
        print(text_table([(m["name"] or "<root>", m["class_path"], ", ".join(m["parameters"] + m["buffers"]))
                          for m in data["modules"]], ("module", "class", "tensors")))
    if "script_modules" in data:
        print("\nTorchScript modules:")
        print(text_table([(m["name"], m["type"]) for m in data["script_modules"]], ("module", "type")))
        print("\nforward:\n" + data["forward_code"])
    return 0


def _tensor_record(name: str, info: TensorInfo) -> dict[str, Any]:
    """One tensor of `tensors --json`, from its record (20,000 of these: the entry's properties each
    forward to the record, and going through them was a fifth of the command)."""
    storage = info.storage
    return {"name": name, "shape": list(info.shape), "dtype": info.dtype, "numel": info.numel, "nbytes": info.nbytes,
            "device": info.device, "layout": info.layout, "storage_key": None if storage is None else storage.key,
            "encoding": info.encoding}


def tensor_json_items(entries: Iterable[TensorEntry]) -> list[str]:
    """
    `tensors --json`'s elements, encoded: `_tensor_record` as `print_json` writes it, character for
    character. Every string goes through json's own C string encoder; what is formatted here is the
    fixed frame of keys around them. A dict per tensor through json's encoder, its nine keys escaped
    again for each, took 72 of a 20,000-tensor listing's 300 ms; this takes 38. A record holding
    anything but ints and strings (a reader's numpy int in a shape, say) goes through json itself.
    """
    encode_string, encode_record = json.encoder.encode_basestring_ascii, item_encoder()
    items = []
    for entry in entries:
        info = entry.info
        shape, storage, encoding = info.shape, info.storage, info.encoding
        key = None if storage is None else storage.key
        dtype, device, layout = info.dtype, info.device, info.layout
        if (type(entry.name) is str and type(dtype) is str and type(device) is str and type(layout) is str
                and (key is None or type(key) is str) and (encoding is None or type(encoding) is str)
                and all(type(size) is int for size in shape)):
            items.append(
                f'{{"name": {encode_string(entry.name)}, "shape": [{", ".join(map(str, shape))}], '
                f'"dtype": {encode_string(dtype)}, "numel": {info.numel}, "nbytes": {info.nbytes}, '
                f'"device": {encode_string(device)}, "layout": {encode_string(layout)}, '
                f'"storage_key": {"null" if key is None else encode_string(key)}, '
                f'"encoding": {"null" if encoding is None else encode_string(encoding)}}}')
        else:
            items.append(encode_record(_tensor_record(entry.name, info)))
    return items


def _safety_line(data: dict[str, Any]) -> str:
    if data["pickle_imports"]:
        names = ", ".join(imp["name"] for imp in data["pickle_imports"][:4])
        more = f" and {len(data['pickle_imports']) - 4} more" if len(data["pickle_imports"]) > 4 else ""
        return f"needs foreign code to load: {names}{more} (run `ckptview scan` for the list)"
    if data["format"] == "torchscript":
        return "TorchScript: torch.jit.load runs the archive's code"
    obstacle = safe_loader_obstacle(data["details"])
    if obstacle:
        return f"none needed, but {obstacle}"
    if data["format"].startswith("torch"):
        return "none needed: loads with torch.load(weights_only=True)"
    if data["format"] == "pt2":
        return ("none needed: no pickled payloads, its symbolic sizes and guards are plain arithmetic, and its "
                "graph calls only torch ops")
    return f"none needed: {data['format']} files hold no pickled code"


def tensors(args: argparse.Namespace) -> int:
    with ckptview.open(args.path, trust=args.trust) as ckpt:
        entries = ckpt.tensors()
        if args.json:
            print_json_lines(tensor_json_items(entries))
            return 0
        # an encoded tensor shows its stored form (Q4_K, int8) and what load() returns
        rows = [(e.name, shape_text(e.shape), f"{e.encoding} → {e.dtype_name}" if e.encoding else e.dtype_name,
                 f"{e.numel:,}", human_bytes(e.nbytes)) for e in entries]
        columns = ("name", "shape", "dtype", "params", "size")
        if any(e.info.layout not in ("strided", "encoded") or e.info.note for e in entries):
            # sparse, quantized, meta and unreadable tensors (a nested tensor's shape is its buffer's) say so, and a
            # DTensor which part of the whole tensor the file holds
            columns += ("layout",)
            rows = [(*row, _layout_text(e.info)) for row, e in zip(rows, entries)]
        print(text_table(rows, columns, align_right=(3, 4)))
        shared = ckpt.tensor_count - len(ckpt.unique_tensors())
        note = f"; {shared} shared with another name, counted once" if shared else ""
        print(f"\n{ckpt.tensor_count:,} tensors, {ckpt.parameter_count:,} elements, "
              f"{human_bytes(ckpt.total_bytes)}{note}")
    return 0


def _layout_text(info: Any) -> str:
    if info.layout == "strided":
        return info.note or ""  # a DTensor's placements and global shape
    if not info.note:
        return info.layout
    what = re.split(r"[:;(]", info.note, maxsplit=1)[0].strip()  # the note's subject; `info` has it whole
    return f"{info.layout}: {what[:48]}"


def _nothing_found(args: argparse.Namespace) -> int:
    """Folders with no checkpoint in them: said (a gate pointed at the wrong folder passed in silence)."""
    if args.json:
        print_json([])
    folders = ", ".join(printable(path) for path in args.path)
    print(f"ckptview: error: no checkpoint files in {folders} (looked for {', '.join(_CHECKPOINT_SUFFIXES)}, and "
          "for pickles by their content): give the folder that holds them", file=sys.stderr)
    return 1


def _info_many(paths: list[str], args: argparse.Namespace) -> int:
    """One line per file (`--json`: a list of `info --json` objects, or {"path", "error"})."""
    records, codes = [], []
    for path, ckpt, error in _each(paths, args.trust):
        if ckpt is None:
            records.append({"path": path, "error": str(error)})
            codes.append(1)
            if not args.json:
                print(f"{printable(path)}: error: {error.reason if error else ''}")
            continue
        data = info_data(ckpt)
        records.append(data)
        codes.append(0)
        if not args.json:
            print(f"{printable(path)}: {data['format']}, {human_bytes(data['file_size'])}, {data['tensor_count']:,} "
                  f"tensors, {human_count(data['parameter_count'])} elements; code: {_safety_line(data)}")
    if args.json:
        print_json(records)
    return _worst(codes)


def scan(args: argparse.Namespace) -> int:
    paths = expand_paths(args.path)
    if not paths:
        return _nothing_found(args)
    if paths != args.path or len(paths) > 1:  # several files, or a folder walked: one line each
        return _scan_many(paths, args)
    args.path = paths[0]
    try:
        with code_verdict_only():
            ckpt = ckptview.open(args.path, trust=args.trust)
    except CkptviewError as error:
        named = getattr(error, "named_globals", None)
        if not named:
            raise
        # damaged, but torch.load would import (and may call) what the pickle names before the damage
        if args.json:
            print_json(_damaged_scan_record(args.path, error))
        else:
            print(f"ckptview: error: {error}", file=sys.stderr)
            print(text_table([(imp.name, imp.count) for imp in named], ("import", "uses"), align_right=(1,)))
        return EXIT_NEEDS_CODE
    with ckpt:
        record = _scan_record(ckpt)
        imports, code_files, verdict = record["imports"], record["torchscript_code"], record["needs_code"]
        if args.json:
            print_json(record)
        elif imports:
            if ckpt.format == "torch-dcp":
                print(f"{printable(ckpt.path)}: its pickles import {len(imports)} global(s) outside the allow-list; "
                      "torch.distributed.checkpoint.load would import and may call them:")
            elif ckpt.format.startswith("torch") or ckpt.format == "pickle":
                print(f"{printable(ckpt.path)}: the pickle imports {len(imports)} global(s) outside the allow-list; "
                      "torch.load(weights_only=False) would import and may call them:")
            elif ckpt.details.get("allow_pickle"):
                print(f"{printable(ckpt.path)}: the pickle of its object arrays imports {len(imports)} global(s) outside "
                      "the allow-list; numpy.load(allow_pickle=True) would import and may call them:")
            else:  # Keras Lambda layers and custom objects, SavedModel ops that touch files or call Python
                print(f"{printable(ckpt.path)}: the {ckpt.format} file holds {len(imports)} kind(s) of code that "
                      "loading or running it would execute:")
            print(text_table([(i["name"], i["count"]) for i in imports], ("import", "uses"), align_right=(1,)))
            print("ckptview listed the file without running any of them. Load it with trust only if you trust its source.")
        elif ckpt.format == "torchscript":
            print(f"{printable(ckpt.path)}: a TorchScript archive; torch.jit.load runs its code ({len(code_files)} files: "
                  + ", ".join(code_files[:5]) + ")")
        elif obstacle := safe_loader_obstacle(ckpt.details):  # no code, yet the format's safe loader refuses it
            print(f"{printable(ckpt.path)}: needs no foreign code ({ckpt.format}); {obstacle}")
        elif ckpt.format == "torch-dcp":
            print(f"{printable(ckpt.path)}: needs no foreign code (torch-dcp); safe to load with "
                  "torch.distributed.checkpoint.load")
        else:
            print(f"{printable(ckpt.path)}: needs no foreign code ({ckpt.format}); safe to load with torch.load(weights_only=True)"
                  if ckpt.format.startswith("torch") else f"{printable(ckpt.path)}: needs no foreign code ({ckpt.format})")
    return EXIT_NEEDS_CODE if verdict else 0


def _scan_record(ckpt: Checkpoint) -> dict[str, Any]:
    return {"path": ckpt.path, "format": ckpt.format, "needs_code": needs_code(ckpt),
            "imports": _imports_json(ckpt.pickle_imports),
            "torchscript_code": ckpt.details.get("code_files", []),
            # torch.save files: why torch.load(weights_only=True) would refuse it ("" when it loads it)
            "weights_only": ckpt.details.get("weights_only"),
            # .npy/.npz: whether numpy.load needs allow_pickle=True (it holds object arrays)
            "allow_pickle": bool(ckpt.details.get("allow_pickle"))}


def _damaged_scan_record(path: str, error: CkptviewError) -> dict[str, Any]:
    """A file ckptview cannot read whose pickle names globals before the damage: torch.load gets that far."""
    return {"path": path, "error": str(error), "needs_code": True,
            "imports": _imports_json(error.named_globals)}


def _imports_json(imports: Iterable[PickleImport]) -> list[dict[str, Any]]:
    return [{"name": imp.name, "count": imp.count} for imp in imports]


def _scan_many(paths: list[str], args: argparse.Namespace) -> int:
    """One line per file, the worst exit status: a pre-commit hook or CI gate over a model folder."""
    records, codes = [], []
    for path, ckpt, error in _each(paths, args.trust, for_scan=True):
        if ckpt is None and getattr(error, "named_globals", None):
            records.append(_damaged_scan_record(path, error))
            codes.append(EXIT_NEEDS_CODE)
            names = [imp.name for imp in error.named_globals]
            # refused (damaged, or unlike what its writer makes), yet its loader gets as far as these
            line = (f"NEEDS CODE: refused, but its loader would import {', '.join(names[:5])}"
                    + (f" and {len(names) - 5} more" if len(names) > 5 else "") + " (`ckptview info` says why)")
        elif ckpt is None:
            records.append({"path": path, "error": str(error), "needs_code": None})
            codes.append(1)
            line = f"error: {error.reason if error else ''}"
        else:
            record = _scan_record(ckpt)
            records.append(record)
            codes.append(EXIT_NEEDS_CODE if record["needs_code"] else 0)
            names = [imp["name"] for imp in record["imports"]]
            if names:
                line = f"NEEDS CODE: imports {', '.join(names[:5])}" + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            elif record["needs_code"]:
                line = "NEEDS CODE: a TorchScript archive (torch.jit.load runs its code)"
            else:
                line = f"no foreign code ({record['format']})"
        if not args.json:
            print(f"{printable(path)}: {printable(line)}")
    if args.json:
        print_json(records)
    elif len(paths) > 1:
        print(f"{len(paths)} files: {codes.count(EXIT_NEEDS_CODE)} need code, {codes.count(1)} could not be read, "
              f"{codes.count(0)} need none")
    return _worst(codes)


def _brief(value: Any) -> str:
    """A value as the text view shows it: floats to 6 significant digits, also inside dicts and lists
    (`--json` keeps every digit)."""
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{key!r}: {_brief(item)}" for key, item in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(_brief, value)) + "]"
    return str(value)


def training(args: argparse.Namespace) -> int:
    from ckptview.analyzers.training import training_state  # its import is a fifth of `ckptview info`'s start

    with ckptview.open(args.path, trust=args.trust) as ckpt:
        state = training_state(ckpt)
    if args.json:
        print_json({
            "optimizers": [{
                "path": list(opt.path), "optimizer": opt.optimizer_kind, "mapping": opt.mapping, "mapping_note": opt.mapping_note,
                "groups": [{"index": g.index, "lr": g.lr, "params": len(g.param_ids), **g.options} for g in opt.groups],
                "params": [{"id": p.param_id, "name": p.name, "group": p.group, "step": p.step,
                            "state": {k: {"shape": list(shape), "dtype": dtype} for k, (shape, dtype) in p.tensors.items()}}
                           for p in opt.params],
            } for opt in state.optimizers],
            "schedulers": list(state.schedulers),
            "scheduler_classes": [{"class": s.class_name, "named_by": s.named_by} for s in state.scheduler_states],
            "grad_scaler": state.grad_scaler, "progress": state.progress,
            "hyper_parameters": state.hyper_parameters, "lightning": state.lightning,
        })
        return 0
    if state.progress:
        print("progress    " + printable(", ".join(f"{k}={_brief(v)}" for k, v in state.progress.items())))
    if state.lightning:
        print(f"lightning   version {state.lightning['version']}, epoch {state.lightning['epoch']}, "
              f"global_step {state.lightning['global_step']}, callbacks: {', '.join(state.lightning['callbacks']) or 'none'}")
    for opt in state.optimizers:
        print(f"\noptimizer at {dotted_name(opt.path) or ROOT_NAME}: {opt.optimizer_kind}; {opt.mapping_note}")
        print(text_table([(g.index, g.lr, len(g.param_ids), ", ".join(f"{k}={v}" for k, v in g.options.items()
                                                                        if k in ("betas", "eps", "weight_decay", "momentum")))
                          for g in opt.groups], ("group", "lr", "params", "options"), align_right=(2,)))
        print()
        print(text_table([(p.param_id, p.name or "?", p.step if p.step is not None else "",
                           ", ".join(f"{k} {shape_text(shape)}" for k, (shape, _) in p.tensors.items()))
                          for p in opt.params], ("id", "parameter", "step", "state")))
    for scheduler in state.scheduler_states:
        named = f"{scheduler.class_name} ({scheduler.named_by})" if scheduler.class_name else "class unknown"
        print(f"\nscheduler   {printable(named)}: "
              + printable(", ".join(f"{k}={v}" for k, v in scheduler.fields.items())))
    if state.grad_scaler:
        print("\ngrad scaler " + printable(", ".join(f"{k}={v}" for k, v in state.grad_scaler.items())))
    for name, values in state.hyper_parameters.items():
        print(f"\n{name}: {values}")
    if not (state.optimizers or state.progress or state.hyper_parameters or state.schedulers):
        print("no training state: the checkpoint holds weights only")
    return 0
