"""onnxflex against onnxruntime.quantization on pretrained models that ship inside PyPI wheels.

    python bench/real_models.py [--models ppocr_rec ppocr_cls ...] [--methods rtn flexround adaround signround]
                                [--bits W8A8 W4A8 W4] [--presets default fast] [--iters N]
                                [--types U8S8 S8S8 U8S4] [--calibrators MinMax Entropy Percentile]
                                [--calib-samples 64] [--eval-samples 128] [--timeout 1800]
                                [--latency-rules on|off|both]
                                [--cache ~/.cache/onnxflex-bench] [--dir /tmp/onnxflex-real] [--quick]

The wheels (versions pinned in bench/real_tasks.py) are fetched with ``pip download --no-deps`` into
``--cache``/wheels and unpacked beside them, outside the repository; a wheel already there is reused.
Calibration and evaluation data are made locally from seeds (bench/real_data.py: rendered text lines,
text on textures, drawn scenes, synthesised speech), preprocessed as each package does; both toolkits
calibrate on the same samples. Every quantization runs in its own child process (bench/real_child.py)
with a time limit: its wall time, CPU time (all its threads) and peak RSS are that child's, and a row
that fails or times out says so and the run goes on. Each row then gets, on the evaluation set: the task metric, the items whose
decision (argmax, thresholded pixel or anchor, speech frame) differs from FP32's, paired against the
onnxruntime row at the same bits that agrees with FP32 most (only-ours / only-theirs counts, exact
sign test), the output SQNR against FP32, and onnxruntime's CPU latency against FP32 (onnxflex.compare).
``--quick``: 4 calibration and 8 evaluation samples, onnxflex rtn W8A8 and onnxruntime MinMax U8S8 only.
A row whose settings were cut for time says so in its label (``--preset fast``, ``iters=N``).
Writes its section into BENCHMARKS.md between markers unless ``--no-write`` (``--part NAME``: a section of its own).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import zipfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from bench_memory import machine, paired_counts, write_block  # noqa: E402  (bench/ is not a package)
from child import run_measured  # noqa: E402
from real_tasks import TASKS, Samples, Task  # noqa: E402

from onnxflex.config import ACT_SCALE_SEARCH  # noqa: E402
from onnxflex.runtimes.base import RECURRENT_OPS, WEIGHTED_OPS  # noqa: E402

HEADER = "## Real pretrained models against onnxruntime.quantization"
MARKER = "real-models"
METHODS = ("rtn", "flexround", "adaround", "signround")
PRESETS = ("default", "fast")
BITS = ("W8A8", "W4A8", "W4")
CALIBRATORS = ("MinMax", "Entropy", "Percentile")
TYPES = {"U8S8": "QUInt8_QInt8", "S8S8": "QInt8_QInt8", "U8S4": "QUInt8_QInt4"}
TIMING_THREADS = 1
TIMING_REPEATS = 20
QUICK_SAMPLES = (4, 8)
SEED_CALIB, SEED_EVAL = 1, 2
LATENCY_RULES = {"on": (True,), "off": (False,), "both": (True, False)}  # onnxflex rows per --latency-rules
# weighted ops the W4 rows keep in float: what onnxruntime's MatMulNBits row packs is MatMul (and Gemm) weights only
NOT_NBITS = tuple(op for op in WEIGHTED_OPS + RECURRENT_OPS if op not in ("MatMul", "Gemm"))


def fetch(wheel: str, cache: Path) -> Path:
    """The folder ``wheel`` (NAME==VERSION) is unpacked in under ``cache``, downloading it first with
    pip (no dependencies, binary only) unless a matching .whl is already in ``cache``/wheels."""
    name, version = wheel.split("==")
    folder = cache / f"{name}-{version}"
    if (folder / ".unpacked").exists():
        return folder
    wheels = cache / "wheels"
    pattern = f"{re.sub(r'[-_.]+', '_', name)}-{version}-*.whl"
    if not list(wheels.glob(pattern)):
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                        "--dest", str(wheels), wheel], check=True)
    with zipfile.ZipFile(sorted(wheels.glob(pattern))[0]) as archive:
        archive.extractall(folder)
    (folder / ".unpacked").touch()
    return folder


def matmul_share(path: Path) -> float:
    """Share of the weight values (initializers and Constant nodes) held by MatMul/Gemm against Conv,
    ConvTranspose and those in the main graph: weight-only 4-bit rows are run where it is over a half."""
    import onnx

    model = onnx.load(str(path))
    sizes = {t.name: int(np.prod(t.dims)) for t in model.graph.initializer}
    sizes.update({n.output[0]: int(np.prod(a.t.dims)) for n in model.graph.node if n.op_type == "Constant"
                  for a in n.attribute if a.name == "value"})  # where Paddle exports keep them
    by_kind = {"matmul": 0, "conv": 0}
    for node in model.graph.node:
        kind = "matmul" if node.op_type in ("MatMul", "Gemm") else "conv" if node.op_type.startswith("Conv") else ""
        if kind and len(node.input) > 1:
            by_kind[kind] += sizes.get(node.input[1], 0)
    return by_kind["matmul"] / max(sum(by_kind.values()), 1)


def candidates(task: Task, args, weight_only: bool) -> list[dict]:
    """The rows of one model: toolkit, setting label, bits, child kind and its options, for the bits,
    methods, presets, onnxruntime types and calibrators ``args`` asks for (W4 only where ``weight_only``)."""
    settings = {"W8A8": {"wbits": 8, "abits": 8}, "W4A8": {"wbits": 4, "abits": 8},
                "W4": {"wbits": 4, "abits": 0, "group_size": 32, "exclude_op_types": list(NOT_NBITS)}}
    inputs = {"fix_inputs": list(task.fix_inputs), "batch_axes": list(task.batch_axes)}
    tuning = {} if args.iters < 0 else {"iters": args.iters}
    rows = []
    asked = [{"act_scale": a} for a in getattr(args, "act_scales", [])]
    for bits in [b for b in args.bits if b != "W4" or weight_only]:
        scales = asked if asked and bits != "W4" else [{}]  # weight-only rows have no activation steps
        for method, preset, scale, rules in [(m, p, a, r) for m in args.methods
                                             for p in (["default"] if m == "rtn" else args.presets) for a in scales
                                             for r in LATENCY_RULES[getattr(args, "latency_rules", "on")]]:
            label = f"{method} {bits}" + (" g32" if bits == "W4" else "") + \
                    (f" --preset {preset}" if preset != "default" else "") + \
                    (f" iters={args.iters}" if tuning and method != "rtn" else "") + \
                    (f" --act-scale {scale['act_scale']}" if scale else "") + \
                    ("" if rules else " --no-latency-rules")
            rows.append({"toolkit": "onnxflex", "setting": label, "bits": bits, "kind": "onnxflex",
                         "options": {**settings[bits], **inputs, **(tuning if method != "rtn" else {}),
                                     **scale, "method": method, "preset": preset,
                                     "calib_samples": 0, "verify_samples": 0, "latency_rules": rules}})
    axes = dict(spec.split("=") for spec in task.batch_axes)
    reader = {"batch": task.batch, "axes": {k: int(v) for k, v in axes.items()},
              "fixed": {k: float(v) for k, v in (spec.split("=") for spec in task.fix_inputs)}}
    for types in args.types:
        if ("W4A8" if types == "U8S4" else "W8A8") not in args.bits:
            continue
        for calibrate in args.calibrators:
            rows.append({"toolkit": "onnxruntime", "setting": f"quantize_static {calibrate} {types}",
                         "bits": "W4A8" if types == "U8S4" else "W8A8", "kind": "ort_static",
                         "options": {**reader, "types": TYPES[types], "calibrate": calibrate}})
    if weight_only and "W4" in args.bits:
        for grid in ("symmetric", "asymmetric"):
            rows.append({"toolkit": "onnxruntime", "setting": f"MatMulNBits RTN W4 g32 {grid}", "bits": "W4",
                         "kind": "ort_nbits", "options": {"block_size": 32, "symmetric": grid == "symmetric"}})
    return rows


def save_samples(samples: Samples, path: Path) -> Path:
    np.savez(path, **samples.feeds)
    return path


def score(task: Task, model: Path, eval_set: Samples, eval_npz: Path, fp32: np.ndarray) -> dict:
    """A quantized model's figures on the evaluation set (see the module docstring)."""
    from onnxflex.compare import compare_models, model_bytes
    from onnxflex.inputs import InputOptions

    outputs = task.run(model, eval_set)
    cmp = compare_models(task.path, model, eval_npz, batch_size=task.timing_batch, worst=0, repeats=TIMING_REPEATS,
                         threads=TIMING_THREADS, inputs=InputOptions.from_specs(task.batch_axes, task.fix_inputs))
    return {"metric": task.metric(outputs, fp32, eval_set), "agree": task.decisions(outputs) == task.decisions(fp32),
            "sqnr_db": cmp.outputs[0]["sqnr_db"], "latency_ratio": cmp.latency_ratio, "bytes": model_bytes(model)}


