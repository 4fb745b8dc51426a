"""onnxflex.generate and ``compare --generate N`` on the decoder fixtures (models/decoder: the export with
past key/values, and genai/: the builder's GroupQueryAttention form, the same weights) against their W4 g32
RTN models: greedy generation with the cache, held-out KL and perplexity, the gate, the JSON fields and
the inputs it refuses.

Measured on the first 12 eval sequences (32-token prompts, 32 tokens): W4 g32 RTN agrees on 85.4 % of
the reference's tokens along them (20 % running free), mean KL 0.0178 nats/token, perplexity 3.759 →
3.842; both forms give the same figures.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from helpers import MODELS
from onnxflex import QuantConfig, quantize
from onnxflex.cli import main
from onnxflex.errors import CalibrationError, UnsupportedModelError
from onnxflex.generate import compare_generation, decoder_io, greedy, log_softmax, step_feeds
from onnxflex.ort import session

DECODER = MODELS / "decoder" / "decoder.onnx"
GENAI = MODELS / "decoder" / "genai" / "model.onnx"
EVAL = MODELS / "decoder" / "decoder.eval.npz"
TOKENIZER = MODELS / "decoder" / "hf" / "tokenizer.json"
W4 = QuantConfig(wbits=4, abits=0, group_size=32, method="rtn", preset="fast", calib_samples=48, verify_samples=8,
                 latency_rules=False, seed=0)


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def w4_paths(tmp_path_factory):
    """W4 g32 RTN of both forms, each in a folder of its own (the builder form's without a genai_config.json:
    its cache's head size comes from the reference's)."""
    calib = dict(np.load(MODELS / "decoder" / "decoder.calib.npz"))
    folder = tmp_path_factory.mktemp("generate")
    np.savez(folder / "calib.npz", **{k: v for k, v in calib.items() if k != "position_ids"})
    paths = {}
    for form, source, data in [("export", DECODER, MODELS / "decoder" / "decoder.calib.npz"),
                               ("genai", GENAI, folder / "calib.npz")]:
        (folder / form).mkdir()
        paths[form] = quantize(str(source), str(data), W4, progress=False).save(folder / form / "model.onnx")
        (folder / form / "genai_config.json").unlink(missing_ok=True)
    return paths


@pytest.fixture(scope="module")
def ids() -> np.ndarray:
    return np.load(EVAL)["input_ids"][:12]


@pytest.mark.parametrize("form, reference", [("export", DECODER), ("genai", GENAI)])
def test_w4_generation_and_held_out_figures(form, reference, w4_paths, ids):
    result = compare_generation(reference, w4_paths[form], ids, 32, prompt_len=32)
    print(f"\n{form}: agreement {result.token_agreement:.3f} (free {result.free_running_agreement:.3f}), "
          f"KL {result.mean_kl:.4f}, perplexity {result.perplexity}")
    assert result.prompt_len == 32 and result.heldout_tokens == 12 * 63 and len(result.first_divergence) == 12
    assert 0.83 <= result.token_agreement < 1.0, f"{form}: agreement {result.token_agreement:.3f} not in [0.83, 1)"
    assert result.free_running_agreement <= result.token_agreement, result
    assert 0.001 < result.mean_kl < 0.05, f"{form}: mean KL {result.mean_kl:.4f} nats/token not in (0.001, 0.05)"
    ppl = result.perplexity
    assert 1.0 < ppl["reference"] < ppl["candidate"] < 1.05 * ppl["reference"], ppl
    diverged = [s for s in result.first_divergence if s is not None]
    assert diverged and result.earliest_divergence == min(diverged)


def test_both_forms_give_the_same_figures_and_a_model_matches_itself(w4_paths, ids):
    export = compare_generation(DECODER, w4_paths["export"], ids[:6], 16).to_dict()
    genai = compare_generation(GENAI, w4_paths["genai"], ids[:6], 16).to_dict()
    for key in ("token_agreement", "free_running_agreement", "first_divergence"):
        assert export[key] == genai[key], (key, export[key], genai[key])
    assert abs(export["mean_kl"] - genai["mean_kl"]) < 1e-3 * export["mean_kl"], (export["mean_kl"], genai["mean_kl"])
    same = compare_generation(DECODER, GENAI, ids[:6], 16)
    assert same.token_agreement == same.free_running_agreement == 1.0 and same.earliest_divergence is None
    assert same.mean_kl < 1e-6 and abs(same.perplexity["reference"] / same.perplexity["candidate"] - 1) < 1e-5


def test_figures_match_a_direct_computation(w4_paths, ids):
    """Perplexity and KL from one plain onnxruntime run per model; the greedy tokens from one run over
    the prompt and its continuation without the cache."""
    ref, cand = onnx.load(str(DECODER)), onnx.load(str(w4_paths["export"]))
    io = decoder_io(ref, "the decoder")
    logits = [session(m, ["CPUExecutionProvider"]).run(["logits"], step_feeds(io, ids))[0][:, :-1] for m in (ref, cand)]
    p, q = (log_softmax(x) for x in logits)
    nll = -np.take_along_axis(p, ids[:, 1:, None], -1).mean()
    kl = float((np.exp(p) * (p - q)).sum(-1).mean())
    result = compare_generation(DECODER, w4_paths["export"], ids, 8, prompt_len=20, batch_size=5)
    assert abs(result.perplexity["reference"] - np.exp(nll)) < 1e-6 * np.exp(nll)
    assert abs(result.mean_kl - kl) < 1e-6 * kl, (result.mean_kl, kl)

    sess = session(ref, ["CPUExecutionProvider"])
    tokens = greedy(sess, io, ids[:, :20], 8)[0]
    whole = np.concatenate([ids[:, :20], tokens[:, :-1]], 1)
    at_once = sess.run(["logits"], step_feeds(io, whole))[0][:, 19:].argmax(-1)
    assert (at_once == tokens).mean() > 0.99, "cached greedy steps differ from one run over the sequence"


def test_cli_gate_and_json(w4_paths):
    args = ("compare", DECODER, w4_paths["export"], "--data", EVAL, "--samples", 12, "--generate", 32, "--json")
    report = json.loads(invoke(*args).output)
    assert {"token_agreement", "free_running_agreement", "first_divergence", "earliest_divergence", "mean_kl",
            "perplexity", "heldout_tokens", "prompts", "prompt_len", "steps", "passed"} <= set(report), report
    assert report["prompts"] == 12 and report["prompt_len"] == 32 and report["passed"]
    agreement = report["token_agreement"]
    passing = invoke(*args, "--min-token-agreement", agreement - 0.01)
    assert passing.exit_code == 0 and json.loads(passing.output)["passed"], passing.output
    failing = invoke(*args[:-1], "--min-token-agreement", agreement + 0.01)
    assert failing.exit_code == 1, failing.output
    assert "gate failed: greedy token agreement" in failing.output and "KL(reference || candidate)" in failing.output
    assert "gates: greedy token agreement" in failing.output, failing.output



def test_text_data_is_cut_into_windows(w4_paths, tmp_path):
    corpus = tmp_path / "corpus.txt"
    shutil.copyfile(MODELS.parent / "README.md", corpus)
    result = invoke("compare", GENAI, w4_paths["genai"], "--data", corpus, "--tokenizer", TOKENIZER, "--seq-len", 24,
                    "--samples", 4, "--generate", 6, "--prompt-len", 8, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["prompts"] == 4 and report["prompt_len"] == 8 and report["heldout_tokens"] == 4 * 23, report
    no_len = invoke("compare", GENAI, w4_paths["genai"], "--data", corpus, "--tokenizer", TOKENIZER, "--generate", 6)
    assert no_len.exit_code == 2 and "pass --seq-len" in no_len.output, no_len.output


def test_bad_input_exits_2_with_the_reason(w4_paths, tmp_path):
    plain = invoke("compare", MODELS / "tiny_lm.onnx", MODELS / "tiny_lm.onnx", "--data", EVAL, "--generate", 4)
    assert plain.exit_code == 2 and "has no key/value cache" in plain.output, plain.output
    np.savez(tmp_path / "no_ids.npz", tokens=np.zeros((2, 8), np.int64))
    no_ids = invoke("compare", DECODER, w4_paths["export"], "--data", tmp_path / "no_ids.npz", "--generate", 4)
    assert no_ids.exit_code == 2 and "has no input_ids array" in no_ids.output, no_ids.output
    np.savez(tmp_path / "big_ids.npz", input_ids=np.full((2, 8), 128, np.int64))
    big = invoke("compare", DECODER, w4_paths["export"], "--data", tmp_path / "big_ids.npz", "--generate", 4)
    assert big.exit_code == 2 and "outside the models' vocabulary of 128" in big.output, big.output
    mixed = invoke("compare", DECODER, w4_paths["export"], "--data", EVAL, "--generate", 4, "--min-sqnr", 20)
    assert mixed.exit_code == 2 and "--min-sqnr compare outputs" in mixed.output, mixed.output
    alone = invoke("compare", DECODER, w4_paths["export"], "--data", EVAL, "--min-token-agreement", 0.5)
    assert alone.exit_code == 2 and "apply to --generate N only" in alone.output, alone.output

    model = onnx.load(str(DECODER))
    model.graph.input.append(onnx.helper.make_tensor_value_info("temperature", onnx.TensorProto.FLOAT, []))
    with pytest.raises(UnsupportedModelError, match=r"inputs \['temperature'\] it cannot fill"):
        decoder_io(model, "the decoder")
    genai = onnx.load(str(GENAI), load_external_data=False)
    with pytest.raises(CalibrationError, match="model.decoder.head_size"):
        decoder_io(genai, "the builder form")  # no genai_config.json looked for: the head size is unknown
