"""Train and export the bundled vision transformer on scikit-learn's digits.

Writes, into ``--out-dir`` (default: this script's folder):

- ``digits_vit.onnx``: FP32 model, opset 17. Input ``input`` float32 [N, 1, 16, 16], output
  ``logits`` float32 [N, 10]; ``N`` is a dynamic axis.
- ``digits_vit.calib.npz``: ``input`` float32 [256, 1, 16, 16], ``labels`` int64 [256].
- ``digits_vit.eval.npz``: ``input`` float32 [500, 1, 16, 16], ``labels`` int64 [500].

The data, split and preprocessing are the bundled CNN's (``make_digits_cnn.split``, same seed),
so both models are measured on the same eval images; ``mean`` and ``std`` are stored as there.

The model: 4x4 patches of the 16x16 image (a stride-4 Conv, 16 tokens of width 64), a class
token and learned position embeddings, four pre-LayerNorm encoder layers (4-head self-attention
with separate q/k/v projections, exact-GELU MLP of width 128, residual adds), a final
LayerNormalization and a Gemm head on the class token. The export holds LayerNormalization,
MatMul, Softmax, the Erf form of GELU, Expand/Concat for the class token and Shape/Gather chains.

The run is seeded, single-threaded and deterministic; it takes about 40 s on CPU.
"""

import argparse
import math
import pathlib
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn

from make_digits_cnn import shift, split  # the CNN's data, split and augmentation

WIDTH, HEADS, MLP_WIDTH, LAYERS, PATCH = 64, 4, 128, 4, 4
EPOCHS = 80
BATCH_SIZE = 64
MIN_EVAL_TOP1 = 0.95


class Attention(nn.Module):
    """Multi-head self-attention over [N, T, C]."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads, self.scale = heads, 1.0 / math.sqrt(width // heads)
        self.q, self.k, self.v = (nn.Linear(width, width) for _ in range(3))
        self.out = nn.Linear(width, width)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        return x.reshape(n, t, self.heads, c // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        q, k, v = self.split_heads(self.q(x)), self.split_heads(self.k(x)), self.split_heads(self.v(x))
        scores = (q @ k.transpose(2, 3)) * self.scale
        y = torch.softmax(scores, dim=-1) @ v
        return self.out(y.transpose(1, 2).reshape(n, t, c))


class EncoderLayer(nn.Module):
    """x + attn(ln1(x)), then + mlp(ln2(x)): one residual-stream block."""

    def __init__(self, width: int, heads: int, mlp_width: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_width), nn.GELU(), nn.Linear(mlp_width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class DigitsViT(nn.Module):
    """[N, 1, 16, 16] -> logits [N, 10]."""

    def __init__(self):
        super().__init__()
        tokens = (16 // PATCH) ** 2
        self.patch = nn.Conv2d(1, WIDTH, PATCH, stride=PATCH)
        self.cls = nn.Parameter(torch.zeros(1, 1, WIDTH))
        self.pos = nn.Parameter(0.02 * torch.randn(1, tokens + 1, WIDTH))
        self.layers = nn.Sequential(*(EncoderLayer(WIDTH, HEADS, MLP_WIDTH) for _ in range(LAYERS)))
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        return self.head(self.norm(self.layers(x))[:, 0])


def train(model: nn.Module, x: np.ndarray, y: np.ndarray) -> None:
    """AdamW with warmup + cosine schedule, label smoothing and shift augmentation; mutates ``model``."""
    x_t, y_t = torch.from_numpy(x), torch.from_numpy(y)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    steps = EPOCHS * ((len(x) + BATCH_SIZE - 1) // BATCH_SIZE)
    warmup = steps // 20
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * s / steps))))
    model.train()
    for _ in range(EPOCHS):
        for idx in torch.randperm(len(x)).split(BATCH_SIZE):
            loss = F.cross_entropy(model(shift(x_t[idx])), y_t[idx], label_smoothing=0.1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()


def export(model: nn.Module, path: pathlib.Path) -> onnx.ModelProto:
    """Export with the TorchScript-based exporter (standard ops, offline); returns the checked model."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model, (torch.zeros(2, 1, 16, 16),), str(path), dynamo=False, opset_version=17,
            input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
    proto = onnx.load(str(path))
    # onnx 1.23 stamps IR 14, which onnxruntime 1.31 refuses; use the minimum for the opset.
    proto.ir_version = onnx.helper.find_min_ir_version_for(proto.opset_import)
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))
    return proto


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=pathlib.Path, default=pathlib.Path(__file__).parent,
                        help="where to write the files (default: this script's folder)")
    parser.add_argument("--seed", type=int, default=0, help="seed for split, init, training")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # bit-identical training, hence identical ONNX bytes

    data, mean, std = split(args.seed)
    model = DigitsViT()
    train(model, *data["train"])

    args.out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = args.out_dir / "digits_vit.onnx"
    proto = export(model, onnx_path)
    ops = {node.op_type for node in proto.graph.node}
    missing = {"LayerNormalization", "Softmax", "Erf", "MatMul"} - ops
    if missing:
        raise SystemExit(f"the export lacks {sorted(missing)}; expected standard transformer ops")
    for name in ("calib", "eval"):
        x, y = data[name]
        np.savez(args.out_dir / f"digits_vit.{name}.npz", input=x, labels=y, mean=mean, std=std)

    x_eval, y_eval = data["eval"]
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {"input": x_eval})[0]
    with torch.no_grad():
        reference = model(torch.from_numpy(x_eval)).numpy()
    max_diff = float(np.abs(logits - reference).max())
    if max_diff > 1e-4:
        raise SystemExit(f"onnxruntime vs eval-mode torch: max |diff| {max_diff:.2e} > 1e-4")
    top1 = float((logits.argmax(1) == y_eval).mean())
    print(f"FP32 eval top-1 (onnxruntime, {len(y_eval)} samples): {top1:.4f}; "
          f"max |ort - torch| {max_diff:.1e}; {len(proto.graph.node)} nodes")
    if top1 < MIN_EVAL_TOP1:
        raise SystemExit(f"eval top-1 {top1:.4f} < {MIN_EVAL_TOP1}; train longer (EPOCHS)")


if __name__ == "__main__":
    main()
