"""
The load doctor: why `model.load_state_dict(checkpoint)` fails, and the code that makes it load.

It lines the checkpoint's keys up with the model's (prefixes from DataParallel, torch.compile,
Lightning or a wrapping backbone; the `_orig_mod` / `module` part a submodule compiled or wrapped
on its own leaves inside keys; consistent renames of runs of key parts), then classifies what is left: a new
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
import re
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
from ckptview.readers.unpickler import DTENSOR

__all__ = ["Fix", "Diagnosis", "FixedStateDict", "diagnose", "doctor"]

# Wrappers that add a prefix to every key, most common first; used to break ties between prefixes
# that explain the keys equally well.
_KNOWN_PREFIXES = ("module.", "_orig_mod.", "model.", "backbone.", "encoder.", "net.", "network.")
_MAX_PREFIX_DEPTH = 3
_MAX_PREFIX_CANDIDATES = 16
_MAX_RENAME_CANDIDATES = 64
_MAX_RENAME_PARTS = 3
_RENAME_ROUNDS = 3
_MAX_RENAME_PAIRS = 200_000
_MAX_WRAPPER_CANDIDATES = 16
# The dotted part torch.compile (`_orig_mod`) and DataParallel/DDP (`module`) add where they wrap a module.
_WRAPPER_PARTS = ("_orig_mod", "module")
_WRAPPED = re.compile(r"\.(_orig_mod|module)\.")
_NBT = "num_batches_tracked"


@dataclass(frozen=True)
class Fix:
    """
    One proposed repair.

    Attributes:
        kind: `section`, `strip_prefix`, `add_prefix`, `drop_wrapper_parts`, `rename`, `tied_weights`,
            `num_batches_tracked`, `transpose`, `dequantize`, `drop_unexpected`, `head`, `missing`,
            `sharded_placeholders` or `dtensor_shards`.
        description: what is wrong, why, and what the code does.
        code: Python from `state_dict` to `state_dict`; for `sharded_placeholders` and `dtensor_shards`,
            the commands to consolidate the shards (it cannot be applied to this file).
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
        for propose in (_prefix_fix, _wrapper_fix, _rename_fix):
            fix = propose(current, target)
            if fix is not None:
                fixes.append(fix)
                current = _simulate(fix.code, current)
        shards = _dtensor_fix(entries, key_diff(current, target))
        fixes.extend([shards] if shards is not None else _leftover_fixes(current, target, module))
    applicable = [fix for fix in fixes if fix.applicable]
    leaves_missing = tuple(key for fix in applicable for key in fix.leaves_missing)
    code = _combine([fix.code for fix in applicable])
    if leaves_missing:
        code += (f"\n\n# then: model.load_state_dict(state_dict, strict=False) reports exactly these missing: "
                 f"{', '.join(compress_keys(leaves_missing))}")
    pending = {key: _Pending(*spec_of(value), entry=value) for key, value in entries.items()}
    values = _run(_combine([fix.code for fix in applicable if fix.kind != "section"]), pending)
    after = key_diff(values, target)
    sharded = any(not fix.applicable for fix in fixes)
    loads, load_error = (False, "the checkpoint holds one rank's shards of its tensors; consolidate them first") \
        if sharded else _try_load(module, values, leaves_missing)
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
    stripped = {strip: {key.removeprefix(strip): (key, spec) for key, spec in current.items()}
                for strip in _prefix_candidates(list(current))}
    modules = _module_paths(target)

    def score(strip: str, add: str) -> tuple[tuple[int, int, int], set[str]]:
        shaped = named = 0
        lined_up: set[str] = set()
        for bare, (key, spec) in stripped[strip].items():
            other = target.get(add + bare)
            # A key also lines up once _wrapper_fix has dropped its wrapper parts; without this a leading `module.`
            # would lose to stripping `module.encoder._orig_mod.` and adding `encoder.`, which misnames other keys.
            if (other is None or other[0] != spec[0]) and _WRAPPED.search(bare):
                other = target.get(add + _unwrapped(bare, modules, add)[0], other)
            if other is not None:
                named += 1
                if other[0] == spec[0]:
                    shaped += 1
                    lined_up.add(key)
        known = sum(p in _KNOWN_PREFIXES for p in (strip, add) if p)
        return (shaped, named, known - len(strip) - len(add)), lined_up

    baseline, loading = score("", "")
    best, best_score = ("", ""), baseline
    adds = _prefix_candidates(list(target))
    for strip in stripped:
        for add in adds:
            if strip == add or (not strip and not add):
                continue
            candidate, lined_up = score(strip, add)
            if not loading <= lined_up:
                continue  # a prefix is for all keys: one that moves keys away from where they load is a rename
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
    after = _loading(_simulate("\n".join(lines), current), target)
    description = "; ".join(steps) + f": {after} of {len(target)} model keys then match " \
                                     f"(before: {_loading(current, target)})"
    return Fix(kind, description[0].upper() + description[1:], "\n".join(lines),
               keys=tuple(key for key in current if key.startswith(strip)))


