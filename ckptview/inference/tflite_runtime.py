"""
Running a TFLite file itself in the LiteRT interpreter (`ai-edge-litert`, TensorFlow Lite's
runtime without TensorFlow): inputs synthesised from the interpreter's input details (dynamic
dimensions → 1), quantized inputs fed as the file's own int8/uint8 (float values quantized with
the input's scale and zero point), quantized outputs dequantized, described as a PyTorch model's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ckptview.errors import ForwardError, ModelBuildError
from ckptview.inference.inputs import DEFAULT_SEED, InputSpec, given_input
from ckptview.inference.run import InferenceResult, Progress, Timing, _describe, _top_k, output_tensors, timed_calls
from ckptview.readers.model import Checkpoint

__all__ = ["run_tflite"]

_INSTALL = "pip install ai-edge-litert (or pip install 'ckptview[tflite]'; wheels for Linux and macOS)"


def run_tflite(
    checkpoint: Checkpoint,
    *,
    input: Any = None,
    input_shape: Sequence[int] | None = None,
    seed: int = DEFAULT_SEED,
    warmup: int = 1,
    repeats: int = 5,
    top_k: int = 5,
    progress: Progress | None = None,
) -> InferenceResult:
    """
    Run a TFLite file once in the LiteRT interpreter (CPU), timed, and describe its outputs.

    Args:
        checkpoint: an opened TFLite checkpoint.
        input: a tensor or a list of tensors (one per model input, float values: quantized inputs
            are quantized here); None to synthesise seeded normal values.
        input_shape: the shape of the first input (the interpreter resizes it); None keeps the
            file's shape with dynamic dimensions as 1.
        seed, warmup, repeats, top_k, progress: as for `run_model`.

    Returns:
        An `InferenceResult` with model_source "litert"; outputs of a quantized model are
        dequantized with their scale and zero point, and `notes` say so and name the runtime.

    Raises:
        ModelBuildError: ai-edge-litert is not installed, or the interpreter cannot load the file.
        ForwardError: the interpreter refused the input.
    """
    try:
        from ai_edge_litert import interpreter as litert
    except ImportError as exc:
        raise ModelBuildError(checkpoint.path, f"running a TFLite file needs the LiteRT interpreter: {_INSTALL}") from exc
    try:
        interpreter = litert.Interpreter(model_path=checkpoint.path)
        details = interpreter.get_input_details()
        if input_shape is not None and details:
            interpreter.resize_tensor_input(details[0]["index"], [int(d) for d in input_shape])
        interpreter.allocate_tensors()
    except (ValueError, RuntimeError) as exc:
        raise ModelBuildError(checkpoint.path, f"the LiteRT interpreter cannot load the model: {_one_line(exc)}") from exc
    details = interpreter.get_input_details()
    if input is None:
        generator = torch.Generator().manual_seed(seed)
        values = [torch.randn(tuple(int(d) for d in item["shape"]), generator=generator) for item in details]
        first = values[0]
        spec = InputSpec("features" if first.dim() == 2 else "image", tuple(first.shape), torch.float32,
                         f"graph input {details[0]['name']}", seed=seed)
    else:
        args, spec = given_input(input)
        values = list(args)
    if len(values) != len(details):
        raise ModelBuildError(checkpoint.path, f"the model takes {len(details)} input(s), {len(values)} given")
    notes = []
    for item, value in zip(details, values):
        array = _quantize(value.detach().cpu().numpy(), item)
        if array.dtype != value.detach().cpu().numpy().dtype:
            notes.append(f"input {item['name']} quantized to {array.dtype} (scale {item['quantization'][0]:g}, "
                         f"zero point {item['quantization'][1]})")
        interpreter.set_tensor(item["index"], array)
    shapes = tuple(tuple(v.shape) for v in values)

    def call(what: str) -> None:
        try:
            interpreter.invoke()
        except (ValueError, RuntimeError) as exc:
            raise ForwardError(checkpoint.path, f"the LiteRT interpreter failed on {what} with input shape "
                                                f"{', '.join(str(list(s)) for s in shapes)}: {_one_line(exc)}",
                               layer=None, input_shapes=shapes) from exc

    _, times = timed_calls(lambda: call("the first call"), call, warmup, repeats, progress)
    output = {}
    for item in interpreter.get_output_details():
        raw = interpreter.get_tensor(item["index"])
        scale, zero_point = item["quantization"]
        if scale and raw.dtype.kind in "iu":
            notes.append(f"output {item['name']} dequantized from {raw.dtype} (scale {scale:g}, zero point {zero_point})")
            raw = (raw.astype(np.float32) - zero_point) * np.float32(scale)
        output[item["name"]] = torch.from_numpy(np.array(raw))
    import ai_edge_litert

    version = getattr(ai_edge_litert, "__version__", "")
    notes.insert(0, f"ran in the LiteRT interpreter{' ' + version if version else ''} (ai-edge-litert, CPU)")
    outputs = tuple(_describe(name, tensor) for name, tensor in output_tensors(output))
    return InferenceResult("cpu", spec, outputs, _top_k(output, top_k), Timing(max(0, warmup), tuple(times)), None,
                           model_source="litert", notes=tuple(notes), output=output)


def _quantize(values: np.ndarray, item: dict[str, Any]) -> np.ndarray:
    """Float values as the input's dtype: quantized with its scale and zero point when it has them."""
    dtype = np.dtype(item["dtype"])
    scale, zero_point = item["quantization"]
    if dtype.kind in "iu" and values.dtype.kind == "f" and scale:
        info = np.iinfo(dtype)
        return np.clip(np.round(values / scale + zero_point), info.min, info.max).astype(dtype)
    return values.astype(dtype)


def _one_line(exc: BaseException) -> str:
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
