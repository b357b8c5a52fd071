"""
DataFrames for display: what the notebook views (and the CLI, where it wants a table) show.
Analyzers return data; these functions shape it into rows and columns a person reads.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd

from ckptview.analyzers.sections import Section, find_sections
from ckptview.errors import CkptviewError
from ckptview.readers.model import Checkpoint, PickledObject, TensorInfo, children_of
from ckptview.readers.weights_only import safe_loader_obstacle

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
    shards: tuple[tuple[str, int], ...] = ()  # a sharded set's files and their sizes, in the index's order
    config: tuple[tuple[str, str], ...] = ()  # what the config.json beside a sharded set says, as (label, value)
    declared_bytes: int | None = None  # the index's metadata.total_size
    loader_obstacle: str = ""  # why the format's own safe loader refuses a file that needs no foreign code
    problems: tuple[str, ...] = ()  # what the reader found wrong (a shard's missing tensors, values never saved)

    @property
    def safety_text(self) -> str:
        if self.imports:
            shown = ", ".join(self.imports[:4]) + (f" and {len(self.imports) - 4} more" if len(self.imports) > 4 else "")
            return f"needs foreign code: {shown}"
        if self.format == "torchscript":
            return "TorchScript: loading runs the archive's code"
        return "no foreign code needed"


def summary(ckpt: Checkpoint) -> Summary:
    """The header's facts; a sharded set is named by its folder (what Hugging Face names a model by),
    with its shards' sizes and what the `config.json` beside it declares."""
    name = os.path.basename(ckpt.path.rstrip(os.sep)) or ckpt.path
    sizes = ckpt.details.get("shard_sizes") or {}
    if sizes:
        name = os.path.basename(os.path.dirname(os.path.abspath(ckpt.path))) or name
    declared = ckpt.metadata.get("total_size") if sizes else None
    return Summary(
        name=name,
        path=ckpt.path,
        format=ckpt.format,
        file_size=ckpt.file_size,
        tensor_count=ckpt.tensor_count,
        parameter_count=ckpt.parameter_count,
        total_bytes=ckpt.total_bytes,
        section_kinds=tuple(dict.fromkeys(s.kind for s in find_sections(ckpt))),
        needs_code=ckpt.needs_trust or ckpt.format == "torchscript",
        imports=tuple(imp.name for imp in ckpt.pickle_imports),
        shards=tuple((str(k), int(v)) for k, v in sizes.items()),
        config=config_facts(ckpt.details.get("config"), ckpt.parameter_count),
        declared_bytes=int(declared) if isinstance(declared, str) and declared.isdigit() else None,
        loader_obstacle=safe_loader_obstacle(ckpt.details),
        problems=tuple(str(problem) for problem in ckpt.details.get("problems", ())),
    )


# Keys of a Hugging Face config.json people look for first, with the names other model families use.
_CONFIG_KEYS = (
    ("model type", ("model_type",)),
    ("dtype", ("torch_dtype", "dtype")),
    ("hidden size", ("hidden_size", "d_model", "n_embd", "dim")),
    ("layers", ("num_hidden_layers", "n_layer", "num_layers", "n_layers")),
    ("attention heads", ("num_attention_heads", "n_head", "num_heads")),
    ("key/value heads", ("num_key_value_heads",)),
    ("vocabulary", ("vocab_size",)),
    ("context", ("max_position_embeddings", "n_positions", "max_seq_len")),
)
_DECLARED_PARAMETERS = ("num_parameters", "num_params", "n_params", "total_params", "parameter_count")


def config_facts(config: Any, counted: int) -> tuple[tuple[str, str], ...]:
    """
    What a `config.json` says about the model, as (label, value) rows: architectures, dtype, sizes,
    and the parameter count it declares beside the count of the tensors (a mismatch means the shards
    are not all the model's).
    """
    if not isinstance(config, Mapping):
        return ()
    facts: list[tuple[str, str]] = []
    architectures = config.get("architectures")
    if isinstance(architectures, list) and architectures:
        facts.append(("architecture", ", ".join(map(str, architectures))))
    for label, keys in _CONFIG_KEYS:
        value = next((config[k] for k in keys if k in config and isinstance(config[k], (str, int, float))), None)
        if value is not None and not isinstance(value, bool):
            facts.append((label, f"{value:,}" if isinstance(value, int) else str(value)))
    declared = next((config[k] for k in _DECLARED_PARAMETERS if isinstance(config.get(k), int)), None)
    if declared is not None:
        gap = counted - declared
        verdict = "the same" if gap == 0 else f"{abs(gap):,} {'more' if gap > 0 else 'fewer'} counted"
        facts.append(("parameters", f"{declared:,} declared, {counted:,} counted in the shards ({verdict})"))
    return tuple(facts)


