"""A clamp whose gradient is one memory pass over float tensors.

torch's own clamp backward builds its pass-through mask as two comparisons and a logical and over
boolean tensors, then selects with ``where``; on the CPU each of those boolean ops costs 2 to 5 times a
float op (BENCHMARKS.md, "Reconstruction loop per step: float masks"). The gradient it computes,
``grad`` where ``low ≤ x ≤ high`` and +0 elsewhere, is also what ``hardtanh_backward`` computes with
the strict test ``low' < x < high'``; for float32 ``x`` the two tests agree exactly when ``low'`` is
the float32 just below ``low`` and ``high'`` the one just above ``high``. Outputs and gradients are therefore bit for bit torch's,
for every finite and infinite ``x``; only a NaN ``x`` differs (torch blocks its gradient, this passes it,
and the loss is NaN then either way).
"""
from __future__ import annotations

import numpy as np
import torch

Tensor = torch.Tensor


def clamp(x: Tensor, low: Tensor | float, high: Tensor | float) -> Tensor:
    """torch.clamp(x, low, high) for bounds given as floats or one-value tensors (ONNX Clip's 0-d
    inputs), with the one-pass gradient on float32 CPU tensors. Anything else (other dtypes or devices,
    a bound that needs its own gradient, a bound with more than one value) is torch.clamp itself."""
    if not (_plain(low, x) and _plain(high, x)) or x.dtype != torch.float32 or x.device.type != "cpu":
        return torch.clamp(x, low, high)
    low, high = float(low), float(high)  # exact: a float32 value is a double
    if torch.is_grad_enabled() and x.requires_grad:
        return _Clamp.apply(x, low, high)
    return torch.clamp(x, low, high)


def passed(grad: Tensor, x: Tensor, low: float, high: float) -> Tensor:
    """``grad`` where low ≤ x ≤ high and +0 elsewhere (float32 ``x``; NaN ``x`` passes), one pass."""
    return torch.ops.aten.hardtanh_backward(grad, x, _next(low, -np.inf), _next(high, np.inf))


def _next(value: float, toward: float) -> float:
    with np.errstate(over="ignore"):  # beyond the largest float32 is inf, as wanted
        return float(np.nextafter(np.float32(value), np.float32(toward)))


def _plain(bound, x: Tensor) -> bool:
    """A bound clamp can take as a float without changing the result's shape or dropping a gradient."""
    if isinstance(bound, float):
        return True
    return isinstance(bound, Tensor) and bound.numel() == 1 and bound.dim() <= x.dim() \
        and not bound.requires_grad and bound.device.type == "cpu" and bound.is_floating_point()


class _Clamp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, low, high):
        ctx.bounds = low, high
        ctx.save_for_backward(x)
        return torch.clamp(x, low, high)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return passed(grad, x, *ctx.bounds), None, None
