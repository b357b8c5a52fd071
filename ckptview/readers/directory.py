"""
Many files as one checkpoint: sharded sets described by a `*.index.json` (safetensors or torch
`.bin` shards), `torch.distributed.checkpoint` directories, and folders holding one checkpoint.
"""

from __future__ import annotations

import json
import os
import re
from ckptview.errors import CorruptCheckpointError, ShardError, UnsupportedFormatError, printable
from ckptview.readers.model import Checkpoint, TensorInfo
from ckptview.readers.paths import read_json, resolve_inside
from ckptview.readers.registry import supported
from ckptview.readers.trainer_folder import is_trainer_folder, open_trainer_folder

_CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".tar", ".pkl")
_SHARD_NAME = re.compile(r"^(?P<stem>.+)-(?P<index>\d+)-of-(?P<total>\d+)(?P<suffix>\.\w+)$")
# The Hugging Face libraries save one model's weights under these names, and a Hub repository often
# holds it in both formats; `from_pretrained` loads the first present, in this order.
_SAME_WEIGHTS = (
    ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json", "pytorch_model.bin"),
    ("diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.safetensors",
     "diffusion_pytorch_model.bin.index.json", "diffusion_pytorch_model.bin"),
    ("adapter_model.safetensors", "adapter_model.bin"),
)


def open_directory(path: str, *, trust: bool) -> Checkpoint:
    try:
        names = sorted(os.listdir(path))
    except OSError as exc:
        raise UnsupportedFormatError(path, f"a directory that cannot be listed ({exc.strerror})") from exc
    if ".metadata" in names:
        from ckptview.readers.dcp import read_dcp

        return read_dcp(path, trust=trust)
    # TensorFlow's formats are folders: a SavedModel, or checkpoints beside their `checkpoint` state file
    if "saved_model.pb" in names:
        return open_checkpoint_file(os.path.join(path, "saved_model.pb"), trust)
    tf_indexes = [n for n in names if n.endswith(".index")]
    if "checkpoint" in names and tf_indexes:
        return open_checkpoint_file(os.path.join(path, "checkpoint"), trust)
    if len(tf_indexes) == 1:
        return open_checkpoint_file(os.path.join(path, tf_indexes[0]), trust)
    if is_trainer_folder(names):
        return open_trainer_folder(path, names, trust=trust)
    indexes = [n for n in names if n.endswith(".index.json")]
    candidates = [n for n in names if n.endswith(_CHECKPOINT_SUFFIXES) and os.path.isfile(os.path.join(path, n))]
    chosen = _what_from_pretrained_loads(indexes, candidates)
    if chosen is not None:
        ckpt = open_index(os.path.join(path, chosen), trust=trust) if chosen.endswith(".index.json") \
            else open_checkpoint_file(os.path.join(path, chosen), trust)
        others = [n for group in _SAME_WEIGHTS if chosen in group for n in group if n != chosen and n in names]
        ckpt.details["chosen_from_folder"] = (f"{chosen}, which from_pretrained loads; the folder holds the same "
                                              f"weights as {', '.join(others)} too")
        return ckpt
    if len(indexes) == 1:
        return open_index(os.path.join(path, indexes[0]), trust=trust)
    if not indexes and len(candidates) == 1:
        return open_checkpoint_file(os.path.join(path, candidates[0]), trust)
    listed = ", ".join((indexes or candidates or names)[:8]) or "nothing"
    raise UnsupportedFormatError(
        path, f"a directory, not a checkpoint file; it holds {listed}. Open one of these files, or a "
              "*.index.json of a sharded set.")


def _what_from_pretrained_loads(indexes: list[str], candidates: list[str]) -> str | None:
    """
    The one file to open of a folder holding one model's weights in several formats, named as the
    Hugging Face libraries name them (`model.safetensors` beside `pytorch_model.bin`): the one
    `from_pretrained` loads. None when the folder holds anything else, or a single format.
    """
    listed = set(indexes) | {name for name in candidates if not _SHARD_NAME.match(name)}
    for group in _SAME_WEIGHTS:
        if len(listed) > 1 and listed <= set(group):
            return next(name for name in group if name in listed)
    return None


def open_checkpoint_file(path: str, trust: bool) -> Checkpoint:
    from ckptview.readers import open_checkpoint

    return open_checkpoint(path, trust=trust)


def read_index_file(path: str, size: int, *, trust: bool) -> Checkpoint:
    """The registry's entry point for a JSON file: a shard index."""
    return open_index(path, trust=trust)


_MAX_INDEX_BYTES = 256 * 1024 * 1024  # an index of a million tensors is ~60 MB


