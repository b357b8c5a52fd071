"""
What a user checks before deploying: the same model in fp32, fp16, bf16 and dynamic int8 on one
input — latency, model size and how far each output moves from fp32 — and two checkpoints of
one model on the same input.
"""

from __future__ import annotations

import copy
import enum
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ckptview.errors import CkptviewError
from ckptview.inference.inputs import DEFAULT_SEED, InputSpec, given_input, make_input
from ckptview.inference.loading import ModelSpec, WeightsReport, module_device
from ckptview.inference.run import (
    InferenceResult,
    Progress,
    LoadedSource,
    output_tensors,
    with_origin,
    classifier_logits,
    run_model,
)
from ckptview.readers.model import Checkpoint


class Precision(str, enum.Enum):
    """A numeric format to run the model in. `Precision("fp16")`; a typo raises ValueError listing the valid ones."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"  # dynamic quantization of Linear layers (weights int8, activations quantized per call), CPU

    @classmethod
    def _missing_(cls, value: object) -> Precision:
        raise ValueError(f"{value!r} is not a precision; use one of {', '.join(p.value for p in cls)}")

    @property
    def dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.float32}[self.value]


ALL_PRECISIONS = tuple(Precision)


@dataclass(frozen=True)
class Deviation:
    """
    How far one output is from a reference, over every floating tensor of the output.

    Attributes:
        max_abs: largest absolute difference.
        mean_abs: mean absolute difference.
        cosine: cosine similarity of the flattened outputs (1.0 = same direction).
        top1_agreement: fraction of rows whose argmax class agrees, for classifier-shaped outputs
            (None otherwise).
    """

    max_abs: float
    mean_abs: float
    cosine: float
    top1_agreement: float | None


@dataclass(frozen=True)
class PrecisionRow:
    """
    One precision of a comparison.

    Attributes:
        precision: which one.
        device: where it ran (int8 always on the CPU).
        status: "ok", or why it did not run ("unsupported: ...", "failed: ...").
        size_bytes: bytes of the model's parameters and buffers in that precision.
        result: the run (None when it did not run).
        deviation: distance of its output from the fp32 output (None for fp32 itself or when
            either did not run).
    """

    precision: Precision
    device: str
    status: str
    size_bytes: int | None
    result: InferenceResult | None
    deviation: Deviation | None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass(frozen=True)
class PrecisionComparison:
    """fp32 vs lower precisions of one model on one input; `to_frame()` gives the table."""

    rows: tuple[PrecisionRow, ...]
    input: InputSpec
    weights: WeightsReport | None = None
    notes: tuple[str, ...] = ()

    def row(self, precision: str | Precision) -> PrecisionRow:
        wanted = Precision(precision)
        for row in self.rows:
            if row.precision == wanted:
                return row
        raise KeyError(f"{wanted.value} was not compared; compared: {', '.join(r.precision.value for r in self.rows)}")

    def table(self) -> list[dict[str, Any]]:
        """One dict per precision: the table's rows as plain data (what `--json` prints)."""
        rows = []
        for row in self.rows:
            timing = row.result.timing if row.result is not None else None
            deviation = row.deviation
            rows.append({
                "precision": row.precision.value,
                "device": row.device,
                "status": row.status,
                "latency_ms": timing.median_ms if timing else None,
                "latency_min_ms": timing.min_ms if timing else None,
                "size_bytes": row.size_bytes,
                "peak_memory_bytes": row.result.peak_memory_bytes if row.result is not None else None,
                "max_abs_diff": deviation.max_abs if deviation else None,
                "mean_abs_diff": deviation.mean_abs if deviation else None,
                "cosine": deviation.cosine if deviation else None,
                "top1_agreement": deviation.top1_agreement if deviation else None,
                "finite": row.result.finite if row.result is not None else None,
            })
        return rows

    def to_frame(self) -> Any:
        """The comparison as a DataFrame, one row per precision."""
        import pandas as pd

        return pd.DataFrame(self.table()).set_index("precision")


