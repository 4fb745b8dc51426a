"""Greedy generation with the key/value cache, and a teacher-forced pass on held-out tokens, for an ONNX
decoder; ``onnxflex compare --generate N`` compares two such models (FP32 and quantized) with them.

Two decoder forms are fed: an export with past key/values (input_ids, attention_mask, position_ids,
``past_key_values.N.key/value`` in, ``present.N.*`` out: the caller feeds each present back as the next
past) and onnxruntime-genai's form (GroupQueryAttention holds the cache; input_ids, attention_mask and
the past only: it counts positions itself). Which input is which cache tensor comes from the graph
(passes.kv_cache.cache_pairs); batch, kv heads, head size and dtype of the cache from its declared
shape, dims it leaves unknown from the genai_config.json beside the model.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

from onnxflex.calib import read_npz
from onnxflex.errors import CalibrationError, ModelLoadError, UnsupportedModelError
from onnxflex.graph import graph_input_names, load_model
from onnxflex.inputs import NP_TYPES, input_dims, model_inputs
from onnxflex.ort import session
from onnxflex.passes.kv_cache import cache_pairs
from onnxflex.text import empty_cache_shape, genai_config_path, is_text, token_windows

PROVIDERS = ["CPUExecutionProvider"]
FILLED = ("input_ids", "attention_mask", "position_ids")  # the inputs besides the cache that a step feeds


@dataclass(frozen=True)
class Decoder:
    """How to feed one decoder. ``cache``: past input → the present output fed back as it;
    ``cache_dims``: past input → (kv heads, head size); ``types``: input → numpy dtype; ``vocab``: the
    logits' last dim where declared."""

    inputs: tuple[str, ...]
    logits: str
    cache: dict[str, str]
    cache_dims: dict[str, tuple[int, int]]
    types: dict[str, type]
    vocab: int | None = None


def decoder_io(model: onnx.ModelProto, name: str, config_dirs: tuple[Path | None, ...] = ()) -> Decoder:
    """The Decoder of ``model`` (``name`` labels it in errors); a genai_config.json is looked for beside
    each path of ``config_dirs`` in turn. Raises UnsupportedModelError for a model without a cache, an
    input no step can fill, or no logits output."""
    cache = cache_pairs(model)
    if not cache:
        raise UnsupportedModelError(f"{name} has no key/value cache (past inputs fed back from present outputs): "
                                    "--generate needs a decoder exported with past key/values")
    vis = model_inputs(model)
    unknown = [i for i in graph_input_names(model) if i not in cache and i not in FILLED]
    if unknown or "input_ids" not in vis:
        what = f"inputs {unknown} it cannot fill" if unknown else "no input_ids input"
        raise UnsupportedModelError(f"{name} has {what}: --generate feeds input_ids, attention_mask, position_ids "
                                    "and the key/value cache only")
    outputs = [o.name for o in model.graph.output if o.name not in cache.values()]
    logits = "logits" if "logits" in outputs else (outputs[0] if len(outputs) == 1 else None)
    if logits is None:
        raise UnsupportedModelError(f"{name} has outputs {outputs} besides its cache and none is named 'logits': "
                                    "--generate reads the next-token logits from one output")
    source = next((p for p in config_dirs if p is not None and genai_config_path(p).is_file()), None)
    fix = "export the model with static kv heads and head size or put its genai_config.json beside it"
    dims = {}
    for past in cache:
        shape = empty_cache_shape(vis[past], 1, source, fix)
        dims[past] = (shape[1], shape[3])
    types = {i: NP_TYPES[vis[i].type.tensor_type.elem_type] for i in graph_input_names(model)}
    logits_dims = input_dims(next(o for o in model.graph.output if o.name == logits))
    return Decoder(tuple(graph_input_names(model)), logits, cache, dims, types, logits_dims[-1] if logits_dims else None)


def step_feeds(decoder: Decoder, ids: np.ndarray, past: dict[str, np.ndarray] | None = None,
               past_len: int = 0) -> dict[str, np.ndarray]:
    """One run's feeds: ``ids`` [M, T] after ``past_len`` cached positions, the cache from ``past`` (the
    previous run's outputs by name) or empty [M, kv heads, 0, head size]; mask ones, positions counted on."""
    m, t = ids.shape
    values = {"input_ids": ids, "attention_mask": np.ones((m, past_len + t)),
              "position_ids": np.broadcast_to(np.arange(past_len, past_len + t), (m, t))}
    for name, present in decoder.cache.items():
        heads, size = decoder.cache_dims[name]
        values[name] = past[present] if past is not None else np.zeros((m, heads, 0, size))
    return {name: np.ascontiguousarray(values[name], decoder.types[name]) for name in decoder.inputs}


