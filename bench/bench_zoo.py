"""onnxflex against onnxruntime.quantization on the zoo of real exports (tests/zoo/*.json), W8A8.

    python bench/bench_zoo.py [--models NAME ...] [--calib-samples 128] [--eval-samples 256] [--no-write]

For every zoo model, on the same calibration samples drawn from the manifest's feeds (seed 0):
onnxflex (``onnxflex quantize`` in a child process with the manifest's --fix-input/--batch-axis;
round-to-nearest, and FlexRound at ``--preset fast``) and onnxruntime's ``quantize_static`` (QDQ, per
channel, MinMax calibration, U8S8 and S8S8) in a child process of its own. Each row gives the output
SQNR against FP32 on held-out feeds (seed 1; the lowest over the model's outputs), the argmax agreement
with FP32 for the models whose first output is class scores (per position for sequence outputs), the
onnxruntime-vs-simulation SQNR from onnxflex's report, quantization wall time (child process, imports
included) and the CPU latency ratio quantized/FP32 (onnxflex.compare: alternating runs, median). For the
class-score models, onnxflex FlexRound is paired with onnxruntime's better U8S8/S8S8 row: the positions
only one of them agrees with FP32 on, with the exact sign test. Writes its section into BENCHMARKS.md
between markers.
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
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))
from bench_memory import machine, paired_counts, write_block  # noqa: E402  (bench/ is not a package)
from zoo_models import ZooModel, zoo_models  # noqa: E402

from onnxflex.qparams import sqnr_db  # noqa: E402

HEADER = "## Against onnxruntime.quantization: the zoo of real exports"
MARKER = "bench-zoo"
TIMING_THREADS = 1
TIMING_BATCH = 16
TIMING_REPEATS = 30
VERIFY_SAMPLES = 32
# first output holds class scores on its last axis (argmax is the prediction)
CLASS_SCORES = {"torchscript_mbnet", "dynamo_resnet", "bert_tiny", "vit_tiny", "gpt2_tiny_past", "paddle_cls",
                "paddle_cls_m1", "paddle_rec", "paddle_rec_m1", "tf_cnn", "tf_text"}

ORT_CHILD = """
import json, sys, time
import numpy as np
model, calib, out, options = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
t0 = time.perf_counter()
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

axes = options["axes"]  # input -> batch axis, None for a value shared by every sample
with np.load(calib) as data:
    arrays = {k: data[k] for k in data.files}
n = options["samples"]


class NpzReader(CalibrationDataReader):
    def __init__(self):
        def take(name, start):
            value, axis = arrays[name], axes[name]
            return value if axis is None else np.take(value, range(start, min(start + 16, n)), axis=axis)
        self.batches = iter([{k: take(k, i) for k in arrays} for i in range(0, n, 16)])

    def get_next(self):
        return next(self.batches, None)


act, weight = options["types"].split("_")
quantize_static(model, out, NpzReader(), quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=getattr(QuantType, act), weight_type=getattr(QuantType, weight),
                calibrate_method=CalibrationMethod.MinMax)
print(json.dumps({"seconds": time.perf_counter() - t0}))
"""


def batch_axes(model: ZooModel) -> dict[str, int | None]:
    """Each input's sample axis in the model's layout; None for a fixed (shared) input."""
    return {k: None if v["kind"] == "fixed" else v.get("batch_axis", 0) for k, v in model.inputs.items()}


def run_child(args: list[str]) -> dict:
    """Wall time of one child process, or its last error line."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as errors:
        proc = subprocess.run(args, stdout=subprocess.PIPE, stderr=errors, text=True)
        errors.seek(0)
        stderr = errors.read()
    if proc.returncode:
        lines = [line for line in (stderr + proc.stdout).strip().splitlines() if line.strip()]
        last = re.sub(r"^[\w.]*Fail: \[ONNXRuntimeError\] : \d+ : \w+ : ", "", lines[-1]) if lines else ""
        return {"error": (last or f"exit status {proc.returncode}")[:240]}
    return {"seconds": time.perf_counter() - t0}


def onnxflex_row(model: ZooModel, calib: Path, out: Path, method: str) -> dict:
    args = [sys.executable, "-m", "onnxflex.cli", "quantize", str(model.path), "--calib", str(calib), "-o", str(out),
            "--method", method, "--verify-samples", str(VERIFY_SAMPLES), "--verify-tolerance-db", "0",
            "--device", "cpu", "--quiet"]
    if method != "rtn":
        args += ["--preset", "fast"]
    args += [a for k, v in model.fix_inputs.items() for a in ("--fix-input", f"{k}={v:g}")]
    args += [a for k, v in model.batch_axes.items() for a in ("--batch-axis", f"{k}={v}")]
    row = run_child(args)
    if "error" not in row:
        report = json.loads(Path(f"{out}.report.json").read_text())
        sims = report["verification"]["onnxruntime_vs_simulation_sqnr_db"]
        row["sim_db"] = min(float(v) for v in sims.values())
        row["torch_blocks"] = f"{sum(b['runtime'] == 'torch' for b in report['blocks'])}/{len(report['blocks'])}"
    return row


