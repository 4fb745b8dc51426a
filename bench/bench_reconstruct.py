"""Reconstruction speed: samples/s per block of the learning loop, and what each preset costs.

    python bench/bench_reconstruct.py [--iters 100] [--before ROOT] [--models digits_cnn digits_vit tiny_lm]
                                      [--preset-wbits 8 4] [--device cpu] [--note TEXT] [--no-write]

Every quantize runs in a fresh child process. The loop: FlexRound W8A8, ``--iters`` steps per block of 32
samples on each bundled model; a block's samples/s is steps run × batch / seconds spent in its training
loop (``reconstruct.train``, timed by wrapping it in the child). Presets: the CNN with ``--preset fast``,
``default`` and ``best`` for each of ``--preset-wbits`` (W8A8, W4A8): quantize wall time (in the child,
imports excluded), steps run per block, top-1 on models/digits_cnn.eval.npz and the output SQNR on the
held-out calibration samples.

With ``--before ROOT`` (the source tree of an older onnxflex, for example
``mkdir ROOT && git archive <commit> onnxflex passes runtimes | tar -x -C ROOT``), the loop runs that code
too, once with torch's default threads and once with OMP_NUM_THREADS=1, and the preset table gains that
code's default configuration. Writes its section into BENCHMARKS.md between ``<!-- reconstruct-speed -->``
markers (the 1-minute load average during the runs is written beside the numbers: this machine is shared).
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

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
sys.path.insert(0, str(ROOT / "bench"))
from bench_memory import write_block  # noqa: E402  (bench/ is not a package)

HEADER = "## Reconstruction speed"
MARKER = "reconstruct-speed"
LOOP_BATCH = 32
PRESETS = ("fast", "default", "best")

CHILD = """
import json, sys, time
import onnxflex
import onnxflex.rounding.reconstruct as rec
from onnxflex.config import QuantConfig

model, out, options = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
loops = {}
train = rec.train

def timed(module, *args, **kwargs):
    t = time.perf_counter()
    result = train(module, *args, **kwargs)
    loops[module.block.name] = time.perf_counter() - t
    return result

rec.train = timed
config = QuantConfig(**options)
t0 = time.perf_counter()
result = onnxflex.quantize(model, None, config, progress=False)
result.save(out)
seconds = time.perf_counter() - t0
report = result.report
print(json.dumps({"code": onnxflex.__file__, "seconds": seconds, "loops": loops, "blocks": report["blocks"],
                  "config": report["config"], "timings": report["timings"],
                  "sqnr_db": report["verification"].get("quantized_vs_fp32_sqnr_db", {})}))
"""


def code_path(before: Path | None, folder: Path) -> str:
    """A PYTHONPATH entry importing onnxflex from ``before`` (a source tree whose passes/ and runtimes/
    sit beside onnxflex/, as in this repository), or '' for the installed onnxflex."""
    if before is None:
        return ""
    package = folder / "code" / "onnxflex"
    if not package.exists():
        package.mkdir(parents=True)
        for entry in (before / "onnxflex").iterdir():
            (package / entry.name).symlink_to(entry.resolve())
        for sub in ("passes", "runtimes"):
            if (before / sub).is_dir() and not (package / sub).exists():
                (package / sub).symlink_to((before / sub).resolve())
    return str(package.parent)


def run_child(model: Path, out: Path, options: dict, pythonpath: str = "", threads: int = 0) -> dict:
    """One quantize in a fresh process (run in ``out``'s folder, so that the current directory cannot
    shadow the onnxflex meant); its figures plus the 1-minute load average before and after."""
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryFile("w+") as errors:
        done = subprocess.run([sys.executable, "-c", CHILD, str(model), str(out), json.dumps(options)],
                              stdout=subprocess.PIPE, stderr=errors, text=True, env=env, cwd=out.parent)
        errors.seek(0)
        stderr = errors.read()
    if done.returncode:
        raise SystemExit(f"quantize {model.name} {options} failed:\n{stderr[-4000:]}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    if pythonpath and not figures["code"].startswith(pythonpath):
        raise SystemExit(f"the child imported {figures['code']}, not the onnxflex under {pythonpath}")
    figures["load"] = load + [os.getloadavg()[0]]
    return figures


def block_rates(figures: dict) -> dict[str, float]:
    """samples/s of each learned block's training loop: steps run × batch / loop seconds."""
    batch = figures["config"]["batch_size"]
    steps = {b["name"]: b["iters"] for b in figures["blocks"]}
    return {name: steps[name] * batch / s for name, s in figures["loops"].items() if s > 0 and steps.get(name)}


