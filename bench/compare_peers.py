"""onnxflex against onnxruntime.quantization on the bundled and standard models, each quantization in a child process.

    python bench/compare_peers.py [--models digits_cnn digits_vit tiny_lm] [--calib-samples 128]
                                  [--methods rtn flexround adaround signround] [--dir /tmp/onnxflex-peers]
    python bench/make_standard_models.py && python bench/compare_peers.py --models resnet18 mobilenetv2 vit_tiny
    python bench/compare_peers.py --models decoder decoder_genai --methods rtn hqq flexround signround \
                                  [--grids symmetric asymmetric]

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

``decoder`` and ``decoder_genai`` (models/decoder/: the decoder trained here, torch.onnx export with past
key/values and onnxruntime-genai's builder form) get weight-only rows only, in their own section: onnxflex's
``--methods`` on each of ``--grids`` at W4 g32, W4 g128, W3 g64 and W2 g64, and onnxruntime's
MatMulNBitsQuantizer RTN (symmetric and asymmetric), HQQ and GPTQ at the bits it takes (rows it cannot
make say why). Their columns: perplexity on the held-out text (full-sequence runs, no cache), KL against
FP32 per token, argmax agreement with FP32, and what onnxflex gave the lm_head; the best learned row is
paired against onnxflex rtn and onnxruntime's best at each setting on the tokens only one agrees with
FP32's argmax on (exact sign test).
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
# the bundled decoder (models/decoder/make_decoder.py) and the same checkpoint from onnxruntime-genai's builder
DECODER_DATA = MODELS / "decoder"
DECODERS = {"decoder": DECODER_DATA / "decoder.onnx", "decoder_genai": DECODER_DATA / "genai" / "model.onnx"}
LANGUAGE = ("tiny_lm", *DECODERS)
# weight-only settings for the decoders: (label, bits, group); onnxruntime's MatMulNBitsQuantizer takes
# bits 2, 4 and 8 (RTN, HQQ), its GPTQ (through the neural-compressor path) only 4
DECODER_SETTINGS = (("W4 g32", 4, 32), ("W4 g128", 4, 128), ("W3 g64", 3, 64), ("W2 g64", 2, 64))
NBITS_BITS = {"RTN": (2, 4, 8), "HQQ": (2, 4, 8), "GPTQ": (4,)}
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
head = {}
if kind == "onnxflex":
    import onnxflex
    result = onnxflex.quantize(model, calib, onnxflex.QuantConfig(**options), progress=False)
    result.save(out)
    heads = [h for h in result.report.get("heads", []) if "lm_head" in h["node"]]
    if heads:  # what the decoder's lm_head got (its default is not this script's to choose)
        head = {"head": f"{heads[0]['bits']}-bit g{heads[0]['group_size']}" if heads[0]["bits"] else "float"}
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

    block, bits, symmetric = options["block_size"], options.get("bits", 4), options.get("symmetric", True)
    algo = {"RTN": lambda: nbits.DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=symmetric, bits=bits),
            "HQQ": lambda: nbits.HQQWeightOnlyQuantConfig(block_size=block, bits=bits),
            "GPTQ": lambda: nbits.GPTQWeightOnlyQuantConfig(
                calibration_data_reader=npz_reader(options["samples"], options["batch"]))}[options["algorithm"]]()
    quantizer = nbits.MatMulNBitsQuantizer(onnx.load(model), bits=bits, block_size=block, is_symmetric=symmetric,
                                           algo_config=algo)
    quantizer.process()
    quantizer.model.save_model_to_file(out, False)
print()  # onnxruntime's GPTQ draws a progress bar without a final newline
print(json.dumps({"seconds": time.perf_counter() - t0, "peak_rss_mib": peak_rss_mib(), **head}))
"""


def run_child(kind: str, model: Path, calib: Path, out: Path, options: dict) -> dict:
    """One quantization in a fresh child process: its wall time and its own peak RSS (MiB), or the error."""
    return run_measured([sys.executable, "-c", CHILD, kind, str(model), str(calib), str(out), json.dumps(options),
                         str(ROOT / "bench")])


