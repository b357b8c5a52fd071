"""
The devices this process can run a model on, best first: every CUDA device (with its name and
free memory), Apple's MPS, then the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ckptview.errors import CkptviewError


@dataclass(frozen=True)
class DeviceInfo:
    """One device a model can run on. `free_bytes`/`total_bytes` are None where torch cannot tell (CPU, MPS)."""

    name: str  # what torch.device() takes: "cuda:0", "mps", "cpu"
    description: str  # "NVIDIA H100 80GB HBM3", "Apple MPS", "CPU (16 threads)"
    free_bytes: int | None = None
    total_bytes: int | None = None

    @property
    def kind(self) -> str:
        return torch.device(self.name).type


def available_devices() -> tuple[DeviceInfo, ...]:
    """
    Every device this process can use, best first (CUDA devices by index, then MPS, then CPU).

    Returns:
        A tuple of `DeviceInfo`; the CPU is always last, so the tuple is never empty.

    Example:
        >>> [d.name for d in ckptview.available_devices()]
        ['cuda:0', 'cpu']
    """
    devices = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            try:
                free, total = torch.cuda.mem_get_info(index)
            except RuntimeError:  # a device that is visible but busy/broken still gets listed, without figures
                free = total = None
            devices.append(DeviceInfo(f"cuda:{index}", torch.cuda.get_device_name(index), free, total))
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append(DeviceInfo("mps", "Apple Metal (MPS)"))
    devices.append(DeviceInfo("cpu", f"CPU ({torch.get_num_threads()} threads)"))
    return tuple(devices)


def default_device() -> torch.device:
    """The best available device: the CUDA device with the most free memory, else MPS, else the CPU."""
    devices = available_devices()
    cuda = [d for d in devices if d.kind == "cuda"]
    if cuda:
        return torch.device(max(cuda, key=lambda d: d.free_bytes or 0).name)
    return torch.device(devices[0].name)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """
    Turn a user's device choice into a `torch.device` this process can use.

    Args:
        device: None or "auto" for `default_device()`; "cuda" means cuda:0; otherwise anything
            `torch.device()` takes.

    Raises:
        CkptviewError: the device does not exist here; the message lists the ones that do.
    """
    if device is None or (isinstance(device, str) and device.strip().lower() in ("", "auto")):
        return default_device()
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise CkptviewError(None, f"{device!r} is not a device name; use one of "
                                  f"{', '.join(d.name for d in available_devices())}") from exc
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda", 0)
    names = {d.name for d in available_devices()}
    if str(resolved) not in names:
        raise CkptviewError(None, f"device {str(resolved)!r} is not available in this process; available: "
                                  f"{', '.join(sorted(names))}")
    return resolved


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so a wall-clock timing covers the work and not just its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
