"""Float64 references (torch, any device) that every kernel of the package is checked against."""

from __future__ import annotations

import math

import torch


def decode_attention_reference(q, k, v, seq_lens, softmax_scale: float, cache_leftpad=None):
    """(o, lse) in float64.

    q: [B, Hq, D], or [B, Sq, Hq, D] for Sq new tokens per sequence (already in the cache: query i
    sees keys [leftpad, len - Sq + 1 + i), flash-attn's bottom-right causal alignment); k, v:
    [B, Hkv, L, D] (any strides); seq_lens, cache_leftpad (default 0): sequences or tensors of B
    ints. o has q's shape; lse is [B, Hq] or [B, Sq, Hq]. A query that sees no key gets o = 0 and
    lse = -inf."""
    one_token = q.dim() == 3
    q4 = q.unsqueeze(1) if one_token else q
    batch, sq, hq, head_dim = q4.shape
    hkv = k.shape[1]
    group = hq // hkv
    lens = [int(x) for x in seq_lens]
    starts = [0] * batch if cache_leftpad is None else [int(x) for x in cache_leftpad]
    o = torch.zeros(batch, sq, hq, head_dim, dtype=torch.float64, device=q.device)
    lse = torch.full((batch, sq, hq), -math.inf, dtype=torch.float64, device=q.device)
    for b in range(batch):
        for i in range(sq):
            lo, hi = starts[b], lens[b] - sq + 1 + i
            if hi <= lo:
                continue
            qb = q4[b, i].double().reshape(hkv, group, head_dim)
            s = torch.einsum("hgd,hld->hgl", qb, k[b, :, lo:hi].double()) * softmax_scale
            lse[b, i] = torch.logsumexp(s, -1).reshape(hq)
            o[b, i] = torch.einsum("hgl,hld->hgd", torch.softmax(s, -1), v[b, :, lo:hi].double()).reshape(
                hq, head_dim)
    return (o[:, 0], lse[:, 0]) if one_token else (o, lse)


def gather_pages(pool, block_table, seq_lens, layout: str = "blhd"):
    """A page pool ([P, page, Hkv, D] for ``"blhd"``, [P, Hkv, page, D] for ``"bhld"``) read through
    the block table as a dense [B, Hkv, max(seq_lens), D] cache (zero past each length)."""
    pages = pool if layout == "bhld" else pool.permute(0, 2, 1, 3)
    page = pages.shape[2]
    lens = [int(x) for x in seq_lens]
    out = torch.zeros(len(lens), pages.shape[1], max(max(lens, default=1), 1), pages.shape[3], dtype=pool.dtype,
                      device=pool.device)
    for b, n in enumerate(lens):
        rows = torch.arange(n, device=pool.device)
        ids = block_table[b].long()[rows // page]
        out[b, :, :n] = pages[ids, :, rows % page].transpose(0, 1)
    return out


def dequantize(cache, scale=None, layout: str = "bhld"):
    """An fp8 cache's real values in float64: each stored value times its KV head's scale (None: 1,
    a float, or a [Hkv] tensor). ``layout`` says where the KV heads are: dim 1 (``"bhld"``, also
    [P, Hkv, page, D] pools) or dim 2 (``"blhd"``, also [P, page, Hkv, D] pools)."""
    x = cache.double()
    if isinstance(scale, torch.Tensor):
        shape = (1, -1, 1, 1) if layout == "bhld" else (1, 1, -1, 1)
        return x * scale.double().to(x.device).view(shape)
    return x * (1.0 if scale is None else float(scale))


def gemv_reference(w, x):
    """y = W x in float64. w [N, K], x [K]."""
    return w.double() @ x.double()
