"""Element-wise, comparison, logical, cast and reduction converters.

Binary ops broadcast numpy-style, as ONNX does from opset 7; the legacy ``broadcast``/``axis``
attributes of opsets 1–6 are not supported.
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from onnx import TensorProto

from onnxflex.rounding.clamp import clamp
from onnxflex.rounding.converters.registry import OpNode, converter, numpy_value, optional_input, unsupported

Tensor = torch.Tensor

# Cast targets torch can hold; float8, int4, string and complex types have no torch equivalent here.
_TORCH_DTYPES = {
    TensorProto.FLOAT: torch.float32,
    TensorProto.DOUBLE: torch.float64,
    TensorProto.FLOAT16: torch.float16,
    TensorProto.BFLOAT16: torch.bfloat16,
    TensorProto.INT8: torch.int8,
    TensorProto.UINT8: torch.uint8,
    TensorProto.INT16: torch.int16,
    TensorProto.INT32: torch.int32,
    TensorProto.INT64: torch.int64,
    TensorProto.BOOL: torch.bool,
}




# --- arithmetic -------------------------------------------------------------------------------


@converter("Add", since=7)
def add(node: OpNode, inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """A + B with numpy broadcasting."""
    return (torch.add(inputs[0], inputs[1]),)


@converter("Sub", since=7)
def sub(node: OpNode, inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """A - B with numpy broadcasting."""
    return (torch.sub(inputs[0], inputs[1]),)


@converter("Mul", since=7)
def mul(node: OpNode, inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """A * B with numpy broadcasting."""
    return (torch.mul(inputs[0], inputs[1]),)


@converter("Div", since=7)
def div(node: OpNode, inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """A / B with numpy broadcasting; integer division truncates toward zero, as in C."""
    a, b = inputs[0], inputs[1]
    if a.is_floating_point():
        return (torch.div(a, b),)
    return (torch.div(a, b, rounding_mode="trunc"),)


@converter("Pow", since=7)
def pow_(node: OpNode, inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """A ** B with broadcasting; the result keeps A's dtype even when B's differs (opset 12+)."""
    return (torch.pow(inputs[0], inputs[1]).to(inputs[0].dtype),)


@converter("Max", since=8)
def max_(node: OpNode, inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """Element-wise maximum of any number of broadcastable inputs."""
    return (functools.reduce(torch.maximum, inputs),)


@converter("Min", since=8)
def min_(node: OpNode, inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """Element-wise minimum of any number of broadcastable inputs."""
    return (functools.reduce(torch.minimum, inputs),)


@converter("Sum", since=8)
def sum_(node: OpNode, inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """Element-wise sum of any number of broadcastable inputs."""
    return (functools.reduce(torch.add, inputs),)


@converter("Mean", since=8)
def mean(node: OpNode, inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """Element-wise mean of any number of broadcastable inputs."""
    return (functools.reduce(torch.add, inputs) / len(inputs),)


# --- unary maps without attributes ---------------------------------------------------------------


class _Sqrt(torch.autograd.Function):
    """√x whose gradient is 0 where √x is 0 (or NaN), not torch.sqrt's inf: a magnitude
    √(re² + im²) of an STFT bin that is exactly 0 would otherwise turn the block loss's gradient into
    NaN (0 · inf) and every parameter behind it with it."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        y = torch.sqrt(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (y,) = ctx.saved_tensors
        return torch.where(y > 0, grad / (2 * y), torch.zeros_like(grad))


def sqrt(x: Tensor) -> Tensor:
    """Element-wise √x with a zero gradient at 0 (_Sqrt)."""
    return _Sqrt.apply(x)

# op_type → (since, torch function). All are element-wise and keep the input's shape and dtype.
_UNARY: dict[str, tuple[int, Callable[[Tensor], Tensor]]] = {
    "Sqrt": (6, sqrt),
    "Exp": (6, torch.exp),
    "Log": (6, torch.log),
    "Neg": (6, torch.neg),
    "Abs": (6, torch.abs),
    "Reciprocal": (6, torch.reciprocal),
    "Relu": (6, torch.relu),
    "Sigmoid": (6, torch.sigmoid),
    "Tanh": (6, torch.tanh),
    "Erf": (9, torch.erf),
    "Softplus": (1, F.softplus),
    "Softsign": (1, F.softsign),
    "HardSwish": (14, F.hardswish),
    "Mish": (18, F.mish),
    "Floor": (6, torch.floor),
    "Ceil": (6, torch.ceil),
    "Round": (11, torch.round),  # both round half to even
    "Sign": (9, torch.sign),
    "Sin": (7, torch.sin),
    "Cos": (7, torch.cos),
    "Not": (1, torch.logical_not),
    "IsNaN": (9, torch.isnan),  # GPT-2 exports guard its attention softmax with IsNaN -> Where
    "Identity": (1, lambda x: x),
}


