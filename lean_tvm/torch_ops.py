"""``lean_tvm.decode_attention`` for PyTorch users: argument checks, layouts, torch custom ops.

Tensors reach the kernel zero-copy through DLPack (tvm-ffi); the kernel runs on torch's current
stream; its workspace comes from torch's caching allocator and is reused (``runtime.Workspace``).
The plan is computed on the device from ``cache_seqlens``, so a captured CUDA graph stays right
when the lengths change in place, and ``torch.compile(fullgraph=True)`` traces through the
registered ops (``lean_tvm::decode_attention``, ``lean_tvm::decode_attention_out``). Eager calls
skip the dispatcher, and their argument checks run once per call signature (dtypes, devices,
shapes, strides), not once per call: the host path is what a decode step waits on. No call
waits for the GPU unless asked to: lengths on the GPU are checked only with ``check_lengths=True``
or ``LEAN_TVM_CHECK=1`` (the kernel clamps them into the cache either way).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from . import paged_ops, runtime
from .checks import (
    FP8_DTYPES,
    check_int_vector,
    check_out,
    check_qkv,
    check_values_in,
    checked_scale,
    checks_lengths,
    fail,
    meta,
    odd_row_strides,
)
from .spec import LAYOUTS

_FULL_LENGTHS: dict[tuple, torch.Tensor] = {}


def _check_metadata(q, k_cache, v_cache, cache_seqlens, layout, out):
    """The checks that read only types, dtypes, devices, shapes and strides (cacheable per call
    signature). Returns (q [B, Hq, D], k [B, Hkv, L, D] view, v view, out [B, Hq, D] view or None)."""
    q4, k, v = check_qkv(q, k_cache, v_cache, layout, max_q_len=1)
    q3 = q4[:, 0]
    batch, hq, head_dim = q3.shape
    if k.shape[0] != batch:
        fail(ValueError, "k_cache.shape[0]", f"the batch of q ({batch})", k.shape[0])
    if cache_seqlens is not None:
        check_int_vector(cache_seqlens, "cache_seqlens", batch, q3.device)
    if out is not None:
        check_out(out, tuple(q.shape), q)
        out = out.view(batch, hq, head_dim)
    if odd_row_strides(q3):
        q3 = q3.contiguous()
    return q3, k, v, out


def _check_length_values(cache_seqlens, cache_len: int, device: torch.device) -> None:
    check_values_in(cache_seqlens, "cache_seqlens", 0, cache_len, device)


def check_inputs(q, k_cache, v_cache, cache_seqlens, softmax_scale, layout, out, check_lengths):
    """Every argument error as a ValueError/TypeError naming the argument, before any launch.

    Returns (q [B, Hq, D], k [B, Hkv, L, D] view, v view, scale, out [B, Hq, D] view or None)."""
    q3, k, v, out3 = _check_metadata(q, k_cache, v_cache, cache_seqlens, layout, out)
    if cache_seqlens is not None and checks_lengths(check_lengths, cache_seqlens):
        _check_length_values(cache_seqlens, k.shape[2], q3.device)
    scale = 1.0 / math.sqrt(q3.shape[2]) if softmax_scale is None else checked_scale(softmax_scale)
    return q3, k, v, scale, out3


def _whole_cache_lengths(batch: int, cache_len: int, device: torch.device) -> torch.Tensor:
    """The default ``cache_seqlens``: all L, int32 [B]."""
    return torch.full((batch,), cache_len, dtype=torch.int32, device=device)


def _full_lengths(batch: int, cache_len: int, device: torch.device) -> torch.Tensor:
    """``_whole_cache_lengths``, made once per (device, B, L) for eager calls."""
    key = (device, batch, cache_len)
    if key not in _FULL_LENGTHS:
        _FULL_LENGTHS[key] = _whole_cache_lengths(batch, cache_len, device)
    return _FULL_LENGTHS[key]


def _run(q, k, v, cache_seqlens, softmax_scale, out, lse) -> None:
    """The registered ops' launch. Its default lengths and workspace are the call's own, not the
    eager calls' cached ones (``runtime.new_workspace`` says why: CUDA graphs of torch.compile)."""
    if q.shape[0] == 0:  # an empty batch: nothing to launch
        return
    if cache_seqlens is None:
        cache_seqlens = _whole_cache_lengths(q.shape[0], k.shape[2], q.device)
    runtime.launch_attention(q, k, v, cache_seqlens, out, lse, softmax_scale, fresh_workspace=True)


def _allocate_and_run(q, k, v, cache_seqlens, softmax_scale):
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    _run(q, k, v, cache_seqlens, softmax_scale, out, lse)
    return out, lse


