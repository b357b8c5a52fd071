"""
Running an ONNX file itself in ONNX Runtime: inputs synthesised from the graph's declared inputs
(symbolic dimensions → 1 unless a shape is given), outputs described as a PyTorch model's are
(`InferenceResult`), so `run_inference("model.onnx")` and `ckptview run model.onnx` read the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ckptview.errors import ForwardError, ModelBuildError
from ckptview.inference.devices import resolve_device
from ckptview.inference.inputs import DEFAULT_SEED, InputSpec, given_input
from ckptview.inference.run import InferenceResult, Progress, Timing, _describe, _top_k, output_tensors, timed_calls
from ckptview.readers.dtypes import torch_dtype
from ckptview.readers.model import Checkpoint
from ckptview.readers.onnx_file import ONNX_DTYPES, ONNX_TYPE_NAMES

__all__ = ["run_onnx", "onnx_inputs"]

_TORCH_DTYPES = {name: torch_dtype(ONNX_DTYPES[code]) for code, name in ONNX_TYPE_NAMES.items()
                 if code in ONNX_DTYPES and hasattr(torch, ONNX_DTYPES[code])}
_INSTALL = "pip install onnxruntime (or pip install 'ckptview[deploy]')"


def onnx_inputs(checkpoint: Checkpoint, input_shape: Sequence[int] | None = None, *,
                seed: int = DEFAULT_SEED) -> tuple[dict[str, torch.Tensor], InputSpec]:
    """
    Seeded inputs for every declared input of an ONNX graph, and the spec of the first one.

    Symbolic or unknown dimensions become 1; `input_shape` replaces the first input's shape.
    Float inputs are drawn from a normal distribution; integer inputs (token ids) below the
    smallest Embedding table the graph gathers from (2 when it has none); booleans are True.

    Raises:
        ModelBuildError: the graph declares no input, or one of a type that cannot be synthesised.
    """
    declared = checkpoint.details.get("inputs") or []
    if not declared:
        raise ModelBuildError(checkpoint.path, "the ONNX graph declares no input to feed")
    generator = torch.Generator().manual_seed(seed)
    vocab = min((entry.shape[0] for entry in checkpoint.tensors()
                 if checkpoint.layers.get(entry.name) is not None and checkpoint.layers[entry.name].kind == "Embedding"
                 and entry.shape), default=2)
    feeds: dict[str, torch.Tensor] = {}
    spec = None
    for number, item in enumerate(declared):
        dtype = _TORCH_DTYPES.get(item["dtype"])
        if dtype is None:
            raise ModelBuildError(checkpoint.path, f"graph input {item['name']!r} is of type {item['dtype'] or '?'}, "
                                                   "which ckptview cannot synthesise; pass input= a tensor per input")
        shape = tuple(d if isinstance(d, int) and d > 0 else 1 for d in (item["shape"] or []))
        if number == 0 and input_shape is not None:
            shape = tuple(int(d) for d in input_shape)
            if not shape or any(d <= 0 for d in shape):
                raise ModelBuildError(None, f"input shape {list(shape)} must be non-empty with positive sizes")
        if dtype.is_floating_point:
            tensor = torch.randn(shape, generator=generator).to(dtype)
            kind = "features" if len(shape) == 2 else "image" if len(shape) == 4 else "signal"
        elif dtype == torch.bool:
            tensor, kind = torch.ones(shape, dtype=torch.bool), "mask"
        else:
            tensor, kind = torch.randint(0, vocab, shape, generator=generator).to(dtype), "tokens"
        feeds[item["name"]] = tensor
        if spec is None:
            spec = InputSpec(kind, shape, dtype, f"graph input {item['name']}", high=vocab if kind == "tokens" else None,
                             seed=seed)
    assert spec is not None
    return feeds, spec


def run_onnx(
    checkpoint: Checkpoint,
    *,
    input: Any = None,
    input_shape: Sequence[int] | None = None,
    device: str | torch.device | None = None,
    seed: int = DEFAULT_SEED,
    warmup: int = 1,
    repeats: int = 5,
    top_k: int = 5,
    progress: Progress | None = None,
) -> InferenceResult:
    """
    Run an ONNX file in ONNX Runtime once, timed, and describe its outputs as `run_model` does.

    Args:
        checkpoint: an opened ONNX checkpoint.
        input: a tensor, a list of tensors (one per graph input, in order) or a dict name -> tensor;
            None to synthesise them from the graph (see `onnx_inputs`).
        input_shape: the shape of the first synthesised input.
        device: a CUDA device uses ORT's CUDA provider when this onnxruntime has it; else the CPU.
        seed, warmup, repeats, top_k, progress: as for `run_model`.

    Returns:
        An `InferenceResult` with model_source "onnxruntime" and the runtime and provider in `notes`.

    Raises:
        ModelBuildError: onnxruntime is not installed, or cannot load the file.
        ForwardError: ONNX Runtime refused to run the input (wrong shape or type).
    """
    try:
        import onnxruntime
    except ImportError as exc:
        raise ModelBuildError(checkpoint.path, f"running an ONNX file needs ONNX Runtime: {_INSTALL}") from exc
    target = resolve_device(device) if device is not None else torch.device("cpu")
    providers = ["CPUExecutionProvider"]
    if target.type == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 4  # failures come back as exceptions, reported in our words
    try:
        session = onnxruntime.InferenceSession(checkpoint.path, options, providers=providers)
    except Exception as exc:  # ORT's own InvalidGraph / Fail / NotImplemented types
        raise ModelBuildError(checkpoint.path, f"ONNX Runtime cannot load the model: {_one_line(exc)}") from exc
    provider = session.get_providers()[0]
    names = [i.name for i in session.get_inputs()]
    if input is None:
        feeds, spec = onnx_inputs(checkpoint, input_shape, seed=seed)
    elif isinstance(input, dict):
        feeds = dict(input)
        first = next(iter(feeds.values()))
        spec = InputSpec("given", tuple(first.shape), first.dtype, seed=None)
    else:
        args, spec = given_input(input)
        feeds = dict(zip(names, args))
    arrays = {name: (value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value)
              for name, value in feeds.items()}
    shapes = tuple(tuple(a.shape) for a in arrays.values())

    def call(what: str) -> list[Any]:
        try:
            return session.run(None, arrays)
        except Exception as exc:  # ORT's InvalidArgument and Fail on shapes and types
            raise ForwardError(checkpoint.path, f"ONNX Runtime failed on {what} with input shape "
                                                f"{', '.join(str(list(s)) for s in shapes)}: {_one_line(exc)}",
                               layer=None, input_shapes=shapes) from exc

    values, times = timed_calls(lambda: call("the first call"), call, warmup, repeats, progress)
    output = {meta.name: torch.from_numpy(value) for meta, value in zip(session.get_outputs(), values)}
    outputs = tuple(_describe(name, tensor) for name, tensor in output_tensors(output))
    where = "cuda" if provider == "CUDAExecutionProvider" else "cpu"
    note = f"ran in ONNX Runtime {onnxruntime.__version__} ({provider})"
    return InferenceResult(str(target) if where == "cuda" else "cpu", spec, outputs, _top_k(output, top_k),
                           Timing(max(0, warmup), tuple(times)), None, model_source="onnxruntime", notes=(note,),
                           output=output)


def _one_line(exc: BaseException) -> str:
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__

