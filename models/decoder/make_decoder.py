"""Train and export the bundled tiny Llama-style decoder with past key/values, the form users export.

Needs the ``decoder`` extra (``pip install -e '.[decoder]'``: Hugging Face ``transformers``); the tests
only read the committed files. Writes, into ``--out-dir`` (default: this script's folder):

- ``decoder.onnx``: FP32, opset 17, exported by ``torch.onnx.export`` (the TorchScript-based exporter,
  standard ops: RMSNorm as Pow/ReduceMean/Sqrt/Div, rotary as Cos/Sin/Slice/Concat, grouped-query
  attention as Expand/Reshape of the key/value heads). Inputs: ``input_ids`` int64 [N, T],
  ``attention_mask`` int64 [N, P + T] (1 = real token), ``position_ids`` int64 [N, T] and, per layer
  i, ``past_key_values.i.key`` / ``past_key_values.i.value`` float32 [N, 2, P, 16]. Outputs:
  ``logits`` float32 [N, T, 128] and ``present.i.key`` / ``present.i.value`` float32 [N, 2, P + T, 16].
  ``N``, ``T`` and ``P`` (the past length, 0 for a prompt) are dynamic.
- ``decoder.calib.npz``: prompt-shaped calibration data, [128, 64] windows of the training text with
  an empty past (``past_key_values.i.*`` float32 [128, 2, 0, 16]), ``attention_mask`` all ones and
  ``position_ids`` 0..63.
- ``decoder.eval.npz``: ``input_ids`` int64 [M, 64] windows of the held-out text and ``targets``
  (the next character of each position).
- ``hf/``: the checkpoint (``config.json``, ``generation_config.json``, ``model.safetensors``) and a
  character tokenizer (``tokenizer.json``, ``tokenizer_config.json``) that encodes text as ``encode``
  does, so tools that read a Hugging Face folder (onnxruntime-genai's model builder) take it as it is.

The model is ``transformers.LlamaForCausalLM`` from a config: vocabulary 128 (characters, as
``models/make_tiny_lm.py`` encodes the same help texts of Python's standard library), width 64, two
layers, 4 query heads sharing 2 key/value heads (head dim 16), SiLU-gated MLP of width 192 (not 128:
onnxruntime-genai's model builder takes any Linear as wide as the vocabulary for the lm_head), RMSNorm,
rotary embeddings, untied lm_head. Every MatMul weight has an input dimension that is a multiple of 32,
so weight-only quantization with groups of 32 applies to all of them. Trained with AdamW for STEPS
steps on 64-character windows; seeded, one thread.
"""

import pathlib
import sys
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from make_tiny_lm import (VOCAB, arguments, checked, corpus, encode, learn, perplexity, split_text,  # noqa: E402
                          unigram_perplexity)

WIDTH, LAYERS, HEADS, KV_HEADS, MLP_WIDTH, CONTEXT = 64, 2, 4, 2, 192, 64
HEAD_DIM = WIDTH // HEADS
STEPS, BATCH_SIZE, CALIB_SIZE = 1000, 16, 128
EOS = 0  # NUL, which the text never holds: an end token for generation loops (the model never learned one)


def build_model(width: int = WIDTH, layers: int = LAYERS, heads: int = HEADS, kv_heads: int = KV_HEADS,
                mlp_width: int = MLP_WIDTH):
    """The bundled decoder's LlamaForCausalLM (random init); other sizes make larger models of the same
    form (bench/bench_memory.py decoder)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=width, intermediate_size=mlp_width, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=width // heads,
        max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=None, eos_token_id=EOS,
        pad_token_id=None, attn_implementation="eager")
    return LlamaForCausalLM(config)


def save_tokenizer(folder: pathlib.Path) -> None:
    """``tokenizer.json`` (and its config) for the checkpoint: one token per character as ``encode``
    maps them (a BPE over the 128 ASCII characters without merges, ``?`` for anything else)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    characters = Tokenizer(models.BPE(vocab={chr(i): i for i in range(VOCAB)}, merges=[], unk_token="?"))
    PreTrainedTokenizerFast(tokenizer_object=characters, unk_token="?", eos_token=chr(EOS)).save_pretrained(folder)


