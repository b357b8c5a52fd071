"""
DataFrames for display: what the notebook views (and the CLI, where it wants a table) show.
Analyzers return data; these functions shape it into rows and columns a person reads.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd

from ckptview.analyzers.sections import Section, find_sections
from ckptview.readers.model import Checkpoint, PickledObject, TensorInfo, children_of

# Sections whose values are shown inline: small scalars a person wants to read at a glance.
_VALUE_SECTIONS = ("progress", "hyper_parameters", "metadata", "callbacks", "loops", "scheduler", "grad_scaler")
_MAX_VALUES = 40


@dataclass(frozen=True)
class Summary:
    """The explorer header's facts about one checkpoint."""

    name: str
    path: str
    format: str
    file_size: int
    tensor_count: int
    parameter_count: int
    total_bytes: int
    section_kinds: tuple[str, ...]
    needs_code: bool
    imports: tuple[str, ...]  # globals the pickle wants beyond the allow-list ("module.qualname")

    @property
    def safety_text(self) -> str:
        if self.imports:
            shown = ", ".join(self.imports[:4]) + (f" and {len(self.imports) - 4} more" if len(self.imports) > 4 else "")
            return f"needs foreign code: {shown}"
        if self.format == "torchscript":
            return "TorchScript: loading runs the archive's code"
        return "no foreign code needed"


def summary(ckpt: Checkpoint) -> Summary:
    return Summary(
        name=os.path.basename(ckpt.path.rstrip(os.sep)) or ckpt.path,
        path=ckpt.path,
        format=ckpt.format,
        file_size=ckpt.file_size,
        tensor_count=ckpt.tensor_count,
        parameter_count=ckpt.parameter_count,
        total_bytes=ckpt.total_bytes,
        section_kinds=tuple(dict.fromkeys(s.kind for s in find_sections(ckpt))),
        needs_code=ckpt.needs_trust or ckpt.format == "torchscript",
        imports=tuple(imp.name for imp in ckpt.pickle_imports),
    )


def flat_values(node: Any, prefix: str = "", limit: int = _MAX_VALUES) -> dict[str, Any]:
    """Scalars and strings under `node` as {dotted key: value}, tensors shown by shape, at most `limit`."""
    out: dict[str, Any] = {}
    stack: list[tuple[str, Any]] = [(prefix, node)]
    while stack and len(out) < limit:
        key, value = stack.pop(0)
        if isinstance(value, TensorInfo):
            out[key] = f"tensor {list(value.shape)} {str(value.dtype).removeprefix('torch.')}"
            continue
        if isinstance(value, PickledObject) and not value.attributes:
            out[key] = repr(value)
            continue
        children = children_of(value)
        if children is None:
            out[key] = value
            continue
        items = list(children)
        if not items:
            out[key] = "{}" if isinstance(value, Mapping) else "[]"
        stack.extend((f"{key}.{k}" if key else str(k), v) for k, v in items)
    return out


def sections_frame(ckpt: Checkpoint) -> pd.DataFrame:
    """One row per section: kind, where it sits, tensor count, its small values, and what it is."""
    rows = []
    for section in find_sections(ckpt):
        rows.append({
            "section": section.kind,
            "path": section.name,
            "tensors": section.tensor_count,
            "contents": _contents(ckpt, section),
            "what it is": section.explanation,
        })
    return pd.DataFrame(rows, columns=["section", "path", "tensors", "contents", "what it is"])


def _contents(ckpt: Checkpoint, section: Section) -> str:
    if section.kind not in _VALUE_SECTIONS:
        return ""
    node = ckpt.get(section.path)
    values = flat_values(node, "" if children_of(node) is not None else section.name)
    return ", ".join(f"{k}={_short(v)}" for k, v in values.items())


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "…"


def filter_frame(frame: pd.DataFrame, *, name_regex: str = "", column_values: Mapping[str, str] | None = None) -> pd.DataFrame:
    """
    Rows whose `name` matches `name_regex` (searched, case-sensitive) and whose columns equal the
    given values ("" or None = any).

    Raises:
        re.error: the regex does not compile (the caller shows the message).
    """
    mask = pd.Series(True, index=frame.index)
    if name_regex:
        pattern = re.compile(name_regex)
        mask &= frame["name"].map(lambda n: pattern.search(n) is not None)
    for column, wanted in (column_values or {}).items():
        if wanted:
            mask &= frame[column].astype(str) == wanted
    return frame[mask]


def page(frame: pd.DataFrame, *, sort_by: str | None, descending: bool, number: int, size: int) -> pd.DataFrame:
    """Page `number` (0-based) of `size` rows after a stable sort on `sort_by`."""
    if sort_by:
        frame = frame.sort_values(sort_by, ascending=not descending, kind="stable")
    return frame.iloc[number * size:(number + 1) * size]


def optimizer_groups_frame(optimizer: Any) -> pd.DataFrame:
    """One row per param group of an `OptimizerState`: lr, the group's other options, how many parameters."""
    rows = [{"group": g.index, "lr": g.lr, "parameters": len(g.param_ids),
             **{k: _short(v) for k, v in g.options.items()}} for g in optimizer.groups]
    return pd.DataFrame(rows)