def ort_row(model: ZooModel, calib: Path, out: Path, types: str, samples: int) -> dict:
    options = {"types": types, "samples": samples, "axes": batch_axes(model)}
    return run_child([sys.executable, "-c", ORT_CHILD, str(model.path), str(calib), str(out), json.dumps(options)])


def outputs_of(path: Path, feeds: dict[str, np.ndarray], axes: dict[str, int | None]) -> list[np.ndarray]:
    """The model's outputs on ``feeds`` (run in batches of 32 along each input's batch axis), batches
    joined on axis 0 unless the output is the recurrent state (axis 1, as the manifest's inputs)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    n = next(v.shape[axes[k]] for k, v in feeds.items() if axes[k] is not None)
    chunks = []
    for start in range(0, n, 32):
        batch = {k: v if axes[k] is None else np.take(v, range(start, min(start + 32, n)), axis=axes[k])
                 for k, v in feeds.items() if k in names}
        chunks.append(sess.run(None, batch))
    joined = []
    for j, meta in enumerate(sess.get_outputs()):
        axis = 1 if meta.name == "stateN" else 0
        joined.append(np.concatenate([c[j] for c in chunks], axis=axis))
    return joined


def short_error(exc: Exception) -> str:
    """The part of an onnxruntime error that says what is wrong (its 'Error ...' tail when it has one)."""
    text = " ".join(str(exc).split())
    return text.rpartition(" Error ")[2][:200] if " Error " in text else text[-200:]


def fidelity(ref: list[np.ndarray], got: list[np.ndarray], classes: bool) -> dict:
    out = {"sqnr_db": min(sqnr_db(r, g) for r, g in zip(ref, got))}
    if classes:
        out["agrees"] = (ref[0].argmax(-1) == got[0].argmax(-1)).ravel()
    return out


def latency_ratio(fp32: Path, quantized: Path, eval_npz: Path) -> float:
    from onnxflex.compare import compare_models

    cmp = compare_models(fp32, quantized, eval_npz, samples=TIMING_BATCH, batch_size=TIMING_BATCH, worst=0,
                         repeats=TIMING_REPEATS, threads=TIMING_THREADS)
    return cmp.latency_ratio


def bench_model(model: ZooModel, calib_samples: int, eval_samples: int, folder: Path) -> list[dict]:
    axes = batch_axes(model)
    calib, eval_npz = folder / f"{model.name}.calib.npz", folder / f"{model.name}.eval.npz"
    # onnxflex holds out VERIFY_SAMPLES to verify its output, so it gets that many more: both learn from calib_samples
    np.savez(calib, **model.feeds(calib_samples + VERIFY_SAMPLES, seed=0))
    eval_feeds = model.feeds(eval_samples, seed=1)
    np.savez(eval_npz, **eval_feeds)
    classes = model.name in CLASS_SCORES
    reference = outputs_of(model.path, eval_feeds, axes)
    rows = []
    settings = [("onnxflex", "rtn", lambda out: onnxflex_row(model, calib, out, "rtn")),
                ("onnxflex", "flexround --preset fast", lambda out: onnxflex_row(model, calib, out, "flexround")),
                ("onnxruntime", "quantize_static MinMax U8S8",
                 lambda out: ort_row(model, calib, out, "QUInt8_QInt8", calib_samples)),
                ("onnxruntime", "quantize_static MinMax S8S8",
                 lambda out: ort_row(model, calib, out, "QInt8_QInt8", calib_samples))]
    for toolkit, setting, quantize in settings:
        out = folder / f"{model.name}.{toolkit}.{setting.split()[0]}.{setting.split()[-1]}.onnx"
        row = {"model": model.name, "toolkit": toolkit, "setting": setting, **quantize(out)}
        if "error" not in row:
            try:
                row.update(fidelity(reference, outputs_of(out, eval_feeds, axes), classes))
                row["latency_ratio"] = latency_ratio(model.path, out, eval_npz)
            except Exception as exc:  # a model onnxruntime cannot load or run is a result too
                row["error"] = f"onnxruntime cannot run the output: {short_error(exc)}"
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


def format_row(r: dict) -> str:
    if "error" in r:
        return f"| {r['model']} | {r['toolkit']} | {r['setting']} | failed: {r['error'].replace('|', '/')} ||||||"
    agree = f"{r['agrees'].mean():.3f} ({r['agrees'].size})" if "agrees" in r else ""
    sim = f"{r['sim_db']:.1f}" if "sim_db" in r else ""
    blocks = r.get("torch_blocks", "")
    return (f"| {r['model']} | {r['toolkit']} | {r['setting']} | {r['sqnr_db']:.1f} | {agree} | {sim} | {blocks} | "
            f"{r['seconds']:.1f} s | {r['latency_ratio']:.2f} |")


def paired(rows: list[dict]) -> list[str]:
    """Per class-score model: FlexRound against onnxruntime's row with the higher agreement."""
    lines = []
    for name in dict.fromkeys(r["model"] for r in rows):
        ok = [r for r in rows if r["model"] == name and "agrees" in r]
        ours = [r for r in ok if r["setting"].startswith("flexround")]
        peers = [r for r in ok if r["toolkit"] == "onnxruntime"]
        if not ours or not peers:
            continue
        best = max(peers, key=lambda r: r["agrees"].mean())
        wins, losses, p = paired_counts(ours[0]["agrees"], best["agrees"])
        lines.append(f"- {name}: flexround agrees with FP32's argmax on {ours[0]['agrees'].mean():.3f} of "
                     f"{ours[0]['agrees'].size} positions, onnxruntime's {best['setting'].split()[-1]} on "
                     f"{best['agrees'].mean():.3f}; flexround alone on {wins}, onnxruntime alone on {losses} "
                     f"(exact sign test p = {p:.2g}).")
    return lines


