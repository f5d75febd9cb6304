"""The attention function registered under "lean_tvm" (transformers' ``AttentionInterface``).

A forward whose mask is the row bounds of ``mask.lean_tvm_mask`` (a decode step: at most 16 new
tokens per sequence over the cache, causal, left padding at most) goes to
``lean_tvm.decode_attention`` over the layer's whole cache tensor, with the lengths and first
rows on the device, so the step never waits for the GPU and can be compiled and captured in a
CUDA graph. Everything else goes to transformers' SDPA function: prefill (the mask function gave
SDPA's mask), and layers the kernel cannot serve (``_unserved``), logged once per reason. What
neither computes (soft-capping, attention sinks: models that do not take SDPA either) is refused
with an error that says so, rather than computed without it.
"""

from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import lean_tvm
from lean_tvm.checks import DTYPES
from lean_tvm.spec import HEAD_DIMS, MAX_GROUPS

from .report import served_by_lean, served_by_sdpa
from .rows import boolean_mask, is_row_bounds, lengths_and_starts

# Arguments some models pass that change what attention computes: the kernel does none of them, and
# transformers' SDPA function only the ones in UNSERVED_KWARGS.
UNSERVED_KWARGS = {"sliding_window": "a sliding window", "position_bias": "a position bias"}
REFUSED_KWARGS = {"softcap": "soft-capping", "s_aux": "attention sinks"}


def lean_tvm_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask, dropout: float = 0.0, scaling: float | None = None,
                       is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """query [B, Hq, Sq, D]; key, value [B, Hkv, L, D] (the layer's cache, this step's tokens
    included); attention_mask: row bounds from ``lean_tvm_mask``, or SDPA's mask.
    Returns (out [B, Sq, Hq, D], None), as SDPA's function does."""
    for name, what in REFUSED_KWARGS.items():
        if kwargs.get(name) is not None:
            raise ValueError(f"attn_implementation='lean_tvm': {what} ({name}={kwargs[name]}) is computed neither "
                             "by the kernel nor by SDPA, its fallback; load this model with "
                             "attn_implementation='eager'")
    if is_row_bounds(attention_mask):
        reason = _unserved(module, query, key, value, dropout, is_causal, kwargs)
        if reason is None:
            served_by_lean()
            lengths, starts = lengths_and_starts(attention_mask)
            out = lean_tvm.decode_attention(query.transpose(1, 2), key, value, lengths, cache_leftpad=starts,
                                            softmax_scale=scaling)
            return out, None
        served_by_sdpa(reason)
        attention_mask = boolean_mask(attention_mask, query.shape[2], key.shape[2])
    else:
        served_by_sdpa(None)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def _unserved(module, query, key, value, dropout, is_causal, kwargs) -> str | None:
    """Why the kernel cannot serve this layer's decode step (None: it can); shapes and flags only."""
    for name, what in UNSERVED_KWARGS.items():
        if kwargs.get(name) is not None:
            return what
    if dropout > 0:
        return "dropout"
    if not (is_causal if is_causal is not None else getattr(module, "is_causal", True)):
        return "non-causal attention"
    if query.requires_grad:
        return "gradients (the kernel has no backward)"
    if query.dtype not in DTYPES or key.dtype != query.dtype or value.dtype != query.dtype:
        return f"dtype {query.dtype} (queries) / {key.dtype} (cache): the kernel takes float16 or bfloat16"
    if query.device.type not in ("cuda", "cpu"):
        return f"device {query.device.type}"
    head_dim = query.shape[-1]
    if head_dim not in HEAD_DIMS or key.shape[-1] != head_dim or value.shape[-1] != head_dim:
        return f"head dim {head_dim} (keys {key.shape[-1]}, values {value.shape[-1]}): the kernel has {HEAD_DIMS}"
    hq, hkv = query.shape[1], key.shape[1]
    if hq % hkv or hq // hkv > max(MAX_GROUPS):
        return f"{hq} query heads over {hkv} KV heads: the kernel takes up to {max(MAX_GROUPS)} per KV head"
    return None
