"""Every system the benchmark times, on one shape's tensors: the lean variants, SDPA (cuDNN,
flash), FlashInfer's decode (CUDA-core and tensor-core), FlashAttention-3 (vLLM's sm_90 build),
TVM's own decode kernel, and the streaming-read yardstick. A runner is the timed callable, the
context it must run in, and how to read its output; ``check`` compares that output (and the LSE
where a runner reports one) with a reference before any timing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import lzma
import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch

import lean_tvm
from lean_tvm import runtime
from lean_tvm.reference import decode_attention_reference
from lean_tvm.softmax import lse_natural_from_tvm

from .grid import ELEM_SIZE, FP8_SCALES, PAGE_SIZE, M, Shape
from .libraries import BenchLibrary

SPLITS = (2, 4, 8, 16, 32, 64, 128)  # lean-fixedsplit's sweep
FA3_SPLITS = (1, 2, 4, 8, 16, 32, 64)  # fa3-best's sweep, each with pack_gqa off and on


class Unsupported(Exception):
    """A system cannot run this shape; the message is the reason recorded in the row."""


@dataclasses.dataclass
class Case:
    shape: Shape
    q: torch.Tensor  # [B, Hq, D]
    kv: torch.Tensor  # [2, B, Hkv, Lalloc, D]: K and V in one block, so the stream read can use it
    seq_lens: torch.Tensor  # int32 [B]
    scale: float
    ref: torch.Tensor | None = None
    ref_kind: str = ""
    ref_lse: torch.Tensor | None = None  # made on first use (reference_lse)
    kv_blhd: torch.Tensor | None = None  # [2, B, Lalloc, Hkv, D], made on first use (blhd)
    pool: torch.Tensor | None = None  # paged shapes: K and V pages [2, P, page, Hkv, D] (NHD), shuffled
    table: torch.Tensor | None = None  # int32 [B, max_pages]: sequence b's pages of ``pool``
    # fp8 shapes: the stored cache (``kv`` and ``pool`` then hold its dequantised 16-bit values)
    kv8: torch.Tensor | None = None
    pool8: torch.Tensor | None = None

    @property
    def k(self) -> torch.Tensor:
        return self.kv[0]

    @property
    def v(self) -> torch.Tensor:
        return self.kv[1]

    def blhd(self) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V as contiguous [B, L, Hkv, D] tensors (flash-attn's and serving engines' cache)."""
        if self.kv_blhd is None:
            self.kv_blhd = self.kv.transpose(2, 3).contiguous()
        return self.kv_blhd[0], self.kv_blhd[1]


def make_case(shape: Shape, device: torch.device, seed: int) -> Case:
    """Random K/V (dense), q ([B, Hq, D], or [B, Sq, Hq, D] with several tokens) and, for a paged
    shape, the same K/V rows in shuffled pages of a pool. An fp8 shape stores K/V in its cache
    dtype (``kv8``, ``pool8``) and keeps their real values, stored x ``FP8_SCALES``, in ``kv``
    and ``pool`` (exact in 16 bits): every system sees the same numbers."""
    dt = getattr(torch, shape.dtype)
    g = torch.Generator(device=device).manual_seed(seed)
    kv = torch.randn(2, shape.batch, shape.hkv, shape.alloc_len, shape.head_dim, device=device, dtype=dt, generator=g)
    kv8 = None
    if shape.kv_dtype:
        kv8 = kv.to(getattr(torch, shape.kv_dtype))
        kv = kv8.to(dt)
        kv[0] *= FP8_SCALES[0]
        kv[1] *= FP8_SCALES[1]
    tokens = (shape.q_len,) if shape.q_len > 1 else ()
    q = torch.randn(shape.batch, *tokens, shape.hq, shape.head_dim, device=device, dtype=dt, generator=g)
    seq_lens = torch.tensor(shape.lens, dtype=torch.int32, device=device)
    case = Case(shape, q, kv, seq_lens, 1.0 / math.sqrt(shape.head_dim), kv8=kv8)
    if shape.page_size:
        case.pool, case.table = page_pool(kv, shape.lens, shape.page_size, seed)
        if kv8 is not None:
            case.pool8, _ = page_pool(kv8, shape.lens, shape.page_size, seed)
    return case


