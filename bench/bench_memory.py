"""Peak memory and time of quantize runs, each measured in a child process.

    python bench/bench_memory.py big   [--dir /tmp/onnxflex-big]     # a >2 GB model with external data
    python bench/bench_memory.py samples [--dir /tmp/onnxflex-samples] [--counts 128 512 2048]
    python bench/bench_memory.py decoder [--dir /tmp/onnxflex-decoder] [--limit-mb 1024]

``big`` builds (bench/make_big_model.py) a stack of 10 MatMul layers of 8192x8192 float32 (2.5 GiB,
external data) and quantizes it W8A8 with round-to-nearest on 16 samples. ``samples`` builds a conv net
on 3x32x32 images whose activations are large next to its weights and quantizes it with FlexRound and
--max-cache-mb 32 (so the capture spills to disk) for each sample count. ``decoder`` builds
(bench/make_big_decoder.py) a 1.44 GiB Llama-style decoder with past key/values (external data) and
quantizes it W4 g32 weight-only under a memory limit of ``--limit-mb``, enforced with a memory cgroup
where the machine lets this process make one (the child is killed if it goes over), else only
measured. Peak RSS is the child's ru_maxrss (from os.wait4). Each prints a table and writes it into
BENCHMARKS.md under "## Memory and scale".
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

CHILD = """
import json, sys, time
import onnxflex
from onnxflex.config import QuantConfig
model, calib, out, options = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
t0 = time.perf_counter()
result = onnxflex.quantize(model, calib, QuantConfig(**options), progress=False)
result.save(out)
print(json.dumps({"seconds": time.perf_counter() - t0, "timings": result.report["timings"],
                  "verification": result.report["verification"].get("quantized_vs_fp32_sqnr_db")}))
