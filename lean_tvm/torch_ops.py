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
import os
from collections.abc import Callable
from typing import NamedTuple

import torch

from . import runtime
from .spec import HEAD_DIMS, LAYOUTS, MAX_GROUPS

_DTYPES = (torch.float16, torch.bfloat16)
CHECK_ENV = "LEAN_TVM_CHECK"  # "1": check every call's lengths, even those on the GPU (debugging)
_FULL_LENGTHS: dict[tuple, torch.Tensor] = {}


def _fail(kind, arg: str, expected: str, got) -> None:
    raise kind(f"{arg}: expected {expected}, got {got}")


def _check_tensor(t, arg: str) -> None:
    if not isinstance(t, torch.Tensor):
        _fail(TypeError, arg, "a torch.Tensor", type(t).__name__)
    if t.requires_grad:
        _fail(ValueError, arg, "a tensor without requires_grad (decode attention has no backward)",
              "requires_grad=True")


def _as_bhld(cache: torch.Tensor, layout: str) -> torch.Tensor:
    """A [B, Hkv, L, D] view of the cache (no copy)."""
    return cache if layout == "bhld" else cache.permute(0, 2, 1, 3)


def _check_metadata(q, k_cache, v_cache, cache_seqlens, layout, out):
    """The checks that read only types, dtypes, devices, shapes and strides (cacheable per call
    signature). Returns (q [B, Hq, D], k [B, Hkv, L, D] view, v view, out [B, Hq, D] view or None)."""
    if layout not in LAYOUTS:
        _fail(ValueError, "layout", f"one of {LAYOUTS}", repr(layout))
    for t, name in ((q, "q"), (k_cache, "k_cache"), (v_cache, "v_cache")):
        _check_tensor(t, name)
    if q.dtype not in _DTYPES:
        _fail(TypeError, "q.dtype", "float16 or bfloat16", q.dtype)
    for t, name in ((k_cache, "k_cache"), (v_cache, "v_cache")):
        if t.dtype != q.dtype:
            _fail(TypeError, f"{name}.dtype", f"{q.dtype} like q", t.dtype)
        if t.device != q.device:
            _fail(ValueError, f"{name}.device", f"{q.device} like q", t.device)
    if q.device.type not in ("cuda", "cpu"):
        _fail(ValueError, "q.device", "a CUDA or CPU tensor", q.device)
    q_rank = q.dim()
    if q_rank == 4:
        if q.shape[1] != 1:
            _fail(ValueError, "q.shape", "[B, Hq, D] or [B, 1, Hq, D] (one new token)", tuple(q.shape))
        q = q.squeeze(1)
    if q.dim() != 3:
        _fail(ValueError, "q.shape", "[B, Hq, D] or [B, 1, Hq, D]", tuple(q.shape))
    k, v = _as_bhld(k_cache, layout), _as_bhld(v_cache, layout)
    if k.dim() != 4 or v.shape != k.shape:
        _fail(ValueError, "k_cache/v_cache.shape",
              f"equal 4-d shapes in layout {layout!r}", (tuple(k_cache.shape), tuple(v_cache.shape)))
    batch, hq, head_dim = q.shape
    hkv = k.shape[1]
    if k.shape[0] != batch:
        _fail(ValueError, "k_cache.shape[0]", f"the batch of q ({batch})", k.shape[0])
    if k.shape[3] != head_dim:
        _fail(ValueError, "k_cache head dim", f"q's head dim {head_dim}", k.shape[3])
    if head_dim not in HEAD_DIMS:
        _fail(ValueError, "head dim", f"one of {HEAD_DIMS}", head_dim)
    if hkv == 0 or hq % hkv:
        _fail(ValueError, "q heads", f"a multiple of the KV heads ({hkv})", hq)
    if hq // hkv > max(MAX_GROUPS):
        _fail(ValueError, "Hq / Hkv", f"at most {max(MAX_GROUPS)} query heads per KV head", hq // hkv)
    for t, name in ((q, "q"), (k, "k_cache"), (v, "v_cache")):
        if t.stride(-1) != 1:
            _fail(ValueError, f"{name}.stride(-1)", "1 (a contiguous head dim)", t.stride(-1))
    if cache_seqlens is not None:
        _check_tensor(cache_seqlens, "cache_seqlens")
        if cache_seqlens.dtype != torch.int32:
            _fail(TypeError, "cache_seqlens.dtype", "torch.int32", cache_seqlens.dtype)
        if cache_seqlens.device != q.device:
            _fail(ValueError, "cache_seqlens.device", f"{q.device} like q", cache_seqlens.device)
        if cache_seqlens.shape != (batch,) or not cache_seqlens.is_contiguous():
            _fail(ValueError, "cache_seqlens.shape", f"a contiguous [{batch}]", tuple(cache_seqlens.shape))
    if out is not None:
        _check_tensor(out, "out")
        want = (batch, 1, hq, head_dim) if q_rank == 4 else (batch, hq, head_dim)
        if out.shape != want or out.dtype != q.dtype or out.device != q.device:
            _fail(ValueError, "out", f"a {q.dtype} tensor of shape {want} on {q.device}",
                  f"{out.dtype} {tuple(out.shape)} on {out.device}")
        if not out.is_contiguous():
            _fail(ValueError, "out", "a contiguous tensor", f"strides {out.stride()}")
        out = out.view(batch, hq, head_dim)
    if _odd_row_strides(q):
        q = q.contiguous()
    return q, k, v, out


def _odd_row_strides(q3: torch.Tensor) -> bool:
    """The kernel reads q as 32-bit words: odd batch/head strides need a (tiny) copy of q."""
    return any(s % 2 for s in q3.stride()[:2])


def _checks_lengths(check_lengths: bool | None, cache_seqlens) -> bool:
    """Whether this call reads the length values: ``True``/``False`` as asked; ``None`` (the
    default) only where that costs no wait for the GPU (lengths on the CPU) unless
    ``LEAN_TVM_CHECK=1``."""
    if check_lengths is not None:
        return bool(check_lengths)
    return cache_seqlens.device.type == "cpu" or os.environ.get(CHECK_ENV) == "1"


def _check_length_values(cache_seqlens, cache_len: int, device: torch.device) -> None:
    """Lengths in [0, L]: for lengths on the GPU a device-to-host copy (the caller asked for
    it), skipped while capturing or compiling."""
    if cache_seqlens.numel() and not _capturing(device) and not torch.compiler.is_compiling():
        lo, hi = (int(x) for x in torch.aminmax(cache_seqlens))
        if lo < 0 or hi > cache_len:
            _fail(ValueError, "cache_seqlens", f"lengths in [0, {cache_len}] (the cache length)",
                  f"values in [{lo}, {hi}]")


def _checked_scale(softmax_scale) -> float:
    if not isinstance(softmax_scale, (int, float)) or not math.isfinite(softmax_scale):
        _fail(TypeError, "softmax_scale", "a finite float", softmax_scale)
    return float(softmax_scale)


def check_inputs(q, k_cache, v_cache, cache_seqlens, softmax_scale, layout, out, check_lengths):
    """Every argument error as a ValueError/TypeError naming the argument, before any launch.

    Returns (q [B, Hq, D], k [B, Hkv, L, D] view, v view, scale, out [B, Hq, D] view or None)."""
    q3, k, v, out3 = _check_metadata(q, k_cache, v_cache, cache_seqlens, layout, out)
    if cache_seqlens is not None and _checks_lengths(check_lengths, cache_seqlens):
        _check_length_values(cache_seqlens, k.shape[2], q3.device)
    scale = 1.0 / math.sqrt(q3.shape[2]) if softmax_scale is None else _checked_scale(softmax_scale)
    return q3, k, v, scale, out3


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _full_lengths(batch: int, cache_len: int, device: torch.device) -> torch.Tensor:
    """The default ``cache_seqlens`` (all L), made once per (device, B, L)."""
    key = (device, batch, cache_len)
    if key not in _FULL_LENGTHS:
        _FULL_LENGTHS[key] = torch.full((batch,), cache_len, dtype=torch.int32, device=device)
    return _FULL_LENGTHS[key]


def _run(q, k, v, cache_seqlens, softmax_scale, out, lse) -> None:
    if q.shape[0] == 0:  # an empty batch: nothing to launch
        return
    if cache_seqlens is None:
        cache_seqlens = _full_lengths(q.shape[0], k.shape[2], q.device)
    runtime.launch_attention(q, k, v, cache_seqlens, out, lse, softmax_scale)


def _allocate_and_run(q, k, v, cache_seqlens, softmax_scale):
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    _run(q, k, v, cache_seqlens, softmax_scale, out, lse)
    return out, lse


class _Plan(NamedTuple):
    """What the metadata checks decided for one call signature, so that a repeated call skips them."""

    q4: bool  # q and out are [B, 1, Hq, D]
    copy_q: bool  # see _odd_row_strides
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


def _meta(t) -> tuple | None:
    """All that the metadata checks read of a tensor argument; its type first, so that no
    non-tensor ever matches a key made from checked tensors."""
    return None if t is None else (type(t), t.requires_grad, t.dtype, t.device, t.shape, t.stride())


def _plan(q, k_cache, v_cache, cache_seqlens, layout, out) -> _Plan:
    """The checks of a call signature run once; a repeated call costs its key (~20 torch attribute
    reads, which are what is slow on the host) and a dict lookup."""
    try:
        key = (layout, _meta(q), _meta(k_cache), _meta(v_cache), _meta(cache_seqlens), _meta(out))
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
    return _Plan(q.dim() == 4, _odd_row_strides(q3), layout == "blhd", tuple(q.shape), (batch, hq), q.dtype,
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
                     cache_seqlens: torch.Tensor | None = None, *, softmax_scale: float | None = None,
                     return_lse: bool = False, out: torch.Tensor | None = None, layout: str = "bhld",
                     check_lengths: bool | None = None):
    """Decode attention of one new token per sequence over a KV cache (LeanAttention).

    q: [B, Hq, D] or [B, 1, Hq, D]; k_cache, v_cache: [B, Hkv, L, D] (``layout="bhld"``, SDPA's)
    or [B, L, Hkv, D] (``layout="blhd"``, flash-attn's KV cache), any strides with a contiguous
    head dim, no copies; cache_seqlens: int32 [B] valid lengths (default: all L), 0 allowed.
    fp16 or bf16, D in 64/128/256, Hq a multiple of Hkv (GQA/MQA, up to 16 query heads per KV
    head). Returns out [B, Hq, D] (q's dtype), and with ``return_lse`` also lse [B, Hq] fp32
    (natural log; -inf and a zero output for an empty sequence). B = 0 returns empty tensors.

    ``check_lengths``: reject lengths outside [0, L] before the launch. The default (None) checks
    lengths that are on the CPU and never waits for the GPU (set ``LEAN_TVM_CHECK=1`` to check
    GPU lengths too, when debugging); True always checks (a device-to-host copy, skipped during
    CUDA graph capture), False never. Unchecked lengths are clamped into [0, L] by the kernel, which
    never reads past the cache.
    """
    if torch.compiler.is_compiling():
        return _traced(q, k_cache, v_cache, cache_seqlens, softmax_scale, return_lse, out, layout, check_lengths)
    # Eager: the cached checks, the views check_inputs takes, one allocation (two with return_lse)
    # and the launcher directly (no dispatcher, no launch lookup).
    q4, copy_q, blhd, out_shape, lse_shape, dtype, device, cache_len, scale, launch = _plan(
        q, k_cache, v_cache, cache_seqlens, layout, out)
    if cache_seqlens is None:
        cache_seqlens = _full_lengths(lse_shape[0], cache_len, device)
    elif _checks_lengths(check_lengths, cache_seqlens):
        _check_length_values(cache_seqlens, cache_len, device)
    if softmax_scale is not None:
        scale = _checked_scale(softmax_scale)
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


class LeanDecodeAttention(torch.nn.Module):
    """``decode_attention`` as a module, for models: forward(q, k_cache, v_cache, cache_seqlens)."""

    def __init__(self, softmax_scale: float | None = None, layout: str = "bhld", check_lengths: bool | None = None):
        super().__init__()
        if layout not in LAYOUTS:
            _fail(ValueError, "layout", f"one of {LAYOUTS}", repr(layout))
        self.softmax_scale, self.layout, self.check_lengths = softmax_scale, layout, check_lengths

    def forward(self, q, k_cache, v_cache, cache_seqlens=None):
        return decode_attention(q, k_cache, v_cache, cache_seqlens, softmax_scale=self.softmax_scale,
                                layout=self.layout, check_lengths=self.check_lengths)
