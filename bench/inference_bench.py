"""
Inference from a checkpoint on one device: ckptview.compare_precisions against the loop a user
writes by hand (build the model, torch.load the state dict, load_state_dict, .to(device), time
forward calls with the device synchronised), on the same input.

Two models, both saved as plain state dicts with torch.save:
    mlp: 4 x Linear(2560, 2560) + a 1000-class head, 29M parameters (a Linear-bound model: int8 applies)
    cnn: a small ResNet-style network with BatchNorm on 224x224 images (a conv-bound model)

For each, fp32 runs first as the reference; fp16 and bf16 run a converted copy on the device;
int8 (dynamic quantization of the Linear layers) runs on the CPU only, as torch provides it.
Latencies are the median of the timed calls after a warm-up; "agree" is top-1 agreement with
fp32 and "cosine" the cosine similarity of the outputs.

    python bench/inference_bench.py                 # cuda when there is one, else cpu
    python bench/inference_bench.py --device cpu --repeats 20
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
from torch import nn

import ckptview
from ckptview.inference import compare_precisions
from ckptview.inference.devices import synchronize


class MLP(nn.Module):
    def __init__(self, width: int = 2560, depth: int = 4, classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Linear(width, width), nn.GELU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class CNN(nn.Module):
    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                  nn.MaxPool2d(3, stride=2, padding=1))
        stages: list[nn.Module] = []
        channels = 64
        for width in (64, 128, 256, 512):
            if width != channels:
                stages += [nn.Conv2d(channels, width, 1, stride=2, bias=False), nn.BatchNorm2d(width)]
            stages += [Block(width), Block(width)]
            channels = width
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)).mean((2, 3)))


def trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Non-trivial BatchNorm statistics, so eval-mode outputs are not just the init's."""
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, *INPUT_SHAPES[type(model).__name__][1:]))
    return model.state_dict()


INPUT_SHAPES = {"MLP": (64, 2560), "CNN": (16, 3, 224, 224)}


def by_hand(path: str, factory: type[nn.Module], device: torch.device, shape: tuple[int, ...],
            warmup: int, repeats: int) -> float:
    """The loop a user writes without ckptview; its median latency in ms."""
    model = factory()
    model.load_state_dict(torch.load(path, weights_only=True, map_location="cpu"))
    model.to(device).eval()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(device)
    times = []
    with torch.inference_mode():
        for call in range(warmup + repeats):
            synchronize(device)
            start = time.perf_counter()
            model(x)
            synchronize(device)
            if call >= warmup:
                times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, help="timed calls per precision (default: 10 on a GPU, 3 on the CPU)")
    parser.add_argument("--warmup", type=int, help="untimed calls first (default: 3 on a GPU, 1 on the CPU)")
    args = parser.parse_args()
    device = torch.device(args.device)
    # fp16 convolutions on a CPU take seconds a call: a GPU's defaults would make `make bench` take minutes
    on_cpu = device.type == "cpu"
    args.repeats = args.repeats or (3 if on_cpu else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if on_cpu else 3)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{os.cpu_count()} CPU cores"
    print(f"device: {device} ({name}); torch {torch.__version__}; "
          f"{args.repeats} timed calls after {args.warmup} warm-up")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        for factory in (MLP, CNN):
            shape = INPUT_SHAPES[factory.__name__]
            path = os.path.join(folder, f"{factory.__name__.lower()}.pt")
            torch.save(trained_state(factory()), path)
            hand_ms = by_hand(path, factory, device, shape, args.warmup, args.repeats)
            start = time.perf_counter()
            with ckptview.open(path) as ckpt:
                table = compare_precisions(ckpt, factory, device=device, input_shape=shape, warmup=args.warmup,
                                           repeats=args.repeats).table()
            seconds = time.perf_counter() - start
            parameters = sum(p.numel() for p in factory().parameters())
            print(f"\n{factory.__name__}: {parameters / 1e6:.1f}M parameters, input {tuple(shape)}; "
                  f"by hand fp32 {hand_ms:.2f} ms; compare_precisions took {seconds:.1f} s in all")
            print(f"{'precision':<10}{'device':<8}{'median ms':>10}{'min ms':>9}{'vs fp32':>9}{'size MB':>9}"
                  f"{'peak MB':>9}{'cosine':>10}{'agree':>8}  status")
            fp32_ms = table[0]["latency_ms"]
            for row in table:
                if row["latency_ms"] is None:
                    print(f"{row['precision']:<10}{row['device']:<8}{'':>73}  {row['status']}")
                    continue
                peak = f"{row['peak_memory_bytes'] / 1e6:.0f}" if row["peak_memory_bytes"] else "-"
                cosine = f"{row['cosine']:.6f}" if row["cosine"] is not None else "ref"
                agree = f"{row['top1_agreement']:.1%}" if row["top1_agreement"] is not None else "ref"
                print(f"{row['precision']:<10}{row['device']:<8}{row['latency_ms']:>10.2f}{row['latency_min_ms']:>9.2f}"
                      f"{fp32_ms / row['latency_ms']:>8.1f}x{row['size_bytes'] / 1e6:>9.1f}{peak:>9}{cosine:>10}"
                      f"{agree:>8}  {row['status']}")


if __name__ == "__main__":
    main()
