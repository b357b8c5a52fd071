"""
Will it deploy? Export the model to ONNX, TorchScript by tracing and TorchScript by scripting,
and run each export against eager PyTorch on inputs chosen to take other paths than the example
one: another batch size, the sign flipped, scaled, another sequence length for token inputs.

A trace records the operations one input went through, so a branch on values (`if x.sum() > 0`)
is frozen: the traced module answers every input as the example would have. The probes are what
catches it; the example input alone always matches. Pure: no pandas at import time.
"""

from __future__ import annotations

import contextlib
import enum
import io
import linecache
import logging
import os
import re
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ckptview.errors import CkptviewError, ModelBuildError
from ckptview.inference.devices import synchronize
from ckptview.inference.inputs import DEFAULT_SEED, InputSpec, given_input, make_input
from ckptview.inference.loading import ModelSpec, WeightsReport, module_device
from ckptview.inference.precision import deviation_between
from ckptview.inference.run import LoadedSource, Progress, output_tensors
from ckptview.readers.model import Checkpoint

__all__ = ["Target", "ALL_TARGETS", "Probe", "ExportWarning", "TargetResult", "ExportCheck", "export_check"]


class Target(str, enum.Enum):
    """A way to export. `Target("onnx")`; a typo raises ValueError listing the valid ones."""

    ONNX = "onnx"
    TRACE = "trace"
    SCRIPT = "script"

    @classmethod
    def _missing_(cls, value: object) -> Target:
        raise ValueError(f"{value!r} is not an export target; use one of {', '.join(t.value for t in cls)}")


ALL_TARGETS = tuple(Target)

# Deprecation warnings raised inside torch, the standard library or ckptview (the exporters' own
# use of old APIs, the legacy exporter's notice) say nothing about the user's model; warnings
# pointing at the user's code (TracerWarning, a deprecated call in their forward) are kept.
_LIBRARY_DIRS = tuple(os.path.dirname(path) + os.sep for path in (torch.__file__, os.__file__, os.path.dirname(__file__)))
_PROTOBUF_LIMIT = 3 * 2**29  # 1.5 GiB of weights, leaving room for the graph under protobuf's 2 GiB
_NOISY_LOGGERS = ("torch.onnx", "torch.export", "torch._export", "torch._dynamo", "torch.fx", "onnxscript")


@dataclass(frozen=True)
class Probe:
    """
    One input run through the eager model and the export.

    Attributes:
        input: what the input is: "example", "batch 3", "sign flipped", "scaled ×10", "sequence length 4".
        shapes: the shapes of the input tensors.
        max_abs_diff: largest |eager - export| over every floating output.
        max_rel_diff: max_abs_diff over the largest |eager| value.
        cosine: cosine similarity of the flattened outputs.
        top1_agreement: share of rows whose argmax class agrees (classifier outputs; else None).
        ok: within the check's tolerance.
        error: why the export could not run this input (None when it ran).
    """

    input: str
    shapes: tuple[tuple[int, ...], ...]
    max_abs_diff: float | None
    max_rel_diff: float | None
    cosine: float | None
    top1_agreement: float | None
    ok: bool
    error: str | None = None


@dataclass(frozen=True)
class ExportWarning:
    """A warning the exporter raised: its category, first line, and the source line it points at."""

    category: str
    message: str
    location: str
    code: str

    def describe(self) -> str:
        code = f" `{self.code}`" if self.code else ""
        return f"{self.category} at {self.location}{code}: {self.message}"


