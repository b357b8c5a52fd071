"""`ckptview run`: build the model, load the checkpoint, run it on the best device, compare precisions."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ckptview.cli import add_path_command, print_json
from ckptview.errors import ModelBuildError
from ckptview.present.text import human_bytes, shape_text, text_table


def add_commands(subparsers: Any) -> None:
    command = add_path_command(
        subparsers, "run",
        "build the model, load the checkpoint's weights, run it once on the best device and show its outputs",
        json_help="print JSON (keys: checkpoint, device, model_source, input, outputs, finite, top_k, latency_ms, "
                  "peak_memory_bytes, weights, notes, precisions)",
    )
    command.add_argument("--model", metavar="PACKAGE.MODULE:FACTORY",
                         help="the model's code, when the file holds only weights, e.g. torchvision.models:resnet18")
    command.add_argument("--model-kwargs", metavar="JSON", type=_json_object, default=None,
                         help='keyword arguments for the factory, as JSON, e.g. \'{"num_classes": 10}\'')
    command.add_argument("--device", default=None,
                         help="cuda, cuda:1, mps or cpu (default: the best available)")
    command.add_argument("--input-shape", metavar="N,C,H,W", type=_shape, default=None,
                         help="shape of the synthesised input (default: inferred from the first layer)")
    command.add_argument("--precisions", metavar="LIST", type=_precisions, default=None,
                         help="also compare precisions, e.g. fp32,fp16,bf16,int8 (int8 = dynamic quantization, CPU)")
    command.add_argument("--repeats", type=_positive, default=5, help="timed calls (default 5)")
    command.add_argument("--warmup", type=_non_negative, default=1, help="untimed calls before timing (default 1)")
    command.add_argument("--seed", type=int, default=0, help="seed of the synthesised input (default 0)")
    command.add_argument("--top-k", type=_non_negative, default=5, help="classes to list for a classifier output")
    command.set_defaults(func=run)


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape; write sizes separated by commas, e.g. 1,3,224,224") from None
    if not shape or any(size <= 0 for size in shape):
        raise argparse.ArgumentTypeError(f"{text!r}: a shape needs at least one size, all positive")
    return shape


def _precisions(text: str) -> list[str]:
    from ckptview.inference import Precision

    try:
        return [Precision(part.strip().lower()).value for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"--model-kwargs is not JSON ({exc.msg}); e.g. '{{\"num_classes\": 10}}'") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("--model-kwargs must be a JSON object, e.g. '{\"num_classes\": 10}'")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def run(args: argparse.Namespace) -> int:
    import ckptview
    from ckptview.inference import compare_precisions, run_inference

    if args.model_kwargs and not args.model:
        raise ModelBuildError(None, "--model-kwargs needs --model (the factory they are for)")
    options = dict(model_kwargs=args.model_kwargs, device=args.device, input_shape=args.input_shape,
                   seed=args.seed, warmup=args.warmup, repeats=args.repeats, top_k=args.top_k)
    with ckptview.open(args.path, trust=args.trust) as ckpt:
        comparison = None
        if args.precisions:
            comparison = compare_precisions(ckpt, args.model, precisions=["fp32", *args.precisions], **options)
            result = comparison.row("fp32").result
        else:
            result = run_inference(ckpt, args.model, **options)
    data = {"checkpoint": ckpt.path, **result.to_dict()}
    if comparison is not None:
        data["precisions"] = comparison.table()
    if args.json:
        print_json(data)
    else:
        print(render(data, model=args.model))
    return 0


def render(data: dict[str, Any], *, model: str | None = None) -> str:
    """The terminal report of `ckptview run` from its JSON data."""
    source = {"module": "the pickled module in the file", "torchscript": "the TorchScript module in the file",
              "factory": f"{model}", "instance": "the given module"}.get(data["model_source"], data["model_source"])
    lines = [f"{data['checkpoint']}", f"  model       {source}", f"  device      {data['device']}"]
    weights = data["weights"]
    if weights is not None:
        state = "all loaded" if weights["complete"] else "INCOMPLETE"
        lines.append(f"  weights     {weights['loaded']} tensors loaded, {state}")
        for fix in weights["fixes"]:
            lines.append(f"  fixed       {fix}")
        for label, names in (("missing", weights["missing"]), ("unexpected", weights["unexpected"]),
                             ("initialised", weights["initialised"])):
            if names:
                lines.append(f"  {label:<11} {', '.join(names[:6])}{' …' if len(names) > 6 else ''}")
        for item in weights["mismatched"]:
            lines.append(f"  mismatched  {item['name']}: checkpoint {shape_text(item['checkpoint_shape'])}, "
                         f"model {shape_text(item['model_shape'])}")
    for note in data["notes"]:
        lines.append(f"  note        {note}")
    spec = data["input"]
    seed = f", seed {spec['seed']}" if spec["seed"] is not None else ""
    origin = f", from {spec['layer']}" if spec["layer"] else ""
    lines.append(f"  input       {spec['kind']} {shape_text(spec['shape'])} {spec['dtype']}{origin}{seed}")
    latency = data["latency_ms"]
    lines.append(f"  latency     {latency['median']:.3f} ms median, {latency['min']:.3f} ms min "
                 f"({latency['repeats']} timed calls after {latency['warmup']} warm-up)")
    if data["peak_memory_bytes"] is not None:
        lines.append(f"  memory      {human_bytes(data['peak_memory_bytes'])} peak on the device")
    if not data["finite"]:
        lines.append("  WARNING     the output holds NaN or Inf values (see the nan/inf columns)")
    lines.append("")
    rows = [(o["name"], shape_text(o["shape"]), o["dtype"], _number(o["min"]), _number(o["max"]), _number(o["mean"]),
             _number(o["std"]), o["nan_count"], o["inf_count"]) for o in data["outputs"]]
    lines.append(text_table(rows, ("output", "shape", "dtype", "min", "max", "mean", "std", "nan", "inf"),
                            align_right=(3, 4, 5, 6, 7, 8)))
    for top in data["top_k"]:
        lines.append("")
        lines.append(f"top {len(top['classes'])} of {top['output']} ({top['position']}, softmax):")
        lines.append(text_table([(c, f"{p:.4f}") for c, p in zip(top["classes"], top["probabilities"])],
                                ("class", "probability"), align_right=(0, 1)))
    if "precisions" in data:
        lines.append("")
        rows = [(r["precision"], r["device"], _ms(r["latency_ms"]), human_bytes(r["size_bytes"]) if r["size_bytes"] else "-",
                 _number(r["max_abs_diff"]), _number(r["cosine"], 6), _percent(r["top1_agreement"]), r["status"])
                for r in data["precisions"]]
        lines.append(text_table(rows, ("precision", "device", "latency", "size", "max |diff|", "cosine", "top-1 agree",
                                       "status"), align_right=(2, 3, 4, 5, 6)))
    return "\n".join(lines)


def _number(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} ms"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"
