"""
The load doctor: why `model.load_state_dict(checkpoint)` fails, and the code that makes it load.

It lines the checkpoint's keys up with the model's (prefixes from DataParallel, torch.compile,
Lightning or a wrapping backbone; consistent renames), then classifies what is left: a new
classifier head, `num_batches_tracked` counters, weights tied in the model but saved once,
transposed matrices, quantized tensors, and ZeRO-3/FSDP placeholders that no renaming can fix.

Every fix is a snippet of Python that starts from `state_dict` (what `torch.load` returned) and
leaves the repaired mapping in `state_dict`. The snippet is the single source of truth: the
doctor runs the very same code over stand-ins for the tensors, both to check that the result loads
into a meta-device copy of the model and to build `fixed_state_dict()` lazily.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ckptview.analyzers.keydiff import QUANTIZED_DTYPES, KeyDiff, Spec, compress_keys, key_diff, spec_of, state_dict_of
from ckptview.analyzers.sections import Section
from ckptview.model_source import ModelSpec, build_model, expected_state, meta_twin
from ckptview.readers.model import TensorEntry

__all__ = ["Fix", "Diagnosis", "FixedStateDict", "diagnose", "doctor"]

# Wrappers that add a prefix to every key, most common first; used to break ties between prefixes
# that explain the keys equally well.
_KNOWN_PREFIXES = ("module.", "_orig_mod.", "model.", "backbone.", "encoder.", "net.", "network.")
_MAX_PREFIX_DEPTH = 3
_MAX_PREFIX_CANDIDATES = 16
_MAX_RENAME_CANDIDATES = 64
_NBT = "num_batches_tracked"


@dataclass(frozen=True)
class Fix:
    """
    One proposed repair.

    Attributes:
        kind: `section`, `strip_prefix`, `add_prefix`, `rename`, `tied_weights`, `num_batches_tracked`,
            `transpose`, `dequantize`, `drop_unexpected`, `head`, `missing`, or `sharded_placeholders`.
        description: what is wrong, why, and what the code does.
        code: Python from `state_dict` to `state_dict`; for `sharded_placeholders`, the commands to
            consolidate the shards (it cannot be applied to this file).
        keys: the keys concerned (checkpoint keys before the fix, or model keys for missing ones).
        applicable: False when the code cannot repair this file (it is advice, left out of `Diagnosis.code`).
        leaves_missing: model keys deliberately left out: load with `strict=False`, these stay as initialised.
    """

    kind: str
    description: str
    code: str
    keys: tuple[str, ...] = ()
    applicable: bool = True
    leaves_missing: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "description": self.description, "code": self.code, "keys": list(self.keys),
                "applicable": self.applicable, "leaves_missing": list(self.leaves_missing)}


class _Pending:
    """A tensor the fix code moves around without reading: shape and dtype, its source, and ops to replay."""

    __slots__ = ("shape", "dtype", "entry", "ops")

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, entry: Any = None, ops: tuple[str, ...] = ()) -> None:
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.entry = entry
        self.ops = ops

    @property
    def is_quantized(self) -> bool:
        return self.dtype in QUANTIZED_DTYPES

    def t(self) -> _Pending:
        return _Pending(tuple(reversed(self.shape)), self.dtype, self.entry, self.ops + ("t",))

    def dequantize(self) -> _Pending:
        return _Pending(tuple(self.shape), torch.float32 if self.is_quantized else self.dtype, self.entry, self.ops + ("dequantize",))

    def meta(self) -> torch.Tensor:
        return torch.empty(self.shape, dtype=self.dtype, device="meta")

    def load(self) -> torch.Tensor:
        value = self.entry.load() if isinstance(self.entry, TensorEntry) else self.entry
        for op in self.ops:
            value = getattr(value, op)()
        return value


class FixedStateDict(Mapping[str, torch.Tensor]):
    """
    The repaired state dict, read lazily: keys, shapes and dtypes come from headers; `fixed[key]`
    reads that tensor (and applies a transpose or dequantize the fix asked for).

    `model.load_state_dict(fixed)` works directly; it reads every tensor once.
    """

    def __init__(self, values: Mapping[str, Any]) -> None:
        self._values = dict(values)

    def __getitem__(self, key: str) -> torch.Tensor:
        value = self._values[key]
        return value.load() if isinstance(value, _Pending) else value

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def entry(self, key: str) -> TensorEntry | None:
        """The checkpoint tensor behind `key` (None for a value the fix made, e.g. a zero counter)."""
        value = self._values[key]
        return value.entry if isinstance(value, _Pending) and isinstance(value.entry, TensorEntry) else None

    def spec(self, key: str) -> Spec:
        """(shape, dtype) of `key` after the fix, without reading it."""
        return spec_of(self._values[key])


@dataclass(frozen=True)
class Diagnosis:
    """
    What the doctor found and the code that fixes it.

    Attributes:
        before: the key diff of the checkpoint as it is against the model.
        after: the key diff once `code` has run.
        fixes: every proposal, in the order they compose.
        code: the combined snippet of the applicable fixes (empty when the checkpoint loads as is).
        loads_after_fix: True when the fixed state dict loaded into a meta-device copy of the model:
            with `strict=True`, or with `strict=False` and exactly `leaves_missing` missing.
        strict: True when that load used `strict=True`.
        leaves_missing: model keys the fixes leave out on purpose (a new head).
        load_error: the message of the failed load, when it failed.
    """

    before: KeyDiff
    after: KeyDiff
    fixes: tuple[Fix, ...]
    code: str
    loads_after_fix: bool
    strict: bool
    leaves_missing: tuple[str, ...]
    load_error: str | None = None
    _values: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        """True when what `torch.load` returns loads with `strict=True` as it is: no fix needed."""
        return self.before.ok and not self.fixes

    def fixed_state_dict(self) -> FixedStateDict:
        """
        The state dict the fix code produces, reading each tensor only when it is accessed.

        Example:
            >>> report = ckptview.doctor("ddp.pt", model)
            >>> model.load_state_dict(report.fixed_state_dict(), strict=report.strict)
        """
        return FixedStateDict(self._values)

    def save_fixed(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> str:
        """
        Write the repaired state dict to a new file: safetensors for a `.safetensors` path, else `torch.save`.

        The data goes to a temporary file in the same directory that is renamed into place, so an
        interrupted save never leaves a half-written file at `path`.

        Args:
            path: where to write; the checkpoint itself is never modified.
            overwrite: replace `path` if it exists.

        Returns:
            The path written.

        Raises:
            FileExistsError: `path` exists and `overwrite` is False.
            ValueError: the doctor found no way to fix this file (nothing useful to write).
        """
        path = os.fspath(path)
        if not self.loads_after_fix:
            raise ValueError("the fixes do not make this checkpoint load (see Diagnosis.after); nothing written")
        if os.path.exists(path) and not overwrite:
            raise FileExistsError(f"{path} exists; ckptview does not overwrite files unless asked: pass overwrite=True "
                                  "or choose another path")
        fixed = self.fixed_state_dict()
        tensors = {key: fixed[key] for key in fixed}
        directory = os.path.dirname(os.path.abspath(path))
        handle, temp = tempfile.mkstemp(prefix=".ckptview-", suffix=".tmp", dir=directory)
        os.close(handle)
        try:
            if path.endswith(".safetensors"):
                from safetensors.torch import save_file

                seen: set[int] = set()
                for key, value in tensors.items():
                    # safetensors refuses shared storages (tied weights); a copy costs one tensor
                    storage = value.untyped_storage().data_ptr()
                    tensors[key] = value.contiguous() if storage not in seen else value.clone().contiguous()
                    seen.add(storage)
                save_file(tensors, temp)
            else:
                torch.save(tensors, temp)
            os.replace(temp, path)
        except BaseException:
            if os.path.exists(temp):
                os.unlink(temp)
            raise
        return path

    def summary(self) -> str:
        """A few lines for a terminal: what is wrong, what to do, and whether it then loads."""
        if self.ok:
            return self.before.message()
        lines = [self.before.message(), ""]
        for number, fix in enumerate(self.fixes, 1):
            lines.append(f"{number}. [{fix.kind}] {fix.description}")
        lines.append("")
        if self.code:
            lines += ["Fix (state_dict = torch.load(...)):", "", self.code, ""]
        if self.loads_after_fix:
            how = "strict=True" if self.strict else f"strict=False, leaving {len(self.leaves_missing)} key(s) missing on purpose"
            lines.append(f"After the fix the state dict loads into the model ({how}).")
        else:
            lines.append("After the proposed fixes it still does not load:")
            lines.append(self.load_error or self.after.message())
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def to_frame(self) -> Any:
        """One row per fix: `kind`, `description`, `keys` (count), `applicable`, `code`."""
        import pandas as pd

        return pd.DataFrame([(f.kind, f.description, len(f.keys), f.applicable, f.code) for f in self.fixes],
                            columns=["kind", "description", "keys", "applicable", "code"])

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "missing": list(self.before.missing),
            "unexpected": list(self.before.unexpected),
            "shape_mismatches": [{"key": m.key, "left": list(m.left), "right": list(m.right)}
                                 for m in self.before.shape_mismatches],
            "fixes": [fix.to_dict() for fix in self.fixes],
            "code": self.code,
            "loads_after_fix": self.loads_after_fix,
            "strict": self.strict,
            "leaves_missing": list(self.leaves_missing),
            "load_error": self.load_error,
        }


def diagnose(entries: Mapping[str, Any], model: ModelSpec, *, section: Section | None = None) -> Diagnosis:
    """
    Find why `entries` do not load into `model` and propose the code that makes them load.

    Args:
        entries: the checkpoint's model state dict, e.g. `model_state_dict(ckpt)`: `TensorEntry`s
            (nothing is read) or tensors.
        model: an `nn.Module` (never modified), a factory string `"package.module:callable"` or a
            callable; factories are built on the meta device.
        section: where `entries` sit in the checkpoint, so the code can start from what `torch.load`
            returns (e.g. `state_dict = state_dict["state_dict"]` for Lightning).

    Returns:
        A `Diagnosis`.

    Raises:
        ModelBuildError: the model factory cannot be imported or called.

    Example:
        >>> with ckptview.open("ddp.pt") as ckpt:
        ...     report = diagnose(model_state_dict(ckpt), "torchvision.models:resnet18")
        >>> print(report.code)
        from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present
        consume_prefix_in_state_dict_if_present(state_dict, 'module.')
    """
    module = build_model(model)
    target = expected_state(module)
    source = {key: spec_of(value) for key, value in entries.items()}
    before = key_diff(source, target)
    fixes: list[Fix] = []
    if section is not None and section.path:
        fixes.append(_section_fix(section))
    if not before.ok:
        current = dict(source)
        for propose in (_prefix_fix, _rename_fix):
            fix = propose(current, target)
            if fix is not None:
                fixes.append(fix)
                current = _simulate(fix.code, current)
        fixes.extend(_leftover_fixes(current, target, module))
    applicable = [fix for fix in fixes if fix.applicable]
    leaves_missing = tuple(key for fix in applicable for key in fix.leaves_missing)
    code = _combine([fix.code for fix in applicable])
    if leaves_missing:
        code += (f"\n\n# then: model.load_state_dict(state_dict, strict=False) reports exactly these missing: "
                 f"{', '.join(compress_keys(leaves_missing))}")
    pending = {key: _Pending(*spec_of(value), entry=value) for key, value in entries.items()}
    values = _run(_combine([fix.code for fix in applicable if fix.kind != "section"]), pending)
    after = key_diff(values, target)
    placeholders = any(not fix.applicable for fix in fixes)
    loads, load_error = (False, "the checkpoint holds sharded placeholders; consolidate it first") if placeholders \
        else _try_load(module, values, leaves_missing)
    return Diagnosis(before=before, after=after, fixes=tuple(fixes), code=code,
                     loads_after_fix=loads, strict=loads and not leaves_missing, leaves_missing=leaves_missing,
                     load_error=load_error, _values=values)


# --- running fix code ----------------------------------------------------------------------------

def _combine(snippets: list[str]) -> str:
    imports: list[str] = []
    bodies: list[str] = []
    for snippet in snippets:
        body = []
        for line in snippet.splitlines():
            if line.startswith(("import ", "from ")):
                if line not in imports:
                    imports.append(line)
            else:
                body.append(line)
        bodies.append("\n".join(body).strip("\n"))
    parts = ["\n".join(imports)] if imports else []
    return "\n\n".join(parts + [b for b in bodies if b])


def _run(code: str, state_dict: dict[str, Any]) -> dict[str, Any]:
    # The code is ours, generated from key names through repr(), so running it runs no file content.
    namespace: dict[str, Any] = {"state_dict": dict(state_dict)}
    exec(compile(code, "<ckptview fix>", "exec"), namespace)  # noqa: S102
    return namespace["state_dict"]


def _simulate(code: str, specs: Mapping[str, Spec]) -> dict[str, Spec]:
    result = _run(code, {key: _Pending(*spec) for key, spec in specs.items()})
    return {key: spec_of(value) for key, value in result.items()}


def _try_load(model: nn.Module, values: Mapping[str, Any], leaves_missing: tuple[str, ...]) -> tuple[bool, str | None]:
    twin = meta_twin(model)
    strict = not leaves_missing
    try:
        tensors = {key: value.meta() if isinstance(value, _Pending) else value for key, value in values.items()}
        result = twin.load_state_dict(tensors, strict=strict, assign=True)
    except (RuntimeError, NotImplementedError) as exc:  # NotImplementedError: quantized dtypes have no meta tensors
        return False, str(exc)
    if not strict and (result.unexpected_keys or sorted(result.missing_keys) != sorted(leaves_missing)):
        return False, (f"with strict=False, missing {compress_keys(result.missing_keys)} "
                       f"and unexpected {compress_keys(result.unexpected_keys)}")
    return True, None


# --- proposals -----------------------------------------------------------------------------------

def _section_fix(section: Section) -> Fix:
    if section.kind == "module":
        return Fix("section", "the file holds a whole pickled nn.Module (torch.save(model)); take its state dict",
                   "state_dict = state_dict.state_dict()")
    subscript = "".join(f"[{part!r}]" for part in section.path)
    return Fix("section", f"the weights sit under checkpoint{subscript} beside other training state; take that dict",
               f"state_dict = state_dict{subscript}")


def _prefix_candidates(keys: list[str]) -> list[str]:
    counts: Counter[str] = Counter()
    for key in keys:
        parts = key.split(".")
        for depth in range(1, min(_MAX_PREFIX_DEPTH, len(parts) - 1) + 1):
            counts[".".join(parts[:depth]) + "."] += 1
    return [""] + [prefix for prefix, _ in counts.most_common(_MAX_PREFIX_CANDIDATES)]


def _prefix_fix(current: dict[str, Spec], target: dict[str, Spec]) -> Fix | None:
    def score(strip: str, add: str) -> tuple[int, int, int]:
        stripped = {(key[len(strip):] if key.startswith(strip) else key): spec for key, spec in current.items()}
        shaped = named = 0
        for key, spec in stripped.items():
            other = target.get(add + key)
            if other is not None:
                named += 1
                shaped += other[0] == spec[0]
        known = sum(p in _KNOWN_PREFIXES for p in (strip, add) if p)
        return shaped, named, known - len(strip) - len(add)

    baseline = score("", "")
    best, best_score = ("", ""), baseline
    for strip in _prefix_candidates(list(current)):
        for add in _prefix_candidates(list(target)):
            if strip == add or (not strip and not add):
                continue
            candidate = score(strip, add)
            if candidate[:2] > best_score[:2] or (candidate[:2] == best_score[:2] > baseline[:2] and candidate > best_score):
                best, best_score = (strip, add), candidate
    if best == ("", ""):
        return None
    strip, add = best
    where = {"module.": " (saved from nn.DataParallel / DistributedDataParallel)",
             "_orig_mod.": " (saved from a torch.compile'd model)",
             "module._orig_mod.": " (saved from a torch.compile'd model wrapped in DataParallel/DDP)",
             "model.": " (a wrapper such as a LightningModule holds the model as self.model)"}.get(strip, "")
    moved = sum(key.startswith(strip) for key in current) if strip else len(current)
    steps, lines = [], []
    if strip:
        steps.append(f"strip the prefix {strip!r} from {moved} checkpoint key(s){where}")
        lines += ["from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present",
                  f"consume_prefix_in_state_dict_if_present(state_dict, {strip!r})"]
    if add:
        steps.append(f"add the prefix {add!r} the model's keys have (it holds these weights as a submodule)")
        lines.append(f"state_dict = {{{add!r} + key: value for key, value in state_dict.items()}}")
    kind = "strip_prefix" if strip else "add_prefix"
    description = "; ".join(steps) + f": {best_score[0]} of {len(target)} model keys then match (before: {baseline[0]})"
    return Fix(kind, description[0].upper() + description[1:], "\n".join(lines),
               keys=tuple(key for key in current if key.startswith(strip)))


def _rename(rules: Mapping[str, str], key: str) -> str:
    return ".".join(rules.get(part, part) for part in key.split("."))


def _rename_fix(current: dict[str, Spec], target: dict[str, Spec]) -> Fix | None:
    unexpected = [key for key in current if key not in target]
    missing = [key for key in target if key not in current]
    if not unexpected or not missing:
        return None
    # Keys that differ in exactly one dotted part vote for renaming that part.
    slots: dict[tuple[Any, ...], list[str]] = {}
    for key in missing:
        parts = key.split(".")
        for i in range(len(parts)):
            slots.setdefault((i, len(parts), *parts[:i], *parts[i + 1:]), []).append(parts[i])
    votes: Counter[tuple[str, str]] = Counter()
    for key in unexpected:
        parts = key.split(".")
        for i in range(len(parts)):
            for new in slots.get((i, len(parts), *parts[:i], *parts[i + 1:]), ()):
                votes[(parts[i], new)] += 1

    def matched(rules: Mapping[str, str]) -> int | None:
        renamed: dict[str, Spec] = {}
        for key, spec in current.items():
            new = _rename(rules, key)
            if new != key and (new not in target or target[new][0] != spec[0]):
                return None  # a rename must land on a model key of the same shape, one to one
            renamed[new] = spec
        if len(renamed) != len(current):
            return None
        return sum(key in target and target[key][0] == spec[0] for key, spec in renamed.items())

    rules: dict[str, str] = {}
    best = matched(rules) or 0
    for (old, new), _ in votes.most_common(_MAX_RENAME_CANDIDATES):
        if old in rules:
            continue
        trial = {**rules, old: new}
        score = matched(trial)
        if score is not None and score > best:
            rules, best = trial, score
    if not rules:
        return None
    changed = tuple(key for key in current if _rename(rules, key) != key)
    pairs = ", ".join(f"{old} -> {new}" for old, new in rules.items())
    return Fix(
        "rename",
        f"rename key parts {pairs}: {len(changed)} checkpoint key(s) then match model keys of the same shape, one to one "
        "(an older version of the model or another implementation named them so)",
        f"renames = {rules!r}\n"
        "state_dict = {\".\".join(renames.get(part, part) for part in key.split(\".\")): value\n"
        "              for key, value in state_dict.items()}",
        keys=changed,
    )


def _tied_groups(model: nn.Module) -> list[list[str]]:
    by_tensor: dict[int, list[str]] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        by_tensor.setdefault(id(value), []).append(key)
    return [keys for keys in by_tensor.values() if len(keys) > 1]


def _leftover_fixes(current: dict[str, Spec], target: dict[str, Spec], model: nn.Module) -> list[Fix]:
    fixes: list[Fix] = []
    diff = key_diff(current, target)
    # ZeRO-3 / FSDP save a rank's view of a sharded parameter: an empty (or 1-element) stand-in.
    placeholders = [m for m in diff.shape_mismatches if math.prod(m.left) <= 1 < math.prod(m.right)]
    if placeholders:
        return [_placeholder_fix(placeholders, len(current))]

    missing = set(diff.missing)
    tied = []
    for group in _tied_groups(model):
        present = [key for key in group if key in current]
        if present:
            tied += [(key, present[0]) for key in group if key in missing]
    if tied:
        lines = [f"state_dict[{key!r}] = state_dict[{source!r}]" for key, source in tied]
        fixes.append(Fix("tied_weights", "the model ties " + ", ".join(f"{k} to {s}" for k, s in tied) +
                         " (one tensor under two names); the checkpoint saved it once, as safetensors and "
                         "save_pretrained do. Point the missing name at the saved tensor", "\n".join(lines),
                         keys=tuple(key for key, _ in tied)))
        missing -= {key for key, _ in tied}

    missing_nbt = sorted(key for key in missing if key.split(".")[-1] == _NBT)
    if missing_nbt:
        fixes.append(Fix(
            "num_batches_tracked",
            f"{len(missing_nbt)} BatchNorm num_batches_tracked counter(s) are missing ({', '.join(compress_keys(missing_nbt))}): "
            "checkpoints from torch < 0.4.1, or re-saved without buffers, lack them. Safe to ignore: BatchNorm reads the "
            "counter only when momentum=None (cumulative average), and every weight and running statistic is there. "
            "The code adds a zero counter, which is what a fresh model has",
            "import torch\n"
            "for key in [k for k in state_dict if k.endswith(\".running_mean\")]:\n"
            "    state_dict.setdefault(key[: -len(\"running_mean\")] + \"num_batches_tracked\", torch.tensor(0))",
            keys=tuple(missing_nbt),
        ))
        missing -= set(missing_nbt)

    unexpected_nbt = [key for key in diff.unexpected if key.split(".")[-1] == _NBT]
    if unexpected_nbt:
        fixes.append(Fix(
            "num_batches_tracked",
            f"the checkpoint has {len(unexpected_nbt)} num_batches_tracked counter(s) the model has no place for "
            "(its BatchNorm layers use track_running_stats=False, or it is another norm layer): safe to drop, the "
            "counter is only a step count",
            f"drop = set({unexpected_nbt!r})\n"
            "state_dict = {key: value for key, value in state_dict.items() if key not in drop}",
            keys=tuple(unexpected_nbt),
        ))

    transposed = [m for m in diff.shape_mismatches if len(m.left) == 2 and m.left == m.right[::-1]]
    if transposed:
        keys = tuple(m.key for m in transposed)
        fixes.append(Fix(
            "transpose",
            f"{len(keys)} matrix/matrices are stored transposed ({', '.join(compress_keys(keys))}): "
            "[in, out] as Conv1D (GPT-2), JAX/Flax or TensorFlow keep them, where nn.Linear wants [out, in]",
            f"for key in {keys!r}:\n    state_dict[key] = state_dict[key].t()",
            keys=keys,
        ))

    quantized = [m for m in diff.dtype_mismatches if m.blocks_loading and m.left in QUANTIZED_DTYPES]
    if quantized:
        keys = tuple(m.key for m in quantized)
        fixes.append(Fix(
            "dequantize",
            f"{len(keys)} tensor(s) are quantized ({quantized[0].left}) where the model is float: dequantize them "
            "(or build the quantized model with torch.ao.quantization before loading)",
            f"for key in {keys!r}:\n    state_dict[key] = state_dict[key].dequantize()",
            keys=keys,
        ))

    done = {m.key for m in transposed}
    head = [m for m in diff.shape_mismatches if m.key not in done and len(m.left) == len(m.right) and m.left[1:] == m.right[1:]]
    leftover_unexpected = [key for key in diff.unexpected if key.split(".")[-1] != _NBT]
    if leftover_unexpected and diff.matched:
        fixes.append(Fix(
            "drop_unexpected",
            f"the model has no place for {len(leftover_unexpected)} checkpoint key(s) "
            f"({', '.join(compress_keys(leftover_unexpected)[:6])}): drop them. Check they are not weights you need "
            "under another name",
            f"drop = set({leftover_unexpected!r})\n"
            "state_dict = {key: value for key, value in state_dict.items() if key not in drop}",
            keys=tuple(leftover_unexpected),
        ))
    if head:
        keys = tuple(m.key for m in head)
        sizes = f"{head[0].left[0]} outputs in the checkpoint, {head[0].right[0]} in the model"
        fixes.append(Fix(
            "head",
            f"a new head: {', '.join(compress_keys(keys))} differ in their first dimension ({sizes}, e.g. another "
            "num_classes). Load everything else and keep the model's freshly initialised head: "
            "model.load_state_dict(state_dict, strict=False) then reports exactly these keys as missing",
            f"head_keys = {keys!r}\n"
            "state_dict = {key: value for key, value in state_dict.items() if key not in head_keys}",
            keys=keys,
            leaves_missing=keys,
        ))
    if missing and diff.matched:
        keys = tuple(key for key in target if key in missing)
        fixes.append(Fix(
            "missing",
            f"the checkpoint has nothing for {len(keys)} model key(s) ({', '.join(compress_keys(keys)[:6])}): "
            "load with strict=False and these keep their initial values; make sure that is what you want",
            "",
            keys=keys,
            leaves_missing=keys,
        ))
    return fixes


def _placeholder_fix(placeholders: list[Any], total: int) -> Fix:
    example = placeholders[0]
    return Fix(
        "sharded_placeholders",
        f"{len(placeholders)} of {total} tensors are placeholders of shape {list(example.left)} where the model expects "
        f"full tensors (e.g. {example.key}: {list(example.right)}): this file was saved from a ZeRO-3 (DeepSpeed) or "
        "FSDP model whose parameters were sharded across ranks, so the weights are not in it. This cannot be fixed by "
        "renaming keys or loading with strict=False. Consolidate the shards into one full state dict first: DeepSpeed: "
        "run the zero_to_fp32.py script saved beside the checkpoint (python zero_to_fp32.py CHECKPOINT_DIR "
        "pytorch_model.bin); FSDP/DCP: python -m torch.distributed.checkpoint.format_utils dcp_to_torch_save "
        "CHECKPOINT_DIR full.pt, or save with a FULL_STATE_DICT state_dict_type next time",
        "# DeepSpeed ZeRO-3: run in the checkpoint directory\n"
        "from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint\n"
        "state_dict = get_fp32_state_dict_from_zero_checkpoint(\"CHECKPOINT_DIR\")\n"
        "# FSDP / torch.distributed.checkpoint:\n"
        "# from torch.distributed.checkpoint.format_utils import dcp_to_torch_save\n"
        "# dcp_to_torch_save(\"CHECKPOINT_DIR\", \"full.pt\"); state_dict = torch.load(\"full.pt\")",
        keys=tuple(m.key for m in placeholders),
        applicable=False,
    )


def doctor(checkpoint: Any, model: ModelSpec, *, trust: bool = False) -> Diagnosis:
    """
    Explain why a checkpoint does not load into a model, and hand back the code that makes it load.

    Args:
        checkpoint: a checkpoint path, an open `Checkpoint`, or a state dict. Of a checkpoint the
            model section is used (a Lightning file's `state_dict`); the fix code then starts from
            what `torch.load` returns for the whole file.
        model: an `nn.Module` (never modified: the load is checked on a meta-device copy), or a
            factory `"package.module:callable"` built on the meta device, so no memory is used.
        trust: passed to `ckptview.open` for paths.

    Returns:
        A `Diagnosis`: `fixes`, the combined `code`, `loads_after_fix`, `fixed_state_dict()`, `save_fixed()`.

    Raises:
        ModelBuildError: the factory cannot be imported or called.
        CkptviewError: the checkpoint cannot be opened.

    Example:
        >>> report = ckptview.doctor("ddp_resnet.pt", "torchvision.models:resnet18")
        >>> report.loads_after_fix, [fix.kind for fix in report.fixes]
        (True, ['strip_prefix'])
        >>> state_dict = torch.load("ddp_resnet.pt"); exec(report.code); model.load_state_dict(state_dict)
    """
    with state_dict_of(checkpoint, trust=trust) as (entries, section):
        return diagnose(entries, model, section=section)