@dataclass(frozen=True)
class TargetResult:
    """
    One export target.

    Attributes:
        target: "onnx", "trace" or "script".
        status: "ok" (every probe within tolerance), "diverges" (a probe differs or fails to run),
            or "failed" (the export itself failed; `message` says why).
        tool: what exported and ran it, e.g. "torch.onnx.export (dynamo) → ONNX Runtime 1.32 (CPUExecutionProvider)".
        probes: one per input compared.
        latency_ms: median latency of the export on the example input.
        eager_latency_ms: median latency of eager PyTorch on the same input and device.
        file_size: bytes of the exported file(s).
        file: where the export was saved (None when written to a temporary folder, since removed).
        warnings: what the exporter warned about (TracerWarnings with their source line).
        message: the failure, or the pitfall a divergence shows, in words; "" when all is well.
        location: "file.py:LINE" of the code the failure points at (scripting errors), else None.
    """

    target: str
    status: str
    tool: str
    probes: tuple[Probe, ...] = ()
    latency_ms: float | None = None
    eager_latency_ms: float | None = None
    file_size: int | None = None
    file: str | None = None
    warnings: tuple[ExportWarning, ...] = ()
    message: str = ""
    location: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def diverging(self) -> tuple[Probe, ...]:
        """The probes whose outputs differ beyond tolerance or that did not run."""
        return tuple(p for p in self.probes if not p.ok)

    @property
    def max_abs_diff(self) -> float | None:
        values = [p.max_abs_diff for p in self.probes if p.max_abs_diff is not None]
        return max(values) if values else None

    @property
    def max_rel_diff(self) -> float | None:
        values = [p.max_rel_diff for p in self.probes if p.max_rel_diff is not None]
        return max(values) if values else None

    @property
    def cosine(self) -> float | None:
        values = [p.cosine for p in self.probes if p.cosine is not None]
        return min(values) if values else None

    @property
    def top1_agreement(self) -> float | None:
        values = [p.top1_agreement for p in self.probes if p.top1_agreement is not None]
        return min(values) if values else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target, "status": self.status, "ok": self.ok, "tool": self.tool,
            "max_abs_diff": self.max_abs_diff, "max_rel_diff": self.max_rel_diff, "cosine": self.cosine,
            "top1_agreement": self.top1_agreement, "latency_ms": self.latency_ms,
            "eager_latency_ms": self.eager_latency_ms, "file_size": self.file_size, "file": self.file,
            "message": self.message, "location": self.location,
            "probes": [{"input": p.input, "shapes": [list(s) for s in p.shapes], "max_abs_diff": p.max_abs_diff,
                        "max_rel_diff": p.max_rel_diff, "cosine": p.cosine, "top1_agreement": p.top1_agreement,
                        "ok": p.ok, "error": p.error} for p in self.probes],
            "warnings": [{"category": w.category, "message": w.message, "location": w.location, "code": w.code}
                         for w in self.warnings],
        }


