"""onnxflex against onnxruntime.quantization on the bundled and standard models, each quantization in a child process.

    python bench/compare_peers.py [--models digits_cnn digits_vit tiny_lm] [--calib-samples 128]
                                  [--methods rtn flexround adaround signround] [--dir /tmp/onnxflex-peers]
    python bench/make_standard_models.py && python bench/compare_peers.py --models resnet18 mobilenetv2 vit_tiny

``--models`` takes the bundled models (models/) and the standard architectures that
bench/make_standard_models.py trains on the same digits task and writes into bench/.models/ (ResNet-18,
MobileNetV2, a ViT-Tiny shape); these are treated exactly as the bundled classifiers.

For every model: onnxflex (W8A8; W4A8, uniform W5A8 and a mixed 5-bit average for the classifiers;
weight-only W4 groups of 32 for tiny_lm; FlexRound with ``--optimize-latency``) through the Python API,
and onnxruntime's ``quantize_static`` (QDQ, per channel; MinMax, Entropy and Percentile calibration;
U8S8 and S8S8; for the classifiers also 4-bit QInt4 weights), plus for tiny_lm onnxruntime's 4-bit ``MatMulNBitsQuantizer``
(its default blockwise round-to-nearest, blocks of 32) where it imports (it needs the ``onnx_ir`` package).
Both toolkits see the same first ``--calib-samples`` samples of ``<model>.calib.npz``.
Each row gives the task metric on ``<model>.eval.npz`` (top-1, or perplexity for tiny_lm), the output
SQNR against FP32 on that set, quantization wall time and peak RSS of the child (ru_maxrss from
os.wait4), the onnxruntime CPU latency ratio against FP32 (onnxflex.compare: alternating runs, median,
same batch and threads) and the file size. Writes its section into BENCHMARKS.md between markers (a
separate section when the standard architectures are among ``--models``).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
BUNDLED = ("digits_cnn", "digits_vit", "tiny_lm")
STANDARD = ("resnet18", "mobilenetv2", "vit_tiny")  # make_standard_models.BUILDERS, not imported: it pulls in torch
STANDARD_DIR = ROOT / "bench" / ".models"  # make_standard_models.DEFAULT_DIR
sys.path.insert(0, str(ROOT / "bench"))
from bench_memory import write_block  # noqa: E402  (bench/ is not a package)

HEADER = "## Against onnxruntime.quantization"
MARKER = "compare-peers"
TIMING_THREADS = 1
TIMING_BATCH = 32
TIMING_REPEATS = 30

CHILD = """
import json, sys, time
import numpy as np
kind, model, calib, out, options = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], json.loads(sys.argv[5])
t0 = time.perf_counter()
if kind == "onnxflex":
    import onnxflex
    onnxflex.quantize(model, None, onnxflex.QuantConfig(**options), progress=False).save(out)
elif kind == "ort_static":
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    class NpzReader(CalibrationDataReader):
        def __init__(self, path, names, n, batch):
            with np.load(path) as data:
                arrays = {k: data[k][:n] for k in names}
            self.batches = iter([{k: v[i:i + batch] for k, v in arrays.items()} for i in range(0, n, batch)])

        def get_next(self):
            return next(self.batches, None)

    import onnx
    names = [i.name for i in onnx.load(model, load_external_data=False).graph.input]
    act, weight = options["types"].split("_")
    quantize_static(model, out, NpzReader(calib, names, options["samples"], options["batch"]),
                    quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=getattr(QuantType, act), weight_type=getattr(QuantType, weight),
                    calibrate_method=getattr(CalibrationMethod, options["calibrate"]))
elif kind == "ort_nbits":
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    quantizer = MatMulNBitsQuantizer(onnx.load(model), bits=4, block_size=options["block_size"], is_symmetric=True)
    quantizer.process()
    quantizer.model.save_model_to_file(out, False)
