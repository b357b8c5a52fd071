"""
The dotted tensor names folded into a module tree with totals per subtree, and runs of
identical numbered blocks (`layers.0` ... `layers.31`) folded into one node ×32.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ckptview.analyzers.sections import model_section
from ckptview.analyzers.table import TensorTable, tensor_table
from ckptview.readers.model import Checkpoint, dotted_name, gc_paused

if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True)
class TreeNode:
    """
    One module (or section, or folded run of blocks) of the tree.

    For a folded node (`repeat > 1`) the totals cover every block of the run, and `children`
    describe one block (the first), since all blocks have the same tensors and shapes.
    """

    name: str                       # the last name part; "0…31" for a folded run
    path: str                       # dotted path from the root; the first block's path for a run
    parameter_count: int            # elements beneath, each stored view counted once
    nbytes: int
    share: float                    # parameter_count / the model's (`share_of` "model") or the file's ("file")
    tensor_count: int
    layer_kinds: tuple[str, ...]    # inferred layer kinds beneath, most elements first
    children: tuple[TreeNode, ...] = ()
    repeat: int = 1                 # how many identical blocks this node stands for
    tensors: tuple[str, ...] = field(default=(), repr=False)  # leaves held directly by this module
    # "model" inside the model section (and at the file's root when it is one): shares of the model's
    # elements, so optimizer moments beside it do not halve every layer's share; "file" elsewhere.
    share_of: str = "model"


@dataclass(frozen=True)
class ModuleTree:
    """The module tree of a checkpoint: `root.children` are the top-level modules (or sections)."""

    root: TreeNode

    def walk(self) -> list[tuple[int, TreeNode]]:
        """(depth, node) for every node, depth first, root excluded."""
        out: list[tuple[int, TreeNode]] = []
        stack = [(0, child) for child in reversed(self.root.children)]
        while stack:
            depth, node = stack.pop()
            out.append((depth, node))
            stack.extend((depth + 1, child) for child in reversed(node.children))
        return out

    def to_records(self) -> list[dict[str, Any]]:
        """One dict per node, depth first: depth, name, path, repeat, parameter_count, nbytes, share, tensor_count, layer_kinds."""
        return [{"depth": depth, "name": n.name, "path": n.path, "repeat": n.repeat, "parameter_count": n.parameter_count,
                 "nbytes": n.nbytes, "share": n.share, "tensor_count": n.tensor_count,
                 "layer_kinds": ", ".join(n.layer_kinds)} for depth, n in self.walk()]

    def to_frame(self) -> pd.DataFrame:
        """`to_records()` as a DataFrame."""
        import pandas as pd

        columns = ["depth", "name", "path", "repeat", "parameter_count", "nbytes", "share", "tensor_count", "layer_kinds"]
        return pd.DataFrame(self.to_records(), columns=columns)


def module_tree(ckpt: Checkpoint, *, fold_repeats: bool = True) -> ModuleTree:
    """
    Fold the checkpoint's dotted tensor names into a module tree with totals per subtree.

    `layer1.0.conv1.weight` becomes `layer1` → `0` → `conv1` holding `weight`. Each node has the
    elements and bytes beneath it (tied tensors counted once, under their first name), its share
    (of the model section's elements for nodes in it, of the file's for optimizer state and the
    rest: `share_of`), and the layer kinds beneath. With `fold_repeats`, consecutive numbered children
    whose tensors have the same relative names, shapes and dtypes become one node with `repeat`
    set to their number (`layers.0…31` ×32).

    Args:
        ckpt: an opened checkpoint.
        fold_repeats: fold runs of identical numbered blocks.

    Returns:
        A frozen `ModuleTree`; `to_frame()` gives one DataFrame row per node. Cached per checkpoint.

    Example:
        >>> tree = ckptview.module_tree(ckpt)       # a Hugging Face LLaMA-7B state dict
        >>> [child.name for child in tree.root.children[0].children]
        ['embed_tokens', 'layers', 'norm']
        >>> [(n.name, n.repeat) for n in tree.root.children[0].children[1].children]
        [('0…31', 32)]
    """
    def build() -> ModuleTree:
        section = model_section(ckpt)
        return build_tree(tensor_table(ckpt), fold_repeats, model=None if section is None else dotted_name(section.path))

    return ckpt.cached(f"module_tree:{fold_repeats}", build)


class _Builder:
    __slots__ = ("children", "numel", "nbytes", "count", "kinds", "leaves", "signature")

    def __init__(self) -> None:
        self.children: dict[str, _Builder] = {}
        self.numel = 0
        self.nbytes = 0
        self.count = 0
        self.kinds: dict[str, int] = {}
        self.leaves: list[tuple[str, tuple[int, ...], Any]] = []
        self.signature: Any = None


MAX_TREE_DEPTH = 64  # module levels shown; deeper parts of a name stay in its leaf's name


def _name_parts(name: str) -> list[str]:
    """A tensor name's module path and leaf: torch nests modules with ".", TensorFlow, TFLite and
    ONNX exporters scope names with "/" ("sequential/conv/BiasAdd"); either makes a level."""
    if "/" not in name:
        return name.split(".")
    return [part for part in name.replace("/", ".").split(".") if part] or [name]


@gc_paused()  # tens of thousands of nodes, none of them garbage: collections would only slow the build
def build_tree(table: TensorTable, fold_repeats: bool = True, *, model: str | None = None) -> ModuleTree:
    """
    The module tree of a tensor table (what `module_tree` returns; exposed for tables built elsewhere).
    `model` is the dotted path of the model section ("" for a bare state dict, None when unknown):
    shares beneath it are of its elements.
    """
    root = _Builder()
    for row in table.rows:
        *modules, leaf = _name_parts(row.name)
        if len(modules) > MAX_TREE_DEPTH:
            # no model nests modules this deep; a file that claims to would make the tree's recursive
            # build and its path strings cost time quadratic in the depth
            leaf = ".".join(modules[MAX_TREE_DEPTH:] + [leaf])
            modules = modules[:MAX_TREE_DEPTH]
        node = root
        for part in modules:
            child = node.children.get(part)
            if child is None:
                child = node.children[part] = _Builder()
            node = child
        node.leaves.append((leaf, row.shape, row.dtype_name))
        node.count += 1
        if not row.tied_to:
            node.numel += row.numel
            node.nbytes += row.nbytes
            if row.layer_kind:
                node.kinds[row.layer_kind] = node.kinds.get(row.layer_kind, 0) + row.numel
    _total(root)
    model_node: _Builder | None = root
    for part in model.split(".") if model else ():
        model_node = model_node.children.get(part) if model_node is not None else None
    model_total = (model_node.numel if model_node is not None else root.numel) or 1
    file_total = root.numel or 1

    def in_model(path: str) -> bool:
        return not model or path == model or path.startswith(model + ".")

    def share(numel: int, path: str) -> tuple[float, str]:
        return (numel / model_total, "model") if in_model(path) else (numel / file_total, "file")

    def freeze(name: str, path: str, node: _Builder) -> TreeNode:
        kids = []
        items = list(node.children.items())
        index = 0
        while index < len(items):
            key, child = items[index]
            run = 1
            if fold_repeats and key.isdigit():
                while (index + run < len(items) and items[index + run][0] == str(int(key) + run)
                       and items[index + run][1].signature == child.signature):
                    run += 1
            child_path = f"{path}.{key}" if path else key
            frozen = freeze(key, child_path, child)
            if run > 1:
                members = [c for _, c in items[index : index + run]]
                numel = sum(m.numel for m in members)
                kinds: dict[str, int] = {}
                for m in members:
                    for kind, n in m.kinds.items():
                        kinds[kind] = kinds.get(kind, 0) + n
                fraction, of = share(numel, child_path)
                frozen = TreeNode(
                    name=f"{key}…{items[index + run - 1][0]}", path=child_path, parameter_count=numel,
                    nbytes=sum(m.nbytes for m in members), share=fraction,
                    tensor_count=sum(m.count for m in members), layer_kinds=_ordered(kinds),
                    children=frozen.children, repeat=run, tensors=frozen.tensors, share_of=of,
                )
            kids.append(frozen)
            index += run
        fraction, of = share(node.numel, path)
        return TreeNode(name, path, node.numel, node.nbytes, fraction, node.count, _ordered(node.kinds),
                        tuple(kids), 1, tuple(leaf for leaf, _, _ in node.leaves), of)

    return ModuleTree(freeze("", "", root))


def _total(node: _Builder) -> None:
    """Add each subtree's totals into its root and give it a signature: its leaves and its children's signatures."""
    for child in node.children.values():
        _total(child)
        node.numel += child.numel
        node.nbytes += child.nbytes
        node.count += child.count
        for kind, n in child.kinds.items():
            node.kinds[kind] = node.kinds.get(kind, 0) + n
    # Two blocks fold together when their tensors have the same names, shapes and dtypes.
    node.signature = (tuple(node.leaves), tuple((key, child.signature) for key, child in node.children.items()))


def _ordered(kinds: dict[str, int]) -> tuple[str, ...]:
    return tuple(kind for kind, _ in sorted(kinds.items(), key=lambda item: -item[1]))
