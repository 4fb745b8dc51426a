"""Build the torch part of the zoo: small seeded models written by torch's real exporters.

Each model is random-initialised (seed 0), its BatchNorm statistics warmed on a few synthetic
batches, and exported the way users export it: torch.onnx TorchScript path (dynamo=False),
torch.onnx dynamo path (dynamo=True, onnxscript), and optimum's ONNX exporter for Hugging Face
transformers (from a local save_pretrained directory, no download). The script writes
tests/zoo/<name>.onnx and tests/zoo/torch.json (format in tests/zoo_models.py).

Rerun (exporters live outside the project venv; never install torchvision)::

    python3 -m venv /tmp/zootorch-venv
    /tmp/zootorch-venv/bin/pip install torch==2.13.0
    /tmp/zootorch-venv/bin/pip install onnx onnxscript onnxruntime optimum-onnx
    /tmp/zootorch-venv/bin/python tests/zoo/make_torch_zoo.py

Versions used for the committed files: torch 2.13.0+cpu, onnx 1.23.2, onnxscript 0.7.2,
transformers 4.57.6, optimum 2.1.0, optimum-onnx 0.1.0.
"""
from __future__ import annotations

import json
import math
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

ZOO = Path(__file__).parent
TORCH = f"torch.onnx {torch.__version__.split('+')[0]}"


def _seed() -> None:
    torch.manual_seed(0)


def _warm_bn(model: nn.Module, shape: tuple[int, ...], steps: int = 8) -> nn.Module:
    """Run a few synthetic batches in train mode so BatchNorm running stats are not the identity."""
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(torch.randn(16, *shape))
    return model.eval()


def _entry(name: str, exporter: str, inputs: dict, notes: str, **extra) -> dict:
    return {"name": name, "file": f"{name}.onnx", "exporter": exporter, "script": "make_torch_zoo.py",
            **extra, "inputs": inputs, "notes": notes}


# --- 1. MobileNetV3-like CNN, TorchScript exporter -------------------------------------------------

def _cbn(cin: int, cout: int, k: int, s: int = 1, groups: int = 1, act: nn.Module | None = None) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, act if act is not None else nn.Identity())


