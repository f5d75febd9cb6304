"""The paged form of ``lean_tvm.decode_attention``: block tables, Sq new tokens per sequence, and a
first valid row per sequence (``cache_leftpad``), for PyTorch.

One kernel serves all three (``attention_gpu.make_gpu_paged_kernel``): a page pool read through a
block table, or a dense cache read as one page per sequence (a [B, 1] table of b and pages of 2^30
rows). fp8 caches (``float8_e4m3fn``/``float8_e5m2`` with per-tensor or per-KV-head scales) take
this path too, dense or paged: their kernel reads the bytes and widens them in registers. Like the
dense path, the checks that read only metadata run once per call signature, the
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
    FP8_DTYPES,
    check_int_vector,
    check_kv_scale,
    check_out,
    check_qkv,
    check_scale_values,
    check_values_in,
    checked_kv_scale,
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
    kv_dtype: str | None  # an fp8 cache's (FP8_DTYPES), else None
    hkv: int
    launch: Callable  # runtime.paged_launcher


_PLANS: dict[tuple, _Plan] = {}
_MAX_PLANS = 4096


def _check_metadata(q, k_cache, v_cache, cache_seqlens, block_table, cache_leftpad, layout, out, k_scale=None,
                    v_scale=None):
    """Returns (q [B, Sq, Hq, D], k and v [P, Hkv, page, D] views, cache_len, page_size_log2)."""
    q4, k, v = check_qkv(q, k_cache, v_cache, layout, MAX_Q_LEN)
    batch = q4.shape[0]
    for scale, name in ((k_scale, "k_scale"), (v_scale, "v_scale")):
        check_kv_scale(scale, name, k.shape[1], q4.device, k.dtype in FP8_DTYPES)
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
                 check_lengths, k_scale=None, v_scale=None):
    """Every argument error before any launch. Returns (q [B, Sq, Hq, D], k, v [P, Hkv, page, D]
    views, cache_len, page_size_log2, scale)."""
    q4, k, v, cache_len, psl = _check_metadata(q, k_cache, v_cache, cache_seqlens, block_table, cache_leftpad,
                                               layout, out, k_scale, v_scale)
    if cache_seqlens is not None and checks_lengths(check_lengths, cache_seqlens):
        _check_length_values(cache_seqlens, cache_leftpad, cache_len, q4.device)
    _check_scale_values(k_scale, v_scale, check_lengths)
    scale = 1.0 / math.sqrt(q4.shape[3]) if softmax_scale is None else checked_scale(softmax_scale)
    return q4, k, v, cache_len, psl, scale


def _check_scale_values(k_scale, v_scale, check_lengths) -> None:
    """Scale tensors' values, where that costs no wait for the GPU (``checks.checks_lengths``)."""
    for scale, name in ((k_scale, "k_scale"), (v_scale, "v_scale")):
        if isinstance(scale, torch.Tensor) and checks_lengths(check_lengths, scale):
            check_scale_values(scale, name)


def _check_length_values(cache_seqlens, cache_leftpad, cache_len: int, device: torch.device) -> None:
    check_values_in(cache_seqlens, "cache_seqlens", 0, cache_len, device)
    if cache_leftpad is not None:
        check_values_in(cache_leftpad, "cache_leftpad", 0, cache_len, device)
        check_values_in(cache_seqlens, "cache_seqlens", cache_leftpad, cache_len, device)


def _make_plan(q, k_cache, v_cache, cache_seqlens, block_table, cache_leftpad, layout, out, k_scale,
               v_scale) -> _Plan:
    q4, k, _, cache_len, psl = _check_metadata(q, k_cache, v_cache, cache_seqlens, block_table, cache_leftpad,
                                               layout, out, k_scale, v_scale)
    batch, sq, hq, head_dim = q4.shape
    kv_dtype = FP8_DTYPES.get(k.dtype)
    launch = runtime.cache_launcher(q4, k.shape[1], cache_len, kv_dtype, _dense_one_token(q4, block_table,
                                                                                         cache_leftpad)) \
        if batch else _no_launch
    lse_shape = (batch, hq) if q.dim() == 3 else (batch, sq, hq)
    return _Plan(q.dim() == 3, odd_row_strides(q4), tuple(q.shape), lse_shape, block_table is None, cache_len, psl,
                 1.0 / math.sqrt(head_dim), kv_dtype, k.shape[1], launch)


