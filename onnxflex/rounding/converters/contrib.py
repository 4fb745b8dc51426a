"""onnxruntime's own ops that decoder exports hold: RMSNorm (SimplifiedLayerNormalization, which
onnxruntime registers in the default domain, and com.microsoft SkipSimplifiedLayerNormalization) and
com.microsoft GroupQueryAttention (onnxruntime-genai's model builder writes all three).

Each computes what onnxruntime's CPU kernel computes, for the cases it names; any other case raises
``unsupported`` so the block runs in onnxruntime instead.
"""
from __future__ import annotations

from typing import Sequence

import torch

from onnxflex.rounding.converters.registry import OpNode, converter, numpy_value, optional_input, unsupported

Tensor = torch.Tensor
FLOAT_TYPE = 1  # TensorProto.FLOAT, the stash_type that computes in float32


def _rms(x: Tensor, axis: int, epsilon: float) -> tuple[Tensor, Tensor]:
    """(x normalised by its root mean square over axes axis..-1, the reciprocal RMS, keepdims)."""
    axes = tuple(range(axis % x.dim(), x.dim()))
    inv = torch.rsqrt(x.square().mean(dim=axes, keepdim=True) + epsilon)
    return x * inv, inv


@converter("SimplifiedLayerNormalization", since=1)
def simplified_layer_norm(node: OpNode, inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """Y = X / sqrt(mean(X², axes axis..-1) + epsilon) · scale; second output the reciprocal RMS (the
    shape of X with 1 over the normalised axes), computed in float32 (stash_type 1)."""
    x, scale = inputs[0], inputs[1]
    if int(node.attr("stash_type", FLOAT_TYPE)) != FLOAT_TYPE:
        raise unsupported(node, f"stash_type={node.attr('stash_type')}")
    normed, inv = _rms(x.float(), int(node.attr("axis", -1)), float(node.attr("epsilon", 1e-5)))
    return ((normed * scale).to(x.dtype), inv)[:len(node.outputs)]


@converter("SkipSimplifiedLayerNormalization", domain="com.microsoft")
def skip_simplified_layer_norm(node: OpNode, inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """s = input + skip (+ bias), all [..., H]; outputs: s's RMSNorm over the last axis times gamma,
    mean (onnxruntime writes 0 for the simplified form), the reciprocal RMS (both [..., 1]) and s, the
    residual stream a decoder carries on."""
    x, skip, gamma = inputs[0], inputs[1], inputs[2]
    bias = optional_input(inputs, 3)
    total = x + skip if bias is None else x + skip + bias
    normed, inv = _rms(total.float(), -1, float(node.attr("epsilon", 1e-12)))
    outputs = ((normed * gamma).to(x.dtype), torch.zeros_like(inv), inv, total)
    return outputs[:len(node.outputs)]


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool) -> Tensor:
    """Rotary embedding of x [B, heads, S, H] on its first 2·cos.shape[-1] dims; cos/sin [B, 1, S, R/2]."""
    half = cos.shape[-1]
    rot, rest = x[..., :2 * half], x[..., 2 * half:]
    if interleaved:
        a, b = rot[..., 0::2], rot[..., 1::2]
        turned = torch.stack((a * cos - b * sin, b * cos + a * sin), dim=-1).flatten(-2)
    else:
        a, b = rot[..., :half], rot[..., half:]
        turned = torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)
    return torch.cat((turned, rest), dim=-1)


def _gqa_checks(node: OpNode, inputs: Sequence[Tensor | None]) -> None:
    """Refuses what the converter does not compute: sliding windows, smooth softmax, the extra inputs
    and outputs (position ids, attention bias, head sinks, the QK output)."""
    if int(node.attr("local_window_size", -1)) != -1:
        raise unsupported(node, f"local_window_size={node.attr('local_window_size')}")
    if int(node.attr("smooth_softmax", 0)) or int(node.attr("qk_output", 0)):
        raise unsupported(node, "smooth_softmax or qk_output")
    if any(optional_input(inputs, i) is not None for i in (9, 10, 11)):
        raise unsupported(node, "position_ids, attention_bias or head_sink")
    if len(node.outputs) > 3:
        raise unsupported(node, "the output_qk output")


def _split_heads(x: Tensor, heads: int) -> Tensor:
    """[B, S, heads·H] -> [B, heads, S, H]."""
    b, s, _ = x.shape
    return x.reshape(b, s, heads, -1).transpose(1, 2)


@converter("GroupQueryAttention", domain="com.microsoft")
def group_query_attention(node: OpNode, inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """Causal attention of ``num_heads`` query heads over ``kv_num_heads`` key/value heads (query head h
    reads kv head h // (num_heads / kv_num_heads)), with the past. Inputs: query [B, S, N·H] (or q, k, v
    packed as [B, S, (N + 2·Nkv)·H] when key and value are omitted), key/value [B, S, Nkv·H], past_key /
    past_value [B, Nkv, P, H] (P may be 0), seqlens_k int32 [B], total_sequence_length int32 [1] and,
    with do_rotary, cos_cache/sin_cache [max positions, R/2]. Outputs: [B, S, N·H], present key/value
    [B, Nkv, P + S, H] (the past, then the new keys/values, rotated as the queries are).

    Only batches without padding: every seqlens_k is total_sequence_length - 1 and P + S is
    total_sequence_length, so new token i sits at position P + i; anything else is refused.
    """
    _gqa_checks(node, inputs)
    heads, kv_heads = int(node.attr("num_heads")), int(node.attr("kv_num_heads"))
    query, key, value = inputs[0], optional_input(inputs, 1), optional_input(inputs, 2)
    past_key, past_value = optional_input(inputs, 3), optional_input(inputs, 4)
    if key is None:
        size = query.shape[-1] // (heads + 2 * kv_heads)
        query, key, value = torch.split(query, [heads * size, kv_heads * size, kv_heads * size], dim=-1)
    q, k, v = _split_heads(query, heads), _split_heads(key, kv_heads), _split_heads(value, kv_heads)
    batch, new, head_size = q.shape[0], q.shape[2], q.shape[3]
    past = 0 if past_key is None else past_key.shape[2]
    total = int(numpy_value(inputs[6]).reshape(-1)[0])
    seqlens = numpy_value(inputs[5]).reshape(-1)
    if past + new != total or (seqlens != total - 1).any():
        raise unsupported(node, f"a padded batch or a shared cache buffer (past {past} + new {new} tokens, "
                                f"total_sequence_length {total}, seqlens_k {seqlens.tolist()})")
    if int(node.attr("do_rotary", 0)):
        positions = torch.arange(past, total, device=q.device)
        cos, sin = inputs[7][positions][None, None], inputs[8][positions][None, None]
        interleaved = bool(int(node.attr("rotary_interleaved", 0)))
        q, k = _rotate(q, cos, sin, interleaved), _rotate(k, cos, sin, interleaved)
    if past:
        k, v = torch.cat((past_key, k), dim=2), torch.cat((past_value, v), dim=2)
    scale = float(node.attr("scale", 0.0)) or head_size ** -0.5
    group = heads // kv_heads
    scores = q @ k.repeat_interleave(group, dim=1).transpose(-1, -2) * scale
    softcap = float(node.attr("softcap", 0.0))
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    later = torch.ones(new, total, dtype=torch.bool, device=q.device).triu(past + 1)
    weights = torch.softmax(scores.masked_fill(later, float("-inf")), dim=-1)
    out = (weights @ v.repeat_interleave(group, dim=1)).transpose(1, 2).reshape(batch, new, heads * head_size)
    return (out, k, v)[:len(node.outputs)]