@dataclass(frozen=True)
class ExportCheck:
    """
    `export_check`: every target's result, and what they were checked on.

    Attributes:
        results: one `TargetResult` per target, in the order asked.
        input: the example input.
        device: where eager PyTorch (and the TorchScript exports) ran.
        atol, rtol: the tolerance: a probe matches when max |diff| <= atol + rtol * max |eager|.
        folder: where the exports were saved (None: a temporary folder, removed afterwards).
        weights: the load report when a checkpoint's state dict was loaded into a model.
        seconds: wall time of the whole check.
    """

    results: tuple[TargetResult, ...]
    input: InputSpec
    device: str
    atol: float
    rtol: float
    folder: str | None = None
    weights: WeightsReport | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """True when every target exported and matched eager on every probe."""
        return all(r.ok for r in self.results)

    def target(self, name: str | Target) -> TargetResult:
        wanted = Target(name).value
        for result in self.results:
            if result.target == wanted:
                return result
        raise KeyError(f"{wanted} was not checked; checked: {', '.join(r.target for r in self.results)}")

    def to_frame(self) -> Any:
        """One row per target: status, the worst differences over the probes, latency, file size, message."""
        import pandas as pd

        return pd.DataFrame([
            {"target": r.target, "status": r.status, "ok": r.ok, "tool": r.tool, "max_abs_diff": r.max_abs_diff,
             "max_rel_diff": r.max_rel_diff, "cosine": r.cosine, "top1_agreement": r.top1_agreement,
             "latency_ms": r.latency_ms, "eager_latency_ms": r.eager_latency_ms, "file_size": r.file_size,
             "probes": len(r.probes), "diverging": ", ".join(p.input for p in r.diverging),
             "warnings": len(r.warnings), "message": r.message}
            for r in self.results
        ])

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data (what `ckptview export-check --json` prints)."""
        return {
            "ok": self.ok, "device": self.device, "atol": self.atol, "rtol": self.rtol, "folder": self.folder,
            "seconds": self.seconds,
            "input": {"kind": self.input.kind, "shape": list(self.input.shape),
                      "dtype": str(self.input.dtype).removeprefix("torch."), "seed": self.input.seed},
            "weights": None if self.weights is None else self.weights.to_dict(),
            "targets": [r.to_dict() for r in self.results],
        }


def export_check(
    source: Checkpoint | str | os.PathLike[str] | nn.Module,
    model: ModelSpec | None = None,
    *,
    input: Any = None,
    input_shape: Sequence[int] | None = None,
    targets: Sequence[str | Target] = ALL_TARGETS,
    device: str | torch.device | None = None,
    save_to: str | os.PathLike[str] | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    trust: bool = False,
    atol: float = 1e-4,
    rtol: float = 1e-4,
    repeats: int = 5,
    seed: int = DEFAULT_SEED,
    progress: Progress | None = None,
) -> ExportCheck:
    """
    Export the model to ONNX and TorchScript (trace and script) and check each export gives eager
    PyTorch's answers, on the example input and on inputs that take other paths.

    - onnx: `torch.onnx.export` with a dynamic batch axis, and sequence axis for token ids (the dynamo
      exporter; the TorchScript-based one when the dynamo one fails or this torch has no other, and
      `tool` says which), `onnx.checker`, then ONNX Runtime (the CUDA provider when `device` is CUDA
      and ORT has it, else the CPU).
    - trace: `torch.jit.trace` on the example input; a probe that diverges is the tracing pitfall
      (control flow frozen at trace time), reported with the input that shows it and the tracer's warnings.
    - script: `torch.jit.script`; a model that cannot be compiled gets the compiler's message and line.

    The probes: the example, another batch size, the example with its sign flipped and scaled ×10
    (float inputs), and another sequence length (token inputs, whose sequence axis the ONNX export
    makes dynamic too when torch.export allows it). The model's training flags, device and
    `requires_grad` flags are put back afterwards, whatever happens.

    Args:
        source: a `Checkpoint`, a path (opened with `trust`), or a ready `nn.Module`.
        model: how to build the model for a checkpoint (see `load_model`).
        input: the example input (a tensor or a list of tensors); None to synthesise one.
        input_shape: the shape of a synthesised example input, e.g. (1, 3, 224, 224).
        targets: which of "onnx", "trace", "script" to check.
        device: where eager PyTorch runs; None picks the best available.
        save_to: a folder that does not exist yet, to keep the exported files in (model.onnx,
            model.traced.pt, model.scripted.pt); None exports to a temporary folder removed afterwards.
        model_kwargs, trust: as for `run_inference`.
        atol, rtol: a probe matches when max |diff| <= atol + rtol * max |eager output|.
        repeats: timed calls for each latency (median reported).
        seed: seed of synthesised inputs.
        progress: called as progress(done, total, text) after each target.

    Returns:
        An `ExportCheck`; `.ok` is True when every target matched.

    Raises:
        CkptviewError: `save_to` exists already (nothing is written), a target name is unknown, or the
            model cannot be built or run eagerly (ModelBuildError, ForwardError).

    Example:
        >>> check = ckptview.export_check("cnn.pt", "mypkg.models:SmallCNN", input_shape=(1, 3, 32, 32))
        >>> check.to_frame()[["target", "status", "max_abs_diff", "latency_ms"]]
    """
    started = time.perf_counter()
    try:
        wanted = list(dict.fromkeys(Target(t) for t in targets))
    except ValueError as exc:
        raise CkptviewError(None, str(exc)) from None
    if not wanted:
        raise CkptviewError(None, f"no export target given; use some of {', '.join(t.value for t in Target)}")
    folder = _new_folder(save_to)
    with LoadedSource(source, model, model_kwargs, trust, device) as loaded, _restored(loaded.model):
        net, target_device = loaded.model, loaded.device
        net.to(target_device)
        net.eval()
        if input is None:
            tensor, spec = make_input(net, input_shape, seed=seed, device=target_device)
            example: tuple[Any, ...] = (tensor,)
        else:
            example, spec = given_input(input)
            example = tuple(a.to(target_device) for a in example)
        probes = _probe_inputs(example, spec, seed)
        with torch.no_grad():
            eager = {label: _flat(_call(net, args, f"eager PyTorch on the {label} input")) for label, args in probes}
            eager_ms = _median_ms(lambda: net(*example), repeats, target_device)
        workdir = folder or tempfile.mkdtemp(prefix="ckptview-export-")
        checks = {Target.ONNX: _check_onnx, Target.TRACE: _check_trace, Target.SCRIPT: _check_script}
        context = _Context(net, example, probes, eager, target_device, workdir, folder is not None, atol, rtol,
                           repeats)
        results = []
        try:
            for number, target in enumerate(wanted):
                if progress:
                    progress(number, len(wanted), f"exporting: {target.value}")
                result = checks[target](context)
                results.append(_with_eager_latency(result, eager_ms))
            if progress:
                progress(len(wanted), len(wanted), "done")
        finally:
            if folder is None:
                shutil.rmtree(workdir, ignore_errors=True)
    return ExportCheck(tuple(results), spec, str(target_device), atol, rtol, folder, loaded.weights,
                       time.perf_counter() - started)


# --- the setting every target shares -------------------------------------------------------------

@dataclass
class _Context:
    model: nn.Module
    example: tuple[Any, ...]
    probes: list[tuple[str, tuple[Any, ...]]]
    eager: dict[str, list[torch.Tensor]]
    device: torch.device
    folder: str
    keep: bool
    atol: float
    rtol: float
    repeats: int

    def compare(self, label: str, outputs: list[torch.Tensor]) -> Probe:
        args = dict(self.probes)[label]
        reference = self.eager[label]
        shapes = _shapes(args)
        if [tuple(t.shape) for t in reference] != [tuple(t.shape) for t in outputs]:
            return Probe(label, shapes, None, None, None, None, False,
                         f"the export returns shapes {[list(t.shape) for t in outputs]}, eager "
                         f"{[list(t.shape) for t in reference]}")
        deviation = deviation_between([t.cpu() for t in reference], [t.cpu() for t in outputs])
        scale = max((float(t.detach().abs().max()) for t in reference if t.numel() and t.is_floating_point()),
                    default=0.0)
        relative = deviation.max_abs / scale if scale > 0 else (0.0 if deviation.max_abs == 0 else float("inf"))
        ok = deviation.max_abs <= self.atol + self.rtol * scale
        return Probe(label, shapes, deviation.max_abs, relative, deviation.cosine, deviation.top1_agreement, ok)

    def failed_probe(self, label: str, exc: BaseException) -> Probe:
        return Probe(label, _shapes(dict(self.probes)[label]), None, None, None, None, False, _one_line(exc))


def _probe_inputs(example: tuple[Any, ...], spec: InputSpec, seed: int) -> list[tuple[str, tuple[Any, ...]]]:
    """The example and the inputs chosen to take other paths through the model."""
    probes = [("example", example)]
    tensors = [a for a in example if isinstance(a, torch.Tensor)]
    if not tensors or any(t.dim() == 0 for t in tensors):
        return probes
    batch = tensors[0].shape[0]
    other = batch + 2 if batch == 1 else batch + 1
    generator = torch.Generator().manual_seed(seed + 1)
    probes.append((f"batch {other}", tuple(_like(a, other, None, generator) for a in example)))
    if all(t.is_floating_point() for t in tensors):
        probes.append(("sign flipped", tuple(-a for a in example)))
        probes.append(("scaled ×10", tuple(10 * a for a in example)))
    elif spec.kind == "tokens" or all(not t.is_floating_point() and t.dim() == 2 for t in tensors):
        length = tensors[0].shape[1]
        shorter = length // 2 if length > 1 else 2
        probes.append((f"sequence length {shorter}", tuple(_like(a, batch, shorter, generator) for a in example)))
    return probes


def _like(value: Any, batch: int, length: int | None, generator: torch.Generator) -> Any:
    """A fresh tensor of `value`'s kind with another batch size (and sequence length): the same value range."""
    if not isinstance(value, torch.Tensor):
        return value
    shape = (batch, *value.shape[1:]) if length is None else (batch, length, *value.shape[2:])
    if value.is_floating_point():
        fresh = torch.randn(shape, generator=generator, dtype=torch.float32)
        spread = float(value.float().std()) if value.numel() > 1 else 1.0
        return (fresh * (spread or 1.0) + float(value.float().mean())).to(value.dtype).to(value.device)
    low, high = int(value.min()), int(value.max()) + 1
    return torch.randint(low, max(high, low + 1), shape, generator=generator, dtype=value.dtype).to(value.device)


