"""Run a block's ONNX nodes in torch, with rounders and activation quantizers standing in by name.

The interpreter looks every input up by its ONNX tensor name: a weight initializer that has a rounder
is replaced by ``rounder.fake_quant()``, a tensor that is an activation quant point is replaced by its
quantized value as soon as it is produced (so every consumer sees the same value, as in the emitted
QDQ graph), and all other initializers are constants. A quantized recurrent layer (an LSTM the emitter
writes as DynamicQuantizeLSTM) runs as that kernel computes it (converters/recurrent.py).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
import torch

from onnxflex.blocks import Block
from onnxflex.extdata import tensor_array
from onnxflex.qparams import ActParams, QuantizedBias, QuantParams
from onnxflex.rounding.activation import ActQuantizer
from onnxflex.rounding.converters import OpNode, find_converter
from onnxflex.rounding.converters.recurrent import QUANTIZED as QUANTIZED_RECURRENT
from onnxflex.rounding.rounders import Rounder

Observer = Callable[[str, torch.Tensor], None]
INT32_MAX = 2_147_483_520.0  # largest float32 below 2**31, so the int32 cast cannot overflow


@dataclass
class QuantState:
    """Model-wide quantizers, keyed by ONNX names: weight initializer → rounder, tensor → activation
    quantizer, bias initializer → (weight name, input tensor) for int32 bias quantization."""

    rounders: dict[str, Rounder] = field(default_factory=dict)
    acts: dict[str, ActQuantizer] = field(default_factory=dict)
    int32_biases: dict[str, tuple[str, str]] = field(default_factory=dict)
    bias_values: dict[str, torch.Tensor] = field(default_factory=dict)

    @torch.no_grad()
    def export(self, act_dtype: int) -> QuantParams:
        """The integers and steps that reproduce the simulation exactly, for the emitter."""
        weights = {name: r.export() for name, r in self.rounders.items()}
        acts = {name: ActParams(*a.export(), act_dtype) for name, a in self.acts.items() if a.enabled}
        biases = {}
        for bias in self.int32_biases:
            quantized = self.quantized_bias(bias)
            if quantized is not None:
                ints, step = (t.cpu().numpy() for t in quantized)
                biases[bias] = QuantizedBias(ints.astype(np.int32), step.astype(np.float32))
        return QuantParams(weights, biases, acts)

    def quantized_bias(self, bias: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(integers, step) of an int32 bias: step = input step × weight step; None while the input
        has no enabled activation quantizer."""
        weight, tensor = self.int32_biases[bias]
        act = self.acts.get(tensor)
        if act is None or not act.enabled:
            return None
        step = (act.scale() * self.rounders[weight].scale()).detach()
        return torch.clamp(torch.round(self.bias_values[bias] / step), -INT32_MAX, INT32_MAX), step


class BlockModule(torch.nn.Module):
    """A block as a torch module: ``forward({input name: tensor}) -> {output name: tensor}``.

    Inputs and outputs carry the batch on dim 0. Quantizers are owned by ``state``; the module registers
    the ones its block creates so that ``parameters()`` lists what reconstruction learns.
    """

    def __init__(self, block: Block, model: onnx.ModelProto, opset: int, state: QuantState,
                 device: torch.device) -> None:
        super().__init__()
        self.block, self.state = block, state
        by_name = {n.name: n for n in model.graph.node}
        recurrent = {l.node for l in block.layers if l.op_type in QUANTIZED_RECURRENT}
        self.nodes = []  # (node, float converter, converter of its integer kernel or None)
        for name in block.nodes:
            node = OpNode.from_proto(by_name[name], opset)
            kernel = QUANTIZED_RECURRENT[node.op_type] if name in recurrent else None
            self.nodes.append((node, find_converter(node.op_type, opset, node.domain), kernel))
        used = {i for node, _, _ in self.nodes for i in node.inputs}
        self.constants = {t.name: torch.from_numpy(tensor_array(t, model).copy()).to(device)
                          for t in model.graph.initializer if t.name in used}
        self.own_rounders = torch.nn.ModuleList(state.rounders[l.weight] for l in block.layers)
        self.own_acts = torch.nn.ModuleList(state.acts[p] for p in block.act_points if p in state.acts)
        self.input_points = [p for p in block.act_points if p in block.inputs]
        self.quantize = True
        self._fixed: dict[str, torch.Tensor] | None = None

    @contextmanager
    def fixed_weights(self):
        """Within it, every quantized forward reuses one ``fake_quant()`` per weight, taken on entry
        without gradients: for loops over batches (evaluation, the quantized outputs, simulation) in
        which the rounders do not change. A model that fixes its batch at 1 would otherwise round
        every weight once per sample."""
        with torch.no_grad():
            self._fixed = {l.weight: self.state.rounders[l.weight].fake_quant() for l in self.block.layers}
        try:
            yield self
        finally:
            self._fixed = None

    def forward(self, feeds: dict[str, torch.Tensor], observe: Observer | None = None) -> dict[str, torch.Tensor]:
        env: dict[str, torch.Tensor] = dict(feeds)
        for name in self.input_points:
            env[name] = self._point(name, env[name], observe)
        if not self.quantize:
            weights = {}
        elif self._fixed is not None:
            weights = self._fixed
        else:
            weights = {l.weight: self.state.rounders[l.weight].fake_quant() for l in self.block.layers}
        for node, convert, kernel in self.nodes:
            inputs = [self._value(name, env, weights) for name in node.inputs]
            if self.quantize and kernel is not None:
                convert = kernel
            for name, value in zip(node.outputs, convert(node, inputs)):
                env[name] = self._point(name, value, observe) if name in self.state.acts else value
        return {name: env[name] for name in self.block.outputs}

    def _point(self, name: str, value: torch.Tensor, observe: Observer | None) -> torch.Tensor:
        if observe is not None:
            observe(name, value)
        act = self.state.acts.get(name)
        return act(value) if self.quantize and act is not None else value

    def _value(self, name: str, env, weights) -> torch.Tensor | None:
        if not name:
            return None
        if name in env:
            return env[name]
        if name in weights:
            return weights[name]
        if self.quantize and name in self.state.int32_biases:
            quantized = self.state.quantized_bias(name)
            if quantized is not None:
                return quantized[0] * quantized[1]
        return self.constants[name]

    def learnable(self) -> list[tuple[list[torch.nn.Parameter], str]]:
        groups = [g for r in self.own_rounders for g in r.param_groups()]
        acts = list({id(a): a.log_scale for a in self.own_acts}.values())  # tied points share one step
        return groups + ([(acts, "act_lr")] if acts else [])