def page_pool(kv: torch.Tensor, lens: Sequence[int], page: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[2, B, Hkv, Lalloc, D] -> (pool [2, P, page, Hkv, D], block table int32 [B, max_pages]):
    every sequence's rows in pages of ``page`` rows at shuffled places of the pool (the last page
    whole, rows past the length included)."""
    _, _, hkv, _, d = kv.shape
    pages = [-(-n // page) for n in lens]
    perm = torch.randperm(sum(pages), generator=torch.Generator().manual_seed(seed)).to(kv.device)
    pool = torch.empty(2, sum(pages), page, hkv, d, dtype=kv.dtype, device=kv.device)
    table = torch.zeros(len(lens), max(max(pages), 1), dtype=torch.int32, device=kv.device)
    at = 0
    for b, p in enumerate(pages):
        ids = perm[at:at + p]
        table[b, :p] = ids.to(torch.int32)
        pool[:, ids] = kv[:, b, :, :p * page].reshape(2, hkv, p, page, d).permute(0, 2, 3, 1, 4)
        at += p
    return pool, table


def reference_float64(case: Case, chunk_bytes: int = 512 * M) -> torch.Tensor:
    """The package's float64 reference (q's shape), a sequence and a few KV heads at a time, so
    that a 512k context does not need its whole cache in float64 at once."""
    s = case.shape
    g = s.hq // s.hkv
    out = torch.empty(case.q.shape, dtype=torch.float64, device=case.q.device)
    for b, n, h0, h1 in head_chunks(s, chunk_bytes, 8):
        o, _ = decode_attention_reference(case.q[b:b + 1, ..., h0 * g:h1 * g, :], case.k[b:b + 1, h0:h1],
                                          case.v[b:b + 1, h0:h1], [n], case.scale)
        out[b, ..., h0 * g:h1 * g, :] = o[0]
    return out


def reference_lse(case: Case, chunk_bytes: int = 512 * M) -> torch.Tensor:
    """Natural-log LSE [B, Hq] from float32 scores: it needs K only, so it is cheap next to the
    output's reference even where that one is SDPA."""
    s = case.shape
    g = s.hq // s.hkv
    out = torch.empty(s.batch, s.hq, dtype=torch.float32, device=case.q.device)
    for b, n, h0, h1 in head_chunks(s, chunk_bytes, 4):
        q = case.q[b, h0 * g:h1 * g].float().view(h1 - h0, g, s.head_dim)
        scores = torch.einsum("hgd,hld->hgl", q, case.k[b, h0:h1, :n].float()) * case.scale
        out[b, h0 * g:h1 * g] = torch.logsumexp(scores, -1).flatten()
    return out