# --- onnx ----------------------------------------------------------------------------------------

def _check_onnx(ctx: _Context) -> TargetResult:
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        return TargetResult("onnx", "failed", "torch.onnx.export → ONNX Runtime",
                            message=f"needs the {exc.name} package: pip install 'ckptview[deploy]' "
                                    "(onnx, onnxruntime, onnxscript)")
    path = os.path.join(ctx.folder, "model.onnx")
    # torch.export specialises a size-1 dimension to 1, so the export sees a batch of at least 2.
    export_args = ctx.example
    if _shapes(ctx.example) and _shapes(ctx.example)[0][:1] == (1,):
        export_args = next(args for label, args in ctx.probes if label.startswith("batch "))
    outputs = len(ctx.eager["example"])
    exporter, caught, error, dynamic_sequence = _export_onnx(ctx.model, export_args, path, outputs)
    found_warnings = _kept(caught)
    if error is not None:
        return TargetResult("onnx", "failed", "torch.onnx.export", warnings=found_warnings,
                            message=f"torch.onnx.export failed: {error}")
    try:
        onnx.checker.check_model(path, full_check=True)
    except Exception as exc:  # the checker's own ValidationError and protobuf errors alike
        return TargetResult("onnx", "failed", exporter, warnings=found_warnings, file_size=_onnx_size(path),
                            message=f"onnx.checker rejects the export: {_one_line(exc)}")
    providers = ["CPUExecutionProvider"]
    if ctx.device.type == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 4  # errors come back as exceptions and are reported per probe
    try:
        session = onnxruntime.InferenceSession(path, options, providers=providers)
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
        return TargetResult("onnx", "failed", exporter, warnings=found_warnings, file_size=_onnx_size(path),
                            message=f"ONNX Runtime cannot load the export: {_one_line(exc)}")
    tool = f"{exporter} → ONNX Runtime {onnxruntime.__version__} ({session.get_providers()[0]})"
    names = [i.name for i in session.get_inputs()]

    def run(args: tuple[Any, ...]) -> list[torch.Tensor]:
        feeds = dict(zip(names, (a.detach().cpu().numpy() for a in args if isinstance(a, torch.Tensor))))
        return [torch.from_numpy(value) for value in session.run(None, feeds)]

    probes = []
    for label, args in ctx.probes:
        if label.startswith("sequence length") and not dynamic_sequence:
            continue  # only the batch axis is dynamic in this export
        try:
            probes.append(ctx.compare(label, run(args)))
        except Exception as exc:  # ORT's shape errors: this input does not run in the export
            probes.append(ctx.failed_probe(label, exc))
    latency = _median_ms(lambda: run(ctx.example), ctx.repeats, torch.device("cpu")) \
        if any(p.input == "example" and p.error is None for p in probes) else None
    status = "ok" if all(p.ok for p in probes) else "diverges"
    message = "" if status == "ok" else _onnx_pitfall(probes, exporter)
    return TargetResult("onnx", status, tool, tuple(probes), latency, None, _onnx_size(path),
                        path if ctx.keep else None, found_warnings, message)


