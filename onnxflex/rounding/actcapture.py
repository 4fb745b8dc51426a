"""Activation ranges observed in the capture run: the act points of a block are extra outputs of the
onnxruntime FP32 run (capture.py), and each batch's values go to the same per-quantizer observers
(actrange.PointValues) that calibration would fill from an FP torch run of the block over every
sample, which the block then no longer needs.

A block keeps the torch run (reconstruct.calibrate_activations) when its act points cannot all be
observed here: a node with a subgraph (If, Loop, Scan: their inner points, the branches taken and the
loop counts come from the torch run), a point that is no top-level tensor of the model, a layer whose
int32 bias follows its weight's rounding (its input's channel means come from the torch run:
rounding/bias_correction.py), or the MSE search (its thinned samples are drawn batch by batch of the
torch run). onnxruntime and torch compute
the same float model, so a range moves at most by float rounding between the two.
"""
from __future__ import annotations

import numpy as np
import onnx

from onnxflex.blocks import Block, BlockPlan
from onnxflex.layout import Layout
from onnxflex.passes.control_flow import subgraphs
from onnxflex.passes.select import concat_ties
from onnxflex.rounding.actrange import PointValues
from onnxflex.rounding.bias_correction import channel_axis


def quantizer_keys(block: Block, ties: dict[str, str]) -> dict[str, tuple[str, str]]:
    """Act point of ``block`` → the key of the quantizer it uses (reconstruct.add_block_quantizers):
    points read by one Concat share one where ``ties`` (passes.select.concat_ties) is given."""
    return {p: ("concat", ties[p]) if p in ties else ("point", p) for p in block.all_points}


def observable(block: Block, nested: set[str], tensors: set[str]) -> bool:
    """Whether every act point of ``block`` is one of ``tensors`` (the model's top-level ones), none of
    its nodes is in ``nested`` (the nodes with a subgraph) and none of its layers may get its bias
    corrected (bias_correction.channel_axis: a bias at 4 bits or fewer)."""
    corrected = any(l.bias and not l.owner and channel_axis(l.op_type, l.bits) is not None for l in block.layers)
    return not (block.inner_points or corrected) and set(block.act_points) <= tensors \
        and nested.isdisjoint(block.nodes)


class CaptureObservers:
    """The act points of the plan's observable blocks and their observers, filled by ``observe`` batch
    by batch; ``of(index)`` hands block ``index``'s to calibration (None: it keeps the torch run).
    Memory: the observers' tails and ranges only, no act tensor is kept."""

    def __init__(self, plan: BlockPlan, shared_concat_scales: bool, batches: int) -> None:
        model = plan.model
        ties = concat_ties(model) if shared_concat_scales else {}
        top = {i.name for i in model.graph.input} | {o for n in model.graph.node for o in n.output}
        nested = {n.name for n in model.graph.node if next(subgraphs(n), None) is not None}
        self._blocks: dict[int, dict[str, PointValues]] = {}
        self._order: list[tuple[str, PointValues]] = []  # each batch's adds, in the torch run's order
        for index, block in enumerate(plan.blocks):
            if not block.act_points or not observable(block, nested, top):
                continue
            pooled: dict[tuple[str, str], PointValues] = {}
            points = {p: pooled.setdefault(key, PointValues(batches, keep_sample=False))
                      for p, key in quantizer_keys(block, ties).items()}
            self._blocks[index] = points
            self._order += [(p, points[p]) for p in run_order(block, model)]

    @property
    def tensors(self) -> list[str]:
        """The act points to add as outputs of the capture run (each once)."""
        return list(dict.fromkeys(name for name, _ in self._order))

    def observe(self, values: dict[str, np.ndarray], layout: Layout, samples: int) -> None:
        """Mutates the observers: adds one capture batch's ``values`` (by tensor name, the model's
        layout; ``layout`` their batch axes) of the ``samples`` calibration samples."""
        for name, pooled in self._order:
            value = values[name]
            rows = value.shape[layout.axis(name)] if not layout.shared(name) and value.ndim else 1
            pooled.add(name, value, rows, samples, None)

    def of(self, index: int) -> dict[str, PointValues] | None:
        """Block ``index``'s act points → their quantizer's observations, or None when it was not observed."""
        return self._blocks.get(index)


def run_order(block: Block, model: onnx.ModelProto) -> list[str]:
    """The block's act points in the order its torch run meets them: the input points, then the others
    as the block's nodes make them (the order matters to points pooled in one quantizer: actrange)."""
    made = {o: i for i, n in enumerate(model.graph.node) if n.name in set(block.nodes) for o in n.output}
    inputs = [p for p in block.act_points if p in block.inputs]
    return inputs + sorted((p for p in block.act_points if p not in block.inputs), key=lambda p: made.get(p, -1))


def stored_rows(plan: BlockPlan, observers: CaptureObservers | None, num_samples: int, learners: set[int] | None,
                fixed: int | None, fp_input: bool = False) -> dict[str, int]:
    """Boundary tensor → the FP rows capture stores of it, the most any block reads: all of them for the
    outputs of a block in ``learners`` (the indices of the blocks that learn, reconstruct.learning_blocks;
    None: not known yet, every block may), for the inputs of a block that calibrates in torch
    (``observers`` holds none of its ranges) and, with ``fp_input`` (block_input fp), for a learner's
    inputs. A block that does not learn reports its loss on the first reconstruct.UNLEARNED_LOSS_SAMPLES
    samples (at least one batch of ``fixed``, the model's fixed batch): that many rows of its outputs.
    A graph input, and with ``fp_input`` any input, is also what the block's quantized path reads (its
    path_samples rows: all of them up to the last learner). A block's own act ranges from the capture
    run leave it only a first-batch probe run on FP inputs. A tensor left out keeps every row."""
    from onnxflex.rounding import reconstruct

    if learners is None:
        return {}
    few = min(num_samples, max(reconstruct.UNLEARNED_LOSS_SAMPLES, fixed or 1))
    last = max(learners, default=-1)
    made = {t for b in plan.blocks for t in b.outputs}
    rows: dict[str, int] = {}
    for index, block in enumerate(plan.blocks):
        path = num_samples if index <= last else few
        learns = index in learners
        in_torch = observers is None or observers.of(index) is None
        for name in block.outputs:
            rows[name] = max(rows.get(name, 0), num_samples if learns else few)
        for name in block.inputs:
            if in_torch or (fp_input and learns):
                need = num_samples
            else:
                need = path if fp_input or name not in made else few
            rows[name] = max(rows.get(name, 0), need)
    return {t: r for t, r in rows.items() if r < num_samples}
