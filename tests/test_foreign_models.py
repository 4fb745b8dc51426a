"""W8A8 quantization of models shaped like other frameworks' exports (tests/graphs.py).

Each model is quantized with RTN and must: pass the full onnx checker, load in onnxruntime, agree with
onnxflex's own simulation (≥ 30 dB), keep ≥ 20 dB of output SQNR against FP32 on fresh inputs, read
every Conv/Gemm/MatMul weight through an int8 per-channel DequantizeLinear, lose the affine nodes the
passes fold, and run as integer kernels in onnxruntime's optimized graph. fold_bias_add is also checked
on its own: it folds a constant Add/Mul only when the constant varies along the output channels alone.
"""
from __future__ import annotations

import functools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper

import graphs  # tests/graphs.py; tests/ is on pytest's pythonpath
import onnxflex
from onnxflex.options import resolve
from onnxflex.passes.pipeline import PassContext, run_passes
from onnxflex.qparams import sqnr_db
from onnxflex.verify import optimized_op_counts

CALIB_SAMPLES, EVAL_SAMPLES = 128, 64
WEIGHTED = ("Conv", "Gemm", "MatMul")
# op → integer kernel onnxruntime's CPU QDQ fusion must turn it into
INTEGER_KERNEL = {"Conv": "QLinearConv", "Gemm": "QGemm", "MatMul": "QLinearMatMul"}
# op types the passes must fold away (BatchNorm, Mul/Add constant chains, bias Adds after Conv/Gemm)
FOLDED = {
    "conv_bias_add": {"Add"},
    "conv_mul_add_bn": {"Mul", "Add"},
    "conv_batchnorm": {"BatchNormalization"},
    "mobilenet_clip6": {"BatchNormalization"},
    "weights_through_ops": {"Identity", "Transpose", "Cast"},
    "gemm_mlp": {"BatchNormalization"},
}
# op counts the emitted graph must keep: affine ops of run-time tensors, or that are not per channel
KEPT = {
    "hardswish_se": {"Mul": 2},  # the squeeze-excite gate and x * HardSigmoid(x)
    "shared_weights": {"Add": 1},  # the residual
    "conv_add_along_width": {"Add": 1},  # a [C] constant after a conv broadcasts along the width
    "reshape_transpose_head": {"Add": 1},  # MatMul biases stay Adds (only Conv/Gemm absorb them)
    "matmul_bias_mlp": {"Add": 2},
}


def rtn_config(**changes) -> onnxflex.QuantConfig:
    """RTN W8A8 with the latency rule off: these tests check that every weighted node is quantized."""
    return onnxflex.QuantConfig(method="rtn", wbits=8, abits=8, **{"latency_rules": False, **changes})


def run_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The model's first output on ``feeds``, one sample at a time when the model fixes batch 1."""
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    fixed = sess.get_inputs()[0].shape[0] == 1
    n = len(next(iter(feeds.values())))
    step = 1 if fixed else n
    chunks = [sess.run(None, {k: v[i:i + step] for k, v in feeds.items()})[0] for i in range(0, n, step)]
    return np.concatenate(chunks)


def unique_node_names(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose node names are unique, so that onnxruntime loads it as the FP32 reference."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for k, node in enumerate(out.graph.node):
        node.name = f"{node.name or node.op_type}_{k}"
    return out


def weight_axis(node: onnx.NodeProto) -> int:
    """The output-channel axis of a weighted node's weight (Conv 0, Gemm by transB, MatMul 1)."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return 1


def check_weight_dq(model: onnx.ModelProto, name: str) -> None:
    """Every Conv/Gemm/MatMul reads its weight (input 1) and activation (input 0) through a
    DequantizeLinear: weight int8 per channel along the op's output-channel axis, activation uint8."""
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name: t for t in model.graph.initializer}
    weighted = [n for n in model.graph.node if n.op_type in WEIGHTED]
    assert weighted, f"no weighted node left in the quantized {name}"
    for node in weighted:
        dq = producers.get(node.input[1])
        assert dq is not None and dq.op_type == "DequantizeLinear", \
            f"{name}: weight of {node.name} ({node.op_type}) is not read through DequantizeLinear"
        ints, scale = inits[dq.input[0]], numpy_helper.to_array(inits[dq.input[1]])
        axis = weight_axis(node)
        dq_axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        assert ints.data_type == TensorProto.INT8, f"{name}: {node.name} weight is {ints.data_type}, not int8"
        assert dq_axis == axis, f"{name}: {node.name} weight DequantizeLinear axis {dq_axis}, expected {axis}"
        assert scale.shape == (ints.dims[axis],), \
            f"{name}: {node.name} weight scale shape {scale.shape}, expected ({ints.dims[axis]},)"
        act = producers.get(node.input[0])
        assert act is not None and act.op_type == "DequantizeLinear", \
            f"{name}: activation input of {node.name} is not read through DequantizeLinear"
        assert inits[act.input[2]].data_type == TensorProto.UINT8, f"{name}: {node.name} activation is not uint8"


def check_integer_kernels(fp_model: onnx.ModelProto, qmodel: onnx.ModelProto, name: str) -> None:
    """No float Conv/Gemm/MatMul survives onnxruntime's QDQ fusion; each became its integer kernel."""
    counts = optimized_op_counts(qmodel)
    for op in {n.op_type for n in fp_model.graph.node if n.op_type in WEIGHTED}:
        assert op not in counts, f"{name}: {counts.get(op)} float {op} left in onnxruntime's optimized graph {counts}"
        assert INTEGER_KERNEL[op] in counts, f"{name}: no {INTEGER_KERNEL[op]} in optimized graph {counts}"


