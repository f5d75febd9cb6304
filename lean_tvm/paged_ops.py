"""The paged form of ``lean_tvm.decode_attention``: block tables, Sq new tokens per sequence, and a
first valid row per sequence (``cache_leftpad``), for PyTorch.

One kernel serves all three (``attention_gpu.make_gpu_paged_kernel``): a page pool read through a
block table, or a dense cache read as one page per sequence (a [B, 1] table of b and pages of 2^30
rows). Like the dense path, the checks that read only metadata run once per call signature, the
plan is computed on the device (a captured CUDA graph stays right when lengths and tables change in
place), nothing waits for the GPU unless asked, and ``torch.compile(fullgraph=True)`` traces
through the registered op ``lean_tvm::decode_attention_paged``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from . import runtime
from .checks import (
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

MAX_Q_LEN = 16
_CONSTANTS: dict[tuple, torch.Tensor] = {}


class _Plan(NamedTuple):
    """What the metadata checks decided for one call signature."""

    three_d: bool  # q (and out) are [B, Hq, D]: one token
    copy_q: bool  # see checks.odd_row_strides
    out_shape: tuple[int, ...]  # q's
    lse_shape: tuple[int, ...]  # [B, Hq] or [B, Sq, Hq]
    dense: bool  # a dense cache, read as one page per sequence
    cache_len: int  # rows a sequence can hold: L, or pages x page size
    page_size_log2: int
    scale: float  # the default, 1 / sqrt(D)
    launch: Callable  # runtime.paged_launcher


_PLANS: dict[tuple, _Plan] = {}
_MAX_PLANS = 4096


def _check_metadata(q, k_cache, v_cache, cache_seqlens, block_table, cache_leftpad, layout, out):
    """Returns (q [B, Sq, Hq, D], k and v [P, Hkv, page, D] views, cache_len, page_size_log2)."""
    q4, k, v = check_qkv(q, k_cache, v_cache, layout, MAX_Q_LEN)
    batch = q4.shape[0]
    if block_table is None:
        if k.shape[0] != batch:
            fail(ValueError, "k_cache.shape[0]", f"the batch of q ({batch})", k.shape[0])
        cache_len, page_size_log2 = k.shape[2], runtime.DENSE_PAGE_LOG2
        if cache_len >= 1 << page_size_log2:
            fail(ValueError, "k_cache", f"fewer than 2**{page_size_log2} rows per sequence", cache_len)
    else:
        if not isinstance(block_table, torch.Tensor):
            fail(TypeError, "block_table", "a torch.Tensor", type(block_table).__name__)
        if block_table.dtype != torch.int32:
            fail(TypeError, "block_table.dtype", "torch.int32", block_table.dtype)
        if block_table.device != q4.device:
            fail(ValueError, "block_table.device", f"{q4.device} like q", block_table.device)
        if block_table.dim() != 2 or block_table.shape[0] != batch or block_table.stride(-1) != 1:
            fail(ValueError, "block_table", f"[{batch}, max_pages] with contiguous rows",
                 f"shape {tuple(block_table.shape)}, strides {block_table.stride()}")
        page = k.shape[2]
        if page < 1 or page & (page - 1):
            fail(ValueError, "page size", "a power of two (k_cache's page dimension)", page)
        if cache_seqlens is None:
            fail(ValueError, "cache_seqlens", "the lengths of the sequences (required with a block table)", None)
        if cache_leftpad is not None:
            fail(ValueError, "cache_leftpad", "None with a block table (a first valid row is for dense caches)",
                 "a tensor")
        cache_len, page_size_log2 = block_table.shape[1] * page, page.bit_length() - 1
    for t, name in ((cache_seqlens, "cache_seqlens"), (cache_leftpad, "cache_leftpad")):
        if t is not None:
            check_int_vector(t, name, batch, q4.device)
    if out is not None:
        check_out(out, tuple(q.shape), q)
    return q4, k, v, cache_len, page_size_log2


def check_inputs(q, k_cache, v_cache, cache_seqlens, block_table, cache_leftpad, softmax_scale, layout, out,
                 check_lengths):
    """Every argument error before any launch. Returns (q [B, Sq, Hq, D], k, v [P, Hkv, page, D]
    views, cache_len, page_size_log2, scale)."""
    q4, k, v, cache_len, psl = _check_metadata(q, k_cache, v_cache, cache_seqlens, block_table, cache_leftpad,
                                               layout, out)
    if cache_seqlens is not None and checks_lengths(check_lengths, cache_seqlens):
        _check_length_values(cache_seqlens, cache_leftpad, cache_len, q4.device)
    scale = 1.0 / math.sqrt(q4.shape[3]) if softmax_scale is None else checked_scale(softmax_scale)
    return q4, k, v, cache_len, psl, scale


def _check_length_values(cache_seqlens, cache_leftpad, cache_len: int, device: torch.device) -> None:
    check_values_in(cache_seqlens, "cache_seqlens", 0, cache_len, device)
    if cache_leftpad is not None:
        check_values_in(cache_leftpad, "cache_leftpad", 0, cache_len, device)
        check_values_in(cache_seqlens, "cache_seqlens", cache_leftpad, cache_len, device)


def _make_plan(q, k_cache, v_cache, cache_seqlens, block_table, cache_leftpad, layout, out) -> _Plan:
    q4, k, _, cache_len, psl = _check_metadata(q, k_cache, v_cache, cache_seqlens, block_table, cache_leftpad,
                                               layout, out)
    batch, sq, hq, head_dim = q4.shape
    launch = runtime.paged_launcher(q4, k.shape[1], cache_len) if batch else _no_launch
    lse_shape = (batch, hq) if q.dim() == 3 else (batch, sq, hq)
    return _Plan(q.dim() == 3, odd_row_strides(q4), tuple(q.shape), lse_shape, block_table is None, cache_len, psl,
                 1.0 / math.sqrt(head_dim), launch)


def _no_launch(*_args) -> None:
    """An empty batch's launch: there is nothing to compute."""


