"""Where onnxruntime spends a model's time: per-op-type milliseconds of the optimized graph, one thread.

    python bench/profile_ort.py model.onnx [other.onnx ...] --data eval.npz [--batch 1] [--runs 50] [--save-optimized DIR]

For each model: the op types of the graph onnxruntime runs after its optimizer (QLinearConv where a
DQ → Conv → Q was fused; a DequantizeLinear or QuantizeLinear left over is a float island), and the time
each op type took, summed over ``--runs`` runs from onnxruntime's profiler and divided by the run
count. Models are profiled one after another on the same input (the first ``--batch`` samples of
``--data``, or zeros of the declared shapes), so compare them within one call.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile

import numpy as np
import onnx

ORT_TYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32,
             "tensor(uint8)": np.uint8, "tensor(float16)": np.float16}
WARMUP = 5


def feed_for(session, data: str | None, batch: int) -> dict[str, np.ndarray]:
    """The first ``batch`` samples of ``data`` (an .npz keyed by input name), else zeros of the declared
    shapes (batch 1 where a dimension is symbolic)."""
    if data:
        arrays = np.load(data)
        return {i.name: arrays[i.name][:batch] for i in session.get_inputs()}
    return {i.name: np.zeros([d if isinstance(d, int) else 1 for d in i.shape], ORT_TYPES[i.type])
            for i in session.get_inputs()}


def profile(path: str, data: str | None, batch: int, runs: int, optimized: str | None) -> dict:
    """{'nodes': op type → count in the optimized graph, 'ms': op type → milliseconds per run}."""
    import onnxruntime as ort

    work = tempfile.mkdtemp(prefix="profile_ort_")
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    so.optimized_model_filepath = optimized or os.path.join(work, "optimized.onnx")
    session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    feed = feed_for(session, data, batch)
    graph = onnx.load(so.optimized_model_filepath, load_external_data=False).graph
    nodes = collections.Counter(n.op_type for n in graph.node)
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    so.enable_profiling = True
    so.profile_file_prefix = os.path.join(work, "trace")
    session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    for _ in range(WARMUP + runs):
        session.run(None, feed)
    with open(session.end_profiling()) as f:
        events = json.load(f)
    # the warm-up runs are profiled too: count only kernels that start after the last warm-up run ends
    runs_at = sorted(e["ts"] + e["dur"] for e in events if e.get("name") == "model_run")
    after = runs_at[WARMUP - 1]
    ms: collections.Counter = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and event["ts"] >= after:
            ms[event.get("args", {}).get("op_name", "?")] += event["dur"] / 1e3
    return {"nodes": dict(nodes), "ms": {k: v / runs for k, v in ms.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--data", help="an .npz of inputs keyed by input name (first sample used)")
    parser.add_argument("--batch", type=int, default=1, help="samples of --data per run")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--save-optimized", help="write each optimized graph to this folder")
    args = parser.parse_args()
    results = {}
    for path in args.models:
        optimized = None
        if args.save_optimized:
            os.makedirs(args.save_optimized, exist_ok=True)
            optimized = os.path.join(args.save_optimized, os.path.basename(path) + ".optimized.onnx")
        results[path] = profile(path, args.data, args.batch, args.runs, optimized)
    for path, r in results.items():
        total = sum(r["ms"].values())
        print(f"\n{path}: {total:.3f} ms per run in kernels, {sum(r['nodes'].values())} nodes")
        for op, t in sorted(r["ms"].items(), key=lambda kv: -kv[1]):
            print(f"  {op:28s} {r['nodes'].get(op, 0):4d} nodes {t:8.3f} ms")


if __name__ == "__main__":
    main()