class SqueezeExcite(nn.Module):
    def __init__(self, ch: int, squeeze: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.fc2 = nn.Conv2d(ch, squeeze, 1), nn.Conv2d(squeeze, ch, 1)
        self.relu, self.gate = nn.ReLU(), nn.Hardsigmoid()

    def forward(self, x):
        return x * self.gate(self.fc2(self.relu(self.fc1(self.pool(x)))))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, exp: int, cout: int, stride: int, se: bool):
        super().__init__()
        self.expand = _cbn(cin, exp, 1, act=nn.Hardswish())
        self.dw = _cbn(exp, exp, 3, stride, groups=exp, act=nn.Hardswish())
        self.se = SqueezeExcite(exp, max(8, exp // 4)) if se else nn.Identity()
        self.project = _cbn(exp, cout, 1)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.project(self.se(self.dw(self.expand(x))))
        return x + y if self.residual else y


class MobileNetV3ish(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = _cbn(3, 16, 3, 2, act=nn.Hardswish())
        self.blocks = nn.Sequential(InvertedResidual(16, 32, 16, 1, True), InvertedResidual(16, 48, 24, 2, False),
                                    InvertedResidual(24, 72, 24, 1, True), InvertedResidual(24, 96, 40, 2, True))
        self.last = _cbn(40, 96, 1, act=nn.Hardswish())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Linear(96, 64), nn.Hardswish(), nn.Linear(64, classes))

    def forward(self, x):
        return self.head(torch.flatten(self.pool(self.last(self.blocks(self.stem(x)))), 1))


def make_mbnet() -> dict:
    _seed()
    model = _warm_bn(MobileNetV3ish(), (3, 32, 32))
    torch.onnx.export(model, (torch.randn(1, 3, 32, 32),), ZOO / "torchscript_mbnet.onnx", dynamo=False,
                      opset_version=13, do_constant_folding=False, input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return _entry("torchscript_mbnet", f"{TORCH} (TorchScript, dynamo=False, opset 13)",
                  {"input": {"kind": "normal", "shape": [3, 32, 32]}},
                  "MobileNetV3-like: Conv+BN+HardSwish, depthwise convs, squeeze-excite (GlobalAveragePool, "
                  "Conv, Relu, Conv, HardSigmoid, Mul), Gemm head; eval mode, do_constant_folding=False")


# --- 2. small ResNet, dynamo exporter --------------------------------------------------------------

class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.c1, self.c2 = _cbn(cin, cout, 3, stride, act=nn.ReLU()), _cbn(cout, cout, 3)
        self.down = _cbn(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x):
        return torch.relu(self.c2(self.c1(x)) + self.down(x))


class TinyResNet(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = _cbn(3, 16, 3, act=nn.ReLU())
        self.layers = nn.Sequential(BasicBlock(16, 16, 1), BasicBlock(16, 24, 2), BasicBlock(24, 32, 2))
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1))


def make_resnet() -> dict:
    _seed()
    model = _warm_bn(TinyResNet(), (3, 32, 32))
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.onnx.export(model, (torch.randn(2, 3, 32, 32),), dynamo=True, opset_version=18,
                                input_names=["input"], output_names=["logits"],
                                dynamic_shapes={"x": {0: batch}})
    program.save(str(ZOO / "dynamo_resnet.onnx"))
    return _entry("dynamo_resnet", f"{TORCH} (dynamo=True, onnxscript, opset 18)",
                  {"input": {"kind": "normal", "shape": [3, 32, 32]}},
                  "ResNet-like: Conv+BN+Relu basic blocks with Add residuals, 1x1 downsample, Gemm head")


# --- 3. Hugging Face transformers through optimum --------------------------------------------------

def _optimum_export(model, name: str, task: str, files: dict[str, str], opset: int = 14, tokenizer=None) -> str:
    """Save ``model`` locally and export it with optimum; ``files`` maps optimum's output file to ours."""
    import optimum.exporters.onnx as oe
    from importlib.metadata import version
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "src", Path(tmp) / "out"
        model.save_pretrained(src)
        if tokenizer is not None:
            tokenizer.save_pretrained(src)
        oe.main_export(str(src), output=str(out), task=task, opset=opset, device="cpu", no_post_process=True,
                       do_validation=False, local_files_only=True)
        for theirs, ours in files.items():
            _single_file(out / theirs, ZOO / ours)
    return f"optimum-onnx {version('optimum-onnx')} (main_export, {TORCH} TorchScript, opset {opset})"


def _single_file(src: Path, dst: Path) -> None:
    import onnx
    model = onnx.load(str(src))  # pulls external data in, if any
    onnx.save(model, str(dst))


def _tokenizer(vocab: int):
    from transformers import BertTokenizerFast
    with tempfile.TemporaryDirectory() as tmp:
        words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(vocab - 5)]
        (Path(tmp) / "vocab.txt").write_text("\n".join(words) + "\n")
        return BertTokenizerFast(str(Path(tmp) / "vocab.txt"))


def make_bert() -> dict:
    from transformers import BertConfig, BertForSequenceClassification
    _seed()
    cfg = BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=128, max_position_embeddings=64, num_labels=2)
    exporter = _optimum_export(BertForSequenceClassification(cfg).eval(), "bert_tiny", "text-classification",
                               {"model.onnx": "bert_tiny.onnx"}, tokenizer=_tokenizer(1000))
    return _entry("bert_tiny", exporter, {
        "input_ids": {"kind": "tokens", "shape": [16], "high": 1000, "dtype": "int64"},
        "attention_mask": {"kind": "ones", "shape": [16], "dtype": "int64"},
        "token_type_ids": {"kind": "zeros", "shape": [16], "dtype": "int64"}},
        "BertForSequenceClassification, random init: hidden 64, 2 layers, 2 heads, vocab 1000; "
        "batch and sequence dynamic", transformer=True)


def make_vit() -> dict:
    from transformers import ViTConfig, ViTForImageClassification
    _seed()
    cfg = ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=64, num_hidden_layers=2,
                    num_attention_heads=2, intermediate_size=128, num_labels=10)
    exporter = _optimum_export(ViTForImageClassification(cfg).eval(), "vit_tiny", "image-classification",
                               {"model.onnx": "vit_tiny.onnx"})
    return _entry("vit_tiny", exporter, {"pixel_values": {"kind": "normal", "shape": [3, 32, 32]}},
                  "ViTForImageClassification, random init: image 32, patch 8, hidden 64, 2 layers, 2 heads",
                  transformer=True)


def make_gpt2() -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel
    _seed()
    cfg = GPT2Config(vocab_size=1000, n_positions=64, n_embd=64, n_layer=2, n_head=2, use_cache=True)
    exporter = _optimum_export(GPT2LMHeadModel(cfg).eval(), "gpt2_tiny_past", "text-generation-with-past",
                               {"model.onnx": "gpt2_tiny_past.onnx"}, tokenizer=_tokenizer(1000))
    seq, past = 4, 4
    inputs = {"input_ids": {"kind": "tokens", "shape": [seq], "high": 1000, "dtype": "int64"},
              "attention_mask": {"kind": "ones", "shape": [seq + past], "dtype": "int64"},
              "position_ids": {"kind": "arange", "start": past, "shape": [seq], "dtype": "int64"}}
    for layer in range(2):
        for kv in ("key", "value"):
            inputs[f"past_key_values.{layer}.{kv}"] = {"kind": "normal", "shape": [2, past, 32]}
    return _entry("gpt2_tiny_past", exporter, inputs,
                  "GPT2LMHeadModel with past key/values in and present out: 2 layers, n_embd 64, 2 heads, "
                  "vocab 1000; feeds: 4 new tokens after 4 past positions, so each sample's position_ids are "
                  "[4, 5, 6, 7]", transformer=True)


# --- 4. Ultralytics-style detector -----------------------------------------------------------------