"""


def measure(model: Path, calib: Path, out: Path, options: dict, cgroup: Path | None = None) -> dict:
    """Runs one quantize in a fresh child process (in the memory cgroup ``cgroup`` when given); returns
    its report figures and the child's own peak RSS in MiB (os.wait4 gives that child's rusage alone)."""
    def enter() -> None:
        (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    with tempfile.TemporaryFile("w+") as errors:
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(model), str(calib), str(out), json.dumps(options)],
                                stdout=subprocess.PIPE, stderr=errors, text=True,
                                preexec_fn=enter if cgroup else None)
        stdout = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        errors.seek(0)
        stderr = errors.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        killed = " (killed: over the memory limit)" if proc.returncode == -9 and cgroup else ""
        raise SystemExit(f"quantize failed{killed}, exit {proc.returncode}:\n{stderr[-4000:]}")
    figures = json.loads(stdout.strip().splitlines()[-1])
    figures["peak_rss_mib"] = usage.ru_maxrss / 1024
    return figures


def sign_test_p(wins: int, losses: int) -> float:
    """Two-sided exact sign test (McNemar) on the items exactly one of two models gets right."""
    n = wins + losses
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_counts(ours: np.ndarray, theirs: np.ndarray) -> tuple[int, int, float]:
    """(items only ``ours`` gets right, items only ``theirs`` does, sign_test_p of the two) for two
    boolean arrays over the same items."""
    wins, losses = int((ours & ~theirs).sum()), int((theirs & ~ours).sum())
    return wins, losses, sign_test_p(wins, losses)


def machine() -> str:
    import onnx
    import onnxruntime
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
               if line.startswith("MemTotal"))
    return (f"{cpu}, {os.cpu_count()} cores, {mem / 2**20:.0f} GiB RAM; Python {platform.python_version()}, "
            f"onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}, torch {torch.__version__}, "
            f"numpy {np.__version__}")


def bench_big(folder: Path) -> str:
    from make_big_model import build

    model = folder / "big.onnx"
    if not model.exists():
        build(folder, layers=10, width=8192, samples=16)
    size = sum(p.stat().st_size for p in folder.glob("big.onnx*"))
    options = {"method": "rtn", "wbits": 8, "abits": 8, "verify_samples": 4}
    r = measure(model, folder / "big.calib.npz", folder / "out" / "big.q.onnx", options)
    out_size = sum(p.stat().st_size for p in (folder / "out").glob("big.q.onnx*"))
    ratio = r["peak_rss_mib"] * 2**20 / size
    rows = [
        "| model | size on disk | output size | peak RSS | peak RSS / model size | wall time |",
        "|---|---|---|---|---|---|",
        f"| 10 x MatMul 8192x8192 fp32, external data | {size / 2**30:.2f} GiB | {out_size / 2**30:.2f} GiB | "
        f"{r['peak_rss_mib'] / 1024:.2f} GiB | {ratio:.2f} | {r['seconds']:.0f} s |",
    ]
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in r["timings"].items() if k != "total")
    text = ("### A model over 2 GB (external data)\n\n"
            "`python bench/bench_memory.py big`: W8A8 round-to-nearest, 16 calibration samples (4 held out), "
            "output written with external data.\n\n" + "\n".join(rows) +
            f"\n\nStages: {stages}. SQNR vs FP32 on the held-out samples: "
            f"{', '.join(f'{v:.1f} dB' for v in (r['verification'] or {}).values())}.\n")
    print(text)
    return text


def memory_cgroup(limit_mb: int) -> Path | None:
    """A new memory cgroup (v2, else v1) limited to ``limit_mb`` MiB with no swap, or None when this
    machine does not let the process make one."""
    name = f"onnxflex-bench-{os.getpid()}"
    kinds = []
    if Path("/sys/fs/cgroup/cgroup.controllers").exists():
        kinds.append((Path("/sys/fs/cgroup"), "memory.max", "memory.swap.max", "0"))
    if Path("/sys/fs/cgroup/memory").is_dir():
        kinds.append((Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes", "memory.memsw.limit_in_bytes",
                      str(limit_mb << 20)))  # v1: RAM + swap at the RAM limit, so no swap
    for root, limit, swap, no_swap in kinds:
        group = root / name
        try:
            group.mkdir()
            (group / limit).write_text(str(limit_mb << 20))
        except OSError:
            if group.is_dir():
                group.rmdir()
            continue
        try:
            (group / swap).write_text(no_swap)
        except OSError:
            pass  # no swap accounting: the limit holds for RAM
        return group
    return None


def bench_decoder(folder: Path, limit_mb: int, method: str = "rtn", iters: int = 4) -> str:
    """W4 g32 of the big decoder under ``limit_mb``; a learned ``method`` takes ``iters`` steps of 2
    windows per block (a memory check of learning at this size, not a quality run)."""
    from make_big_decoder import SIZES, build

    model = folder / "decoder.onnx"
    if not model.exists():
        build(folder)
    size = sum(p.stat().st_size for p in folder.glob("decoder.onnx*"))
    options = {"method": method, "wbits": 4, "abits": 0, "group_size": 32, "verify_samples": 2,
               "max_cache_mb": 128}
    if method != "rtn":
        options.update(iters=iters, batch_size=2, early_stop=0, step_budget=0.0, preset="fast")
    group = memory_cgroup(limit_mb)
    try:
        r = measure(model, folder / "decoder.calib.npz", folder / "out" / "decoder.q.onnx", options, group)
    finally:
        if group:
            group.rmdir()
    out_size = sum(p.stat().st_size for p in (folder / "out").glob("decoder.q.onnx*"))
    learned = "round-to-nearest" if method == "rtn" else f"{method}, {iters} steps of 2 windows per block"
    enforced = "enforced by a memory cgroup (no swap)" if group else \
        "not enforced (no memory cgroup could be made here): measured only"
    rows = [
        "| model | method | size on disk | output size | memory limit | peak RSS | peak RSS / model size | wall time |",
        "|---|---|---|---|---|---|---|---|",
        f"| decoder {SIZES['layers']} layers, width {SIZES['width']}, MLP {SIZES['mlp_width']}, fp32 external data "
        f"| {learned} | {size / 2**30:.2f} GiB | {out_size / 2**30:.2f} GiB | {limit_mb} MiB | {r['peak_rss_mib']:.0f} MiB | "
        f"{r['peak_rss_mib'] * 2**20 / size:.2f} | {r['seconds']:.0f} s |",
    ]
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in r["timings"].items() if k != "total")
    command = "decoder" if method == "rtn" else f"decoder --method {method} --iters {iters}"
    text = (f"### A decoder larger than its memory limit: {learned}\n\n"
            f"`python bench/bench_memory.py {command}`: W4 g32 weight-only, {learned} (lm_head 8-bit), 8 "
            f"calibration windows of 64 tokens (2 held out), `--max-cache-mb {options['max_cache_mb']}`; the limit "
            f"is {enforced}. Peak RSS counts the model's mapped weight pages that onnxruntime touched.\n\n"
            + "\n".join(rows) + f"\n\nStages: {stages}.\n")
    print(text)
    return text


def bench_samples(folder: Path, counts: list[int]) -> str:
    from make_conv_model import CAPTURED_BYTES_PER_SAMPLE, build_conv

    folder.mkdir(parents=True, exist_ok=True)
    model = build_conv(folder / "conv.onnx")
    rng = np.random.default_rng(0)
    options = {"method": "flexround", "iters": 20, "batch_size": 32, "max_cache_mb": 32, "verify_samples": 32}
    rows = ["| calibration samples | captured tensors | peak RSS | wall time |", "|---|---|---|---|"]
    peaks = []
    for n in counts:
        calib = folder / f"calib{n}.npz"
        np.savez(calib, x=rng.standard_normal((n, 3, 32, 32), dtype=np.float32))
        r = measure(model, calib, folder / f"conv{n}.q.onnx", options)
        peaks.append(r["peak_rss_mib"])
        captured = n * CAPTURED_BYTES_PER_SAMPLE / 2**20
        rows.append(f"| {n} | {captured:.0f} MiB | {r['peak_rss_mib']:.0f} MiB | {r['seconds']:.0f} s |")
        print(rows[-1], flush=True)
    spread = (max(peaks) - min(peaks)) / min(peaks) * 100
    text = ("### Peak memory against the number of calibration samples\n\n"
            f"`python bench/bench_memory.py samples`: a 6-conv net on 3x32x32 inputs (bench/make_conv_model.py), "
            f"FlexRound {options['iters']} iterations per block, `--max-cache-mb {options['max_cache_mb']}`, "
            f"{options['verify_samples']} samples held out.\n\n" + "\n".join(rows) +
            f"\n\nLargest peak is {spread:.1f} % above the smallest.\n")
    print(text)
    return text


def replace_block(doc: str, key: str, text: str) -> str | None:
    """``doc`` with the block between its ``<!-- key -->`` markers replaced by ``text``; None when absent."""
    start, end = f"<!-- {key} -->", f"<!-- /{key} -->"
    if start not in doc:
        return None
    block = f"{start}\n{text.rstrip()}\n{end}"
    return re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: block, doc, flags=re.S)


def write_block(header: str, key: str, text: str) -> None:
    """Replaces the block ``key`` in BENCHMARKS.md, or appends ``header`` and the block (creating the file)."""
    path = ROOT / "BENCHMARKS.md"
    doc = path.read_text() if path.exists() else "# onnxflex benchmarks\n"
    replaced = replace_block(doc, key, text)
    if replaced is None:
        replaced = doc.rstrip("\n") + f"\n\n{header}\n\n<!-- {key} -->\n{text.rstrip()}\n<!-- /{key} -->\n"
    path.write_text(replaced)


def write_section(key: str, text: str) -> None:
    """Replaces this benchmark's subsection of '## Memory and scale' in BENCHMARKS.md (creating both)."""
    path = ROOT / "BENCHMARKS.md"
    doc = path.read_text() if path.exists() else "# onnxflex benchmarks\n"
    header = "## Memory and scale"
    if header not in doc:
        doc = doc.rstrip("\n") + f"\n\n{header}\n\nMachine: {machine()}.\n"
    replaced = replace_block(doc, key, text)
    if replaced is None:
        section_end = doc.find("\n## ", doc.index(header) + len(header))
        insert = len(doc) if section_end < 0 else section_end
        replaced = doc[:insert].rstrip("\n") + f"\n\n<!-- {key} -->\n{text.rstrip()}\n<!-- /{key} -->\n" + doc[insert:]
    doc = re.sub(r"Machine: .*?\.\n", lambda _: f"Machine: {machine()}.\n", replaced, count=1)
    path.write_text(doc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("which", choices=["big", "samples", "decoder"])
    parser.add_argument("--limit-mb", type=int, default=1024, help="decoder: the memory limit of the run")
    parser.add_argument("--method", default="rtn", help="decoder: rtn, or a learned method (flexround, signround)")
    parser.add_argument("--iters", type=int, default=4, help="decoder: a learned method's steps per block")
    parser.add_argument("--dir", type=Path)
    parser.add_argument("--counts", type=int, nargs="+", default=[128, 512, 2048])
    args = parser.parse_args()
    started = time.perf_counter()
    if args.which == "big":
        text = bench_big(args.dir or Path("/tmp/onnxflex-big"))
    elif args.which == "decoder":
        text = bench_decoder(args.dir or Path("/tmp/onnxflex-decoder"), args.limit_mb, args.method, args.iters)
    else:
        text = bench_samples(args.dir or Path("/tmp/onnxflex-samples"), args.counts)
    write_section(args.which if args.method == "rtn" else f"{args.which}-{args.method}", text)
    print(f"done in {time.perf_counter() - started:.0f} s; results in BENCHMARKS.md")


if __name__ == "__main__":
    main()
