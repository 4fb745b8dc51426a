"""Train briefly and export standard architectures on the digits task, for bench/compare_peers.py.

    python bench/make_standard_models.py [--out-dir bench/.models] [--models resnet18 mobilenetv2 vit_tiny]

Writes ``<name>.onnx``, ``<name>.calib.npz`` and ``<name>.eval.npz`` (``input`` float32 [M, 1, 32, 32],
``labels`` int64 [M], ``mean`` and ``std`` as in the bundled files) per model into ``--out-dir`` (git
ignores the default folder: ResNet-18 alone is 45 MB). The data are the bundled digits models' (the same
seeded split of scikit-learn's 8×8 digits, models/make_digits_cnn.split: 256 calibration, 500 eval, 1041
training images, upsampled to 16×16 and standardized with the training mean and std), upsampled once more,
bilinearly, to 32×32: one channel, 10 classes. 32×32 keeps training on one CPU thread under five
minutes per model. The weights are trained briefly (AdamW, cosine schedule, shift augmentation), so these
are standard *architectures* with real trained weights on a small task, not the ImageNet models of the
same names:

- resnet18: the standard (torchvision) layout: 7×7/2 stem, BatchNorm, ReLU, 3×3/2 max pool, four stages
  of two BasicBlocks at 64/128/256/512 channels with 1×1 projections, global average pool, fully
  connected; one input channel; 11.2 M parameters. On 32×32 inputs the stages run at 8, 4, 2 and 1 pixels.
  8 epochs, about 30 s; FP32 eval top-1 0.980.
- mobilenetv2: the standard width-1.0 inverted-residual layout (ReLU6, linear bottlenecks, expansion 6,
  1280-channel head); one change: the stem runs at stride 1 instead of 2, since the input is 32×32 rather
  than 224×224 (the last feature map is 2×2); 2.2 M parameters. 12 epochs, about 100 s; top-1 0.988.
- vit_tiny: ViT-Tiny's shape (embedding 192, all 12 pre-LayerNorm layers, 3 heads, MLP 768, exact GELU,
  class token, learned positions, fused qkv projection) on 8×8 patches (16 patches + the class token);
  5.4 M parameters. 30 epochs, about 4.5 min; top-1 0.934: a transformer this deep learns less from 1041
  images than the CNNs do (40 epochs at twice the learning rate gave 0.946 in 7.5 min).

Times are of one CPU thread on a shared 2-core machine; the script prints them, with the onnxruntime
FP32 top-1 of each model and its largest difference from torch.

Exported by torch.onnx (TorchScript-based, opset 17, dynamic batch axis, BatchNormalization unfolded),
with the IR version onnxruntime 1.31 loads. Seeded, single-threaded and deterministic on one machine.
"""
from __future__ import annotations

import argparse
import math
import pathlib
import sys
import time

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "models"))
from make_digits_cnn import export, shift, split  # noqa: E402  (the bundled models' data,
# augmentation and export clean-up)

DEFAULT_DIR = ROOT / "bench" / ".models"
SIZE = 32
EPOCHS = {"resnet18": 8, "mobilenetv2": 12, "vit_tiny": 30}
LR = {"resnet18": 2e-3, "mobilenetv2": 3e-3, "vit_tiny": 5e-4}
BATCH_SIZE = 64
MIN_EVAL_TOP1 = 0.90  # below it the script says so: quantization deltas on a weak model mean little


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + (x if self.down is None else self.down(x)))


class ResNet18(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        widths, layers, cin = (64, 128, 256, 512), [], 64
        for k, width in enumerate(widths):
            layers += [BasicBlock(cin, width, 1 if k == 0 else 2), BasicBlock(width, width, 1)]
            cin = width
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1))


def conv_bn_relu6(cin: int, cout: int, kernel: int, stride: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6())


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers = [conv_bn_relu6(cin, hidden, 1, 1)] if expand != 1 else []
        layers += [conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)


