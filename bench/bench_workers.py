"""Reconstruction over workers: wall time of ``--workers 1`` against ``--workers 2`` (local processes,
and a local Ray instance when Ray is installed) in fp block-input mode with a learned method, or
(``--block-input quantized``) with the blocks learning in order while the workers build the next
blocks' rounders.

    python bench/bench_workers.py [--model models/digits_cnn.onnx] [--calib FILE] [--method flexround]
                                  [--iters 200] [--block-input fp|quantized] [--options "--wbits 4 ..."]
                                  [--no-ray] [--note TEXT] [--no-write]

A quantized-input run writes its own section (``<!-- workers-quantized -->``).

Each run is ``onnxflex quantize`` in a fresh process (imports, worker start-up and, for Ray, the Ray
instance's start included); the emitted model's sha256 (with its external data, the data file's name
left out) must match the one-worker run's, else it exits 1.
Prints the table, and writes it into BENCHMARKS.md between ``<!-- workers -->`` markers unless
``--no-write`` (the 1-minute load average during the runs is written beside the numbers).
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from bench_memory import machine, write_block  # noqa: E402  (bench/ is not a package)

HEADER = "## Reconstruction over workers"
MARKER = "workers"


def digest(out: Path) -> str:
    """sha256 of the emitted model and its external data file, the data file's name left out of the
    model (each run writes its own)."""
    import onnx

    model = onnx.load(str(out), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = ""
    h = hashlib.sha256(model.SerializeToString(deterministic=True))
    for data in sorted(out.parent.glob(out.name + ".data")):
        h.update(data.read_bytes())
    return h.hexdigest()


def run(model: Path, out: Path, options: list[str]) -> float:
    """Seconds one ``onnxflex quantize`` of ``model`` to ``out`` with ``options`` takes."""
    cmd = [sys.executable, "-m", "onnxflex.cli", "quantize", str(model), "-o", str(out), "--quiet", *options]
    t = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr[-2000:]}")
    return seconds


def table(rows: list[tuple[str, float, str]], base: float, same: bool, args, load: tuple[float, float]) -> str:
    steps = f" {args.iters} steps per block" if args.method != "rtn" else ""
    lines = [f"`bench/bench_workers.py`: {Path(args.model).name}, {args.method}{steps}, "
             f"`--block-input {args.block_input}{' ' + args.options if args.options else ''}`; each run a fresh "
             f"`onnxflex quantize` (imports and worker start included). "
             f"Machine: {machine()}; 1-minute load {load[0]:.2f} before, {load[1]:.2f} after."
             + (f" {args.note}" if args.note else ""), "",
             "| workers | wall s | speed-up (1 worker's wall / this) | sha256 (first 16) |", "|---|---|---|---|"]
    for name, seconds, digest in rows:
        lines.append(f"| {name} | {seconds:.1f} | {base / seconds:.2f}x | `{digest[:16]}` |")
    lines += ["", "Every output byte-identical to one worker's: " + ("yes" if same else "**no**")]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "digits_cnn.onnx"))
    parser.add_argument("--method", default="flexround")
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--calib", default="", help="calibration file (default: the model's bundled data)")
    parser.add_argument("--block-input", choices=["fp", "quantized"], default="fp")
    parser.add_argument("--options", default="", help="more onnxflex quantize options, as one string")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray row even when Ray is installed")
    parser.add_argument("--note", default="")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()
    common = ["--block-input", args.block_input, "--method", args.method, "--seed", "1", "--device", "cpu",
              *(["--iters", str(args.iters)] if args.method != "rtn" else []),
              *(["--calib", args.calib] if args.calib else []), *args.options.split()]
    variants = [("1 (one process)", ["--workers", "1"]), ("2 local processes", ["--workers", "2"])]
    if not args.no_ray and importlib.util.find_spec("ray") is not None:
        variants.append(("2 Ray tasks (`--ray-address local`)", ["--workers", "2", "--ray-address", "local"]))
    load = [os.getloadavg()[0]]
    rows = []
    with tempfile.TemporaryDirectory(prefix="onnxflex-bench-workers-") as folder:
        for index, (name, options) in enumerate(variants):
            out = Path(folder) / f"out{index}.onnx"
            seconds = run(Path(args.model), out, common + options)
            rows.append((name, seconds, digest(out)))
            print(f"{name}: {seconds:.1f} s", flush=True)
    load.append(os.getloadavg()[0])
    same = len({digest for _, _, digest in rows}) == 1
    text = table(rows, rows[0][1], same, args, tuple(load))
    print(text)
    if not args.no_write:
        quantized = args.block_input == "quantized"
        write_block(HEADER + (": quantized block input" if quantized else ""),
                    MARKER + ("-quantized" if quantized else ""), text)
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
