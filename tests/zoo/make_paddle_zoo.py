"""Write the paddle2onnx zoo models (tests/zoo/paddle_*.onnx) listed in tests/zoo/paddle.json.

Run in a venv with paddlepaddle and paddle2onnx (not the project's venv), from the repository root:

    python3 -m venv /tmp/paddle-venv
    /tmp/paddle-venv/bin/pip install paddlepaddle==3.3.1 paddle2onnx==2.1.0 onnx onnx_graphsurgeon sympy onnxruntime
    /tmp/paddle-venv/bin/python tests/zoo/make_paddle_zoo.py

Models are random-init (seeded), small, and exported with paddle.onnx.export, which saves the layer
with paddle.jit.save and converts it with paddle2onnx (which then folds constants with polygraphy;
onnx_graphsurgeon, sympy and onnxruntime are installed up front so that polygraphy does not try to
install them itself). The classifier is trained a few seconds on a synthetic task; the recognizer's
BatchNorm statistics are settled on random batches. The ONNX files are kept as the exporter wrote
them: their headers (IR version, opset, ``-1`` dynamic dims) are what the zoo tests.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import paddle
import paddle2onnx
from paddle import nn

HERE = Path(__file__).parent


class ConvBN(nn.Layer):
    """Conv + BatchNorm + optional HardSwish, as PP-LCNet builds its stages."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: bool = True):
        super().__init__()
        self.conv = nn.Conv2D(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias_attr=False)
        self.bn = nn.BatchNorm2D(cout)
        self.act = nn.Hardswish() if act else nn.Identity()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class SE(nn.Layer):
    """Squeeze-excite with ReLU and HardSigmoid gates (PP-LCNet's SEModule)."""

    def __init__(self, c: int, r: int = 4):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2D(1)
        self.fc1 = nn.Conv2D(c, c // r, 1)
        self.fc2 = nn.Conv2D(c // r, c, 1)

    def forward(self, x):
        s = self.pool(x)
        s = nn.functional.relu(self.fc1(s))
        s = nn.functional.hardsigmoid(self.fc2(s))
        return x * s


class DepthwiseSeparable(nn.Layer):
    def __init__(self, cin: int, cout: int, stride: int, se: bool):
        super().__init__()
        self.dw = ConvBN(cin, cin, 3, stride, groups=cin)
        self.se = SE(cin) if se else nn.Identity()
        self.pw = ConvBN(cin, cout, 1)

    def forward(self, x):
        return self.pw(self.se(self.dw(x)))


class TinyLCNet(nn.Layer):
    """A PP-LCNet-shaped classifier: stem, depthwise-separable stages (SE in the last), GAP, last conv, FC."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = ConvBN(3, 8, 3, 2)
        self.blocks = nn.Sequential(
            DepthwiseSeparable(8, 16, 1, False),
            DepthwiseSeparable(16, 32, 2, False),
            DepthwiseSeparable(32, 32, 1, False),
            DepthwiseSeparable(32, 64, 2, True),
            DepthwiseSeparable(64, 64, 1, True),
        )
        self.gap = nn.AdaptiveAvgPool2D(1)
        self.last_conv = nn.Conv2D(64, 128, 1)
        self.flatten = nn.Flatten(1, -1)
        self.fc = nn.Linear(128, classes)

    def forward(self, x):
        x = self.gap(self.blocks(self.stem(x)))
        x = nn.functional.hardswish(self.last_conv(x))
        return self.fc(self.flatten(x))


class TinyCRNN(nn.Layer):
    """A CRNN-style recognizer: conv stack to height 1, width as the sequence, BiLSTM, FC, Softmax."""

    def __init__(self, classes: int = 37):
        super().__init__()
        self.convs = nn.Sequential(
            ConvBN(3, 16, 3, 1), nn.MaxPool2D(2, 2),           # 32x W -> 16 x W/2
            ConvBN(16, 32, 3, 1), nn.MaxPool2D(2, 2),          # -> 8 x W/4
            ConvBN(32, 48, 3, 1), nn.MaxPool2D((2, 1), (2, 1)),  # -> 4 x W/4
            ConvBN(48, 48, 3, 1), nn.MaxPool2D((4, 1), (4, 1)),  # -> 1 x W/4
        )
        self.lstm = nn.LSTM(48, 32, direction="bidirect")
        self.fc = nn.Linear(64, classes)

    def forward(self, x):
        x = self.convs(x)                     # [N, C, 1, T]
        x = paddle.squeeze(x, axis=2)         # [N, C, T]
        x = paddle.transpose(x, [0, 2, 1])    # [N, T, C]
        x, _ = self.lstm(x)
        return nn.functional.softmax(self.fc(x), axis=-1)


def settle_batchnorm(layer: nn.Layer, shape: list[int], steps: int = 40) -> nn.Layer:
    """Run synthetic batches in train mode so BatchNorm's running statistics match the activations.

    With init statistics (mean 0, var 1) the HardSwish stack shrinks the signal ~2x per layer and the
    classifier's logits end near 1e-6, which no quantization test can measure against.
    """
    layer.train()
    with paddle.no_grad():
        for _ in range(steps):
            layer(paddle.randn(shape))
    layer.eval()
    return layer


def fit_briefly(layer: nn.Layer, shape: list[int], classes: int, steps: int = 40) -> nn.Layer:
    """A few seconds of Adam on a synthetic task (noise plus one of ``classes`` fixed patterns).

    Random-init logits barely depend on the input (their spread across samples is ~5% of their
    size), which would let a broken quantized model look accurate; a learnable task fixes that.
    """
    rng = np.random.default_rng(0)
    patterns = rng.standard_normal([classes, *shape[1:]]).astype("float32")
    opt = paddle.optimizer.Adam(learning_rate=3e-3, parameters=layer.parameters())
    layer.train()
    for _ in range(steps):
        labels = rng.integers(0, classes, shape[0])
        x = paddle.to_tensor(patterns[labels] + rng.standard_normal(shape).astype("float32"))
        loss = nn.functional.cross_entropy(layer(x), paddle.to_tensor(labels[:, None]))
        loss.backward()
        opt.step()
        opt.clear_grad()
    print(f"{type(layer).__name__}: synthetic-task loss after {steps} steps {float(loss):.3f}")
    layer.eval()
    return layer


def export(layer: nn.Layer, spec: list, name: str, opset: int) -> Path:
    layer.eval()
    target = HERE / f"{name}.onnx"
    with tempfile.TemporaryDirectory() as tmp:
        paddle.onnx.export(layer, str(Path(tmp) / name), input_spec=spec, opset_version=opset)
        target.write_bytes((Path(tmp) / f"{name}.onnx").read_bytes())
    model = onnx.load(target)
    dims = {i.name: [d.dim_value if d.HasField("dim_value") else d.dim_param for d in i.type.tensor_type.shape.dim]
            for i in model.graph.input}
    print(f"{target.name}: ir {model.ir_version}, opset {[o.version for o in model.opset_import]}, inputs {dims}, "
          f"{target.stat().st_size} bytes")
    return target


def with_minus_one_dims(source: Path, name: str) -> Path:
    """Rewrite symbolic input/output dims to dim_value -1, the legacy paddle2onnx header (only when needed)."""
    model = onnx.load(source)
    for value in [*model.graph.input, *model.graph.output]:
        for dim in value.type.tensor_type.shape.dim:
            if not dim.HasField("dim_value"):
                dim.dim_value = -1
    target = HERE / f"{name}.onnx"
    onnx.save(model, target)
    print(f"{target.name}: symbolic dims rewritten to -1")
    return target


def main() -> int:
    print(f"paddle {paddle.__version__}, paddle2onnx {paddle2onnx.__version__}, python {sys.version.split()[0]}")
    paddle.seed(0)
    np.random.seed(0)
    cls_spec = [paddle.static.InputSpec([None, 3, 48, 192], "float32", "x")]
    cls = export(fit_briefly(TinyLCNet(), [32, 3, 48, 192], 10), cls_spec, "paddle_cls", 11)
    paddle.seed(1)
    rec_spec = [paddle.static.InputSpec([None, 3, 32, None], "float32", "x")]
    rec = export(settle_batchnorm(TinyCRNN(), [16, 3, 32, 100]), rec_spec, "paddle_rec", 12)
    for path in (cls, rec):
        model = onnx.load(path)
        legacy = all(d.HasField("dim_value") for i in model.graph.input for d in i.type.tensor_type.shape.dim)
        if not legacy:
            with_minus_one_dims(path, path.stem + "_m1")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