def perplexity(logits: np.ndarray, targets: np.ndarray) -> float:
    """exp(mean cross-entropy) of [M, T, V] logits against [M, T] int targets (as tests/test_transformers.py)."""
    return float(np.exp(-np.take_along_axis(log_softmax(logits), targets[..., None], -1).mean()))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


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


def decoder_feeds(model: Path, ids: np.ndarray) -> dict[str, np.ndarray]:
    """``model``'s inputs for prompts ``ids`` [M, T] with an empty past, as make_decoder.prompt_feeds builds
    them, limited to the inputs the model has (the builder's form takes no position_ids)."""
    import onnx

    m, t = ids.shape
    with np.load(DECODER_DATA / "decoder.calib.npz") as calib:  # both forms' past names, empty: [128, 2, 0, 16]
        past = {k: np.zeros((m, *calib[k].shape[1:]), np.float32) for k in calib.files if k.startswith("past")}
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids),
             "position_ids": np.broadcast_to(np.arange(t, dtype=np.int64), (m, t)).copy(), **past}
    return {i.name: feeds[i.name] for i in onnx.load(str(model), load_external_data=False).graph.input}


def model_files(name: str, folder: Path) -> tuple[Path, Path, Path]:
    """(FP32 model, calibration npz, eval npz of the model's inputs) of ``name``. For the decoders the two
    npz are written into ``folder``: the calibration windows of models/decoder/decoder.calib.npz and the
    held-out windows of decoder.eval.npz, both as the full-sequence (cache-free) prompt the model takes."""
    if name not in DECODERS:
        source = model_folder(name)
        return source / f"{name}.onnx", source / f"{name}.calib.npz", source / f"{name}.eval.npz"
    fp32, calib, data = DECODERS[name], folder / f"{name}.calib.npz", folder / f"{name}.eval.npz"
    for path, ids in ((calib, np.load(DECODER_DATA / "decoder.calib.npz")["input_ids"]),
                      (data, np.load(DECODER_DATA / "decoder.eval.npz")["input_ids"])):
        np.savez(path, **decoder_feeds(fp32, ids))
    return fp32, calib, data


def evaluate(model: Path, name: str, data: Path) -> tuple[float, np.ndarray, np.ndarray]:
    """(task metric, argmax predictions, logits or whether each is right) on the eval set ``data`` (an npz of
    the model's inputs), onnxruntime CPU: top-1 over the images for the classifiers (with whether each is
    right), perplexity over the next characters for the language models (with their [M, T, V] logits)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    with np.load(data) as data:
        data = {k: data[k] for k in data.files}
    if name in DECODERS:
        targets = np.load(DECODER_DATA / "decoder.eval.npz")["targets"]
        logits = np.concatenate([sess.run(["logits"], {k: v[i:i + 16] for k, v in data.items()})[0]
                                 for i in range(0, len(targets), 16)])
        return perplexity(logits, targets), logits.argmax(-1), logits
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


def method_options(opts: dict, method: str, samples: int, iters: int) -> dict:
    """onnxflex QuantConfig options of one row: ``opts`` with ``method``, calibrated on ``samples``, the
    learned methods capped at ``iters`` steps per block where ``iters`` >= 0."""
    return {**opts, "method": method, "calib_samples": samples, "verify_samples": 0,
            **({"iters": iters} if iters >= 0 and method != "rtn" else {})}


def decoder_candidates(methods: list[str], samples: int, iters: int,
                       grids: list[str]) -> list[tuple[str, str, str, dict]]:
    """A decoder's weight-only rows at each of DECODER_SETTINGS: onnxflex's ``methods`` on each weight grid
    of ``grids``, onnxruntime's MatMulNBits RTN (symmetric and asymmetric), HQQ (asymmetric: it always
    fits a zero point) and GPTQ (both); a setting onnxruntime's quantizer does not take is a "skip" row
    that says why."""
    rows = []
    for label, bits, group in DECODER_SETTINGS:
        rows += [("onnxflex", f"{method} {label} {grid[:4]}", "onnxflex",
                  method_options({"wbits": bits, "abits": 0, "group_size": group, "weight_grid": grid,
                                  "head_bits": bits},  # the lm_head at the row's bits, as onnxruntime's rows have it
                                 method, samples, iters))
                 for method in methods for grid in grids]
        for algorithm, symmetric in (("RTN", True), ("RTN", False), ("HQQ", False), ("GPTQ", True), ("GPTQ", False)):
            setting = f"MatMulNBits {algorithm} {label} {'sym' if symmetric else 'asym'}"
            if bits not in NBITS_BITS[algorithm]:
                rows.append(("onnxruntime", setting, "skip",
                             {"reason": f"onnxruntime's MatMulNBitsQuantizer {algorithm} takes bits "
                                        f"{', '.join(map(str, NBITS_BITS[algorithm]))} only"}))
                continue
            rows.append(("onnxruntime", setting, "ort_nbits",
                         {"block_size": group, "bits": bits, "symmetric": symmetric, "algorithm": algorithm,
                          "samples": samples, "batch": 16}))
    return rows


def candidates(name: str, methods: list[str], samples: int, iters: int,
               grids: list[str] = ("asymmetric",)) -> list[tuple[str, str, str, dict]]:
    """(toolkit, setting label, child kind, options) for one model; ``grids``: the onnxflex weight grids
    of a decoder's rows."""
    if name in DECODERS:
        return decoder_candidates(methods, samples, iters, list(grids))
    flex = [("W8A8", {"wbits": 8, "abits": 8})]
    if name != "tiny_lm":
        flex.append(("W4A8", {"wbits": 4, "abits": 8}))
    if name == "tiny_lm":
        flex.append(("W4 weight-only g32", {"wbits": 4, "abits": 0, "group_size": 32}))

    def options(opts: dict, method: str) -> dict:
        return method_options(opts, method, samples, iters)

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


