"""What activation calibration keeps of each act point's values while the FP block runs over the
calibration batches: the range, the far tails for the percentile range, and for the MSE search a
thinned sample. Memory is bounded by the tails' length (a 100,000th of the values) and the sample's
cap, not by the number of samples.

The percentile range (``--act-scale percentile``), with p = PERCENTILE (99.999 %) and the nearest-rank
percentile (the ⌈p·n⌉-th smallest of n values):

- signed (symmetric) grid: ±(the p-th percentile of |x| over all n values, zeros included);
- unsigned (asymmetric) grid: the maximum clipped at the p-th percentile of the positive values, the
  minimum at minus the p-th percentile of |x| over the negative values (each side on its own count);
  a side with no values ends at 0.

Both are exact over every calibration value of a point with its own quantizer: each side keeps its
largest ⌊(1 − p)·N⌋ + 1 magnitudes, N an upper bound of the values it will see (the first batch's
count times the number of batches). Points that share one quantizer (Concat inputs on a target that
ties their scales) pool their values; their tails are sized by the points seen so far, so a point's
first batch can be cut shorter than the pooled rank needs and the range then ends at most that far
inside the pooled percentile.

Values arrive as numpy arrays (onnxruntime's outputs in the capture run, or a torch block's tensors on
the CPU) and are observed with numpy: a few passes over each batch, and small sorts of the candidates.
"""
from __future__ import annotations

import numpy as np
import torch

from onnxflex.rounding.activation import MAX_SEARCH_VALUES, sample_values

PERCENTILE = (99_999, 100_000)  # p as an exact fraction, so ranks are integer arithmetic


def tail_length(count: int) -> int:
    """0-based position, from the largest, of the p-th percentile among ``count`` values."""
    num, den = PERCENTILE
    return (den - num) * count // den


class Tails:
    """The largest magnitudes of one side of a stream of values (a 1-D float32 array each time)."""

    def __init__(self) -> None:
        self.top = np.empty(0, np.float32)  # sorted, largest first
        self.count = 0

    def floor(self, bound: int) -> float:
        """The magnitude a new value must exceed to change what is kept: the smallest kept one once the
        tails hold all the ``tail_length(bound) + 1`` values that ``bound`` needs, else 0."""
        if self.top.size and self.top.size >= tail_length(bound) + 1:
            return float(self.top[-1])
        return 0.0

    def add(self, magnitudes: np.ndarray, bound: int, count: int | None = None) -> None:
        """Mutates: counts ``count`` new values (default: ``magnitudes.size``) and keeps the
        ``tail_length(bound) + 1`` largest of what was kept and ``magnitudes`` (> 0). ``magnitudes`` may
        leave out the new values not above ``floor(bound)``: none of them can displace a kept value
        (one equal to the smallest kept adds an equal value), so what is kept is the same multiset."""
        self.count += magnitudes.size if count is None else count
        if not magnitudes.size:
            return
        keep = min(tail_length(bound) + 1, self.top.size + magnitudes.size)
        self.top = _largest(np.concatenate([self.top, magnitudes.astype(np.float32, copy=False)]), keep)

    def percentile(self, count: int | None = None) -> float:
        """The p-th percentile of the side's ``count`` values (default: its own count); 0 when empty."""
        count = self.count if count is None else count
        if count == 0 or not self.top.size:
            return 0.0
        return float(self.top[min(tail_length(count), self.top.size - 1)])


