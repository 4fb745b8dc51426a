"""Which axis of each calibration array carries the samples, and which inputs are shared by all.

Rules, per model input (``dims`` its declared shape, unknown dims None):
- ``--batch-axis NAME=AXIS`` decides.
- A model whose inputs all fix dim 0 (a fixed batch) carries samples on axis 0 of every input.
- An input with no unknown dim (a 0-d sample rate, a fixed-size table) has no sample axis: its array is
  one value shared by every sample, or N identical values stacked on a new axis 0.
- An input whose only unknown dim is one axis carries the samples there.
- Otherwise the samples are on the unknown axis whose length equals the other inputs' sample count,
  when exactly one fits; with no other input to count from, on axis 0 (the documented convention).
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx

from onnxflex.errors import CalibrationError
from onnxflex.inputs import NP_TYPES, InputOptions, input_dims, show_dims


def pinned_values(inputs: Mapping[str, onnx.ValueInfoProto], options: InputOptions, source: str
                  ) -> dict[str, np.ndarray]:
    """--fix-input values cast to their input's dtype (0-d for one number, 1-D for several); checks
    that every --fix-input and --batch-axis name is a model input."""
    for flag, names in (("--fix-input", options.fixed), ("--batch-axis", options.batch_axes)):
        unknown = sorted(set(names) - set(inputs))
        if unknown:
            raise CalibrationError(f"{flag} names {', '.join(map(repr, unknown))}, which the model does not have; "
                                   f"its inputs are {', '.join(map(repr, inputs))}")
    out = {}
    for name, value in options.fixed.items():
        dtype = NP_TYPES.get(inputs[name].type.tensor_type.elem_type)
        if dtype is None:
            raise CalibrationError(f"--fix-input {name}: the input's ONNX type cannot be fed")
        array = np.asarray(value, dtype=np.float64)
        dims = input_dims(inputs[name])
        if array.ndim == 0 and len(dims) >= 1 and all(d == 1 for d in dims):
            array = array.reshape([1] * len(dims))  # a number for a [1] or [1, 1] input
        if array.ndim != len(dims):
            raise CalibrationError(f"--fix-input {name}={value}: the input has shape {show_dims(dims)}; give "
                                   f"{'one number' if not dims else 'comma-separated numbers for a 1-D input'}")
        out[name] = array.astype(dtype)
    return out


def find_axes(arrays: Mapping[str, np.ndarray], inputs: Mapping[str, onnx.ValueInfoProto],
              explicit: Mapping[str, int], fixed_batch: bool, source: str) -> dict[str, int | None]:
    """Each input's batch axis in its array (None: shared), by the module's rules; raises
    CalibrationError naming the input and --batch-axis when the data does not decide it."""
    axes: dict[str, int | None] = {}
    undecided: dict[str, list[int]] = {}
    for name, array in arrays.items():
        dims = input_dims(inputs[name])
        candidates = [0] if fixed_batch else [k for k, d in enumerate(dims) if d is None]
        if name in explicit:
            candidates = [explicit[name]]
        _check_rank(name, array, dims, candidates, name in explicit, source)
        if not candidates or array.ndim == len(dims) + 1:
            axes[name] = None
        elif len(candidates) == 1:
            axes[name] = candidates[0]
        else:
            undecided[name] = candidates
    counts = {n: arrays[n].shape[a] for n, a in axes.items() if a is not None}
    if len(set(counts.values())) > 1:
        raise CalibrationError(f"{source}: inputs have different sample counts {counts} — if an input carries its "
                               "samples on another axis, pass --batch-axis NAME=AXIS")
    if not counts and undecided:
        first = next(iter(undecided))
        if 0 not in undecided[first]:
            _ambiguous(first, arrays[first], inputs[first], undecided[first], source)
        axes[first], counts[first] = 0, arrays[first].shape[0]
        del undecided[first]
    n = next(iter(counts.values()), None)
    for name, candidates in undecided.items():
        fits = [k for k in candidates if arrays[name].shape[k] == n]
        if len(fits) != 1:
            _ambiguous(name, arrays[name], inputs[name], candidates, source, n)
        axes[name] = fits[0]
    return axes


def _check_rank(name, array, dims, candidates, explicit: bool, source: str) -> None:
    stacked_ok = not candidates and not explicit  # N values of an unbatched input, stacked on axis 0
    if array.ndim == len(dims) or (stacked_ok and array.ndim == len(dims) + 1):
        if not explicit or candidates[0] < array.ndim:
            return
        raise CalibrationError(f"{source}: --batch-axis {name}={candidates[0]} but input {name!r} has rank "
                               f"{len(dims)} {show_dims(dims)}")
    where = "one value shared by every sample" if not candidates else "samples on one of its unknown dims"
    raise CalibrationError(f"{source}: input {name!r} has shape {list(array.shape)} but the model expects rank "
                           f"{len(dims)} {show_dims(dims)} ({where})")


def _ambiguous(name, array, vi, candidates, source: str, n: int | None = None) -> None:
    dims = input_dims(vi)
    count = f"length {n} (the other inputs' sample count)" if n is not None else "the samples"
    raise CalibrationError(
        f"{source}: cannot tell which axis of input {name!r} (shape {list(array.shape)}, declared "
        f"{show_dims(dims)}) carries {count}: unknown axes {candidates}; pass --batch-axis {name}=AXIS")


def shared_value(name: str, array: np.ndarray, rank: int, source: str) -> np.ndarray:
    """The one value of an unbatched input: the array, or the first of N identical stacked values."""
    if array.ndim == rank:
        return array
    if len(array) and not (array == array[:1]).all():
        raise CalibrationError(f"{source}: input {name!r} takes one value for every sample (it has no batch axis) "
                               f"but the data holds {len(array)} different values; give one value, or pin it "
                               f"with --fix-input {name}=VALUE")
    return np.asarray(array[0])
