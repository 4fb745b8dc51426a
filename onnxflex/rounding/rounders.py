"""Weight rounders behind one interface.

Every rounder holds one float weight and its quantization grid: symmetric (signed ``bits``, one step
per output channel along ``axis`` or per group, zero point 0) or asymmetric (unsigned ``bits``, a step
s and an integer zero point z per channel or group: q = clamp(round(W / s) + z, 0, 2^b − 1),
Ŵ = s · (q − z); grid.py finds the start), and offers:
  fake_quant() -> Tensor   the quantized-then-dequantized weight, differentiable (straight-through);
                           in training mode a rounder may round softly (AdaRound), in eval mode
                           (the default outside reconstruction) it is exactly what export() writes;
  param_groups()           [(parameters, learning-rate name)] for the reconstruction optimiser;
  regularizer(progress)    an extra loss term at ``progress`` = iteration / iterations, or None;
  export() -> QuantizedWeight   the integers and scales that reproduce fake_quant() exactly.

A rounder class names its ``policy``: the StepPolicy (policies.py) that updates a block's parameters
(Adam with cosine decay by default). RTN, FlexRound and FrozenRounder (a finished layer's exported
integers) live here; AdaRound and SignRound in their own modules; methods.py maps the --method names
to them.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

from onnxflex.qparams import QuantizedWeight, channel_shape
from onnxflex.rounding.policies import AdamCosine, StepPolicy
from onnxflex.rounding.grid import RATIOS, in_parts, init_asymmetric_grid, reduce_over
from onnxflex.rounding.quant import round_ste, signed_range, unsigned_range

UNSHRUNK_BITS = 7  # symmetric MSE steps below 8 bits are then unshrunk (unshrunk_step)
UNSHRUNK_ROUNDS = 3


def grouped_view(w: torch.Tensor, axis: int, group_size: int) -> tuple[torch.Tensor, tuple[int, ...],
                                                                          tuple[int, ...]]:
    """(view, dims, scale shape): reducing ``view`` over ``dims`` leaves one value per step.

    Per channel (``group_size`` 0): ``w`` itself, every dim but ``axis``, steps [C]. Per group (2-D
    weights only): the input axis b = 1 - axis of length K split into [ceil(K/G), G], dims the G axis,
    steps of ``blocked_scale_shape(w.shape, b, G)`` ([ceil(K/G), N] for a MatMul weight [K, N], axis 1).
    When G does not divide K (a group wider than K, or K = 192 at G = 128) the last group is short and
    the view is padded with zeros: a zero changes no step's max |w| or (zero-holding) range, rounds to
    its zero point exactly and adds nothing to a squared error or a projection, so every step is the
    one of its real elements (HQQ's zero-point mean counts the real elements only).
    """
    if not group_size:
        return w, tuple(d for d in range(w.ndim) if d != axis), (w.shape[axis],)
    b = 1 - axis
    if w.ndim != 2 or axis not in (0, 1):
        raise ValueError(f"groups of {group_size} need a 2-D weight with axis 0 or 1; got shape {list(w.shape)}, "
                         f"axis {axis}")
    shape = list(w.shape)
    groups = -(-shape[b] // group_size)
    short = groups * group_size - shape[b]
    if short:
        w = torch.nn.functional.pad(w, (0, short) if b == 1 else (0, 0, 0, short))
    view = w.reshape(shape[:b] + [groups, group_size] + shape[b + 1:])
    return view, (b + 1,), tuple(groups if d == b else n for d, n in enumerate(shape))


def absmax_per_step(w: torch.Tensor, axis: int, group_size: int = 0) -> torch.Tensor:
    """max|w| over each step's elements (scale-shaped, at least 1e-12)."""
    view, dims, shape = grouped_view(w, axis, group_size)
    return (view.abs().amax(dim=dims, keepdim=True) if dims else view.abs()).clamp_min(1e-12).reshape(shape)


def init_weight_scale(w: torch.Tensor, axis: int, bits: int, search: str, group_size: int = 0) -> torch.Tensor:
    """Per-channel step [C] (or per-group, see grouped_view): max|w|/qmax, or the clip ratio on a grid
    that minimises the squared error of each channel (group), at UNSHRUNK_BITS or fewer then unshrunk
    (``unshrunk_step``)."""
    qmin, qmax = signed_range(bits)
    view, dims, shape = grouped_view(w, axis, group_size)
    absmax = (view.abs().amax(dim=dims, keepdim=True) if dims else view.abs()).clamp_min(1e-12)
    if search == "minmax":
        return (absmax / qmax).reshape(shape)
    # Steps are independent of each other: search a few of them at a time (grid.in_parts), so that the
    # grid's temporaries stay in cache instead of allocating weight-sized tensors per ratio.
    rounds = UNSHRUNK_ROUNDS if bits <= UNSHRUNK_BITS else 0
    parts = []
    with in_parts(view, dims) as (keep, spans):
        for i, n in spans:
            part = view.narrow(keep, i, n)
            step = _grid_search(part, absmax.narrow(keep, i, n), dims, qmin, qmax)
            parts.append(unshrunk_step(part, step, dims, qmin, qmax, rounds))
    return torch.cat(parts, dim=keep).reshape(shape)


def unshrunk_step(view: torch.Tensor, step: torch.Tensor, dims: tuple[int, ...], qmin: int, qmax: int,
                  rounds: int) -> torch.Tensor:
    """``step`` moved ``rounds`` times to s ← Σ W² / Σ q(s)·W over ``dims``, q(s) = clamp(round(W / s)):
    the step at which the rounded weight s·q keeps the float weight's projection on itself
    (<s·q, W> = <W, W>). The MSE search's step clips the largest weights, and its rounded weight is
    W shrunk by a few percent plus noise: a layer's response to the inputs its largest weights match
    shrinks with it, and through a deep network those shrinks multiply (at 4 bits a YOLOX detector lost
    most of its positive anchors). A step with no projection left (all weights 0) stays."""
    if not rounds:
        return step
    energy = reduce_over(view * view, dims, "sum")
    for _ in range(rounds):
        projection = reduce_over(torch.div(view, step).round_().clamp_(qmin, qmax).mul_(view), dims, "sum")
        step = torch.where(projection > 0, energy / projection.clamp_min(1e-30), step)
    return step


def _grid_search(view: torch.Tensor, absmax: torch.Tensor, dims: tuple[int, ...], qmin: int, qmax: int
                 ) -> torch.Tensor:
    """The step absmax·ratio/qmax, ratio on grid.RATIOS, of least squared rounding error over ``dims``."""
    best_err, best = None, absmax / qmax
    for ratio in RATIOS.tolist():
        s = absmax * ratio / qmax
        err = torch.div(view, s).round_().clamp_(qmin, qmax).mul_(s).sub_(view).square_()
        err = err.sum(dim=dims, keepdim=True) if dims else err
        if best_err is None:
            best_err, best = err, s
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, s, best)
    return best