def bench_model(task: Task, args, folder: Path) -> list[dict]:
    """Every row of one model; data and quantized models are written into ``folder``."""
    from onnxflex.compare import model_bytes

    calib = save_samples(task.samples(args.calib_samples, SEED_CALIB), folder / f"{task.name}.calib.npz")
    eval_set = task.samples(args.eval_samples, SEED_EVAL)
    eval_npz = save_samples(eval_set, folder / f"{task.name}.eval.npz")
    fp32 = task.run(task.path, eval_set)
    decisions = task.decisions(fp32)
    results = [{"model": task.name, "toolkit": "FP32", "setting": "reference", "bits": "",
                "metric": task.metric(fp32, fp32, eval_set), "items": len(decisions), "bytes": model_bytes(task.path)}]
    print(format_row(results[0]), flush=True)
    weight_only = matmul_share(task.path) > 0.5
    for spec in candidates(task, args, weight_only):
        out = folder / f"{task.name}.{re.sub(r'[^A-Za-z0-9]+', '_', spec['setting'])}.onnx"
        row = {"model": task.name, **{k: spec[k] for k in ("toolkit", "setting", "bits")}}
        row.update(run_measured([sys.executable, str(ROOT / "bench" / "real_child.py"), spec["kind"], str(task.path),
                                 str(calib), str(out), json.dumps(spec["options"])], args.timeout))
        if "error" not in row:
            try:
                row.update(score(task, out, eval_set, eval_npz, fp32))
            except Exception as exc:  # a model onnxruntime cannot load or run is a result too
                row["error"] = f"evaluation failed: {str(exc).splitlines()[0][:200]}"
        results.append(row)
        print(format_row(row), flush=True)
    return results