def greedy(sess, decoder: Decoder, prompts: np.ndarray, steps: int,
           forced: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Greedy decoding of ``steps`` tokens after ``prompts`` [M, P]: the prompt with an empty cache, then
    one token per run with the cache the previous run returned; feeds ``forced`` [M, steps] instead of
    the argmax when given. Returns (argmax tokens [M, steps] int64, last-position logits [M, steps, V])."""
    names = [o.name for o in sess.get_outputs()]
    out = dict(zip(names, sess.run(None, step_feeds(decoder, prompts))))
    tokens, logits = [], []
    for step in range(steps):
        logits.append(out[decoder.logits][:, -1])
        tokens.append(logits[-1].argmax(-1).astype(np.int64))
        if step + 1 < steps:
            fed = tokens[-1] if forced is None else forced[:, step]
            out = dict(zip(names, sess.run(None, step_feeds(decoder, fed[:, None], out, prompts.shape[1] + step))))
    return np.stack(tokens, 1), np.stack(logits, 1)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@dataclass
class GenerationComparison:
    """Free-running greedy generation of both models from the same prompts, and a teacher-forced pass of
    both over held-out sequences. ``token_agreement``: the fraction of the reference's greedy tokens that
    the candidate's argmax matches when fed the reference's tokens (so one early miss does not decide every
    later step); ``free_running_agreement``: the same fraction for the candidate's own greedy tokens;
    ``first_divergence``: per prompt, the first step whose tokens differ (None: none does), the same in
    both runs. KL and negative log-likelihoods are in nats per predicted token."""

    reference: str
    candidate: str
    steps: int
    prompt_len: int
    token_agreement: float
    free_running_agreement: float
    first_divergence: list[int | None]
    heldout_sequences: int
    heldout_tokens: int
    mean_kl: float
    perplexity: dict[str, float]
    failures: list[str] = field(default_factory=list)

    @property
    def earliest_divergence(self) -> int | None:
        steps = [s for s in self.first_divergence if s is not None]
        return min(steps) if steps else None

    def to_dict(self) -> dict:
        return {**asdict(self), "prompts": len(self.first_divergence),
                "earliest_divergence": self.earliest_divergence, "passed": not self.failures}


def compare_generation(reference: str | os.PathLike, candidate: str | os.PathLike, ids: np.ndarray, steps: int, *,
                       prompt_len: int = 0, batch_size: int = 16, threads: int = 0,
                       min_token_agreement: float | None = None) -> GenerationComparison:
    """Both decoders on token sequences ``ids`` [N, L]: greedy generation of ``steps`` tokens from each
    sequence's first ``prompt_len`` tokens [default: L // 2] (the candidate's argmax along the
    reference's tokens, and its own free run; GenerationComparison), and one teacher-forced run per sequence
    (empty cache) giving mean KL(reference || candidate) over the next-token distributions at positions
    0..L-2 and each model's perplexity on tokens 1..L-1. Runs ``batch_size`` sequences at a time."""
    ids = _check_ids(ids, steps, prompt_len)
    prompt_len = prompt_len or max(ids.shape[1] // 2, 1)
    paths = (Path(reference), Path(candidate))
    models = [load_model(p) for p in paths]
    decoders = [decoder_io(m, f"model {str(p)!r}", (p, *paths)) for m, p in zip(models, paths)]
    vocab = min((d.vocab for d in decoders if d.vocab), default=None)
    if ids.min() < 0 or (vocab and ids.max() >= vocab):
        raise CalibrationError(f"token ids run from {ids.min()} to {ids.max()}, outside the models' vocabulary of "
                               f"{vocab} (the logits' last dim): pass ids from the models' tokenizer")
    sessions = [session(m, PROVIDERS, threads) for m in models]
    agree, free, divergence = 0, 0, []
    kl = 0.0
    nll = [0.0, 0.0]
    for start in range(0, len(ids), batch_size):
        chunk = ids[start:start + batch_size]
        prompt = chunk[:, :prompt_len]
        ref_tokens = greedy(sessions[0], decoders[0], prompt, steps)[0]
        along = greedy(sessions[1], decoders[1], prompt, steps, forced=ref_tokens)[0] == ref_tokens
        agree += int(along.sum())
        free += int((greedy(sessions[1], decoders[1], prompt, steps)[0] == ref_tokens).sum())
        divergence += [None if row.all() else int(np.argmin(row)) for row in along]
        logp = [log_softmax(s.run([d.logits], step_feeds(d, chunk))[0][:, :-1]) for s, d in zip(sessions, decoders)]
        if logp[0].shape != logp[1].shape:
            raise ModelLoadError(f"the models' logits differ in shape: {list(logp[0].shape)} vs {list(logp[1].shape)}")
        kl += float(np.sum(np.exp(logp[0]) * (logp[0] - logp[1])))
        target = chunk[:, 1:, None]
        nll = [total - float(np.take_along_axis(lp, target, -1).sum()) for total, lp in zip(nll, logp)]
    predicted = ids.shape[0] * (ids.shape[1] - 1)
    generated = ids.shape[0] * steps
    result = GenerationComparison(str(reference), str(candidate), steps, prompt_len, agree / generated,
                                  free / generated, divergence, ids.shape[0], predicted, kl / predicted,
                                  {"reference": float(np.exp(nll[0] / predicted)),
                                   "candidate": float(np.exp(nll[1] / predicted))})
    if min_token_agreement is not None and result.token_agreement < min_token_agreement:
        result.failures.append(f"greedy token agreement {result.token_agreement:.4f} < {min_token_agreement:g} "
                               f"over {steps} generated tokens")
    return result


def generation_ids(data: str | os.PathLike, tokenizer: str = "", seq_len: int = 0, samples: int = 0) -> np.ndarray:
    """Token sequences [N, L] for compare_generation: the input_ids array of an .npz, or the text of a
    .txt cut into windows of ``seq_len`` tokens by the tokenizer.json ``tokenizer`` (as quantize --calib
    corpus.txt cuts them); the first ``samples`` of them (0: all)."""
    path = Path(data)
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise CalibrationError(f"--data {str(path)!r} {what}; pass an .npz with input_ids or a .txt with --tokenizer")
    if is_text(path):
        if not seq_len:
            raise CalibrationError(f"--data {str(path)!r} is text: pass --seq-len for the length of its windows")
        return token_windows(path, tokenizer, seq_len, samples)
    if tokenizer or seq_len:
        raise CalibrationError(f"--tokenizer and --seq-len cut a .txt into windows, but --data {str(path)!r} is not "
                               "one: drop them or pass --data corpus.txt")
    arrays = read_npz(path, {"input_ids"})
    if "input_ids" not in arrays:
        raise CalibrationError(f"--data {str(path)!r} has no input_ids array: --generate reads token ids from it")
    return arrays["input_ids"][:samples or None]


def _check_ids(ids: np.ndarray, steps: int, prompt_len: int) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.ndim != 2 or ids.shape[1] < 2 or not np.issubdtype(ids.dtype, np.integer) or not ids.size:
        raise CalibrationError(f"input_ids must be integer token ids [sequences, length >= 2], not "
                               f"{ids.dtype} {list(ids.shape)}")
    if steps < 1:
        raise CalibrationError(f"--generate {steps}: generate at least 1 token")
    if not 0 <= prompt_len <= ids.shape[1]:
        raise CalibrationError(f"--prompt-len {prompt_len} is not within the sequences' {ids.shape[1]} tokens")
    return ids.astype(np.int64)


def format_generation(result: GenerationComparison) -> str:
    """The report, figures labelled, models in argument order (reference, then candidate)."""
    n = len(result.first_divergence)
    diverged = sum(s is not None for s in result.first_divergence)
    first = ("no prompt diverges" if result.earliest_divergence is None else
             f"first divergence at step {result.earliest_divergence} (earliest; {diverged} of {n} prompts diverge)")
    ppl = result.perplexity
    return "\n".join([
        f"reference: {result.reference}", f"candidate: {result.candidate}",
        f"generation: {result.steps} greedy tokens after {result.prompt_len}-token prompts on {n} sequences: "
        f"token agreement {result.token_agreement:.2%} along the reference's tokens "
        f"({result.free_running_agreement:.2%} running free), {first}",
        f"held-out: {result.heldout_sequences} sequences, {result.heldout_tokens} predicted tokens: mean "
        f"KL(reference || candidate) {result.mean_kl:.5f} nats/token, perplexity reference {ppl['reference']:.3f}, "
        f"candidate {ppl['candidate']:.3f}",
        "gates: " + ("; ".join(result.failures) if result.failures else "all passed")])