def _loading(specs: Mapping[str, Spec], target: dict[str, Spec]) -> int:
    return sum(key in target and target[key][0] == spec[0] for key, spec in specs.items())


def _landed(current: dict[str, Spec], code: str, target: dict[str, Spec], *, same_shape: bool,
            partial: bool = False) -> int | None:
    """
    How many keys load (same name and shape) once `code` has renamed them; None when a renamed key
    lands on no model key (or, with `same_shape`, on one of another shape), or two land on one.
    With `partial`, a key renamed to no model key is allowed: a later rename may place it.
    """
    renamed = _run(code, current)
    if len(renamed) != len(current):
        return None
    for (old, spec), new in zip(current.items(), renamed):  # the snippets rename in place, keeping the order
        if new == old or (partial and new not in target):
            continue
        if new not in target or (same_shape and target[new][0] != spec[0]):
            return None
    return _loading(renamed, target)


def _renamed(current: dict[str, Spec], code: str) -> list[tuple[str, str]]:
    return [(old, new) for old, new in zip(current, _run(code, current)) if old != new]


def _module_paths(target: Mapping[str, Spec]) -> set[str]:
    return {".".join(parts[:i]) for parts in (key.split(".") for key in target) for i in range(1, len(parts))}


def _unwrapped(key: str, modules: set[str], prefix: str = "") -> tuple[str, tuple[tuple[str, str], ...]]:
    """
    `key` without the wrapper parts inside it, and (module path, part) for each part dropped; `prefix`
    is what the model's names have before `key`. A part is kept where the model has a submodule of
    that name (a real `module`, or a child `module` of a compiled module: `block._orig_mod.module`).
    """
    parts = key.split(".")
    kept: list[str] = []
    dropped: list[tuple[str, str]] = []
    for part in parts[:-1]:
        path = ".".join(kept)
        # Leading wrapper parts wrap the whole model: that is a prefix, left to _prefix_fix.
        inside = any(p not in _WRAPPER_PARTS for p in kept)
        if part in _WRAPPER_PARTS and inside and f"{prefix}{path}.{part}" not in modules:
            dropped.append((path, part))
        else:
            kept.append(part)
    return ".".join(kept + parts[-1:]), tuple(dict.fromkeys(dropped))


def _unwrap_code(wrapped: set[tuple[str, str]]) -> str:
    parts: dict[str, list[str]] = {}
    for path, part in sorted(wrapped):
        parts.setdefault(path, []).append(part)
    return (f"# modules wrapped on their own when saved, and the key part the wrapper added inside their keys\n"
            f"# (torch.compile: _orig_mod, DataParallel/DDP: module)\n"
            f"wrapped = {parts!r}\n\n"
            "def unwrap(key):\n"
            "    parts = []\n"
            "    for part in key.split(\".\"):\n"
            "        if part not in wrapped.get(\".\".join(parts), ()):\n"
            "            parts.append(part)\n"
            "    return \".\".join(parts)\n\n"
            "state_dict = {unwrap(key): value for key, value in state_dict.items()}")