def report(rows: list[dict], args, seconds: float) -> str:
    table = ["| model | toolkit | setting | output SQNR vs FP32 (dB) | argmax agreement with FP32 (positions) "
             "| onnxruntime vs simulation (dB) | blocks simulated in torch | quantize time | latency ratio vs FP32 |",
             "|" + "---|" * 9]
    table += [format_row(r) for r in rows]
    failed = sorted({f"{r['model']} ({r['setting'].split()[-1]})" for r in rows if "error" in r and
                     r["toolkit"] == "onnxruntime"})
    return (f"`python bench/bench_zoo.py --calib-samples {args.calib_samples} --eval-samples {args.eval_samples}` "
            f"({seconds / 60:.0f} min in all). Machine: {machine()}.\n\n"
            f"The feeds are the manifests' (tests/zoo/*.json: random images, tokens, states), not real data, so "
            "the figures measure how closely each quantized model tracks FP32 on the same inputs, not task "
            f"accuracy. Both toolkits learn from the same {args.calib_samples} calibration samples (onnxflex gets "
            f"{VERIFY_SAMPLES} more, which it holds out to verify its output against its simulation); onnxflex "
            "through `onnxflex quantize` with the manifest's `--fix-input`/`--batch-axis`, onnxruntime through "
            "`quantize_static(quant_format=QDQ, per_channel=True, calibrate_method=MinMax)`, default op types, "
            "no `quant_pre_process`, calibration in batches of 16 in the model's layout. Fidelity is on "
            f"{args.eval_samples} other samples: the lowest SQNR over the model's outputs, and for class-score "
            "outputs the share of positions (samples, tokens or frames) whose argmax matches FP32's. "
            "\"Blocks simulated in torch\": the rest have an op with no torch converter (a Loop or Scan, an "
            "RNN, an LSTM with clip or sequence_lens) and "
            "run in onnxruntime in the simulation too, where the simulation check cannot disagree. Quantize "
            "time is of a fresh child process (interpreter start and imports included). Latency ratio: "
            f"onnxruntime CPU, `onnxflex.compare` (alternating runs, median of {TIMING_REPEATS}), batch "
            f"{TIMING_BATCH}, {TIMING_THREADS} thread, quantized over FP32; these models take well under a "
            "millisecond, so Q/DQ overhead weighs more than it would on a large model."
            + (f" onnxruntime's quantizer failed on: {', '.join(failed)}." if failed else "")
            + (f" {args.note}" if args.note else "") +
            "\n\n" + "\n".join(table) +
            "\n\nPaired on the same positions (flexround against the onnxruntime row with the higher agreement):\n\n"
            + "\n".join(paired(rows)) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    names = [m.name for m in zoo_models()]
    parser.add_argument("--models", nargs="+", default=names, choices=names)
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--eval-samples", type=int, default=256)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/onnxflex-zoo-bench"))
    parser.add_argument("--note", default="", help="a sentence about this run, written under the table's header")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    models = {m.name: m for m in zoo_models()}
    started = time.perf_counter()
    rows = [row for name in args.models for row in bench_model(models[name], args.calib_samples,
                                                                args.eval_samples, args.dir)]
    saved = [{k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in r.items()} for r in rows]
    (args.dir / "rows.json").write_text(json.dumps(saved))  # the table can be rendered again from it
    text = report(rows, args, time.perf_counter() - started)
    print(text)
    if not args.no_write:
        write_block(HEADER, MARKER, text)
    print(f"done in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
