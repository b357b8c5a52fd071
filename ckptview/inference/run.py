"""
Running a model once, carefully: `eval()` + `torch.inference_mode()`, a first call with forward
hooks that name the layer a failure happened in, warm-up, timed repetitions (synchronising the
device), peak device memory, and the model's training flags and device restored afterwards.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from ckptview.errors import ForwardError, ModelBuildError
from ckptview.inference.devices import resolve_device, synchronize
from ckptview.inference.inputs import DEFAULT_SEED, InputSpec, given_input, make_input
from ckptview.inference.loading import LoadedModel, ModelSpec, WeightsReport, load_model, module_device
from ckptview.readers.model import Checkpoint

# progress(done, total, text): the UI's progress bar; it may raise to cancel.
Progress = Callable[[float, float, str], None]


@dataclass(frozen=True)
class OutputInfo:
    """One tensor of the model's output. `name` says where it sits: `output`, `output[0]`, `output['logits']`."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: str
    min: float | None
    max: float | None
    mean: float | None
    std: float | None
    nan_count: int
    inf_count: int

    @property
    def finite(self) -> bool:
        return self.nan_count == 0 and self.inf_count == 0


@dataclass(frozen=True)
class TopK:
    """The most likely classes of a classifier-shaped output (softmax over the last dimension)."""

    output: str
    position: str  # which row: "batch 0", or "batch 0, last position" for [batch, time, classes]
    classes: tuple[int, ...]
    probabilities: tuple[float, ...]


@dataclass(frozen=True)
class Timing:
    """Wall-clock times of the timed calls (after warm-up), in seconds."""

    warmup: int
    times_s: tuple[float, ...]

    @property
    def mean_ms(self) -> float:
        return 1e3 * statistics.fmean(self.times_s)

    @property
    def median_ms(self) -> float:
        return 1e3 * statistics.median(self.times_s)

    @property
    def min_ms(self) -> float:
        return 1e3 * min(self.times_s)

    @property
    def std_ms(self) -> float:
        return 1e3 * statistics.pstdev(self.times_s)


