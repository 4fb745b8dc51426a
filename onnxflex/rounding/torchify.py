"""Run a block's ONNX nodes in torch, with rounders and activation quantizers standing in by name.

The interpreter looks every input up by its ONNX tensor name: a weight initializer that has a rounder
is replaced by ``rounder.fake_quant()``, a tensor that is an activation quant point is replaced by its
quantized value as soon as it is produced (so every consumer sees the same value, as in the emitted
QDQ graph), and all other initializers are constants. A quantized recurrent layer (an LSTM the emitter
writes as DynamicQuantizeLSTM) runs as that kernel computes it (converters/recurrent.py).

If, Loop and Scan run in the interpreter itself (their subgraphs need the outer scope, which a pure
converter does not see): an If's condition is evaluated and the taken branch's nodes run through the
same lookup, with the outer tensors visible; a Loop or Scan body runs once per iteration, unrolled
(rounding/loops.py), its graph inputs bound to that iteration's values. So a layer inside a subgraph (at
any depth) is a rounder by name, and its act points are quantized where they are produced (or bound, for
a body input), as at the top level. ``BlockModule.ran`` records which subgraphs ran.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
import torch
import torch.utils.checkpoint

from onnxflex.blocks import Block
from onnxflex.extdata import tensor_array
from onnxflex.graph import DEFAULT_DOMAINS
from onnxflex.passes.control_flow import CONTROL_FLOW, subgraphs
from onnxflex.qparams import ActParams, QuantizedBias, QuantParams
from onnxflex.rounding.activation import ActQuantizer
from onnxflex.rounding.bias_correction import bias_shift
from onnxflex.rounding.converters import OpNode, find_converter
from onnxflex.rounding.converters.recurrent import QUANTIZED as QUANTIZED_RECURRENT
from onnxflex.rounding.fusion import fuse_steps
from onnxflex.rounding.loops import run_loop, run_scan
from onnxflex.rounding.rounders import Rounder

log = logging.getLogger("onnxflex")
# sees each act point's float value where it is made; a tensor it returns stands for the point's
# quantized value (divergence.locate feeds onnxruntime's values so), None keeps the module's own
Observer = Callable[[str, torch.Tensor], "torch.Tensor | None"]
INT32_MAX = 2_147_483_520.0  # largest float32 below 2**31, so the int32 cast cannot overflow
# A weight of at least this many values is fake-quantized under activation checkpointing while it
# learns: its rounding graph (the divisor, the quotient, the clamp, the integers: several weight-sized
# tensors per layer, for FlexRound seven) is not kept from the forward to the backward but run again
# there, one layer at a time. The gradients are the same bit for bit (the same ops run again). On a
# 1024-wide decoder layer (12.5 M weights) at W4 g32 the live peak of its learning went 872 -> 713 MiB.
RECOMPUTE_VALUES = 1 << 20


def quantized_weight(rounder: Rounder) -> torch.Tensor:
    """``rounder.fake_quant()``; while it learns (training mode, gradients on) with a float weight of
    RECOMPUTE_VALUES or more, under checkpointing (its graph is recomputed in the backward, not kept)."""
    weight = getattr(rounder, "weight", None)  # a FrozenRounder holds none
    if rounder.training and torch.is_grad_enabled() and weight is not None and weight.numel() >= RECOMPUTE_VALUES:
        return torch.utils.checkpoint.checkpoint(rounder.fake_quant, use_reentrant=False)
    return rounder.fake_quant()


def bias_limit(weight: torch.Tensor, axis: int) -> float:
    """Largest |int32 bias| of a layer that leaves its accumulator room for the weighted sum:
    onnxruntime's integer kernels add the bias to an int32 sum of fan-in products, each at most
    128 · 255 in magnitude, and an int32 past 2**31 wraps around (the simulation would not). A bias
    beyond it (a channel whose weights, and so their step, are tiny) is clamped, in both."""
    fan_in = weight.numel() // max(weight.shape[axis], 1)
    return max(INT32_MAX - fan_in * 128.0 * 255.0, 0.0)


@dataclass
class QuantState:
    """Model-wide quantizers, keyed by ONNX names: weight initializer → rounder, tensor → activation
    quantizer, bias initializer → (weight name, input tensor) for int32 bias quantization, with its
    float value and its integer limit (bias_limit). ``bias_axes``: the biases to correct, each with its
    layer input's channel axis; a bias in ``bias_means`` (its layer's input mean,
    laid out against the weight: rounding/bias_correction.py) follows its weight's rounding error until
    ``settle_bias`` writes the corrected value into ``bias_values``, before the block learns;
    ``settled_means`` then keeps (that mean, the uncorrected bias) until ``resettle_bias`` corrects it
    again for the rounding the block learned (reconstruct.BlockRunner.learn)."""

    rounders: dict[str, Rounder] = field(default_factory=dict)
    acts: dict[str, ActQuantizer] = field(default_factory=dict)
    int32_biases: dict[str, tuple[str, str]] = field(default_factory=dict)
    bias_values: dict[str, torch.Tensor] = field(default_factory=dict)
    bias_limits: dict[str, float] = field(default_factory=dict)
    bias_axes: dict[str, int] = field(default_factory=dict)
    bias_means: dict[str, torch.Tensor] = field(default_factory=dict)
    settled_means: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

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
                clamped = int(np.sum(np.abs(ints) >= self.bias_limits.get(bias, INT32_MAX)))
                if clamped:
                    log.warning("bias %r: %d channel(s) need an int32 beyond what the accumulator leaves "
                                "room for (their weights, and so the weight step, are tiny); clamped, so "
                                "those outputs lose part of their bias — exclude the layer with "
                                "--exclude-node to keep it exact in float", bias, clamped)
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
        limit = self.bias_limits.get(bias, INT32_MAX)
        return torch.clamp(torch.round(self.float_bias(bias) / step), -limit, limit), step

    @torch.no_grad()
    def float_bias(self, bias: str) -> torch.Tensor:
        """The bias before int32 rounding: its value, less the shift of the output mean that the
        weight's rounding as it is now makes, where it is to be corrected (``bias_means``)."""
        mean = self.bias_means.get(bias)
        return self.bias_values[bias] if mean is None else self._corrected(bias, self.bias_values[bias], mean)

    def _corrected(self, bias: str, value: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        """``value`` less the output-mean shift Σ_in (Ŵ − W) · μ of the bias's weight as rounded now."""
        rounder = self.rounders[self.int32_biases[bias][0]]
        return value - bias_shift(rounder.fake_quant(), rounder.weight, mean, rounder.axis)

    @torch.no_grad()
    def settle_bias(self, bias: str) -> None:
        """Mutates: a corrected bias's value becomes the corrected one for the weight's rounding as it is
        now (reconstruct.settle_biases: the block's start), and it stops following the weight."""
        if bias in self.bias_means:
            self.settled_means[bias] = (self.bias_means[bias], self.bias_values[bias])
            self.bias_values[bias] = self.float_bias(bias).clone()
            del self.bias_means[bias]

    @torch.no_grad()
    def resettle_bias(self, bias: str) -> None:
        """Mutates: a settled bias's value becomes the one that corrects its weight's rounding as it is
        now (the learned one), b − Σ_in (Ŵ − W) · μ from the uncorrected b, and the bias is final. A
        bias ``settle_bias`` never settled keeps its value."""
        settled = self.settled_means.pop(bias, None)
        if settled is not None:
            mean, uncorrected = settled
            self.bias_values[bias] = self._corrected(bias, uncorrected, mean)


def torch_supported(node: onnx.NodeProto, opset: int) -> bool:
    """Whether BlockModule can run ``node``: a registered converter (and no subgraph), or an If, a Loop or
    a Scan (opset 9 on: Scan 8 has a batch axis of its own) whose subgraphs hold only such nodes, at any
    depth."""
    if _control_flow(node) and (node.op_type != "Scan" or opset >= 9):
        return all(torch_supported(n, opset) for _, g in subgraphs(node) for n in g.node)
    return find_converter(node.op_type, opset, node.domain) is not None and not any(subgraphs(node))


def _control_flow(node: onnx.NodeProto) -> bool:
    return node.op_type in CONTROL_FLOW and node.domain in DEFAULT_DOMAINS


@dataclass(frozen=True)
class Branch:
    """A subgraph (If branch, Loop or Scan body) compiled for the interpreter: its steps (as
    BlockModule.nodes), graph input and output names, and its own initializers other than layer weights
    (which stand in by name through their rounders)."""

    steps: list
    outputs: tuple[str, ...]
    constants: dict[str, torch.Tensor]
    inputs: tuple[str, ...] = ()


def release_schedule(steps: list, branches: dict[str, dict[str, Branch]], keep: tuple[str, ...]) -> list:
    """For each top-level step, the tensors no later step reads (nor a block output in ``keep``): they
    can leave the interpreter's environment once it has run. A control-flow step reads, besides its own
    inputs, every outer tensor its subgraphs name."""
    last: dict[str, int] = {}
    for index, step in enumerate(steps):
        for name in _reads(step, branches):
            last[name] = index
    schedule: list[list[str]] = [[] for _ in steps]
    for name, index in last.items():
        if name not in keep:
            schedule[index].append(name)
    return schedule


def _reads(step, branches: dict[str, dict[str, Branch]]) -> set[str]:
    node = step[0]
    names = {name for name in node.inputs if name}
    for branch in branches.get(node.name, {}).values():
        for inner in branch.steps:
            names |= _reads(inner, branches)
        names |= set(branch.outputs)
    return names


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
        self._recurrent = {l.node for l in block.layers if l.op_type in QUANTIZED_RECURRENT}
        self._weights = {l.weight for l in block.layers}
        self.device = device
        self.branches: dict[str, dict[str, Branch]] = {}  # control-flow node → graph attribute → Branch
        inner_weights: list[onnx.TensorProto] = []
        # (node, float converter, converter of its integer kernel or None); If/Loop/Scan have no converter
        self.nodes = self._compile([by_name[name] for name in block.nodes], opset, model, device, inner_weights)
        used = {i for node, _, _ in self.nodes for i in node.inputs}
        self.constants = {t.name: torch.from_numpy(tensor_array(t, model).copy()).to(device)
                          for t in list(model.graph.initializer) + inner_weights
                          if t.name in used or t.name in self._weights}
        # the steps with exact element-wise chains fused (rounding/fusion.py); ``plain`` keeps them all,
        # for a caller that asks for inner tensors by name (``keep``) or sets ``fused`` off
        self.plain, self.fused = self.nodes, True
        if not self.branches:
            protected = set(block.outputs) | set(block.all_points) | set(state.acts)
            self.nodes = fuse_steps(self.nodes, self._constant_value, protected, set(block.outputs))
        self.own_rounders = torch.nn.ModuleList(state.rounders[l.weight] for l in block.layers)
        self.own_acts = torch.nn.ModuleList(state.acts[p] for p in block.act_points if p in state.acts)
        self.input_points = [p for p in block.act_points if p in block.inputs]
        self.quantize = True
        self._fixed: dict[str, torch.Tensor] | None = None
        self.ran: set[tuple[str, str]] = set()  # (node, graph attribute) of every subgraph run so far
        self.trips: dict[str, int] = {}  # Loop node → iterations in the float (calibration) runs
        # each tensor's last reader, in the fused and in the plain steps
        self.released = tuple(release_schedule(steps, self.branches, block.outputs)
                              for steps in (self.nodes, self.plain))

    def _compile(self, protos: list[onnx.NodeProto], opset: int, model: onnx.ModelProto, device: torch.device,
                 inner_weights: list[onnx.TensorProto]) -> list:
        """Steps for ``protos``; mutates ``self.branches`` and ``inner_weights`` (the layer weights
        found among the branches' initializers, kept with the top-level constants)."""
        steps = []
        for proto in protos:
            node = OpNode.from_proto(proto, opset)
            if _control_flow(proto):
                self.branches[proto.name] = {}
                for attr, g in subgraphs(proto):
                    inner_weights += [t for t in g.initializer if t.name in self._weights]
                    constants = {t.name: torch.from_numpy(tensor_array(t, model).copy()).to(device)
                                 for t in g.initializer if t.name not in self._weights}
                    self.branches[proto.name][attr] = Branch(
                        self._compile(list(g.node), opset, model, device, inner_weights),
                        tuple(o.name for o in g.output), constants, tuple(i.name for i in g.input))
                steps.append((node, None, None))
                continue
            convert = find_converter(node.op_type, opset, node.domain)
            if convert is None:
                raise NotImplementedError(f"{node.op_type} node {node.name!r} (opset {opset}) has no torch converter")
            kernel = QUANTIZED_RECURRENT[node.op_type] if proto.name in self._recurrent else None
            steps.append((node, convert, kernel))
        return steps

    def _constant_value(self, name: str) -> np.ndarray | None:
        """A constant tensor's value (an initializer, or a Constant step's output), else None."""
        if name in self.constants and name not in self._weights:
            return self.constants[name].cpu().numpy()
        made = [(node, convert) for node, convert, _ in self.plain
                if node.op_type == "Constant" and name in node.outputs]
        return made[0][1](made[0][0], [])[0].numpy() if made else None

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

    @contextmanager
    def step_weights(self):
        """Within it, every quantized forward reuses one ``fake_quant()`` per weight, taken on entry with
        gradients: the forwards' backward passes stop at those values and sum their gradients there, and
        on a normal exit the sum flows back through ``fake_quant`` once, into the rounders' parameters.
        For the micro-batches of one learning step (the rounders do not change within it), which would
        otherwise round and back-propagate through every weight once per micro-batch."""
        taken = self._quantized_weights()
        self._fixed = {name: w.detach().requires_grad_(w.requires_grad) for name, w in taken.items()}
        try:
            yield self
            pairs = [(taken[name], w.grad) for name, w in self._fixed.items() if w.grad is not None]
        finally:
            self._fixed = None
        if pairs:
            # The gradient of sum(w * g) at w is g, bit for bit. autograd.backward(ws, gs) would give the
            # same, but its first call with given gradients imports torch.fx's symbolic shapes and sympy
            # (0.2-0.3 s of a fast run).
            torch.stack([(w * g).sum() for w, g in pairs]).sum().backward()

    def _quantized_weights(self) -> dict[str, torch.Tensor]:
        return {l.weight: quantized_weight(self.state.rounders[l.weight]) for l in self.block.layers}

    def forward(self, feeds: dict[str, torch.Tensor], observe: Observer | None = None,
                keep: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
        """The block's outputs, plus the tensors named in ``keep`` that its nodes compute (inner tensors
        verification compares, such as a Softmax's input)."""
        env: dict[str, torch.Tensor] = dict(feeds)
        for name in self.input_points:
            env[name] = self._point(name, env[name], observe)
        if not self.quantize:
            weights = {}
        elif self._fixed is not None:
            weights = self._fixed
        else:
            weights = self._quantized_weights()
        fused = self.fused and not keep
        kept: dict[str, torch.Tensor] = {}
        self._run(self.nodes if fused else self.plain, env, weights, observe,
                  release=self.released[0 if fused else 1], kept=(keep, kept))
        kept = {name: value for name, value in kept.items() if name not in feeds}
        return {**kept, **{name: env[name] for name in self.block.outputs}}

    def _run(self, steps: list, env: dict, weights: dict, observe: Observer | None,
             release: list | None = None, kept: tuple | None = None) -> None:
        """Mutates ``env``: adds the outputs of ``steps``, act points quantized where they are made.
        With ``release`` (the top-level steps' schedule), each tensor leaves ``env`` after its last
        reader, so that a long block without gradients holds a few tensors at a time, not all of them;
        ``kept`` (names, dict) collects the named inner tensors before they go."""
        for index, (node, convert, kernel) in enumerate(steps):
            if convert is None:
                values = self._control_flow(node, env, weights, observe)
            else:
                inputs = [self._value(name, env, weights) for name in node.inputs]
                if self.quantize and kernel is not None:
                    convert = kernel
                values = convert(node, inputs)
            for name, value in zip(node.outputs, values):
                env[name] = self._point(name, value, observe) if name in self.state.acts else value
                if kept is not None and name in kept[0]:
                    kept[1][name] = env[name]
            for name in release[index] if release is not None else ():
                env.pop(name, None)

    def _control_flow(self, node: OpNode, env: dict, weights: dict, observe: Observer | None) -> list:
        """The outputs of an If (the taken branch's: its condition is one value for the whole batch, as
        onnxruntime sees it on the same batch), a Loop or a Scan (rounding/loops.py)."""
        if node.op_type == "If":
            cond = self._value(node.inputs[0], env, weights)
            if cond.numel() != 1:
                raise NotImplementedError(f"If node {node.name!r}: condition of shape {tuple(cond.shape)} "
                                          "is not one value")
            taken = "then_branch" if bool(cond.reshape(-1)[0]) else "else_branch"
            self.ran.add((node.name, taken))
            return self._body(node, taken, env, weights, observe)([])
        inputs = [self._value(name, env, weights) for name in node.inputs]
        body = self._body(node, "body", env, weights, observe)
        if node.op_type == "Scan":
            values, count = run_scan(node, inputs, body)
        else:
            values, count = run_loop(node, inputs, body, self.device)
            self._check_trips(node, count)
        if count:
            self.ran.add((node.name, "body"))
        return values

    def _check_trips(self, node: OpNode, count: int) -> None:
        """In the float runs (calibration on every batch), a Loop must run as often on every batch: the
        simulation takes a data-dependent count batch-wide, which stands for each sample only if it
        does not vary."""
        if self.quantize:
            return
        seen = self.trips.setdefault(node.name, count)
        if seen != count:
            raise NotImplementedError(f"Loop node {node.name!r} ran {seen} iterations on one calibration batch "
                                      f"and {count} on another: its iteration count depends on the data, which "
                                      "the torch simulation can only take batch-wide")

    def _body(self, node: OpNode, attr: str, env: dict, weights: dict, observe: Observer | None):
        """A callable running subgraph ``attr`` of ``node`` once: body input values (ONNX order) → its
        output values. It runs on a copy of ``env`` with the subgraph's initializers and inputs added, so
        outer tensors are visible and its own do not leak out; a body input that is an act point is
        quantized as it is bound."""
        branch = self.branches[node.name][attr]

        def run(values: list) -> list[torch.Tensor]:
            inner = {**env, **branch.constants}  # a subgraph's own initializer shadows an outer tensor
            for name, value in zip(branch.inputs, values):
                inner[name] = self._point(name, value, observe) if name in self.state.acts else value
            self._run(branch.steps, inner, weights, observe)
            return [self._value(name, inner, weights) for name in branch.outputs]

        return run

    def _point(self, name: str, value: torch.Tensor, observe: Observer | None) -> torch.Tensor:
        if observe is not None and (given := observe(name, value)) is not None:
            return given
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
