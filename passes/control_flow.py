"""Control flow (If, Loop, Scan and any node with a graph attribute): what its subgraphs read from the
outer graph, the canonical form the other passes rely on, and probes into subgraphs for calibration.

An If whose condition folds to a constant (e.g. from an input pinned with --fix-input) is replaced by
the branch it takes (passes/fold_if.py), so its layers are ordinary top-level layers. The layers
directly inside the subgraphs of the remaining top-level If/Loop/Scan nodes (passes/select_inner.py)
get int8 weights and activation Q/DQ calibrated from the data, placed inside the subgraph by the
emitter. A block holding an If, Loop or Scan whose subgraphs have torch converters runs in torch
(rounding/torchify.py runs the taken branch, or the body once per iteration), so those layers are
learned; otherwise the block runs in onnxruntime, its layers rounded to nearest.
"""
from __future__ import annotations

from typing import Iterator

import onnx

from onnxflex.runtimes.base import RECURRENT_OPS, WEIGHTED_OPS

CONTROL_FLOW = {"If", "Loop", "Scan"}
Scope = list[tuple[onnx.GraphProto, str, str]]  # enclosing subgraphs, outermost first: (graph, owner, attribute)


def subgraphs(node: onnx.NodeProto) -> Iterator[tuple[str, onnx.GraphProto]]:
    """(attribute name, graph) for each graph attribute of ``node`` (GRAPH and GRAPHS kinds)."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.name, attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            for k, g in enumerate(attr.graphs):
                yield f"{attr.name}[{k}]", g


def control_flow_nodes(model: onnx.ModelProto) -> Iterator[tuple[onnx.NodeProto, Scope]]:
    """Every default-domain If/Loop/Scan node at any depth, outer ones first, with the subgraphs that
    enclose it (empty for a top-level node)."""
    def walk(g: onnx.GraphProto, scope: Scope):
        for node in g.node:
            if node.op_type in CONTROL_FLOW and node.domain in ("", "ai.onnx"):
                yield node, scope
                for attr, sub in subgraphs(node):
                    yield from walk(sub, scope + [(sub, node.name, attr)])

    yield from walk(model.graph, [])


def top_level_owner(model: onnx.ModelProto) -> dict[str, str]:
    """Control-flow node name (any depth) → the name of the top-level node whose subgraphs hold it (itself
    at the top level)."""
    return {node.name: scope[0][1] if scope else node.name for node, scope in control_flow_nodes(model)}


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


def read_counts(g: onnx.GraphProto) -> dict[str, int]:
    """Tensor → how many nodes of ``g`` read it (``reads``: a subgraph's outer-scope read counts)."""
    counts: dict[str, int] = {}
    for node in g.node:
        for name in reads(node):
            counts[name] = counts.get(name, 0) + 1
    return counts


def count_nodes(*graphs: onnx.GraphProto, ops: tuple[str, ...] | None = None) -> int:
    """The nodes of ``graphs`` at any depth (only those whose op_type is in ``ops``, when given)."""
    return sum((ops is None or n.op_type in ops) + count_nodes(*(g for _, g in subgraphs(n)), ops=ops)
               for graph in graphs for n in graph.node)


def localize_outer_initializers(model: onnx.ModelProto) -> None:
    """Mutates: an outer initializer that the nodes of a subgraph (at any depth) read is copied into that
    subgraph's own initializers, so the passes on the graph that holds it (dropping unused initializers,
    untying shared weights, replacing a weight with its DequantizeLinear) never break the subgraph, and
    a layer nested in a subgraph of a subgraph finds its weight in its own graph."""
    _localize(model.graph, {})


def _localize(g: onnx.GraphProto, outer: dict[str, onnx.TensorProto]) -> None:
    visible = {**outer, **{t.name: t for t in g.initializer}}
    for node in g.node:
        for _, sub in subgraphs(node):
            own = {t.name for t in sub.initializer} | {i.name for i in sub.input}
            direct = {i for n in sub.node for i in n.input} | {o.name for o in sub.output}
            sub.initializer.extend(visible[name] for name in outer_reads(sub)
                                   if name in visible and name not in own and name in direct)
            defined = own | {o for n in sub.node for o in n.output if o}
            _localize(sub, {k: v for k, v in visible.items() if k not in defined})


def unique_subgraph_initializers(model: onnx.ModelProto) -> None:
    """Mutates: a tensor a subgraph (at any depth) defines — initializer, graph input or node output —
    whose name another scope also uses (an outer weight copied in by localize_outer_initializers, two
    branches' own 'w' or 'out', two bodies' 'i') gets a name of its own, so that quantizers keyed by
    name (QuantState, QuantParams) never mix two tensors and the emitter finds the one graph that
    defines each. Outer scopes, and the top-level graph, keep their names."""
    from onnxflex.graph import NameScope

    g = model.graph
    seen = {t.name for t in g.initializer} | {i.name for i in g.input} | {o for n in g.node for o in n.output}
    _unique_below(g, seen, NameScope.of(model))


def _unique_below(g: onnx.GraphProto, seen: set[str], scope) -> None:
    for node in g.node:
        for _, sub in subgraphs(node):
            defined = [i.name for i in sub.input] + [t.name for t in sub.initializer]
            defined += [o for n in sub.node for o in n.output if o]
            renames = {name: scope.unique_name(name) for name in dict.fromkeys(defined) if name in seen}
            for old, new in renames.items():
                _rename_local(sub, old, new)
                for value in list(sub.input) + list(sub.initializer) + list(sub.value_info):
                    value.name = new if value.name == old else value.name
                for n in sub.node:
                    n.output[:] = [new if o == old else o for o in n.output]
            seen.update(defined, renames.values())
            _unique_below(sub, seen, scope)


def local_layer_inputs(model: onnx.ModelProto, scope, weighted_ops=("Conv", "ConvTranspose", "Gemm", "MatMul")) -> None:
    """Mutates: a weighted node in a subgraph (at any depth) that reads an outer-scope tensor as its
    activation reads it through a new Identity of its own subgraph. The activation's Q/DQ then sits in
    the same graph as the layer, where onnxruntime can fuse DQ → Conv/MatMul → Q (it fuses within one
    graph only). ``scope`` is the model's NameScope."""
    _local_inputs_below(model.graph, scope, weighted_ops)


def _local_inputs_below(g: onnx.GraphProto, scope, weighted_ops) -> None:
    for node in g.node:
        for _, sub in subgraphs(node):
            defined = {i.name for i in sub.input} | {t.name for t in sub.initializer}
            defined |= {o for n in sub.node for o in n.output if o}
            local: dict[str, str] = {}
            added = []
            for inner in sub.node:
                name = inner.input[0] if inner.input else ""
                if inner.op_type not in weighted_ops or not name or name in defined:
                    continue
                if name not in local:
                    local[name] = scope.unique_name(f"{name}_in_{node.name}")
                    added.append(onnx.helper.make_node("Identity", [name], [local[name]],
                                                       name=scope.unique_name(f"{inner.name}_reads_{name}")))
                inner.input[0] = local[name]
            if added:
                nodes = added + list(sub.node)
                del sub.node[:]
                sub.node.extend(nodes)
            _local_inputs_below(sub, scope, weighted_ops)


def _rename_local(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Mutates: every read of ``graph``'s own tensor ``old`` (its nodes, nested graphs, outputs) becomes ``new``."""
    for node in graph.node:
        node.input[:] = [new if i == old else i for i in node.input]
        for _, sub in subgraphs(node):
            rename_outer_reads(sub, old, new)
    for out in graph.output:
        if out.name == old:
            out.name = new


def control_flow_warnings(model: onnx.ModelProto, inner_layers=(), in_torch=lambda node: False) -> list[str]:
    """One line per top-level node with subgraphs, naming it and saying what is quantized inside it, at
    any depth (``inner_layers``: the QuantLayers passes/select_inner.py found, ``owner`` naming the node
    or a control-flow node nested in its subgraphs) and
    what stays float. ``in_torch(node)``: whether the block holding the node runs in torch (an If whose
    branches, and the rest of whose block, have torch converters), so that the layers of the branch the
    data takes are learned."""
    lines = []
    top = top_level_owner(model)
    for node in model.graph.node:
        graphs = list(subgraphs(node))
        if not graphs:
            continue
        inner = count_nodes(*(g for _, g in graphs))
        names = [l.node for l in inner_layers if top.get(l.owner) == node.name]
        head = f"node {node.name!r} ({node.op_type}) has subgraphs ({', '.join(n for n, _ in graphs)})"
        if names and in_torch(node):
            where = ("over the unrolled iterations of its body" if node.op_type in ("Loop", "Scan") else
                     "in the branch the calibration data takes")
            lines.append(f"{head}; {len(names)} layer(s) inside ({', '.join(names)}) get int8 weights, learned "
                         f"{where} (round-to-nearest in a subgraph it never runs), and activation Q/DQ calibrated "
                         "from the data, their other nodes stay float; the block holding it runs in torch")
        elif names:
            lines.append(f"{head}; {len(names)} layer(s) inside ({', '.join(names)}) get round-to-nearest int8 "
                         "weights and activation Q/DQ calibrated from the data (no learned rounding), their other "
                         "nodes stay float; the block holding it runs in onnxruntime")
        elif weighted := count_nodes(*(g for _, g in graphs), ops=WEIGHTED_OPS + RECURRENT_OPS):
            lines.append(f"{head}; its {weighted} Conv/Gemm/MatMul/recurrent node(s) inside (of {inner}) stay in "
                         "float: none has a constant float weight it can quantize, or --exclude-node names them")
    return lines  # a subgraph with no weighted node needs no line: its float nodes are float anyway


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


def expose_inner(model: onnx.ModelProto, points, scope) -> dict[str, str]:
    """Mutates ``model``: each InnerPoint's tensor becomes an extra output of its control-flow node, of
    each control-flow node enclosing that one, and of the graph; returns tensor → graph output name. If:
    both branches output it, the branch that does not compute it an empty float tensor. Loop and Scan:
    an extra scan output, stacked per iteration (Scan's output axis 0); one that encloses the point's
    own control-flow node (whose probe may change shape between iterations: an If there may not run the
    point's branch) concatenates its flattened values instead. ``scope`` is the model's NameScope."""
    nodes = {n.name: (n, enclosing) for n, enclosing in control_flow_nodes(model)}
    probes: dict[str, str] = {}
    for point in points:
        (node, enclosing), tensor, attr = nodes[point.owner], point.tensor, point.graph
        deeper = False
        while True:
            if deeper and node.op_type in ("Loop", "Scan"):
                parent = enclosing[-1][0] if enclosing else model.graph
                tensor = _accumulate_once(parent, node, attr, tensor, point.tensor, scope)
            else:
                tensor = _expose_once(node, attr, tensor, point.tensor, scope)
            if not enclosing:
                break
            _, owner, attr = enclosing[-1]
            node, enclosing = nodes[owner]
            deeper = True
        model.graph.output.append(onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None))
        probes[point.tensor] = tensor
    return probes


def _expose_once(node: onnx.NodeProto, attr: str, tensor: str, base: str, scope) -> str:
    """Mutates ``node``: ``tensor`` of its subgraph ``attr`` becomes a new output of the node; returns its name."""
    graphs = dict(subgraphs(node))
    out = scope.unique_name(f"{base}_probe")
    inner = scope.unique_name(f"{base}_probe_inner")
    graphs[attr].node.append(onnx.helper.make_node("Identity", [tensor], [inner],
                                                   name=scope.unique_name(f"{base}_probe")))
    graphs[attr].output.append(onnx.helper.make_tensor_value_info(inner, onnx.TensorProto.FLOAT, None))
    if node.op_type == "If":
        other = graphs["else_branch" if attr == "then_branch" else "then_branch"]
        empty = scope.unique_name(f"{base}_not_taken")
        other.node.append(onnx.helper.make_node(
            "Constant", [], [empty], name=scope.unique_name(f"{base}_not_taken"),
            value=onnx.helper.make_tensor(empty, onnx.TensorProto.FLOAT, [0], [])))
        other.output.append(onnx.helper.make_tensor_value_info(empty, onnx.TensorProto.FLOAT, None))
    elif node.op_type == "Scan":
        for a in node.attribute:
            if a.name in ("scan_output_axes", "scan_output_directions"):
                a.ints.append(0)
    node.output.append(out)
    return out


def _accumulate_once(parent: onnx.GraphProto, node: onnx.NodeProto, attr: str, tensor: str, base: str,
                     scope) -> str:
    """Mutates ``node`` and ``parent`` (the graph holding it): a new loop-carried value (a Loop's, or a
    Scan's state) starting empty gathers ``tensor`` of its body, flattened, over every iteration; returns
    the name of the node's new output that holds them all."""
    body = dict(subgraphs(node))[attr]
    first = 2 if node.op_type == "Loop" else 0
    carried = len(body.input) - first if node.op_type == "Loop" else \
        len(node.input) - next(a.i for a in node.attribute if a.name == "num_scan_inputs")
    acc_in, flat, acc_out = (scope.unique_name(f"{base}_{s}") for s in ("gathered_in", "flat", "gathered"))
    shape, start, out = (scope.unique_name(f"{base}_{s}") for s in ("flat_shape", "gather_start", "gathered_all"))
    body.initializer.append(onnx.helper.make_tensor(shape, onnx.TensorProto.INT64, [1], [-1]))
    body.node.extend([onnx.helper.make_node("Reshape", [tensor, shape], [flat], name=scope.unique_name(flat)),
                      onnx.helper.make_node("Concat", [acc_in, flat], [acc_out], name=scope.unique_name(acc_out),
                                            axis=0)])
    body.input.insert(first + carried, onnx.helper.make_tensor_value_info(acc_in, onnx.TensorProto.FLOAT, None))
    body.output.insert(1 + carried if node.op_type == "Loop" else carried,
                       onnx.helper.make_tensor_value_info(acc_out, onnx.TensorProto.FLOAT, None))
    parent.node.append(onnx.helper.make_node("Constant", [], [start], name=scope.unique_name(start),
                                             value=onnx.helper.make_tensor(start, onnx.TensorProto.FLOAT, [0], [])))
    node.input.insert(first + carried, start)
    node.output.insert(carried, out)
    return out