def check_accuracy(result, fp_model: onnx.ModelProto, name: str, min_sqnr: float = 20.0) -> float:
    """Returns the output SQNR of the quantized model against FP32 on fresh inputs."""
    sim = result.report["verification"]["onnxruntime_vs_simulation_sqnr_db"]
    assert sim, f"{name}: the report has no verification"
    for out, db in sim.items():
        assert db >= 30.0, f"onnxruntime vs simulation SQNR {db:.1f} dB < 30 dB on {name} output {out}"
    feeds = graphs.random_calibration(fp_model, EVAL_SAMPLES, seed=1234)
    sqnr = sqnr_db(run_ort(unique_node_names(fp_model), feeds), run_ort(result.model, feeds))
    assert sqnr >= min_sqnr, f"SQNR {sqnr:.1f} dB < {min_sqnr:.0f} dB on {name}"
    return sqnr


@pytest.mark.parametrize("name", list(graphs.BUILDERS))
def test_rtn_w8a8(name):
    model = graphs.BUILDERS[name](0)
    calib = graphs.random_calibration(model, CALIB_SAMPLES, seed=0)
    result = onnxflex.quantize(model, calib, rtn_config(), progress=False)
    qmodel = result.model

    onnx.checker.check_model(qmodel, full_check=True)
    ort.InferenceSession(qmodel.SerializeToString(), providers=["CPUExecutionProvider"])
    check_accuracy(result, model, name)
    check_weight_dq(qmodel, name)
    ops = {n.op_type for n in qmodel.graph.node}
    left = FOLDED.get(name, set()) & ops
    assert not left, f"{name}: {sorted(left)} should have been folded away, the emitted graph has {sorted(ops)}"
    for op, count in KEPT.get(name, {}).items():
        got = sum(n.op_type == op for n in qmodel.graph.node)
        assert got == count, f"{name}: {got} {op} nodes in the emitted graph, expected {count}"
    check_integer_kernels(model, qmodel, name)


def _fold_case(op: str, shape: tuple[int, ...], folds: bool):
    return pytest.param(op, shape, folds, id=f"{op}-{'x'.join(map(str, shape)) or 'scalar'}")


@pytest.mark.parametrize("op, shape, folds", [
    _fold_case("Conv", (1, 8, 1, 1), True), _fold_case("Conv", (8, 1, 1), True),
    _fold_case("Conv", (), True), _fold_case("Conv", (1,), True),
    _fold_case("Conv", (8,), False),  # broadcasts along the width
    _fold_case("Conv", (8, 1, 1, 1), False),  # along the batch
    _fold_case("Conv", (1, 1, 8, 1, 1), False),  # raises the rank
    _fold_case("Gemm", (8,), True), _fold_case("Gemm", (1, 8), True),
    _fold_case("Gemm", (8, 1), False), _fold_case("Gemm", (8, 1, 1), False),
])
@pytest.mark.parametrize("affine", ["Add", "Mul"])
def test_fold_only_per_channel_constants(op, shape, folds, affine):
    """fold_bias_add absorbs a constant Add/Mul into the Conv/Gemm before it only when the constant
    varies along the output channels alone; a folded model computes what the original does."""
    model = graphs.affine_after(op, shape, affine)
    folded = run_passes(model, PassContext(resolve(rtn_config()).plan))
    kept = [n.op_type for n in folded.graph.node if n.op_type == affine]
    assert len(kept) == (0 if folds else 1), f"{op} then {affine} {list(shape)}: {'not ' * folds}folded"
    if folds:
        feeds = graphs.random_calibration(model, 4, seed=0)
        db = sqnr_db(run_ort(model, feeds), run_ort(folded, feeds))
        assert db > 100, f"{op} then {affine} {list(shape)}: folded model differs by SQNR {db:.1f} dB"


@functools.lru_cache(maxsize=None)
def _flexround(name: str) -> onnxflex.QuantResult:
    model = graphs.BUILDERS[name](0)
    calib = graphs.random_calibration(model, CALIB_SAMPLES, seed=0)
    config = onnxflex.QuantConfig(method="flexround", wbits=8, abits=8, iters=20, batch_size=16)
    return onnxflex.quantize(model, calib, config, progress=False)


def test_flexround_smoke():
    name = "conv_mul_add_bn"
    result = _flexround(name)
    onnx.checker.check_model(result.model, full_check=True)
    check_accuracy(result, graphs.BUILDERS[name](0), name)
    check_weight_dq(result.model, name)
    blocks = result.report["blocks"]
    assert blocks and all(b["iters"] == 20 for b in blocks), f"blocks did not train 20 iterations: {blocks}"
    assert all(np.isfinite(b["loss_after"]) for b in blocks), f"non-finite block loss: {blocks}"


def test_flexround_never_ends_worse_than_rtn():
    """Learning that ends above the round-to-nearest start is rolled back to the start."""
    name = "conv_mul_add_bn"
    for b in _flexround(name).report["blocks"]:
        assert b["loss_after"] <= b["loss_before"], \
            f"{name} {b['name']}: loss {b['loss_before']:.4g} -> {b['loss_after']:.4g} after FlexRound"
