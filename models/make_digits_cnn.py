"""Train and export the bundled residual CNN on scikit-learn's digits.

Writes, into ``--out-dir`` (default: this script's folder):

- ``digits_cnn.onnx``: FP32 model, opset 13. Input ``input`` float32 [N, 1, 16, 16],
  output ``logits`` float32 [N, 10]; ``N`` is a dynamic axis. BatchNormalization
  nodes are kept unfolded so that onnxflex's BN-folding pass has work to do.
- ``digits_cnn.calib.npz``: ``input`` float32 [256, 1, 16, 16], ``labels`` int64 [256].
- ``digits_cnn.eval.npz``: ``input`` float32 [M, 1, 16, 16], ``labels`` int64 [M].

Both npz files also hold ``mean`` and ``std`` (float32 scalars): the training-set
statistics used for standardization. Preprocessing, done before the model: pixels
/ 16 to [0, 1], bilinear upsampling 8x8 -> 16x16, then ``(x - mean) / std``.

The data comes from ``sklearn.datasets.load_digits`` (ships with scikit-learn).
The run is seeded, single-threaded and byte-deterministic; it takes about 20 s on CPU.
"""

import argparse
import pathlib
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

CALIB_SIZE = 256
EVAL_SIZE = 500
EPOCHS = 30
BATCH_SIZE = 64
MIN_EVAL_TOP1 = 0.97


def conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(cout),
    )


class ResidualUnit(nn.Module):
    """conv-bn-relu, conv-bn, add skip (projected when the shape changes), relu."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv_bn(cin, cout, stride=stride)
        self.conv2 = conv_bn(cout, cout)
        changes_shape = stride != 1 or cin != cout
        self.skip = conv_bn(cin, cout, kernel=1, stride=stride) if changes_shape else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(F.relu(self.conv1(x)))
        return F.relu(y + self.skip(x))


class DigitsCNN(nn.Module):
    """[N, 1, 16, 16] -> logits [N, 10]."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(1, 16), nn.ReLU())
        self.stage1 = ResidualUnit(16, 16)
        self.stage2 = nn.Sequential(ResidualUnit(16, 32, stride=2), ResidualUnit(32, 32))
        self.pool = nn.AdaptiveAvgPool2d(1)  # exported as GlobalAveragePool
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.stage1(self.stem(x)))
        return self.head(torch.flatten(self.pool(x), 1))


def upsample(images: np.ndarray) -> np.ndarray:
    """[n, 64] digit pixels valued 0..16 -> float32 [n, 1, 16, 16] in [0, 1]."""
    x = torch.from_numpy(images.reshape(-1, 1, 8, 8).astype(np.float32) / 16.0)
    return F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False).numpy()


def split(seed: int) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], np.float32, np.float32]:
    """Stratified calib / eval / train split of (x, y), standardized with the train mean, std."""
    digits = load_digits()
    x, y = upsample(digits.data), digits.target.astype(np.int64)
    x_calib, x_rest, y_calib, y_rest = train_test_split(
        x, y, train_size=CALIB_SIZE, stratify=y, random_state=seed)
    x_eval, x_train, y_eval, y_train = train_test_split(
        x_rest, y_rest, train_size=EVAL_SIZE, stratify=y_rest, random_state=seed)
    mean, std = np.float32(x_train.mean()), np.float32(x_train.std())
    splits = {"train": (x_train, y_train), "calib": (x_calib, y_calib), "eval": (x_eval, y_eval)}
    return {name: ((xs - mean) / std, ys) for name, (xs, ys) in splits.items()}, mean, std


def shift(batch: torch.Tensor, max_px: int = 2) -> torch.Tensor:
    """Translate each image by up to ``max_px`` (one original 8x8 pixel), edge-padded."""
    padded = F.pad(batch, (max_px,) * 4, mode="replicate")
    offsets = torch.randint(0, 2 * max_px + 1, (len(batch), 2))
    size = batch.shape[-1]
    return torch.stack([p[:, i:i + size, j:j + size] for p, (i, j) in zip(padded, offsets.tolist())])


def train(model: nn.Module, x: np.ndarray, y: np.ndarray) -> None:
    """Adam with a cosine schedule and shift augmentation; mutates ``model``."""
    x_t, y_t = torch.from_numpy(x), torch.from_numpy(y)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    steps = EPOCHS * ((len(x) + BATCH_SIZE - 1) // BATCH_SIZE)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    model.train()
    for _ in range(EPOCHS):
        for idx in torch.randperm(len(x)).split(BATCH_SIZE):
            loss = F.cross_entropy(model(shift(x_t[idx])), y_t[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()


def inline_identity_initializers(graph: onnx.GraphProto) -> None:
    """Replace each Identity fed by an initializer with a copy of it; mutates ``graph``.

    The exporter deduplicates bit-equal initializers through Identity nodes. Here the
    strided unit's two last BN biases are bit-equal: both start at zero and get the
    same gradient, since they feed the same Add. A copy keeps every BN self-contained.
    """
    initializers = {init.name: init for init in graph.initializer}
    for node in [n for n in graph.node if n.op_type == "Identity" and n.input[0] in initializers]:
        copy = onnx.TensorProto()
        copy.CopyFrom(initializers[node.input[0]])
        copy.name = node.output[0]
        graph.initializer.append(copy)
        graph.node.remove(node)


def export(model: nn.Module, path: pathlib.Path, example: torch.Tensor | None = None,
           opset: int = 13) -> onnx.ModelProto:
    """Export in eval mode with BatchNormalization unfolded, batch axis ``N`` dynamic; returns the
    checked model. ``example``: an input (default [1, 1, 16, 16] zeros, this model's).

    The legacy exporter folds BN into Conv only when constant folding runs in
    TrainingMode.EVAL; PRESERVE on an eval-mode model with folding off keeps BN
    as inference-mode BatchNormalization nodes (running statistics).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter is wanted
        torch.onnx.export(
            model, (torch.zeros(1, 1, 16, 16) if example is None else example,), str(path), dynamo=False,
            opset_version=opset,
            input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
            training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False)
    proto = onnx.load(str(path))
    inline_identity_initializers(proto.graph)
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
    model = DigitsCNN()
    train(model, *data["train"])

    args.out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = args.out_dir / "digits_cnn.onnx"
    proto = export(model, onnx_path)
    n_bn = sum(node.op_type == "BatchNormalization" for node in proto.graph.node)
    if n_bn != 8:
        raise SystemExit(f"{n_bn} BatchNormalization nodes in the export, expected 8 unfolded")
    for name in ("calib", "eval"):
        x, y = data[name]
        np.savez(args.out_dir / f"digits_cnn.{name}.npz", input=x, labels=y, mean=mean, std=std)

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
          f"max |ort - torch| {max_diff:.1e}")
    if top1 < MIN_EVAL_TOP1:
        raise SystemExit(f"eval top-1 {top1:.4f} < {MIN_EVAL_TOP1}; train longer (EPOCHS)")


if __name__ == "__main__":
    main()
