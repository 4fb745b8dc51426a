"""Where onnxruntime and onnxflex's simulation of an emitted model part.

When the emitted model's outputs in onnxruntime disagree with the torch simulation, the blocks are
compared one by one, in plan order, on one batch of the verification samples: onnxruntime runs the
emitted model with every block output exposed as an extra output, the simulation keeps every block
output, and the first block with an output below the tolerance is named. Each block is also run alone
in the simulation on onnxruntime's values of its inputs: when that agrees, the block's difference is
*chained* (error carried in from upstream blocks, each within tolerance); when it does not, it is
*local* (the block itself computes something else than onnxruntime's kernels).

An act point is read from onnxruntime as its QuantizeLinear output (integers, dequantized here), not
as a float tensor: exposing the float tensor between a quantized op and its QuantizeLinear would keep
onnxruntime from fusing them into one integer kernel, and so change what is compared.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from onnxflex.blocks import Block, BlockPlan
from onnxflex.calib import CalibrationSet
from onnxflex.graph import DEFAULT_DOMAINS
from onnxflex.probes import with_probes as probed_copy
from onnxflex.qparams import sqnr_db

# outputs of these ops are compared at the op's input: a Softmax in saturation turns a logit difference
# far below the tolerance into a probability difference above it (0.2 on logits of 20 is 40 dB, on the
# probabilities about 14 dB), so its input is where the two computations can fairly be told apart
COMPARED_AT_INPUT = ("Softmax",)


@dataclass(frozen=True)
class Probe:
    """How to read tensor ``tensor`` from the probed emitted model: output ``output``, dequantized with
    ``scale`` and ``zero_point`` when it is a QuantizeLinear output (``scale`` None otherwise)."""

    tensor: str
    output: str
    scale: np.ndarray | None = None
    zero_point: np.ndarray | None = None

    def value(self, array: np.ndarray) -> np.ndarray:
        if self.scale is None:
            return array
        return ((array.astype(np.float32) - self.zero_point.astype(np.float32)) * self.scale).astype(np.float32)


def comparison_points(model: onnx.ModelProto) -> dict[str, str]:
    """Graph output → the tensor verification compares instead (its producer's input, for the ops in
    COMPARED_AT_INPUT); outputs compared as they are are not listed."""
    producer = {o: n for n in model.graph.node for o in n.output}
    points = {}
    for out in model.graph.output:
        node = producer.get(out.name)
        if node is not None and node.op_type in COMPARED_AT_INPUT and node.input and node.input[0]:
            points[out.name] = node.input[0]
    return points


def with_probes(qmodel: onnx.ModelProto, tensors: list[str]) -> tuple[onnx.ModelProto, dict[str, Probe]]:
    """A copy of the emitted ``qmodel`` that also outputs ``tensors`` (names of the float model): an act
    point through its QuantizeLinear's integer output, any other tensor as it is; graph outputs are read
    as they are. Tensors the emitted model does not have are left out of the returned map."""
    g = qmodel.graph
    inits = {t.name: t for t in g.initializer}
    produced = {o for n in g.node for o in n.output} | {i.name for i in g.input}
    quantized = {n.input[0]: n for n in g.node if n.op_type == "QuantizeLinear" and n.domain in DEFAULT_DOMAINS
                 and len(n.input) >= 2 and n.input[1] in inits}
    outputs = {o.name for o in g.output}
    probes: dict[str, Probe] = {}
    for name in dict.fromkeys(tensors):
        if name in outputs:
            probes[name] = Probe(name, name)
        elif name in quantized:
            q = quantized[name]
            zero = numpy_helper.to_array(inits[q.input[2]]) if len(q.input) > 2 and q.input[2] in inits \
                else np.zeros((), np.uint8)
            probes[name] = Probe(name, q.output[0], numpy_helper.to_array(inits[q.input[1]]), zero)
        elif name in produced:
            probes[name] = Probe(name, name)
    probed, _ = probed_copy(qmodel, list(dict.fromkeys(p.output for p in probes.values())))
    return probed, probes


@dataclass(frozen=True)
class BlockComparison:
    """One block: its worst output ``tensor`` and that output's SQNR of onnxruntime against the chained
    simulation (``chained_db``); ``local_db``: the lowest SQNR of its outputs against the block alone fed
    onnxruntime's inputs (None when onnxruntime's inputs of the block could not all be read)."""

    block: str
    ops: tuple[str, ...]
    tensor: str
    chained_db: float
    local_db: float | None

    def to_dict(self) -> dict:
        return {"block": self.block, "ops": list(self.ops), "tensor": self.tensor,
                "chained_sqnr_db": _finite(self.chained_db),
                "local_sqnr_db": None if self.local_db is None else _finite(self.local_db)}


@dataclass(frozen=True)
class Divergence:
    """The block-by-block comparison on ``samples`` samples: ``first`` is the first block (plan order)
    whose output falls below ``tolerance_db`` against the chained simulation, ``first_local`` the first
    whose output does so fed onnxruntime's inputs (the block to look at); either may be None.
    ``probe_db``: the graph outputs' SQNR of the probed run against the plain one (exposing block outputs
    must not change what onnxruntime computes; low values mean it did)."""

    samples: int
    tolerance_db: float
    blocks: tuple[BlockComparison, ...]
    probe_db: dict[str, float]

    @property
    def first(self) -> BlockComparison | None:
        return next((b for b in self.blocks if b.chained_db < self.tolerance_db), None)

    @property
    def first_local(self) -> BlockComparison | None:
        return next((b for b in self.blocks if b.local_db is not None and b.local_db < self.tolerance_db), None)

    @property
    def blocks_agree(self) -> bool:
        """Every block with a compared output agrees with onnxruntime when fed onnxruntime's inputs."""
        return all(b.local_db is not None and b.local_db >= self.tolerance_db for b in self.blocks if b.tensor)

    def summary(self) -> str:
        """One clause for the failure message."""
        first, local = self.first, self.first_local
        if first is None:
            return ("every block output agrees within the tolerance on the compared batch; the difference "
                    "builds up in the graph outputs only")
        text = (f"first diverging block {first.block!r} ({', '.join(first.ops)}) at tensor {first.tensor!r}, "
                f"{first.chained_db:.1f} dB")
        if first.local_db is None:
            return text
        if first is local:
            return text + f" (local: fed onnxruntime's inputs the block alone gives {first.local_db:.1f} dB)"
        text += (f" (chained: fed onnxruntime's inputs it gives {first.local_db:.1f} dB, so the error comes "
                 "in from upstream")
        if local is not None:
            text += f"; the first block that differs by itself is {local.block!r} at {local.tensor!r}, " \
                    f"{local.local_db:.1f} dB"
        return text + ")"

    def to_dict(self) -> dict:
        first, local = self.first, self.first_local
        return {"samples": self.samples, "tolerance_db": self.tolerance_db, "blocks_agree": self.blocks_agree,
                "first_block": first.block if first else None, "first_tensor": first.tensor if first else None,
                "first_kind": None if first is None or first.local_db is None else
                ("local" if first.local_db < self.tolerance_db else "chained"),
                "first_local_block": local.block if local else None,
                "probed_outputs_vs_plain_sqnr_db": {k: _finite(v) for k, v in self.probe_db.items()},
                "blocks": [b.to_dict() for b in self.blocks]}


