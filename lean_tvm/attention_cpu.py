"""Decode attention on the stream-K primitive, CPU form (``llvm``): the package's CPU operator and
the oracle that checks the plan, the walk and the cross-block merge the GPU kernel shares.

One output tile is (sequence b, KV head h) with the G = Hq / Hkv query heads of its group; the
state per query head is the online softmax (m, l, acc) in the log2 domain (``softmax.py``),
folded a block of rows at a time, merged with other workers' partial states by rescaling to the
larger maximum.

Two kernels: ``make_cpu_kernel`` over a dense [B, Hkv, L, D] cache with one query token, and
``make_cpu_paged_kernel`` over pages found through a block table (a dense cache is one page per
sequence), with Sq query tokens per sequence and a first valid row per sequence (``leftpad``).
There a tile is (sequence b, KV head h, chunk c) of R = ``max_group`` query rows, the Sq x G rows
(i, g) of KV head h laid out i-major; query i sees rows [0, n - (Sq - 1 - i)) of the n rows
[leftpad, seq_len) of its sequence (flash-attn's bottom-right causal alignment).
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import tvm
from tvm.script import tirx as T

from . import kv_fp8, streamk
from . import signature as sig
from .softmax import FLT_MAX, LOG2E, LSE_NATURAL, NEG_INF, LseConvention
from .spec import AttentionSpec, StreamKConfig
from .tiles import TileLayout, paged_buffers, started_lens


def cpu_operator(spec: AttentionSpec, block_size: int) -> streamk.CpuOperator:
    """The macros over ``bufs``: Q ([b, h * G + g, d]-indexable), K, V ([b, h, row, d]-indexable),
    O, LSE, WSO, WSML, HQ, G (query rows of a tile), ``limit(n, h, g)`` (rows query row g of tile h
    sees of the n valid ones), the state m, l, acc (G x D), the scores s of a block and the scalars
    dot, m_new, m_safe, alpha, beta."""
    D, dt = spec.head_dim, spec.dtype

    @T.macro
    def begin_tile(bufs, b, h):
        for g in range(bufs.G):
            bufs.m[g] = T.float32(NEG_INF)
            bufs.l[g] = T.float32(0)
            for d in range(D):
                bufs.acc[g * D + d] = T.float32(0)

    @T.macro
    def step(bufs, b, h, row0, n):
        for g in range(bufs.G):
            rows = T.meta_var(T.max(T.min(block_size, bufs.limit(n, h, g) - row0), 0))
            bufs.m_new[0] = T.float32(NEG_INF)
            for r in range(rows):
                bufs.dot[0] = T.float32(0)
                for d in range(D):
                    bufs.dot[0] = bufs.dot[0] + T.Cast("float32", bufs.Q[b, h * bufs.G + g, d]) * T.Cast(
                        "float32", bufs.K[b, h, row0 + r, d])
                bufs.s[r] = bufs.dot[0] * bufs.scale_log2
                bufs.m_new[0] = T.max(bufs.m_new[0], bufs.s[r])
            bufs.m_new[0] = T.max(bufs.m_new[0], bufs.m[g])
            bufs.m_safe[0] = T.max(bufs.m_new[0], T.float32(-FLT_MAX))  # finite: no row seen yet is -inf
            bufs.alpha[0] = T.exp2(bufs.m[g] - bufs.m_safe[0])  # rescale of the old state
            bufs.l[g] = bufs.l[g] * bufs.alpha[0]
            for d in range(D):
                bufs.acc[g * D + d] = bufs.acc[g * D + d] * bufs.alpha[0]
            for r in range(rows):
                bufs.s[r] = T.exp2(bufs.s[r] - bufs.m_safe[0])
                bufs.l[g] = bufs.l[g] + bufs.s[r]
                for d in range(D):
                    bufs.acc[g * D + d] = bufs.acc[g * D + d] + bufs.s[r] * T.Cast(
                        "float32", bufs.V[b, h, row0 + r, d])
            bufs.m[g] = bufs.m_new[0]

    @T.macro
    def publish(bufs, slot):
        for g in range(bufs.G):
            bufs.WSML[slot, 0, g] = bufs.m[g]
            bufs.WSML[slot, 1, g] = bufs.l[g]
            for d in range(D):
                bufs.WSO[slot, g, d] = bufs.acc[g * D + d]

    @T.macro
    def merge_partials(bufs, top, n, valid):
        for g in range(bufs.G):
            bufs.m_new[0] = bufs.m[g]
            for i in range(n):
                if valid[i] != 0:
                    bufs.m_new[0] = T.max(bufs.m_new[0], bufs.WSML[top - i, 0, g])
            bufs.m_safe[0] = T.max(bufs.m_new[0], T.float32(-FLT_MAX))
            bufs.alpha[0] = T.exp2(bufs.m[g] - bufs.m_safe[0])
            bufs.l[g] = bufs.l[g] * bufs.alpha[0]
            for d in range(D):
                bufs.acc[g * D + d] = bufs.acc[g * D + d] * bufs.alpha[0]
            for i in range(n):
                if valid[i] != 0:
                    bufs.beta[0] = T.exp2(bufs.WSML[top - i, 0, g] - bufs.m_safe[0])
                    bufs.l[g] = bufs.l[g] + bufs.WSML[top - i, 1, g] * bufs.beta[0]
                    for d in range(D):
                        bufs.acc[g * D + d] = bufs.acc[g * D + d] + bufs.WSO[top - i, g, d] * bufs.beta[0]
            bufs.m[g] = bufs.m_new[0]

    @T.macro
    def write_output(bufs, b, h):
        for g in range(bufs.G):
            bufs.LSE[b, h * bufs.G + g] = (bufs.m[g] + T.log2(bufs.l[g])) * T.float32(bufs.lse.unit)
            for d in range(D):
                bufs.O[b, h * bufs.G + g, d] = T.Cast(dt, bufs.acc[g * D + d] / bufs.l[g])

    @T.macro
    def write_empty(bufs, b):
        for hq in range(bufs.HQ):
            bufs.LSE[b, hq] = T.float32(bufs.lse.empty)
            for d in range(D):
                bufs.O[b, hq, d] = T.Cast(dt, T.float32(0))

    return streamk.CpuOperator(begin_tile=begin_tile, step=step, publish=publish, merge_partials=merge_partials,
                               write_output=write_output, write_empty=write_empty)


def run_walk_macro(spec: AttentionSpec, block_size: int, tile_cost: int = 0, lse: LseConvention = LSE_NATURAL,
                   op: streamk.CpuOperator | None = None):
    """``run(ctx, inputs)``: allocate the operator's state and the plan's scratch, then run the
    serial walk. ``ctx`` holds SL, B, H, LMAX, NW, SPLITS, FLAGS (see ``streamk.WalkContext``);
    ``inputs`` Q, K, V, O, LSE, WSO, WSML, HQ, G, ``scale`` (the softmax scale) and optionally
    ``limit`` (default: every query row sees the n valid rows). ``op``: default
    :func:`cpu_operator`."""
    GM, D = spec.max_group, spec.head_dim
    op = op or cpu_operator(spec, block_size)
    cfg = StreamKConfig(block_size=block_size, tile_cost=tile_cost)
    walk = streamk.cpu_walk(cfg)

    @T.macro
    def run(ctx, inputs):
        cum = T.alloc_buffer((ctx.B + 1,), "int32")
        srch = T.alloc_buffer((2,), "int32")
        qr = T.alloc_buffer((streamk.qr_len(cfg),), "int32")
        m = T.alloc_buffer((GM,), "float32")
        l_ = T.alloc_buffer((GM,), "float32")
        acc = T.alloc_buffer((GM * D,), "float32")
        s = T.alloc_buffer((block_size,), "float32")
        dot = T.alloc_buffer((1,), "float32")
        m_new = T.alloc_buffer((1,), "float32")
        m_safe = T.alloc_buffer((1,), "float32")
        alpha = T.alloc_buffer((1,), "float32")
        beta = T.alloc_buffer((1,), "float32")
        wctx = T.meta_var(streamk.WalkContext(SL=ctx.SL, B=ctx.B, H=ctx.H, LMAX=ctx.LMAX, CUM=cum, NW=ctx.NW,
                                              SPLITS=ctx.SPLITS, QR=qr, srch=srch, FLAGS=ctx.FLAGS))
        bufs = T.meta_var(_operator_state(inputs, m=m, l=l_, acc=acc, s=s, dot=dot, m_new=m_new, m_safe=m_safe,
                                          alpha=alpha, beta=beta, scale_log2=inputs.scale * T.float32(LOG2E),
                                          lse=lse))
        walk(wctx, op, bufs)

    return run


def _all_rows(n, h, g):
    return n


def _operator_state(inputs, **state) -> SimpleNamespace:
    """The operator's ``bufs``: the kernel's inputs (``limit`` defaulting to every valid row) and its
    state buffers."""
    return SimpleNamespace(**{"limit": _all_rows, **vars(inputs), **state})


def dense_cpu_body(spec: AttentionSpec, block_size: int, tile_cost: int = 0):
    """The serial kernel's body macro over strided [B, Hkv, L, D] K/V, taking the parameters of
    ``sig.ATTENTION_PARAMS`` but ``grid`` by name: every form of the CPU kernel (this module's, the
    stream-K rule's) is ``sig.prim_func`` of it."""
    GM, D, dt = spec.max_group, spec.head_dim, spec.dtype
    run = run_walk_macro(spec, block_size, tile_cost)
    one, two, d64, g64 = (tvm.tirx.const(x, "int64") for x in (1, 2, D, GM))

    @T.macro
    def body(q, k, v, seq_lens, o, lse, ws_o, ws_ml, flags, softmax_scale, num_workers, num_splits):
        B, HQ, HKV, LMAX, WSN = T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
        sqb, sqh, skb, skh, skl = T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
        svb, svh, svl = T.int64(), T.int64(), T.int64()
        Q = T.match_buffer(q, (B, HQ, d64), dt, strides=(sqb, sqh, one))
        K = T.match_buffer(k, (B, HKV, LMAX, d64), dt, strides=(skb, skh, skl, one))
        V = T.match_buffer(v, (B, HKV, LMAX, d64), dt, strides=(svb, svh, svl, one))
        SL = T.match_buffer(seq_lens, (B,), "int32")
        O = T.match_buffer(o, (B, HQ, d64), dt)
        LSE = T.match_buffer(lse, (B, HQ), "float32")
        WSO = T.match_buffer(ws_o, (WSN, g64, d64), "float32")
        WSML = T.match_buffer(ws_ml, (WSN, two, g64), "float32")
        FLAGS = T.match_buffer(flags, (WSN,), "int32")
        nh = T.meta_var(T.Cast("int32", HKV))
        ctx = T.meta_var(SimpleNamespace(SL=SL, B=T.Cast("int32", B), H=nh, LMAX=T.Cast("int32", LMAX),
                                         NW=num_workers, SPLITS=num_splits, FLAGS=FLAGS))
        inputs = T.meta_var(SimpleNamespace(Q=Q, K=K, V=V, O=O, LSE=LSE, WSO=WSO, WSML=WSML, HQ=T.Cast("int32", HQ),
                                            G=T.truncdiv(T.Cast("int32", HQ), nh), scale=softmax_scale))
        run(ctx, inputs)

    return body


def make_cpu_kernel(spec: AttentionSpec, block_size: int = 64, dps: bool = False, tile_cost: int = 0):
    """The serial stream-K kernel over strided [B, Hkv, L, D] K/V, for ``llvm``.

    ``dps=True`` puts the outputs (o, lse) last, after the scalars, as Relax's call_tir wants.
    ``tile_cost``: the stream-K plan's charge per tile (``plan.stream_k_edges``), as the GPU
    kernel built from the same schedule record uses."""
    body = dense_cpu_body(spec, block_size, tile_cost)
    params = sig.outputs_last(sig.ATTENTION_PARAMS, sig.ATTENTION_OUTPUTS) if dps else sig.ATTENTION_PARAMS
    return sig.prim_func(spec.name + "_cpu", params, body,
                         ["q", "k", "v", "seq_lens", "o", "lse", "ws_o", "ws_ml", "flags", "softmax_scale",
                          "num_workers", "num_splits"], {"tirx.noalias": True})


# --------------------------------------------------------------------------------------------
# The paged form: block tables, Sq query tokens per sequence, a first valid row per sequence.
# --------------------------------------------------------------------------------------------


class _TileQueries:
    """q [B, Sq, Hq, D] read as the operator's ``Q[b, h * R + g, d]``."""

    def __init__(self, q, layout: TileLayout):
        self.q, self.layout = q, layout

    def __getitem__(self, index):
        b, hg, d = index
        h, g = T.truncdiv(hg, self.layout.R), T.truncmod(hg, self.layout.R)
        return self.q[b, self.layout.token(h, g), self.layout.head(h, g), d]


class _TableRows:
    """A page pool [P, Hkv, page, D] read as the operator's ``K[b, h, row, d]``: row ``leftpad[b] +
    row`` of sequence b is slot ``% page`` of page ``block_table[b, // page]``. An fp8 pool (bytes)
    reads as the decoded value times its KV head's ``scale``."""

    def __init__(self, pool, table, leftpad, page_size_log2, layout: TileLayout, kv_dtype=None, scale=None):
        self.pool, self.table, self.leftpad, self.psl, self.layout = pool, table, leftpad, page_size_log2, layout
        self.kv_dtype, self.scale = kv_dtype, scale

    def __getitem__(self, index):
        b, h, row, d = index
        at = row + self.leftpad[b]
        page = self.table[b, T.shift_right(at, self.psl)]
        kvh = self.layout.kv_head(h)
        value = self.pool[page, kvh, T.bitwise_and(at, T.shift_left(1, self.psl) - 1), d]
        return value if self.kv_dtype is None else kv_fp8.decode(self.kv_dtype, value) * self.scale[kvh]


def paged_outputs(spec: AttentionSpec):
    """write_output / write_empty of the paged form: rows to their (token, head) of o [B, Sq, Hq, D]
    and lse [B, Sq, Hq]; a row that sees no key (a sequence shorter than Sq) gets o = 0, lse empty."""
    D, dt = spec.head_dim, spec.dtype

    @T.macro
    def write_output(bufs, b, h):
        lay = T.meta_var(bufs.layout)
        for g in range(bufs.G):
            if lay.valid(h, g):
                seen = T.meta_var(bufs.l[g] > T.float32(0))
                bufs.LSE4[b, lay.token(h, g), lay.head(h, g)] = T.Select(
                    seen, (bufs.m[g] + T.log2(bufs.l[g])) * T.float32(bufs.lse.unit), T.float32(bufs.lse.empty))
                for d in range(D):
                    bufs.O4[b, lay.token(h, g), lay.head(h, g), d] = T.Cast(dt, T.Select(
                        seen, bufs.acc[g * D + d] / T.max(bufs.l[g], T.float32(1e-30)), T.float32(0)))

    @T.macro
    def write_empty(bufs, b):
        for i in range(bufs.layout.SQ):
            for hq in range(bufs.HQ):
                bufs.LSE4[b, i, hq] = T.float32(bufs.lse.empty)
                for d in range(D):
                    bufs.O4[b, i, hq, d] = T.Cast(dt, T.float32(0))

    return write_output, write_empty


def make_cpu_paged_kernel(spec: AttentionSpec, block_size: int = 64, tile_cost: int = 0):
    """The serial stream-K kernel of the paged form (see the module docstring), for ``llvm``:
    q [B, Sq, Hq, D]; k, v page pools [P, Hkv, page, D] (strided); block_table int32 [B, pages];
    seq_lens, leftpad int32 [B]; o [B, Sq, Hq, D], lse [B, Sq, Hq]; cache_len = pages x page
    (lengths are clamped to it); page = 2^page_size_log2. An fp8 spec (``spec.kv_dtype``) takes
    the pools as bytes and fp32 [Hkv] scales k_scale, v_scale after leftpad (``sig.PAGED_FP8_PARAMS``)."""
    fp8 = spec.kv_dtype is not None
    write_output, write_empty = paged_outputs(spec)
    op = dataclasses.replace(cpu_operator(spec, block_size), write_output=write_output, write_empty=write_empty)
    run = run_walk_macro(spec, block_size, tile_cost, op=op)

    @T.macro
    def body(q, k, v, block_table, seq_lens, leftpad, k_scale, v_scale, o, lse, ws_o, ws_ml, flags, softmax_scale,
             cache_len, page_size_log2, num_workers, num_splits):
        f = T.meta_var(paged_buffers(spec, q, k, v, block_table, seq_lens, leftpad, k_scale, v_scale, o, lse, ws_o,
                                     ws_ml, flags))
        lay = T.meta_var(f.lay)
        ctx = T.meta_var(SimpleNamespace(SL=started_lens(f.SL, f.LP, cache_len), B=T.Cast("int32", f.B),
                                         H=f.hkv * lay.C, LMAX=cache_len, NW=num_workers, SPLITS=num_splits,
                                         FLAGS=f.FLAGS))
        inputs = T.meta_var(SimpleNamespace(
            Q=_TileQueries(f.Q, lay), K=_TableRows(f.K, f.TABLE, f.LP, page_size_log2, lay, spec.kv_dtype, f.KSC),
            V=_TableRows(f.V, f.TABLE, f.LP, page_size_log2, lay, spec.kv_dtype, f.VSC), O4=f.O, LSE4=f.LSE,
            WSO=f.WSO, WSML=f.WSML, HQ=f.hq, G=f.rows, layout=lay, limit=lay.limit, scale=softmax_scale))
        run(ctx, inputs)

    params = sig.PAGED_FP8_PARAMS if fp8 else sig.PAGED_PARAMS
    args = [p.name if fp8 or p.name not in ("k_scale", "v_scale") else None for p in sig.PAGED_FP8_PARAMS
            if p.name != "grid"]
    return sig.prim_func(spec.name + "_paged_cpu", params, body, args, {"tirx.noalias": True})
