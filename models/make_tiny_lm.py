"""Train and export the bundled tiny causal language model (characters of Python's own help texts).

Writes, into ``--out-dir`` (default: this script's folder):

- ``tiny_lm.onnx``: FP32 model, opset 17. Inputs ``input_ids`` int64 [N, T] and ``attention_mask``
  int64 [N, T] (1 = real token, 0 = padding); output ``logits`` float32 [N, T, 128]. ``N`` and ``T``
  are dynamic axes (T at most 64, the number of learned positions).
- ``tiny_lm.calib.npz``: ``input_ids`` and ``attention_mask`` int64 [256, 64] (training windows).
- ``tiny_lm.eval.npz``: ``input_ids``, ``attention_mask`` and ``targets`` int64 [M, 64]: windows of
  the held-out text; ``targets[i, t]`` is the character after ``input_ids[i, t]``, so perplexity is
  ``exp(mean cross-entropy(logits, targets))``.

Text: the help topics the Python standard library ships (``pydoc_data.topics.topics``, the texts
behind ``help("for")`` etc., sorted by topic name and joined), present in every CPython install. The
text is large enough (465k characters with CPython 3.11.7) that the model does not memorise it: its
eval perplexity is lowest at softmax temperature 1, so quantization noise cannot lower perplexity by
flattening overconfident predictions, and perplexity tracks fidelity to FP32. Characters are tokens: code point
for ASCII, ``?`` for anything else (vocabulary of 128). Every tenth 512-character chunk is held out for eval
(windows never cross a chunk boundary); the rest, joined, is the training text.

The model: token and learned position embeddings (``Gather``; positions from ``Range`` over the
input's length), four pre-LayerNorm decoder layers (4-head causal self-attention, exact-GELU MLP of
width 256, residual adds), a final LayerNormalization and a bias-free MatMul head. The causal mask
is built in the graph from Shape/Range/Less and joined with the padding mask (Equal/Or); Where puts
-10000 at blocked scores before Softmax. Every MatMul weight has an input dimension that is a
multiple of 32 (64 or 256), so weight-only quantization with groups of 32 along it applies.

The run is seeded, single-threaded and deterministic; it takes about a minute and a half on CPU.
Another CPython version ships different help texts, hence different files.
"""

import argparse
import hashlib
import math
import pathlib
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import platform
import torch
import torch.nn.functional as F
from torch import nn

VOCAB, WIDTH, HEADS, MLP_WIDTH, LAYERS, CONTEXT = 128, 64, 4, 256, 4, 64
STEPS = 1000
DROPOUT = 0.1
BATCH_SIZE = 32
CALIB_SIZE = 256
HELD_OUT_CHUNK, HELD_OUT_EVERY = 512, 10
MASKED_SCORE = -10000.0


class CausalAttention(nn.Module):
    """Multi-head self-attention over [N, T, C]; ``blocked`` [N, 1, T, T] is True where a query may not look."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads, self.scale = heads, 1.0 / math.sqrt(width // heads)
        self.q, self.k, self.v = (nn.Linear(width, width) for _ in range(3))
        self.out = nn.Linear(width, width)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        return x.reshape(n, t, self.heads, c // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, blocked: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        q, k, v = self.split_heads(self.q(x)), self.split_heads(self.k(x)), self.split_heads(self.v(x))
        scores = ((q @ k.transpose(2, 3)) * self.scale).masked_fill(blocked, MASKED_SCORE)
        y = torch.softmax(scores, dim=-1) @ v
        return self.out(y.transpose(1, 2).reshape(n, t, c))


class DecoderLayer(nn.Module):
    def __init__(self, width: int, heads: int, mlp_width: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = CausalAttention(width, heads)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_width), nn.GELU(), nn.Linear(mlp_width, width))
        self.drop = nn.Dropout(DROPOUT)

    def forward(self, x: torch.Tensor, blocked: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), blocked))
        return x + self.drop(self.mlp(self.ln2(x)))


class TinyLM(nn.Module):
    """(input_ids [N, T], attention_mask [N, T]) -> next-character logits [N, T, VOCAB]."""

    def __init__(self):
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, WIDTH)
        self.positions = nn.Embedding(CONTEXT, WIDTH)
        self.layers = nn.ModuleList(DecoderLayer(WIDTH, HEADS, MLP_WIDTH) for _ in range(LAYERS))
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        steps = torch.arange(input_ids.shape[1])
        causal = steps[None, :] > steps[:, None]  # [T, T]: key after query
        padded = (attention_mask == 0)[:, None, None, :]  # [N, 1, 1, T]: padded keys
        blocked = causal | padded
        x = self.tokens(input_ids) + self.positions(steps)
        for layer in self.layers:
            x = layer(x, blocked)
        return self.head(self.norm(x))


def corpus() -> tuple[str, str]:
    """(text, sha256 of its UTF-8 bytes): the standard library's help topics, joined in name order."""
    from pydoc_data.topics import topics

    text = "\n".join(topics[name] for name in sorted(topics))
    return text, hashlib.sha256(text.encode()).hexdigest()


def encode(text: str) -> np.ndarray:
    return np.array([ord(c) if ord(c) < VOCAB else ord("?") for c in text], dtype=np.int64)


