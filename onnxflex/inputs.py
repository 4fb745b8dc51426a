"""A model's run-time inputs as calibration reads them: declared dims and dtypes, and the options
(--batch-axis, --fix-input) that say how the given arrays map onto them."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxflex.graph import graph_input_names

NP_TYPES = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16,
            onnx.TensorProto.DOUBLE: np.float64, onnx.TensorProto.INT64: np.int64,
            onnx.TensorProto.INT32: np.int32, onnx.TensorProto.UINT8: np.uint8, onnx.TensorProto.INT8: np.int8,
            onnx.TensorProto.BOOL: np.bool_}


@dataclass(frozen=True)
class InputOptions:
    """How calibration reads the model's inputs: ``batch_axes`` (--batch-axis NAME=AXIS) says which axis
    of the given array carries the samples; ``fixed`` (--fix-input NAME=VALUE) pins an input to a value
    fed to every run, so it needs no data."""

    batch_axes: Mapping[str, int] = field(default_factory=dict)
    fixed: Mapping[str, float | tuple[float, ...]] = field(default_factory=dict)

    @classmethod
    def from_specs(cls, batch_axes=(), fix_inputs=()) -> "InputOptions":
        """From the flags' strings: ``batch_axes`` as NAME=AXIS, ``fix_inputs`` as NAME=VALUE."""
        from onnxflex.config import parse_batch_axis, parse_fixed_input

        return cls(dict(map(parse_batch_axis, batch_axes)), dict(map(parse_fixed_input, fix_inputs)))

    @classmethod
    def from_config(cls, config) -> "InputOptions":
        """From a DataOptions' (or a QuantConfig's) ``batch_axes`` and ``fix_inputs``."""
        return cls.from_specs(config.batch_axes, config.fix_inputs)

    def batch_axis(self, vi: onnx.ValueInfoProto) -> int:
        """The axis of input ``vi`` that carries the samples when no data says so: the one --batch-axis
        gives, else the input's only unknown dim (a state ``[2, ?, 128]`` carries its batch on axis 1)
        unless axis 0 is declared 1 (``[1, 1, 64, W]``: a model that fixes its batch at 1, W is a width),
        else axis 0."""
        dims = input_dims(vi)
        unknown = [k for k, d in enumerate(dims) if d is None]
        alone = unknown[0] if len(unknown) == 1 and dims[0] != 1 else 0
        return self.batch_axes.get(vi.name, alone)


def model_inputs(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    """The inputs fed at run time, by name, in graph order."""
    names = set(graph_input_names(model))
    return {vi.name: vi for vi in model.graph.input if vi.name in names}


def known_dim(dim: onnx.TensorShapeProto.Dimension) -> int | None:
    """A declared dimension's size, or None when it is unknown: symbolic (``N``, ``unk__214``, an empty
    ``dim_param``), unset, or a non-positive ``dim_value`` (legacy Paddle2ONNX writes -1, some
    converters 0, for a dynamic batch)."""
    return dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0 else None


def input_dims(vi: onnx.ValueInfoProto) -> list[int | None]:
    """The declared shape of a model input, None for an unknown dimension (see known_dim)."""
    return [known_dim(d) for d in vi.type.tensor_type.shape.dim]


def show_dims(dims) -> str:
    """[?, 1, 16, 16]: how error messages print a declared shape."""
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"
