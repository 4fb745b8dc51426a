"""pin_inputs: specialise the model to fixed values of some inputs (``QuantConfig.fix_inputs``, --fix-input).

Every read of a pinned input (top-level nodes, graph outputs and subgraph outer-scope reads) becomes a
read of a new constant initializer holding the value in the input's dtype, so constant folding
evaluates what the input selects (``sr == 16000``) and control_flow.fold_constant_ifs inlines the If
branch it takes. The input stays a declared graph input, now with a default initializer of its own name
and no reader: callers that feed it still run the model (the value they feed is ignored), callers that
do not need not, and calibration does not need data for it.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from onnxflex.config import parse_fixed_input
from onnxflex.errors import ConfigError
from onnxflex.graph import NameScope
from onnxflex.inputs import NP_TYPES
from onnxflex.passes.context import PassContext
from onnxflex.passes.control_flow import rename_outer_reads, subgraphs


def pinned_values(model: onnx.ModelProto, specs: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Input name → its pinned value as an array of the input's dtype and declared rank (0-d or 1-D).
    Raises ConfigError for a name the model does not declare, a dtype onnxflex cannot build, or a value
    whose rank does not fit the declared input."""
    declared = {vi.name: vi for vi in model.graph.input}
    values = {}
    for spec in specs:
        name, value = parse_fixed_input(spec)
        vi = declared.get(name)
        if vi is None:
            raise ConfigError(f"--fix-input {spec}: the model has no input {name!r}; its inputs are "
                              f"{', '.join(repr(n) for n in declared)}")
        dtype = NP_TYPES.get(vi.type.tensor_type.elem_type)
        if dtype is None:
            raise ConfigError(f"--fix-input {spec}: input {name!r} has an ONNX type onnxflex cannot pin "
                              f"({vi.type.tensor_type.elem_type})")
        array = np.asarray(value, dtype=dtype)
        rank = len(vi.type.tensor_type.shape.dim) if vi.type.tensor_type.HasField("shape") else array.ndim
        if array.ndim != rank:
            raise ConfigError(f"--fix-input {spec}: input {name!r} has rank {rank}, the value has rank "
                              f"{array.ndim}; give one number for a 0-d input, comma-separated numbers for 1-D")
        values[name] = array
    return values


def pin_inputs(model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
    """Mutates and returns ``model``: reads of each pinned input are replaced by a constant, and the
    input gets a default initializer (see the module docstring). Adds one warning per pinned input.
    Running it twice changes nothing more."""
    values = pinned_values(model, ctx.config.fix_inputs)
    if not values:
        return model
    g = model.graph
    scope = NameScope.of(model)
    defaults = {t.name for t in g.initializer}
    for name, value in values.items():
        pinned = scope.unique_name(f"{name}_pinned")
        readers = _replace_reads(g, name, pinned)
        if readers:
            g.initializer.append(numpy_helper.from_array(value, pinned))
        if name not in defaults:
            g.initializer.append(numpy_helper.from_array(value, name))
        shown = value.tolist()
        ctx.warnings.append(f"input {name!r} is pinned to {shown} (--fix-input): the quantized model is "
                            f"specialised to that value; it still declares {name!r} but never reads it")
    return model


def _replace_reads(g: onnx.GraphProto, old: str, new: str) -> int:
    """Mutates ``g``: top-level reads, graph outputs and subgraph outer reads of ``old`` become ``new``;
    returns how many places read it."""
    count = 0
    for node in g.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
                count += 1
        for _, sub in subgraphs(node):
            count += rename_outer_reads(sub, old, new)
    for out in g.output:
        if out.name == old:
            raise ConfigError(f"--fix-input {old}=...: input {old!r} is also a graph output; a pinned input "
                              "cannot be passed through — pin another input or drop the output")
    return count


def restore_declarations(model: onnx.ModelProto, declared: list[onnx.ValueInfoProto],
                         values: dict[str, np.ndarray]) -> None:
    """Mutates: each pinned input in ``declared`` that a later pass dropped (as an unread input or an
    unused initializer) is declared again, with its default initializer."""
    g = model.graph
    inputs = {vi.name for vi in g.input}
    inits = {t.name for t in g.initializer}
    for vi in declared:
        if vi.name in values and vi.name not in inputs:
            g.input.append(vi)
        if vi.name in values and vi.name not in inits:
            g.initializer.append(numpy_helper.from_array(values[vi.name], vi.name))
