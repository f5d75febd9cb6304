"""Merging partial attention states: what split-KV and context-parallel decode do with the pieces.

A state is ``(o, lse)``: the softmax-normalised output over some KV rows ``[..., D]`` and the
natural-log sum of exp of their logits ``[...]``. Two states over disjoint rows merge into the
state over their union:  lse = logaddexp(lse_a, lse_b),  o = o_a e^(lse_a - lse) + o_b e^(lse_b - lse).
An empty part (no rows) has lse = -inf and an arbitrary o; it is the identity, and merging only
empty parts gives o = 0, lse = -inf, never NaN.

The torch form needs no apache-tvm (the run half imports it); the TIR kernel imports TVM when built.
"""

from __future__ import annotations

import functools

import numpy as np
import torch


def merge_states_reference(o_a, lse_a, o_b, lse_b):
    """float64 numpy merge of two states: o [..., D], lse [...]."""
    o_a, lse_a, o_b, lse_b = (np.asarray(x, np.float64) for x in (o_a, lse_a, o_b, lse_b))
    lse = np.logaddexp(lse_a, lse_b)
    base = np.where(np.isneginf(lse), 0.0, lse)  # both empty: weights exp(-inf) = 0, not NaN
    o = np.zeros(np.broadcast_shapes(o_a.shape, o_b.shape))
    for o_x, lse_x in ((o_a, lse_a), (o_b, lse_b)):
        w = np.exp(lse_x - base)[..., None]
        o = o + np.where(w > 0, o_x, 0.0) * w  # an empty part's o never reaches the result
    return o, lse


def merge_many_reference(o, lse):
    """Fold S states in order: o [S, ..., D], lse [S, ...] -> (o [..., D], lse [...])."""
    empty = (np.zeros(np.shape(o)[1:]), np.full(np.shape(lse)[1:], -np.inf))
    return functools.reduce(lambda acc, s: merge_states_reference(*acc, *s), zip(o, lse, strict=True), empty)


def merge_states(o: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge S partial states: o [S, B, H, D] (fp16/bf16/fp32), lse [S, B, H] -> o [B, H, D] in
    o's dtype, lse [B, H] float32. fp32 math, parts added in index order (bitwise reproducible)."""
    lse = lse.float()
    m = lse.amax(dim=0)
    base = torch.where(torch.isneginf(m), 0.0, m)
    acc = torch.zeros(o.shape[1:], dtype=torch.float32, device=o.device)
    den = torch.zeros_like(m)
    for s in range(o.shape[0]):
        w = torch.exp(lse[s] - base)
        acc = acc + torch.where(w[..., None] > 0, o[s].float(), 0.0) * w[..., None]
        den = den + w
    live = den > 0  # den >= 1 unless every part is empty
    o_out = torch.where(live[..., None], acc / den[..., None], 0.0).to(o.dtype)
    return o_out, torch.where(live, torch.log(den) + m, float("-inf"))


def make_merge_kernel(dtype: str, head_dim: int):
    """TensorIR merge of S states: (o_parts [S, B, H, D] dtype, lse_parts [S, B, H] f32,
    o [B, H, D] dtype, lse [B, H] f32), S/B/H symbolic. Max over S, then the weighted sum (fp32)."""
    import tvm
    from tvm.script import tirx as T

    d64 = tvm.tirx.const(head_dim, "int64")
    ninf = T.float32(float("-inf"))

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
