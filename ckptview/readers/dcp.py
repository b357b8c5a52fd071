"""
`torch.distributed.checkpoint` directories: a `.metadata` pickle describing every item, and
`*.distcp` files holding one `torch.save` archive per item. The metadata is parsed with the same
allow-listed unpickler as any checkpoint (DCP's own reader would `pickle.load` it), and each
item's archive is parsed in place: tensor bytes stay in the .distcp files until asked for.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

from ckptview.errors import CkptviewError, CorruptCheckpointError, ShardError, TruncatedCheckpointError, printable
from ckptview.readers.model import Checkpoint, FileSource, PickledObject, PickleImport, TensorInfo
from ckptview.readers.paths import resolve_inside
from ckptview.readers.torch_pickle import (
    code_named_before_failing,
    mapped,
    merge_imports,
    naming,
    parse_torch_zip,
    unpickle,
)
from ckptview.readers.unpickler import DTypeRef, SafeUnpickler
from ckptview.readers.zip_directory import NoEndRecord

_LOADER = "torch.distributed.checkpoint.load"

# DCP's own metadata classes, named exactly (a prefix would let `pathlib.os.system` through): what
# DCP's reader imports for a checkpoint torch wrote, all plain records.
_DCP_CLASSES = frozenset(
    [f"torch.distributed.checkpoint.metadata.{name}" for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")]
    + ["torch.distributed.checkpoint.filesystem._StorageInfo"]
    # where each path class lives: pathlib (Python < 3.13) or pathlib._local (3.13+, which pickles it by that name)
    + [f"{module}.{name}" for module in ("pathlib", "pathlib._local")
       for name in ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath")]
)


def _field(obj: Any, name: str, position: int | None = None) -> Any:
    """A dataclass field of a stand-in: from its state dict, or from a tuple state (TensorProperties)."""
    if isinstance(obj, PickledObject):
        attributes = obj.attributes
        if name in attributes:
            return attributes[name]
        if position is not None and isinstance(obj.state, tuple) and len(obj.state) > position:
            return obj.state[position]
    return None


def read_dcp(path: str, *, trust: bool) -> Checkpoint:
    """
    The directory's items from its .metadata. What DCP's loader would run counts as the checkpoint's
    imports: the .metadata's globals beyond DCP's own classes, and those of every item's archive
    (`dcp.load` reads a non-tensor item with `torch.load(weights_only=False)`).
    """
    metadata_path = os.path.join(path, ".metadata")
    unpicklers: list[SafeUnpickler] = []
    imports: Counter[str] = Counter()

    def named() -> list[PickleImport]:
        counts = imports + Counter({imp.name: imp.count for imp in merge_imports(unpicklers)
                                    if imp.name not in _DCP_CLASSES})
        return [PickleImport(name, count) for name, count in sorted(counts.items())]

    with code_named_before_failing(named, loader=_LOADER):
        root, sources = _read_items(path, metadata_path, unpicklers, imports)
    size = sum(os.path.getsize(s.path) for s in sources.values()) + os.path.getsize(metadata_path)
    return Checkpoint(path, "torch-dcp", root, file_size=size, sources=list(sources.values()), pickle_imports=named(),
                      trust=trust, details={"files": [".metadata", *sorted(os.path.basename(p) for p in sources)]})


def _read_items(path: str, metadata_path: str, unpicklers: list[SafeUnpickler],
                imports: Counter[str]) -> tuple[dict[Any, Any], dict[str, FileSource]]:
    with mapped(metadata_path) as data:
        metadata, _, _ = unpickle(data, metadata_path, "its .metadata", unpicklers=unpicklers, loader=_LOADER,
                                  own_classes=_DCP_CLASSES)
    items = _field(metadata, "state_dict_metadata")
    storage_data = _field(metadata, "storage_data")
    if not isinstance(items, dict) or not isinstance(storage_data, dict):
        raise CorruptCheckpointError(metadata_path, "this .metadata does not describe a torch.distributed.checkpoint "
                                                    "(no state_dict_metadata/storage_data). Re-save the checkpoint.")
    planner = _field(metadata, "planner_data") or {}
    locations: dict[str, list[tuple[Any, Any]]] = {}
    for index, info in storage_data.items():
        locations.setdefault(str(_field(index, "fqn")), []).append((_field(index, "offset"), info))

    _refuse_overlaps(path, storage_data)

    sources: dict[str, FileSource] = {}
    root: dict[Any, Any] = {}
    for fqn, item in items.items():
        value = _read_item(path, str(fqn), item, locations.get(str(fqn), []), sources, imports)
        _insert(root, planner.get(fqn) if isinstance(planner, dict) else None, str(fqn), value)
    return root, sources


def _source(path: str, relative: Any, sources: dict[str, FileSource]) -> FileSource:
    full = resolve_inside(path, relative, named_by=os.path.join(path, ".metadata"), what="the data file")
    if full not in sources:
        if not os.path.isfile(full):
            raise ShardError(path, f"data file {printable(relative)} named by .metadata is missing: copy the whole "
                                   "checkpoint directory.")
        sources[full] = FileSource(full)
    return sources[full]


def _read_item(path: str, fqn: str, item: Any, locations: list[tuple[Any, Any]], sources: dict[str, FileSource],
               imports: Counter[str]) -> Any:
    """A tensor item as TensorInfo (bytes left in place), a bytes item as its unpickled value; the globals
    its archive names join `imports`."""
    is_tensor = type(item).class_path.endswith("TensorStorageMetadata") if isinstance(item, PickledObject) else False
    if is_tensor:
        shape = tuple(int(d) for d in _field(item, "size") or ())
        dtype = _field(_field(item, "properties"), "dtype", 0)
        # the pickle names it (torch.bfloat16 as a DTypeRef): the unpickler makes no torch.dtype
        dtype = dtype.name if isinstance(dtype, DTypeRef) else "float32"
        chunks = _field(item, "chunks") or []
        if len(chunks) != 1 or len(locations) != 1:
            return TensorInfo(shape=shape, dtype=dtype, storage=None, layout="unsupported",
                              note=f"saved in {len(chunks)} chunks by several ranks; consolidate it with "
                                   "torch.distributed.checkpoint.format_utils.dcp_to_torch_save")
    if not locations:
        raise CorruptCheckpointError(path, f"item {fqn!r} has no storage location in .metadata: re-save it.")
    info = locations[0][1]
    relative, start, length = _field(info, "relative_path"), int(_field(info, "offset")), int(_field(info, "length"))
    if _field(info, "transform_descriptors"):
        if not is_tensor:  # dcp.load undoes the transforms and unpickles the result with weights_only=False
            imports[f"{printable(fqn)} (a non-tensor item stored with transforms: a pickle ckptview cannot read "
                    "through)"] += 1
        return TensorInfo(shape=(), dtype="uint8", storage=None, layout="unsupported",
                          note="stored with transforms (compression); load it with torch.distributed.checkpoint")
    source = _source(path, relative, sources)
    file_size = os.path.getsize(source.path)
    if start + length > file_size:
        raise CorruptCheckpointError(source.path, f"item {fqn!r} runs to byte {start + length:,} but the file ends at "
                                                  f"{file_size:,}: it was cut off. Copy the checkpoint again.")
    try:
        parsed = parse_torch_zip(source, source.path, file_size, base_offset=start, length=length)
    except TruncatedCheckpointError as exc:
        if not isinstance(exc.__cause__, NoEndRecord):
            raise
        error = CorruptCheckpointError(source.path, f"item {fqn!r} at byte {start:,} is not a torch.save archive: the "
                                                    "file is damaged. Re-save the checkpoint.")
        if not is_tensor:  # dcp.load hands it to torch.load(weights_only=False), which unpickles what is no zip
            error = naming(error, _imports_read_as_pickle(source.path, start), loader=_LOADER)
        raise error from exc
    for imported in parsed.unpickler.pickle_imports():
        imports[imported.name] += imported.count
    return parsed.root


def _imports_read_as_pickle(path: str, start: int) -> list[PickleImport]:
    """What unpickling the bytes at `start` of the file imports (up to where it fails)."""
    unpicklers: list[SafeUnpickler] = []
    try:
        with mapped(path) as data:
            unpickle(data, path, "an item", unpicklers=unpicklers, start=start, loader=_LOADER)
    except CkptviewError as exc:
        return list(getattr(exc, "named_globals", []))
    return merge_imports(unpicklers)


def _refuse_overlaps(path: str, storage_data: dict[Any, Any]) -> None:
    """
    Items whose bytes overlap in a data file, refused before any is read: DCP writes each item once,
    one after another. Items of a crafted .metadata starting a byte apart before one archive, all
    ending at its end, each parse as that archive (bytes before an archive shift its offsets, as
    zipfile allows), and statistics would read its tensors once per item.
    """
    ranges = []
    for index, info in storage_data.items():
        try:
            start, length = int(_field(info, "offset")), int(_field(info, "length"))
        except (TypeError, ValueError):
            continue  # said when the item is read
        if length > 0:
            ranges.append((str(_field(info, "relative_path")), start, start + length, str(_field(index, "fqn"))))
    ranges.sort()
    for (source, _, end, first), (next_source, start, _, second) in zip(ranges, ranges[1:]):
        if source == next_source and start < end:
            raise CorruptCheckpointError(path, f"items {printable(first)!r} and {printable(second)!r} overlap in "
                                               f"{printable(source)}: DCP writes each item once, so "
                                               "the .metadata is crafted or damaged. Re-save the checkpoint.")


def _insert(root: dict[Any, Any], keys: Any, fqn: str, value: Any) -> None:
    """Place an item at its nested position (DCP's planner_data), so sections see {"model": {...}, "optim": {...}}."""
    if not isinstance(keys, (list, tuple)) or not keys:
        root[fqn] = value
        return
    node: Any = root
    for key, following in zip(keys[:-1], keys[1:]):
        container: Any = [] if isinstance(following, int) else {}
        if isinstance(node, list):
            while len(node) <= key:
                node.append(None)
            node[key] = node[key] if node[key] is not None else container
            node = node[key]
        else:
            node = node.setdefault(key, container)
    last = keys[-1]
    if isinstance(node, list):
        while len(node) <= last:
            node.append(None)
    node[last] = value