@converter("IsInf", since=10)
def is_inf(node: OpNode, inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """Bool, same shape: where x is +inf (detect_positive, default 1) or -inf (detect_negative, default 1)."""
    x = inputs[0]
    positive = torch.isposinf(x) if node.attr("detect_positive", 1) else torch.zeros_like(x, dtype=torch.bool)
    negative = torch.isneginf(x) if node.attr("detect_negative", 1) else torch.zeros_like(x, dtype=torch.bool)
    return (positive | negative,)


def _unary(op_type: str, fn: Callable[[Tensor], Tensor]):
    def convert(node: OpNode, inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
        return (fn(inputs[0]),)

    convert.__name__ = op_type.lower()
    convert.__doc__ = f"ONNX {op_type}: element-wise, same shape and dtype."
    return convert


for _op, (_since, _fn) in _UNARY.items():
    converter(_op, since=_since)(_unary(_op, _fn))


# --- activations with attributes -----------------------------------------------------------------


@converter("LeakyRelu", since=6)
def leaky_relu(node: OpNode, inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """x if x >= 0 else alpha * x; alpha defaults to 0.01."""
    return (F.leaky_relu(inputs[0], float(node.attr("alpha", 0.01))),)


@converter("Elu", since=6)
def elu(node: OpNode, inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """x if x > 0 else alpha * (exp(x) - 1); alpha defaults to 1."""
    return (F.elu(inputs[0], float(node.attr("alpha", 1.0))),)


@converter("Selu", since=6)
def selu(node: OpNode, inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """gamma * (x if x > 0 else alpha * (exp(x) - 1)), with ONNX's default alpha and gamma."""
    x = inputs[0]
    alpha = float(node.attr("alpha", 1.67326319217681884765625))
    gamma = float(node.attr("gamma", 1.05070102214813232421875))
    return (gamma * torch.where(x > 0, x, alpha * torch.expm1(x)),)


@converter("HardSigmoid", since=6)
def hard_sigmoid(node: OpNode, inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """clip(alpha * x + beta, 0, 1); alpha 0.2 and beta 0.5 by default (not torch's 1/6, 1/2)."""
    alpha, beta = float(node.attr("alpha", 0.2)), float(node.attr("beta", 0.5))
    return (clamp(alpha * inputs[0] + beta, 0.0, 1.0),)


@converter("Gelu", since=20)
def gelu(node: OpNode, inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """GELU with approximate 'none' (erf) or 'tanh'."""
    approximate = node.attr("approximate", "none")
    if approximate not in ("none", "tanh"):
        raise unsupported(node, f"approximate={approximate!r}")
    return (F.gelu(inputs[0], approximate=approximate),)


@converter("Clip", since=6)
def clip_attrs(node: OpNode, inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """clamp(x, min, max) with float attributes min and max (opsets 6–10)."""
    return (clamp(inputs[0], float(node.attr("min", -3.4028234663852886e38)),
                  float(node.attr("max", 3.4028234663852886e38))),)


@converter("Clip", since=11)
def clip(node: OpNode, inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """clamp(x, min, max) with optional 0-d inputs min and max; an omitted bound does not clip."""
    low, high = optional_input(inputs, 1), optional_input(inputs, 2)
    if low is None and high is None:
        return (inputs[0],)
    if low is None or high is None:  # one-sided: torch's clamp (clamp's fast gradient needs both bounds)
        return (torch.clamp(inputs[0], low, high),)
    return (clamp(inputs[0], low, high),)


# --- comparison, logic, selection ----------------------------------------------------------------

# op_type → (since, torch function); the result is bool with the broadcast shape.
_COMPARE: dict[str, tuple[int, Callable[[Tensor, Tensor], Tensor]]] = {
    "Equal": (7, torch.eq),
    "Less": (7, torch.lt),
    "Greater": (7, torch.gt),
    "LessOrEqual": (12, torch.le),
    "GreaterOrEqual": (12, torch.ge),
    "And": (7, torch.logical_and),
    "Or": (7, torch.logical_or),
    "Xor": (7, torch.logical_xor),
}


def _compare(op_type: str, fn: Callable[[Tensor, Tensor], Tensor]):
    def convert(node: OpNode, inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
        return (fn(inputs[0], inputs[1]),)

    convert.__name__ = op_type.lower()
    convert.__doc__ = f"ONNX {op_type}: bool result with numpy broadcasting."
    return convert


for _op, (_since, _fn) in _COMPARE.items():
    converter(_op, since=_since)(_compare(_op, _fn))


@converter("Where", since=9)
def where(node: OpNode, inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """X where condition else Y, all three broadcast together."""
    return (torch.where(inputs[0].bool(), inputs[1], inputs[2]),)


# --- dtype and inference-only ops ----------------------------------------------------------------


def _torch_dtype(node: OpNode, onnx_type: int) -> torch.dtype:
    if onnx_type not in _TORCH_DTYPES:
        raise unsupported(node, f"target type {TensorProto.DataType.Name(onnx_type)}")
    return _TORCH_DTYPES[onnx_type]


@converter("Cast", since=6)
def cast(node: OpNode, inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """x converted to the TensorProto type ``to``; float → int truncates toward zero."""
    return (inputs[0].to(_torch_dtype(node, int(node.attr("to")))),)


@converter("CastLike", since=15)
def cast_like(node: OpNode, inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """x converted to the dtype of the second input."""
    return (inputs[0].to(inputs[1].dtype),)


@converter("Dropout", since=7)
def dropout(node: OpNode, inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """Inference dropout: the identity, plus an all-true mask when the node asks for output 1.

    training_mode=true (opset 12+) is not supported: it would need a random mask.
    """
    x, training = inputs[0], optional_input(inputs, 2)
    if training is not None and bool(numpy_value(training)):
        raise unsupported(node, "training_mode=true")
    if len(node.outputs) < 2 or not node.outputs[1]:
        return (x,)
    # The mask is bool from opset 10; before that it had the input's type.
    mask = torch.ones_like(x, dtype=torch.bool if node.opset >= 10 else x.dtype)
    return (x, mask)


# --- reductions ----------------------------------------------------------------------------------


def _reduce(node: OpNode, x: Tensor, axes: Sequence[int] | None,
            fn: Callable[..., Tensor]) -> tuple[Tensor, ...]:
    """Reduce ``x`` over ``axes`` (all axes when empty, unless noop_with_empty_axes); keepdims default 1."""
    keepdims = bool(node.attr("keepdims", 1))
    if not axes:
        if node.attr("noop_with_empty_axes", 0):
            return (x,)
        axes = range(x.dim())
    dims = tuple(sorted({int(a) % x.dim() for a in axes}))
    if not dims:  # a 0-d input has nothing to reduce
        return (x,)
    return (fn(x, dim=dims, keepdim=keepdims),)


def _reduction(op_type: str, fn: Callable[..., Tensor], axes_from_input: bool):
    def convert(node: OpNode, inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
        if axes_from_input:
            given = optional_input(inputs, 1)
            axes = None if given is None else [int(a) for a in numpy_value(given).reshape(-1)]
        else:
            axes = node.attr("axes")
        return _reduce(node, inputs[0], axes, fn)

    form = "input" if axes_from_input else "attribute"
    convert.__name__ = f"{op_type.lower()}_axes_{form}"
    convert.__doc__ = f"ONNX {op_type} with axes as {form}; keepdims default 1, noop_with_empty_axes honoured."
    return convert


def _prod(x: Tensor, dim: tuple[int, ...], keepdim: bool) -> Tensor:
    # torch.prod reduces one dim at a time; go from the last so earlier indices stay valid.
    for d in sorted(dim, reverse=True):
        x = torch.prod(x, dim=d, keepdim=keepdim)
    return x


def _l1(x: Tensor, dim: tuple[int, ...], keepdim: bool) -> Tensor:
    return torch.sum(torch.abs(x), dim=dim, keepdim=keepdim)


def _l2(x: Tensor, dim: tuple[int, ...], keepdim: bool) -> Tensor:
    return torch.sqrt(torch.sum(x * x, dim=dim, keepdim=keepdim))


def _sum_square(x: Tensor, dim: tuple[int, ...], keepdim: bool) -> Tensor:
    return torch.sum(x * x, dim=dim, keepdim=keepdim)


def _log_sum(x: Tensor, dim: tuple[int, ...], keepdim: bool) -> Tensor:
    return torch.log(torch.sum(x, dim=dim, keepdim=keepdim))


# op_type → (torch reduction, first opset where axes is an input).
_REDUCTIONS: dict[str, tuple[Callable[..., Tensor], int]] = {
    "ReduceMean": (torch.mean, 18),
    "ReduceSum": (torch.sum, 13),
    "ReduceMax": (torch.amax, 18),
    "ReduceMin": (torch.amin, 18),
    "ReduceProd": (_prod, 18),
    "ReduceL1": (_l1, 18),
    "ReduceL2": (_l2, 18),
    "ReduceSumSquare": (_sum_square, 18),
    "ReduceLogSum": (_log_sum, 18),
    "ReduceLogSumExp": (torch.logsumexp, 18),
}


for _op, (_fn, _input_since) in _REDUCTIONS.items():
    converter(_op, since=1)(_reduction(_op, _fn, axes_from_input=False))
    converter(_op, since=_input_since)(_reduction(_op, _fn, axes_from_input=True))