class Dfl(nn.Module):
    """Distribution focal loss decode: softmax over ``bins`` per box side, expectation by a fixed 1x1 conv."""

    def __init__(self, bins: int):
        super().__init__()
        self.bins = bins
        self.conv = nn.Conv2d(bins, 1, 1, bias=False).requires_grad_(False)
        self.conv.weight.data[:] = torch.arange(bins, dtype=torch.float).view(1, bins, 1, 1)

    def forward(self, x):  # x: [N, 4*bins, A]
        n, _, a = x.shape
        return self.conv(x.view(n, 4, self.bins, a).transpose(2, 1).softmax(1)).view(n, 4, a)


class TinyYolo(nn.Module):
    """Backbone (strides 8/16/32) → upsample+concat neck → decoupled head → [N, 4+nc, anchors] in pixels."""

    def __init__(self, nc: int = 3, size: int = 64, bins: int = 8):
        super().__init__()
        act = nn.SiLU
        self.nc, self.bins, self.strides = nc, bins, (8, 16, 32)
        self.b1 = nn.Sequential(_cbn(3, 16, 3, 2, act=act()), _cbn(16, 32, 3, 2, act=act()), _cbn(32, 32, 3, 2, act=act()))
        self.b2, self.b3 = _cbn(32, 48, 3, 2, act=act()), _cbn(48, 48, 3, 2, act=act())
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.n4, self.n3 = _cbn(96, 48, 1, act=act()), _cbn(80, 32, 1, act=act())
        chans = (32, 48, 48)
        self.box = nn.ModuleList(nn.Sequential(_cbn(c, 24, 3, act=act()), nn.Conv2d(24, 4 * bins, 1)) for c in chans)
        self.cls = nn.ModuleList(nn.Sequential(_cbn(c, 24, 3, act=act()), nn.Conv2d(24, nc, 1)) for c in chans)
        self.dfl = Dfl(bins)
        with torch.no_grad():  # as a trained detector: short box sides favoured, few confident anchors
            for s, box, cls in zip(self.strides, self.box, self.cls):
                box[-1].bias[:] = -torch.arange(bins, dtype=torch.float).repeat(4)
                cls[-1].bias[:] = math.log(5 / nc / (size / s) ** 2)
        points, strides = [], []
        for s in self.strides:
            g = size // s
            ys, xs = torch.meshgrid(torch.arange(g) + 0.5, torch.arange(g) + 0.5, indexing="ij")
            points.append(torch.stack([xs, ys], 0).view(2, -1))
            strides.append(torch.full((1, g * g), float(s)))
        self.register_buffer("anchors", torch.cat(points, 1))
        self.register_buffer("stride", torch.cat(strides, 1))

    def forward(self, x):
        p3 = self.b1(x)
        p4 = self.b2(p3)
        p5 = self.b3(p4)
        n4 = self.n4(torch.cat([self.up(p5), p4], 1))
        n3 = self.n3(torch.cat([self.up(n4), p3], 1))
        feats = (n3, n4, p5)
        n = x.shape[0]
        box = torch.cat([self.box[i](f).view(n, 4 * self.bins, -1) for i, f in enumerate(feats)], 2)
        cls = torch.cat([self.cls[i](f).view(n, self.nc, -1) for i, f in enumerate(feats)], 2)
        lt, rb = self.dfl(box).chunk(2, 1)
        x1y1, x2y2 = self.anchors - lt, self.anchors + rb
        xywh = torch.cat([(x1y1 + x2y2) / 2, x2y2 - x1y1], 1) * self.stride
        return torch.cat([xywh, cls.sigmoid()], 1)


def make_yolo() -> dict:
    _seed()
    model = _warm_bn(TinyYolo(), (3, 64, 64))
    torch.onnx.export(model, (torch.rand(1, 3, 64, 64),), ZOO / "yolo_head.onnx", dynamo=False, opset_version=12,
                      input_names=["images"], output_names=["output0"],
                      dynamic_axes={"images": {0: "batch"}, "output0": {0: "batch"}})
    return _entry("yolo_head", f"{TORCH} (TorchScript, dynamo=False, opset 12)",
                  {"images": {"kind": "uniform", "shape": [3, 64, 64], "low": 0.0, "high": 1.0}},
                  "Ultralytics-style: SiLU conv backbone, nearest Resize + Concat neck, decoupled box/class head "
                  "with DFL softmax decode; output0 [N, 4+3, 84] joins xywh boxes in pixels (0-64) and sigmoid "
                  "class scores (0-1) in one Concat")


if __name__ == "__main__":
    from make_torch_vad import make_vad  # noqa: E402  (sibling module; see its docstring)
    warnings.filterwarnings("ignore")
    entries = [make_mbnet(), make_resnet(), make_bert(), make_vit(), make_gpt2(), make_yolo(),
               make_vad("lstm"), make_vad("gru")]
    (ZOO / "torch.json").write_text(json.dumps({"models": entries}, indent=1) + "\n")
    print("wrote", ", ".join(e["file"] for e in entries))