def bench_model(name: str, methods: list[str], samples: int, iters: int, folder: Path,
                grids: list[str] = ("asymmetric",)) -> list[dict]:
    """All rows of one model; the quantized models (and a decoder's npz) are written into ``folder``."""
    from onnxflex.compare import compare_models, model_bytes

    fp32, calib, data = model_files(name, folder)
    metric, reference, right = evaluate(fp32, name, data)
    if name in DECODERS:  # right: agrees with FP32's argmax; KL is taken against FP32's distribution
        reference_logp, right = log_softmax(right), np.ones(reference.shape, bool)
    results = [{"model": name, "toolkit": "FP32", "setting": "reference", "metric": metric, "right": right,
                "bytes": model_bytes(fp32)}]
    print(f"{name} FP32 {metric:.4f}", flush=True)
    for toolkit, setting, kind, options in candidates(name, methods, samples, iters, grids):
        out = folder / f"{name}.{re.sub(r'[^A-Za-z0-9]+', '_', setting)}.onnx"
        if kind == "skip":
            results.append({"model": name, "toolkit": toolkit, "setting": setting, "skipped": options["reason"]})
            print(format_row(results[-1]), flush=True)
            continue
        row = {"model": name, "toolkit": toolkit, "setting": setting, **run_child(kind, fp32, calib, out, options)}
        if "error" not in row:
            try:
                cmp = compare_models(fp32, out, data, batch_size=TIMING_BATCH, worst=0, repeats=TIMING_REPEATS,
                                     threads=TIMING_THREADS)
                metric, predicted, right = evaluate(out, name, data)
                if name in DECODERS:
                    logp = log_softmax(right)
                    right = predicted == reference
                    row["kl"] = float((np.exp(reference_logp) * (reference_logp - logp)).sum(-1).mean())
                row.update(metric=metric, right=right, changed=int((predicted != reference).sum()),
                           sqnr_db=cmp.outputs[0]["sqnr_db"], latency_ratio=cmp.latency_ratio, bytes=model_bytes(out))
            except Exception as exc:  # a model onnxruntime cannot load or run is a result too
                row["error"] = f"evaluation failed: {str(exc).splitlines()[0][:200]}"
        results.append(row)
        print(format_row(row), flush=True)
    return results


DECODER_COLUMNS = ("| model | toolkit | setting | perplexity | KL vs FP32 per token (nats) | argmax agreement with FP32 "
                   "| quantize time | peak RSS | latency ratio vs FP32 | file size | lm_head |")