def compare_precisions(
    source: Checkpoint | str | os.PathLike[str] | nn.Module,
    model: ModelSpec | None = None,
    *,
    precisions: Sequence[str | Precision] = ALL_PRECISIONS,
    model_kwargs: Mapping[str, Any] | None = None,
    trust: bool = False,
    device: str | torch.device | None = None,
    input: Any = None,
    input_shape: Sequence[int] | None = None,
    seed: int = DEFAULT_SEED,
    warmup: int = 1,
    repeats: int = 5,
    top_k: int = 5,
    progress: Progress | None = None,
) -> PrecisionComparison:
    """
    Run the model in several precisions on the same input and compare with fp32.

    fp16 and bf16 run a converted copy on `device`; a precision the device cannot run is a row
    with status "unsupported: ..." rather than an error. int8 is dynamic quantization of the
    Linear layers (`torch.ao.quantization.quantize_dynamic`), which runs on the CPU only.
    fp32 always runs first, as the reference.

    Args:
        source, model, model_kwargs, trust, device: as for `run_inference`.
        precisions: any of "fp32", "fp16", "bf16", "int8".
        input, input_shape, seed, warmup, repeats, top_k, progress: as for `run_model`. A float
            input is cast to each precision's dtype.

    Returns:
        A `PrecisionComparison`; `to_frame()` has latency, size and deviation per precision.

    Raises:
        ValueError: an unknown precision name.
        UntrustedCodeError, ModelBuildError, ForwardError: as for `run_inference`, for the fp32 run.

    Example:
        >>> table = ckptview.compare_precisions("cnn.pt", "mypkg:SmallCNN").to_frame()
        >>> table[["latency_ms", "size_bytes", "cosine"]]
    """
    wanted = [Precision(p) for p in precisions]
    ordered = [Precision.FP32] + [p for p in dict.fromkeys(wanted) if p != Precision.FP32]
    with LoadedSource(source, model, model_kwargs, trust, device) as loaded:
        base = loaded.model
        if input is None:
            tensor, spec = make_input(base, input_shape, seed=seed, device="cpu")
            args: tuple[Any, ...] = (tensor,)
        else:
            args, spec = given_input(input)
        rows: list[PrecisionRow] = []
        reference: InferenceResult | None = None
        for number, precision in enumerate(ordered):
            step = _step_progress(progress, number, len(ordered), precision)
            row = _run_precision(base, precision, loaded.device, args, spec, warmup, repeats, top_k, step, reference)
            if precision == Precision.FP32:
                if row.result is None:
                    raise CkptviewError(None, f"the fp32 reference run did not work: {row.status}")
                reference = with_origin(row.result, loaded)
                row = PrecisionRow(row.precision, row.device, row.status, row.size_bytes, reference, None)
            if precision in wanted:
                rows.append(row)
    return PrecisionComparison(tuple(rows), spec, loaded.weights, loaded.notes)


def _step_progress(progress: Progress | None, number: int, count: int, precision: Precision) -> Progress | None:
    if progress is None:
        return None
    return lambda done, total, text: progress(number + done / max(total, 1), count, f"{precision.value}: {text}")


def _run_precision(model: nn.Module, precision: Precision, device: torch.device, args: tuple[Any, ...],
                   spec: InputSpec, warmup: int, repeats: int, top_k: int, progress: Progress | None,
                   reference: InferenceResult | None) -> PrecisionRow:
    run_device = torch.device("cpu") if precision == Precision.INT8 else device
    unsupported = _unsupported(model, precision, run_device)
    if unsupported:
        return PrecisionRow(precision, str(run_device), f"unsupported: {unsupported}", None, None, None)
    try:
        variant = _variant(model, precision, run_device)
    except (RuntimeError, TypeError) as exc:
        return PrecisionRow(precision, str(run_device), f"unsupported: {_first_line(exc)}", None, None, None)
    cast = tuple(_cast_input(a, precision.dtype, run_device) for a in args)
    size = _size_bytes(variant)
    copied = variant is not model
    try:
        with _fastpath_off() if precision == Precision.INT8 else nullcontext():
            result = run_model(variant, list(cast) if len(cast) > 1 else cast[0], device=run_device,
                               warmup=warmup, repeats=repeats, top_k=top_k, progress=progress)
    except CkptviewError as exc:
        if precision == Precision.FP32:
            raise
        return PrecisionRow(precision, str(run_device), f"failed: {_first_line(exc)}", size, None, None)
    finally:
        del variant  # the converted copy goes before the next precision is built
        if copied:
            _free(run_device)
    deviation = None if reference is None else deviation_between(reference.output, result.output)
    # run_model saw a given tensor; the spec says where it came from (and its dtype in this precision).
    result = replace(result, input=replace(spec, dtype=cast[0].dtype if isinstance(cast[0], torch.Tensor) else spec.dtype))
    return PrecisionRow(precision, str(run_device), "ok", size, result, deviation)