def total_rate(figures: dict) -> float:
    batch = figures["config"]["batch_size"]
    steps = {b["name"]: b["iters"] for b in figures["blocks"]}
    seconds = sum(figures["loops"].values())
    return sum(steps[n] for n in figures["loops"]) * batch / seconds if seconds else 0.0


def loop_variants(before: Path | None, folder: Path) -> list[tuple[str, str, str, int, dict]]:
    """(key, column label, PYTHONPATH, OMP_NUM_THREADS or 0, extra options) of each loop measurement."""
    cores = os.cpu_count() or 1
    variants = [("after", "after", "", 0, {}),
                ("after_all", f"after, --threads {cores}", "", 0, {"threads": cores})]
    if before:
        old = code_path(before, folder)
        variants += [("before", "before (torch's threads)", old, 0, {}), ("before_1t", "before, 1 thread", old, 1, {})]
    return variants


def bench_loop(models: list[str], iters: int, device: str, variants: list, folder: Path) -> list[dict]:
    """Per model, the loop's figures of each variant (loop_variants), keyed by the variant's key."""
    options = {"method": "flexround", "wbits": 8, "abits": 8, "iters": iters, "batch_size": LOOP_BATCH,
               "device": device}
    runs = []
    for name in models:
        model = MODELS / f"{name}.onnx"
        row = {"model": name}
        for key, _, path, threads, extra in variants:
            row[key] = run_child(model, folder / f"{name}.{key}.onnx", {**options, **extra}, path, threads)
            print(f"{name} {key}: {total_rate(row[key]):.0f} samples/s, quantize {row[key]['seconds']:.1f} s, "
                  f"load {row[key]['load']}", flush=True)
        runs.append(row)
    return runs


def bench_presets(wbits: list[int], device: str, before: Path | None, folder: Path) -> list[dict]:
    """The CNN with each preset (and with ``before``, the old code's defaults) for each weight width."""
    from compare_peers import evaluate

    model = MODELS / "digits_cnn.onnx"
    rows = []
    for bits in wbits:
        settings = [(p, "", {"preset": p}) for p in PRESETS]
        if before:
            settings.append(("before: default", code_path(before, folder), {}))
        for label, path, extra in settings:
            out = folder / f"digits_cnn.w{bits}.{re.sub(r'[^a-z]+', '_', label)}.onnx"
            figures = run_child(model, out, {"wbits": bits, "abits": 8, "device": device, **extra}, path)
            figures.update(label=label, wbits=bits, top1=evaluate(out, "digits_cnn")[0])
            rows.append(figures)
            print(f"W{bits}A8 {label}: {figures['seconds']:.1f} s, top-1 {figures['top1']:.3f}, "
                  f"load {figures['load']}", flush=True)
    return rows


def loop_table(runs: list[dict], variants: list) -> str:
    """samples/s of every learned block (and of all together) per variant, and after over before."""
    keys = [v[0] for v in variants]
    ratios = [(f"after / {label}", key) for key, label, *_ in variants if key.startswith("before")]
    head = "| " + " | ".join(["model", "block", "layers"] + [v[1] for v in variants] + [r[0] for r in ratios]) + " |"
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for run in runs:
        rates = {k: {**block_rates(run[k]), "all blocks": total_rate(run[k])} for k in keys}
        layers = {b["name"]: b["layers"] for b in run["after"]["blocks"]}
        for name in rates["after"]:
            cells = [run["model"], name, str(layers.get(name, sum(layers.values())))]
            cells += [f"{rates[k].get(name, 0):.0f}" for k in keys]
            cells += [f"{rates['after'][name] / rates[k][name]:.1f}x" for _, k in ratios]
            rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def quantize_table(runs: list[dict], variants: list) -> str:
    rows = ["| model | " + " | ".join(f"quantize time, {v[1]}" for v in variants) + " |",
            "|---|" + "---|" * len(variants)]
    for run in runs:
        rows.append(f"| {run['model']} | " + " | ".join(f"{run[v[0]]['seconds']:.1f} s" for v in variants) + " |")
    return "\n".join(rows)


