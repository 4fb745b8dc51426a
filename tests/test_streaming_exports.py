"""What a real streaming export (a voice-activity detector) writes around its layers: If conditions
computed from the declared shape of a recurrent state, and If branches that read graph inputs and
tensors made several blocks earlier."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

import graphs  # tests/graphs.py; tests/ is on pytest's pythonpath
import onnxflex
from onnxflex.options import resolve
from onnxflex.passes.control_flow import subgraph_reads
from onnxflex.pipeline import build_plan

N = 48


def _branch(b: graphs._Builder, name: str, reads: list[str], op: str) -> onnx.GraphProto:
    """A branch with a Conv 'name' over the outer ``a`` [N, 4, 8, 8], then ``op`` with the outer ``reads``."""
    w = b.conv_weight(f"{name}_w", 4, 4, 3)
    inits = [t for t in b.inits if t.name == w]
    b.inits = [t for t in b.inits if t.name != w]  # the weight lives in the branch
    nodes = [helper.make_node("Conv", ["a", w], [f"{name}_c"], name=name, pads=[1, 1, 1, 1])]
    for k, outer in enumerate(reads):
        nodes.append(helper.make_node(op, [nodes[-1].output[0], outer], [f"{name}_{k}"], name=f"{name}_{op}{k}"))
    out = helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, None)
    return helper.make_graph(nodes, f"{name}_graph", [], [out], inits)


def _model(condition: str) -> onnx.ModelProto:
    """conv1 → conv2 → If → conv3; the If's branches read the outer ``a`` and also ``x`` (a graph input)
    and ``c1`` (made two layers before). ``condition``: 'state' = ``bool(state.shape[0])`` of the state
    input declared [2, N, 4] (known before any run), 'mode' = ``mode == 1`` of a 0-d int64 input."""
    b = graphs._Builder(0)
    b.node("Conv", ["x", b.conv_weight("w1", 4, 4, 3)], ["c1"], name="conv1", pads=[1, 1, 1, 1])
    b.node("Relu", ["c1"], ["r1"], name="relu1")
    b.node("Conv", ["r1", b.conv_weight("w2", 4, 4, 3)], ["c2"], name="conv2", pads=[1, 1, 1, 1])
    b.node("Relu", ["c2"], ["a"], name="relu2")
    if condition == "state":
        b.node("Shape", ["state"], ["state_shape"], name="state_shape")
        b.node("Gather", ["state_shape", b.const("zero", np.array(0, np.int64))], ["layers"], name="layers")
        b.node("Cast", ["layers"], ["flag"], name="flag", to=TensorProto.BOOL)
    else:
        b.node("Equal", ["mode", b.const("one", np.array(1, np.int64))], ["flag"], name="flag")
    then_g, else_g = _branch(b, "conv_then", ["x", "c1"], "Add"), _branch(b, "conv_else", ["x", "c1"], "Sub")
    b.node("If", ["flag"], ["g"], name="branch", then_branch=then_g, else_branch=else_g)
    b.node("Conv", ["g", b.conv_weight("w3", 4, 4, 3)], ["y"], name="conv3", pads=[1, 1, 1, 1])
    extra = (helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, graphs.N, 4]) if condition == "state"
             else helper.make_tensor_value_info("mode", TensorProto.INT64, []))
    return b.model("streaming", [graphs._image(channels=4, size=8), extra], [graphs._out(graphs.N, 4, 8, 8)], opset=13)


def _data(condition: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    data = {"x": rng.standard_normal((N, 4, 8, 8)).astype(np.float32)}
    if condition == "state":
        data["state"] = rng.standard_normal((2, N, 4)).astype(np.float32)
    else:
        data["mode"] = np.array(1, np.int64)
    return data


def test_an_if_on_a_declared_state_dim_folds_and_its_layer_is_top_level():
    """``bool(state.shape[0])`` with state declared [2, ?, 4] is true before any run: the If folds into
    its then branch, whose Conv becomes an ordinary top-level layer."""
    plan = build_plan(_model("state"), resolve(onnxflex.QuantConfig(method="rtn")).plan)
    assert not [n.name for n in plan.model.graph.node if n.op_type == "If"], "the If on state.shape[0] stayed"
    layers = {layer.node for layer in plan.layers}
    assert {"conv1", "conv2", "conv3"} < layers and any("conv_then" in name for name in layers), layers
    assert not any("conv_else" in name for name in layers), layers


def test_a_block_reads_every_outer_tensor_its_if_branches_read():
    """The If's branches read ``x`` and ``c1``; explicit_outer_reads routes each through an Identity that
    may land blocks earlier. The block holding the If must take the routed tensors as inputs (it used to
    fail with a KeyError in the torch run), and the model quantizes and runs."""
    model = _model("mode")
    plan = build_plan(model, resolve(onnxflex.QuantConfig(method="rtn")).plan)
    by_name = {n.name: n for n in plan.model.graph.node}
    for block in plan.blocks:
        made = {o for name in block.nodes for o in by_name[name].output}
        for name in block.nodes:
            missing = set(subgraph_reads(by_name[name])) - made - set(block.inputs)
            assert not missing, f"{block.name} runs {name} without {sorted(missing)}"
    result = onnxflex.quantize(model, _data("mode"), onnxflex.QuantConfig(method="rtn", verify_samples=8),
                               progress=False)
    assert result.report["verification"]["onnxruntime_vs_simulation_sqnr_db"]["y"] >= 30, result.report["verification"]
