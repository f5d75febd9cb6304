"""Unscheduled TensorIR definitions: the semantics every schedule implements.

``make_decode_attention``: decode attention; ``make_merge_states``: the LSE merge of partial
attention states (``merge.py`` has its torch form and float64 reference); ``make_gemv``: the
matrix-vector product. The stream-K rule (``streamk_rule.StreamK``) builds the operator
library's kernels from the first and the last.

Decode attention: one query token per sequence b; KV rows ``l < seq_lens[b]`` of the padded cache are visible, the
rest (whatever they hold) never reach the result. Query head h reads KV head ``h // G`` (GQA).
A sequence of length 0 gives o = 0 and lse = -inf, the empty state of ``lean_tvm.merge``.
"""

from __future__ import annotations

import tvm
from tvm.script import tirx as T

from .softmax import NEG_INF


def make_decode_attention(dtype: str, head_dim: int, group_size: int):
    """(q [B, Hq, D], k/v [B, Hkv, Lmax, D], seq_lens int32 [B], o [B, Hq, D], lse [B, Hq] f32,
    softmax_scale f32) with B, Hkv, Lmax symbolic and Hq = Hkv * group_size.

    fp32 scores and accumulation, natural-log lse. The query-side buffers are indexed [b, h] and
    the visibility test is ``visible``: a q_len axis (speculative or chunked decode) is one more
    spatial axis after b, with the causal limit ``seq_lens[b] - q_len + 1 + i`` in ``visible``.
    """
    D, G = tvm.tirx.const(head_dim, "int64"), group_size
    ninf = T.float32(NEG_INF)

    def visible(SL, b, l):
        return l < T.Cast("int64", SL[b])

    @T.prim_func(s_tir=True)
    def decode_attention(q: T.handle, k: T.handle, v: T.handle, seq_lens: T.handle, o: T.handle,
                         lse: T.handle, softmax_scale: T.float32):
        T.func_attr({"tirx.noalias": True})
        B, HKV, LMAX = T.int64(), T.int64(), T.int64()
        Q = T.match_buffer(q, (B, HKV * G, D), dtype)
        K = T.match_buffer(k, (B, HKV, LMAX, D), dtype)
        V = T.match_buffer(v, (B, HKV, LMAX, D), dtype)
        SL = T.match_buffer(seq_lens, (B,), "int32")
        O = T.match_buffer(o, (B, HKV * G, D), dtype)
        LSE = T.match_buffer(lse, (B, HKV * G), "float32")
        S = T.sblock_alloc_buffer((B, HKV * G, LMAX), "float32")  # q . k (unscaled, unmasked)
        M = T.sblock_alloc_buffer((B, HKV * G), "float32")  # max visible logit (-inf: none)
        P = T.sblock_alloc_buffer((B, HKV * G, LMAX), "float32")  # exp(logit - M), 0 where masked
        Den = T.sblock_alloc_buffer((B, HKV * G), "float32")
        Acc = T.sblock_alloc_buffer((B, HKV * G, D), "float32")
        for b, h, l, d in T.grid(B, HKV * G, LMAX, D):
            with T.sblock("S"):
                vb, vh, vl, vd = T.axis.remap("SSSR", [b, h, l, d])
                with T.init():
                    S[vb, vh, vl] = T.float32(0)
                S[vb, vh, vl] = S[vb, vh, vl] + T.Cast("float32", Q[vb, vh, vd]) * T.Cast(
                    "float32", K[vb, vh // G, vl, vd])
        for b, h, l in T.grid(B, HKV * G, LMAX):
            with T.sblock("M"):
                vb, vh, vl = T.axis.remap("SSR", [b, h, l])
                with T.init():
                    M[vb, vh] = ninf
                M[vb, vh] = T.max(M[vb, vh], T.if_then_else(
                    visible(SL, vb, vl), S[vb, vh, vl] * softmax_scale, ninf))
        for b, h, l in T.grid(B, HKV * G, LMAX):
            with T.sblock("P"):  # M is finite wherever a row is visible: no exp(-inf + inf)
                vb, vh, vl = T.axis.remap("SSS", [b, h, l])
                P[vb, vh, vl] = T.if_then_else(
                    visible(SL, vb, vl), T.exp(S[vb, vh, vl] * softmax_scale - M[vb, vh]), T.float32(0))
        for b, h, l in T.grid(B, HKV * G, LMAX):
            with T.sblock("Den"):
                vb, vh, vl = T.axis.remap("SSR", [b, h, l])
                with T.init():
                    Den[vb, vh] = T.float32(0)
                Den[vb, vh] = Den[vb, vh] + P[vb, vh, vl]
        for b, h, d, l in T.grid(B, HKV * G, D, LMAX):
            with T.sblock("Acc"):
                vb, vh, vd, vl = T.axis.remap("SSSR", [b, h, d, l])
                with T.init():
                    Acc[vb, vh, vd] = T.float32(0)
                Acc[vb, vh, vd] = Acc[vb, vh, vd] + T.if_then_else(
                    visible(SL, vb, vl), P[vb, vh, vl] * T.Cast("float32", V[vb, vh // G, vl, vd]), T.float32(0))
        for b, h, d in T.grid(B, HKV * G, D):
            with T.sblock("O"):
                vb, vh, vd = T.axis.remap("SSS", [b, h, d])
                O[vb, vh, vd] = T.Cast(dtype, T.if_then_else(
                    Den[vb, vh] > T.float32(0), Acc[vb, vh, vd] / Den[vb, vh], T.float32(0)))
        for b, h in T.grid(B, HKV * G):
            with T.sblock("LSE"):
                vb, vh = T.axis.remap("SS", [b, h])
                LSE[vb, vh] = T.if_then_else(Den[vb, vh] > T.float32(0), M[vb, vh] + T.log(Den[vb, vh]), ninf)

    return decode_attention.with_attr("global_symbol", f"decode_attention_{dtype}_d{head_dim}_g{group_size}")


def make_merge_states(dtype: str, head_dim: int):
    """TensorIR merge of S states: (o_parts [S, B, H, D] dtype, lse_parts [S, B, H] f32,
    o [B, H, D] dtype, lse [B, H] f32), S/B/H symbolic. Max over S, then the weighted sum (fp32)."""
    d64 = tvm.tirx.const(head_dim, "int64")
    ninf = T.float32(NEG_INF)

    @T.prim_func(s_tir=True)
    def merge_states_kernel(o_parts: T.handle, lse_parts: T.handle, o: T.handle, lse: T.handle):
        T.func_attr({"tirx.noalias": True})
        S, B, H = T.int64(), T.int64(), T.int64()
        OP = T.match_buffer(o_parts, (S, B, H, d64), dtype)
        LP = T.match_buffer(lse_parts, (S, B, H), "float32")
        O = T.match_buffer(o, (B, H, d64), dtype)
        LSE = T.match_buffer(lse, (B, H), "float32")
        M = T.sblock_alloc_buffer((B, H), "float32")
        Den = T.sblock_alloc_buffer((B, H), "float32")
        Acc = T.sblock_alloc_buffer((B, H, d64), "float32")
        for b, h, s in T.grid(B, H, S):
            with T.sblock("M"):
                vb, vh, vs = T.axis.remap("SSR", [b, h, s])
                with T.init():
                    M[vb, vh] = ninf
                M[vb, vh] = T.max(M[vb, vh], LP[vs, vb, vh])
        for b, h, s in T.grid(B, H, S):
            with T.sblock("Den"):
                vb, vh, vs = T.axis.remap("SSR", [b, h, s])
                with T.init():
                    Den[vb, vh] = T.float32(0)
                Den[vb, vh] = Den[vb, vh] + T.if_then_else(
                    LP[vs, vb, vh] > ninf, T.exp(LP[vs, vb, vh] - M[vb, vh]), T.float32(0))
        for b, h, d, s in T.grid(B, H, d64, S):
            with T.sblock("Acc"):
                vb, vh, vd, vs = T.axis.remap("SSSR", [b, h, d, s])
                with T.init():
                    Acc[vb, vh, vd] = T.float32(0)
                Acc[vb, vh, vd] = Acc[vb, vh, vd] + T.if_then_else(
                    LP[vs, vb, vh] > ninf,
                    T.Cast("float32", OP[vs, vb, vh, vd]) * T.exp(LP[vs, vb, vh] - M[vb, vh]), T.float32(0))
        for b, h, d in T.grid(B, H, d64):
            with T.sblock("O"):
                vb, vh, vd = T.axis.remap("SSS", [b, h, d])
                O[vb, vh, vd] = T.Cast(dtype, T.if_then_else(
                    Den[vb, vh] > T.float32(0), Acc[vb, vh, vd] / Den[vb, vh], T.float32(0)))
        for b, h in T.grid(B, H):
            with T.sblock("LSE"):
                vb, vh = T.axis.remap("SS", [b, h])
                LSE[vb, vh] = T.if_then_else(Den[vb, vh] > T.float32(0), T.log(Den[vb, vh]) + M[vb, vh], ninf)

    return merge_states_kernel.with_attr("global_symbol", f"merge_states_{dtype}_d{head_dim}")


def make_gemv(dtype: str):
    """y = W x: (w [N, K], x [K], k_len int32 [1], y [N]) in ``dtype``, N and K symbolic, fp32
    products and sum; columns ``c < k_len[0]`` are summed (the operator library's GEMV: one
    "sequence" of length k_len[0], clamped to K by the kernel)."""

    @T.prim_func(s_tir=True)
    def gemv(w: T.handle, x: T.handle, k_len: T.handle, y: T.handle):
        T.func_attr({"tirx.noalias": True})
        N, K = T.int32(), T.int32()
        W = T.match_buffer(w, (N, K), dtype)
        X = T.match_buffer(x, (K,), dtype)
        KL = T.match_buffer(k_len, (1,), "int32")
        Y = T.match_buffer(y, (N,), dtype)
        Acc = T.sblock_alloc_buffer((N,), "float32")
        for n, c in T.grid(N, K):
            with T.sblock("Acc"):
                vn, vc = T.axis.remap("SR", [n, c])
                with T.init():
                    Acc[vn] = T.float32(0)
                Acc[vn] = Acc[vn] + T.if_then_else(
                    vc < KL[0], T.Cast("float32", W[vn, vc]) * T.Cast("float32", X[vc]), T.float32(0))
        for n in range(N):
            with T.sblock("Y"):
                vn = T.axis.spatial(N, n)
                Y[vn] = T.Cast(dtype, Acc[vn])

    return gemv.with_attr("global_symbol", f"gemv_{dtype}")
