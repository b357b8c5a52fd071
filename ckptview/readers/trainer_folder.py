"""
A Hugging Face `Trainer` checkpoint folder (`output_dir/checkpoint-500/`) as one checkpoint.

The Trainer saves a training checkpoint as several files beside each other: the model
(`model.safetensors`, `pytorch_model.bin` or a sharded set; `adapter_model.*` for PEFT), the
optimizer, scheduler and AMP scaler states (`optimizer.pt`, `scheduler.pt`, `scaler.pt`), the
random states (`rng_state.pth`, `rng_state_<rank>.pth`), its arguments (`training_args.bin`, a
pickled `TrainingArguments`) and `trainer_state.json` (epoch, global step, the log history).
Read as one training dict, every analyzer sees what a `torch.save({"model": ..., "optimizer":
...})` checkpoint shows: the optimizer mapped to the model's parameters, the schedule, and the
epoch, step and metrics a run (`open_run` over `output_dir`) orders and plots by.

Each file is opened by its own reader (headers only, pickles through the safe unpickler); the
folder needs foreign code when any of them does (`training_args.bin` names transformers'
classes).
"""

from __future__ import annotations

import math
import os
from typing import Any

from ckptview.errors import CorruptCheckpointError
from ckptview.readers.model import Checkpoint, PickleImport
from ckptview.readers.paths import read_json, resolve_inside

TRAINER_STATE = "trainer_state.json"
# the model's file, in the order the Trainer itself looks for them when it resumes
_MODEL_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json", "model.safetensors",
                "pytorch_model.bin", "adapter_model.safetensors", "adapter_model.bin")
# file -> key in the training dict (its section is found by content: optimizer, scheduler, scaler)
_STATE_FILES = {"optimizer.pt": "optimizer", "scheduler.pt": "lr_scheduler", "scaler.pt": "scaler",
                "training_args.bin": "training_args"}
_MAX_STATE_BYTES = 64 * 1024 * 1024  # ~300,000 log entries of ~200 bytes: past any real run logged per step
# log_history keys that say where an entry was logged, not what was measured
_POSITION_KEYS = ("step", "epoch")


def is_trainer_folder(names: list[str]) -> bool:
    return TRAINER_STATE in names and any(name in names for name in _MODEL_FILES)


def open_trainer_folder(path: str, names: list[str], *, trust: bool) -> Checkpoint:
    """The folder `path` (whose listing is `names`) as one checkpoint; see the module's docstring."""
    from ckptview.readers import open_checkpoint

    def inside(name: str) -> str:
        # a link among them leads nowhere but the folder (or, in the hub's cache, its blobs), as for shards
        return resolve_inside(path, name, named_by=path, what="the file")

    state = _trainer_state(inside(TRAINER_STATE))
    parts: dict[str, Checkpoint] = {}
    try:
        model_file = next(name for name in _MODEL_FILES if name in names)
        parts[model_file] = open_checkpoint(inside(model_file), trust=trust)
        for name in sorted(names):
            if name in _STATE_FILES or (name.startswith("rng_state") and name.endswith(".pth")):
                parts[name] = open_checkpoint(inside(name), trust=trust)
    except Exception:
        for opened in parts.values():
            opened.close()
        raise
    root: dict[str, Any] = {"model": parts[model_file].root}
    for name, part in parts.items():
        if name in _STATE_FILES:
            root[_STATE_FILES[name]] = part.root
        elif name != model_file:
            root[name.removesuffix(".pth")] = part.root
    for key in ("epoch", "global_step", "best_metric"):
        if _is_number(state.get(key)):
            root[key] = state[key]
    metrics = _latest_metrics(state)
    if metrics:
        root["metrics"] = metrics
    root["trainer_state"] = state
    imports: dict[str, int] = {}
    for part in parts.values():
        for imported in part.pickle_imports:
            imports[imported.name] = imports.get(imported.name, 0) + imported.count
    return Checkpoint(
        path, "trainer-checkpoint", root,
        file_size=sum(part.file_size for part in parts.values()) + os.path.getsize(inside(TRAINER_STATE)),
        sources=[source for part in parts.values() for source in part._sources],
        metadata=parts[model_file].metadata,
        pickle_imports=[PickleImport(name, count) for name, count in sorted(imports.items())],
        trust=trust,
        details={"files": {name: part.format for name, part in parts.items()}, "model_file": model_file,
                 # why torch.load(weights_only=True) refuses one of the files (rng_state.pth holds numpy arrays)
                 "weights_only": "; ".join(f"{name}: {part.details['weights_only']}" for name, part in parts.items()
                                           if part.details.get("weights_only"))},
    )


def _latest_metrics(state: dict[str, Any]) -> dict[str, float]:
    """Each number the log history holds (loss, eval_loss, learning_rate, ...), as last logged at or
    before the checkpoint's global step: what the Trainer had measured when it saved."""
    step = state.get("global_step")
    history = state.get("log_history")
    latest: dict[str, float] = {}
    if not isinstance(history, list):
        return latest
    for entry in history:
        if not isinstance(entry, dict):
            continue
        at = entry.get("step")
        if _is_number(step) and _is_number(at) and at > step:
            break
        latest.update({str(key): value for key, value in entry.items()
                       if key not in _POSITION_KEYS and _is_number(value)})
    return latest


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _trainer_state(path: str) -> dict[str, Any]:
    damaged = ("the Trainer's state file cannot be parsed (its text is not valid JSON): copy the checkpoint folder "
               "again, or open the model file beside it.")
    state = read_json(path, _MAX_STATE_BYTES, unparsable=damaged, too_deep=damaged,
                      too_large=f"a trainer_state.json of over {_MAX_STATE_BYTES >> 20} MB: not one the Trainer "
                                "writes. Open the model file beside it.")
    if not isinstance(state, dict):
        raise CorruptCheckpointError(path, "the Trainer's state file holds no JSON object: copy the checkpoint "
                                           "folder again, or open the model file beside it.")
    return state
