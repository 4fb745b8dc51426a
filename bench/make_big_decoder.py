"""A Llama-style decoder with past key/values, the form of models/decoder/decoder.onnx at a size of
choice, random init (its weights' values do not matter to a memory benchmark), written with every
weight as external data, and prompt-shaped calibration windows of random tokens.

    python bench/make_big_decoder.py OUT_DIR [--width 1024 --layers 32 --heads 16 --kv-heads 8
                                              --mlp-width 2816 --samples 8 --seq-len 64]

Needs the ``decoder`` extra (transformers). Writes OUT_DIR/decoder.onnx (+ decoder.onnx.data) and
OUT_DIR/decoder.calib.npz. The default is 1.44 GiB of float32 weights: 32 layers of 11.8 M weights.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "models" / "decoder"))
sys.path.insert(0, str(ROOT / "models"))

SIZES = {"width": 1024, "layers": 32, "heads": 16, "kv_heads": 8, "mlp_width": 2816}


def build(folder: Path, samples: int = 8, seq_len: int = 64, seed: int = 0, **sizes) -> Path:
    """Exports the decoder of ``sizes`` (SIZES by default) into ``folder``; returns the model's path."""
    import onnx
    import torch
    from make_decoder import VOCAB, build_model, export, prompt_feeds

    sizes = {**SIZES, **sizes}
    torch.manual_seed(seed)
    model = build_model(**sizes).eval()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "decoder.onnx"
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        traced = Path(scratch) / "decoder.onnx"
        export(model, traced, check=False)
        del model
        proto = onnx.load(str(traced))  # torch writes one file below 2 GB: every weight goes external
        onnx.save(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location="decoder.onnx.data", size_threshold=1024)
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB, (samples, seq_len), dtype=np.int64)
    head_dim = sizes["width"] // sizes["heads"]
    np.savez(folder / "decoder.calib.npz", **prompt_feeds(ids, sizes["layers"], sizes["kv_heads"], head_dim))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    for name, value in SIZES.items():
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=value)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    args = parser.parse_args()
    sizes = {k: getattr(args, k) for k in SIZES}
    path = build(args.out_dir, args.samples, args.seq_len, **sizes)
    size = sum(p.stat().st_size for p in args.out_dir.glob("decoder.onnx*"))
    print(f"wrote {path} ({size / 2**30:.2f} GiB with its data)")


if __name__ == "__main__":
    main()