class MobileNetV2(nn.Module):
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1))  # expansion, channels, repeats, first stride

    def __init__(self, classes: int = 10):
        super().__init__()
        layers, cin = [conv_bn_relu6(1, 32, 3, 1)], 32
        for expand, cout, repeats, stride in self.SETTINGS:
            for k in range(repeats):
                layers.append(InvertedResidual(cin, cout, stride if k == 0 else 1, expand))
                cin = cout
        layers.append(conv_bn_relu6(cin, 1280, 1, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(1280, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


class EncoderLayer(nn.Module):
    def __init__(self, width: int, heads: int, mlp: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp), nn.GELU(), nn.Linear(mlp, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).reshape(n, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = torch.softmax((q @ k.transpose(-2, -1)) / math.sqrt(c // self.heads), dim=-1)
        x = x + self.proj((attn @ v).transpose(1, 2).reshape(n, t, c))
        return x + self.mlp(self.ln2(x))


class ViTTiny(nn.Module):
    def __init__(self, classes: int = 10, patch: int = 8, width: int = 192, depth: int = 12, heads: int = 3,
                 mlp: int = 768):
        super().__init__()
        tokens = (SIZE // patch) ** 2
        self.patch = nn.Conv2d(1, width, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, width) * 0.02)
        self.layers = nn.Sequential(*(EncoderLayer(width, heads, mlp) for _ in range(depth)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        cls = self.cls + torch.zeros_like(x[:, :1])  # [N, 1, C] by broadcasting: expand(N) exports N as a constant
        x = torch.cat([cls, x], dim=1) + self.pos
        return self.head(self.norm(self.layers(x))[:, 0])


BUILDERS = {"resnet18": ResNet18, "mobilenetv2": MobileNetV2, "vit_tiny": ViTTiny}


def upsample(x: np.ndarray) -> np.ndarray:
    """[n, 1, 16, 16] standardized images → float32 [n, 1, SIZE, SIZE] (bilinear)."""
    return F.interpolate(torch.from_numpy(x), size=(SIZE, SIZE), mode="bilinear", align_corners=False).numpy()


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, lr: float) -> None:
    """AdamW, cosine schedule with a short warmup, shift augmentation; mutates ``model``."""
    x_t, y_t = torch.from_numpy(x), torch.from_numpy(y)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * math.ceil(len(x) / BATCH_SIZE)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * s / steps))))
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(BATCH_SIZE):
            loss = F.cross_entropy(model(shift(x_t[idx], max_px=4)), y_t[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()


def make(name: str, data: dict, stats: dict, out_dir: pathlib.Path, seed: int) -> float:
    """Train, export and check one model; writes ``<name>.onnx`` and its npz files into ``out_dir``.
    Returns the FP32 eval top-1 under onnxruntime."""
    torch.manual_seed(seed)
    model = BUILDERS[name]()
    params = sum(p.numel() for p in model.parameters())
    t0 = time.perf_counter()
    train(model, *data["train"], EPOCHS[name], LR[name])
    seconds = time.perf_counter() - t0
    path = out_dir / f"{name}.onnx"
    export(model, path, torch.zeros(2, 1, SIZE, SIZE), opset=17)
    for split_name in ("calib", "eval"):
        x, y = data[split_name]
        np.savez(out_dir / f"{name}.{split_name}.npz", input=x, labels=y, **stats)
    x_eval, y_eval = data["eval"]
    logits = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x_eval})[0]
    with torch.no_grad():
        diff = float(np.abs(logits - model(torch.from_numpy(x_eval)).numpy()).max())
    if diff > 1e-3:
        raise SystemExit(f"{name}: onnxruntime vs eval-mode torch: max |diff| {diff:.2e} > 1e-3")
    top1 = float((logits.argmax(1) == y_eval).mean())
    print(f"{name}: {params / 1e6:.2f} M parameters, {EPOCHS[name]} epochs in {seconds:.0f} s, FP32 eval top-1 "
          f"(onnxruntime, {len(y_eval)} images) {top1:.4f}, max |ort - torch| {diff:.1e}", flush=True)
    if top1 < MIN_EVAL_TOP1:
        print(f"{name}: WARNING: FP32 top-1 {top1:.4f} < {MIN_EVAL_TOP1}: too weak for quantization "
              "comparisons to mean much", flush=True)
    return top1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=pathlib.Path, default=DEFAULT_DIR)
    parser.add_argument("--models", nargs="+", default=list(BUILDERS), choices=list(BUILDERS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    np.random.seed(args.seed)
    splits, mean, std = split(args.seed)
    data = {k: (upsample(x), y) for k, (x, y) in splits.items()}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        make(name, data, {"mean": mean, "std": std}, args.out_dir, args.seed)


if __name__ == "__main__":
    main()