class Rounder(torch.nn.Module):
    """Shared state: the float weight (a buffer, never trained), bits, axis, group size and the
    integer range. ``axis`` is the output-channel axis; with ``group_size`` G > 0 (2-D weights) every
    step covers G consecutive elements along the input axis 1 - ``axis`` of one output channel, and
    the step tensors (``scale()``, FlexRound's δ1, SignRound's α) have ``grouped_view``'s scale shape.

    ``asymmetric``: the grid is unsigned with a zero point per step (``zero()``, float integers of the
    steps' shape); ``integers()`` then returns q in [0, 2^b − 1] and ``fake_quant`` is (q − z) · s.

    A rounder starts in eval mode; reconstruction switches it to training mode while it learns.
    ``reconstructs``: whether its method learns against the FP block at all (its rounding parameters
    and the activation steps); a method that does not (RTN, a data-free rounder) keeps the calibrated
    start of both.
    """

    policy: type[StepPolicy] = AdamCosine
    reconstructs = True

    def __init__(self, weight: torch.Tensor, axis: int, bits: int, scale_search: str = "mse",
                 group_size: int = 0, asymmetric: bool = False) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach().float().clone())
        self.axis, self.bits, self.group_size, self.asymmetric = axis, bits, group_size, asymmetric
        self.shape = channel_shape(weight.ndim, axis)
        if asymmetric:
            self.qmin, self.qmax = unsigned_range(bits)
            view, dims, shape = grouped_view(self.weight, axis, group_size)
            scale, zero = init_asymmetric_grid(view, dims, bits, scale_search)
            self.register_buffer("init_scale", scale.reshape(shape))
            self.register_buffer("init_zero", zero.reshape(shape))
        else:
            self.qmin, self.qmax = signed_range(bits)
            self.register_buffer("init_scale", init_weight_scale(self.weight, axis, bits, scale_search, group_size))
            self.init_zero = None
        self.train(False)

    def spread(self, steps: torch.Tensor) -> torch.Tensor:
        """A step-shaped tensor made broadcastable against the weight (differentiable)."""
        if self.group_size:  # a short last group: its step covers the K % G elements there are
            b = 1 - self.axis
            return steps.repeat_interleave(self.group_size, dim=b).narrow(b, 0, self.weight.shape[b])
        return steps.reshape(self.shape)

    def param_groups(self) -> list[tuple[list[torch.nn.Parameter], str]]:
        return []

    def regularizer(self, progress: float) -> torch.Tensor | None:
        """Extra loss at ``progress`` in [0, 1) of the iterations; None when the method has none."""
        return None

    def scale(self) -> torch.Tensor:
        return self.init_scale

    def zero(self) -> torch.Tensor | None:
        """The zero points (steps' shape, integer values in float; differentiable where learned), or
        None on a symmetric grid."""
        return self.init_zero

    def shift(self, levels: torch.Tensor) -> torch.Tensor:
        """``levels`` (weight-shaped) plus the zero points on an asymmetric grid; unchanged otherwise."""
        return levels + self.spread(self.zero()) if self.asymmetric else levels

    @torch.no_grad()
    def raise_steps(self, floor: torch.Tensor) -> int:
        """Mutates: the starting steps below ``floor`` (``init_scale``'s shape) are raised to it, before
        anything is learned; returns how many were. (An int32 bias needs its step, input step × weight
        step, large enough to fit: torchify.bias_limit.)"""
        low = self.init_scale < floor
        self.init_scale.copy_(torch.maximum(self.init_scale, floor))
        return int(low.sum())

    def integers(self) -> torch.Tensor:
        raise NotImplementedError

    def fake_quant(self) -> torch.Tensor:
        if self.asymmetric:
            return (self.integers() - self.spread(self.zero())) * self.spread(self.scale())
        return self.integers() * self.spread(self.scale())

    @torch.no_grad()
    def export(self) -> QuantizedWeight:
        """Per channel on ``axis``, or blocked (block_size G) on the input axis 1 - ``axis``; int8
        integers and zero points 0, or on an asymmetric grid uint8 integers and zero points."""
        scale = self.scale().detach().float().cpu().numpy().astype(np.float32)
        axis = 1 - self.axis if self.group_size else self.axis
        if self.asymmetric:
            ints = torch.round(self.integers()).to(torch.uint8).cpu().numpy()
            zero = torch.round(self.zero().detach()).to(torch.uint8).cpu().numpy()
            return QuantizedWeight(ints, scale, zero, axis, self.bits, self.group_size)
        ints = torch.round(self.integers()).to(torch.int8).cpu().numpy()
        return QuantizedWeight(ints, scale, np.zeros_like(scale, dtype=np.int8), axis, self.bits, self.group_size)


