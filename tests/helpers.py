"""Test helpers: tolerances by dtype, the attention comparison, the fp8 cache checks, the CUDA
skip, a paged case."""

import pytest
import torch

import lean_tvm
from lean_tvm.reference import decode_attention_reference, dequantize, gather_pages

TOLERANCES = {  # output vs float64: P is rounded to the input dtype for the second product
    torch.float16: dict(atol=2e-3, rtol=1e-2),
    torch.bfloat16: dict(atol=1.5e-2, rtol=2e-2),
}
LSE_TOL = dict(atol=2e-3, rtol=1e-4)

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def assert_attention_close(o, lse, ref_o, ref_lse, dtype):
    """Within the dtype's tolerance; empty sequences exactly (o == 0, lse == -inf); no NaN."""
    assert not torch.isnan(o).any() and not torch.isnan(lse).any()
    empty = torch.isinf(ref_lse)
    torch.testing.assert_close(o.double(), ref_o, **TOLERANCES[dtype])
    assert (lse[empty] == float("-inf")).all() and (o.double()[empty] == 0).all()
    torch.testing.assert_close(lse.double()[~empty], ref_lse[~empty], **LSE_TOL)


def relative_to_v_scale(o, v_scale, hq: int, hkv: int):
    """o over its head's V scale (a float or [Hkv]): fp8 errors are compared relative to the values' size."""
    if isinstance(v_scale, torch.Tensor):
        return o / v_scale.repeat_interleave(hq // hkv).view(1, 1, hq, 1).to(o.device)
    return o / (v_scale or 1.0)


def assert_fp8_dense_close(q, k, v, lens, layout, k_scale, v_scale):
    """decode_attention over a dense fp8 cache (q [B, Sq, Hq, D]) against float64 on its dequantised
    values, relative to each head's V scale."""
    hq, head_dim, hkv = q.shape[2], q.shape[3], k.shape[1 if layout == "bhld" else 2]
    lens_t = torch.tensor(lens, dtype=torch.int32, device=q.device)
    o, lse = lean_tvm.decode_attention(q, k, v, lens_t, layout=layout, k_scale=k_scale, v_scale=v_scale,
                                       return_lse=True)
    kd, vd = dequantize(k, k_scale, layout), dequantize(v, v_scale, layout)
    if layout == "blhd":
        kd, vd = kd.permute(0, 2, 1, 3), vd.permute(0, 2, 1, 3)
    ro, rl = decode_attention_reference(q, kd, vd, lens, head_dim ** -0.5)
    assert_attention_close(relative_to_v_scale(o, v_scale, hq, hkv), lse, relative_to_v_scale(ro, v_scale, hq, hkv),
                           rl, q.dtype)


def assert_fp8_paged_close(q, k8, v8, table, lens_t, layout, k_scale, v_scale):
    """decode_attention over fp8 page pools against float64 on the dequantised pages."""
    o, lse = lean_tvm.decode_attention(q, k8, v8, lens_t, block_table=table, layout=layout, k_scale=k_scale,
                                       v_scale=v_scale, return_lse=True)
    kd = gather_pages(dequantize(k8, k_scale, layout), table, lens_t.tolist(), layout)
    vd = gather_pages(dequantize(v8, v_scale, layout), table, lens_t.tolist(), layout)
    ro, rl = decode_attention_reference(q, kd, vd, lens_t.tolist(), q.shape[-1] ** -0.5)
    assert_attention_close(o, lse, ro, rl, q.dtype)


def paged_case(lens, sq, hq, hkv, page, dtype=torch.float16, layout="blhd", head_dim=64, seed=0, share=False, spare=2,
               device="cpu"):
    """q [B, Sq, Hq, D], K/V pools with shuffled pages (``share``: the second sequence reuses the
    first one's first page, as prefix caching does) and a block table with unused trailing entries."""
    g = torch.Generator().manual_seed(seed)
    npages = [-(-n // page) for n in lens]
    width = max(npages, default=0) + spare
    total = sum(npages) + 3
    perm = torch.randperm(total, generator=g).to(torch.int32)
    table = torch.full((len(lens), width), 10**6, dtype=torch.int32)  # entries past a sequence's pages: never read
    at = 0
    for b, p in enumerate(npages):
        table[b, :p] = perm[at:at + p]
        at += p
    if share and len(lens) > 1 and npages[0] and npages[1]:
        table[1, 0] = table[0, 0]
    shape = (total, page, hkv, head_dim) if layout == "blhd" else (total, hkv, page, head_dim)
    k = torch.randn(shape, generator=g).to(dtype)
    v = torch.randn(shape, generator=g).to(dtype)
    q = torch.randn(len(lens), sq, hq, head_dim, generator=g).to(dtype)
    return tuple(t.to(device) for t in (q, k, v, table, torch.tensor(lens, dtype=torch.int32)))


def paged_reference(q, k, v, table, lens, layout, scale):
    """float64 (o, lse) of a paged case, through its dense copy."""
    kd, vd = gather_pages(k, table, lens.tolist(), layout), gather_pages(v, table, lens.tolist(), layout)
    return decode_attention_reference(q, kd, vd, lens.tolist(), scale)