def flat_values(node: Any, prefix: str = "", limit: int = _MAX_VALUES) -> dict[str, Any]:
    """Scalars and strings under `node` as {dotted key: value}, tensors shown by shape, at most `limit`."""
    out: dict[str, Any] = {}
    stack: list[tuple[str, Any]] = [(prefix, node)]
    while stack and len(out) < limit:
        key, value = stack.pop(0)
        if isinstance(value, TensorInfo):
            out[key] = _tensor_value(value)
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


def _tensor_value(info: TensorInfo) -> Any:
    """A one-element tensor's value (`"loss": loss` saves the tensor itself; a few bytes to read), else
    its shape and dtype."""
    if info.numel == 1 and info.layout == "strided" and info.storage is not None:
        from ckptview.analyzers.training import plain

        with contextlib.suppress(CkptviewError):  # a damaged file: its shape still says what it is
            return plain(info)
    return f"tensor {list(info.shape)} {str(info.dtype).removeprefix('torch.')}"


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
    readable = keras_config_text(node)
    if readable is not None:
        return readable
    values = flat_values(node, "" if children_of(node) is not None else section.name)
    return ", ".join(f"{k}={_short(v)}" for k, v in values.items() if not _private(k))


def keras_config_text(node: Any) -> str | None:
    """
    A Keras model config (`model.get_config()` as .keras/.h5 files store it) as a line per layer
    (`conv: Conv2D, 4 filters 3×3, relu`), or a compile/training config as its loss, optimizer and
    metrics; None for anything else. Flattened key by key they are hundreds of unreadable fields.
    """
    if not isinstance(node, Mapping):
        return None
    config = node.get("config")
    if isinstance(config, Mapping) and isinstance(config.get("layers"), list):
        layers = [_keras_layer_text(layer) for layer in config["layers"] if isinstance(layer, Mapping)]
        head = f"{node.get('class_name', 'model')} {config.get('name', '')!r}: {len(layers)} layers"
        return head + "\n" + "\n".join(layers)
    if "loss" in node and ("optimizer_config" in node or "metrics" in node):
        parts = [f"loss {_keras_class(node.get('loss'))}"]
        if isinstance(node.get("optimizer_config"), Mapping):
            optimizer = node["optimizer_config"]
            rate = (optimizer.get("config") or {}).get("learning_rate") if isinstance(optimizer.get("config"), Mapping) else None
            parts.append(f"optimizer {_keras_class(optimizer)}" + (f" (learning_rate {_short(rate)})" if rate is not None else ""))
        metrics = node.get("metrics")
        if metrics:
            parts.append(f"metrics {_short(_keras_names(metrics))}")
        return ", ".join(parts)
    return None


# What tells one layer from another at a glance, in the order shown.
_KERAS_LAYER_FIELDS = (("units", "{} units"), ("filters", "{} filters"), ("kernel_size", "{}"), ("strides", "stride {}"),
                       ("pool_size", "pool {}"), ("rate", "rate {}"), ("axis", "axis {}"), ("momentum", "momentum {}"),
                       ("epsilon", "epsilon {}"), ("activation", "{}"), ("batch_shape", "input {}"),
                       ("batch_input_shape", "input {}"))


def _keras_layer_text(layer: Mapping[str, Any]) -> str:
    config = layer.get("config") if isinstance(layer.get("config"), Mapping) else {}
    name = layer.get("name") or config.get("name") or "?"
    details = []
    for key, form in _KERAS_LAYER_FIELDS:
        value = config.get(key)
        if value is None or (key == "activation" and value == "linear"):
            continue
        if isinstance(value, list):
            value = "×".join(str(v) for v in value) if key in ("kernel_size", "strides", "pool_size") else \
                "(" + ", ".join("None" if v is None else str(v) for v in value) + ")"
        details.append(form.format(value))
    return f"{name}: {layer.get('class_name', '?')}" + (", " + ", ".join(details) if details else "")


def _keras_class(value: Any) -> str:
    if isinstance(value, Mapping):
        return str(value.get("class_name", "?")).removeprefix("Custom>")
    return str(value)


def _keras_names(value: Any) -> str:
    if isinstance(value, Mapping):
        inner = value.get("config")
        return str(inner.get("name")) if isinstance(inner, Mapping) and "name" in inner else _keras_class(value)
    if isinstance(value, list):
        return ", ".join(_keras_names(v) for v in value)
    return str(value)