def open_index(path: str, *, trust: bool) -> Checkpoint:
    """A sharded set: one Checkpoint whose tensors come from each shard, every shard read lazily.
    Shards must be files inside the index's folder (after symlinks) and may not be indexes themselves."""
    index = read_json(path, _MAX_INDEX_BYTES,
                      too_large=f"a JSON document of over {_MAX_INDEX_BYTES >> 20} MB, too large for a shard index; "
                                "give the checkpoint file itself.",
                      unparsable="this JSON file cannot be parsed (its text is not valid JSON): re-download it.",
                      too_deep="this JSON file nests its values too deeply to be a shard index: re-download it.")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise UnsupportedFormatError(path, f"a JSON document without a weight_map, not a shard index; {supported()}.")
    folder = os.path.dirname(os.path.abspath(path))
    shard_names = list(dict.fromkeys(weight_map.values()))
    resolved = {name: resolve_inside(folder, name, named_by=path, what="the shard") for name in shard_names}
    missing = [name for name in shard_names if not os.path.isfile(resolved[name])]
    if missing:
        raise ShardError(path, f"shard {printable(missing[0])} listed in the index is missing from {folder}"
                               + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                               + ": download or copy every shard next to the index.")
    _check_extra_shards(path, folder, shard_names)

    from ckptview.readers import open_checkpoint

    shards: dict[str, Checkpoint] = {}
    try:
        for name in shard_names:
            shards[name] = open_checkpoint(resolved[name], trust=trust, shard_of=path)
    except Exception:
        for opened in shards.values():
            opened.close()
        raise
    by_shard = {name: {entry.name: entry.info for entry in ckpt.tensors()} for name, ckpt in shards.items()}
    root: dict[str, TensorInfo] = {}
    absent: list[str] = []
    for tensor_name, shard_name in weight_map.items():
        info = by_shard[shard_name].get(tensor_name)
        if info is None:
            absent.append(f"{tensor_name} (index says {shard_name})")
        else:
            root[tensor_name] = info
    unlisted = [f"{n} (in {s})" for s, tensors in by_shard.items() for n in tensors if n not in weight_map]
    problems = []
    if absent:
        problems.append(f"{len(absent)} weight_map entries point to tensors absent from their shard: " + ", ".join(absent[:10]))
    if unlisted:
        problems.append(f"{len(unlisted)} tensors in shards are not in the weight_map: " + ", ".join(unlisted[:10]))
    kinds = {ckpt.format for ckpt in shards.values()}
    format_name = ("safetensors" if kinds == {"safetensors"} else "torch") + "-sharded"
    metadata = {str(k): str(v) for k, v in (index.get("metadata") or {}).items()} if isinstance(index.get("metadata"), dict) else {}
    return Checkpoint(
        path, format_name, root,
        file_size=sum(ckpt.file_size for ckpt in shards.values()) + os.path.getsize(path),
        sources=[source for ckpt in shards.values() for source in ckpt._sources],
        metadata=metadata,
        pickle_imports=[imp for ckpt in shards.values() for imp in ckpt.pickle_imports],
        trust=trust,
        details={"shards": shard_names, "missing_tensors": absent, "unlisted_tensors": unlisted, "problems": problems,
                 "shard_sizes": {name: ckpt.file_size for name, ckpt in shards.items()},
                 "config": _config_beside(folder, path)},
    )


_MAX_CONFIG_BYTES = 1 << 20


def _config_beside(folder: str, index_path: str) -> dict | None:
    """The `config.json` Hugging Face saves next to a sharded set (architectures, torch_dtype, sizes),
    when it is a small JSON object inside the folder; anything else is not a config to show."""
    try:
        path = resolve_inside(folder, "config.json", named_by=index_path, what="the config")
        if not os.path.isfile(path) or os.path.getsize(path) > _MAX_CONFIG_BYTES:
            return None
        with open(path, "rb") as stream:
            config = json.load(stream)
    except (CorruptCheckpointError, OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    return config if isinstance(config, dict) else None


def _check_extra_shards(path: str, folder: str, shard_names: list[str]) -> None:
    """A file named like a shard of this set (`stem-000NN-of-000MM.ext`) that the index does not list."""
    patterns = {(m["stem"], m["total"], m["suffix"]) for m in map(_SHARD_NAME.match, shard_names) if m}
    listed = set(shard_names)
    for name in sorted(os.listdir(folder)):
        match = _SHARD_NAME.match(name)
        if match and (match["stem"], match["total"], match["suffix"]) in patterns and name not in listed:
            raise ShardError(path, f"shard file {name} is in {folder} but the index does not list it: the index "
                                   "belongs to a different save, or a shard was left over. Remove the stray file "
                                   "or use the matching index.")

