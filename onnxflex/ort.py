"""onnxruntime in one place: sessions, their options, the providers on offer, and a user's model as
the installed onnxruntime reads it. No other onnxflex module builds a SessionOptions or an
InferenceSession (tests/test_architecture.py keeps it so).

onnx 1.23 saves IR version 14 by default and onnxruntime 1.31 reads at most 13; legacy exporters
declare a dynamic batch as ``dim_value: -1`` or ``0`` (onnxruntime takes 0 for a fixed size 0).
``for_onnxruntime`` fixes both in a copy and lowers an opset newer than onnxruntime knows when
onnx.version_converter can; every onnxruntime session onnxflex opens on a model goes through it
(``session``). What the installed onnxruntime reads is found once, by loading tiny models.
"""
from __future__ import annotations

import functools
import os
import shutil
import tempfile
import weakref
from pathlib import Path

import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from onnxflex.errors import UnsupportedModelError
from onnxflex.extdata import needs_file, weights_dir, write_model
from onnxflex.graph import default_opset, set_default_opset

CPU = ("CPUExecutionProvider",)
CUDA = ("CUDAExecutionProvider", "CPUExecutionProvider")

# onnxruntime fuses DequantizeLinear(blocked INT4) → MatMul into MatMulNBits with accuracy level 4 unless
# told otherwise, and level 4 quantizes the activations to int8 on the fly; onnxflex's weight-only
# simulation keeps activations float, so its sessions ask for the op's default level 0 (float32 compute).
MATMULNBITS_ACCURACY_LEVEL = "0"

OLDEST_IR = 7  # onnx 1.6; every onnxruntime onnxflex supports reads it


def version() -> str:
    return ort.__version__


def available_providers() -> list[str]:
    return ort.get_available_providers()


def session_options(*, matmulnbits: bool = True, optimized_path: str | None = None,
                    extended_only: bool = False, severity: int = 3, spinning: bool = True) -> ort.SessionOptions:
    """Options with log severity ``severity`` (3: errors only); ``matmulnbits``: MatMulNBits at
    MATMULNBITS_ACCURACY_LEVEL; ``optimized_path``: onnxruntime writes its optimized graph there;
    ``extended_only``: optimizations up to ORT_ENABLE_EXTENDED (no layout transforms); not ``spinning``:
    its intra-op threads sleep when idle (other work of the process runs between its runs)."""
    opts = ort.SessionOptions()
    opts.log_severity_level = severity
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if extended_only:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    if optimized_path is not None:
        opts.optimized_model_filepath = optimized_path
    if matmulnbits:
        opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", MATMULNBITS_ACCURACY_LEVEL)
    return opts


def session(model: onnx.ModelProto, providers: list[str], threads: int = 0,
            opts: ort.SessionOptions | None = None, prepack: bool = False) -> ort.InferenceSession:
    """The one way onnxflex opens an onnxruntime session on a model: its header made loadable first
    (for_onnxruntime: unknown dims, IR version, opset; raises UnsupportedModelError), with
    ``opts`` [default: session_options()] and ``threads`` intra-op threads (0 = onnxruntime's choice).
    ``prepack``: keep onnxruntime's weight prepacking on a model that goes by path (a timing session,
    which must run as a user's does); onnxflex's own sessions there go without it."""
    model = for_onnxruntime(model)
    opts = opts or session_options()
    if threads:
        opts.intra_op_num_threads = threads
    if not needs_file(model):
        return ort.InferenceSession(model.SerializeToString(), opts, providers=providers)
    # A large model goes by path, its weights as external data that onnxruntime maps from disk;
    # prepacking would keep a second, packed copy of every weight. Without it MatMulNBits repacks its
    # weight on every run (a 6x4096 MLP at W4: 224 ms against 10 ms), so timing keeps it.
    if not prepack:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    path = runtime_file(model)
    try:
        sess = ort.InferenceSession(str(path), opts, providers=providers)
    except Exception:
        remove_runtime_file(path)
        raise
    weakref.finalize(sess, remove_runtime_file, path)
    return sess


WARMUP = 3  # runs of each session before it is timed


def timing_sessions(models: list[onnx.ModelProto], feed: dict, threads: int) -> list[ort.InferenceSession]:
    """CPU sessions of ``models`` for timing on ``feed``, each already run WARMUP times on the inputs of
    ``feed`` it declares (``declared``). They fuse blocked weights into MatMulNBits at onnxruntime's own
    default accuracy level (4: int8 compute), as a user's session does, not at the float level
    onnxflex's numeric checks ask for (an 8-bit lm_head of 8210 classes ran 3.7x slower at level 0 than
    at 4), and keep weight prepacking however large the model."""
    sessions = [session(model, list(CPU), threads, opts=session_options(matmulnbits=False), prepack=True)
                for model in models]
    for sess in sessions:
        given = declared(sess, feed)
        for _ in range(WARMUP):
            sess.run(None, given)
    return sessions


