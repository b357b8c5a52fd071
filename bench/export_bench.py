"""
`export_check` on a ResNet-18-sized model built from plain torch.nn layers (11.7 M parameters,
BatchNorm after every convolution), input 1×3×224×224:

  per target   onnx, trace and script checked one at a time: wall time of each whole check
  all          the three in one call (the model built and the probes run eagerly once)
  latency      eager PyTorch vs ONNX Runtime vs TorchScript on the CPU, medians of export_check
  weights      ckptview.diff(.pt, .onnx, values=True): every tensor paired or explained, and its time
  1 thread     eager vs ONNX Runtime, one thread each, calls interleaved: on a shared machine the
               medians export_check reports move with the load, this ratio much less

With --device cuda (and onnxruntime-gpu) ONNX Runtime uses its CUDA provider.

    python bench/export_bench.py [--device cpu] [--repeats 10]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import ckptview


class BasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet18(nn.Module):
    """torchvision's resnet18, layer for layer (same names and shapes), without torchvision."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        layers, inplanes = [], 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(nn.Sequential(BasicBlock(inplanes, planes, stride), BasicBlock(planes, planes)))
            inplanes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


def build() -> ResNet18:
    torch.manual_seed(0)
    model = ResNet18()
    # running statistics as training leaves them, so folding BatchNorm changes the kernels
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0, 0.1)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    model = build()
    print(f"ResNet-18 (plain torch.nn): {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    options = dict(input_shape=(1, 3, 224, 224), device=args.device, repeats=args.repeats)
    for target in ("onnx", "trace", "script"):
        start = time.perf_counter()
        check = ckptview.export_check(model, targets=(target,), **options)
        result = check.target(target)
        print(f"  {target:<6} {time.perf_counter() - start:6.1f} s  {result.status:<8} max |diff| "
              f"{result.max_abs_diff:.2e}  latency {result.latency_ms:8.2f} ms vs eager {result.eager_latency_ms:8.2f} ms"
              f"  {result.tool}")
    folder = Path(tempfile.mkdtemp(prefix="ckptview-export-bench-")) / "exports"
    start = time.perf_counter()
    check = ckptview.export_check(model, save_to=folder, **options)
    print(f"  all three in one call: {time.perf_counter() - start:.1f} s (export_check says {check.seconds:.1f} s), "
          f"ok={check.ok}")
    pt = folder.parent / "resnet18.pt"
    torch.save(model.state_dict(), pt)
    start = time.perf_counter()
    matching = ckptview.diff(pt, folder / "model.onnx", values=True).matching
    print(f"  diff .pt vs .onnx: {time.perf_counter() - start:.1f} s, {matching.counts()}, "
          f"unexplained {len(matching.unexplained_left)} / {len(matching.unexplained_right)}")
    interleaved(model, folder / "model.onnx", args.repeats)


def interleaved(model: nn.Module, onnx_path: Path, repeats: int) -> None:
    import statistics

    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    x = torch.randn(1, 3, 224, 224)
    eager, ort = [], []
    try:
        with torch.inference_mode():
            for _ in range(3):
                model(x), session.run(None, {name: x.numpy()})
            for _ in range(repeats):
                start = time.perf_counter()
                model(x)
                eager.append(time.perf_counter() - start)
                start = time.perf_counter()
                session.run(None, {name: x.numpy()})
                ort.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    e, o = 1e3 * statistics.median(eager), 1e3 * statistics.median(ort)
    print(f"  1 thread, interleaved, {repeats} calls each: eager {e:.1f} ms, ONNX Runtime {o:.1f} ms "
          f"(ORT {e / o:.2f}x eager's speed); load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