@contextmanager
def _fastpath_off() -> Iterator[None]:
    """
    Turn off the fused transformer/MHA fast path for the int8 run: its eligibility check reads
    `linear.weight` as a tensor, which a dynamically quantized Linear has as a method, and it
    cannot use quantized weights anyway. The flag is process-wide, so it is put back at once.
    """
    mha = torch.backends.mha
    before = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(before)


def _unsupported(model: nn.Module, precision: Precision, device: torch.device) -> str | None:
    if precision == Precision.BF16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return f"{torch.cuda.get_device_name(device)} has no bf16 support"
    if precision == Precision.INT8:
        if isinstance(model, torch.jit.ScriptModule):
            return "dynamic quantization needs the Python module, not TorchScript"
        if not any(isinstance(m, nn.Linear) for m in model.modules()):
            return "the model has no Linear layer to quantize"
        if "qnnpack" not in torch.backends.quantized.supported_engines and \
                "fbgemm" not in torch.backends.quantized.supported_engines:
            return "this torch build has no quantized CPU engine (fbgemm/qnnpack)"
    return None


def _variant(model: nn.Module, precision: Precision, device: torch.device) -> nn.Module:
    """The model in `precision` on `device`; a copy, except fp32 when the model already is fp32 there."""
    if precision == Precision.FP32 and module_device(model) == device and _float_dtypes(model) <= {torch.float32}:
        return model
    if precision == Precision.INT8:
        source = copy.deepcopy(model).to(device="cpu", dtype=torch.float32)
        with warnings.catch_warnings():
            # torch>=2.10 warns that eager-mode quantization moves to torchao; it still works and
            # is the one dynamic-int8 path that needs no extra package.
            warnings.simplefilter("ignore")
            return torch.ao.quantization.quantize_dynamic(source, {nn.Linear}, dtype=torch.qint8)
    return copy.deepcopy(model).to(device=device, dtype=precision.dtype)


def _float_dtypes(model: nn.Module) -> set[torch.dtype]:
    return {t.dtype for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()}


