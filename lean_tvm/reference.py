"""Float64 references (torch, any device) that every kernel of the package is checked against."""

from __future__ import annotations

import math

import torch


def decode_attention_reference(q, k, v, seq_lens, softmax_scale: float):
    """(o, lse) in float64. q [B, Hq, D]; k, v [B, Hkv, L, D] (any strides); seq_lens: a sequence
    or tensor of B lengths. An empty sequence gives o = 0 and lse = -inf."""
    batch, hq, head_dim = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    lens = [int(x) for x in seq_lens]
    o = torch.zeros(batch, hq, head_dim, dtype=torch.float64, device=q.device)
    lse = torch.full((batch, hq), -math.inf, dtype=torch.float64, device=q.device)
    for b in range(batch):
        n = lens[b]
        if n == 0:
            continue
        qb = q[b].double().reshape(hkv, group, head_dim)
        s = torch.einsum("hgd,hld->hgl", qb, k[b, :, :n].double()) * softmax_scale
        lse[b] = torch.logsumexp(s, -1).reshape(hq)
        o[b] = torch.einsum("hgl,hld->hgd", torch.softmax(s, -1), v[b, :, :n].double()).reshape(hq, head_dim)
    return o, lse


def gemv_reference(w, x):
    """y = W x in float64. w [N, K], x [K]."""
    return w.double() @ x.double()
