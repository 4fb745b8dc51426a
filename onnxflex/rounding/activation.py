"""Per-tensor activation quantizers with a learned step size (LSQ-style straight-through gradient)."""
from __future__ import annotations

import torch

from onnxflex.rounding.quant import fake_quant, signed_range, unsigned_range

CLIP_GRID = torch.linspace(0.3, 1.0, 15)
MAX_SEARCH_VALUES = 1 << 20


class ActQuantizer(torch.nn.Module):
    """x̂ = (clamp(round_STE(x / s) + z, qmin, qmax) − z) · s with s = exp(log_scale) learned, z fixed
    (computed by quant.fake_quant, whose fused backward gives round_STE's gradients).

    Unsigned (asymmetric, z from the calibrated minimum) or signed (symmetric, z = 0). A tensor whose
    calibrated minimum is 0 (after ReLU) gets z = qmin, so the quantizer itself clips at zero.
    """

    def __init__(self, bits: int, signed: bool) -> None:
        super().__init__()
        self.bits, self.signed = bits, signed
        self.qmin, self.qmax = signed_range(bits) if signed else unsigned_range(bits)
        self.log_scale = torch.nn.Parameter(torch.zeros(()))
        self.register_buffer("zero_point", torch.zeros(()))
        self.enabled = True

    def scale(self) -> torch.Tensor:
        return torch.exp(self.log_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        return fake_quant(x, self.scale(), self.zero_point, self.qmin, self.qmax)

    @torch.no_grad()
    def calibrate(self, lo: float, hi: float, sample: torch.Tensor | None, search: str) -> None:
        """Set the step from the observed range [lo, hi]; with search='mse', shrink it on a grid to
        minimise the squared error on ``sample`` (a flat subset of observed values)."""
        best = self._grid_point(lo, hi, 1.0)
        if search == "mse" and sample is not None and sample.numel():
            errors = []
            work = torch.empty_like(sample)  # one buffer for every grid point: the sample is up to 4 MiB
            for ratio in CLIP_GRID.tolist():
                s, z = self._grid_point(lo, hi, ratio)
                errors.append((_clip_error(sample, s, z, self.qmin, self.qmax, work), ratio))
            best = self._grid_point(lo, hi, min(errors)[1])
        s, z = best
        self.log_scale.copy_(torch.log(torch.tensor(s)))
        self.zero_point.copy_(torch.tensor(float(z)))

    def _grid_point(self, lo: float, hi: float, ratio: float) -> tuple[float, int]:
        lo, hi = min(lo, 0.0) * ratio, max(hi, 0.0) * ratio
        if self.signed:
            s = max(abs(lo), abs(hi)) / self.qmax
            return max(s, 1e-8), 0
        s = max((hi - lo) / (self.qmax - self.qmin), 1e-8)
        z = int(round(self.qmin - lo / s))
        return s, min(max(z, self.qmin), self.qmax)

    def export(self) -> tuple[float, int]:
        """(scale, zero_point) as QuantizeLinear takes them; scale is the float32 value used in simulation."""
        return float(self.scale().detach().float()), int(self.zero_point)


def _clip_error(sample: torch.Tensor, s: float, z: int, qmin: int, qmax: int, work: torch.Tensor) -> float:
    """Mean of ((clamp(round(x / s) + z, qmin, qmax) − z) · s − x)² over ``sample``, computed in place
    in ``work`` (same shape; overwritten), the same float operations as the out-of-place form."""
    torch.div(sample, s, out=work)
    work.round_().add_(z).clamp_(qmin, qmax).sub_(z).mul_(s).sub_(sample)
    return float(work.pow_(2).mean())


def sample_values(values: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    flat = values.reshape(-1).float()
    if flat.numel() <= MAX_SEARCH_VALUES:
        return flat
    idx = torch.randint(0, flat.numel(), (MAX_SEARCH_VALUES,), generator=generator)
    return flat[idx]