# A scheduler's bookkeeping (_step_count, _get_lr_called_within_step, _is_initial) says nothing to a
# reader at a glance; _last_lr is the learning rate it last set. The Training state tab shows them all.
def _private(key: str) -> bool:
    leaf = next((part for part in reversed(key.split(".")) if not part.isdigit()), "")
    return leaf.startswith("_") and leaf != "_last_lr"


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "…"


def filter_frame(frame: pd.DataFrame, *, name_regex: str = "", column_values: Mapping[str, str] | None = None) -> pd.DataFrame:
    """
    Rows whose `name` (or `label`, when the frame has one: `fc.weight › exp_avg`) matches
    `name_regex` (searched, case-sensitive) and whose columns equal the given values ("" or None = any).

    Raises:
        re.error: the regex does not compile (the caller shows the message).
    """
    mask = pd.Series(True, index=frame.index)
    if name_regex:
        pattern = re.compile(name_regex)
        mask &= frame["name"].map(lambda n: pattern.search(n) is not None)
        if "label" in frame:
            mask |= frame["label"].map(lambda n: pattern.search(n) is not None)
    for column, wanted in (column_values or {}).items():
        if wanted:
            mask &= frame[column].astype(str) == wanted
    return frame[mask]


def optimizer_groups_frame(optimizer: Any) -> pd.DataFrame:
    """One row per param group of an `OptimizerState`: lr, the group's other options, how many parameters."""
    rows = [{"group": g.index, "lr": g.lr, "parameters": len(g.param_ids),
             **{k: _short(v) for k, v in g.options.items()}} for g in optimizer.groups]
    return pd.DataFrame(rows)


# How sure an optimizer's id → name mapping is (training.OptimizerState.mapping): sure ones name
# the state by its parameter, a guess (or a name that may be swapped with one of equal shape) says
# so with "?", the others keep the file's own name.
_SURE_MAPPINGS = ("param_names", "order", "order+shape")
_UNSURE_MAPPINGS = ("shape", "guess")


def tensor_labels(ckpt: Checkpoint) -> dict[str, str]:
    """
    Names to show for tensors whose file name says little: optimizer state named by its parameter
    (`optimizer_state_dict.state.3.exp_avg` → `fc.weight › exp_avg`), where the optimizer's ids map
    to the model's parameters (`OptimizerState.mapping`). Tensors not listed show their own name.
    """
    from ckptview.analyzers.training import training_state
    from ckptview.readers.model import dotted_name

    def build() -> dict[str, str]:
        labels: dict[str, str] = {}
        for optimizer in training_state(ckpt).optimizers:
            if optimizer.mapping not in (*_SURE_MAPPINGS, *_UNSURE_MAPPINGS):
                continue
            mark = "" if optimizer.mapping in _SURE_MAPPINGS else "?"
            keys = {str(k): k for k in children_keys(ckpt.get(optimizer.path + ("state",)))}
            for param in optimizer.params:
                key = keys.get(str(param.param_id))
                if param.name is None or key is None:
                    continue
                for leaf in children_keys(ckpt.get(optimizer.path + ("state", key))):
                    labels[dotted_name(optimizer.path + ("state", key, leaf))] = f"{param.name}{mark} › {leaf}"
        return labels

    return ckpt.cached("tensor_labels", build)


def children_keys(node: Any) -> list[Any]:
    children = children_of(node)
    return [key for key, _ in children] if children is not None else []


def stats_frame(ckpt: Checkpoint, result: Any) -> pd.DataFrame:
    """
    `StatsResult.to_frame()` with `label` (the name to show, `tensor_labels`) and `part`: "weights"
    and "buffers" of the model section, "optimizer state", or "other" (another state dict, EMA
    copies, ...), so a plot can keep the model apart from what trains it.
    """
    from ckptview.analyzers.sections import model_section
    from ckptview.analyzers.table import tensor_table
    from ckptview.readers.model import dotted_name

    frame = result.to_frame()
    labels = tensor_labels(ckpt)
    rows = {row.name: row for row in tensor_table(ckpt).rows}
    section = model_section(ckpt)
    prefix = None if section is None else dotted_name(section.path)

    def part(name: str) -> str:
        row = rows.get(name)
        if row is not None and row.section == "optimizer":
            return "optimizer state"
        if prefix and not name.startswith(prefix + "."):
            return "other"
        return "buffers" if row is not None and row.role == "buffer" else "weights"

    frame["label"] = [labels.get(name, name) for name in frame["name"]]
    frame["part"] = [part(name) for name in frame["name"]]
    return frame