def head_chunks(shape: Shape, chunk_bytes: int, elem_size: int):
    """(b, n, h0, h1): sequence b (length n) a few KV heads at a time, so that a 512k context
    never needs its whole cache at ``elem_size`` bytes per element at once."""
    for b, n in enumerate(shape.lens):
        step = max(1, chunk_bytes // (n * shape.head_dim * elem_size))
        for h0 in range(0, shape.hkv, step):
            yield b, n, h0, min(shape.hkv, h0 + step)


def reference(case: Case) -> tuple[torch.Tensor, str]:
    """SDPA (default dispatch) for uniform batches, float64 for ragged ones (or if SDPA fails)."""
    if not case.shape.ragged and case.shape.q_len == 1:
        n = case.shape.max_len
        try:
            o = torch.nn.functional.scaled_dot_product_attention(
                case.q[:, :, None], case.k[:, :, :n], case.v[:, :, :n], scale=case.scale, enable_gqa=True)
            return o[:, :, 0].float(), "sdpa"
        except RuntimeError:  # no kernel for it, or out of memory (math's GQA expands K/V): float64
            gc.collect()
            torch.cuda.empty_cache()
    return reference_float64(case).float(), "float64"


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute difference relative to the reference's largest magnitude (NaN -> inf)."""
    diff = (out.float() - ref).abs().max().item()
    return diff / max(ref.abs().max().item(), 1e-30) if math.isfinite(diff) else math.inf


def tolerance(dtype: str) -> float:
    """Loose on purpose: the check catches a wrong partition or merge, not rounding."""
    return 2e-2 if dtype == "float16" else 5e-2


# --------------------------------------------------------------------------------------------
# Systems: each runner returns the timed callable, the context it must run in, and its output
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Runner:
    fn: Callable[[], object]
    output: Callable[[], torch.Tensor]  # [B, Hq, D], valid after fn() ran
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    extra: dict = dataclasses.field(default_factory=dict)
    lse: Callable[[], torch.Tensor] | None = None  # natural-log [B, Hq] after fn(); checked when given
    tolerance: float | None = None  # the check's, where the system rounds its inputs further (fp8 q)


def lean_runner(case: Case, layout: str = "bhld", paged: bool = False, bits16: bool = False) -> Runner:
    """``lean_tvm.decode_attention`` as a user calls it (its default: no host synchronisation),
    on the [B, Hkv, L, D] cache, on its [B, L, Hkv, D] copy, or (``paged``) on the page pool; an
    fp8 shape's cache with its scales, or (``bits16``) its dequantised 16-bit values."""
    out = torch.empty_like(case.q)
    fp8 = case.kv8 is not None and not bits16
    scales = dict(k_scale=FP8_SCALES[0], v_scale=FP8_SCALES[1]) if fp8 else {}
    if paged:
        table, pool = case.table, case.pool8 if fp8 else case.pool

        def fn():
            lean_tvm.decode_attention(case.q, pool[0], pool[1], case.seq_lens, block_table=table,
                                      softmax_scale=case.scale, out=out, layout="blhd", **scales)
    else:
        if fp8:
            if layout != "bhld":
                raise Unsupported("the fp8 rows time the [B, Hkv, L, D] cache")
            k, v = case.kv8[0], case.kv8[1]
        else:
            k, v = (case.k, case.v) if layout == "bhld" else case.blhd()

        def fn():
            lean_tvm.decode_attention(case.q, k, v, case.seq_lens, softmax_scale=case.scale, out=out, layout=layout,
                                      **scales)

    return Runner(fn, lambda: out)


def lean_split_runner(case: Case, num_splits: int) -> Runner:
    """The same kernel with a fixed split of every tile (``num_splits``; 1 = no split)."""
    s = case.shape
    info = runtime.library_for(case.q.device).attention_kernel(s.dtype, s.head_dim, s.hq // s.hkv, s.batch * s.hkv)
    if info is None:
        raise Unsupported(f"no lean kernel for {s.dtype} D{s.head_dim} G{s.hq // s.hkv}")
    out = torch.empty_like(case.q)
    lse = torch.empty(s.batch, s.hq, device=case.q.device, dtype=torch.float32)

    def fn():
        runtime.launch_attention(case.q, case.k, case.v, case.seq_lens, out, lse, case.scale, num_splits=num_splits,
                                 kernel=info)

    return Runner(fn, lambda: out, extra={"block_size": info.block_size, "max_group": info.max_group})


def split_candidates(shape: Shape, block_size: int, max_group: int, workspace_cap: int = 2 << 30) -> list[int]:
    """Fixed splits worth trying: no more chunks than the longest tile has blocks, and a
    partials workspace (one [max_group, D] float32 state per chunk) under ``workspace_cap``."""
    blocks = -(-shape.max_len // block_size)
    return [S for S in SPLITS if S <= blocks
            and shape.batch * shape.hkv * S * max_group * shape.head_dim * 4 <= workspace_cap]


SDPA_BACKENDS = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION"}
_SDPA_REASONS: dict[tuple[str, str], str] = {}


def sdpa_runner(case: Case, system: str) -> Runner:
    """SDPA on q [B, Hq, Sq, D] and the dense [B, Hkv, L, D] caches (a paged shape's dense copy);
    ragged batches padded + masked, several tokens with the bottom-right causal mask."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    if case.kv8 is not None:
        raise Unsupported("SDPA takes no fp8 cache")
    backend = getattr(SDPBackend, SDPA_BACKENDS[system])
    sq = case.shape.q_len
    q4 = case.q[:, :, None] if sq == 1 else case.q.transpose(1, 2)
    k, v = case.k, case.v
    mask = None
    if case.shape.ragged:
        pos = torch.arange(k.shape[2], device=k.device)
        limit = case.seq_lens[:, None].long() - sq + 1 + torch.arange(sq, device=k.device)[None, :]  # [B, Sq]
        mask = (pos[None, None, :] < limit[:, :, None])[:, None]  # [B, 1, Sq, Lalloc]
    else:
        if k.shape[2] != case.shape.max_len:
            k, v = k[:, :, :case.shape.max_len], v[:, :, :case.shape.max_len]
        if sq > 1:
            mask = causal_lower_right(sq, case.shape.max_len)
    box = {}

    def fn():
        box["o"] = torch.nn.functional.scaled_dot_product_attention(q4, k, v, attn_mask=mask, scale=case.scale,
                                                                    enable_gqa=True)

    def context():
        return sdpa_kernel(backend)

    how = "padded + mask" if case.shape.ragged else ("bottom-right causal" if sq > 1 else "")
    with warnings.catch_warnings(record=True) as caught, context():
        warnings.simplefilter("always")
        try:
            fn()
        except torch.cuda.OutOfMemoryError:
            raise
        except (RuntimeError, ValueError, NotImplementedError) as e:
            # torch states its reasons as warnings, some only once per process: keep the first seen
            key = (system, how)
            why = "; ".join(dict.fromkeys(str(w.message).strip().split("\n")[0] for w in caught))
            why = _SDPA_REASONS.setdefault(key, why) if why else _SDPA_REASONS.get(key, str(e).split("\n")[0])
            raise Unsupported(f"SDPA {system} refused{f' ({how})' if how else ''}: {why[:300]}") from None
    return Runner(fn, lambda: box["o"][:, :, 0] if sq == 1 else box["o"].transpose(1, 2), context,
                  extra={"backend": how})


class FlashInfer:
    """FlashInfer's paged wrappers (decode, with or without tensor cores, and prefill for several
    tokens), imported once; ``error`` says why they are missing."""

    def __init__(self, device: torch.device):
        self.device, self.error, self.wrappers, self.version = device, "", {}, ""
        try:
            if device.type == "cuda":  # what its JIT compiles for; sm_90 needs the "a" (wgmma) target
                major, minor = torch.cuda.get_device_capability(device)
                os.environ.setdefault("FLASHINFER_CUDA_ARCH_LIST", f"{major}.{minor}" + ("a" if major == 9 else ""))
            from flashinfer.decode import BatchDecodeWithPagedKVCacheWrapper
            from flashinfer.prefill import BatchPrefillWithPagedKVCacheWrapper

            try:
                from flashinfer.version import __version__ as version
            except ImportError:
                version = "?"
            self.version = version
            self.workspace = torch.zeros(128 * M, dtype=torch.uint8, device=device)
            self.decode, self.prefill = BatchDecodeWithPagedKVCacheWrapper, BatchPrefillWithPagedKVCacheWrapper
        except Exception as e:  # noqa: BLE001 - any import failure is a reason, not a crash
            self.error = f"flashinfer not importable: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"

    def wrapper(self, kind: str, layout: str):
        """``kind``: "decode", "decode-tc" or "prefill"; ``layout``: "HND" or "NHD"."""
        if (kind, layout) not in self.wrappers:
            if kind == "prefill":
                self.wrappers[kind, layout] = self.prefill(self.workspace, layout)
            else:
                self.wrappers[kind, layout] = self.decode(self.workspace, layout, use_tensor_cores=kind == "decode-tc")
        return self.wrappers[kind, layout]


@dataclasses.dataclass
class PagedCache:
    """A paged cache as the paged peers take it: FlashInfer's page list form."""

    kv: object  # [pages, 2, Hkv, page, D] (HND: TVM's layout too), or a (K, V) pair of [P, page, Hkv, D] (NHD)
    layout: str  # "HND" or "NHD"
    page_size: int
    indptr: torch.Tensor  # int32 [B + 1], host
    indices: torch.Tensor  # int32 [pages], device
    last_page_len: torch.Tensor  # int32 [B], host


def page_table(lens: Sequence[int], page_size: int = PAGE_SIZE) -> tuple[list[int], list[int]]:
    """(indptr, last_page_len) of sequences laid out page after page."""
    pages = [-(-n // page_size) for n in lens]
    indptr = [0, *np.cumsum(pages).tolist()]
    return indptr, [n - (p - 1) * page_size for n, p in zip(lens, pages, strict=True)]


def copy_into_pages(kv: torch.Tensor, indptr: Sequence[int]) -> torch.Tensor:
    """[2, B, Hkv, Lalloc, D] -> [pages, 2, Hkv, 16, D]: sequence b's K and V rows fill pages
    indptr[b]..indptr[b+1] (its last page whole, rows past its length included: last_page_len says
    where it ends)."""
    _, _, hkv, _, d = kv.shape
    dst = torch.empty(indptr[-1], 2, hkv, PAGE_SIZE, d, dtype=kv.dtype, device=kv.device)
    for b in range(len(indptr) - 1):
        p = indptr[b + 1] - indptr[b]
        dst[indptr[b]:indptr[b + 1]] = kv[:, b, :, :p * PAGE_SIZE].reshape(2, hkv, p, PAGE_SIZE, d).permute(
            2, 0, 1, 3, 4)
    return dst


def paged_cache(case: Case) -> PagedCache:
    """The paged peers' cache: a paged shape's own pool (no copy), else the contiguous cache copied
    into 16-row pages (HND), once, outside timing: same values, one copy for every paged peer."""
    s = case.shape
    i32 = dict(dtype=torch.int32)
    kv, pool = (case.kv, case.pool) if case.kv8 is None else (case.kv8, case.pool8)  # fp8: the stored cache
    if pool is not None:
        indptr, last = page_table(s.lens, s.page_size)
        rows = [case.table[b, :indptr[b + 1] - indptr[b]] for b in range(s.batch)]
        return PagedCache((pool[0], pool[1]), "NHD", s.page_size, torch.tensor(indptr, **i32),
                          torch.cat(rows).contiguous(), torch.tensor(last, **i32))
    indptr, last = page_table(s.lens)
    need = 2 * indptr[-1] * s.hkv * PAGE_SIZE * s.head_dim * ELEM_SIZE[s.kv_dtype or s.dtype]
    if case.q.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(case.q.device)
        if need > free - 512 * M:
            raise Unsupported(f"paged copy of {need / 1e9:.1f} GB does not fit ({free / 1e9:.1f} GB free)")
    return PagedCache(copy_into_pages(kv, indptr), "HND", PAGE_SIZE, torch.tensor(indptr, **i32),
                      torch.arange(indptr[-1], device=case.q.device, **i32), torch.tensor(last, **i32))


def flashinfer_runner(case: Case, fi: FlashInfer, paged: PagedCache, tensor_cores: bool) -> Runner:
    """FlashInfer on its paged cache: its decode wrapper for one token, its paged prefill wrapper
    (causal, bottom-right aligned) for several; an fp8 cache with its scales (q stays 16-bit)."""
    s = case.shape
    sq = s.q_len
    kv_dtype = getattr(torch, s.kv_dtype) if s.kv_dtype else case.q.dtype
    scales = dict(k_scale=FP8_SCALES[0], v_scale=FP8_SCALES[1]) if s.kv_dtype else {}
    if sq > 1 and tensor_cores:
        raise Unsupported("several tokens run FlashInfer's prefill wrapper: see the flashinfer column")
    kind = "prefill" if sq > 1 else ("decode-tc" if tensor_cores else "decode")
    q = case.q.reshape(s.batch * sq, s.hq, s.head_dim) if sq > 1 else case.q
    w = None

    def plan():
        if sq > 1:
            qo_indptr = torch.arange(0, (s.batch + 1) * sq, sq, dtype=torch.int32)
            w.plan(qo_indptr, paged.indptr, paged.indices, paged.last_page_len, s.hq, s.hkv, s.head_dim,
                   paged.page_size, causal=True, pos_encoding_mode="NONE", q_data_type=case.q.dtype,
                   kv_data_type=kv_dtype, sm_scale=case.scale)
        else:
            w.plan(paged.indptr, paged.indices, paged.last_page_len, s.hq, s.hkv, s.head_dim, paged.page_size,
                   pos_encoding_mode="NONE", q_data_type=case.q.dtype, kv_data_type=kv_dtype, sm_scale=case.scale)

    try:
        w = fi.wrapper(kind, paged.layout)
        plan()  # the first plan/run JIT-compiles the module (15-25 s), outside any timing
        out = torch.empty_like(q)
        w.run(q, paged.kv, out=out, **scales)
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise Unsupported(f"flashinfer{'-tc' if tensor_cores else ''} failed: {type(e).__name__}: {first}") from None
    plan_us = []
    for _ in range(5):  # host time of plan() alone: once per decode step in a server
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        plan()
        plan_us.append((time.perf_counter() - t0) * 1e6)
    backend = getattr(w, "resolved_backend", "")
    return Runner(lambda: w.run(q, paged.kv, out=out, **scales), lambda: out.view(case.q.shape),
                  extra={"plan_us": float(np.median(plan_us)), "backend": str(backend)})


class TvmPeer:
    """TVM's decode kernels from the benchmark's libraries (``tvm_peer``), loaded once with tvm-ffi;
    ``error`` says why they are missing."""

    def __init__(self, lib: BenchLibrary):
        self.error, self.library, self.kernels = "", "", {}
        try:
            entry = lib.tvm_peer() if not lib.error else None
            if entry is None:
                raise Unsupported(lib.error or "no TVM peer library: build it with `python -m "
                                  "lean_tvm.bench.libraries --arch <arch> --out DIR --with-tvm-peer`")
            self.kernels = {(k["hq"], k["hkv"], k["head_dim"], k["dtype"]): lib.tvm_peer_function(k["name"])
                            for k in entry["kernels"]}
            self.library = entry["library"]
        except Unsupported as e:
            self.error = str(e)
        except Exception as e:  # noqa: BLE001 - a library that does not load is a reason, not a crash
            self.error = f"TVM peer library not loadable: {type(e).__name__}: {str(e).strip()[:200]}"

    def kernel(self, shape: Shape):
        if self.error:
            raise Unsupported(self.error)
        fn = self.kernels.get((shape.hq, shape.hkv, shape.head_dim, shape.dtype))
        if fn is None:
            raise Unsupported(f"no TVM kernel for {shape.hq}/{shape.hkv} D{shape.head_dim} {shape.dtype} in "
                              f"{self.library}")
        return fn


def tvm_runner(case: Case, peer: TvmPeer, paged: PagedCache) -> Runner:
    """TVM's kernel on the paged copy, without RoPE (rotary_mode 0); its lse comes in log2 units."""
    if case.kv8 is not None:
        raise Unsupported("TVM's decode kernel takes no fp8 cache")
    if paged.layout != "HND" or paged.page_size != PAGE_SIZE or case.shape.q_len > 1:
        raise Unsupported(f"TVM's decode kernel takes one token over [P, 2, Hkv, {PAGE_SIZE}, D] pages")
    fn = peer.kernel(case.shape)
    dev = case.q.device
    last = paged.last_page_len.to(dev)
    zeros = torch.zeros_like(last)
    args = (case.q, paged.kv, paged.indptr.to(dev), paged.indices, last, zeros, zeros)
    out = torch.empty_like(case.q)
    lse = torch.empty(case.shape.batch, case.shape.hq, device=dev, dtype=torch.float32)
    return Runner(lambda: fn(*args, out, lse, 0, 1.0, 1e4, case.scale), lambda: out,
                  lse=lambda: lse_natural_from_tvm(lse))


class FA3:
    """FlashAttention-3 from vLLM's prebuilt sm_90 library (``../shared/tools/fa3_payload.sh``:
    ``_vllm_fa3_C.abi3.so.xz`` in ``$LEAN_TVM_FA3`` or a folder on ``sys.path``), loaded once;
    ``error`` says why it is missing."""

    def __init__(self, device: torch.device):
        self.error, self.ops, self.version = "", None, ""
        try:
            packed = _find_fa3_payload()
            if packed is None:
                raise FileNotFoundError("_vllm_fa3_C.abi3.so.xz not found ($LEAN_TVM_FA3 or sys.path)")
            so = os.path.join(tempfile.gettempdir(), "lean_tvm_fa3.so")
            if not os.path.exists(so):
                with lzma.open(packed) as src, open(so + ".part", "wb") as dst:
                    shutil.copyfileobj(src, dst)
                os.replace(so + ".part", so)
            torch.ops.load_library(so)
            self.ops = torch.ops._vllm_fa3_C
            version = os.path.join(os.path.dirname(packed), ".fa3_payload")
            self.version = "vllm " + (open(version).read().strip() if os.path.exists(version) else "?")
        except Exception as e:  # noqa: BLE001 - any load failure is a reason, not a crash
            self.error = f"FA3 not loadable: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _find_fa3_payload() -> str | None:
    import sys

    for d in [os.environ.get("LEAN_TVM_FA3", ""), *sys.path]:
        p = os.path.join(d, "_vllm_fa3_C.abi3.so.xz") if d else ""
        if p and os.path.exists(p):
            return p
    return None


def fa3_runner(case: Case, fa3: FA3, num_splits: int = 0, pack_gqa: bool | None = None) -> Runner:
    """FA3's decode as vLLM calls it: q [B, Sq, Hq, D], the [B, L, Hkv, D] cache or a paged shape's
    [P, page, Hkv, D] pool with its block table, ``seqused_k``, causal for several tokens, and
    scheduler metadata computed once (``num_splits = 0``: its own heuristic). An fp8 cache runs its
    fp8 path, which needs q in fp8 too (e4m3, descale 1; K/V descales [B, Hkv]) and writes bf16."""
    if fa3.error:
        raise Unsupported(fa3.error)
    s = case.shape
    sq, causal = s.q_len, s.q_len > 1
    fp8 = case.kv8 is not None
    if fp8 and s.kv_dtype != "float8_e4m3fn":
        raise Unsupported("FA3's fp8 path takes e4m3")
    if case.pool is not None:
        pool = case.pool8 if fp8 else case.pool
        k, v, table, page = pool[0], pool[1], case.table, s.page_size
        max_k = s.max_len
    else:
        (k, v), table, page = (case.kv8.transpose(2, 3).contiguous() if fp8 else case.blhd()), None, None
        max_k = k.shape[1]  # a dense cache's width: FA3 checks k's shape against it
    q4 = case.q[:, None] if sq == 1 else case.q
    descales = [None, None, None]
    if fp8:
        q4 = q4.to(torch.float8_e4m3fn)
        descales = [torch.full((s.batch, s.hkv), x, dtype=torch.float32, device=q4.device)
                    for x in (1.0, *FP8_SCALES)]
    out = torch.empty(q4.shape, dtype=torch.bfloat16 if fp8 else q4.dtype, device=q4.device)
    md = fa3.ops.get_scheduler_metadata(s.batch, sq, max_k, s.hq, s.hkv, s.head_dim, s.head_dim, q4.dtype,
                                        case.seq_lens, None, None, None, None, None, page, 0, causal, -1, -1, False,
                                        num_splits, pack_gqa, 0)

    def fn():
        fa3.ops.fwd(q4, k, v, None, None, None, out, None, None, None, None, case.seq_lens, sq, max_k, table,
                    None, None, None, None, None, *descales, case.scale, causal, -1, -1, 0.0, True, md,
                    num_splits, pack_gqa, 0, None, 1, 0, None)

    extra = {"splits": num_splits, "backend": f"num_splits={num_splits or 'heuristic'}, pack_gqa={pack_gqa}"
             + (", q in e4m3" if fp8 else "")}
    return Runner(fn, lambda: out[:, 0] if sq == 1 else out, extra=extra, tolerance=0.1 if fp8 else None)


def stream_runner(case: Case, lib: BenchLibrary, sink: torch.Tensor, grid: int) -> Runner:
    """The TIR streaming read of exactly ``kv_bytes``, taken from the start of the K/V block."""
    fn_read = lib.stream_read()
    rows = case.shape.kv_bytes // 16
    flat = case.kv.view(torch.float16) if case.kv.dtype != torch.float16 else case.kv
    x = flat.view(-1)[:rows * 8].view(rows, 8)
    return Runner(lambda: fn_read(x, sink, grid), lambda: None)




def sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def check(runner: Runner, case: Case) -> tuple[float, bool]:
    """The larger relative error of the output and (when the runner reports it) the LSE."""
    with runner.context():
        runner.fn()
    sync()
    err = rel_error(runner.output(), case.ref)
    if runner.lse is not None:
        if case.ref_lse is None:
            case.ref_lse = reference_lse(case)
        err = max(err, rel_error(runner.lse(), case.ref_lse))
    return err, err <= (runner.tolerance or tolerance(case.shape.dtype))
