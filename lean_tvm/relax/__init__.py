"""LeanAttention in TVM Relax: the op (:mod:`.op`), the rewrite pass (:mod:`.rewrite`) and TVM's
paged KV cache (:mod:`.kv_cache`). Build a module holding a LeanAttention GPU kernel with
:func:`build` (TVM's default TIR pipeline would insert barriers that break it)."""

from .op import (
    KERNEL_ATTR,
    LEAN_ATTR,
    OP_PATTERN_OPAQUE,
    TIR_PIPELINE,
    LeanConfig,
    attention_primfunc,
    build,
    decode_attention,
    emit_lean_attention,
)
from .rewrite import RewriteDecodeAttention, count_attention_calls, rewrite_decode_attention
from .streamk_pass import ApplyStreamK, apply_stream_k

__all__ = [
    "ApplyStreamK",
    "KERNEL_ATTR",
    "LEAN_ATTR",
    "OP_PATTERN_OPAQUE",
    "TIR_PIPELINE",
    "LeanConfig",
    "RewriteDecodeAttention",
    "apply_stream_k",
    "attention_primfunc",
    "build",
    "count_attention_calls",
    "decode_attention",
    "emit_lean_attention",
    "rewrite_decode_attention",
]
