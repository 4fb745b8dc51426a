"""Where each tensor carries its samples.

onnxflex keeps samples on dim 0 inside (CalibrationSet arrays, TensorCache entries, what reconstruction
batches over); a model may carry them elsewhere: a recurrent ``state[2, N, 128]`` on axis 1, an LSTM's
``Y_h[dirs, N, H]``, or nowhere (a 0-d sample rate: one value shared by every sample). A Layout
records the model's batch axis of each such tensor and converts between the two.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any


@dataclass(frozen=True)
class Layout:
    """Tensor name → its batch axis in the model's layout; None for a shared tensor (one value for
    every sample, no sample axis); names not listed carry samples on axis 0."""

    axes: Mapping[str, int | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "axes", MappingProxyType(dict(self.axes)))

    def axis(self, name: str) -> int | None:
        return self.axes.get(name, 0)

    def shared(self, name: str) -> bool:
        return name in self.axes and self.axes[name] is None

    def to_samples(self, name: str, value: Any) -> Any:
        """``value`` (numpy array or torch tensor, model layout) with its samples on dim 0; shared
        values are returned as they are."""
        axis = self.axis(name)
        return value if axis in (0, None) else _move(value, axis, 0)

    def to_model(self, name: str, value: Any) -> Any:
        """The inverse of to_samples: samples back on the model's batch axis."""
        axis = self.axis(name)
        return value if axis in (0, None) else _move(value, 0, axis)

    def merged(self, more: Mapping[str, int | None]) -> "Layout":
        return Layout({**self.axes, **more})

    def to_dict(self) -> dict[str, int | None]:
        """The non-default entries (batch axis other than 0, or shared)."""
        return {k: v for k, v in self.axes.items() if v != 0}


def _move(value: Any, source: int, dest: int) -> Any:
    if hasattr(value, "movedim"):  # torch: converters may view() their inputs, so keep them contiguous
        return value.movedim(source, dest).contiguous()
    import numpy as np

    return np.ascontiguousarray(np.moveaxis(value, source, dest))


def follows_batch(shapes: Mapping[int, tuple[int, ...]]) -> int | None | str:
    """The batch axis of a tensor from its shapes at several batch sizes ({batch: shape}): the one
    axis whose length equals the batch in every run (axis 0 first when several do); None when no
    axis does and the shape stays the same (a shared tensor); 'varies' when the shape changes with
    the batch but no axis equals it (samples folded into another axis)."""
    ranks = {len(s) for s in shapes.values()}
    if len(ranks) != 1:
        return "varies"
    rank = ranks.pop()
    fits = [k for k in range(rank) if all(s[k] == b for b, s in shapes.items())]
    if fits:
        return fits[0]
    return None if len(set(shapes.values())) == 1 else "varies"