def _export_onnx(model: nn.Module, args: tuple[Any, ...], path: str,
                 outputs: int) -> tuple[str, list[warnings.WarningMessage], str | None, bool]:
    """
    Export with the dynamo exporter, else the TorchScript-based one: (exporter used, warnings,
    error, whether the sequence axis of token inputs is dynamic too). The batch axis is always
    dynamic; token ids' sequence axis is made dynamic as well, and dropped if torch.export refuses it.
    """
    caught: list[warnings.WarningMessage] = []
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    tokens = all(not t.is_floating_point() and t.dim() >= 2 and t.shape[1] > 1 for t in tensors) and bool(tensors)
    dynamo_error = None
    if _has_dynamo_exporter():
        batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
        for with_sequence in ((True, False) if tokens else (False,)):
            axes = {0: batch, 1: sequence} if with_sequence else {0: batch}
            dynamic = tuple(axes if isinstance(a, torch.Tensor) and a.dim() else None for a in args)
            try:
                with _quiet(caught, stderr=True):
                    # verbose=False: the dynamo exporter otherwise prints its progress to stdout
                    torch.onnx.export(model, args, path, dynamo=True, dynamic_shapes=dynamic, verbose=False,
                                      external_data=_needs_external_data(model))
            except Exception as exc:  # torch.export raises many kinds (guards on data, unsupported ops)
                dynamo_error = dynamo_error or _export_error(exc)
                continue
            used = "torch.onnx.export (dynamo" + (", dynamic batch and sequence)" if with_sequence else ")")
            return used, caught, None, with_sequence
    input_names = [f"input_{i}" for i in range(len(tensors))]
    output_names = [f"output_{i}" for i in range(outputs)]
    axes_of = {name: {0: "batch", 1: "sequence"} if tokens else {0: "batch"} for name in input_names}
    try:
        with _quiet(caught):
            torch.onnx.export(model, args, path, dynamo=False, verbose=False, input_names=input_names,
                              output_names=output_names,
                              dynamic_axes={**axes_of, **{name: {0: "batch"} for name in output_names}})
    except Exception as exc:  # the legacy exporter fails in as many ways as torch.export
        error = _export_error(exc)
        return "torch.onnx.export (TorchScript-based)", caught, (
            f"{error}; the dynamo exporter failed first: {dynamo_error}" if dynamo_error else error), False
    used = "torch.onnx.export (TorchScript-based)"
    if dynamo_error:
        used += f"; the dynamo exporter failed: {dynamo_error}"
    return used, caught, None, tokens