print(json.dumps({"seconds": time.perf_counter() - t0}))
"""


def run_child(kind: str, model: Path, calib: Path, out: Path, options: dict) -> dict:
    """One quantization in a fresh child process: its wall time and its own peak RSS (MiB), or the error."""
    with tempfile.TemporaryFile("w+") as errors:
        proc = subprocess.Popen([sys.executable, "-c", CHILD, kind, str(model), str(calib), str(out),
                                 json.dumps(options)], stdout=subprocess.PIPE, stderr=errors, text=True)
        stdout = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        errors.seek(0)
        stderr = errors.read()
    if os.waitstatus_to_exitcode(status):
        lines = [line for line in stderr.strip().splitlines() if line.strip()]
        return {"error": (lines[-1] if lines else f"exit status {status}")[:200]}
    figures = json.loads(stdout.strip().splitlines()[-1])
    figures["peak_rss_mib"] = usage.ru_maxrss / 1024
    return figures


def perplexity(logits: np.ndarray, targets: np.ndarray) -> float:
    """exp(mean cross-entropy) of [M, T, V] logits against [M, T] int targets (as tests/test_transformers.py)."""
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return float(np.exp(-np.take_along_axis(log_probs, targets[..., None], -1).mean()))


def model_folder(name: str) -> Path:
    """Where ``name``'s .onnx, .calib.npz and .eval.npz live: models/ for the bundled models, else the
    folder bench/make_standard_models.py writes."""
    if name in BUNDLED:
        return MODELS
    missing = [f"{name}{suffix}" for suffix in (".onnx", ".calib.npz", ".eval.npz")
               if not (STANDARD_DIR / f"{name}{suffix}").is_file()]
    if missing:
        raise SystemExit(f"{', '.join(missing)} missing from {STANDARD_DIR}: run "
                         f"python bench/make_standard_models.py --models {name} first (a few minutes on CPU)")
    return STANDARD_DIR


def task_metric(model: Path, name: str) -> float:
    """Top-1 on the eval set for the classifiers, perplexity for tiny_lm (onnxruntime CPU)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    with np.load(model_folder(name) / f"{name}.eval.npz") as data:
        data = {k: data[k] for k in data.files}
    if name == "tiny_lm":
        feeds = {k: data[k] for k in ("input_ids", "attention_mask")}
        logits = np.concatenate([sess.run(None, {k: v[i:i + 16] for k, v in feeds.items()})[0]
                                 for i in range(0, len(data["targets"]), 16)])
        return perplexity(logits, data["targets"])
    logits = np.concatenate([sess.run(None, {"input": data["input"][i:i + 100]})[0]
                             for i in range(0, len(data["input"]), 100)])
    return float(np.mean(logits.argmax(-1) == data["labels"]))


def candidates(name: str, methods: list[str], samples: int, iters: int) -> list[tuple[str, str, str, dict]]:
    """(toolkit, setting label, child kind, options) for one model."""
    flex = [("W8A8", {"wbits": 8, "abits": 8})]
    if name != "tiny_lm":
        flex.append(("W4A8", {"wbits": 4, "abits": 8}))
    if name == "tiny_lm":
        flex.append(("W4 weight-only g32", {"wbits": 4, "abits": 0, "group_size": 32}))

    def options(opts: dict, method: str) -> dict:
        return {**opts, "method": method, "calib_samples": samples, "verify_samples": 0,
                **({"iters": iters} if iters >= 0 and method != "rtn" else {})}

    rows = [("onnxflex", f"{method} {label}", "onnxflex", options(opts, method))
            for label, opts in flex for method in methods]
    # the same settings with latency-aware placement, timed with the benchmark's thread count
    fastest = {"optimize_latency": True, "latency_threads": TIMING_THREADS}
    rows += [("onnxflex", f"flexround {label} --optimize-latency", "onnxflex", options({**opts, **fastest}, "flexround"))
             for label, opts in flex if label != "W4A8"]
    if name != "tiny_lm":  # mixed precision: a 5-bit average against uniform 4 and 5 bits
        rows += [("onnxflex", "flexround W5A8 uniform", "onnxflex", options({"wbits": 5, "abits": 8}, "flexround")),
                 ("onnxflex", "flexround mixed, 5-bit average (--bits-budget 5)", "onnxflex",
                  options({"wbits": 8, "abits": 8, "bits_budget": 5.0}, "flexround"))]
    for types in ("QUInt8_QInt8", "QInt8_QInt8"):
        short = "U8S8" if types.startswith("QU") else "S8S8"
        for calibrate in ("MinMax", "Entropy", "Percentile"):
            rows.append(("onnxruntime", f"quantize_static {calibrate} {short}", "ort_static",
                         {"types": types, "calibrate": calibrate, "samples": samples, "batch": 16}))
    if name != "tiny_lm":  # 4-bit weights (QInt4, per channel) with uint8 activations
        rows += [("onnxruntime", f"quantize_static {calibrate} W4A8 (U8, S4 weights)", "ort_static",
                  {"types": "QUInt8_QInt4", "calibrate": calibrate, "samples": samples, "batch": 16})
                 for calibrate in ("MinMax", "Entropy", "Percentile")]
    if name == "tiny_lm":
        rows.append(("onnxruntime", "MatMulNBits W4 weight-only g32", "ort_nbits", {"block_size": 32}))
    return rows


def bench_model(name: str, methods: list[str], samples: int, iters: int, folder: Path) -> list[dict]:
    """All rows of one model; the quantized models are written into ``folder``."""
    from onnxflex.compare import compare_models, model_bytes

    source = model_folder(name)
    fp32 = source / f"{name}.onnx"
    calib, data = source / f"{name}.calib.npz", source / f"{name}.eval.npz"
    results = [{"model": name, "toolkit": "FP32", "setting": "reference", "metric": task_metric(fp32, name),
                "bytes": model_bytes(fp32)}]
    print(f"{name} FP32 {results[0]['metric']:.4f}", flush=True)
    for toolkit, setting, kind, options in candidates(name, methods, samples, iters):
        out = folder / f"{name}.{re.sub(r'[^A-Za-z0-9]+', '_', setting)}.onnx"
        row = {"model": name, "toolkit": toolkit, "setting": setting, **run_child(kind, fp32, calib, out, options)}
        if "error" not in row:
            try:
                cmp = compare_models(fp32, out, data, batch_size=TIMING_BATCH, worst=0, repeats=TIMING_REPEATS,
                                     threads=TIMING_THREADS)
                row.update(metric=task_metric(out, name), sqnr_db=cmp.outputs[0]["sqnr_db"],
                           latency_ratio=cmp.latency_ratio, bytes=model_bytes(out))
            except Exception as exc:  # a model onnxruntime cannot load or run is a result too
                row["error"] = f"evaluation failed: {str(exc).splitlines()[0][:200]}"
        results.append(row)
        print(format_row(row), flush=True)
    return results