def declared(sess: ort.InferenceSession, feed: dict) -> dict:
    """The entries of ``feed`` that ``sess``'s model declares as inputs."""
    return {i.name: feed[i.name] for i in sess.get_inputs()}


def load_error(model: onnx.ModelProto, providers=CPU, opts: ort.SessionOptions | None = None) -> str | None:
    """onnxruntime's one-line complaint when it cannot load ``model``, else None."""
    try:
        session(model, list(providers), opts=opts)
    except Exception as exc:  # onnxruntime raises its own pybind types
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return None


def runtime_file(model: onnx.ModelProto) -> Path:
    """``model`` written for onnxruntime or onnx.checker: in its working folder when it has one (its
    external tensors are referenced, not copied), else in a new temporary folder."""
    folder = weights_dir(model) or tempfile.mkdtemp(prefix="onnxflex-model-")
    fd, name = tempfile.mkstemp(prefix=".runtime-", suffix=".onnx", dir=folder)
    os.close(fd)
    return write_model(model, name)


def remove_runtime_file(path: Path) -> None:
    for p in (path, path.with_name(path.name + ".data")):
        if p.exists():
            p.unlink()
    if path.parent.name.startswith("onnxflex-model-"):
        shutil.rmtree(path.parent, ignore_errors=True)


def _loads(ir_version: int, opset: int) -> bool:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    opts = session_options(matmulnbits=False, severity=4)
    try:
        ort.InferenceSession(model.SerializeToString(), opts, providers=list(CPU))
    except Exception:  # onnxruntime raises its own pybind types
        return False
    return True


@functools.lru_cache(maxsize=None)
def max_ir_version() -> int:
    """The newest IR version the installed onnxruntime loads (at most the installed onnx's)."""
    return next((ir for ir in range(onnx.IR_VERSION, OLDEST_IR, -1) if _loads(ir, 13)), OLDEST_IR)


@functools.lru_cache(maxsize=None)
def max_opset() -> int:
    """The newest default-domain opset the installed onnxruntime loads (at most the installed onnx's)."""
    ir = max_ir_version()
    return next((op for op in range(onnx.defs.onnx_opset_version(), 13, -1) if _loads(ir, op)), 13)


def unknown_dims_as_values(model: onnx.ModelProto) -> list[onnx.TensorShapeProto.Dimension]:
    """The dims of the graph inputs and outputs declared unknown by a non-positive dim_value."""
    return [d for vi in list(model.graph.input) + list(model.graph.output)
            for d in vi.type.tensor_type.shape.dim if d.HasField("dim_value") and d.dim_value <= 0]


def clear_unknown_dims(model: onnx.ModelProto) -> int:
    """Mutates ``model``: graph input/output dims written as dim_value <= 0 become unset (unknown), as
    onnxruntime and the onnx checker read them. Returns how many it changed."""
    dims = unknown_dims_as_values(model)
    for dim in dims:
        dim.Clear()
    return len(dims)


def for_onnxruntime(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` itself when the installed onnxruntime loads its header, else a copy with unknown dims
    cleared, the opset lowered by onnx.version_converter and the IR version lowered to the least its
    opsets need. Raises UnsupportedModelError when the opset is newer than onnxruntime knows and
    cannot be converted down."""
    opset = default_opset(model)
    newer_opset = opset > max_opset()
    if not (newer_opset or model.ir_version > max_ir_version() or unknown_dims_as_values(model)):
        return model
    if newer_opset:
        out = _lower_opset(model, opset)
    else:
        out = onnx.ModelProto()
        out.CopyFrom(model)
    clear_unknown_dims(out)
    if out.ir_version > max_ir_version():
        out.ir_version = helper.find_min_ir_version_for(list(out.opset_import), ignore_unknown=True)
    return out


def _lower_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    from onnx import version_converter

    newest = max_opset()
    try:
        out = version_converter.convert_version(model, newest)
    except Exception as exc:  # the converter raises RuntimeError or its own C++ types
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsupportedModelError(
            f"model opset {opset} is newer than onnxruntime {ort.__version__} reads (at most {newest}) and "
            f"onnx.version_converter cannot lower it ({reason}); re-export the model with opset <= {newest} "
            "or upgrade onnxruntime") from None
    set_default_opset(out, newest)
    return out