def _needs_external_data(model: nn.Module) -> bool:
    # protobuf caps a message at 2 GiB: larger weights go to model.onnx.data beside the graph
    size = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    return size > _PROTOBUF_LIMIT


def _has_dynamo_exporter() -> bool:
    import inspect

    # torch >= 2.5 takes dynamo=; older ones have only the TorchScript-based exporter.
    return "dynamo" in inspect.signature(torch.onnx.export).parameters and _module_available("onnxscript")


def _module_available(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _onnx_size(path: str) -> int | None:
    if not os.path.exists(path):
        return None
    data = path + ".data"
    return os.path.getsize(path) + (os.path.getsize(data) if os.path.exists(data) else 0)


def _onnx_pitfall(probes: list[Probe], exporter: str) -> str:
    bad = [p for p in probes if not p.ok]
    shown = "; ".join(f"{p.input}: {p.error}" if p.error else f"{p.input}: max |diff| {p.max_abs_diff:.3g}" for p in bad)
    text = f"the ONNX export differs from eager PyTorch on {shown}."
    if "TorchScript-based" in exporter:
        text += (" The TorchScript-based exporter traces the model, so control flow on values or shapes is "
                 "frozen at export time, as with torch.jit.trace.")
    return text


# --- trace ---------------------------------------------------------------------------------------

def _check_trace(ctx: _Context) -> TargetResult:
    caught: list[warnings.WarningMessage] = []
    try:
        with _quiet(caught), torch.no_grad():
            traced = torch.jit.trace(ctx.model, ctx.example, check_trace=False, strict=False)
    except Exception as exc:  # the tracer raises RuntimeError and friends on unsupported outputs
        return TargetResult("trace", "failed", "torch.jit.trace", warnings=_kept(caught),
                            message=f"torch.jit.trace failed: {_one_line(exc)}")
    found = _kept(caught)
    probes = _torchscript_probes(ctx, traced)
    size, file = _save_script(ctx, traced, "model.traced.pt")
    latency = _median_ms(lambda: traced(*ctx.example), ctx.repeats, ctx.device)
    status = "ok" if all(p.ok for p in probes) else "diverges"
    message = "" if status == "ok" else _trace_pitfall(probes, found)
    return TargetResult("trace", status, "torch.jit.trace", tuple(probes), latency, None, size, file, found, message)


def _trace_pitfall(probes: list[Probe], found: tuple[ExportWarning, ...]) -> str:
    bad = [p for p in probes if not p.ok]
    shown = ", ".join(f"{p.input} ({p.error})" if p.error else f"{p.input} (max |diff| {p.max_abs_diff:.3g})"
                      for p in bad)
    text = (f"the traced model differs from eager PyTorch on {shown}: torch.jit.trace records the operations the "
            "example input went through, so a branch or loop that depends on the input's values or shape is frozen "
            "as the example took it. Script the model (torch.jit.script) or export it with torch.export / the "
            "dynamo ONNX exporter, which keep or refuse such control flow.")
    tracer = [w for w in found if w.category == "TracerWarning"]
    if tracer:
        text += " The tracer warned at " + "; ".join(f"{w.location} `{w.code}`" if w.code else w.location
                                                      for w in tracer[:3]) + "."
    return text


# --- script --------------------------------------------------------------------------------------

def _check_script(ctx: _Context) -> TargetResult:
    caught: list[warnings.WarningMessage] = []
    try:
        with _quiet(caught):
            scripted = torch.jit.script(ctx.model)
    except Exception as exc:  # FrontendError, NotSupportedError, RuntimeError from the compiler
        message, location = _compiler_message(exc)
        return TargetResult("script", "failed", "torch.jit.script", warnings=_kept(caught),
                            message=f"torch.jit.script cannot compile the model: {message}", location=location)
    probes = _torchscript_probes(ctx, scripted)
    size, file = _save_script(ctx, scripted, "model.scripted.pt")
    latency = _median_ms(lambda: scripted(*ctx.example), ctx.repeats, ctx.device)
    status = "ok" if all(p.ok for p in probes) else "diverges"
    bad = ", ".join(p.input for p in probes if not p.ok)
    message = "" if status == "ok" else f"the scripted model differs from eager PyTorch on {bad}"
    return TargetResult("script", status, "torch.jit.script", tuple(probes), latency, None, size, file,
                        _kept(caught), message)


_FILE_LINE = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+)')


