"""Fuse element-wise chains of a block's interpreter steps into one torch op where that is exact.

Exporters that know no HardSwish op (Paddle2ONNX at opset 11, older torch exports) write it as
``Div(Mul(x, Clip(Add(x, 3), 0, 6)), 6)``: four passes over the activation forward, and backward the
clamp's mask plus three more products, each a trip through memory on the CPU. torch's
``hardswish`` computes ``x * min(max(x + 3, 0), 6) / 6`` in float32 in the same order, so its forward
is bit for bit the chain's. Its own backward is not (it takes ``x / 3 + 0.5``), so the fused step's
backward recomputes the chain's gradient exactly as autograd would for the four ops:
``g/6 · clip + [0 ≤ x+3 ≤ 6] · (g/6 · x)``. Outputs and gradients (to the input and through it to
every step size and rounder) are identical to the unfused steps'; tests/test_loop_fusion.py checks
both.

A chain is fused only when nothing else can see its inner tensors: each is read by the next op only,
none is an activation quant point or a block output, and ``x`` (an act point or not) is read by the
chain's Add and Mul only (with a third reader, or as a block output, autograd would sum three gradient
terms in an order the fused op cannot mirror).
The fused step runs the chain as it was wherever the exact path does not apply: an input that is not
float32 on the CPU (bit identity is checked there), or constants other than 3, 0, 6 and 6.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from onnxflex.rounding.clamp import passed
from onnxflex.rounding.converters import OpNode

Step = tuple  # (OpNode, converter, integer kernel or None), as BlockModule compiles them
HARDSWISH_CONSTANTS = {"Add": 3.0, "Clip": (0.0, 6.0), "Div": 6.0}


def fuse_steps(steps: list[Step], constant: Callable[[str], np.ndarray | None], protected: set[str],
               outputs: set[str]) -> list[Step]:
    """``steps`` with each fusable HardSwish chain replaced by one step at the chain's Div (its output
    name, the chain's outside inputs). ``constant(name)``: the value of a constant tensor, None for a
    computed one; ``protected``: names no chain may hide (act points, block outputs); ``outputs``: the
    block outputs, which a chain's input must not be (the loss would add a third gradient term). Pure."""
    producer = {out: i for i, (node, _, _) in enumerate(steps) for out in node.outputs}
    readers: dict[str, int] = {}
    for node, _, _ in steps:
        for name in node.inputs:
            readers[name] = readers.get(name, 0) + 1
    fused: dict[int, Step] = {}
    dropped: set[int] = set()
    for i, (node, _, kernel) in enumerate(steps):
        chain = _hardswish_chain(i, steps, producer, readers, constant, protected, outputs)
        if chain is None or dropped.intersection(chain):
            continue
        dropped.update(chain[:-1])
        fused[i] = _fused_step([steps[j] for j in chain])
    return [fused.get(i, step) for i, step in enumerate(steps) if i not in dropped]


def _hardswish_chain(div: int, steps, producer, readers, constant, protected, outputs) -> list[int] | None:
    """Indices [Add, Clip, Mul, Div] of the chain ending at step ``div``, or None."""
    node = steps[div][0]
    if node.op_type != "Div" or len(node.inputs) != 2 or not _is(constant(node.inputs[1]), 6.0):
        return None
    mul = _private(node.inputs[0], "Mul", producer, readers, steps, protected)
    if mul is None:
        return None
    for x, clipped in (steps[mul][0].inputs, steps[mul][0].inputs[::-1]):
        clip = _private(clipped, "Clip", producer, readers, steps, protected)
        if clip is None or not _clips_0_6(steps[clip][0], constant):
            continue
        add = _private(steps[clip][0].inputs[0], "Add", producer, readers, steps, protected)
        if add is None or x in outputs or readers.get(x) != 2:
            continue
        a, b = steps[add][0].inputs
        if (a == x and _is(constant(b), 3.0)) or (b == x and _is(constant(a), 3.0)):
            return [add, clip, mul, div]
    return None


def _private(name: str, op_type: str, producer, readers, steps, protected) -> int | None:
    """The step making ``name`` when it is an ``op_type`` step, has one output, and ``name`` is read
    once and not protected."""
    i = producer.get(name)
    if i is None or name in protected or readers.get(name) != 1:
        return None
    node, _, kernel = steps[i]
    return i if node.op_type == op_type and len(node.outputs) == 1 and kernel is None else None


def _clips_0_6(node: OpNode, constant) -> bool:
    if node.opset < 11:
        return float(node.attr("min", -np.inf)) == 0.0 and float(node.attr("max", np.inf)) == 6.0
    return len(node.inputs) == 3 and _is(constant(node.inputs[1]), 0.0) and _is(constant(node.inputs[2]), 6.0)


def _is(value: np.ndarray | None, expected: float) -> bool:
    """A one-value float32 constant (0-d or 1-d, so broadcasting keeps the other operand's shape)
    equal to ``expected``."""
    return value is not None and value.dtype == np.float32 and value.size == 1 and value.ndim <= 1 \
        and float(value.reshape(-1)[0]) == expected


def _fused_step(chain: list[Step]) -> Step:
    """One step for the steps [Add, Clip, Mul, Div] of a HardSwish chain: outputs the Div's, inputs
    the chain's outside inputs (x first)."""
    add, clip, mul, div = (step[0] for step in chain)
    x = next(n for n in mul.inputs if n != clip.outputs[0])
    inner = {n.outputs[0] for n in (add, clip, mul, div)}
    outside = [x] + [i for n in (add, clip, mul, div) for i in n.inputs if i and i not in inner and i != x]
    node = OpNode("HardSwish", div.name, tuple(dict.fromkeys(outside)), div.outputs, div.opset)

    def run(step: OpNode, inputs: list) -> tuple[torch.Tensor]:
        env = dict(zip(step.inputs, inputs))
        value = env[x]
        if value.dtype != torch.float32 or value.device.type != "cpu":
            for n, fn, _ in chain:
                env.update(zip(n.outputs, fn(n, [env.get(i) if i else None for i in n.inputs])))
            return (env[div.outputs[0]],)
        return (_HardSwish.apply(value, env[next(i for i in add.inputs if i != x)], env[div.inputs[1]]),)

    return node, run, None


class _HardSwish(torch.autograd.Function):
    """Forward torch's hardswish (bit for bit the chain's forward, see the module docstring). Backward
    the gradient autograd computes for the unfused chain, in the same float operations: DivBackward's
    g = grad / 6, MulBackward's g·clip and g·x, the clamp's pass-through (clamp.passed: its exact
    one-pass form of torch's mask and where), their sum at x. The clip bounds are 0 and 6: the chain
    is fused only with those."""

    @staticmethod
    def forward(ctx, x, shift, divisor):
        ctx.shift, ctx.divisor = shift, divisor
        ctx.save_for_backward(x)
        return F.hardswish(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        low, high = HARDSWISH_CONSTANTS["Clip"]
        g = grad / ctx.divisor
        shifted = torch.add(x, ctx.shift)
        through = passed(g * x, shifted, low, high)
        return shifted.clamp_(low, high).mul_(g).add_(through), None, None