def _dense_one_token(q4, block_table, cache_leftpad) -> bool:
    """A call the dense kernel form can serve: a dense cache, one token, no start rows."""
    return block_table is None and cache_leftpad is None and q4.shape[1] == 1


def _no_launch(*_args) -> None:
    """An empty batch's launch: there is nothing to compute."""


def _scale_meta(scale):
    """What the metadata checks read of a scale: a tensor's metadata, else its type (a float's value
    is checked on every call)."""
    return meta(scale) if isinstance(scale, torch.Tensor) else type(scale)


def _plan(q, k_cache, v_cache, cache_seqlens, block_table, cache_leftpad, layout, out, k_scale, v_scale) -> _Plan:
    try:
        key = (layout, meta(q), meta(k_cache), meta(v_cache), meta(cache_seqlens), meta(block_table),
               meta(cache_leftpad), meta(out), _scale_meta(k_scale), _scale_meta(v_scale))
        plan = _PLANS.get(key)
    except (AttributeError, TypeError, RuntimeError):  # not a tensor, unhashable layout: the checks say
        key = plan = None
    if plan is None:
        plan = _make_plan(q, k_cache, v_cache, cache_seqlens, block_table, cache_leftpad, layout, out, k_scale,
                          v_scale)
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


_MAX_SCALES = 256


def _scale_tensor(scale, name: str, hkv: int, device: torch.device, cached: bool = True) -> torch.Tensor:
    """An fp8 cache's scale as the kernel takes it, fp32 [Hkv]: a tensor as it is; a float (or None:
    1) as one value broadcast (stride 0), made once per (value, Hkv, device) when ``cached`` (an
    engine's scales are fixed, so a call makes no copy to the GPU)."""
    if isinstance(scale, torch.Tensor):
        return scale
    value = 1.0 if scale is None else checked_kv_scale(scale, name)
    if not cached:
        return torch.full((1,), value, dtype=torch.float32, device=device).expand(hkv)
    key = ("scale", value, hkv, device)
    if key not in _CONSTANTS:
        if sum(k[0] == "scale" for k in _CONSTANTS) >= _MAX_SCALES:
            for k in [k for k in _CONSTANTS if k[0] == "scale"]:
                del _CONSTANTS[k]
        _CONSTANTS[key] = torch.full((1,), value, dtype=torch.float32, device=device).expand(hkv)
    return _CONSTANTS[key]


def _kv_args(k, v, k_scale, v_scale, kv_dtype, hkv: int, device, cached: bool = True) -> tuple:
    """The cache arguments of the launch: (k, v) for a 16-bit cache; for an fp8 one the caches as
    bytes (zero-copy views) and the two scale tensors."""
    if kv_dtype is None:
        return k, v
    return (k.view(torch.uint8), v.view(torch.uint8), _scale_tensor(k_scale, "k_scale", hkv, device, cached),
            _scale_tensor(v_scale, "v_scale", hkv, device, cached))


def _run(q4, k, v, block_table, cache_seqlens, cache_leftpad, out4, lse3, scale, cache_len, psl, k_scale,
         v_scale) -> None:
    """The registered op's launch. Its defaults and workspace are the call's own, not the eager
    calls' cached ones (``runtime.new_workspace`` says why: CUDA graphs of torch.compile)."""
    batch = q4.shape[0]
    if batch == 0:
        return
    device = q4.device
    dense_one_token = _dense_one_token(q4, block_table, cache_leftpad)
    if block_table is None:
        block_table = _filled("table", batch, 0, device)
    if cache_seqlens is None:
        cache_seqlens = _filled("lengths", batch, cache_len, device)
    if cache_leftpad is None:
        cache_leftpad = _filled("lengths", batch, 0, device)
    kv_dtype = FP8_DTYPES.get(k.dtype)
    k, v, *scales = _kv_args(k, v, k_scale, v_scale, kv_dtype, k.shape[1], device, cached=False)
    runtime.cache_launcher(q4, k.shape[1], cache_len, kv_dtype, dense_one_token)(
        q4, k, v, block_table, cache_seqlens, cache_leftpad, out4, lse3, scale, psl, *scales, fresh_workspace=True)