def format_metric(metric: dict) -> str:
    return ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in metric.items())


def format_row(r: dict) -> str:
    """One markdown table row; a failed or timed-out row names why and leaves the figures empty."""
    head = f"| {r['model']} | {r['toolkit']} | {r['setting']} |"
    if "error" in r:
        return f"{head} failed: {r['error'].replace('|', '/')} ||||||||"
    if r["toolkit"] == "FP32":
        return f"{head} {format_metric(r['metric'])} | {r['items']} items | | | | | | {r['bytes'] / 2**20:.1f} MiB |"
    changed = f"{int((~r['agree']).sum())} of {len(r['agree'])}"
    note = f" ({r['note']})" if r.get("verified", True) and "note" in r else \
        "" if r.get("verified", True) else " (onnxflex's own verification failed)"
    cpu = f" (CPU {r['cpu_seconds']:.0f} s)" if "cpu_seconds" in r else ""
    return (f"{head} {format_metric(r['metric'])}{note} | {changed} | {r.get('paired', '')} | {r['sqnr_db']:.1f} | "
            f"{r['seconds']:.1f} s{cpu} | {r['peak_rss_mib']:.0f} MiB | {r['latency_ratio']:.2f} | "
            f"{r['bytes'] / 2**20:.1f} MiB |")


def pair_rows(results: list[dict]) -> None:
    """Sets ``paired`` on each onnxflex row: against the onnxruntime row of the same model and bits whose
    decisions agree with FP32's most, the items only onnxflex gets as FP32 does, those only onnxruntime
    does, and the exact sign test's p."""
    for r in results:
        peers = [p for p in results if p["model"] == r["model"] and p["toolkit"] == "onnxruntime"
                 and p["bits"] == r["bits"] and "agree" in p]
        if r["toolkit"] != "onnxflex" or "agree" not in r or not peers:
            continue
        best = max(peers, key=lambda p: p["agree"].mean())
        wins, losses, p = paired_counts(r["agree"], best["agree"])
        r["paired"] = f"+{wins} / -{losses} vs {best['setting'].removeprefix('quantize_static ')}, p = {p:.2g}"


