"""Merging partial attention states: what split-KV and context-parallel decode do with the pieces.

A state is ``(o, lse)``: the softmax-normalised output over some KV rows ``[..., D]`` and the
natural-log sum of exp of their logits ``[...]``. Two states over disjoint rows merge into the
state over their union:  lse = logaddexp(lse_a, lse_b),  o = o_a e^(lse_a - lse) + o_b e^(lse_b - lse).
An empty part (no rows) has lse = -inf and an arbitrary o; it is the identity, and merging only
empty parts gives o = 0, lse = -inf, never NaN.

The torch form needs no apache-tvm (the run half imports it); the same merge as TensorIR is
``compute.make_merge_states``.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from .softmax import NEG_INF


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
    return o_out, torch.where(live, torch.log(den) + m, NEG_INF)
