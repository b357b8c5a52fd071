"""
One row per tensor: where it sits (section, module, leaf), what layer it probably belongs to,
and what it costs. Layer kinds are inferred from names and shapes only, because a state dict
does not record module classes.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ckptview.analyzers.sections import Section, find_sections
from ckptview.readers.dtypes import torch_dtype
from ckptview.readers.model import (
    Checkpoint,
    LayerRole,
    TensorEntry,
    fast_init,
    gc_paused,
    storage_identity,
    view_identity,
)

if TYPE_CHECKING:
    import pandas as pd

# Sections whose tensors are a model's weights: only there do module paths and layer kinds mean anything.
MODEL_SECTION_KINDS = ("state_dict", "ema_state_dict", "module", "torchscript")

# Leaves that nn.Modules register as buffers (not trained): BatchNorm statistics, rotary tables,
# HF position ids, GPT-2's causal mask. Any non-floating tensor is a buffer too (a Parameter must be float).
BUFFER_LEAVES = frozenset({
    "running_mean", "running_var", "num_batches_tracked", "inv_freq", "position_ids", "token_type_ids",
    "masked_bias", "relative_position_index", "attn_mask", "causal_mask", "_float_tensor", "cos_cached",
    "sin_cached", "anchors",
})

_ATTENTION = (
    # the attn_* names are llama.cpp's (GGUF: blk.N.attn_q.weight)
    ("attention.qkv", re.compile(r"^(qkv|qkv_proj|c_attn|in_proj|wqkv|query_key_value|w_pack|qkv_linear|attn_qkv)$")),
    ("attention.q", re.compile(r"^(q|q_proj|query|wq|q_lin|to_q|q_linear|attn_q)$")),
    ("attention.k", re.compile(r"^(k|k_proj|key|wk|k_lin|to_k|k_linear|attn_k)$")),
    ("attention.v", re.compile(r"^(v|v_proj|value|wv|v_lin|to_v|v_linear|attn_v)$")),
    ("attention.out", re.compile(r"^(o|o_proj|out_proj|wo|out_lin|to_out|dense|c_proj|proj|attn_output)$")),
)
_ATTENTION_CONTEXT = re.compile(r"attn|attention")
_EMBEDDING = re.compile(r"emb|wte|wpe|tok_embeddings|word_embeddings|shared$|lookup")
_NORM_TOKEN = re.compile(r"(^|_)(norm|ln|layernorm|layer_norm|rmsnorm|bn|batchnorm|batch_norm|gn|groupnorm)\d*(_|$)")


@fast_init
@dataclass(frozen=True)
class TensorRow:
    """One tensor of a checkpoint as the tensor table shows it."""

    name: str                 # dotted name in the file
    section: str              # the section it belongs to ("state_dict", "optimizer", ...; "" when none)
    module: str               # module path within its section ("layer1.0.conv1"); "" at top level
    leaf: str                 # last name part ("weight", "running_mean", ...)
    layer_kind: str           # "Linear", "Conv2d", "Embedding", "BatchNorm", "attention.q", ...; "" when unknown
    layer_detail: str         # the shape read as that layer ("3072×768 (out×in)"); "" when unknown
    role: str                 # "parameter", "buffer", or "attribute" (a TorchScript module's plain tensor attribute)
    shape: tuple[int, ...]
    dtype_name: str           # torch's name for the dtype ("float32"); `dtype` is the torch.dtype
    numel: int
    nbytes: int
    device: str               # the device it was saved from
    shared: bool              # its storage also backs another entry (tied weights, views)
    tied_to: str = ""         # the first name of the same stored view when this one repeats it; counted there
    encoding: str = ""        # the stored form when torch has no dtype for it ("Q4_K", "deflate"); dtype is the decoded one

    @property
    def dtype(self) -> Any:
        """The `torch.dtype` (imports torch)."""
        return torch_dtype(self.dtype_name)


@dataclass(frozen=True)
class TensorTable:
    """
    Every tensor of a checkpoint with totals. Tied tensors appear once per name but are counted
    once in the totals.
    """

    rows: tuple[TensorRow, ...]
    parameter_count: int            # elements of parameters, each stored view counted once
    buffer_count: int               # elements of buffers, each stored view counted once
    total_bytes: int                # bytes of tensor data, each storage counted once
    dtype_numel: Mapping[str, int]  # elements per dtype name, views counted once
    dtype_bytes: Mapping[str, int]

    def __len__(self) -> int:
        return len(self.rows)

    def to_frame(self) -> pd.DataFrame:
        """The rows as a DataFrame, one column per `TensorRow` field (dtype as its name, shape as a tuple)."""
        import pandas as pd

        columns = [("dtype" if column == "dtype_name" else column) for column in TensorRow.__dataclass_fields__]
        data = {column: [getattr(row, column) for row in self.rows] for column in TensorRow.__dataclass_fields__}
        data["dtype"] = data.pop("dtype_name")
        return pd.DataFrame(data, columns=columns)


def tensor_table(ckpt: Checkpoint) -> TensorTable:
    """
    One row per tensor with its section, module, leaf, inferred layer kind, role, shape, dtype and size.

    Layer kinds come from names and shapes (a state dict holds no module classes): a 2-D `weight`
    is a Linear (or an Embedding when named so), 3/4/5-D weights are Conv1d/2d/3d, modules with
    `running_mean`/`running_var` are BatchNorm, 1-D weights in modules named `*norm*`/`ln*` are
    LayerNorm or RMSNorm (RMSNorm when there is no bias), attention projections are recognised by
    their usual names (`q_proj`, `query`, `c_attn`, `in_proj_weight`, ...).

    Args:
        ckpt: an opened checkpoint.

    Returns:
        A frozen `TensorTable`; `to_frame()` gives a pandas DataFrame. Cached per checkpoint.

    Example:
        >>> with ckptview.open("resnet18.pt") as ckpt:
        ...     table = ckptview.tensor_table(ckpt)
        >>> table.to_frame().query("layer_kind == 'Conv2d'").numel.sum()
        11166912
    """
    return ckpt.cached("tensor_table", lambda: _build(ckpt))


def layer_kinds(ckpt: Checkpoint) -> dict[str, tuple[str, str]]:
    """
    The inferred layer kind and leaf of each tensor whose kind is known, by name (`("Linear",
    "weight")`): what the statistics' outlier check groups by, without the tensor table's rows (a
    million-tensor file's rows took a third of its statistics). Cached per checkpoint.
    """
    return ckpt.cached("layer_kinds", lambda: _layer_kinds(ckpt))


@gc_paused()
def _layer_kinds(ckpt: Checkpoint) -> dict[str, tuple[str, str]]:
    located, kinds, section_names = _locate(ckpt)
    known = {}
    # only the tensors of a known kind: a million tensors no layer explains made a million
    # ("", leaf) pairs for the outlier check to skip (1 s)
    for entry, section, module, leaf in located:
        if section is not None:
            kind = kinds.get((section_names[id(section)], module))
            if kind is not None and kind[0]:
                known[entry.name] = (kind[0], leaf)
    return known


def _locate(ckpt: Checkpoint) -> tuple[list[tuple[TensorEntry, Section | None, str, str]],
                                       dict[tuple[str, str], tuple[str, str]], dict[int, str]]:
    """Each entry's section, module and leaf; each model module's (layer kind, detail) by (section name,
    module); the sections' names by id."""
    sections = find_sections(ckpt)
    section_of = _section_finder(sections)
    section_names = {id(section): section.name for section in sections}
    # each entry's section and (module, leaf), found once: the layer kinds need all of a module's leaves
    located: list[tuple[TensorEntry, Section | None, str, str]] = []
    modules: dict[tuple[str, str], dict[str, TensorEntry]] = defaultdict(dict)
    for entry in ckpt.tensors():
        section = section_of(entry.path)
        relative = entry.path[len(section.path):] if section is not None else entry.path
        module, leaf = module_and_leaf(_relative_name(relative, entry), entry, ckpt.layers)
        located.append((entry, section, module, leaf))
        if section is not None and section.kind in MODEL_SECTION_KINDS:
            modules[(section_names[id(section)], module)][leaf] = entry
    kinds = {key: _layer_kind(key[1], leaves, ckpt.layers) for key, leaves in modules.items()}
    return located, kinds, section_names


@gc_paused()  # 20,000 rows, none of them garbage: collections would only slow the build
def _build(ckpt: Checkpoint) -> TensorTable:
    entries = ckpt.tensors()
    storage_users = Counter(storage_identity(entry.info.storage) for entry in entries if entry.info.storage is not None)
    located, kinds, section_names = _locate(ckpt)

    first_name: dict[Any, str] = {}
    rows = []
    for entry, section, module, leaf in located:
        # read from the record itself: each TensorEntry property is one more call, a million times over
        info, name = entry.info, entry.name
        tied_to = first_name.setdefault(view_identity(info), name)
        section_name = section_names[id(section)] if section is not None else ""
        kind, detail = kinds.get((section_name, module), ("", ""))
        storage = info.storage
        rows.append(TensorRow(
            name=name,
            section=section.kind if section is not None else "",
            module=module,
            leaf=leaf,
            layer_kind=kind,
            layer_detail=detail,
            role="attribute" if section is not None and section.kind == "script_attribute" else tensor_role(entry, leaf),
            shape=info.shape,
            dtype_name=info.dtype,
            numel=info.numel,
            nbytes=info.nbytes,
            device=info.device,
            shared=storage is not None and storage_users[storage_identity(storage)] > 1,
            tied_to="" if tied_to == name else tied_to,
            encoding=info.encoding or "",
        ))

    parameters = buffers = 0
    dtype_numel: Counter[str] = Counter()
    dtype_bytes: Counter[str] = Counter()
    for row in rows:
        if row.tied_to:
            continue
        if row.role == "parameter":
            parameters += row.numel
        elif row.role == "buffer":
            buffers += row.numel
        dtype_numel[row.dtype_name] += row.numel
        dtype_bytes[row.dtype_name] += row.nbytes
    return TensorTable(tuple(rows), parameters, buffers, ckpt.total_bytes, dict(dtype_numel), dict(dtype_bytes))


def _relative_name(relative: tuple[Any, ...], entry: TensorEntry) -> str:
    # State-dict keys are themselves dotted ("layer1.0.conv1.weight" is one key), so join then split.
    if len(relative) == 1 and isinstance(relative[0], str):
        return relative[0]
    return ".".join(map(str, relative)) if relative else entry.name


def module_and_leaf(name: str, entry: TensorEntry, layers: Mapping[str, LayerRole]) -> tuple[str, str]:
    """The layer a tensor belongs to and its part in it: what the file says (`Checkpoint.layers`,
    e.g. an ONNX graph's nodes) when it says so, else its dotted name split at the last dot."""
    role = layers.get(entry.name)
    if role is not None:
        return role.module, role.leaf
    module, _, leaf = name.rpartition(".")
    return module, leaf


def _layer_kind(module: str, leaves: Mapping[str, TensorEntry], layers: Mapping[str, LayerRole]) -> tuple[str, str]:
    guessed = infer_layer_kind(module, leaves)
    role = next((layers[entry.name] for entry in leaves.values() if entry.name in layers), None)
    if role is None:
        return guessed
    # The graph knows a MatMul is a Linear and how its weight is laid out; only names tell a q from a v.
    if role.kind == "Linear" and guessed[0].startswith("attention"):
        return guessed[0], role.detail
    return role.kind, role.detail


def _section_finder(sections: Sequence[Section]) -> Callable[[tuple[Any, ...]], Section | None]:
    """The innermost section holding a path, by one dict lookup per distinct section depth (not a
    scan of every section per tensor: 20,000 tensors under dozens of sections made that 0.2 s)."""
    by_path: dict[tuple[Any, ...], Section] = {}
    for section in sections:
        by_path.setdefault(section.path, section)
    depths = sorted({len(path) for path in by_path}, reverse=True)  # deepest first: a nested section wins

    def section_of(path: tuple[Any, ...]) -> Section | None:
        for depth in depths:
            section = by_path.get(path[:depth]) if depth <= len(path) else None
            if section is not None:
                return section
        return None

    return section_of


def tensor_role(entry: TensorEntry, leaf: str) -> str:
    """'parameter' or 'buffer': saved `nn.Parameter`s are parameters; else decided by the leaf name and dtype."""
    if entry.info.is_parameter:
        return "parameter"
    if leaf in BUFFER_LEAVES or not entry.dtype_name.startswith(("float", "bfloat", "complex")):
        return "buffer"
    return "parameter"


def infer_layer_kind(module: str, leaves: Mapping[str, Any]) -> tuple[str, str]:
    """
    The layer kind of a module from its dotted path and its tensors (leaf name -> anything with
    `.shape`), with the weight's shape read as that layer. ("", "") when nothing fits.

    Example:
        >>> infer_layer_kind("encoder.layers.0.self_attn.q_proj", {"weight": torch.empty(512, 512)})
        ('attention.q', '512×512 (out×in)')
    """
    name = module.rsplit(".", 1)[-1].lower()
    parent = module.lower()
    weight = leaves.get("weight")
    shape = tuple(weight.shape) if weight is not None else None

    if "running_mean" in leaves and "running_var" in leaves:
        channels = tuple(leaves["running_mean"].shape)
        return "BatchNorm", f"{channels[0] if channels else 0} channels"
    if "in_proj_weight" in leaves:
        in_proj = tuple(leaves["in_proj_weight"].shape)
        return "attention.qkv", f"{in_proj[0]}×{in_proj[1]} (3·embed×embed)" if len(in_proj) == 2 else ""
    if shape is None:
        if "inv_freq" in leaves:
            return "RotaryEmbedding", ""
        return "", ""
    if len(shape) == 2:
        detail = f"{shape[0]}×{shape[1]} (out×in)"
        in_attention = _ATTENTION_CONTEXT.search(parent) is not None
        for kind, pattern in _ATTENTION:
            # "q", "dense", "proj" name attention layers only inside an attention block; "q_proj" always does.
            ambiguous = len(name) == 1 or kind == "attention.out"
            if pattern.match(name) and (in_attention or not ambiguous):
                return kind, detail
        if "bias" not in leaves and _EMBEDDING.search(name):
            return "Embedding", f"{shape[0]}×{shape[1]} (vocab×dim)"
        return "Linear", detail
    if len(shape) == 3 and name.endswith("_exps"):  # llama.cpp's stacked MoE experts (ffn_up_exps)
        return "Linear (experts)", f"{shape[0]} experts × {shape[1]}×{shape[2]} (out×in)"
    if len(shape) in (3, 4, 5):
        kernel = "×".join(str(k) for k in shape[2:])
        return f"Conv{len(shape) - 2}d", f"{shape[0]}, {shape[1]}, {kernel} (out, in/groups, kernel)"
    if len(shape) == 1 and _NORM_TOKEN.search(name):
        detail = f"{shape[0]} features"
        if re.search(r"(^|_)(bn|batchnorm|batch_norm)\d*(_|$)", name):
            return "BatchNorm", detail
        if re.search(r"(^|_)(gn|groupnorm|group_norm)\d*(_|$)", name):
            return "GroupNorm", detail
        if "rms" in name or "bias" not in leaves:
            return "RMSNorm", detail
        return "LayerNorm", detail
    return "", ""