def locate(qmodel: onnx.ModelProto, plan: BlockPlan, modules: list, data: CalibrationSet, providers, batch: int,
           tolerance_db: float, device) -> Divergence:
    """Compare onnxruntime's run of ``qmodel`` with the simulation (``modules``: the frozen blocks of
    ``plan``, in order) block by block on the first ``batch`` samples of ``data``."""
    import torch

    from onnxflex.ort import session

    feeds = next(iter(data.batches(batch)))
    samples = min(batch, data.num_samples)
    sim_at = comparison_points(plan.model)
    wanted = [t for b in plan.blocks for t in b.outputs] + list(sim_at.values())
    probed, probes = with_probes(qmodel, wanted)
    sess = session(probed, list(providers))
    names = [o.name for o in sess.get_outputs()]
    raw = dict(zip(names, sess.run(names, feeds)))
    ort = {t: p.value(raw[p.output]) for t, p in probes.items()}
    plain = session(qmodel, list(providers))
    plain_names = [o.name for o in plain.get_outputs()]
    probe_db = {n: sqnr_db(v, raw[n]) for n, v in zip(plain_names, plain.run(plain_names, feeds))}

    compared = {t: sim_at.get(t, t) for b in plan.blocks for t in b.outputs}  # block output → tensor compared
    env = {k: torch.from_numpy(np.asarray(v)).to(device) for k, v in feeds.items()}
    comparisons = []
    with torch.no_grad():
        for block, module in zip(plan.blocks, modules):
            keep = tuple(compared[t] for t in block.outputs if compared[t] != t)
            inputs = {name: env[name] for name in block.inputs}
            env.update(module(inputs, keep=keep))
            local = _local_outputs(module, block, ort, feeds, keep, device)
            comparisons.append(_compare_block(block, plan.model, compared, env, ort, local))
    return Divergence(samples, tolerance_db, tuple(comparisons), probe_db)


def _local_outputs(module, block: Block, ort: dict, feeds: dict, keep, device) -> dict | None:
    """The block alone on onnxruntime's values of its inputs, or None when one of them was not read."""
    import torch

    if any(name not in ort and name not in feeds for name in block.inputs):
        return None
    inputs = {name: torch.from_numpy(np.asarray(ort[name] if name in ort else feeds[name])).to(device)
              for name in block.inputs}
    return {k: v.cpu().numpy() for k, v in module(inputs, keep=keep).items()}


def _compare_block(block: Block, model: onnx.ModelProto, compared: dict, env: dict, ort: dict,
                   local: dict | None) -> BlockComparison:
    """The block's float outputs that onnxruntime exposed: the one with the lowest chained SQNR, and the
    lowest local SQNR over all of them (None when one could not be computed)."""
    nodes = set(block.nodes)
    ops = tuple(dict.fromkeys(n.op_type for n in model.graph.node if n.name in nodes))
    rows = []
    for out in block.outputs:
        tensor = compared[out] if compared[out] in env and compared[out] in ort else out
        if tensor not in ort or tensor not in env:
            continue
        sim = env[tensor].cpu().numpy()
        if not np.issubdtype(sim.dtype, np.floating):
            continue
        alone = sqnr_db(ort[tensor], local[tensor]) if local is not None and tensor in local else None
        rows.append((sqnr_db(ort[tensor], sim), tensor, alone))
    if not rows:
        return BlockComparison(block.name, ops, "", float("inf"), None)
    chained, tensor, _ = min(rows, key=lambda r: r[0])
    alone = None if any(r[2] is None for r in rows) else min(r[2] for r in rows)
    return BlockComparison(block.name, ops, tensor, chained, alone)


def _finite(value: float) -> float:
    return round(float(value), 2) if np.isfinite(value) else float(value)  # report.to_json writes inf as "inf"
