"""Argument checks shared by the PyTorch entry points: every error names the argument, what was
expected and what came, and none of them waits for the GPU unless asked to (``check_lengths``)."""

from __future__ import annotations

import math
import os

import torch

from .spec import HEAD_DIMS, LAYOUTS, MAX_GROUPS

DTYPES = (torch.float16, torch.bfloat16)
# fp8 caches (the stored value times its scale is the real K/V) and their kernels' ``kv_dtype``.
FP8_DTYPES = {torch.float8_e4m3fn: "float8_e4m3fn", torch.float8_e5m2: "float8_e5m2"}
CHECK_ENV = "LEAN_TVM_CHECK"  # "1": check every call's lengths, even those on the GPU (debugging)


def fail(kind, arg: str, expected: str, got) -> None:
    raise kind(f"{arg}: expected {expected}, got {got}")


def check_tensor(t, arg: str) -> None:
    if not isinstance(t, torch.Tensor):
        fail(TypeError, arg, "a torch.Tensor", type(t).__name__)
    if t.requires_grad:
        fail(ValueError, arg, "a tensor without requires_grad (decode attention has no backward)", "requires_grad=True")


def check_int_vector(t, arg: str, batch: int, device: torch.device) -> None:
    """An int32 [batch] contiguous tensor on ``device`` (lengths, start rows)."""
    check_tensor(t, arg)
    if t.dtype != torch.int32:
        fail(TypeError, f"{arg}.dtype", "torch.int32", t.dtype)
    if t.device != device:
        fail(ValueError, f"{arg}.device", f"{device} like q", t.device)
    if t.shape != (batch,) or not t.is_contiguous():
        fail(ValueError, f"{arg}.shape", f"a contiguous [{batch}]", tuple(t.shape))


def checked_scale(softmax_scale) -> float:
    if not isinstance(softmax_scale, (int, float)) or not math.isfinite(softmax_scale):
        fail(TypeError, "softmax_scale", "a finite float", softmax_scale)
    return float(softmax_scale)


def capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def checks_lengths(check_lengths: bool | None, t) -> bool:
    """Whether this call reads length values: ``True``/``False`` as asked; ``None`` (the default)
    only where that costs no wait for the GPU (a tensor on the CPU) unless ``LEAN_TVM_CHECK=1``."""
    if check_lengths is not None:
        return bool(check_lengths)
    return t.device.type == "cpu" or os.environ.get(CHECK_ENV) == "1"


def check_values_in(t, arg: str, lo, hi: int, device: torch.device) -> None:
    """Every value of ``t`` in [lo, hi] (``lo`` an int or a tensor of per-element minima): for a GPU
    tensor a device-to-host copy (the caller asked for it), skipped while capturing or compiling."""
    if not t.numel() or capturing(device) or torch.compiler.is_compiling():
        return
    below = (t < lo).any() if isinstance(lo, torch.Tensor) else None
    small, big = (int(x) for x in torch.aminmax(t))
    if (below is not None and bool(below)) or (below is None and small < lo) or big > hi:
        what = "the cache length" if below is None else "cache_leftpad .. the cache length"
        fail(ValueError, arg, f"values in [{lo if below is None else 'cache_leftpad'}, {hi}] ({what})",
             f"values in [{small}, {big}]")


def odd_row_strides(t: torch.Tensor) -> bool:
    """The kernels read q as 32-bit words: an odd stride (other than the head dim's) needs a (tiny) copy."""
    return any(s % 2 for s in t.stride()[:-1])


def meta(t) -> tuple | None:
    """All that the metadata checks read of a tensor argument; its type first, so that no
    non-tensor ever matches a key made from checked tensors."""
    return None if t is None else (type(t), t.requires_grad, t.dtype, t.device, t.shape, t.stride())


