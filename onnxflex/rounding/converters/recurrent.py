"""Recurrent layer converters: LSTM (gate order iofc) and GRU (zrh), as ONNX defines them.

X is [T, N, K] (``layout`` 0) or [N, T, K] (``layout`` 1); W [D, G·H, K], R [D, G·H, H], B [D, 2·G·H]
(W then R biases), initial states [D, N, H]; D = 2 for ``direction='bidirectional'`` (forward first).
Outputs Y [T, D, N, H] (layout 1: [N, T, D, H]) and Y_h, Y_c [D, N, H] (layout 1: [N, D, H]).
Activations other than Sigmoid/Tanh/Relu, their alpha/beta, and a ``sequence_lens`` input are not
supported, nor is an LSTM's ``clip`` (onnxruntime's clipped LSTM departs from the ONNX
text in ways not followed here): the block then runs in onnxruntime.

``dynamic_quantize_lstm`` is the LSTM as onnxruntime's com.microsoft DynamicQuantizeLSTM computes it
(the emitter's form of a quantized LSTM, passes/recurrent.py): the weights are already the dequantized
int8 values (their rounders stand in for W and R), and each matrix product quantizes its float operand
first, uint8 with the range (including 0) of what it multiplies: the whole input sequence for X·W,
the batch's hidden state at each step for H·R. onnxruntime splits the batch over its intra-op threads
for H·R when the batch is 2 or more, each part with its own range; the simulation takes the whole
batch, so the two agree exactly on one thread or one sample, and to the rounding of one uint8 step
otherwise.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from onnxflex.rounding.converters.registry import OpNode, converter, optional_input, unsupported
from onnxflex.rounding.quant import round_ste

Tensor = torch.Tensor
Quantizer = Callable[[Tensor], Tensor]

_ACTIVATIONS = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": torch.relu}


def dynamic_uint8(x: Tensor) -> Tensor:
    """``x`` quantized to uint8 and back with its own range widened to include 0, as onnxruntime's
    dynamic quantization computes it (step (max − min)/255, zero point rounded half to even, values
    rounded half to even); gradients pass straight through."""
    lo = torch.clamp(x.detach().min(), max=0.0)
    hi = torch.clamp(x.detach().max(), min=0.0)
    if bool(hi == lo):
        return x
    step = (hi - lo) / 255.0
    zero = torch.clamp(torch.round(-lo / step), 0.0, 255.0)
    return (torch.clamp(round_ste(x / step) + zero, 0.0, 255.0) - zero) * step


def _identity(x: Tensor) -> Tensor:
    return x


def _activations(node: OpNode, count: int, defaults: tuple[str, ...]) -> list[list[Callable]]:
    """The node's activations, ``count`` per direction (ONNX names, case-insensitive)."""
    if node.attr("activation_alpha") is not None or node.attr("activation_beta") is not None:
        raise unsupported(node, "activation_alpha/activation_beta")
    names = node.attr("activations") or list(defaults) * _directions(node)
    fns = []
    for name in names:
        if name.lower() not in _ACTIVATIONS:
            raise unsupported(node, f"activation {name!r}")
        fns.append(_ACTIVATIONS[name.lower()])
    return [fns[d * count:(d + 1) * count] for d in range(len(fns) // count)]


def _directions(node: OpNode) -> int:
    return 2 if node.attr("direction", "forward") == "bidirectional" else 1


def _sequence_major(node: OpNode, x: Tensor, seq_lens: Tensor | None) -> Tensor:
    """X as [T, N, K]; refuses sequence_lens (per-sample lengths are data: one batch of held-out
    samples could hold a short one after calibration saw none)."""
    if seq_lens is not None:
        raise unsupported(node, "sequence_lens")
    return x.transpose(0, 1) if node.attr("layout", 0) else x


def _state(value: Tensor | None, node: OpNode, d: int, batch: int, hidden: int, like: Tensor) -> Tensor:
    if value is None:
        return like.new_zeros(batch, hidden)
    return (value.transpose(0, 1) if node.attr("layout", 0) else value)[d]


def _outputs(node: OpNode, ys: list[Tensor], finals: list[list[Tensor]]) -> tuple[Tensor, ...]:
    """(Y, final states...) in the node's layout from per-direction [T, N, H] and [N, H] tensors."""
    y = torch.stack(ys, dim=1)  # [T, D, N, H]
    states = [torch.stack(f, dim=0) for f in finals]  # [D, N, H] each
    if node.attr("layout", 0):
        return (y.permute(2, 0, 1, 3),) + tuple(s.transpose(0, 1) for s in states)
    return (y,) + tuple(states)


def _lstm(node: OpNode, inputs: Sequence[Tensor | None], quantize: Quantizer) -> tuple[Tensor, ...]:
    x = _sequence_major(node, inputs[0], optional_input(inputs, 4))
    hidden = int(node.attr("hidden_size") or inputs[2].shape[-1])
    dirs = _directions(node)
    w, r = inputs[1].reshape(dirs, 4 * hidden, -1), inputs[2].reshape(dirs, 4 * hidden, hidden)
    b, h0, c0, p = (optional_input(inputs, k) for k in (3, 5, 6, 7))
    clip = node.attr("clip")
    if clip is not None:
        raise unsupported(node, "clip")
    acts = _activations(node, 3, ("Sigmoid", "Tanh", "Tanh"))
    xq = quantize(x)
    ys, hs, cs = [], [], []
    for d in range(dirs):
        f, g, h_act = acts[d]
        reverse = node.attr("direction", "forward") == "reverse" or d == 1
        gates_x = xq @ w[d].T + (0 if b is None else b[d, :4 * hidden] + b[d, 4 * hidden:])
        h = _state(h0, node, d, x.shape[1], hidden, x)
        c = _state(c0, node, d, x.shape[1], hidden, x)
        pi, po, pf = (None, None, None) if p is None else p[d].split(hidden)
        out = [None] * x.shape[0]
        for t in (range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])):
            gi, go, gf, gc = (gates_x[t] + quantize(h) @ r[d].T).split(hidden, dim=-1)
            if pi is not None:
                gi, gf = gi + pi * c, gf + pf * c
            if clip is not None:
                gi, go, gf, gc = (v.clamp(-clip, clip) for v in (gi, go, gf, gc))
            i = f(gi)
            forget = 1.0 - i if node.attr("input_forget", 0) else f(gf)
            c = forget * c + i * g(gc)
            if po is not None:
                go = go + po * c
                if clip is not None:
                    go = go.clamp(-clip, clip)
            h = f(go) * h_act(c)
            out[t] = h
        ys.append(torch.stack(out))
        hs.append(h)
        cs.append(c)
    return _outputs(node, ys, [hs, cs])


