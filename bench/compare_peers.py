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
U8S8 and S8S8; for the classifiers also 4-bit QInt4 weights), plus for tiny_lm onnxruntime's 4-bit
``MatMulNBitsQuantizer`` (blocks of 32: its default round-to-nearest, HQQ and GPTQ) where it imports (it
needs the ``onnx_ir`` package). Both toolkits see the same first ``--calib-samples`` samples of
``<model>.calib.npz``. Each row gives the task metric on ``<model>.eval.npz`` (top-1, or perplexity for
tiny_lm), how many eval predictions (argmax) differ from FP32's, the output SQNR against FP32 on that
set, quantization wall time and peak RSS of the child (its own VmHWM), the onnxruntime CPU
latency ratio against FP32 (onnxflex.compare: alternating runs, median, same batch and threads) and the
file size. For the classifiers, FlexRound is paired with the best onnxruntime row at W8A8 and at W4A8:
the images only one of them gets right, with the exact sign test. Writes its section into BENCHMARKS.md
between markers (a separate section when the standard architectures are among ``--models``).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
BUNDLED = ("digits_cnn", "digits_vit", "tiny_lm")
STANDARD = ("resnet18", "mobilenetv2", "vit_tiny")  # make_standard_models.BUILDERS, not imported: it pulls in torch
STANDARD_DIR = ROOT / "bench" / ".models"  # make_standard_models.DEFAULT_DIR
sys.path.insert(0, str(ROOT / "bench"))
from bench_memory import paired_counts, write_block  # noqa: E402  (bench/ is not a package)
from child import run_measured  # noqa: E402

HEADER = "## Against onnxruntime.quantization"
MARKER = "compare-peers"
TIMING_THREADS = 1
TIMING_BATCH = 32
TIMING_REPEATS = 30

CHILD = """
import json, sys, time
import numpy as np
sys.path.insert(0, sys.argv.pop())  # bench/, for child.peak_rss_mib
from child import peak_rss_mib
kind, model, calib, out, options = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], json.loads(sys.argv[5])


def npz_reader(n, batch):
    \"\"\"onnxruntime calibration data: the model's inputs from the first n samples of the calib npz.\"\"\"
    import onnx
    from onnxruntime.quantization import CalibrationDataReader

    names = [i.name for i in onnx.load(model, load_external_data=False).graph.input]
    with np.load(calib) as data:
        arrays = {k: data[k][:n] for k in names}

    class NpzReader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{k: v[i:i + batch] for k, v in arrays.items()} for i in range(0, n, batch)])

        def get_next(self):
            return next(self.batches, None)

    return NpzReader()


t0 = time.perf_counter()
if kind == "onnxflex":
    import onnxflex
    onnxflex.quantize(model, None, onnxflex.QuantConfig(**options), progress=False).save(out)
elif kind == "ort_static":
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    act, weight = options["types"].split("_")
    quantize_static(model, out, npz_reader(options["samples"], options["batch"]),
                    quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=getattr(QuantType, act), weight_type=getattr(QuantType, weight),
                    calibrate_method=getattr(CalibrationMethod, options["calibrate"]))
elif kind == "ort_nbits":
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    block = options["block_size"]
    algo = {"RTN": lambda: nbits.DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True),
            "HQQ": lambda: nbits.HQQWeightOnlyQuantConfig(block_size=block, bits=4),
            "GPTQ": lambda: nbits.GPTQWeightOnlyQuantConfig(
                calibration_data_reader=npz_reader(options["samples"], options["batch"]))}[options["algorithm"]]()
    quantizer = nbits.MatMulNBitsQuantizer(onnx.load(model), bits=4, block_size=block, is_symmetric=True,
                                           algo_config=algo)
    quantizer.process()
    quantizer.model.save_model_to_file(out, False)
print()  # onnxruntime's GPTQ draws a progress bar without a final newline
print(json.dumps({"seconds": time.perf_counter() - t0, "peak_rss_mib": peak_rss_mib()}))
"""


def run_child(kind: str, model: Path, calib: Path, out: Path, options: dict) -> dict:
    """One quantization in a fresh child process: its wall time and its own peak RSS (MiB), or the error."""
    return run_measured([sys.executable, "-c", CHILD, kind, str(model), str(calib), str(out), json.dumps(options),
                         str(ROOT / "bench")])


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


def evaluate(model: Path, name: str) -> tuple[float, np.ndarray, np.ndarray]:
    """(task metric, argmax predictions, whether each is right) on the eval set, onnxruntime CPU: top-1
    over the images for the classifiers, perplexity over the next characters for tiny_lm."""
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
        predicted = logits.argmax(-1)
        return perplexity(logits, data["targets"]), predicted, predicted == data["targets"]
    logits = np.concatenate([sess.run(None, {"input": data["input"][i:i + 100]})[0]
                             for i in range(0, len(data["input"]), 100)])
    predicted = logits.argmax(-1)
    right = predicted == data["labels"]
    return float(right.mean()), predicted, right


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
        rows += [("onnxruntime", f"MatMulNBits {algorithm} W4 weight-only g32", "ort_nbits",
                  {"block_size": 32, "algorithm": algorithm, "samples": samples, "batch": 16})
                 for algorithm in ("RTN", "HQQ", "GPTQ")]
    return rows