class RTNRounder(Rounder):
    """q = clamp(round(W / s) (+ z)), s (and z) from min/max or the MSE grid; nothing is learned."""

    reconstructs = False

    def integers(self) -> torch.Tensor:
        return torch.clamp(self.shift(torch.round(self.weight / self.spread(self.init_scale))), self.qmin, self.qmax)


class FlexRounder(Rounder):
    """FlexRound: Ŵ = s1 · clamp(round_STE(W / (s1 · exp(δ2 + δ3 + δ4)))), s1 = s0 · exp(δ1).

    s0 [C] (per group: [K/G, N]) is the RTN step (grid search); δ1 (s0's shape: per-group s1), δ2 (weight-shaped), δ3 (per output channel) and
    δ4 (per input channel, Conv weights only) start at 0, so the first forward equals RTN bit for bit
    (exp(0) = 1 exactly; storing log s0 instead would not round-trip). Dividing by a learned
    element-wise scale makes the update of δ2 proportional to |W| (the reciprocal rule).

    On an asymmetric grid the zero points z0 (grid.py) learn as well, as z0 + ZERO_GAIN · δz (δz in the
    deltas' rate group, starting at 0): at Adam's per-step size of about lr, the gain lets z travel a
    few integers over a run.
    """

    ZERO_GAIN = 10.0

    def __init__(self, weight: torch.Tensor, axis: int, bits: int, scale_search: str = "mse",
                 group_size: int = 0, asymmetric: bool = False) -> None:
        super().__init__(weight, axis, bits, scale_search, group_size, asymmetric)
        self.delta1 = torch.nn.Parameter(torch.zeros_like(self.init_scale))
        if asymmetric:  # z = round_STE(z0 + ZERO_GAIN · δz): the zero points learn too
            self.delta_zero = torch.nn.Parameter(torch.zeros_like(self.init_zero))
        self.delta2 = torch.nn.Parameter(torch.zeros_like(self.weight))
        self.delta3 = torch.nn.Parameter(torch.zeros([weight.shape[axis] if d == axis else 1
                                                      for d in range(weight.ndim)]))
        self.has_delta4 = weight.ndim > 2 and axis == 0
        in_shape = [weight.shape[1] if d == 1 else 1 for d in range(weight.ndim)]
        self.delta4 = torch.nn.Parameter(torch.zeros(in_shape), requires_grad=self.has_delta4)

    def param_groups(self):
        deltas = [self.delta2, self.delta3] + ([self.delta4] if self.has_delta4 else [])
        if self.asymmetric:
            deltas.append(self.delta_zero)
        return [([self.delta1], "scale_lr"), (deltas, "lr")]

    def scale(self) -> torch.Tensor:
        return self.init_scale * torch.exp(self.delta1)

    def zero(self) -> torch.Tensor | None:
        """The learned zero points, integers in [0, qmax] (straight-through rounding): inside the range
        a shift by an integer changes nothing, so δz learns from the weights clamped at either end."""
        if not self.asymmetric:
            return None
        return torch.clamp(round_ste(self.init_zero + self.ZERO_GAIN * self.delta_zero), self.qmin, self.qmax)

    def divisor(self) -> torch.Tensor:
        exponent = self.delta2 + self.delta3
        if self.has_delta4:
            exponent = exponent + self.delta4
        return self.spread(self.scale()) * torch.exp(exponent)

    def integers(self) -> torch.Tensor:
        return torch.clamp(self.shift(round_ste(self.weight / self.divisor())), self.qmin, self.qmax)


