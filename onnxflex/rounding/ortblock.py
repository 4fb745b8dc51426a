"""Blocks the torch side cannot express run through onnxruntime on an extracted subgraph.

Their weights use round-to-nearest and their activation steps their calibrated values (nothing is
learned), and the quantized subgraph is the emitter's own output for the block, so the simulation
of such a block is exactly what the emitted model computes. That includes the layers and act points
inside the subgraphs of its If/Loop/Scan nodes (Block.inner_points, QuantLayer.owner): calibration
observes them as extra outputs of the control-flow node (passes.control_flow.expose_inner).
"""
from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import helper

from onnxflex.blocks import Block
from onnxflex.emit import emit
from onnxflex.graph import NameScope
from onnxflex.ort import session
from onnxflex.passes.control_flow import expose_inner
from onnxflex.probes import with_probes
from onnxflex.qparams import QuantParams
from onnxflex.rounding.torchify import QuantState
from onnxflex.runtimes.base import Target


def extract_block(model: onnx.ModelProto, block: Block) -> onnx.ModelProto:
    """A standalone model of the block's nodes: its inputs become graph inputs, its outputs graph outputs."""
    g = model.graph
    names = set(block.nodes)
    nodes = [n for n in g.node if n.name in names]
    used = {i for n in nodes for i in n.input}
    typed = {vi.name: vi for vi in list(g.value_info) + list(g.input) + list(g.output)}

    def value_info(name):
        return typed[name] if name in typed else helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)

    sub = helper.make_graph(nodes, f"{block.name}_subgraph", [value_info(n) for n in block.inputs],
                            [value_info(n) for n in block.outputs],
                            [t for t in g.initializer if t.name in used])
    sub.value_info.extend(vi for name, vi in typed.items() if name in used and name not in block.inputs)
    out = helper.make_model(sub, opset_imports=list(model.opset_import))
    out.ir_version = model.ir_version
    return out


class OrtBlock:
    """Same calling convention as BlockModule: ``block({input: tensor}) -> {output: tensor}``."""

    def __init__(self, block: Block, model: onnx.ModelProto, state: QuantState, target: Target,
                 providers: tuple[str, ...], device: torch.device) -> None:
        self.block, self.state, self.target = block, state, target
        self.providers, self.device = list(providers), device
        self.fp_model = extract_block(model, block)
        self.input_points = [p for p in block.act_points if p in block.inputs]
        self.quantize = True
        self._fp_session = None
        self._q_session = None

    def __call__(self, feeds: dict[str, torch.Tensor], observe=None, keep: tuple[str, ...] = ()
                 ) -> dict[str, torch.Tensor]:
        """The block's outputs; ``keep`` (inner tensors BlockModule can return) is not available here."""
        arrays = {k: v.detach().cpu().numpy() for k, v in feeds.items()}
        if not self.quantize:
            return self._run_fp(arrays, observe)
        if self._q_session is None:
            self._q_session = session(emit(self.fp_model, self._params(), self.target), self.providers)
        outs = self._q_session.run(list(self.block.outputs), arrays)
        return {k: torch.from_numpy(v).to(self.device) for k, v in zip(self.block.outputs, outs)}

    def _run_fp(self, arrays, observe) -> dict[str, torch.Tensor]:
        """The FP block; ``observe`` sees each act point, inner points (made inside a subgraph) through
        extra outputs of their control-flow node: an If branch not taken gives an empty array, a Loop
        or Scan body the values of every iteration stacked."""
        points = [p for p in self.block.act_points if p in self.state.acts]
        if self._fp_session is None:
            probed, _ = with_probes(self.fp_model, [p for p in points if p not in self.block.inputs])
            self._inner = expose_inner(probed, [p for p in self.block.inner_points if p.tensor in self.state.acts],
                                       NameScope.of(probed))
            self._fp_session = session(probed, self.providers)
        names = list(self.block.outputs) + [p for p in points if p not in self.block.outputs
                                            and p not in self.block.inputs] + list(self._inner.values())
        values = dict(zip(names, self._fp_session.run(names, arrays)))
        if observe is not None:
            for p in points:
                observe(p, torch.from_numpy(np.asarray(arrays[p] if p in arrays else values[p])))
            for tensor, probe in self._inner.items():
                if values[probe].size:
                    observe(tensor, torch.from_numpy(np.asarray(values[probe])))
        return {k: torch.from_numpy(values[k]).to(self.device) for k in self.block.outputs}

    def _params(self) -> QuantParams:
        """The exported parameters of this block's layers (inner ones included) and act points."""
        full = self.state.export(self.target.act_dtype)
        weights = {l.weight for l in self.block.layers}
        biases = {l.bias for l in self.block.layers if l.bias}
        points = set(self.block.all_points)
        return QuantParams({k: v for k, v in full.weights.items() if k in weights},
                           {k: v for k, v in full.biases.items() if k in biases},
                           {k: v for k, v in full.acts.items() if k in points})

