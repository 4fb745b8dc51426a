"""Where onnxruntime spends a model's time: per-op-type milliseconds of the optimized graph, one thread.

    python bench/profile_ort.py model.onnx [other.onnx ...] --data eval.npz [--batch 1] [--runs 50] [--save-optimized DIR]

For each model: the op types of the graph onnxruntime runs after its optimizer (QLinearConv where a
DQ → Conv → Q was fused; a DequantizeLinear or QuantizeLinear left over is a float island), and the time
each op type took per run (from onnxruntime's profiler; the median over ``--runs`` runs). The models
run in rounds, each once per round, on the same input (the first ``--batch`` samples of ``--data``,
or zeros of the declared shapes), so that load on a shared machine falls on all of them alike:
compare them within one call.
"""
from __future__ import annotations

import argparse
import bisect
import collections
import json
import os
import tempfile

import numpy as np
import onnx

ORT_TYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32,
             "tensor(uint8)": np.uint8, "tensor(float16)": np.float16}
WARMUP = 5
TOTAL = "(all kernels)"


def feed_for(session, data: str | None, batch: int) -> dict[str, np.ndarray]:
    """The first ``batch`` samples of ``data`` (an .npz keyed by input name), else zeros of the declared
    shapes (batch 1 where a dimension is symbolic)."""
    if data:
        arrays = np.load(data)
        return {i.name: arrays[i.name][:batch] for i in session.get_inputs()}
    return {i.name: np.zeros([d if isinstance(d, int) else 1 for d in i.shape], ORT_TYPES[i.type])
            for i in session.get_inputs()}


def _options(**settings):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    for name, value in settings.items():
        setattr(so, name, value)
    return so


def optimized_ops(path: str, optimized: str) -> collections.Counter:
    """Op type → count in the graph onnxruntime runs for ``path`` (written to ``optimized``)."""
    import onnxruntime as ort

    ort.InferenceSession(path, _options(optimized_model_filepath=optimized), providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(optimized, load_external_data=False).graph.node)


def per_run_ms(events: list[dict]) -> list[collections.Counter]:
    """Op type → kernel milliseconds, for each run (``model_run`` span) of one session's trace, in order."""
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")
    runs = [collections.Counter() for _ in spans]
    starts = [a for a, _ in spans]
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            k = bisect.bisect_right(starts, event["ts"]) - 1
            if k >= 0:
                runs[k][event.get("args", {}).get("op_name", "?")] += event["dur"] / 1e3
    return runs


def profile(paths: list[str], feed: dict[str, np.ndarray], runs: int) -> list[dict[str, float]]:
    """Op type → median kernel milliseconds per run, for each model of ``paths``. Every round runs each
    model once, so that load on the machine falls on all of them alike; WARMUP rounds are dropped."""
    import onnxruntime as ort

    work = tempfile.mkdtemp(prefix="profile_ort_")
    sessions = [ort.InferenceSession(p, _options(enable_profiling=True,
                                                 profile_file_prefix=os.path.join(work, f"trace{k}")),
                                     providers=["CPUExecutionProvider"]) for k, p in enumerate(paths)]
    for _ in range(WARMUP + runs):
        for session in sessions:
            session.run(None, feed)
    out = []
    for session in sessions:
        with open(session.end_profiling()) as f:
            timed = per_run_ms(json.load(f))[WARMUP:]
        ops = set().union(*timed)
        out.append({op: float(np.median([r[op] for r in timed])) for op in ops}
                   | {TOTAL: float(np.median([sum(r.values()) for r in timed]))})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--data", help="an .npz of inputs keyed by input name (its first --batch samples are used)")
    parser.add_argument("--batch", type=int, default=1, help="samples of --data per run")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--save-optimized", help="write each optimized graph to this folder")
    args = parser.parse_args()
    import onnxruntime as ort

    first = ort.InferenceSession(args.models[0], _options(), providers=["CPUExecutionProvider"])
    feed = feed_for(first, args.data, args.batch)
    work = args.save_optimized or tempfile.mkdtemp(prefix="profile_ort_")
    os.makedirs(work, exist_ok=True)
    nodes = [optimized_ops(p, os.path.join(work, os.path.basename(p) + ".optimized.onnx")) for p in args.models]
    for path, count, ms in zip(args.models, nodes, profile(args.models, feed, args.runs)):
        print(f"\n{path}: {ms.pop(TOTAL):.3f} ms per run in kernels (median), {sum(count.values())} nodes")
        for op, t in sorted(ms.items(), key=lambda kv: -kv[1]):
            print(f"  {op:28s} {count.get(op, 0):4d} nodes {t:8.3f} ms")


if __name__ == "__main__":
    main()