def report(results: list[dict], args, started: dict, seconds: float) -> str:
    pair_rows(results)
    rows = ["| model | toolkit | setting | task metric | decisions changed vs FP32 | paired vs onnxruntime's best "
            "at these bits (only ours / only theirs) | output SQNR vs FP32 (dB) | quantize time | peak RSS | "
            "latency ratio vs FP32 | file size |", "|" + "---|" * 11]
    rows += [format_row(r) for r in results]
    models = "\n".join(f"- `{t.name}`: {t.kind}, from `{t.wheel}` (`{t.member}`)." for t in
                       (TASKS[name] for name in args.models))
    return (f"`{' '.join(['python bench/real_models.py', *args.argv])}`" +
            f", {started['date']} ({seconds / 60:.0f} min in all). Machine: {machine()}; load average at the start "
            f"{started['load']}.\n\n{models}\n\n"
            f"Both toolkits calibrate on the same {args.calib_samples} samples (seed {SEED_CALIB}); the table is on "
            f"{args.eval_samples} others (seed {SEED_EVAL}; the VAD: 512-sample chunks of 4 streams, the state "
            "streamed). onnxflex: `calib_samples=0, verify_samples=0`, the learned rounders at "
            f"{' and '.join('--preset ' + p for p in args.presets)}"
            + ("" if args.iters < 0 else f" cut to {args.iters} iterations per block") +
            "; weight-only rows only where MatMul/Gemm hold most weights, and on those layers only (the "
            "others float, as onnxruntime's MatMulNBits row leaves them). onnxruntime: "
            "`quantize_static(quant_format=QDQ, per_channel=True)` (U8S4: uint8 activations, int4 weights), "
            "no `quant_pre_process`. Task metric: recognisers, line and character accuracy of the CTC greedy "
            "decode against the rendered text; classifier, accuracy on the 0/180 labels; DB text detector, IoU "
            "of the text mask (p > 0.3) with FP32's; box detectors, F1 against FP32's boxes after the "
            "package's threshold and NMS (IoU 0.5); VAD, agreement of the speech frames (p > 0.5) with FP32 "
            "and the output SQNR over the streamed sequence. Decisions: per-step argmax (recognisers), argmax "
            "(classifier), mask on every 8th pixel (DB), per-anchor class above threshold (box detectors), "
            f"speech frame (VAD). SQNR: first output on the evaluation feeds (the VAD: each call from FP32's "
            f"state). Latency: onnxruntime CPU, `onnxflex.compare`, {TIMING_THREADS} thread, quantized over "
            "FP32. Quantize time and peak RSS: the child process (interpreter start and imports included); in "
            "brackets its CPU seconds over all threads (on a shared machine, its own work beside wall time's "
            "waits)."
            + (f" {args.note}" if args.note else "") + "\n\n" + "\n".join(rows) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--bits", nargs="+", default=list(BITS), choices=BITS, help="W4: weight-only, groups of 32")
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS, help="for the learned rounders")
    parser.add_argument("--iters", type=int, default=-1, help="onnxflex iterations per block (-1: the preset's)")
    parser.add_argument("--act-scales", nargs="+", default=[], choices=ACT_SCALE_SEARCH,
                        help="onnxflex rows once per initial activation step (default: the config's default only)")
    parser.add_argument("--types", nargs="+", default=list(TYPES), choices=list(TYPES), help="onnxruntime's")
    parser.add_argument("--calibrators", nargs="+", default=list(CALIBRATORS), choices=CALIBRATORS)
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--eval-samples", type=int, default=128)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per quantization child")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "onnxflex-bench")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/onnxflex-real"))
    parser.add_argument("--latency-rules", choices=list(LATENCY_RULES), default="on",
                        help="onnxflex rows with the latency rules (on, the default), without them (off), or both")
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny sample counts, rtn and one onnxruntime row")
    parser.add_argument("--note", default="", help="a sentence about this run, written above the table")
    parser.add_argument("--part", default="", help="write a separate section of that name (another cut of the rows)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    if args.quick:
        args.calib_samples, args.eval_samples = QUICK_SAMPLES
        args.methods, args.bits, args.types, args.calibrators = ["rtn"], ["W8A8"], ["U8S8"], ["MinMax"]
    started = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "load": " ".join(f"{v:.1f}" for v in os.getloadavg())}
    clock = time.perf_counter()
    args.dir.mkdir(parents=True, exist_ok=True)
    tasks = [TASKS[name](fetch(TASKS[name].wheel, args.cache.expanduser())) for name in args.models]
    results = [row for task in tasks for row in bench_model(task, args, args.dir)]
    text = report(results, args, started, time.perf_counter() - clock)
    print(text)
    if not args.no_write:
        write_block(f"{HEADER}: {args.part}" if args.part else HEADER,
                    f"{MARKER}-{re.sub(r'[^a-z0-9]+', '-', args.part.lower())}" if args.part else MARKER, text)
    print(f"done in {time.perf_counter() - clock:.0f} s")


if __name__ == "__main__":
    main()