def _wrapper_fix(current: dict[str, Spec], target: dict[str, Spec]) -> Fix | None:
    # Keys that load never hold a part to drop (the model has a module of each of their names), so the code
    # cannot move them; a renamed key that lands nowhere or on another shape is left to the later fixes.
    modules = _module_paths(target)
    chains = Counter(sites for sites in (_unwrapped(key, modules)[1] for key in current) if sites)
    wrapped: set[tuple[str, str]] = set()
    before = best = _loading(current, target)
    for sites, _ in chains.most_common(_MAX_WRAPPER_CANDIDATES):
        trial = wrapped | set(sites)
        score = None if trial == wrapped else _landed(current, _unwrap_code(trial), target, same_shape=False,
                                                     partial=True)
        if score is not None and score > best:
            wrapped, best = trial, score
    if not wrapped:
        return None
    code = _unwrap_code(wrapped)
    changed = _renamed(current, code)
    dropped = {part for _, part in wrapped}
    how = " and ".join(f"{name} (key part {part!r})" for part, name in
                       (("_orig_mod", "torch.compile"), ("module", "DataParallel/DDP")) if part in dropped)
    names = sorted({path for path, _ in wrapped})
    one = len(names) == 1
    old, new = changed[0]
    return Fix(
        "drop_wrapper_parts",
        f"{', '.join(names)} {'was' if one else 'were'} wrapped on {'its' if one else 'their'} own by {how} "
        f"when saved: drop the wrapper's part from {len(changed)} checkpoint key(s) (e.g. {old} -> {new}); then {best} "
        f"of {len(target)} model keys match (before: {before})",
        code,
        keys=tuple(old for old, _ in changed),
    )


def _differing_run(parts: tuple[str, ...], other: tuple[str, ...]) -> tuple[int, int] | None:
    """
    Where `parts` differs from `other`: [i, j) after their common first and last parts, widened by a
    neighbour when parts were only inserted or removed. None when that run is two edits in one, each
    voted for by other pairs: it shares a part with the other run (`layers.0` -> `encoder.layers.1`)
    or changes an index beside a name (`h.0` -> `layers.1`): shapes cannot refute that when blocks are alike.
    """
    shortest = min(len(parts), len(other))
    start = 0
    while start < shortest and parts[start] == other[start]:
        start += 1
    end = 0
    while end < shortest - start and parts[-1 - end] == other[-1 - end]:
        end += 1
    old, new = parts[start:len(parts) - end], other[start:len(other) - end]
    if set(old) & set(new) or (old and new and len(old) + len(new) > 2 and any(p.isdigit() for p in old + new)):
        return None
    if start + end == shortest:  # a part inserted or removed: rename it together with a neighbour
        if end:
            end -= 1
        else:
            start -= 1
    return start, len(parts) - end


_Context = tuple[tuple[str, ...], tuple[str, ...]]


def _runs_by_context(keys: list[str]) -> dict[_Context, list[tuple[tuple[str, ...], int, int]]]:
    """Each key under the parts around each of its short runs (a key of several parts shares some, never none)."""
    contexts: dict[_Context, list[tuple[tuple[str, ...], int, int]]] = {}
    for key in keys:
        parts = tuple(key.split("."))
        for start in range(len(parts)):
            for end in range(start + 1, min(start + _MAX_RENAME_PARTS, len(parts)) + 1):
                if end - start < len(parts) or len(parts) == 1:
                    contexts.setdefault((parts[:start], parts[end:]), []).append((parts, start, end))
    return contexts


def _rename_votes(unexpected: list[str], missing: list[str]) -> Counter[tuple[str, str]]:
    # A checkpoint key and a model key that differ in one short run of parts vote for renaming it. Contexts are
    # compared smallest first: few keys sharing one single out the counterpart, while hundreds sharing only a leaf
    # like `weight` add noise and quadratic time, which the budget cuts off.
    ours, theirs = _runs_by_context(unexpected), _runs_by_context(missing)
    shared = sorted((context for context in ours if context in theirs), key=lambda c: len(ours[c]) * len(theirs[c]))
    votes: Counter[tuple[str, str]] = Counter()
    budget = _MAX_RENAME_PAIRS
    for context in shared:
        budget -= len(ours[context]) * len(theirs[context])
        if budget < 0:
            break
        for parts, start, end in ours[context]:
            for other, other_start, other_end in theirs[context]:
                if _differing_run(parts, other) == (start, end):
                    votes[(".".join(parts[start:end]), ".".join(other[other_start:other_end]))] += 1
    return votes


def _rename_code(rules: Mapping[str, str]) -> str:
    return (f"import re\n"
            f"renames = {dict(rules)!r}\n"
            "# whole dotted parts only, longest first: renaming 'fc' leaves 'xfc' and 'fc_out' alone\n"
            "alternatives = \"|\".join(map(re.escape, sorted(renames, key=len, reverse=True)))\n"
            "pattern = re.compile(rf\"(?<![^.])({alternatives})(?![^.])\")\n"
            "state_dict = {pattern.sub(lambda m: renames[m[1]], key): value for key, value in state_dict.items()}")