def _plan(q, k_cache, v_cache, cache_seqlens, block_table, cache_leftpad, layout, out) -> _Plan:
    try:
        key = (layout, meta(q), meta(k_cache), meta(v_cache), meta(cache_seqlens), meta(block_table),
               meta(cache_leftpad), meta(out))
        plan = _PLANS.get(key)
    except (AttributeError, TypeError, RuntimeError):  # not a tensor, unhashable layout: the checks say
        key = plan = None
    if plan is None:
        plan = _make_plan(q, k_cache, v_cache, cache_seqlens, block_table, cache_leftpad, layout, out)
        if key is not None:
            if len(_PLANS) >= _MAX_PLANS:
                _PLANS.clear()
            _PLANS[key] = plan
    return plan


def _filled(kind: str, batch: int, value: int, device: torch.device) -> torch.Tensor:
    """A dense cache's block table (``kind`` "table": b -> page b, [B, 1]), or ``value`` for every
    sequence ([B]: zero start rows, full lengths); int32."""
    if kind == "table":
        return torch.arange(batch, dtype=torch.int32, device=device).view(batch, 1)
    return torch.full((batch,), value, dtype=torch.int32, device=device)


def _constant(kind: str, batch: int, value: int, device: torch.device) -> torch.Tensor:
    """``_filled``, made once per (kind, B, value, device) for eager calls."""
    key = (kind, batch, value, device)
    if key not in _CONSTANTS:
        _CONSTANTS[key] = _filled(kind, batch, value, device)
    return _CONSTANTS[key]