def _compiler_message(exc: BaseException) -> tuple[str, str | None]:
    """The TorchScript compiler's message in one line, with the first source line it points at."""
    text = str(exc)
    headline = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__).rstrip(":")
    found = _FILE_LINE.search(text)
    if found is None:
        return headline, None
    location = f"{found['file']}:{found['line']}"
    code = linecache.getline(found["file"], int(found["line"])).strip()
    return f"{headline} at {location}" + (f" `{code}`" if code else ""), location


# --- shared by trace and script ------------------------------------------------------------------

def _torchscript_probes(ctx: _Context, module: torch.jit.ScriptModule) -> list[Probe]:
    probes = []
    for label, args in ctx.probes:
        try:
            with torch.no_grad():
                probes.append(ctx.compare(label, _flat(module(*args))))
        except Exception as exc:  # a frozen shape in the trace fails on another batch size
            probes.append(ctx.failed_probe(label, exc))
    return probes


def _save_script(ctx: _Context, module: torch.jit.ScriptModule, name: str) -> tuple[int | None, str | None]:
    path = os.path.join(ctx.folder, name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch >= 2.10 deprecates torch.jit.save
            torch.jit.save(module, path)
    except Exception:  # a module that runs but does not serialise: the size is unknown, the check stands
        return None, None
    return os.path.getsize(path), path if ctx.keep else None


def _call(model: nn.Module, args: tuple[Any, ...], what: str) -> Any:
    try:
        return model(*args)
    except Exception as exc:  # the user's forward: anything may be raised
        raise ModelBuildError(None, f"{what} failed: {_one_line(exc)}") from exc


def _flat(output: Any) -> list[torch.Tensor]:
    return [tensor.detach() for _, tensor in output_tensors(output)]


def _median_ms(call: Callable[[], Any], repeats: int, device: torch.device) -> float:
    times = []
    with torch.no_grad():
        # TorchScript's profiling executor profiles the first calls and optimises the graph on the
        # third; eager and ORT need one call to allocate. Three untimed calls cover both.
        for _ in range(3):
            call()
        for _ in range(max(1, repeats)):
            synchronize(device)
            start = time.perf_counter()
            call()
            synchronize(device)
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _with_eager_latency(result: TargetResult, eager_ms: float) -> TargetResult:
    return replace(result, eager_latency_ms=eager_ms) if result.probes else result


def _shapes(args: tuple[Any, ...]) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))