class _Plan(NamedTuple):
    """What the metadata checks decided for one call signature, so that a repeated call skips them."""

    q4: bool  # q and out are [B, 1, Hq, D]
    copy_q: bool  # see checks.odd_row_strides
    blhd: bool
    out_shape: tuple[int, ...]  # q's
    lse_shape: tuple[int, int]  # (B, Hq)
    dtype: torch.dtype
    device: torch.device
    cache_len: int
    scale: float  # the default, 1 / sqrt(D)
    launch: Callable  # runtime.attention_launcher


_PLANS: dict[tuple, _Plan] = {}
_MAX_PLANS = 4096  # call signatures kept (a cache view that grows per step makes one per length)


def _plan(q, k_cache, v_cache, cache_seqlens, layout, out) -> _Plan:
    """The checks of a call signature run once; a repeated call costs its key (~20 torch attribute
    reads, which are what is slow on the host) and a dict lookup."""
    try:
        key = (layout, meta(q), meta(k_cache), meta(v_cache), meta(cache_seqlens), meta(out))
        plan = _PLANS.get(key)
    except (AttributeError, TypeError, RuntimeError):  # not a tensor, unhashable layout: the checks say
        key = plan = None
    if plan is None:
        plan = _make_plan(q, k_cache, v_cache, cache_seqlens, layout, out)
        if key is not None:
            if len(_PLANS) >= _MAX_PLANS:
                _PLANS.clear()
            _PLANS[key] = plan
    return plan


def _make_plan(q, k_cache, v_cache, cache_seqlens, layout, out) -> _Plan:
    q3, k, _, _ = _check_metadata(q, k_cache, v_cache, cache_seqlens, layout, out)
    batch, hq, head_dim = q3.shape
    launch = runtime.attention_launcher(q3, k.shape[1], max_len=k.shape[2]) if batch else _no_launch
    return _Plan(q.dim() == 4, odd_row_strides(q3), layout == "blhd", tuple(q.shape), (batch, hq), q.dtype,
                 q.device, k.shape[2], 1.0 / math.sqrt(head_dim), launch)


def _no_launch(*_args) -> None:
    """An empty batch's launch: there is nothing to compute."""


@torch.library.custom_op("lean_tvm::decode_attention", mutates_args=())
def _decode_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         cache_seqlens: torch.Tensor | None, softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _allocate_and_run(q, k, v, cache_seqlens, softmax_scale)


@_decode_attention_op.register_fake
def _(q, k, v, cache_seqlens, softmax_scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:2], dtype=torch.float32)


@torch.library.custom_op("lean_tvm::decode_attention_out", mutates_args=("out", "lse"))
def _decode_attention_out_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             cache_seqlens: torch.Tensor | None, softmax_scale: float,
                             out: torch.Tensor, lse: torch.Tensor) -> None:
    _run(q, k, v, cache_seqlens, softmax_scale, out, lse)