def _cast_input(value: Any, dtype: torch.dtype, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
    return value


def _size_bytes(model: nn.Module) -> int:
    """Bytes of everything in the state dict, including quantized packed weights (nested in tuples)."""
    seen: set[int] = set()

    def size(value: Any) -> int:
        if isinstance(value, torch.Tensor):
            if id(value) in seen:
                return 0
            seen.add(id(value))
            return value.nelement() * value.element_size()
        if isinstance(value, (list, tuple)):
            return sum(size(v) for v in value)
        return 0

    return sum(size(v) for v in model.state_dict().values())


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def deviation_between(reference: Any, other: Any) -> Deviation:
    """
    How far `other` is from `reference` (two outputs of the same structure), in float64 on the CPU.

    Raises:
        CkptviewError: the outputs hold different tensors (names or shapes differ).
    """
    left = output_tensors(reference)
    right = output_tensors(other)
    if [(n, tuple(t.shape)) for n, t in left] != [(n, tuple(t.shape)) for n, t in right]:
        raise CkptviewError(None, "the two outputs differ in structure or shape; cannot compare them: "
                                  f"{[(n, list(t.shape)) for n, t in left]} vs {[(n, list(t.shape)) for n, t in right]}")
    pairs = [(a, b) for (_, a), (_, b) in zip(left, right) if a.is_floating_point() or b.is_floating_point()]
    if not pairs:
        pairs = list(zip((t for _, t in left), (t for _, t in right)))
    a = torch.cat([x.detach().reshape(-1).double().cpu() for x, _ in pairs]) if pairs else torch.zeros(0)
    b = torch.cat([y.detach().reshape(-1).double().cpu() for _, y in pairs]) if pairs else torch.zeros(0)
    difference = (a - b).abs()
    max_abs = float(difference.max()) if difference.numel() else 0.0
    mean_abs = float(difference.mean()) if difference.numel() else 0.0
    cosine = float(torch.nn.functional.cosine_similarity(a, b, dim=0)) if a.numel() else 1.0
    return Deviation(max_abs, mean_abs, cosine, _top1_agreement(reference, other))


def _top1_agreement(reference: Any, other: Any) -> float | None:
    found_a, found_b = classifier_logits(reference), classifier_logits(other)
    if found_a is None or found_b is None:
        return None
    a, b = found_a[1], found_b[1]
    return float((a.argmax(-1).cpu() == b.argmax(-1).cpu()).double().mean())


@dataclass(frozen=True)
class CheckpointComparison:
    """
    Two checkpoints of one model run on the same input.

    Attributes:
        left, right: the two runs (with their load reports).
        deviation: distance of the right output from the left one over all floating outputs.
        per_output: (output name, Deviation) for each floating tensor of the output.
    """

    left: InferenceResult
    right: InferenceResult
    deviation: Deviation
    per_output: tuple[tuple[str, Deviation], ...]

    def to_frame(self) -> Any:
        """One row per output tensor: max/mean abs difference and cosine between the two checkpoints."""
        import pandas as pd

        return pd.DataFrame([
            {"output": name, "max_abs_diff": d.max_abs, "mean_abs_diff": d.mean_abs, "cosine": d.cosine,
             "top1_agreement": d.top1_agreement}
            for name, d in self.per_output
        ]).set_index("output")


def compare_checkpoints(
    left: Checkpoint | str | os.PathLike[str],
    right: Checkpoint | str | os.PathLike[str],
    model: ModelSpec | None = None,
    *,
    model_kwargs: Mapping[str, Any] | None = None,
    trust: bool = False,
    device: str | torch.device | None = None,
    input: Any = None,
    input_shape: Sequence[int] | None = None,
    seed: int = DEFAULT_SEED,
    warmup: int = 0,
    repeats: int = 1,
) -> CheckpointComparison:
    """
    Run two checkpoints of the same model on the same input and measure how their outputs differ
    (before/after a fix, two epochs, a conversion). The models are loaded one after the other, so
    only one is in memory at a time.

    Args:
        left, right: checkpoints (opened, or paths opened with `trust`).
        model, model_kwargs, trust, device: as for `run_inference`, used for both.
        input, input_shape, seed: the input; when synthesised it comes from the left model and is
            fed unchanged to the right one.
        warmup, repeats: timing of each run (the default times one call).

    Returns:
        A `CheckpointComparison`.

    Example:
        >>> diff = ckptview.compare_checkpoints("epoch10.pt", "epoch20.pt", "mypkg:Net")
        >>> diff.deviation.cosine, diff.deviation.top1_agreement
    """
    with LoadedSource(left, model, model_kwargs, trust, device) as loaded:
        if input is None:
            tensor, _ = make_input(loaded.model, input_shape, seed=seed, device="cpu")
            input = tensor
        left_result = with_origin(run_model(loaded.model, input, device=loaded.device, warmup=warmup,
                                            repeats=repeats), loaded)
        left_output = _to_cpu(left_result.output)
        left_result = replace(left_result, output=left_output)
    with LoadedSource(right, model, model_kwargs, trust, device) as loaded:
        right_result = with_origin(run_model(loaded.model, input, device=loaded.device, warmup=warmup,
                                             repeats=repeats), loaded)
    per_output = tuple(
        (name, deviation_between(a, b))
        for (name, a), (_, b) in zip(output_tensors(left_output), output_tensors(right_result.output))
        if a.is_floating_point() and tuple(a.shape) == tuple(b.shape)
    )
    return CheckpointComparison(left_result, right_result, deviation_between(left_output, right_result.output),
                                per_output)


def _to_cpu(output: Any) -> Any:
    """The output with every tensor on the CPU, so the device memory can go before the next model loads."""
    if isinstance(output, torch.Tensor):
        return output.cpu()
    if isinstance(output, Mapping):
        return {key: _to_cpu(value) for key, value in output.items()}
    if isinstance(output, (list, tuple)):
        return type(output)(_to_cpu(v) for v in output) if not hasattr(output, "_fields") else \
            type(output)(*(_to_cpu(v) for v in output))
    return output
