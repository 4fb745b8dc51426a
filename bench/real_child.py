"""One quantization of bench/real_models.py, run as its own process (bench/child.py measures it):

    python bench/real_child.py KIND MODEL CALIB.npz OUT.onnx OPTIONS_JSON

KIND is ``onnxflex`` (OPTIONS are QuantConfig fields), ``ort_static`` (onnxruntime's quantize_static,
QDQ, per channel: ``types`` as ACT_WEIGHT QuantType names, ``calibrate``, ``batch``) or ``ort_nbits``
(MatMulNBitsQuantizer's round-to-nearest: ``block_size``). Both onnxruntime kinds read the same npz,
each input sliced along its samples axis (``axes``, default 0) and the pinned inputs (``fixed``) fed as
given. A model below opset 13 is converted to 13 (onnx.version_converter) before quantize_static, whose
per-channel DequantizeLinear needs the ``axis`` of opset 13 (it writes an invalid model otherwise); the
row's note says so. Prints one JSON line: the seconds taken, the child's own peak RSS, and for onnxflex
whether its own verification passed.
"""
from __future__ import annotations

import json
import sys
import time

import numpy as np

from child import peak_rss_mib

PER_CHANNEL_OPSET = 13


def npz_reader(model: str, calib: str, batch: int, axes: dict, fixed: dict):
    """An onnxruntime CalibrationDataReader over ``calib``: batches of ``batch`` samples."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader

    inputs = {i.name: i.type.tensor_type.elem_type for i in onnx.load(model, load_external_data=False).graph.input}
    with np.load(calib) as data:
        arrays = {k: data[k] for k in inputs if k not in fixed}
    pinned = {k: np.array(v, onnx.helper.tensor_dtype_to_np_dtype(inputs[k])) for k, v in fixed.items()}
    total = next(iter(arrays.values())).shape[axes.get(next(iter(arrays)), 0)]

    class NpzReader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{**{k: np.take(v, range(i, min(i + batch, total)), axes.get(k, 0))
                                     for k, v in arrays.items()}, **pinned} for i in range(0, total, batch)])

        def get_next(self):
            return next(self.batches, None)

    return NpzReader()


def quantize_onnxflex(model: str, calib: str, out: str, options: dict) -> dict:
    import onnxflex
    from onnxflex.errors import VerificationError

    config = onnxflex.QuantConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in options.items()})
    try:
        onnxflex.quantize(model, calib, config, progress=False).save(out)
        return {"verified": True}
    except VerificationError as exc:  # the model is still written: its numbers are the result
        if exc.result is None:
            raise
        exc.result.save(out)
        return {"verified": False, "note": str(exc).splitlines()[0][:160]}


def quantize_ort_static(model: str, calib: str, out: str, options: dict) -> dict:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    act, weight = options["types"].split("_")
    reader = npz_reader(model, calib, options["batch"], options.get("axes", {}), options.get("fixed", {}))
    source, figures = upgraded(model, out)
    quantize_static(source, out, reader, quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=getattr(QuantType, act), weight_type=getattr(QuantType, weight),
                    calibrate_method=getattr(CalibrationMethod, options["calibrate"]))
    return figures


def upgraded(model: str, out: str) -> tuple[str, dict]:
    """(``model``, {}) at opset 13 or above, else (its opset-13 conversion written beside ``out``, a note)."""
    import onnx
    from onnx import version_converter

    loaded = onnx.load(model)
    opset = next(o.version for o in loaded.opset_import if o.domain in ("", "ai.onnx"))
    if opset >= PER_CHANNEL_OPSET:
        return model, {}
    path = f"{out}.opset{PER_CHANNEL_OPSET}.onnx"
    onnx.save(version_converter.convert_version(loaded, PER_CHANNEL_OPSET), path)
    return path, {"note": f"opset {opset} converted to {PER_CHANNEL_OPSET} first"}


def quantize_ort_nbits(model: str, calib: str, out: str, options: dict) -> dict:
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    block = options["block_size"]
    quantizer = nbits.MatMulNBitsQuantizer(onnx.load(model), bits=4, block_size=block, is_symmetric=True,
                                           algo_config=nbits.DefaultWeightOnlyQuantConfig(block_size=block,
                                                                                          is_symmetric=True))
    quantizer.process()
    quantizer.model.save_model_to_file(out, False)
    return {}


KINDS = {"onnxflex": quantize_onnxflex, "ort_static": quantize_ort_static, "ort_nbits": quantize_ort_nbits}


def main() -> None:
    kind, model, calib, out, options = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], json.loads(sys.argv[5])
    started = time.perf_counter()
    figures = KINDS[kind](model, calib, out, options)
    print()
    print(json.dumps({"seconds": time.perf_counter() - started, **figures, "peak_rss_mib": peak_rss_mib()}))


if __name__ == "__main__":
    main()
