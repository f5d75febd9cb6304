"""Decode attention on the stream-K primitive, CPU form (``llvm``): the package's CPU operator and
the oracle that checks the plan, the walk and the cross-block merge the GPU kernel shares.

One output tile is (sequence b, KV head h) with the G = Hq / Hkv query heads of its group; the
state per query head is the online softmax (m, l, acc) in the log2 domain (``softmax.py``),
folded a block of rows at a time, merged with other workers' partial states by rescaling to the
larger maximum.
"""

from __future__ import annotations

from types import SimpleNamespace

import tvm
from tvm.script import tirx as T

from . import signature as sig
from . import streamk
from .softmax import LOG2E, LSE_NATURAL, NEG_INF, LseConvention
from .spec import AttentionSpec, StreamKConfig


def cpu_operator(spec: AttentionSpec, block_size: int) -> streamk.CpuOperator:
    """The macros over ``bufs``: Q, K, V ([b, h, row, d]-indexable), O, LSE, WSO, WSML, HQ, G, the
    state m, l, acc (G x D), the scores s of a block and the scalars dot, m_new, alpha, beta."""
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
        rows = T.meta_var(T.min(block_size, n - row0))
        for g in range(bufs.G):
            bufs.m_new[0] = T.float32(NEG_INF)
            for r in range(rows):
                bufs.dot[0] = T.float32(0)
                for d in range(D):
                    bufs.dot[0] = bufs.dot[0] + T.Cast("float32", bufs.Q[b, h * bufs.G + g, d]) * T.Cast(
                        "float32", bufs.K[b, h, row0 + r, d])
                bufs.s[r] = bufs.dot[0] * bufs.scale_log2
                bufs.m_new[0] = T.max(bufs.m_new[0], bufs.s[r])
            bufs.m_new[0] = T.max(bufs.m_new[0], bufs.m[g])  # finite: rows >= 1
            bufs.alpha[0] = T.exp2(bufs.m[g] - bufs.m_new[0])  # rescale of the old state
            bufs.l[g] = bufs.l[g] * bufs.alpha[0]
            for d in range(D):
                bufs.acc[g * D + d] = bufs.acc[g * D + d] * bufs.alpha[0]
            for r in range(rows):
                bufs.s[r] = T.exp2(bufs.s[r] - bufs.m_new[0])
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
            bufs.alpha[0] = T.exp2(bufs.m[g] - bufs.m_new[0])
            bufs.l[g] = bufs.l[g] * bufs.alpha[0]
            for d in range(D):
                bufs.acc[g * D + d] = bufs.acc[g * D + d] * bufs.alpha[0]
            for i in range(n):
                if valid[i] != 0:
                    bufs.beta[0] = T.exp2(bufs.WSML[top - i, 0, g] - bufs.m_new[0])
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


def run_walk_macro(spec: AttentionSpec, block_size: int, tile_cost: int = 0, lse: LseConvention = LSE_NATURAL):
    """``run(ctx, inputs)``: allocate the operator's state and the plan's scratch, then run the
    serial walk. ``ctx`` holds SL, B, H, LMAX, NW, SPLITS, FLAGS (see ``streamk.WalkContext``);
    ``inputs`` Q, K, V, O, LSE, WSO, WSML, HQ, G and ``scale`` (the softmax scale)."""
    GM, D = spec.max_group, spec.head_dim
    op = cpu_operator(spec, block_size)
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
        alpha = T.alloc_buffer((1,), "float32")
        beta = T.alloc_buffer((1,), "float32")
        wctx = T.meta_var(streamk.WalkContext(SL=ctx.SL, B=ctx.B, H=ctx.H, LMAX=ctx.LMAX, CUM=cum, NW=ctx.NW,
                                              SPLITS=ctx.SPLITS, QR=qr, srch=srch, FLAGS=ctx.FLAGS))
        bufs = T.meta_var(SimpleNamespace(**vars(inputs), m=m, l=l_, acc=acc, s=s, dot=dot, m_new=m_new,
                                          alpha=alpha, beta=beta, scale_log2=inputs.scale * T.float32(LOG2E),
                                          lse=lse))
        walk(wctx, op, bufs)

    return run


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