def _rename_score(current: dict[str, Spec], target: dict[str, Spec], rules: dict[str, str], *,
                  partial: bool = False) -> int | None:
    if not rules:
        return _loading(current, target)
    return _landed(current, _rename_code(rules), target, same_shape=True, partial=partial)


def _votes_after(current: dict[str, Spec], target: dict[str, Spec], rules: dict[str, str]) -> Counter[tuple[str, str]]:
    renamed = _run(_rename_code(rules), current) if rules else current
    return _rename_votes([key for key in renamed if key not in target], [key for key in target if key not in renamed])


def _more_renames(current: dict[str, Spec], target: dict[str, Spec], rules: dict[str, str],
                  votes: Counter[tuple[str, str]], *, partial: bool) -> dict[str, str]:
    """`rules` and the most voted renames that each make more keys load."""
    best = _rename_score(current, target, rules, partial=True)
    for (old, new), _ in votes.most_common(_MAX_RENAME_CANDIDATES):
        if old in rules:
            continue
        trial = {**rules, old: new}
        score = _rename_score(current, target, trial, partial=partial)
        if score is not None and score > best:
            rules, best = trial, score
    return rules


def _rename_fix(current: dict[str, Spec], target: dict[str, Spec]) -> Fix | None:
    if all(key in target for key in current) or all(key in current for key in target):
        return None
    votes = _votes_after(current, target, {})
    rules = _more_renames(current, target, {}, votes, partial=False)
    # A key may need two renames (h.0.attn.c_attn -> layers.0.attention.qkv, beyond one short run): rename in
    # rounds that may leave keys unplaced, and keep the result only if then every renamed key loads, one to one.
    staged = _more_renames(current, target, {}, votes, partial=True)
    for _ in range(_RENAME_ROUNDS - 1):
        if staged == rules:
            break
        more = _more_renames(current, target, staged, _votes_after(current, target, staged), partial=True)
        if more == staged:
            break
        staged = more
    if staged != rules and (_rename_score(current, target, staged) or 0) > (_rename_score(current, target, rules) or 0):
        rules = staged
    if not rules:
        return None
    code = _rename_code(rules)
    changed = tuple(old for old, _ in _renamed(current, code))
    pairs = ", ".join(f"{old} -> {new}" for old, new in rules.items())
    return Fix(
        "rename",
        f"rename key parts {pairs}: {len(changed)} checkpoint key(s) then match model keys of the same shape, one to one "
        "(an older version of the model or another implementation named them so)",
        code,
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


def _dtensor_fix(entries: Mapping[str, Any], diff: KeyDiff) -> Fix | None:
    """
    Shape mismatches in a file of DTensors (FSDP2, tensor parallel, saved with torch.save on each
    rank): the file holds one rank's part of each tensor, which no renaming or reshaping makes whole.
    """
    shards = {key: value.info.note for key, value in entries.items()
              if isinstance(value, TensorEntry) and value.info.subclass == DTENSOR}
    if not shards or not diff.shape_mismatches:
        return None
    example = next((m for m in diff.shape_mismatches if m.key in shards), diff.shape_mismatches[0])
    return Fix(
        "dtensor_shards",
        f"{len(shards)} of {len(entries)} tensors are DTensors, of which this file holds one rank's part (e.g. "
        f"{example.key}: {list(example.left)} here, {list(example.right)} in the model"
        + (f"; {shards[example.key]}" if example.key in shards else "") + "): it was saved with torch.save from "
        "an FSDP2 or tensor-parallel model. Load it into the model sharded the same way on the same number of "
        "ranks, or gather full tensors first: on every rank, get_model_state_dict with "
        "StateDictOptions(full_state_dict=True) and save rank 0's; or save with torch.distributed.checkpoint and "
        "convert with dcp_to_torch_save",
        "# on every rank, the model sharded as when it was saved:\n"
        "from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict\n"
        "state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))\n"
        "# rank 0 now holds full tensors: torch.save(state_dict, \"full.pt\")",
        keys=tuple(shards),
        applicable=False,
    )


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