def check_qkv(q, k_cache, v_cache, layout: str, max_q_len: int):
    """The checks of q and the caches that read only types, dtypes, devices, shapes and strides.
    Returns (q as [B, Sq, Hq, D], k and v as [N, Hkv, L, D] views: N = B for a dense cache, pages
    for a page pool, L = its length or the page size)."""
    if layout not in LAYOUTS:
        fail(ValueError, "layout", f"one of {LAYOUTS}", repr(layout))
    for t, name in ((q, "q"), (k_cache, "k_cache"), (v_cache, "v_cache")):
        check_tensor(t, name)
    if q.dtype not in DTYPES:
        fail(TypeError, "q.dtype", "float16 or bfloat16 (with an fp8 cache too: q and the output stay 16-bit)",
             q.dtype)
    for t, name in ((k_cache, "k_cache"), (v_cache, "v_cache")):
        if t.dtype != q.dtype and t.dtype not in FP8_DTYPES:
            fail(TypeError, f"{name}.dtype", f"{q.dtype} like q, or float8_e4m3fn/float8_e5m2 (an fp8 cache)",
                 t.dtype)
        if t.device != q.device:
            fail(ValueError, f"{name}.device", f"{q.device} like q", t.device)
    if v_cache.dtype != k_cache.dtype:
        fail(TypeError, "v_cache.dtype", f"{k_cache.dtype} like k_cache", v_cache.dtype)
    if q.device.type not in ("cuda", "cpu"):
        fail(ValueError, "q.device", "a CUDA or CPU tensor", q.device)
    if q.dim() == 3:
        q = q.unsqueeze(1)
    if q.dim() != 4 or not 1 <= q.shape[1] <= max_q_len:
        fail(ValueError, "q.shape", f"[B, Hq, D] or [B, Sq, Hq, D] with 1 <= Sq <= {max_q_len}", tuple(q.shape))
    k, v = as_bhld(k_cache, layout), as_bhld(v_cache, layout)
    if k.dim() != 4 or v.shape != k.shape:
        fail(ValueError, "k_cache/v_cache.shape", f"equal 4-d shapes in layout {layout!r}",
             (tuple(k_cache.shape), tuple(v_cache.shape)))
    hq, head_dim = q.shape[2], q.shape[3]
    hkv = k.shape[1]
    if k.shape[3] != head_dim:
        fail(ValueError, "k_cache head dim", f"q's head dim {head_dim}", k.shape[3])
    if head_dim not in HEAD_DIMS:
        fail(ValueError, "head dim", f"one of {HEAD_DIMS}", head_dim)
    if hkv == 0 or hq % hkv:
        fail(ValueError, "q heads", f"a multiple of the KV heads ({hkv})", hq)
    if hq // hkv > max(MAX_GROUPS):
        fail(ValueError, "Hq / Hkv", f"at most {max(MAX_GROUPS)} query heads per KV head", hq // hkv)
    for t, name in ((q, "q"), (k, "k_cache"), (v, "v_cache")):
        if t.stride(-1) != 1:
            fail(ValueError, f"{name}.stride(-1)", "1 (a contiguous head dim)", t.stride(-1))
    return q, k, v


def as_bhld(cache: torch.Tensor, layout: str) -> torch.Tensor:
    """A [N, Hkv, L, D] view of a [N, Hkv, L, D] (``"bhld"``) or [N, L, Hkv, D] (``"blhd"``) cache."""
    return cache if layout == "bhld" or cache.dim() != 4 else cache.permute(0, 2, 1, 3)


def check_out(out, want: tuple, q) -> None:
    check_tensor(out, "out")
    if out.shape != want or out.dtype != q.dtype or out.device != q.device:
        fail(ValueError, "out", f"a {q.dtype} tensor of shape {want} on {q.device}",
             f"{out.dtype} {tuple(out.shape)} on {out.device}")
    if not out.is_contiguous():
        fail(ValueError, "out", "a contiguous tensor", f"strides {out.stride()}")


def check_kv_scale(scale, arg: str, hkv: int, device: torch.device, fp8: bool) -> None:
    """An fp8 cache's scale: None (1), a float (per tensor) or an fp32 [Hkv] tensor on q's device
    (per KV head, any stride). A float must be finite and > 0; a tensor's values are checked by
    :func:`check_scale_values` (when the caller may read them)."""
    if scale is None:
        return
    if not fp8:
        fail(ValueError, arg, "None with a 16-bit cache (scales belong to fp8 caches)", type(scale).__name__)
    if isinstance(scale, torch.Tensor):
        check_tensor(scale, arg)
        if scale.dtype != torch.float32:
            fail(TypeError, f"{arg}.dtype", "torch.float32", scale.dtype)
        if scale.device != device:
            fail(ValueError, f"{arg}.device", f"{device} like q", scale.device)
        if scale.shape != (hkv,):
            fail(ValueError, f"{arg}.shape", f"[{hkv}] (one scale per KV head)", tuple(scale.shape))
    elif isinstance(scale, (int, float)) and not isinstance(scale, bool):
        checked_kv_scale(scale, arg)
    else:
        fail(TypeError, arg, "a float or an fp32 tensor [Hkv]", type(scale).__name__)


def checked_kv_scale(scale: float, arg: str) -> float:
    if not (math.isfinite(scale) and scale > 0):
        fail(ValueError, arg, "a finite scale > 0", scale)
    return float(scale)


def check_scale_values(scale: torch.Tensor, arg: str) -> None:
    """Every value of a scale tensor finite and > 0: a device-to-host copy for a GPU tensor (the
    caller asked for it), skipped while capturing or compiling."""
    if capturing(scale.device) or torch.compiler.is_compiling():
        return
    if not bool((torch.isfinite(scale) & (scale > 0)).all()):
        fail(ValueError, arg, "finite scales > 0", scale.tolist())