class PointValues:
    """One activation quantizer's observations, the act points sharing it pooled: range, both sides'
    tails, and (for the MSE search) each point's thinned values."""

    def __init__(self, batches: int, keep_sample: bool) -> None:
        self.batches, self.keep_sample = batches, keep_sample
        self.lo, self.hi = float("inf"), float("-inf")
        self.positive, self.negative = Tails(), Tails()
        self.count = 0
        self.sizes: dict[str, int] = {}  # per act point: its first batch's value count
        self.samples: dict[str, list[torch.Tensor]] = {}

    def add(self, name: str, flat, rows: int, samples: int, gen: torch.Generator) -> None:
        """``flat``: one batch's values of act point ``name`` (a 1-D numpy array, or a CPU tensor, which
        is read without a copy), ``rows`` of the ``samples`` calibration samples (for a shared tensor:
        1 of 1)."""
        flat = np.asarray(flat).reshape(-1)
        if flat.dtype != np.float32:
            flat = flat.astype(np.float32)
        if not flat.size:
            return
        self.sizes.setdefault(name, flat.size)
        bound = self.batches * sum(self.sizes.values())  # the first batch is the largest
        self.count += flat.size
        for tails, sign in ((self.positive, 1), (self.negative, -1)):
            if not tails.top.size:  # no value on this side yet: the batch's extreme says if it has one
                extreme = float(flat.max() if sign > 0 else flat.min())
                self.hi, self.lo = (max(self.hi, extreme), self.lo) if sign > 0 else (self.hi, min(self.lo, extreme))
                if sign * extreme <= 0:  # none (a Relu's negative side): one reduction, no mask
                    continue
            magnitudes, count = _side(flat, sign, tails.floor(bound), tail_length(bound) + 1)
            tails.add(magnitudes, bound, count)
        # a side's largest magnitude is never displaced from its tails: once it has values, its extreme
        self.hi = float(self.positive.top[0]) if self.positive.top.size else self.hi
        self.lo = -float(self.negative.top[0]) if self.negative.top.size else self.lo
        if self.keep_sample:
            self.samples.setdefault(name, []).append(_thinned(torch.from_numpy(flat), rows, samples, gen))

    def percentile_range(self, signed: bool) -> tuple[float, float]:
        """(lo, hi) as the module docstring defines them."""
        if signed:
            edge = _merged_percentile(self.positive, self.negative, self.count)
            return -edge, edge
        return -self.negative.percentile(), self.positive.percentile()

    @property
    def below_zero(self) -> bool:
        """Every value strictly below 0: a logit whose positive decision the data never showed. Values all
        above 0 are not counted: a head's output that is positive by construction (a Relu's, whose minimum
        is 0, or one ahead of a runtime-fused activation, e.g. SqueezeNet's last Conv) would lose half its
        grid to a mirrored range, and onnxruntime then runs that Conv in float."""
        return self.hi < 0

    def sample(self, names: list[str], gen: torch.Generator) -> torch.Tensor | None:
        """The MSE search's values: the points' thinned values in ``names``' order, then sampled."""
        if not self.keep_sample:
            return None
        return sample_values(torch.cat([s for n in names for s in self.samples[n]]), gen)


def _side(flat: np.ndarray, sign: int, floor: float, keep: int) -> tuple[np.ndarray, int]:
    """(magnitudes of the values of ``flat`` on side ``sign`` (1: > 0, -1: < 0) beyond ``floor`` (≥ 0)
    in magnitude, the number of values on that side). Of more than ``keep`` candidates only the
    ``keep`` largest are returned (the others cannot be kept)."""
    side = flat > 0 if sign > 0 else flat < 0
    count = int(np.count_nonzero(side))
    if not count:
        return flat[:0], count
    if floor:  # a full side: only the few values beyond its smallest kept one
        side = flat > floor if sign > 0 else flat < -floor
    picked = flat[side] if sign > 0 else -flat[side]
    return (_largest(picked, keep) if picked.size > keep else picked), count


def _largest(values: np.ndarray, keep: int) -> np.ndarray:
    """The ``keep`` largest of ``values`` (1-D), sorted largest first."""
    if keep < values.size:
        values = np.partition(values, values.size - keep)[values.size - keep:]
    return np.sort(values)[::-1]


def _merged_percentile(a: Tails, b: Tails, count: int) -> float:
    both = np.sort(np.concatenate([a.top, b.top]))[::-1]
    if count == 0 or not both.size:
        return 0.0
    return float(both[min(tail_length(count), both.size - 1)])


def _thinned(flat: torch.Tensor, batch: int, samples: int, gen: torch.Generator) -> torch.Tensor:
    """All of a batch's values while the whole calibration set's values of this tensor stay within
    4 × MAX_SEARCH_VALUES; beyond that a random share of MAX_SEARCH_VALUES, so that what calibration
    keeps does not grow with the number of samples."""
    total = flat.numel() * samples // max(batch, 1)
    if total <= 4 * MAX_SEARCH_VALUES:
        return flat
    keep = -(-MAX_SEARCH_VALUES * flat.numel() // total)
    return flat[torch.randint(0, flat.numel(), (keep,), generator=gen)]
