"""Pick the compute device for capture (onnxruntime providers) and reconstruction (torch)."""
from __future__ import annotations

import logging
from dataclasses import dataclass

from onnxflex.errors import DeviceError

log = logging.getLogger("onnxflex")


@dataclass(frozen=True)
class Device:
    torch_device: str
    providers: tuple[str, ...]


def cuda_available() -> tuple[bool, str]:
    """(usable, reason when not): torch must see a GPU and onnxruntime must offer its CUDA provider."""
    import onnxruntime as ort
    import torch

    if not torch.cuda.is_available():
        return False, "torch sees no CUDA device"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False, "the installed onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)"
    return True, ""


def resolve_device(name: str) -> Device:
    """'cpu', 'cuda' (error when unavailable) or 'auto' (CUDA when usable, else CPU with one log line)."""
    cpu = Device("cpu", ("CPUExecutionProvider",))
    if name == "cpu":
        return cpu
    ok, why = cuda_available()
    if ok:
        return Device("cuda", ("CUDAExecutionProvider", "CPUExecutionProvider"))
    if name == "cuda":
        raise DeviceError(f"--device cuda was asked for but {why}; use --device cpu or --device auto")
    log.info("no usable CUDA device (%s); running on CPU", why)
    return cpu
