"""Calibration from a text file for a decoder: tokenized (the ``tokenizers`` library, the ``text`` extra)
and cut into token windows, fed as prompts with an empty key/value cache."""
from __future__ import annotations

import json
import logging
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx

from onnxflex.calib import CalibrationSet, check_calibration
from onnxflex.errors import CalibrationError
from onnxflex.inputs import NP_TYPES, InputOptions, input_dims, model_inputs, show_dims
from onnxflex.passes.kv_cache import cache_tensors

log = logging.getLogger("onnxflex")

TEXT_SUFFIXES = (".txt",)
CACHE_CONFIG_DIMS = {1: "num_key_value_heads", 3: "head_size"}  # genai_config.json's names of a cache's dims


def is_text(calibration) -> bool:
    return isinstance(calibration, (str, os.PathLike)) and Path(calibration).suffix.lower() in TEXT_SUFFIXES


def load_text(path: Path, model: onnx.ModelProto, model_path: Path | None, tokenizer: str, seq_len: int,
              count: int, options: InputOptions) -> CalibrationSet:
    """At most ``count`` non-overlapping windows of ``seq_len`` tokens of the text in ``path`` as
    input_ids [N, seq_len]; attention_mask ones and position_ids 0..seq_len-1 where the model has them;
    every key/value cache input empty: [N, kv_heads, 0, head_dim] (dims the model leaves unknown come
    from the genai_config.json beside ``model_path``)."""
    inputs = model_inputs(model)
    if "input_ids" not in inputs:
        raise CalibrationError(f"calibration {str(path)!r} is text, but the model has no input_ids input; its "
                               f"inputs are {', '.join(inputs)}")
    seq_len = seq_len or _fixed_length(input_dims(inputs["input_ids"]))
    windows = token_windows(path, tokenizer, seq_len, count)
    n = len(windows)
    arrays = {"input_ids": windows}
    cache = cache_tensors(model)
    for name, vi in inputs.items():
        if name in options.fixed or name == "input_ids":
            continue
        if name == "attention_mask":
            arrays[name] = np.ones((n, seq_len), np.int64)
        elif name == "position_ids":
            arrays[name] = np.broadcast_to(np.arange(seq_len, dtype=np.int64), (n, seq_len))
        elif name in cache:
            arrays[name] = np.zeros(empty_cache_shape(vi, n, model_path), NP_TYPES[vi.type.tensor_type.elem_type])
        else:
            raise CalibrationError(f"calibration {str(path)!r} is text, which feeds input_ids, attention_mask, "
                                   f"position_ids and the key/value cache; the model's input {name!r} is none of "
                                   f"them: store the inputs in an .npz, or pin it with --fix-input {name}=VALUE")
    arrays = {k: a.astype(NP_TYPES[inputs[k].type.tensor_type.elem_type], copy=False) for k, a in arrays.items()}
    source = f"{str(path)!r} ({n} windows of {seq_len} tokens)"
    samples_first = replace(options, batch_axes={**options.batch_axes, **dict.fromkeys(arrays, 0)})
    return check_calibration(arrays, model, source, samples_first)


def token_windows(path: Path, tokenizer: str, seq_len: int, count: int = 0) -> np.ndarray:
    """The first ``count`` (0: all) non-overlapping windows of ``seq_len`` tokens of the text in ``path``,
    tokenized with the tokenizer.json ``tokenizer``: int64 [n, seq_len]."""
    if not tokenizer:
        raise CalibrationError(f"{str(path)!r} is text: pass --tokenizer tokenizer.json to turn it into token ids "
                               "(and --seq-len for the window length)")
    ids = _token_ids(path, Path(tokenizer))
    windows = len(ids) // seq_len
    if windows == 0:
        raise CalibrationError(f"{str(path)!r} holds {len(ids)} tokens, too few for one window of --seq-len "
                               f"{seq_len}: give more text or a shorter --seq-len")
    if windows < count:
        log.warning("%s holds %d windows of %d tokens, fewer than the %d asked for: using %d",
                    path, windows, seq_len, count, windows)
    n = min(windows, count) if count else windows
    return ids[:n * seq_len].reshape(n, seq_len)


def _token_ids(path: Path, tokenizer: Path) -> np.ndarray:
    try:
        from tokenizers import Tokenizer
    except ModuleNotFoundError:
        raise CalibrationError("a .txt calibration needs the tokenizers library: pip install 'onnxflex[text]'") from None
    try:
        tok = Tokenizer.from_file(str(tokenizer))
    except Exception as exc:
        raise CalibrationError(f"--tokenizer {str(tokenizer)!r} is not a readable tokenizer.json: {exc}") from None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CalibrationError(f"calibration {str(path)!r} cannot be read as UTF-8 text: {exc}") from None
    return np.asarray(tok.encode(text, add_special_tokens=False).ids, np.int64)


def _fixed_length(dims: list[int | None]) -> int:
    if len(dims) == 2 and dims[1]:
        return dims[1]
    raise CalibrationError(f"input_ids has shape {show_dims(dims)} with no fixed sequence length: pass --seq-len")


def empty_cache_shape(vi: onnx.ValueInfoProto, n: int, model_path: Path | None,
                      fix: str = "calibrate from an .npz with one array per input") -> tuple[int, ...]:
    """[n, kv_heads, 0, head_dim] for cache input ``vi``, declared [batch, kv_heads, past, head_dim]; ``fix``
    ends the error for a shape that gives neither."""
    dims = input_dims(vi)
    if len(dims) != 4:
        raise CalibrationError(f"cache input {vi.name!r} has shape {show_dims(dims)}, not [batch, kv_heads, past, "
                               f"head_dim]: {fix}")
    decoder = genai_config(model_path).get("model", {}).get("decoder", {}) if model_path else {}
    shape = [n, dims[1], 0, dims[3]]
    for axis, key in CACHE_CONFIG_DIMS.items():
        if shape[axis] is None:
            shape[axis] = decoder.get(key)
        if not isinstance(shape[axis], int) or shape[axis] <= 0:
            raise CalibrationError(f"cache input {vi.name!r} has shape {show_dims(dims)}: dim {axis} is unknown and "
                                   f"no genai_config.json beside the model gives model.decoder.{key}; {fix}")
    return tuple(shape)


# what onnxruntime-genai's Tokenizer reads from a model's folder, beside its genai_config.json
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt")


def genai_config_path(model_path: Path) -> Path:
    return Path(model_path).with_name("genai_config.json")


def genai_config(model_path: Path) -> dict:
    """The onnxruntime-genai genai_config.json beside ``model_path``, or {} when there is none."""
    path = genai_config_path(model_path)
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CalibrationError(f"{str(path)!r} is not readable JSON: {exc}") from None
