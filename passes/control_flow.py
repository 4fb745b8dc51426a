"""Control flow (If, Loop, Scan and any node with a graph attribute): what its subgraphs read from the
outer graph, and the canonical form the other passes rely on.

Subgraph nodes are never quantized: only the top-level graph is searched for layers, so a Conv inside
a Loop body stays in float. The block that holds a control-flow node runs in onnxruntime.
"""
from __future__ import annotations

from typing import Iterator

import onnx


def subgraphs(node: onnx.NodeProto) -> Iterator[tuple[str, onnx.GraphProto]]:
    """(attribute name, graph) for each graph attribute of ``node`` (GRAPH and GRAPHS kinds)."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.name, attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            for k, g in enumerate(attr.graphs):
                yield f"{attr.name}[{k}]", g


def outer_reads(graph: onnx.GraphProto) -> list[str]:
    """Names ``graph`` (and graphs nested in it) reads but does not define: outer-scope tensors."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    defined |= {t.values.name for t in graph.sparse_initializer}
    reads: list[str] = []
    for node in graph.node:
        for name in list(node.input) + [n for _, g in subgraphs(node) for n in outer_reads(g)]:
            if name and name not in defined and name not in reads:
                reads.append(name)
        defined.update(o for o in node.output if o)
    reads += [o.name for o in graph.output if o.name not in defined and o.name not in reads]
    return reads


def subgraph_reads(node: onnx.NodeProto) -> list[str]:
    """Outer-scope tensors that ``node``'s subgraphs read implicitly (empty for ordinary nodes)."""
    names: list[str] = []
    for _, g in subgraphs(node):
        names += [n for n in outer_reads(g) if n not in names]
    return names


def reads(node: onnx.NodeProto) -> list[str]:
    """Every tensor ``node`` needs: its explicit inputs, then its subgraphs' outer-scope reads."""
    explicit = [i for i in node.input if i]
    return explicit + [n for n in subgraph_reads(node) if n not in explicit]


def count_nodes(graph: onnx.GraphProto) -> int:
    return sum(1 + sum(count_nodes(g) for _, g in subgraphs(n)) for n in graph.node)


def localize_outer_initializers(model: onnx.ModelProto) -> None:
    """Mutates: an outer initializer a subgraph reads is copied into that subgraph's own initializers,
    so the top-level passes (dropping unused initializers, untying shared weights, replacing a weight
    with its DequantizeLinear) never break the subgraph. Nested subgraphs get the copy at the top
    subgraph, which they still see as outer scope."""
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        for _, g in subgraphs(node):
            own = {t.name for t in g.initializer} | {i.name for i in g.input}
            for name in outer_reads(g):
                if name in inits and name not in own:
                    g.initializer.append(inits[name])


def control_flow_warnings(model: onnx.ModelProto) -> list[str]:
    """One line per top-level node with subgraphs, naming it and saying what stays float."""
    lines = []
    for node in model.graph.node:
        graphs = list(subgraphs(node))
        if not graphs:
            continue
        inner = sum(count_nodes(g) for _, g in graphs)
        lines.append(f"node {node.name!r} ({node.op_type}) has subgraphs ({', '.join(n for n, _ in graphs)}); "
                     f"their {inner} node(s) stay in float and the block holding it runs in onnxruntime")
    return lines


def explicit_outer_reads(model: onnx.ModelProto, scope) -> None:
    """Mutates: each run-time tensor a subgraph reads from the top-level graph is routed through a new
    Identity just before the control-flow node, and the subgraph reads the Identity's output. The
    Identity is an ordinary top-level consumer, so the emitter hands it the quantized activation like
    every other consumer, and the torch simulation (which quantizes a tensor where it is produced)
    matches the emitted model. ``scope`` is the model's NameScope."""
    g = model.graph
    constants = {t.name for t in g.initializer}
    nodes: list[onnx.NodeProto] = []
    for node in g.node:
        for name in subgraph_reads(node):
            if name in constants:
                continue
            routed = scope.unique_name(f"{name}_to_{node.name}")
            nodes.append(onnx.helper.make_node("Identity", [name], [routed],
                                               name=scope.unique_name(f"{node.name}_reads_{name}")))
            for _, sub in subgraphs(node):
                rename_outer_reads(sub, name, routed)
        nodes.append(node)
    del g.node[:]
    g.node.extend(nodes)


def rename_outer_reads(graph: onnx.GraphProto, old: str, new: str) -> int:
    """Mutates: outer-scope reads of ``old`` in ``graph`` and its nested graphs become ``new``; a
    graph that defines ``old`` itself shadows the outer tensor and is left alone. Returns the number
    of reads renamed."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    defined |= {o for n in graph.node for o in n.output}
    if old in defined:
        return 0
    count = 0
    for node in graph.node:
        count += sum(i == old for i in node.input)
        node.input[:] = [new if i == old else i for i in node.input]
        for _, sub in subgraphs(node):
            count += rename_outer_reads(sub, old, new)
    for out in graph.output:
        if out.name == old:
            out.name = new
            count += 1
    return count