def format_row(r: dict) -> str:
    metric = f"{r['metric']:.3f}" if "metric" in r else ""
    if "skipped" in r:
        return f"| {r['model']} | {r['toolkit']} | {r['setting']} | not made: {r['skipped']} |||||||"
    if r["model"] in DECODERS and "error" not in r:
        if r["toolkit"] == "FP32":
            return f"| {r['model']} | FP32 | reference | {metric} | 0 | 100% | | | | {r['bytes'] / 1024:.0f} KiB | float |"
        head = r.get("head", "float" if r["toolkit"] == "onnxflex" else "MatMulNBits as the rest")
        return (f"| {r['model']} | {r['toolkit']} | {r['setting']} | {metric} | {r['kl']:.4f} | "
                f"{100 * r['right'].mean():.1f}% | {r['seconds']:.1f} s | {r['peak_rss_mib']:.0f} MiB | "
                f"{r['latency_ratio']:.2f} | {r['bytes'] / 1024:.0f} KiB | {head} |")
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
    for name in dict.fromkeys(r["model"] for r in results if r["model"] not in LANGUAGE):
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


def short(row: dict) -> str:
    """A row's method: 'flexround', 'rtn', 'MatMulNBits GPTQ'."""
    return " ".join(row["setting"].split()[:2 if row["toolkit"] == "onnxruntime" else 1])


def setting_of(row: dict) -> str | None:
    """The DECODER_SETTINGS label of a decoder row ('W4 g32', ...), or None."""
    found = re.search(r"\bW\d g\d+\b", row["setting"])
    return found.group() if found else None


def paired_decoders(results: list[dict], learned: tuple[str, ...] = ("flexround", "signround")) -> list[str]:
    """Per decoder and setting: the best learned onnxflex row (lowest perplexity) against onnxflex rtn's
    best and against onnxruntime's best, on the eval tokens only one of the two agrees with FP32's argmax
    on (exact sign test)."""
    lines = []
    for name in dict.fromkeys(r["model"] for r in results if r["model"] in DECODERS):
        rows = [r for r in results if r["model"] == name and "metric" in r and r["toolkit"] != "FP32"]
        for label, _, _ in DECODER_SETTINGS:
            here = [r for r in rows if setting_of(r) == label]
            ours = [r for r in here if r["toolkit"] == "onnxflex" and r["setting"].split()[0] in learned]
            if not ours:
                if any(r["model"] == name and setting_of(r) == label for r in results):  # they failed
                    lines.append(f"- {name} {label}: no learned onnxflex row to pair (see the table).")
                continue
            best = min(ours, key=lambda r: r["metric"])
            text = f"- {name} {label}: {best['setting']} {best['metric']:.3f}"
            for title, peers in (("onnxflex rtn", [r for r in here if r["setting"].startswith("rtn ")]),
                                 ("onnxruntime", [r for r in here if r["toolkit"] == "onnxruntime"])):
                if not peers:
                    text += f"; no {title} row at {label}"
                    continue
                peer = min(peers, key=lambda r: r["metric"])
                wins, losses, p = paired_counts(best["right"], peer["right"])
                text += (f"; against {title}'s best, {peer['setting']} {peer['metric']:.3f} "
                         f"({best['metric'] - peer['metric']:+.3f}): {wins} tokens agree with FP32's argmax "
                         f"only for {short(best)}, {losses} only for {short(peer)}, exact sign test p = {p:.2g}")
            lines.append(text + ".")
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
            ("" if set(args.models) - set(DECODERS) <= set(BUNDLED) else
             " The standard architectures are trained briefly on the digits task (bench/make_standard_models.py: "
             "32×32 upsampled digits, one channel), not ImageNet weights.") + "\n")