@converter("LSTM", since=7)
def lstm(node: OpNode, inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    return _lstm(node, inputs, _identity)


def dynamic_quantize_lstm(node: OpNode, inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """An LSTM node as DynamicQuantizeLSTM runs it (module docstring); ``inputs`` in the LSTM's order."""
    return _lstm(node, inputs, dynamic_uint8)


@converter("GRU", since=7)
def gru(node: OpNode, inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    x = _sequence_major(node, inputs[0], optional_input(inputs, 4))
    hidden = int(node.attr("hidden_size") or inputs[2].shape[-1])
    dirs = _directions(node)
    w, r = inputs[1].reshape(dirs, 3 * hidden, -1), inputs[2].reshape(dirs, 3 * hidden, hidden)
    b, h0 = optional_input(inputs, 3), optional_input(inputs, 5)
    clip = node.attr("clip")
    before_reset = bool(node.attr("linear_before_reset", 0))
    acts = _activations(node, 2, ("Sigmoid", "Tanh"))
    ys, hs = [], []
    for d in range(dirs):
        f, g = acts[d]
        reverse = node.attr("direction", "forward") == "reverse" or d == 1
        wb, rb = (None, None) if b is None else (b[d, :3 * hidden], b[d, 3 * hidden:])
        gates_x = x @ w[d].T + (0 if wb is None else wb)
        rz, rr, rh = r[d].split(hidden)
        rbz, rbr, rbh = (0, 0, 0) if rb is None else rb.split(hidden)
        h = _state(h0, node, d, x.shape[1], hidden, x)
        out = [None] * x.shape[0]
        for t in (range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])):
            xz, xr, xh = gates_x[t].split(hidden, dim=-1)
            gz, gr = xz + h @ rz.T + rbz, xr + h @ rr.T + rbr
            if clip is not None:
                gz, gr = gz.clamp(-clip, clip), gr.clamp(-clip, clip)
            z, reset = f(gz), f(gr)
            gh = xh + (reset * (h @ rh.T + rbh) if before_reset else (reset * h) @ rh.T + rbh)
            if clip is not None:
                gh = gh.clamp(-clip, clip)
            h = (1.0 - z) * g(gh) + z * h
            out[t] = h
        ys.append(torch.stack(out))
        hs.append(h)
    return _outputs(node, ys, [hs])


QUANTIZED = {"LSTM": dynamic_quantize_lstm}  # op → its integer kernel's simulation (passes/recurrent.py)
