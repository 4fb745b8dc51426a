"""Build the bundled decoder's onnxruntime-genai form: its ``hf/`` checkpoint through the genai model builder.

A build-time tool only: it needs ``onnxruntime-genai`` (0.18, which brings its own CPU onnxruntime and so
lives in a venv of its own, not onnxflex's); the tests only read the committed files. Run as

    python models/decoder/make_genai.py            # with that venv's python

which runs ``python -m onnxruntime_genai.models.builder -i hf -o genai -p fp32 -e cpu`` and checks the
result. Writes, into ``--out-dir`` (default: ``genai/`` beside this script):

- ``model.onnx`` (+ ``model.onnx.data``, the FP32 weights as external data): opset 22 plus com.microsoft.
  Inputs ``input_ids`` int64 [N, T], ``attention_mask`` int64 [N, P + T] and, per layer i,
  ``past_key_values.i.key`` / ``.value`` float32 [N, 2, P, 16]; outputs ``logits`` float32 [N, T, 128]
  and ``present.i.key`` / ``.value`` [N, 2, P + T, 16]. Ops: GroupQueryAttention (rotary inside, from
  the ``cos_cache``/``sin_cache`` initializers), SkipSimplifiedLayerNormalization (its fourth output
  is the residual stream), SimplifiedLayerNormalization, MatMul (the q/k/v projections as one).
- ``genai_config.json``, ``tokenizer.json``, ``tokenizer_config.json``: what onnxruntime-genai loads.

The check: the logits of the builder's model agree with ``decoder.onnx`` (the same weights) on
held-out windows, in one run and (one window at a time) 8 tokens after a past of 56.
"""

import argparse
import pathlib
import subprocess
import sys
import tempfile

import numpy as np
import onnxruntime as ort

HERE = pathlib.Path(__file__).resolve().parent
LAYERS, KV_HEADS, HEAD_DIM = 2, 2, 16


def build(out_dir: pathlib.Path) -> None:
    with tempfile.TemporaryDirectory() as cache:
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(HERE / "hf"),
                        "-o", str(out_dir), "-p", "fp32", "-e", "cpu", "-c", cache], check=True,
                       stdout=subprocess.DEVNULL)


def feeds(ids: np.ndarray, present: dict | None, past_len: int, position_ids: bool) -> dict:
    """Inputs for ``ids`` [N, T] after ``past_len`` tokens whose cache is ``present`` (by output name)."""
    n, t = ids.shape
    empty = np.zeros((n, KV_HEADS, 0, HEAD_DIM), np.float32)
    out = {"input_ids": ids, "attention_mask": np.ones((n, past_len + t), np.int64)}
    for layer in range(LAYERS):
        for kind in ("key", "value"):
            out[f"past_key_values.{layer}.{kind}"] = present[f"present.{layer}.{kind}"] if present else empty
    if position_ids:
        out["position_ids"] = np.broadcast_to(np.arange(past_len, past_len + t), (n, t)).copy()
    return out


def compare(out_dir: pathlib.Path) -> float:
    """Max |logits diff| vs decoder.onnx: 8 windows in one run, and their last 8 tokens after a past."""
    ids = np.load(HERE / "decoder.eval.npz")["input_ids"][:8]
    genai = ort.InferenceSession(str(out_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    plain = ort.InferenceSession(str(HERE / "decoder.onnx"), providers=["CPUExecutionProvider"])
    reference = plain.run(["logits"], feeds(ids, None, 0, True))[0]
    full = genai.run(["logits"], feeds(ids, None, 0, False))[0]
    names = [o.name for o in genai.get_outputs()]
    worst = float(np.abs(full - reference).max())
    for row in ids[:, None]:  # GroupQueryAttention takes several new tokens after a past at batch 1 only
        head = dict(zip(names, genai.run(names, feeds(row[:, :-8], None, 0, False))))
        stepped = genai.run(["logits"], feeds(row[:, -8:], head, row.shape[1] - 8, False))[0]
        worst = max(worst, float(np.abs(stepped - plain.run(["logits"], feeds(row, None, 0, True))[0][:, -8:]).max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=pathlib.Path, default=HERE / "genai",
                        help="where to write the files (default: genai/ beside this script)")
    args = parser.parse_args()
    build(args.out_dir)
    max_diff = compare(args.out_dir)
    print(f"builder model vs decoder.onnx: max |logits diff| {max_diff:.1e}")
    if max_diff > 1e-3:
        raise SystemExit(f"max |logits diff| {max_diff:.2e} > 1e-3")


if __name__ == "__main__":
    main()