def bench_model(name: str, methods: list[str], samples: int, iters: int, folder: Path) -> list[dict]:
    """All rows of one model; the quantized models are written into ``folder``."""
    from onnxflex.compare import compare_models, model_bytes

    source = model_folder(name)
    fp32 = source / f"{name}.onnx"
    calib, data = source / f"{name}.calib.npz", source / f"{name}.eval.npz"
    metric, reference, right = evaluate(fp32, name)
    results = [{"model": name, "toolkit": "FP32", "setting": "reference", "metric": metric, "right": right,
                "bytes": model_bytes(fp32)}]
    print(f"{name} FP32 {metric:.4f}", flush=True)
    for toolkit, setting, kind, options in candidates(name, methods, samples, iters):
        out = folder / f"{name}.{re.sub(r'[^A-Za-z0-9]+', '_', setting)}.onnx"
        row = {"model": name, "toolkit": toolkit, "setting": setting, **run_child(kind, fp32, calib, out, options)}
        if "error" not in row:
            try:
                cmp = compare_models(fp32, out, data, batch_size=TIMING_BATCH, worst=0, repeats=TIMING_REPEATS,
                                     threads=TIMING_THREADS)
                metric, predicted, right = evaluate(out, name)
                row.update(metric=metric, right=right, changed=int((predicted != reference).sum()),
                           sqnr_db=cmp.outputs[0]["sqnr_db"], latency_ratio=cmp.latency_ratio, bytes=model_bytes(out))
            except Exception as exc:  # a model onnxruntime cannot load or run is a result too
                row["error"] = f"evaluation failed: {str(exc).splitlines()[0][:200]}"
        results.append(row)
        print(format_row(row), flush=True)
    return results


def format_row(r: dict) -> str:
    metric = f"{r['metric']:.3f}" if "metric" in r else ""
    if "error" in r:
        return f"| {r['model']} | {r['toolkit']} | {r['setting']} | failed: {r['error'].replace('|', '/')} |||||||"
    if r["toolkit"] == "FP32":
        return f"| {r['model']} | FP32 | reference | {metric} | | | | | | {r['bytes'] / 1024:.0f} KiB |"
    return (f"| {r['model']} | {r['toolkit']} | {r['setting']} | {metric} | {r['changed']} | {r['sqnr_db']:.1f} | "
            f"{r['seconds']:.1f} s | {r['peak_rss_mib']:.0f} MiB | {r['latency_ratio']:.2f} | "
            f"{r['bytes'] / 1024:.0f} KiB |")


def bits_of(setting: str) -> str | None:
    """The bit widths an onnxruntime quantize_static row uses: 'W4A8', 'W8A8', or None."""
    return "W4A8" if "W4A8" in setting else "W8A8" if re.search(r"\b[SU]8S8\b", setting) else None


def paired(results: list[dict]) -> list[str]:
    """Per classifier and bit width: onnxflex flexround against the best onnxruntime row on the same eval
    images, counting the images exactly one of the two gets right, with the exact sign test's p-value."""
    lines = []
    for name in dict.fromkeys(r["model"] for r in results if r["model"] != "tiny_lm"):
        rows = [r for r in results if r["model"] == name and "right" in r and r["toolkit"] != "FP32"]
        for bits in ("W8A8", "W4A8"):
            ours = [r for r in rows if r["toolkit"] == "onnxflex" and r["setting"] == f"flexround {bits}"]
            peers = [r for r in rows if r["toolkit"] == "onnxruntime" and bits_of(r["setting"]) == bits]
            if not ours or not peers:
                continue
            best = max(peers, key=lambda r: r["metric"])
            wins, losses, p = paired_counts(ours[0]["right"], best["right"])
            lines.append(f"- {name} {bits}: flexround {ours[0]['metric']:.3f} against onnxruntime's best, "
                         f"{best['setting']} {best['metric']:.3f}. Of the {len(best['right'])} eval images, "
                         f"flexround alone gets {wins} right and onnxruntime alone {losses}; exact sign test "
                         f"p = {p:.2g}.")
    return lines


def report(results: list[dict], args, seconds: float) -> str:
    from bench_memory import machine

    rows = ["| model | toolkit | setting | top-1 / perplexity | argmax changes vs FP32 | output SQNR vs FP32 (dB) "
            "| quantize time | peak RSS | latency ratio vs FP32 | file size |", "|" + "---|" * 10]
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
            "default blockwise round-to-nearest, with HQQ (`HQQWeightOnlyQuantConfig(block_size=32)`), and with "
            "GPTQ (`GPTQWeightOnlyQuantConfig` defaults, calibrated on the same samples). Top-1 is on the 500 "
            "eval images, perplexity on tiny_lm's 40,320 held-out next characters (lower is better); argmax "
            "changes count the eval images (characters) whose predicted class differs from FP32's; SQNR is of "
            "the model output over the same eval set. Quantize time and peak RSS are of a fresh child process "
            "per row (interpreter start and imports included). Latency ratio: onnxruntime CPU, "
            f"`onnxflex.compare` (alternating runs, median of {TIMING_REPEATS}), batch {TIMING_BATCH}, "
            f"{TIMING_THREADS} thread, quantized over FP32; "
            "on these small models QDQ overhead can outweigh int8 gains." + (f" {args.note}" if args.note else "") +
            "\n\n" + "\n".join(rows) +
            "\n\nPaired on the same eval images (flexround against the onnxruntime row with the best top-1 at "
            "the same bits):\n\n" + "\n".join(paired(results)) +
            "\n\nNot covered: GPU/TensorRT latency, onnxruntime's AWQ weight-only algorithm (it needs a "
            "tokenizer and a dataset download) and its `quant_pre_process`." +
            ("" if set(args.models) <= set(BUNDLED) else
             " The standard architectures are trained briefly on the digits task (bench/make_standard_models.py: "
             "32×32 upsampled digits, one channel), not ImageNet weights.") + "\n")


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