def _read_only_tensor(values: np.ndarray) -> torch.Tensor:
    """``values`` as a tensor without a copy, also when numpy marks them read-only (file-backed integers,
    spill.file_backed; a Ray object's arrays): nothing writes into a frozen rounder's buffers, so torch's
    warning that writing would be undefined is not passed on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
        return torch.from_numpy(values)


class FrozenRounder(torch.nn.Module):
    """A finished layer's weight as exported integers and steps: fake_quant() = (ints − z) · s, the
    values the emitted DequantizeLinear computes (per channel, or blocked). Holds no float weight and
    learns nothing."""

    def __init__(self, weight: QuantizedWeight, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.quantized = weight
        self.axis, self.bits, self.block_size = weight.axis, weight.bits, weight.block_size
        self.shape = channel_shape(weight.ints.ndim, weight.axis)
        for name, values in (("ints", weight.ints), ("step", weight.scale), ("zero_point", weight.zero_point)):
            self.register_buffer(name, _read_only_tensor(np.ascontiguousarray(values)).to(device))
        self.symmetric = not np.any(weight.zero_point)
        self.train(False)

    def param_groups(self) -> list:
        return []

    def regularizer(self, progress: float) -> None:
        return None

    def scale(self) -> torch.Tensor:
        return self.step

    def spread(self, steps: torch.Tensor) -> torch.Tensor:
        """A scale-shaped tensor made broadcastable against the integers (QuantizedWeight.spread)."""
        if not self.block_size:
            return steps.reshape(self.shape)
        full = steps.repeat_interleave(self.block_size, dim=self.axis)
        return full.narrow(self.axis, 0, self.ints.shape[self.axis])

    def integers(self) -> torch.Tensor:
        return self.ints.float() - self.spread(self.zero_point.float())

    def fake_quant(self) -> torch.Tensor:
        blocks = self._blocks()
        if blocks is not None:  # steps broadcast over each block: no weight-sized copies of them
            grouped, steps = blocks
            ints = self.ints.reshape(grouped)
            if self.symmetric:
                return (ints * self.step.reshape(steps)).reshape(self.ints.shape)
            return ints.float().sub_(self.zero_point.float().reshape(steps)).mul_(
                self.step.reshape(steps)).reshape(self.ints.shape)
        if self.symmetric:  # one pass over the weight: int8 × float promotes to float, values exact
            return self.ints * self.spread(self.step)
        return self.integers() * self.spread(self.step)

    def _blocks(self) -> tuple[list[int], list[int]] | None:
        """(the integers' shape with the blocked axis split into [blocks, block_size], the steps' shape
        with a 1 for block_size), or None when the weight is per channel or its last block is short."""
        axis, size = self.axis, self.block_size
        shape = list(self.ints.shape)
        if not size or shape[axis] % size:
            return None
        grouped = shape[:axis] + [shape[axis] // size, size] + shape[axis + 1:]
        return grouped, shape[:axis] + [shape[axis] // size, 1] + shape[axis + 1:]

    def export(self) -> QuantizedWeight:
        return self.quantized
