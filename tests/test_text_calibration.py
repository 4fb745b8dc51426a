"""Calibration from text for the decoder fixtures (onnxflex.text): the README tokenized with the fixtures'
character tokenizer, cut into windows of --seq-len, fed as prompts with an empty key/value cache; and
the genai_config.json of the builder's form kept beside the quantized model."""
from __future__ import annotations

import json
import logging
import shutil
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from tokenizers import Tokenizer

from helpers import MODELS
from onnxflex import QuantConfig, quantize
from onnxflex.api import keep_genai_config
from onnxflex.cli import main
from onnxflex.errors import CalibrationError
from onnxflex.inputs import InputOptions
from onnxflex.options import resolve
from onnxflex.sources import resolve_calibration
from onnxflex.text import load_text

ROOT = MODELS.parent
DECODER = MODELS / "decoder" / "decoder.onnx"
GENAI = MODELS / "decoder" / "genai" / "model.onnx"
TOKENIZER = MODELS / "decoder" / "hf" / "tokenizer.json"
LAYERS, KV_HEADS, HEAD_DIM = 2, 2, 16


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    shutil.copyfile(ROOT / "README.md", path)
    return path


@pytest.fixture(scope="module")
def token_ids(corpus):
    return np.asarray(Tokenizer.from_file(str(TOKENIZER)).encode(corpus.read_text(), add_special_tokens=False).ids)


def header(path) -> onnx.ModelProto:
    return onnx.load(str(path), load_external_data=False)


def text_set(model_path, corpus, seq_len=32, count=5, model=None, options=InputOptions()):
    model = model if model is not None else header(model_path)
    return load_text(corpus, model, model_path, str(TOKENIZER), seq_len, count, options)


def config(**given) -> QuantConfig:
    return QuantConfig(wbits=4, abits=0, group_size=32, method="rtn", tokenizer=str(TOKENIZER), **given)


def test_the_torch_export_gets_windows_masks_positions_and_an_empty_cache(corpus, token_ids):
    data = text_set(DECODER, corpus)
    feeds = data.feeds()
    assert np.array_equal(feeds["input_ids"], token_ids[:5 * 32].reshape(5, 32))
    assert feeds["input_ids"].dtype == np.int64
    assert np.array_equal(feeds["attention_mask"], np.ones((5, 32), np.int64))
    assert np.array_equal(feeds["position_ids"], np.tile(np.arange(32), (5, 1)))
    for layer in range(LAYERS):
        for kind in ("key", "value"):
            past = feeds[f"past_key_values.{layer}.{kind}"]
            assert past.shape == (5, KV_HEADS, 0, HEAD_DIM) and past.dtype == np.float32


def test_the_builder_form_takes_its_head_size_from_genai_config(corpus, token_ids):
    feeds = text_set(GENAI, corpus, seq_len=20, count=3).feeds()
    assert "position_ids" not in feeds
    assert np.array_equal(feeds["input_ids"], token_ids[:60].reshape(3, 20))
    assert feeds["past_key_values.1.value"].shape == (3, KV_HEADS, 0, HEAD_DIM)


def test_without_genai_config_an_unknown_head_size_is_an_error(corpus, tmp_path):
    alone = tmp_path / "model.onnx"
    shutil.copyfile(GENAI, alone)
    with pytest.raises(CalibrationError, match=r"past_key_values\.0\.key.*model\.decoder\.head_size"):
        text_set(alone, corpus)


def test_window_count_follows_calib_samples_then_synthetic_samples(corpus):
    def count(**given):
        data = resolve_calibration(corpus, header(DECODER), DECODER, resolve(config(**given)).data)
        return data.num_samples

    assert count(seq_len=64, calib_samples=7) == 7
    assert count(seq_len=64, synthetic_samples=9) == 9
    assert count(seq_len=64) == 128  # synthetic_samples' default


def test_fewer_windows_than_asked_takes_them_all_with_a_warning(corpus, token_ids, caplog):
    seq_len = len(token_ids) // 3
    with caplog.at_level(logging.WARNING, "onnxflex"):
        data = text_set(DECODER, corpus, seq_len=seq_len, count=50)
    assert data.num_samples == 3
    assert "fewer than the 50 asked for" in caplog.text