def _one_line(exc: BaseException) -> str:
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _export_error(exc: BaseException) -> str:
    """The root cause of an exporter's failure: torch.onnx wraps torch.export's error in a long report."""
    cause = exc
    while cause.__cause__ is not None:
        cause = cause.__cause__
    return _one_line(cause)


def _kept(caught: list[warnings.WarningMessage]) -> tuple[ExportWarning, ...]:
    kept: dict[tuple[str, str], ExportWarning] = {}
    for item in caught:
        category = item.category.__name__
        if issubclass(item.category, (DeprecationWarning, FutureWarning)) and item.filename.startswith(_LIBRARY_DIRS):
            continue
        message = next((line.strip() for line in str(item.message).splitlines() if line.strip()), "")
        location = f"{item.filename}:{item.lineno}"
        code = linecache.getline(item.filename, item.lineno).strip()
        kept.setdefault((location, message), ExportWarning(category, message, location, code))
    return tuple(kept.values())


@contextlib.contextmanager
def _quiet(caught: list[warnings.WarningMessage], *, stderr: bool = False) -> Iterator[None]:
    """
    Record warnings and keep the exporters' log lines off the user's screen. `stderr=True` also
    swallows what is printed to stderr: torch.export prints the partial graph there when it fails
    (torch 2.13), and the failure is reported in one line instead. Redirecting stderr is process-wide,
    so it is done only around that one call.
    """
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR + 10)
    try:
        with warnings.catch_warnings(record=True) as recorded, \
                (contextlib.redirect_stderr(io.StringIO()) if stderr else contextlib.nullcontext()):
            warnings.simplefilter("always")
            try:
                yield
            finally:
                caught.extend(recorded)
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


@contextlib.contextmanager
def _restored(model: nn.Module) -> Iterator[None]:
    """Put back every submodule's training flag, the model's device and each parameter's requires_grad."""
    training = [(module, module.training) for module in model.modules()]
    grads = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    device = module_device(model)
    try:
        yield
    finally:
        # Set directly rather than through train(mode): a model may override train() (frozen BatchNorm).
        for module, was_training in training:
            module.training = was_training
        if device is not None and module_device(model) != device:
            model.to(device)
        for parameter, flag in grads:
            parameter.requires_grad_(flag)


def _new_folder(save_to: str | os.PathLike[str] | None) -> str | None:
    if save_to is None:
        return None
    folder = os.fspath(save_to)
    if os.path.exists(folder):
        raise CkptviewError(folder, "already exists: export_check saves into a new folder and never overwrites; "
                                    "name a folder that does not exist yet")
    try:
        os.makedirs(folder)
    except OSError as exc:
        raise CkptviewError(folder, f"cannot create the folder: {exc.strerror or exc}") from exc
    return folder