def _run(q4, k, v, block_table, cache_seqlens, cache_leftpad, out4, lse3, scale, cache_len, psl) -> None:
    """The registered op's launch. Its defaults and workspace are the call's own, not the eager
    calls' cached ones (``runtime.new_workspace`` says why: CUDA graphs of torch.compile)."""
    batch = q4.shape[0]
    if batch == 0:
        return
    device = q4.device
    if block_table is None:
        block_table = _filled("table", batch, 0, device)
    if cache_seqlens is None:
        cache_seqlens = _filled("lengths", batch, cache_len, device)
    if cache_leftpad is None:
        cache_leftpad = _filled("lengths", batch, 0, device)
    runtime.paged_launcher(q4, k.shape[1], cache_len)(q4, k, v, block_table, cache_seqlens, cache_leftpad, out4, lse3,
                                                      scale, psl, fresh_workspace=True)


@torch.library.custom_op("lean_tvm::decode_attention_paged", mutates_args=())
def _paged_op(q4: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_table: torch.Tensor | None,
              cache_seqlens: torch.Tensor | None, cache_leftpad: torch.Tensor | None, softmax_scale: float,
              cache_len: int, page_size_log2: int) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.empty(q4.shape, dtype=q4.dtype, device=q4.device)
    lse = torch.empty(q4.shape[:3], dtype=torch.float32, device=q4.device)
    _run(q4, k, v, block_table, cache_seqlens, cache_leftpad, out, lse, softmax_scale, cache_len, page_size_log2)
    return out, lse


@_paged_op.register_fake
def _(q4, k, v, block_table, cache_seqlens, cache_leftpad, softmax_scale, cache_len, page_size_log2):
    return q4.new_empty(q4.shape), q4.new_empty(q4.shape[:3], dtype=torch.float32)


def decode_attention_paged(q, k_cache, v_cache, cache_seqlens, block_table, cache_leftpad, softmax_scale,
                           return_lse, out, layout, check_lengths):
    """``lean_tvm.decode_attention`` with a block table, several tokens or start rows (its
    docstring has the contract)."""
    if torch.compiler.is_compiling():
        q4, k, v, cache_len, psl, scale = check_inputs(q, k_cache, v_cache, cache_seqlens, block_table,
                                                       cache_leftpad, softmax_scale, layout, out, check_lengths)
        o4, lse = torch.ops.lean_tvm.decode_attention_paged(q4, k, v, block_table, cache_seqlens, cache_leftpad,
                                                            scale, cache_len, psl)
        o, lse = (o4[:, 0], lse[:, 0]) if q.dim() == 3 else (o4, lse)
        if out is not None:
            out.copy_(o)
            o = out
        return (o, lse) if return_lse else o
    plan = _plan(q, k_cache, v_cache, cache_seqlens, block_table, cache_leftpad, layout, out)
    if cache_seqlens is not None and checks_lengths(check_lengths, cache_seqlens):
        _check_length_values(cache_seqlens, cache_leftpad, plan.cache_len, q.device)
    scale = plan.scale if softmax_scale is None else checked_scale(softmax_scale)
    q4 = q.unsqueeze(1) if plan.three_d else q
    if plan.copy_q:
        q4 = q4.contiguous()
    if layout == "blhd":
        k_cache, v_cache = k_cache.permute(0, 2, 1, 3), v_cache.permute(0, 2, 1, 3)
    if out is None:
        out = torch.empty(plan.out_shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(plan.lse_shape, dtype=torch.float32, device=q.device) if return_lse else \
        runtime.WORKSPACE.scratch(q.device, plan.lse_shape)
    if plan.three_d:
        out4, lse3 = out.unsqueeze(1), lse.unsqueeze(1)
    else:
        out4, lse3 = out, lse
    if q4.shape[0]:
        plan.launch(q4, k_cache, v_cache, _constant("table", q4.shape[0], 0, q.device) if plan.dense else block_table,
                    cache_seqlens if cache_seqlens is not None else _constant("lengths", q4.shape[0], plan.cache_len,
                                                                              q.device),
                    cache_leftpad if cache_leftpad is not None else _constant("lengths", q4.shape[0], 0, q.device),
                    out4, lse3, scale, plan.page_size_log2)
    return (out, lse) if return_lse else out
