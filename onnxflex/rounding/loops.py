"""ONNX Loop and Scan in torch, as BlockModule runs them: the body is unrolled, one run of its nodes per
iteration, so the gradients of a layer inside it flow through every iteration, and an activation point
inside it is observed (calibration) and quantized at every iteration, as the emitted QDQ body computes.

The body itself is a callable the interpreter makes (``Body``: the body's graph inputs in ONNX order →
its graph outputs in ONNX order), because the body reads the outer scope and the quantizers by name,
which a pure converter does not see.

Loop's trip count and condition are one value each for the whole batch (ONNX: a scalar or one-element
tensor), as onnxruntime sees them on the same batch: a count that depends on the data is the batch's.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from onnxflex.rounding.converters import OpNode

Body = Callable[[list], list]


def _one(node: OpNode, what: str, value: torch.Tensor):
    if value.numel() != 1:
        raise NotImplementedError(f"{node.op_type} node {node.name!r}: {what} of shape {tuple(value.shape)} "
                                  "is not one value")
    return value.reshape(-1)[0].item()


def run_loop(node: OpNode, inputs: Sequence[torch.Tensor | None], body: Body, device: torch.device
             ) -> tuple[list[torch.Tensor], int]:
    """(Loop's outputs, iterations run). ``inputs``: M (trip count) and cond, either None when omitted
    (an empty name), then the initial loop-carried values. Outputs: the final loop-carried values, then
    each scan output stacked over the iterations along a new axis 0. Zero iterations with scan outputs
    raise NotImplementedError (their shape is unknown without a body run)."""
    trips, cond, *carried = inputs
    if trips is None and cond is None:
        raise NotImplementedError(f"Loop node {node.name!r} has neither a trip count nor a condition: it "
                                  "would never end")
    limit = None if trips is None else int(_one(node, "trip count M", trips))
    going = True if cond is None else bool(_one(node, "condition", cond))
    scans: list[list[torch.Tensor]] = []
    count = 0
    while going and (limit is None or count < limit):
        iteration = torch.tensor(count, dtype=torch.int64, device=device)
        flag = torch.tensor(going, dtype=torch.bool, device=device)
        outputs = body([iteration, flag, *carried])
        going = bool(_one(node, "body condition", outputs[0]))
        carried = list(outputs[1:1 + len(carried)])
        scans.append(list(outputs[1 + len(carried):]))
        count += 1
    if not scans:
        if len(node.outputs) > len(carried):
            raise NotImplementedError(f"Loop node {node.name!r} ran no iteration on this batch, so its scan "
                                      "outputs have no shape")
        return list(carried), 0
    return list(carried) + [torch.stack(values) for values in zip(*scans)], count


def run_scan(node: OpNode, inputs: Sequence[torch.Tensor], body: Body) -> tuple[list[torch.Tensor], int]:
    """(Scan's outputs, iterations run), opset 9 and later. ``inputs``: the N initial state values, then
    the ``num_scan_inputs`` scanned tensors, each sliced along its ``scan_input_axes`` entry (default 0),
    last slice first where its ``scan_input_directions`` entry is 1. Outputs: the final states, then each
    scan output stacked along its ``scan_output_axes`` entry (default 0; negative counts from the stacked
    rank), in reverse iteration order where its ``scan_output_directions`` entry is 1."""
    m = int(node.attr("num_scan_inputs"))
    states, scanned = list(inputs[:len(inputs) - m]), list(inputs[len(inputs) - m:])
    axes = [a % x.ndim for a, x in zip(node.attr("scan_input_axes") or [0] * m, scanned)]
    reverse = node.attr("scan_input_directions") or [0] * m
    lengths = {x.shape[a] for x, a in zip(scanned, axes)}
    if len(lengths) != 1:
        raise NotImplementedError(f"Scan node {node.name!r}: scan inputs of different lengths {sorted(lengths)}")
    (length,) = lengths
    n = len(states)
    collected: list[list[torch.Tensor]] = []
    for t in range(length):
        slices = [x.select(a, length - 1 - t if r else t) for x, a, r in zip(scanned, axes, reverse)]
        outputs = body(states + slices)
        states = list(outputs[:n])
        collected.append(list(outputs[n:]))
    k = len(node.outputs) - n
    if not collected:
        if k:
            raise NotImplementedError(f"Scan node {node.name!r} scans a length-0 axis, so its scan outputs "
                                      "have no shape")
        return states, 0
    out_axes = node.attr("scan_output_axes") or [0] * k
    out_reverse = node.attr("scan_output_directions") or [0] * k
    stacked = []
    for values, axis, backwards in zip(zip(*collected), out_axes, out_reverse):
        values = list(values)[::-1] if backwards else list(values)
        stacked.append(torch.stack(values, dim=axis % (values[0].ndim + 1)))
    return states + stacked, length