@torch.library.custom_op("lean_tvm::decode_attention_paged", mutates_args=())
def _paged_op(q4: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_table: torch.Tensor | None,
              cache_seqlens: torch.Tensor | None, cache_leftpad: torch.Tensor | None, softmax_scale: float,
              cache_len: int, page_size_log2: int, k_scale: torch.Tensor | None = None,
              v_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.empty(q4.shape, dtype=q4.dtype, device=q4.device)
    lse = torch.empty(q4.shape[:3], dtype=torch.float32, device=q4.device)
    _run(q4, k, v, block_table, cache_seqlens, cache_leftpad, out, lse, softmax_scale, cache_len, page_size_log2,
         k_scale, v_scale)
    return out, lse


@_paged_op.register_fake
def _(q4, k, v, block_table, cache_seqlens, cache_leftpad, softmax_scale, cache_len, page_size_log2, k_scale=None,
      v_scale=None):
    return q4.new_empty(q4.shape), q4.new_empty(q4.shape[:3], dtype=torch.float32)


def decode_attention_paged(q, k_cache, v_cache, cache_seqlens, block_table, cache_leftpad, softmax_scale,
                           return_lse, out, layout, check_lengths, k_scale=None, v_scale=None):
    """``lean_tvm.decode_attention`` with a block table, several tokens, start rows or an fp8 cache
    (its docstring has the contract)."""
    if torch.compiler.is_compiling():
        q4, k, v, cache_len, psl, scale = check_inputs(q, k_cache, v_cache, cache_seqlens, block_table,
                                                       cache_leftpad, softmax_scale, layout, out, check_lengths,
                                                       k_scale, v_scale)
        fp8 = k.dtype in FP8_DTYPES
        ks, vs = ((_scale_tensor(s, n, k.shape[1], q4.device, cached=False) for s, n in
                   ((k_scale, "k_scale"), (v_scale, "v_scale"))) if fp8 else (None, None))
        o4, lse = torch.ops.lean_tvm.decode_attention_paged(q4, k, v, block_table, cache_seqlens, cache_leftpad,
                                                            scale, cache_len, psl, ks, vs)
        o, lse = (o4[:, 0], lse[:, 0]) if q.dim() == 3 else (o4, lse)
        if out is not None:
            out.copy_(o)
            o = out
        return (o, lse) if return_lse else o
    plan = _plan(q, k_cache, v_cache, cache_seqlens, block_table, cache_leftpad, layout, out, k_scale, v_scale)
    if cache_seqlens is not None and checks_lengths(check_lengths, cache_seqlens):
        _check_length_values(cache_seqlens, cache_leftpad, plan.cache_len, q.device)
    _check_scale_values(k_scale, v_scale, check_lengths)
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
        k, v, *scales = _kv_args(k_cache, v_cache, k_scale, v_scale, plan.kv_dtype, plan.hkv, q.device)
        plan.launch(q4, k, v, _constant("table", q4.shape[0], 0, q.device) if plan.dense else block_table,
                    cache_seqlens if cache_seqlens is not None else _constant("lengths", q4.shape[0], plan.cache_len,
                                                                              q.device),
                    cache_leftpad if cache_leftpad is not None else _constant("lengths", q4.shape[0], 0, q.device),
                    out4, lse3, scale, plan.page_size_log2, *scales)
    return (out, lse) if return_lse else out