class WithCache(nn.Module):
    """The decoder with its cache as flat tensors: (input_ids, attention_mask, position_ids, past key 0,
    past value 0, ...) -> (logits, present key 0, present value 0, ...)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for layer in range(self.model.config.num_hidden_layers):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
        present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
        return (out.logits, *present)


def cache_names(prefix: str, layers: int = LAYERS) -> list[str]:
    return [f"{prefix}.{layer}.{kind}" for layer in range(layers) for kind in ("key", "value")]


def train(model: nn.Module, ids: np.ndarray) -> None:
    """AdamW on random windows with a linear warmup and decay; mutates ``model``."""
    data = torch.from_numpy(ids)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / 20, (STEPS - s) / (STEPS - 20)))
    model.train()
    for _ in range(STEPS):
        starts = torch.randint(0, len(ids) - CONTEXT - 1, (BATCH_SIZE,)).tolist()
        x = torch.stack([data[s:s + CONTEXT] for s in starts])
        learn(model, model(input_ids=x, labels=x).loss, optimizer, schedule)
    model.eval()


def export(model: nn.Module, path: pathlib.Path, check: bool = True) -> onnx.ModelProto | None:
    """Trace with a past of 3 and 5 new tokens (so no size is 0 or 1 while tracing); all dims dynamic.
    ``check``: load and check the written file (not for a model too large to hold twice)."""
    config = model.config
    layers, kv_heads, head_dim = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
    n, past_len, new = 2, 3, 5
    ids = torch.zeros(n, new, dtype=torch.int64)
    mask = torch.ones(n, past_len + new, dtype=torch.int64)
    positions = torch.arange(past_len, past_len + new)[None].expand(n, new)
    past = [torch.zeros(n, kv_heads, past_len, head_dim) for _ in range(2 * layers)]
    past_names, present_names = cache_names("past_key_values", layers), cache_names("present", layers)
    axes = {"input_ids": {0: "N", 1: "T"}, "attention_mask": {0: "N", 1: "S"},
            "position_ids": {0: "N", 1: "T"}, "logits": {0: "N", 1: "T"},
            **{name: {0: "N", 2: "P"} for name in past_names}, **{name: {0: "N", 2: "S"} for name in present_names}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            WithCache(model), (ids, mask, positions, *past), str(path), dynamo=False, opset_version=17,
            input_names=["input_ids", "attention_mask", "position_ids", *past_names],
            output_names=["logits", *present_names], dynamic_axes=axes)
    return checked(path) if check else None


def prompt_feeds(ids: np.ndarray, layers: int = LAYERS, kv_heads: int = KV_HEADS, head_dim: int = HEAD_DIM
                 ) -> dict[str, np.ndarray]:
    """The inputs for prompts ``ids`` [M, T] with an empty past."""
    m, t = ids.shape
    empty = np.zeros((m, kv_heads, 0, head_dim), np.float32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids),
            "position_ids": np.broadcast_to(np.arange(t, dtype=np.int64), (m, t)).copy(),
            **{name: empty for name in cache_names("past_key_values", layers)}}


def check_cache(session: ort.InferenceSession, model: nn.Module, ids: np.ndarray) -> float:
    """Max |diff| of the last position's logits: prompt in one run vs prompt[:-8] then 8 tokens with its past."""
    full = session.run(["logits"], prompt_feeds(ids))[0]
    head = session.run(None, prompt_feeds(ids[:, :-8]))
    tail = {"input_ids": ids[:, -8:], "attention_mask": np.ones_like(ids),
            "position_ids": np.broadcast_to(np.arange(ids.shape[1] - 8, ids.shape[1]), (len(ids), 8)).copy(),
            **dict(zip(cache_names("past_key_values"), head[1:]))}
    stepped = session.run(["logits"], tail)[0]
    with torch.no_grad():
        reference = model(input_ids=torch.from_numpy(ids)).logits.numpy()
    return max(float(np.abs(stepped[:, -1] - full[:, -1]).max()), float(np.abs(full - reference).max()))


def main() -> None:
    args = arguments(__doc__, __file__)

    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    text, digest = corpus()
    train_ids, held_out = split_text(encode(text))
    model = build_model()
    train(model, train_ids)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out_dir / "hf")
    save_tokenizer(args.out_dir / "hf")
    onnx_path = args.out_dir / "decoder.onnx"
    proto = export(model, onnx_path)
    rng = np.random.default_rng(args.seed)
    starts = rng.choice(len(train_ids) - CONTEXT, CALIB_SIZE, replace=False)
    calib = np.stack([train_ids[s:s + CONTEXT] for s in sorted(starts)])
    np.savez(args.out_dir / "decoder.calib.npz", **prompt_feeds(calib))
    chunks = [c for c in held_out if len(c) > CONTEXT]
    eval_ids = np.stack([c[:CONTEXT] for c in chunks])
    np.savez(args.out_dir / "decoder.eval.npz", input_ids=eval_ids,
             targets=np.stack([c[1:CONTEXT + 1] for c in chunks]))

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    max_diff = check_cache(session, model, eval_ids[:8])
    if max_diff > 1e-3:
        raise SystemExit(f"onnxruntime (with and without past) vs torch: max |diff| {max_diff:.2e} > 1e-3")
    logits = session.run(["logits"], prompt_feeds(eval_ids))[0]
    targets = np.stack([c[1:CONTEXT + 1] for c in chunks])
    ppl, base = perplexity(logits, targets), unigram_perplexity(train_ids, targets)
    print(f"text sha256 {digest[:16]}; FP32 eval perplexity {ppl:.3f} (unigram {base:.3f}) on {targets.size} "
          f"targets; max |diff| {max_diff:.1e}; {len(proto.graph.node)} nodes")
    if ppl > base / 2:
        raise SystemExit(f"eval perplexity {ppl:.3f} is not clearly below unigram {base:.3f}; train longer (STEPS)")


if __name__ == "__main__":
    main()