def format_row(r: dict) -> str:
    metric = "" if "metric" not in r else (f"{r['metric']:.3f}" if r["model"] == "tiny_lm" else f"{r['metric']:.3f}")
    if "error" in r:
        return f"| {r['model']} | {r['toolkit']} | {r['setting']} | failed: {r['error'].replace('|', '/')} ||||||"
    if r["toolkit"] == "FP32":
        return f"| {r['model']} | FP32 | reference | {metric} | | | | | {r['bytes'] / 1024:.0f} KiB |"
    return (f"| {r['model']} | {r['toolkit']} | {r['setting']} | {metric} | {r['sqnr_db']:.1f} | "
            f"{r['seconds']:.1f} s | {r['peak_rss_mib']:.0f} MiB | {r['latency_ratio']:.2f} | "
            f"{r['bytes'] / 1024:.0f} KiB |")


def report(results: list[dict], args, seconds: float) -> str:
    from bench_memory import machine

    rows = ["| model | toolkit | setting | top-1 / perplexity | output SQNR vs FP32 (dB) | quantize time | "
            "peak RSS | latency ratio vs FP32 | file size |", "|---|---|---|---|---|---|---|---|---|"]
    rows += [format_row(r) for r in results]
    iters = ("its iteration counts are the method defaults, FlexRound and AdaRound 400 per block, SignRound 200"
             if args.iters < 0 else f"{args.iters} reconstruction steps per block for the learned methods, "
             "capped from the defaults (FlexRound and AdaRound 400, SignRound 200) to keep the run short")
    return (f"`python bench/compare_peers.py --calib-samples {args.calib_samples} --iters {args.iters} "
            f"--methods {' '.join(args.methods)}`"
            f" ({seconds / 60:.0f} min in all). Machine: {machine()}.\n\n"
            f"Both toolkits calibrate on the first {args.calib_samples} samples of `<model>.calib.npz` "
            "(onnxflex reconstructs on all of them: `calib_samples="
            f"{args.calib_samples}, verify_samples=0`; {iters}). onnxruntime: `quantize_static(quant_format=QDQ, "
            "per_channel=True)`, default op types and extra options, no `quant_pre_process`, the calibration "
            "data in batches of 16; `MatMulNBitsQuantizer(bits=4, block_size=32, is_symmetric=True)` with its "
            "default (round-to-nearest) algorithm. Top-1 is on the 500 eval images, perplexity on tiny_lm's "
            "40,320 held-out next characters (lower is better); SQNR is of the model output over the same eval "
            "set. Quantize time and peak RSS are of a fresh child process per row (interpreter start and "
            "imports included). Latency ratio: onnxruntime CPU, `onnxflex.compare` (alternating runs, median of "
            f"{TIMING_REPEATS}), batch {TIMING_BATCH}, {TIMING_THREADS} thread, quantized over FP32; "
            "on these small models QDQ overhead can outweigh int8 gains." + (f" {args.note}" if args.note else "") +
            "\n\n" + "\n".join(rows) +
            "\n\nNot covered: GPU/TensorRT latency, onnxruntime's GPTQ/HQQ/AWQ weight-only algorithms and its "
            "`quant_pre_process`." + ("" if set(args.models) <= set(BUNDLED) else
                                      " The standard architectures are trained briefly on the digits task "
                                      "(bench/make_standard_models.py: 32×32 upsampled digits, one channel), "
                                      "not ImageNet weights.") + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(BUNDLED), choices=BUNDLED + STANDARD,
                        help="bundled models (models/) or standard architectures (bench/.models/, written by "
                             "bench/make_standard_models.py)")
    parser.add_argument("--methods", nargs="+", default=["rtn", "flexround"])
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--iters", type=int, default=-1,
                        help="reconstruction steps per block for the learned methods (-1 = each method's default)")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/onnxflex-peers"))
    parser.add_argument("--note", default="", help="a sentence about this run, written under the table's header")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()
    for name in args.models:  # fail before the first hour of work, not after it
        model_folder(name)
    args.dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results = [row for name in args.models for row in bench_model(name, args.methods, args.calib_samples, args.iters,
                                                           args.dir)]
    text = report(results, args, time.perf_counter() - started)
    print(text)
    if not args.no_write:
        standard = not set(args.models) <= set(BUNDLED)
        write_block(HEADER + (": standard architectures" if standard else ""),
                    MARKER + ("-standard" if standard else ""), text)
    print(f"done in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
