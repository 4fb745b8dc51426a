"""The key/value cache of a decoder exported with past key/values.

Such an export (torch.onnx or optimum from a Hugging Face causal LM) takes, per layer, a past key and
value as float graph inputs (``past_key_values.0.key`` [N, kv_heads, P, head_dim], P = 0 for a
prompt) and returns the Concat of each with the new step's keys or values as a graph output
(``present.0.key`` [N, kv_heads, P + T, head_dim]), which the caller feeds back as the next past.
onnxruntime-genai's form holds the cache in com.microsoft GroupQueryAttention (CACHE_OPS): the past
inputs it reads and the present outputs it makes are cache tensors too.

Cache tensors are those inputs and outputs: the float graph inputs that reach a graph output through
CACHE_PATH_OPS, and the graph outputs they reach. Each is read or made by one decoder layer only, so
partition does not count them as crossing a cut (passes/partition.py): a layer's block reads its past
straight from the graph inputs and its present leaves the graph as it is made. None gets a Q/DQ of
its own, and no weighted op whose output the cache stores (a k/v projection, through reshapes,
rotary and the Concat: ``cache_sources``) gets an output Q/DQ, so with --abits 8 the cache holds the
layer's float output, as the FP32 model's would for its quantized weights.
"""
from __future__ import annotations

import onnx

from onnxflex.graph import graph_input_names
from onnxflex.passes.recurrent import flows_into
from onnxflex.placement import FLOAT_TYPES

CACHE_PATH_OPS = {"Concat", "Cast"}
CACHE_OPS = {"GroupQueryAttention": ((3, 4), (1, 2))}  # com.microsoft: (past input, present output) slots
CACHE_VALUE_SLOTS = {"GroupQueryAttention": (0, 1, 2)}  # ... the inputs it stores (query packs q, k, v when 1 is empty)
SHAPE_OPS = {"Shape", "Size"}  # read only the shape of their input, never its values


def cache_tensors(model: onnx.ModelProto) -> set[str]:
    """The cache inputs and outputs of the top-level graph (module docstring), with any tensor on the
    Concat/Cast path between them."""
    g = model.graph
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in g.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    outputs = {o.name for o in g.output}
    runtime = set(graph_input_names(model))
    found: set[str] = set()
    for vi in g.input:
        if vi.name not in runtime or vi.type.tensor_type.elem_type not in FLOAT_TYPES:
            continue
        reach = flows_into(vi.name, users, CACHE_PATH_OPS)
        if reach & outputs:
            found |= reach
    for node in g.node:  # onnxruntime's attention that holds the cache: past in, present out
        if node.op_type in CACHE_OPS and node.domain == "com.microsoft":
            past, present = CACHE_OPS[node.op_type]
            found |= {node.input[i] for i in past if i < len(node.input) and node.input[i] in runtime}
            found |= {node.output[i] for i in present if i < len(node.output) and node.output[i] in outputs}
    return found


def cache_sources(model: onnx.ModelProto, stop: set[str]) -> set[str]:
    """Tensors of the top-level graph whose values a cache output stores: the tensors a cache output is
    made from through nodes other than the ``stop`` ops (the weighted ops that make them) and SHAPE_OPS;
    a CACHE_OPS node stores only its key/value inputs (CACHE_VALUE_SLOTS; its query only when packed)."""
    cache = cache_tensors(model)
    reach = {o.name for o in model.graph.output if o.name in cache}
    for node in reversed(model.graph.node):
        if node.op_type in stop or node.op_type in SHAPE_OPS or not any(o in reach for o in node.output):
            continue
        inputs = list(node.input)
        if node.op_type in CACHE_VALUE_SLOTS and node.domain == "com.microsoft":
            packed = len(inputs) < 2 or not inputs[1]
            inputs = [inputs[i] for i in CACHE_VALUE_SLOTS[node.op_type] if i < len(inputs) and (i or packed)]
        reach.update(i for i in inputs if i)
    return reach


def cache_pairs(model: onnx.ModelProto) -> dict[str, str]:
    """Past cache input → the present output a caller feeds back as it on the next step, in graph-input
    order: the graph output a past reaches through CACHE_PATH_OPS, or the present slot of the CACHE_OPS
    node that reads it in the matching past slot."""
    g = model.graph
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in g.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    cache, outputs = cache_tensors(model), [o.name for o in g.output]
    pairs: dict[str, str] = {}
    for name in graph_input_names(model):
        if name not in cache:
            continue
        reached = [o for o in outputs if o in flows_into(name, users, CACHE_PATH_OPS) and o != name]
        for node in users.get(name, []):
            if node.op_type in CACHE_OPS and node.domain == "com.microsoft":
                past, present = CACHE_OPS[node.op_type]
                reached += [node.output[p] for i, p in zip(past, present)
                            if i < len(node.input) and node.input[i] == name and p < len(node.output)]
        if len(reached) == 1:
            pairs[name] = reached[0]
    return pairs
