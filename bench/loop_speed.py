"""Reconstruction loop speed against its arithmetic: per block, forward+backward FLOPs per sample, the
wall time per optimisation step, the machine's measured FLOP rate, and their ratio.

    python bench/loop_speed.py MODEL [--method flexround] [--iters 40] [--batch-size 32] [--cpu-time]
                               [--input-shape x:1x3x48x192] [--calib FILE.npz] [--no-write] [-- quantize args]

One quantize runs in this process with ``reconstruct.train`` wrapped: before a block trains, one
forward of the block on a batch of its quantized inputs runs under torch's FlopCounterMode (it counts
the convolutions' and matrix products' FLOPs from their shapes, 2 per multiply-add); forward+backward
is taken as 3x the forward. The step time is the training loop's seconds over its steps. The machine's
FLOP rate is onnxflex.budget.measure_rate (a float32 matmul microbenchmark, the rate the step budget's
--time-budget uses), measured in the same run at the thread count the loop uses. ratio = step time /
(FLOPs per step / FLOP rate): 1 would be a loop that does nothing but its arithmetic at that rate.

``--cpu-time`` runs torch at one thread and times each block's loop by this process's CPU time
(time.process_time) instead of wall time: on a machine whose cores other work shares, wall time counts
the waits for a core, CPU time only the loop's own work (at one thread they are the same when idle).

Writes a section between ``<!-- loop-speed -->`` markers into BENCHMARKS.md (one block per model
name; ``--no-write`` prints only).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from bench_memory import machine, write_block  # noqa: E402  (bench/ is not a package)

HEADER = "## Reconstruction loop against its FLOPs"
BIG = 10e6  # FLOP per sample from which the must-show target (ratio <= 3) applies


def flop_rate(threads: int, repeats: int = 5) -> float:
    """FLOP/s with ``threads`` torch threads: budget.measure_rate (the rate ``--time-budget`` converts
    minutes with), run for about ``repeats`` × its default time."""
    from onnxflex.budget import RATE_SECONDS, measure_rate
    from onnxflex.device import torch_threads

    with torch_threads(threads):
        return measure_rate("cpu", RATE_SECONDS * repeats)


def block_kind(block) -> str:
    ops = sorted({layer.op_type for layer in block.layers}) or ["no layer"]
    return f"{'+'.join(ops)} x{len(block.layers)}"


def instrument(records: list[dict], clock=time.perf_counter):
    """Wraps reconstruct.train so that each block's FLOPs, steps and loop seconds (by ``clock``) land in
    ``records``."""
    import onnxflex.rounding.reconstruct as rec

    train = rec.train

    def timed(module, data, config, seed, progress):
        batch = min(config.batch_size, data.num_samples)
        idx = torch.arange(batch, device=data.device)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            data.run(module, {k: v[idx] for k, v in data.q_inputs.items()})
        t = clock()
        steps = train(module, data, config, seed, progress)
        seconds = clock() - t
        records.append({"block": module.block.name, "kind": block_kind(module.block), "steps": steps,
                        "seconds": seconds, "threads": torch.get_num_threads(),
                        "flops": 3 * counter.get_total_flops() / batch, "batch": batch})
        return steps

    rec.train = timed
    return lambda: setattr(rec, "train", train)


def table(records: list[dict], rate: float) -> str:
    rows = ["| block kind | blocks | MFLOP/sample (fwd+bwd) | step ms | FLOP-time ms | ratio (median, max) |",
            "|---|---|---|---|---|---|"]
    kinds: dict[str, list[dict]] = {}
    for r in records:
        if r["steps"]:
            kinds.setdefault(r["kind"], []).append(r)
    for kind, rs in sorted(kinds.items(), key=lambda kv: -max(r["flops"] for r in kv[1])):
        ratios = [ratio(r, rate) for r in rs]
        rows.append(f"| {kind} | {len(rs)} | {statistics.median(r['flops'] for r in rs) / 1e6:.1f} | "
                    f"{statistics.median(step_ms(r) for r in rs):.1f} | "
                    f"{statistics.median(r['flops'] * r['batch'] / rate * 1e3 for r in rs):.2f} | "
                    f"{statistics.median(ratios):.1f}, {max(ratios):.1f} |")
    return "\n".join(rows)


def step_ms(r: dict) -> float:
    return r["seconds"] / r["steps"] * 1e3


def ratio(r: dict, rate: float) -> float:
    return step_ms(r) / (r["flops"] * r["batch"] / rate * 1e3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--method", default="flexround")
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--cpu-time", action="store_true",
                        help="torch at one thread, each loop timed by process CPU time (for a shared machine)")
    parser.add_argument("--no-write", action="store_true")
    args, extra = parser.parse_known_args()
    from onnxflex.cli import main as cli

    if args.cpu_time:
        torch.set_num_threads(1)
    records: list[dict] = []
    undo = instrument(records, time.process_time if args.cpu_time else time.perf_counter)
    command = ["quantize", args.model, "--method", args.method, "--iters", str(args.iters), "--batch-size",
               str(args.batch_size), "--early-stop", "0", "--seed", "0", "--quiet",
               "-o", "/tmp/loop_speed.q.onnx", *[e for e in extra if e != "--"]]
    t = time.perf_counter()
    try:
        cli.main(command, standalone_mode=False)
    finally:
        undo()
    wall = time.perf_counter() - t
    threads = max((r["threads"] for r in records), default=1)
    rate = flop_rate(threads)
    big = [ratio(r, rate) for r in records if r["steps"] and r["flops"] >= BIG]
    text = (f"`python bench/loop_speed.py {' '.join(sys.argv[1:])}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}); "
            f"machine: {machine()}; measured rate {rate / 1e9:.1f} GFLOP/s at {threads} thread(s); step times "
            f"by {'process CPU' if args.cpu_time else 'wall'} time; quantize wall {wall:.0f} s.\n\n{table(records, rate)}\n\n"
            f"Blocks of at least {BIG / 1e6:.0f} MFLOP/sample: {len(big)}, ratio median "
            f"{statistics.median(big) if big else float('nan'):.1f}, max {max(big) if big else float('nan'):.1f} "
            "(target: at most 3).\n")
    print(text)
    if not args.no_write:
        write_block(HEADER, f"loop-speed-{Path(args.model).stem}", text)


if __name__ == "__main__":
    main()