@dataclass(frozen=True)
class InferenceResult:
    """
    One run of a model.

    Attributes:
        device: where it ran.
        input: what it was fed.
        outputs: every tensor of the output, in order.
        top_k: top classes for classifier-shaped outputs (empty otherwise).
        timing: latency of the timed calls.
        peak_memory_bytes: peak device memory during the calls (CUDA only; None elsewhere).
        model_source: "module", "torchscript", "instance", "factory", or "given" (a ready model).
        weights: the load report when the checkpoint's state dict was loaded into a model.
        notes: how the model was built, when it matters.
        output: the model's output itself (tensors as the model returned them).
    """

    device: str
    input: InputSpec
    outputs: tuple[OutputInfo, ...]
    top_k: tuple[TopK, ...]
    timing: Timing
    peak_memory_bytes: int | None
    model_source: str = "given"
    weights: WeightsReport | None = None
    notes: tuple[str, ...] = ()
    output: Any = field(default=None, compare=False, repr=False)

    @property
    def finite(self) -> bool:
        """True when no output holds NaN or Inf."""
        return all(o.finite for o in self.outputs)

    def to_frame(self) -> Any:
        """One row per output tensor: name, shape, dtype, statistics, NaN/Inf counts."""
        import pandas as pd

        return pd.DataFrame([
            {"output": o.name, "shape": list(o.shape), "dtype": str(o.dtype).removeprefix("torch."),
             "min": o.min, "max": o.max, "mean": o.mean, "std": o.std, "nan": o.nan_count, "inf": o.inf_count}
            for o in self.outputs
        ])

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data (what `ckptview run --json` prints)."""
        return {
            "device": self.device,
            "model_source": self.model_source,
            "input": {"kind": self.input.kind, "shape": list(self.input.shape),
                      "dtype": str(self.input.dtype).removeprefix("torch."), "layer": self.input.layer,
                      "seed": self.input.seed},
            "outputs": [
                {"name": o.name, "shape": list(o.shape), "dtype": str(o.dtype).removeprefix("torch."),
                 "min": o.min, "max": o.max, "mean": o.mean, "std": o.std,
                 "nan_count": o.nan_count, "inf_count": o.inf_count}
                for o in self.outputs
            ],
            "finite": self.finite,
            "top_k": [{"output": t.output, "position": t.position, "classes": list(t.classes),
                       "probabilities": list(t.probabilities)} for t in self.top_k],
            "latency_ms": {"mean": self.timing.mean_ms, "median": self.timing.median_ms, "min": self.timing.min_ms,
                           "std": self.timing.std_ms, "repeats": len(self.timing.times_s), "warmup": self.timing.warmup},
            "peak_memory_bytes": self.peak_memory_bytes,
            "weights": None if self.weights is None else self.weights.to_dict(),
            "notes": list(self.notes),
        }


def timed_calls(first: Callable[[], Any], later: Callable[[str], Any], warmup: int, repeats: int,
                progress: Progress | None, synchronize_device: Callable[[], None] = lambda: None) -> tuple[Any, list[float]]:
    """
    One first call (its result is returned), `warmup` untimed calls, then `repeats` (at least 1)
    timed ones, reporting progress after each: how every runtime (torch, ONNX Runtime, LiteRT) is
    timed. `later(what)` names the call in its errors; `synchronize_device` waits for queued GPU work
    around each timed call.
    """
    total = 1 + max(0, warmup) + max(1, repeats)
    result = first()
    if progress:
        progress(1, total, "first call")
    for number in range(max(0, warmup)):
        later(f"warm-up call {number + 1}")
        if progress:
            progress(2 + number, total, "warm-up")
    times = []
    for number in range(max(1, repeats)):
        synchronize_device()
        start = time.perf_counter()
        later(f"timed call {number + 1}")
        synchronize_device()
        times.append(time.perf_counter() - start)
        if progress:
            progress(2 + max(0, warmup) + number, total, f"timed call {number + 1} of {max(1, repeats)}")
    return result, times


def run_model(
    model: nn.Module,
    input: Any = None,
    *,
    input_shape: Sequence[int] | None = None,
    device: str | torch.device | None = None,
    seed: int = DEFAULT_SEED,
    warmup: int = 1,
    repeats: int = 5,
    top_k: int = 5,
    progress: Progress | None = None,
) -> InferenceResult:
    """
    Run `model` on one input under `eval()` and `torch.inference_mode()`, timing it.

    The first call runs with forward hooks so a failure names its layer; the warm-up and timed
    calls run without them. Whatever happens, every submodule's training flag and the model's
    device are put back as they were.

    Args:
        model: an `nn.Module` or TorchScript module with its weights.
        input: a tensor, a list of tensors (positional arguments), or a list of numbers; None to
            synthesise one from the first layer (see `make_input`).
        input_shape: the shape of a synthesised input, e.g. (1, 3, 64, 64).
        device: where to run; None keeps the model where it is.
        seed: seed of a synthesised input.
        warmup: untimed calls after the first one (cuDNN autotuning, allocator warm-up).
        repeats: timed calls (at least 1).
        top_k: how many classes to list for classifier-shaped outputs.
        progress: called as progress(done, total, text) after each call.

    Returns:
        An `InferenceResult` (model_source "given", no load report).

    Raises:
        ForwardError: the forward raised; the message names the layer and the input shapes.
        ModelBuildError: no input was given and none can be inferred.

    Example:
        >>> result = run_model(torchvision.models.resnet18(), input_shape=(1, 3, 64, 64))
        >>> result.outputs[0].shape, result.top_k[0].classes[:3]
    """
    original_device = module_device(model)
    target = resolve_device(device) if device is not None else (original_device or torch.device("cpu"))
    training = [(module, module.training) for module in model.modules()]
    if input is None:
        tensor, spec = make_input(model, input_shape, seed=seed, device=target)
        args: tuple[Any, ...] = (tensor,)
    else:
        args, spec = given_input(input)
        args = tuple(a.to(target) for a in args)
    peak = None
    try:
        if original_device is not None and original_device != target:
            model.to(target)
        model.eval()
        if target.type == "cuda":
            torch.cuda.reset_peak_memory_stats(target)
        with torch.inference_mode():
            output, times = timed_calls(lambda: _first_call(model, args), lambda what: _later_call(model, args, what),
                                        warmup, repeats, progress, lambda: synchronize(target))
        if target.type == "cuda":
            peak = torch.cuda.max_memory_allocated(target)
    finally:
        # Flags are set back directly rather than through train(mode): a model may override
        # train() (e.g. to keep BatchNorm frozen), and what must come back is the exact state.
        for module, was_training in training:
            module.training = was_training
        if original_device is not None and original_device != target:
            model.to(original_device)
    outputs = tuple(_describe(name, tensor) for name, tensor in output_tensors(output))
    return InferenceResult(str(target), spec, outputs, _top_k(output, top_k), Timing(max(0, warmup), tuple(times)),
                           peak, output=output)


def run_inference(
    source: Checkpoint | str | os.PathLike[str] | nn.Module,
    model: ModelSpec | None = None,
    *,
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
) -> InferenceResult:
    """
    Build the model, load the checkpoint's weights, and run it once on the best device.

    Args:
        source: an opened `Checkpoint`, a path (opened with `trust`), or a ready `nn.Module`. An ONNX
            file runs in ONNX Runtime, a TFLite file in the LiteRT interpreter (inputs synthesised
            from the file's declared inputs; see `onnx_runtime.run_onnx`, `tflite_runtime.run_tflite`).
        model: how to get the model for a checkpoint (see `load_model`): None for the module the
            file holds (needs trust), an `nn.Module`, a callable, or "package.module:callable".
        model_kwargs: keyword arguments for a factory.
        trust: when `source` is a path, open it with trust (pickled modules, TorchScript).
        device: where to run; None picks the best available (see `available_devices`).
        input, input_shape, seed, warmup, repeats, top_k, progress: as for `run_model`.

    Returns:
        An `InferenceResult` with the load report in `weights`.

    Raises:
        UntrustedCodeError: the model is the file's own code and trust was not given.
        ModelBuildError: the model cannot be built or loaded; ForwardError when its forward fails.

    Example:
        >>> result = ckptview.run_inference("cnn.pt", "mypkg.models:SmallCNN", input_shape=(1, 3, 32, 32))
        >>> result.weights.missing, result.top_k[0].classes
    """
    with ExitStack() as stack:
        if isinstance(source, (str, os.PathLike)):
            from ckptview.readers import open_checkpoint

            source = stack.enter_context(open_checkpoint(source, trust=trust))
        if isinstance(source, Checkpoint) and source.format == "onnx" and model is None:
            # An ONNX file is its own model: ONNX Runtime runs it, no PyTorch model is built.
            from ckptview.inference.onnx_runtime import run_onnx

            return run_onnx(source, input=input, input_shape=input_shape, device=device, seed=seed, warmup=warmup,
                            repeats=repeats, top_k=top_k, progress=progress)
        if isinstance(source, Checkpoint) and source.format == "tflite" and model is None:
            from ckptview.inference.tflite_runtime import run_tflite

            return run_tflite(source, input=input, input_shape=input_shape, seed=seed, warmup=warmup,
                              repeats=repeats, top_k=top_k, progress=progress)
        with LoadedSource(source, model, model_kwargs, trust, device) as loaded:
            result = run_model(loaded.model, input, input_shape=input_shape, device=loaded.device, seed=seed,
                               warmup=warmup, repeats=repeats, top_k=top_k, progress=progress)
    return with_origin(result, loaded)


# Formats whose files are their own model, run by their runtime rather than loaded into PyTorch.
_RUNTIME_FORMATS = {"onnx": "ONNX", "tflite": "TFLite"}


class LoadedSource:
    """Context manager: open the source (when given a path) and load its model; closes what it opened."""

    def __init__(self, source: Any, model: ModelSpec | None, model_kwargs: Mapping[str, Any] | None,
                 trust: bool, device: str | torch.device | None) -> None:
        self._stack = ExitStack()
        self._args = (source, model, model_kwargs, trust, device)

    def __enter__(self) -> LoadedModel:
        source, model, model_kwargs, trust, device = self._args
        if isinstance(source, nn.Module):
            if model is not None or model_kwargs:
                raise ModelBuildError(None, "the source is already a model; model= and model_kwargs= are for "
                                            "building one to load a checkpoint into")
            target = resolve_device(device)
            return LoadedModel(source, "given", target, None)
        checkpoint = source
        if not isinstance(source, Checkpoint):
            from ckptview.readers import open_checkpoint

            checkpoint = self._stack.enter_context(open_checkpoint(source, trust=trust))
        if model is None and checkpoint.format in _RUNTIME_FORMATS:
            self._stack.close()
            raise ModelBuildError(checkpoint.path, f"this {_RUNTIME_FORMATS[checkpoint.format]} file is its own model, "
                                                   "run by its runtime (run_inference, `ckptview run` without "
                                                   "--precisions); precisions, export checks and checkpoint comparisons "
                                                   "need a PyTorch model: give one (model=, --model) to load these "
                                                   "weights into")
        try:
            return load_model(checkpoint, model, model_kwargs=model_kwargs, device=device)
        except BaseException:
            self._stack.close()
            raise

    def __exit__(self, *exc_info: object) -> None:
        self._stack.close()


def with_origin(result: InferenceResult, loaded: LoadedModel) -> InferenceResult:
    """The result of running `loaded.model`, with where the model came from and its load report."""
    return replace(result, model_source=loaded.source, weights=loaded.weights, notes=loaded.notes)


# --- the first call, with hooks ------------------------------------------------------------------

def _first_call(model: nn.Module, args: tuple[Any, ...]) -> Any:
    """Call the model once; on failure name the innermost module that was running."""
    running: list[str] = []
    handles = []
    if not isinstance(model, torch.jit.ScriptModule):  # TorchScript runs in C++: Python hooks are refused
        for name, module in model.named_modules():
            label = f"{name or '<root>'} ({type(module).__name__})"
            handles.append(module.register_forward_pre_hook(lambda _m, _a, label=label: running.append(label)))
            handles.append(module.register_forward_hook(lambda _m, _a, _o: _drop_last(running)))
    try:
        return model(*args)
    except Exception as exc:  # any error from user code becomes a ForwardError naming the layer
        shapes = _shapes(args)
        if isinstance(model, torch.jit.ScriptModule):
            layer = None
            where = "in the TorchScript module (its traceback below names the code)"
        else:
            layer = running[-1] if running else None
            where = f"in layer {layer}" if layer else "before any layer ran (in the model's own forward code)"
        message = str(exc).strip()
        raise ForwardError(None, f"forward failed {where} with input shape {_shape_text(shapes)}: "
                                 f"{type(exc).__name__}: {message}", layer=layer, input_shapes=shapes) from exc
    finally:
        for handle in handles:
            handle.remove()


def _later_call(model: nn.Module, args: tuple[Any, ...], what: str) -> None:
    """A call after the hooked first one; modules may take other code paths once unhooked (fast paths)."""
    try:
        model(*args)
    except Exception as exc:  # user code: anything may be raised
        shapes = _shapes(args)
        raise ForwardError(None, f"the first call worked but {what} failed (without the layer-tracking hooks, "
                                 f"which some modules' fast paths skip) with input shape {_shape_text(shapes)}: "
                                 f"{type(exc).__name__}: {str(exc).strip()}", layer=None, input_shapes=shapes) from exc


def _shapes(args: tuple[Any, ...]) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))


def _shape_text(shapes: tuple[tuple[int, ...], ...]) -> str:
    return ", ".join("[" + ", ".join(map(str, s)) + "]" for s in shapes)


def _drop_last(running: list[str]) -> None:
    # A forward hook's return value replaces the module's output, so this must return None.
    running.pop()


# --- describing outputs --------------------------------------------------------------------------

def output_tensors(output: Any, name: str = "output") -> list[tuple[str, torch.Tensor]]:
    """Every tensor in the output with its place: tensors, tuples/lists, dicts (and ModelOutput-style mappings)."""
    if isinstance(output, torch.Tensor):
        return [(name, output)]
    if isinstance(output, Mapping):
        return [pair for key, value in output.items() for pair in output_tensors(value, f"{name}[{key!r}]")]
    if isinstance(output, (list, tuple)):
        return [pair for index, value in enumerate(output) for pair in output_tensors(value, f"{name}[{index}]")]
    return []


def _describe(name: str, tensor: torch.Tensor) -> OutputInfo:
    nan = inf = 0
    low = high = mean = std = None
    if tensor.numel() and not tensor.is_complex() and tensor.dtype != torch.bool:
        values = tensor.detach().double()
        if tensor.is_floating_point():
            nan = int(torch.isnan(values).sum())
            inf = int(torch.isinf(values).sum())
            finite = values[torch.isfinite(values)]
        else:
            finite = values.reshape(-1)
        if finite.numel():
            low, high = float(finite.min()), float(finite.max())
            mean = float(finite.mean())
            std = float(finite.std(unbiased=False))
    return OutputInfo(name, tuple(tensor.shape), tensor.dtype, str(tensor.device), low, high, mean, std, nan, inf)


def classifier_logits(output: Any) -> tuple[str, torch.Tensor, str] | None:
    """
    The first classifier-shaped output: [batch, classes] (row 0), or [batch, time, classes]
    (row 0, last position, as a language model's next-token logits). None when there is none.
    """
    for name, tensor in output_tensors(output):
        if not tensor.is_floating_point() or tensor.shape[-1:] in ((), (1,)) or tensor.shape[0:1] == (0,):
            continue
        if tensor.dim() == 2:
            return name, tensor, "batch 0"
        if tensor.dim() == 3 and tensor.shape[1] > 0:
            return name, tensor, "batch 0, last position"
    return None


def _top_k(output: Any, k: int) -> tuple[TopK, ...]:
    found = classifier_logits(output)
    if found is None or k <= 0:
        return ()
    name, tensor, position = found
    row = tensor[0] if tensor.dim() == 2 else tensor[0, -1]
    probabilities = torch.softmax(row.detach().float(), dim=-1)
    values, indices = probabilities.topk(min(k, row.shape[-1]))
    probs = tuple(float(v) for v in values)
    if any(math.isnan(p) for p in probs):
        return ()  # NaN logits have no ranking; the NaN count in `outputs` says so
    return (TopK(name, position, tuple(int(i) for i in indices), probs),)