def preset_table(rows: list[dict]) -> str:
    out = ["| weights | preset | steps per block (max) | batch | early stop after | steps run, per block | "
           "quantize time | top-1 | output SQNR (dB) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cfg = r["config"]
        used = [b["iters"] for b in r["blocks"]]
        patience = cfg.get("early_stop", 0)
        sqnr = ", ".join(f"{v:.1f}" for v in r["sqnr_db"].values())
        out.append(f"| W{r['wbits']}A8 | {r['label']} | {cfg['iters']} | {cfg['batch_size']} | "
                   f"{f'{patience} flat steps' if patience > 0 else 'off'} | {' / '.join(map(str, used))} | "
                   f"{r['seconds']:.1f} s | {r['top1']:.3f} | {sqnr} |")
    return "\n".join(out)


def load_note(figures: list[dict]) -> str:
    loads = [x for f in figures for x in f["load"]]
    cores = os.cpu_count() or 1
    note = f"1-minute load average during the runs: {min(loads):.1f} to {max(loads):.1f} on {cores} cores"
    if max(loads) > 1.5:  # the benchmark's own process accounts for about 1
        note += (" — other jobs shared the machine, so times are noisy; compare columns of one run, "
                 "not runs of different days")
    return note


def report(runs: list[dict], variants: list, presets: list[dict], args, seconds: float) -> str:
    from bench_memory import machine

    with_before = args.before is not None
    figures = [run[k] for run in runs for k in run if k != "model"] + presets
    text = (f"`python bench/bench_reconstruct.py --iters {args.iters}"
            + (" --before ROOT" if with_before else "") + f"` ({seconds / 60:.0f} min in all). Machine: {machine()}; "
            f"{load_note(figures)}.{(' ' + args.note) if args.note else ''}\n\n"
            f"### The loop: samples/s per block\n\nFlexRound W8A8, {args.iters} steps per block of {LOOP_BATCH} "
            f"samples, device {args.device}; samples/s = steps × batch / seconds in the block's training loop. "
            "*After* runs with the automatic thread count (`--threads 0`: one thread per 256k values of a "
            "block's largest step tensor, so one for each bundled model), the next column with every core.")
    if with_before:
        text += (" *Before* is the code this change started from, once with torch's default intra-op threads "
                 "and once with OMP_NUM_THREADS=1 (which separates the thread setting from the arithmetic).")
    text += "\n\n" + loop_table(runs, variants) + "\n\n" + quantize_table(runs, variants)
    text += ("\n\n### Presets on the CNN\n\n`onnxflex quantize models/digits_cnn.onnx --preset P` (FlexRound, "
             f"device {args.device}); quantize time is the API call in a fresh process, imports excluded; top-1 "
             "on the 500 images of models/digits_cnn.eval.npz (FP32: 0.988); SQNR of the logits against FP32 "
             "on the 32 held-out calibration samples.\n\n" + preset_table(presets) + "\n")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["digits_cnn", "digits_vit", "tiny_lm"])
    parser.add_argument("--iters", type=int, default=100, help="steps per block in the loop measurement")
    parser.add_argument("--preset-wbits", type=int, nargs="*", default=[8, 4],
                        help="weight widths of the preset runs on the CNN (none: skip them)")
    parser.add_argument("--before", type=Path, help="source tree of the onnxflex to compare with")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/onnxflex-reconstruct"))
    parser.add_argument("--note", default="", help="a sentence about this run, written under the header")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    variants = loop_variants(args.before, args.dir)
    runs = bench_loop(args.models, args.iters, args.device, variants, args.dir)
    presets = bench_presets(args.preset_wbits, args.device, args.before, args.dir)
    text = report(runs, variants, presets, args, time.perf_counter() - started)
    print(text)
    if not args.no_write:
        write_block(HEADER, MARKER, text)
    print(f"done in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
