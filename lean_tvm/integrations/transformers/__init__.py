"""LeanAttention as an attention backend of Hugging Face transformers (5.x; the ``lean-tvm[hf]`` extra).

    from lean_tvm.integrations import transformers as lean_hf
    lean_hf.register()
    model = AutoModelForCausalLM.from_config(config, attn_implementation="lean_tvm")  # or from_pretrained

Decode steps (up to 16 new tokens per sequence over the cache) run in ``lean_tvm.decode_attention``
with each sequence's valid length and first row (left padding) computed on the device by the
registered mask function (``mask.lean_tvm_mask``) from the cache's own offset and the padding
mask: no host synchronisation, so ``generate(..., cache_implementation="static")`` compiles and
captures them in CUDA graphs; the default dynamic cache works too. Prefill, and layers the kernel
cannot serve (a custom or sliding-window mask, soft-capping, a head dim other than 64/128/256, a
dtype other than float16/bfloat16), fall back to SDPA with one log line per reason;
``counts`` says how many attention calls each served.
"""

from __future__ import annotations

from transformers import AttentionInterface, AttentionMaskInterface

from .attention import lean_tvm_attention
from .mask import lean_tvm_mask
from .report import LEAN, counts, reset

NAME = LEAN  # the attn_implementation, and the key of the calls the kernel served in counts

__all__ = ["NAME", "counts", "lean_tvm_attention", "lean_tvm_mask", "register", "reset"]


def register() -> str:
    """Make ``attn_implementation="lean_tvm"`` available to every transformers model. Returns the name."""
    AttentionInterface.register(NAME, lean_tvm_attention)
    AttentionMaskInterface.register(NAME, lean_tvm_mask)
    return NAME
