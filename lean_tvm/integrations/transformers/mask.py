"""The mask function registered under "lean_tvm" (transformers' ``AttentionMaskInterface``).

In transformers 5.x the attention function never sees the cache; the mask function does: it is
called once per forward with the cache's offset (the rows already cached: an int for the dynamic
cache, a device tensor for ``StaticCache``, so that a compiled step never reads it on the host)
and the 2-d padding mask. Where the kernel can serve the forward it returns the rows each
sequence attends (``rows.row_bounds``), computed on the device; anywhere else it returns SDPA's
mask, and the attention function lets SDPA serve the forward.
"""

from __future__ import annotations

import torch
from transformers.masking_utils import causal_mask_function, sdpa_mask

from lean_tvm.checks import capturing, checks_lengths
from lean_tvm.paged_ops import MAX_Q_LEN

from .report import PREFILL, say_once
from .rows import is_left_padding, left_padding, row_bounds

PREFILL_REASON = f"{PREFILL} (more than {MAX_Q_LEN} new tokens, or several with nothing cached before them)"


def lean_tvm_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int | torch.Tensor = 0,
                  kv_offset: int = 0, mask_function=causal_mask_function, attention_mask: torch.Tensor | None = None,
                  local_size: int | None = None, **kwargs):
    """Row bounds int32 [1, 1, R, B] for a forward the kernel serves, else ``sdpa_mask(...)`` (bool
    [B, 1, q_length, kv_length] or None). ``attention_mask``: bool [B, T] (True: a token), the
    padding of the T tokens seen so far, new ones included; the other arguments are
    ``sdpa_mask``'s."""
    reason = _unserved(q_length, q_offset, kv_offset, mask_function, attention_mask, local_size)
    if reason is not None:
        say_once(reason)
        return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                         kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                         local_size=local_size, **kwargs)
    if isinstance(q_offset, torch.Tensor):
        ends = (q_offset + q_length).to(torch.int32).expand(batch_size)
    else:
        ends = torch.full((batch_size,), q_offset + q_length, dtype=torch.int32, device=kwargs.get("device", "cpu"))
    return row_bounds(ends, None if attention_mask is None else left_padding(attention_mask))


def _unserved(q_length, q_offset, kv_offset, mask_function, attention_mask, local_size) -> str | None:
    """Why the kernel cannot serve this forward (None: it can). Reads no device value, except a
    padding mask's where that costs no wait for a GPU (see ``_checks_padding``)."""
    if local_size is not None:
        return "sliding-window or chunked attention"
    if mask_function is not causal_mask_function:
        return "a mask other than causal (custom, bidirectional, packed or block masks)"
    if not isinstance(kv_offset, int) or kv_offset != 0:
        return "a cache that keeps only recent rows (kv_offset)"
    if q_length > MAX_Q_LEN or (q_length > 1 and not _has_past(q_length, q_offset, attention_mask)):
        return PREFILL_REASON
    if attention_mask is not None and _checks_padding(attention_mask) and not bool(is_left_padding(attention_mask)):
        return "padding that is not left padding (zeros after a sequence's first token)"
    return None


def _has_past(q_length: int, q_offset, attention_mask) -> bool:
    """Whether tokens were cached before these, known on the host: the dynamic cache's offset is an
    int; a static cache's is a device tensor, so the padding mask's length (past + new) says."""
    if not isinstance(q_offset, torch.Tensor):
        return q_offset > 0
    return attention_mask is not None and attention_mask.shape[-1] > q_length


def _checks_padding(attention_mask: torch.Tensor) -> bool:
    """The padding is checked where reading it costs no wait for a GPU (a CPU mask), or when asked
    with ``LEAN_TVM_CHECK=1``; never while compiling or capturing a CUDA graph. Elsewhere it is
    taken to be left padding, which is what ``generate`` makes."""
    return checks_lengths(None, attention_mask) and not torch.compiler.is_compiling() and \
        not capturing(attention_mask.device)
