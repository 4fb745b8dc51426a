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
its own (activation quant points are the inputs and outputs of weighted ops; with --abits 8 a k/v
projection's output Q/DQ still rounds what the cache stores).
"""
from __future__ import annotations

import onnx

from onnxflex.graph import graph_input_names
from onnxflex.passes.recurrent import flows_into
from onnxflex.placement import FLOAT_TYPES

CACHE_PATH_OPS = {"Concat", "Cast"}
CACHE_OPS = {"GroupQueryAttention": ((3, 4), (1, 2))}  # com.microsoft: (past input, present output) slots


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
