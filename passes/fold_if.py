"""Fold If nodes whose condition is a constant: the branch taken replaces the If, inline.

Run by canonicalize after constant folding (a pinned input, --fix-input, makes ``sr == 16000``
constant). The branch's initializers become graph initializers, its nodes top-level nodes and its
outputs the If's outputs, so its layers are ordinary top-level layers that reconstruction learns.
Every name the branch defines gets a fresh name from the model's NameScope (which covers every
scope), except that a branch output produced by a branch node takes the If output's name.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from onnxflex.extdata import tensor_array
from onnxflex.graph import DEFAULT_DOMAINS, NameScope, scope_names
from onnxflex.passes.control_flow import rename_outer_reads, subgraphs


def fold_constant_ifs(model: onnx.ModelProto) -> int:
    """Mutates: every top-level If whose condition is an initializer is replaced by the nodes of the
    branch it takes. Returns the number of Ifs folded (nested Ifs fold once their condition folds too,
    so callers repeat constant folding and this until it returns 0)."""
    folded = 0
    while _fold_first(model):
        folded += 1
    return folded


def _fold_first(model: onnx.ModelProto) -> bool:
    g = model.graph
    consts = {t.name: t for t in g.initializer}
    for k, node in enumerate(g.node):
        if node.op_type != "If" or node.domain not in DEFAULT_DOMAINS or node.input[0] not in consts:
            continue
        taken = bool(np.asarray(tensor_array(consts[node.input[0]], model)).reshape(-1)[0])
        branch = next(sub for name, sub in subgraphs(node) if name == ("then_branch" if taken else "else_branch"))
        scope = NameScope(scope_names(g, skip=branch))  # the branch's own names may stay as they are
        inlined = _inline(g, branch, node, scope)
        nodes = list(g.node[:k]) + inlined + list(g.node[k + 1:])
        del g.node[:]
        g.node.extend(nodes)
        return True
    return False


def _inline(g: onnx.GraphProto, branch: onnx.GraphProto, node: onnx.NodeProto,
            scope: NameScope) -> list[onnx.NodeProto]:
    """Mutates ``g`` (adds the branch's initializers) and ``branch``; returns the nodes that stand in
    for ``node``: the branch's nodes renamed, then an Identity for each If output that is not a branch
    node's output of its own (an outer tensor, an initializer, or a tensor given twice)."""
    outputs = dict(zip([o.name for o in branch.output], node.output))
    renamed: dict[str, str] = {}
    claimed: set[str] = set()
    made = {o for n in branch.node for o in n.output if o}
    for b_out, if_out in outputs.items():
        if b_out in made and if_out and if_out not in claimed:
            renamed[b_out] = if_out
            claimed.add(if_out)
    for name in [t.name for t in branch.initializer] + [o for n in branch.node for o in n.output if o]:
        renamed.setdefault(name, scope.unique_name(name))
    for t in branch.initializer:
        t.name = renamed[t.name]
        g.initializer.append(t)
    inlined = []
    for inner in branch.node:
        inner.name = scope.unique_name(inner.name or inner.op_type)
        inner.input[:] = [renamed.get(i, i) for i in inner.input]
        inner.output[:] = [renamed.get(o, o) if o else o for o in inner.output]
        for _, sub in subgraphs(inner):
            for old, new in renamed.items():
                rename_outer_reads(sub, old, new)
        inlined.append(inner)
    for b_out, if_out in zip([o.name for o in branch.output], node.output):
        source = renamed.get(b_out, b_out)
        if if_out and source != if_out:
            inlined.append(helper.make_node("Identity", [source], [if_out],
                                            name=scope.unique_name(f"{node.name}_{if_out}")))
    return inlined
