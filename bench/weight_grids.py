"""Symmetric against asymmetric weight grids at 4-bit weight-only, beside onnxruntime's MatMulNBits quantizer.

    python bench/weight_grids.py [--model models/tiny_lm.onnx] [--group-size 32] [--methods rtn flexround hqq]
                                 [--no-write]

On the bundled tiny LM (or another model with the same feeds), weight-only W4 with groups of
``--group-size``: onnxflex rtn, flexround (``--preset fast``) and hqq, each with ``--weight-grid symmetric``
and ``asymmetric``, calibrated on ``<model>.calib.npz``; and onnxruntime's ``MatMulNBitsQuantizer`` (bits
4, the same block size: its round-to-nearest, symmetric and asymmetric, and its HQQ; it needs the
``onnx_ir`` package). Every model runs in onnxruntime on ``<model>.eval.npz``: logits SQNR against FP32,
argmax agreement with FP32 over the real tokens (attention mask 1), perplexity, and for every onnxflex row
the tokens only it agrees with FP32 on against the best onnxruntime row (and against the same method's
symmetric row), with the exact sign test. Appends its section to the end of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from bench_memory import machine, paired_counts  # noqa: E402  (bench/ is not a package)

FEEDS = ("input_ids", "attention_mask")


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def scores(logits: np.ndarray, fp32: np.ndarray, data: dict) -> dict:
    """SQNR vs FP32 (dB), per-token argmax agreement with FP32 (mask 1), perplexity on the targets."""
    from onnxflex.qparams import sqnr_db

    mask = data["attention_mask"].astype(bool)
    agree = (logits.argmax(-1) == fp32.argmax(-1))[mask]
    nll = -np.take_along_axis(log_softmax(logits), data["targets"][..., None], -1)[..., 0][mask]
    return {"sqnr": sqnr_db(fp32, logits), "agree": agree, "ppl": float(np.exp(nll.mean()))}


def run(model, data: dict) -> np.ndarray:
    import onnx

    from onnxflex.ort import session

    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    return session(proto, ["CPUExecutionProvider"]).run(["logits"], {k: data[k] for k in FEEDS})[0]


def onnxflex_rows(model: Path, calib: dict, methods: list[str], group: int) -> dict:
    import onnxflex
    from onnxflex.config import QuantConfig

    rows = {}
    for method in methods:
        for grid in ("symmetric", "asymmetric"):
            config = QuantConfig(method=method, wbits=4, abits=0, group_size=group, weight_grid=grid,
                                 preset="fast", seed=0)
            t0 = time.perf_counter()
            result = onnxflex.quantize(model, calib, config, progress=False)
            rows[f"onnxflex {method} {grid}"] = (result.model, time.perf_counter() - t0)
    return rows


def ort_rows(model: Path, group: int) -> dict:
    """onnxruntime's MatMulNBitsQuantizer: RTN symmetric / asymmetric and HQQ (an error string if it fails)."""
    import onnx

    try:
        from onnxruntime.quantization import matmul_nbits_quantizer as nbits
    except ImportError as exc:
        return {"onnxruntime MatMulNBits": f"does not import ({exc}); pip install -e '.[bench]'"}
    configs = {"RTN symmetric": lambda: nbits.DefaultWeightOnlyQuantConfig(block_size=group, is_symmetric=True),
               "RTN asymmetric": lambda: nbits.DefaultWeightOnlyQuantConfig(block_size=group, is_symmetric=False),
               "HQQ": lambda: nbits.HQQWeightOnlyQuantConfig(block_size=group, bits=4)}
    rows = {}
    for name, make in configs.items():
        t0 = time.perf_counter()
        algo = make()
        quantizer = nbits.MatMulNBitsQuantizer(onnx.load(str(model)), bits=4, block_size=group,
                                               is_symmetric=getattr(algo, "is_symmetric", False), algo_config=algo)
        quantizer.process()
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "q.onnx")
            quantizer.model.save_model_to_file(path, False)
            rows[f"onnxruntime {name}"] = (onnx.load(path), time.perf_counter() - t0)
    return rows


def table(results: dict, group: int) -> list[str]:
    """Markdown rows; paired counts of each onnxflex row against the best onnxruntime row and against
    the same method's symmetric row (tokens only this row agrees with FP32 on / only the other does, p)."""
    ort = {k: v for k, v in results.items() if k.startswith("onnxruntime") and isinstance(v, dict)}
    best = max(ort, key=lambda k: ort[k]["sqnr"]) if ort else None
    lines = [f"| W4 g{group} weight-only | SQNR vs FP32 (dB) | argmax agreement | perplexity | vs {best or '-'} "
             "| vs symmetric | quantize s |", "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        if not isinstance(r, dict):
            lines.append(f"| {name} | {r} | | | | | |")
            continue
        vs_best = vs_sym = "-"
        if name.startswith("onnxflex") and best:
            vs_best = "{} / {} (p={:.2g})".format(*paired_counts(r["agree"], ort[best]["agree"]))
        if name.endswith("asymmetric") and name.startswith("onnxflex"):
            sym = results[name.replace("asymmetric", "symmetric")]
            vs_sym = "{} / {} (p={:.2g})".format(*paired_counts(r["agree"], sym["agree"]))
        lines.append(f"| {name} | {r['sqnr']:.2f} | {r['agree'].mean():.4f} | {r['ppl']:.4f} | {vs_best} | {vs_sym} "
                     f"| {r['seconds']:.1f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "tiny_lm.onnx")
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--methods", nargs="+", default=["rtn", "flexround", "hqq"])
    parser.add_argument("--no-write", action="store_true", help="print the section, leave BENCHMARKS.md alone")
    args = parser.parse_args()
    stem = args.model.with_suffix("")
    with np.load(f"{stem}.calib.npz") as f:
        calib = {k: f[k] for k in FEEDS}
    with np.load(f"{stem}.eval.npz") as f:
        data = {k: f[k] for k in f.files}
    load = os.getloadavg()
    fp32 = run(args.model, data)
    models = {**onnxflex_rows(args.model, calib, args.methods, args.group_size),
              **ort_rows(args.model, args.group_size)}
    results = {}
    for name, value in models.items():
        if isinstance(value, str):
            results[name] = value
            continue
        results[name] = {**scores(run(value[0], data), fp32, data), "seconds": value[1]}
    tokens = int(data["attention_mask"].sum())
    shown = args.model.relative_to(ROOT) if args.model.is_relative_to(ROOT) else args.model
    section = [f"\n## Weight grids: symmetric against asymmetric, 4-bit weight-only (bench/weight_grids.py)\n",
               f"`python bench/weight_grids.py --model {shown} "
               f"--group-size {args.group_size} --methods {' '.join(args.methods)}` on {machine()}, load average "
               f"{load[0]:.1f} at the start (shared with other jobs). onnxflex: `--abits 0 --wbits 4 --group-size "
               f"{args.group_size} --preset fast --seed 0`, calibrated on the {len(calib['input_ids'])} samples of the "
               f"calib npz; onnxruntime: `MatMulNBitsQuantizer(bits=4, block_size={args.group_size})` (data-free). "
               f"Evaluated in onnxruntime on {len(data['input_ids'])} eval sequences ({tokens} real tokens): argmax "
               "agreement with FP32 per token, paired counts = tokens only this row agrees with FP32 on / tokens only "
               "the other row does, exact sign test.\n", *table(results, args.group_size), ""]
    text = "\n".join(section)
    print(text)
    if not args.no_write:
        with open(ROOT / "BENCHMARKS.md", "a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