@_decode_attention_out_op.register_fake
def _(q, k, v, cache_seqlens, softmax_scale, out, lse):
    return None


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     cache_seqlens: torch.Tensor | None = None, *, block_table: torch.Tensor | None = None,
                     cache_leftpad: torch.Tensor | None = None, softmax_scale: float | None = None,
                     return_lse: bool = False, out: torch.Tensor | None = None, layout: str = "bhld",
                     check_lengths: bool | None = None, k_scale: float | torch.Tensor | None = None,
                     v_scale: float | torch.Tensor | None = None):
    """Decode attention of the new token(s) of every sequence over its KV cache (LeanAttention).

    q: [B, Hq, D], or [B, Sq, Hq, D] with Sq new tokens per sequence (1 <= Sq <= 16; they are
    already in the cache: query i sees keys [0, seq_len - Sq + 1 + i), flash-attn's bottom-right
    causal alignment). fp16 or bf16, D in 64/128/256, Hq a multiple of Hkv (GQA/MQA, up to 16 query
    heads per KV head). The cache, any strides with a contiguous head dim, never copied:

    * dense (``block_table=None``): k_cache, v_cache [B, Hkv, L, D] (``layout="bhld"``, SDPA's)
      or [B, L, Hkv, D] (``layout="blhd"``, flash-attn's);
    * paged: k_cache, v_cache page pools [P, page, Hkv, D] (``"blhd"``: flash-attn, vLLM,
      FlashInfer's NHD) or [P, Hkv, page, D] (``"bhld"``: FlashInfer's HND, TVM's), views of one
      combined tensor allowed; block_table int32 [B, max_pages]: row b lists sequence b's pages in
      order (shared pages allowed, entries past its last page never read); page a power of two.

    fp8 caches: k_cache, v_cache of dtype ``torch.float8_e4m3fn`` or ``torch.float8_e5m2`` (dense or
    paged, the same shapes), the real K/V being the stored value times ``k_scale`` / ``v_scale``: a
    float (per tensor, default 1) or an fp32 tensor [Hkv] on q's device (per KV head). q and the
    output stay fp16/bf16; scores and sums are fp32 (bf16 queries meet fp8 K in fp16: exact for
    |q| in [2^-14, 65504]). Scales belong to fp8 caches only.

    cache_seqlens: int32 [B] valid lengths, new tokens included (default: the whole dense cache;
    required with a block table), 0 allowed. cache_leftpad (dense only): int32 [B] first valid row
    of each sequence, rows [cache_leftpad[b], cache_seqlens[b]) are attended.

    Returns out shaped like q (q's dtype), and with ``return_lse`` also lse [B, Hq] or [B, Sq, Hq]
    fp32 (natural log). A query that sees no key (an empty sequence, one shorter than Sq) gets a
    zero output and lse -inf. B = 0 returns empty tensors.

    ``check_lengths``: reject lengths outside [0, the cache] (and start rows past them) before the
    launch. The default (None) checks lengths that are on the CPU and never waits for the GPU (set
    ``LEAN_TVM_CHECK=1`` to check GPU lengths too, when debugging); True always checks (a
    device-to-host copy, skipped during CUDA graph capture), False never. Unchecked lengths are
    clamped into the cache by the kernel, which never reads past it. Scale tensors' values
    (finite, > 0) are checked under the same rule; a float scale always is.
    """
    if (block_table is not None or cache_leftpad is not None or _several_tokens(q) or k_scale is not None
            or v_scale is not None or getattr(k_cache, "dtype", None) in FP8_DTYPES):
        return paged_ops.decode_attention_paged(q, k_cache, v_cache, cache_seqlens, block_table, cache_leftpad,
                                                softmax_scale, return_lse, out, layout, check_lengths, k_scale,
                                                v_scale)
    if torch.compiler.is_compiling():
        return _traced(q, k_cache, v_cache, cache_seqlens, softmax_scale, return_lse, out, layout, check_lengths)
    # Eager: the cached checks, the views check_inputs takes, one allocation (two with return_lse)
    # and the launcher directly (no dispatcher, no launch lookup).
    q4, copy_q, blhd, out_shape, lse_shape, dtype, device, cache_len, scale, launch = _plan(
        q, k_cache, v_cache, cache_seqlens, layout, out)
    if cache_seqlens is None:
        cache_seqlens = _full_lengths(lse_shape[0], cache_len, device)
    elif checks_lengths(check_lengths, cache_seqlens):
        _check_length_values(cache_seqlens, cache_len, device)
    if softmax_scale is not None:
        scale = checked_scale(softmax_scale)
    q3 = q.squeeze(1) if q4 else q
    if copy_q:
        q3 = q3.contiguous()
    if blhd:
        k_cache, v_cache = k_cache.permute(0, 2, 1, 3), v_cache.permute(0, 2, 1, 3)
    if out is None:
        out = torch.empty(*out_shape, dtype=dtype, device=device)
    if return_lse:
        lse = torch.empty(*lse_shape, dtype=torch.float32, device=device)
    else:  # the kernel writes it, nobody reads it
        lse = runtime.WORKSPACE.scratch(device, lse_shape)
    launch(q3, k_cache, v_cache, cache_seqlens, out.squeeze(1) if q4 else out, lse, scale)
    return (out, lse) if return_lse else out


def _traced(q, k_cache, v_cache, cache_seqlens, softmax_scale, return_lse, out, layout, check_lengths):
    """Under torch.compile: the checks on fake tensors, then the registered ops."""
    q3, k, v, scale, out3 = check_inputs(q, k_cache, v_cache, cache_seqlens, softmax_scale, layout, out,
                                         check_lengths)
    if out is None:
        o, lse = torch.ops.lean_tvm.decode_attention(q3, k, v, cache_seqlens, scale)
        if q.dim() == 4:
            o = o.unsqueeze(1)
    else:
        o = out
        lse = torch.empty(q3.shape[:2], dtype=torch.float32, device=q3.device)
        torch.ops.lean_tvm.decode_attention_out(q3, k, v, cache_seqlens, scale, out3, lse)
    return (o, lse) if return_lse else o


def _several_tokens(q) -> bool:
    return isinstance(q, torch.Tensor) and q.dim() == 4 and q.shape[1] != 1


class LeanDecodeAttention(torch.nn.Module):
    """``decode_attention`` as a module, for models: forward(q, k_cache, v_cache, cache_seqlens)."""

    def __init__(self, softmax_scale: float | None = None, layout: str = "bhld", check_lengths: bool | None = None):
        super().__init__()
        if layout not in LAYOUTS:
            fail(ValueError, "layout", f"one of {LAYOUTS}", repr(layout))
        self.softmax_scale, self.layout, self.check_lengths = softmax_scale, layout, check_lengths

    def forward(self, q, k_cache, v_cache, cache_seqlens=None):
        return decode_attention(q, k_cache, v_cache, cache_seqlens, softmax_scale=self.softmax_scale,
                                layout=self.layout, check_lengths=self.check_lengths)