def decoder_report(results: list[dict], args, seconds: float) -> str:
    from bench_memory import machine

    rows = [DECODER_COLUMNS, "|" + "---|" * 11] + [format_row(r) for r in results]
    iters = ("the method defaults (FlexRound 400 steps per block, SignRound 200)" if args.iters < 0
             else f"{args.iters} steps per block for the learned methods")
    return (f"`python bench/compare_peers.py --models {' '.join(m for m in args.models if m in DECODERS)} "
            f"--calib-samples {args.calib_samples} --iters {args.iters} --methods {' '.join(args.methods)} "
            f"--grids {' '.join(args.grids)}` ({seconds / 60:.0f} min in all). Machine: {machine()}.\n\n"
            "Weight-only quantization of the decoder trained here (models/decoder/make_decoder.py: `decoder`, "
            "exported by torch.onnx with past key/values; `decoder_genai`, the same checkpoint through "
            "onnxruntime-genai's model builder with GroupQueryAttention). Both toolkits calibrate on the first "
            f"{args.calib_samples} prompt windows of `models/decoder/decoder.calib.npz` (empty past); onnxflex "
            f"rows: `QuantConfig(wbits, abits=0, group_size, weight_grid, head_bits=wbits, "
            f"calib_samples={args.calib_samples}, verify_samples=0)` (the lm_head at the row's bits, like "
            f"onnxruntime's rows; onnxflex's default gives it 8), {iters}; `sym`/`asym` is onnxflex's `weight_grid` (symmetric, or asymmetric "
            "with zero points). onnxruntime rows: `MatMulNBitsQuantizer(bits, block_size=group, is_symmetric)` "
            "with its default round-to-nearest, `HQQWeightOnlyQuantConfig(block_size, bits)` (always with zero "
            "points) and `GPTQWeightOnlyQuantConfig` (its defaults, the calibration windows in batches of 16; it "
            "quantizes to 4 bits whatever `bits` says, so it has 4-bit rows only); onnxruntime's quantizer "
            "takes bits 2, 4 and 8, so it has no W3 rows. Perplexity (lower is better) is over the "
            "held-out text's next characters, every row by one full-sequence run per 64-character window "
            "without a cache (`models/decoder/decoder.eval.npz`, "
            f"{np.load(DECODER_DATA / 'decoder.eval.npz')['targets'].size} tokens); KL is KL(FP32 ‖ quantized) "
            "of the next-token distributions, averaged over those tokens; agreement is the share of them "
            "whose argmax matches FP32's. Quantize time and peak RSS are of a fresh child process per row. "
            f"Latency ratio: onnxruntime CPU, `onnxflex.compare` (median of {TIMING_REPEATS}), batch "
            f"{TIMING_BATCH} windows, {TIMING_THREADS} thread, quantized over FP32. lm_head: what the head's "
            "MatMul got in onnxflex's report (onnxruntime's quantizer treats it as every other MatMul)."
            + (f" {args.note}" if args.note else "") + "\n\n" + "\n".join(rows) +
            "\n\nPaired on the eval tokens (the learned row with the lowest perplexity at each setting):\n\n"
            + "\n".join(paired_decoders(results)) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(BUNDLED), choices=BUNDLED + STANDARD + tuple(DECODERS),
                        help="bundled models (models/), standard architectures (bench/.models/, written by "
                             "bench/make_standard_models.py) or the decoders (models/decoder/; own section)")
    parser.add_argument("--grids", nargs="+", default=["symmetric", "asymmetric"],
                        choices=["symmetric", "asymmetric"], help="onnxflex weight grids of the decoder rows")
    parser.add_argument("--methods", nargs="+", default=["rtn", "flexround"])
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--iters", type=int, default=-1,
                        help="reconstruction steps per block for the learned methods (-1 = each method's default)")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/onnxflex-peers"))
    parser.add_argument("--note", default="", help="a sentence about this run, written under the table's header")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()
    for name in args.models:  # fail before the first hour of work, not after it
        if name not in DECODERS:
            model_folder(name)
    args.dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results = [row for name in args.models for row in bench_model(name, args.methods, args.calib_samples, args.iters,
                                                           args.dir, args.grids)]
    classifiers = [r for r in results if r["model"] not in DECODERS]
    sections = []
    if classifiers:
        standard = not set(args.models) - set(DECODERS) <= set(BUNDLED)
        sections.append((HEADER + (": standard architectures" if standard else ""),
                         MARKER + ("-standard" if standard else ""),
                         report(classifiers, args, time.perf_counter() - started)))
    if len(classifiers) < len(results):
        sections.append((HEADER + ": decoders, weight-only", MARKER + "-decoders",
                         decoder_report([r for r in results if r["model"] in DECODERS], args,
                                        time.perf_counter() - started)))
    for header, marker, text in sections:
        print(text)
        if not args.no_write:
            write_block(header, marker, text)
    print(f"done in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
