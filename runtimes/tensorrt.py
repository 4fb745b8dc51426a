"""TensorRT target (explicit quantization) and its engine check.

TensorRT runs a QDQ model in int8 when every Q/DQ is symmetric (zero point 0), activations are per
tensor, weights per output channel (or one blocked axis for 4-bit weight-only MatMul/Gemm), and the
Q/DQ sit on the inputs of the weighted ops and on the skip input of residual Adds. Biases stay float
(TensorRT quantizes them itself), weighted-op outputs carry no Q (it would split the op from what
follows it), and the quantized inputs of a Concat share one step.

``build_engine`` needs the ``tensorrt`` package and a CUDA GPU; it is imported only when called, so the
target and the static checks work everywhere.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import onnx
from onnx import TensorProto

from onnxflex.runtimes.base import Target

TENSORRT = Target(
    name="tensorrt",
    act_dtype=TensorProto.INT8,
    act_dtypes=(TensorProto.INT8,),
    blocked_weight_dtypes=(TensorProto.INT4,),
    blocked_weight_ops=("MatMul", "Gemm"),
    int32_bias=False,
    quantize_outputs=False,
    absorb=(),
    quantize_residual_add=True,
    shared_concat_scales=True,
    min_opset=13,
    max_opset=22,  # TensorRT 10's ONNX parser; TensorRT 8.6 reads up to 17, so onnxflex writes 13
    runtime_check="tensorrt-engine",
    float_depth=0,  # TensorRT fuses Q/DQ into its int8 kernels; shallow layers are not measured to lose there
)

FLOAT_FORMATS = ("Float", "Half", "BFloat16", "FP32", "FP16", "BF16")


@dataclass(frozen=True)
class EngineReport:
    """What building a TensorRT engine showed.

    built: the engine was built; skipped: why nothing was built (empty when it was attempted);
    errors: parser or builder messages; layers: (engine layer name, layer type, precision) where precision
    is 'int8', 'int4', 'float' or 'unknown', read from the layer's input formats.
    """

    built: bool
    skipped: str = ""
    errors: tuple[str, ...] = ()
    layers: tuple[tuple[str, str, str], ...] = field(default=())


def engine_unavailable() -> str:
    """Why no engine can be built here ('' when TensorRT and a CUDA GPU are both present)."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "the tensorrt Python package is not installed"
    try:
        import torch
    except ImportError:
        return "torch is not installed, so no CUDA device can be detected"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    return ""


def build_engine(model: onnx.ModelProto, max_batch: int = 1) -> EngineReport:
    """Parse ``model`` with TensorRT's ONNX parser, build an engine (strongly typed where the installed
    TensorRT has it, else with the INT8 flag) and read each engine layer's precision from the engine
    inspector. Dynamic dimensions are fixed to 1 (the batch to ``max_batch``) for the build."""
    why = engine_unavailable()
    if why:
        return EngineReport(built=False, skipped=why)
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    flags = 1 << int(typed) if typed is not None else 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(model.SerializeToString()):
        return EngineReport(False, errors=tuple(str(parser.get_error(i).desc()) for i in range(parser.num_errors)))
    config = builder.create_builder_config()
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if typed is None:
        config.set_flag(trt.BuilderFlag.INT8)
    _add_profile(builder, network, config, max_batch)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        return EngineReport(False, errors=("TensorRT could not build an engine (see its log above)",))
    engine = trt.Runtime(logger).deserialize_cuda_engine(serialized)
    info = json.loads(engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON))
    return EngineReport(True, layers=tuple(_layer_precision(layer) for layer in info.get("Layers", [])))


def _add_profile(builder, network, config, max_batch: int) -> None:
    dynamic = False
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = list(tensor.shape)
        if any(d < 0 for d in shape):
            dynamic = True
            low = [1 if d < 0 else d for d in shape]
            high = [(max_batch if k == 0 else 1) if d < 0 else d for k, d in enumerate(shape)]
            profile.set_shape(tensor.name, low, high, high)
    if dynamic:
        config.add_optimization_profile(profile)


def _layer_precision(layer) -> tuple[str, str, str]:
    """(name, type, precision) of one engine-inspector layer record (a dict, or a bare name string)."""
    if isinstance(layer, str):
        return layer, "", "unknown"
    formats = " ".join(str(t.get("Format/Datatype", "")) for t in layer.get("Inputs", []))
    if "Int8" in formats or "INT8" in formats:
        precision = "int8"
    elif "Int4" in formats or "INT4" in formats:
        precision = "int4"
    elif any(f in formats for f in FLOAT_FORMATS):
        precision = "float"
    else:
        precision = "unknown"
    return str(layer.get("Name", "")), str(layer.get("LayerType", "")), precision