def test_too_little_text_for_one_window_is_an_error(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    with pytest.raises(CalibrationError, match="holds 4 tokens, too few for one window of --seq-len 32"):
        text_set(DECODER, short)


def test_a_dynamic_length_needs_seq_len(corpus):
    with pytest.raises(CalibrationError, match="no fixed sequence length: pass --seq-len"):
        text_set(DECODER, corpus, seq_len=0)


def test_an_input_text_cannot_feed_is_named(corpus):
    model = header(DECODER)
    model.graph.input.append(onnx.helper.make_tensor_value_info("temperature", onnx.TensorProto.FLOAT, []))
    with pytest.raises(CalibrationError, match="model's input 'temperature' is none of them"):
        text_set(DECODER, corpus, model=model)
    pinned = text_set(DECODER, corpus, model=model, options=InputOptions(fixed={"temperature": 0.5}))
    assert pinned.shared["temperature"] == np.float32(0.5) and pinned.num_samples == 5


def test_text_needs_a_tokenizer_and_a_tokenizer_needs_text(corpus, tmp_path):
    with pytest.raises(CalibrationError, match="pass --tokenizer tokenizer.json"):
        resolve_calibration(corpus, header(DECODER), DECODER, resolve(QuantConfig(seq_len=32)).data)
    with pytest.raises(CalibrationError, match="tokenize a .txt calibration, but calibration comes from"):
        resolve_calibration(MODELS / "decoder" / "decoder.calib.npz", header(DECODER), DECODER,
                            resolve(config(seq_len=32)).data)
    out = tmp_path / "q.onnx"
    runner = CliRunner().invoke(main, ["quantize", str(DECODER), "-o", str(out), "--calib", str(corpus),
                                       "--seq-len", "32"], catch_exceptions=False)
    assert runner.exit_code == 2 and "pass --tokenizer" in runner.output and not out.exists()


def test_without_the_tokenizers_library_the_error_names_the_extra(corpus, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(CalibrationError, match=r"pip install 'onnxflex\[text\]'"):
        text_set(DECODER, corpus)
    runner = CliRunner().invoke(main, ["quantize", str(DECODER), "-o", str(tmp_path / "q.onnx"), "--calib",
                                       str(corpus), "--tokenizer", str(TOKENIZER), "--seq-len", "32"],
                                catch_exceptions=False)
    assert runner.exit_code == 2 and "onnxflex[text]" in runner.output


@pytest.mark.parametrize("model", [DECODER, GENAI], ids=["torch-export", "genai-builder"])
def test_both_decoder_forms_quantize_from_text_and_run_with_the_cache(model, corpus, token_ids, tmp_path):
    out = tmp_path / "q.onnx"
    runner = CliRunner().invoke(main, ["quantize", str(model), "-o", str(out), "--calib", str(corpus),
                                       "--tokenizer", str(TOKENIZER), "--seq-len", "32", "--calib-samples", "16",
                                       "--wbits", "4", "--abits", "0", "--group-size", "32", "--method", "rtn",
                                       "--quiet"], catch_exceptions=False)
    assert runner.exit_code == 0, runner.output
    report = json.loads((tmp_path / "q.onnx.report.json").read_text())
    assert report["calibration"]["source"].endswith("(16 windows of 32 tokens)")
    assert report["calibration"]["reconstruction_samples"] + report["calibration"]["verification_samples"] == 16
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    feeds = text_set(model, corpus, seq_len=8, count=2).feeds()
    logits = sess.run(["logits"], {i.name: feeds[i.name] for i in sess.get_inputs()})[0]
    assert logits.shape == (2, 8, 128) and np.isfinite(logits).all()


def test_the_builder_forms_genai_config_is_copied_naming_the_quantized_file(corpus, tmp_path):
    out = tmp_path / "q" / "decoder.q.onnx"
    quantize(GENAI, corpus, config(seq_len=32, calib_samples=8), progress=False).save(out)
    copied = json.loads((out.parent / "genai_config.json").read_text())
    original = json.loads((GENAI.parent / "genai_config.json").read_text())
    assert copied["model"]["decoder"]["filename"] == "decoder.q.onnx"
    copied["model"]["decoder"]["filename"] = original["model"]["decoder"]["filename"]
    assert copied == original


def test_the_builder_forms_tokenizer_files_are_copied_and_ones_already_there_kept(tmp_path):
    """onnxruntime-genai's Tokenizer reads tokenizer.json and tokenizer_config.json from the model's folder."""
    source = tmp_path / "in" / "model.onnx"
    source.parent.mkdir()
    for name in ("genai_config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(GENAI.parent / name, source.parent / name)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "tokenizer_config.json").write_text("{}")  # the user's: not replaced
    assert keep_genai_config(source, tmp_path / "out" / "q.onnx") == tmp_path / "out" / "genai_config.json"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["genai_config.json", "tokenizer.json",
                                                                    "tokenizer_config.json"]
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (GENAI.parent / "tokenizer.json").read_bytes()
    assert (tmp_path / "out" / "tokenizer_config.json").read_text() == "{}"


def test_a_model_without_genai_config_gets_none(tmp_path):
    out = tmp_path / "q.onnx"
    assert keep_genai_config(DECODER, out) is None
    assert not (tmp_path / "genai_config.json").exists()


def test_a_different_genai_config_already_there_is_kept_with_a_warning(tmp_path, caplog):
    source = tmp_path / "model.onnx"
    shutil.copyfile(GENAI.parent / "genai_config.json", tmp_path / "genai_config.json")
    before = (tmp_path / "genai_config.json").read_text()
    with caplog.at_level(logging.WARNING, "onnxflex"):
        assert keep_genai_config(source, tmp_path / "model.q.onnx") is None
    assert (tmp_path / "genai_config.json").read_text() == before
    assert "is kept as it is" in caplog.text
    caplog.clear()
    other = tmp_path / "other"
    other.mkdir()
    assert keep_genai_config(source, other / "model.onnx") == other / "genai_config.json"
    with caplog.at_level(logging.WARNING, "onnxflex"):  # the same copy again: written, nothing to say
        assert keep_genai_config(source, other / "model.onnx") == other / "genai_config.json"
    assert not caplog.text
    assert json.loads((other / "genai_config.json").read_text()) == json.loads(before)