def split_text(ids: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """(training ids, held-out chunks): every HELD_OUT_EVERY-th chunk of HELD_OUT_CHUNK ids is held out."""
    chunks = [ids[i:i + HELD_OUT_CHUNK] for i in range(0, len(ids), HELD_OUT_CHUNK)]
    held = [c for k, c in enumerate(chunks) if k % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    kept = [c for k, c in enumerate(chunks) if k % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
    return np.concatenate(kept), held


def windows(ids: np.ndarray, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) int64 [M, CONTEXT]: windows starting every ``stride`` characters."""
    starts = np.arange(0, len(ids) - CONTEXT, stride)
    inputs = np.stack([ids[s:s + CONTEXT] for s in starts])
    return inputs, np.stack([ids[s + 1:s + CONTEXT + 1] for s in starts])


def train(model: nn.Module, ids: np.ndarray) -> None:
    """AdamW on random windows with warmup + cosine decay; mutates ``model``."""
    data = torch.from_numpy(ids)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    warmup = STEPS // 25
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * s / STEPS))))
    ones = torch.ones(BATCH_SIZE, CONTEXT, dtype=torch.int64)
    model.train()
    for _ in range(STEPS):
        starts = torch.randint(0, len(ids) - CONTEXT - 1, (BATCH_SIZE,))
        x = torch.stack([data[s:s + CONTEXT] for s in starts.tolist()])
        y = torch.stack([data[s + 1:s + CONTEXT + 1] for s in starts.tolist()])
        learn(model, F.cross_entropy(model(x, ones).reshape(-1, VOCAB), y.reshape(-1)), optimizer, schedule)
    model.eval()


def learn(model: nn.Module, loss: torch.Tensor, optimizer, schedule) -> None:
    """One optimisation step on ``loss``, gradients clipped to norm 1; mutates ``model``."""
    optimizer.zero_grad()
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    schedule.step()


def export(model: nn.Module, path: pathlib.Path) -> onnx.ModelProto:
    """Export with the TorchScript-based exporter (standard ops, offline); returns the checked model."""
    example = torch.zeros(2, CONTEXT, dtype=torch.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model, (example, torch.ones_like(example)), str(path), dynamo=False, opset_version=17,
            input_names=["input_ids", "attention_mask"], output_names=["logits"],
            dynamic_axes={"input_ids": {0: "N", 1: "T"}, "attention_mask": {0: "N", 1: "T"},
                          "logits": {0: "N", 1: "T"}})
    return checked(path)


def checked(path: pathlib.Path) -> onnx.ModelProto:
    """The export at ``path``, rewritten with the lowest IR version its opsets allow (onnx 1.23 stamps
    IR 14, which onnxruntime 1.31 refuses) after a full check."""
    proto = onnx.load(str(path))
    proto.ir_version = onnx.helper.find_min_ir_version_for(proto.opset_import)
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))
    return proto


def perplexity(logits: np.ndarray, targets: np.ndarray) -> float:
    """exp(mean cross-entropy) of [M, T, V] logits against [M, T] targets."""
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return float(np.exp(-np.take_along_axis(log_probs, targets[..., None], -1).mean()))


def unigram_perplexity(train_ids: np.ndarray, targets: np.ndarray) -> float:
    """The baseline: character frequencies of the training text (add-one smoothed)."""
    counts = np.bincount(train_ids, minlength=VOCAB) + 1.0
    return float(np.exp(-np.log(counts / counts.sum())[targets].mean()))


def arguments(doc: str, script: str) -> argparse.Namespace:
    """``--out-dir`` (default: the folder of ``script``) and ``--seed``, described by ``doc``'s first line."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out-dir", type=pathlib.Path, default=pathlib.Path(script).parent,
                        help="where to write the files (default: this script's folder)")
    parser.add_argument("--seed", type=int, default=0, help="seed for init, windows and training")
    return parser.parse_args()


def main() -> None:
    args = arguments(__doc__, __file__)

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # bit-identical training, hence identical ONNX bytes

    text, digest = corpus()
    ids = encode(text)
    train_ids, held_out = split_text(ids)
    model = TinyLM()
    train(model, train_ids)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = args.out_dir / "tiny_lm.onnx"
    proto = export(model, onnx_path)
    calib_ids, _ = windows(train_ids, stride=(len(train_ids) - CONTEXT - 1) // CALIB_SIZE + 1)
    calib_ids = calib_ids[np.random.default_rng(args.seed).permutation(len(calib_ids))[:CALIB_SIZE]]
    eval_pairs = [windows(chunk, stride=CONTEXT) for chunk in held_out if len(chunk) > CONTEXT]
    eval_ids_w = np.concatenate([p[0] for p in eval_pairs])
    eval_targets = np.concatenate([p[1] for p in eval_pairs])
    np.savez(args.out_dir / "tiny_lm.calib.npz", input_ids=calib_ids, attention_mask=np.ones_like(calib_ids))
    np.savez(args.out_dir / "tiny_lm.eval.npz", input_ids=eval_ids_w, attention_mask=np.ones_like(eval_ids_w),
             targets=eval_targets)

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {"input_ids": eval_ids_w, "attention_mask": np.ones_like(eval_ids_w)})[0]
    with torch.no_grad():
        reference = model(torch.from_numpy(eval_ids_w), torch.ones_like(torch.from_numpy(eval_ids_w))).numpy()
    max_diff = float(np.abs(logits - reference).max())
    if max_diff > 1e-3:
        raise SystemExit(f"onnxruntime vs eval-mode torch: max |diff| {max_diff:.2e} > 1e-3")
    ppl, base = perplexity(logits, eval_targets), unigram_perplexity(train_ids, eval_targets)
    print(f"text: {len(ids)} characters (CPython {platform.python_version()}, sha256 {digest[:16]}); "
          f"FP32 eval perplexity (onnxruntime, {eval_targets.size} targets): {ppl:.3f}; unigram {base:.3f}; "
          f"max |ort - torch| {max_diff:.1e}; {len(proto.graph.node)} nodes")
    if ppl > base / 2:
        raise SystemExit(f"eval perplexity {ppl:.3f} is not clearly below unigram {base:.3f}; train longer (STEPS)")


if __name__ == "__main__":
    main()
