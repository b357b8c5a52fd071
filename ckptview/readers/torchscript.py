"""
TorchScript archives (`torch.jit.save`). They are torch zips whose data.pkl holds script
objects (`__torch__.…` classes whose code is in the archive's code/ folder); `read_torch_zip`
lists them like any torch zip. Loading runs `torch.jit.load`, which runs that code: only with trust.

A script module's pickled state holds every attribute, not only its parameters and buffers: a
tensor kept as a plain attribute (a cache, a lookup table) is pickled beside the weights. The
class's code says which are which (`__parameters__ = [...]`, `__buffers__ = [...]`), so
`read_torchscript` reads those lines (never runs them) and records the other tensor attributes in
`details["script_attributes"]`; the sections then keep them out of the model's state dict.
"""

from __future__ import annotations

import ast
import re
import zipfile
from dataclasses import dataclass
from typing import Any

import torch

from ckptview.errors import CkptviewError
from ckptview.readers.model import Checkpoint, PickledObject, walk_tensors
from ckptview.readers.trusted import require_trust

# `class Linear(Module):` followed by its member lists, as torch.jit.save writes every module class
_MODULE_CLASS = re.compile(r"^class (\w+)\(Module\):\n  __parameters__ = (\[.*?\])\n  __buffers__ = (\[.*?\])$",
                           re.MULTILINE)
_MAX_CODE_BYTES = 64 << 20  # code of every module class; real archives hold a few MB at most


def read_torchscript(path: str, size: int, *, trust: bool) -> Checkpoint:
    """A torch zip (via `read_torch_zip`); for a TorchScript archive, its plain tensor attributes found."""
    from ckptview.readers.torch_pickle import read_torch_zip

    checkpoint = read_torch_zip(path, size, trust=trust)
    if checkpoint.format == "torchscript":
        members = _module_members(path, checkpoint.details)
        checkpoint.details["script_attributes"] = [list(p) for p in _attribute_paths(checkpoint.root, members)]
    return checkpoint


def _module_members(path: str, details: dict[str, Any]) -> dict[str, tuple[frozenset[str], frozenset[str]]]:
    """{class qualified name: (parameter names, buffer names)} from the archive's code/ files."""
    prefix = details.get("archive_prefix", "")
    members: dict[str, tuple[frozenset[str], frozenset[str]]] = {}
    budget = _MAX_CODE_BYTES
    with zipfile.ZipFile(path) as archive:
        for name in details.get("code_files", ()):
            member = archive.getinfo(f"{prefix}/{name}" if prefix else name)
            budget -= member.file_size
            if budget < 0:
                break
            # code/__torch__/torch/nn/modules/linear.py holds __torch__.torch.nn.modules.linear.<class>
            module = name.removeprefix("code/").removesuffix(".py").replace("/", ".")
            text = archive.read(member).decode("utf-8", "replace")
            for match in _MODULE_CLASS.finditer(text):
                try:
                    parameters, buffers = ast.literal_eval(match[2]), ast.literal_eval(match[3])
                except (ValueError, SyntaxError):
                    continue
                members[f"{module}.{match[1]}"] = (frozenset(map(str, parameters)), frozenset(map(str, buffers)))
    return members


def _attribute_paths(root: Any, members: dict[str, tuple[frozenset[str], frozenset[str]]]) -> list[tuple[Any, ...]]:
    """Paths of the attributes holding tensors that are neither parameters, buffers nor submodules."""
    found: list[tuple[Any, ...]] = []
    stack: list[tuple[tuple[Any, ...], Any]] = [((), root)]
    while stack:
        path, module = stack.pop()
        spec = members.get(type(module).class_path) if isinstance(module, PickledObject) else None
        if spec is None:
            continue
        parameters, buffers = spec
        for key, value in module.attributes.items():
            if isinstance(value, PickledObject) and type(value).class_path in members:
                stack.append((path + (key,), value))
            elif key not in parameters and key not in buffers and next(walk_tensors(value), None) is not None:
                found.append(path + (key,))
    return sorted(found, key=str)


def load_script_module(checkpoint: Checkpoint) -> torch.jit.ScriptModule:
    """`torch.jit.load` on the archive (on CPU). It runs the archive's code, so it needs trust."""
    require_trust(checkpoint, "torch.jit.load of a TorchScript archive (its code/ folder)")
    try:
        return torch.jit.load(checkpoint.path, map_location="cpu")
    except Exception as exc:  # torch.jit.load raises RuntimeError and C++ errors of many kinds
        raise CkptviewError(checkpoint.path, f"torch.jit.load failed: {str(exc).splitlines()[0][:300]}") from exc


@dataclass(frozen=True)
class ScriptSummary:
    """A loaded TorchScript module: its hierarchy (name, TorchScript type) and the code of forward."""

    modules: tuple[tuple[str, str], ...]
    forward_code: str


def describe_script_module(checkpoint: Checkpoint) -> ScriptSummary:
    """Load the archive (needs trust) and describe its module hierarchy and forward code."""
    module = load_script_module(checkpoint)
    modules = tuple((name or "<root>", child.original_name) for name, child in module.named_modules())
    try:
        code = module.code
    except RuntimeError:  # a module without a scripted forward (only attributes) has no code
        code = ""
    return ScriptSummary(modules, code)
