"""fp8 KV caches on the GPU (marked ``gpu``), against float64 on the dequantised values: dense and
paged (pages 1..64), one and several query tokens, fp16 and bf16 queries, e4m3 and e5m2, per-tensor
and per-KV-head scales far from 1, large logits, empty sequences, a 100k sequence, launches of the
batch variant; the fp8 kernel against our fp16 kernel on the same values; the dense fp8 kernel
against the paged one; CUDA graph replay with scales and lengths changed in place; the default call
never synchronises.

``LEAN_TVM_LIB_DIR=build/sm_90a python -m pytest -m gpu tests/test_gpu_fp8.py``
"""

import math

import pytest
import torch
from helpers import assert_fp8_dense_close, assert_fp8_paged_close, paged_case

import lean_tvm
from lean_tvm.reference import decode_attention_reference, dequantize, gather_pages

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
F16, BF16 = torch.float16, torch.bfloat16
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def scales(kind, hkv, seed):
    if kind != "head":
        return kind
    g = torch.Generator().manual_seed(seed)
    return torch.exp(torch.empty(hkv).uniform_(math.log(1e-3), math.log(1e3), generator=g)).float().cuda()


DENSE = [  # lens, Sq, Hq, Hkv, D, q dtype, fp8, k_scale, v_scale, layout
    ([4096, 0, 37, 1000], 1, 32, 8, 128, F16, E4M3, 0.02, 3.0, "bhld"),
    ([4096, 0, 37, 1000], 1, 32, 8, 128, BF16, E4M3, "head", "head", "blhd"),
    ([100000], 1, 32, 8, 128, F16, E4M3, "head", 1.0, "blhd"),
    ([20000, 5], 1, 64, 8, 128, F16, E5M2, 1e-3, 1e3, "bhld"),
    ([3000, 16, 48, 1], 1, 8, 1, 64, BF16, E5M2, 1.0, "head", "bhld"),
    ([2500, 1, 700], 1, 8, 1, 256, F16, E4M3, 1e3, 1e-3, "blhd"),  # large logits
    ([2500, 3, 700], 4, 28, 4, 128, BF16, E4M3, "head", 0.5, "blhd"),  # G 7, Sq 4: 28 rows, 2 chunks
    ([8192, 100], 8, 32, 8, 128, F16, E5M2, 0.5, 0.5, "bhld"),  # Sq 8: 32 rows
    ([900] * 40, 1, 32, 8, 128, F16, E4M3, "head", "head", "bhld"),  # 320 tiles: the batch variant
]


@pytest.mark.parametrize("lens,sq,hq,hkv,head_dim,dtype,fp8,ks,vs,layout", DENSE)
def test_dense_fp8_matches_float64(lens, sq, hq, hkv, head_dim, dtype, fp8, ks, vs, layout):
    g = torch.Generator().manual_seed(len(lens) + head_dim + sq)
    batch, length = len(lens), max(lens)
    shape = (batch, hkv, length, head_dim) if layout == "bhld" else (batch, length, hkv, head_dim)
    k = torch.randn(shape, generator=g).to(fp8).cuda()
    v = torch.randn(shape, generator=g).to(fp8).cuda()
    q = torch.randn(batch, sq, hq, head_dim, generator=g).to(dtype).cuda()
    assert_fp8_dense_close(q, k, v, lens, layout, scales(ks, hkv, 1), scales(vs, hkv, 2))


PAGED = [  # lens, Sq, Hq, Hkv, page, q dtype, fp8, layout, D
    ([4096, 0, 37, 1000], 1, 32, 8, 16, F16, E4M3, "blhd", 128),
    ([4096, 0, 37, 1000], 1, 32, 8, 1, BF16, E5M2, "bhld", 128),
    ([70000, 5, 513], 1, 64, 8, 64, F16, E4M3, "blhd", 128),
    ([3000, 16, 32, 48, 1], 1, 8, 1, 16, BF16, E4M3, "blhd", 64),
    ([2500, 1, 700], 2, 8, 1, 16, F16, E5M2, "bhld", 256),
    ([5000, 9, 200], 16, 16, 4, 16, BF16, E4M3, "bhld", 128),  # Sq 16: 64 rows
    ([4100, 130], 8, 16, 2, 16, F16, E4M3, "blhd", 128),
    ([3000, 0, 1] + [100 + 61 * i for i in range(37)], 1, 32, 8, 16, BF16, E4M3, "blhd", 128),  # batch variant
]


@pytest.mark.parametrize("lens,sq,hq,hkv,page,dtype,fp8,layout,head_dim", PAGED)
def test_paged_fp8_matches_float64(lens, sq, hq, hkv, page, dtype, fp8, layout, head_dim):
    q, k, v, table, lens_t = paged_case(lens, sq, hq, hkv, page, dtype, layout, head_dim, share=True, device="cuda")
    k8, v8 = k.float().to(fp8), v.float().to(fp8)
    k_scale, v_scale = scales("head", hkv, 3), 0.125
    assert_fp8_paged_close(q, k8, v8, table, lens_t, layout, k_scale, v_scale)


@pytest.mark.parametrize("dtype", [F16, BF16])
def test_fp8_agrees_with_our_16bit_kernel_on_the_same_values(dtype):
    g = torch.Generator().manual_seed(9)
    k8 = torch.randn(4, 8, 8192, 128, generator=g).to(E4M3).cuda()
    v8 = torch.randn(4, 8, 8192, 128, generator=g).to(E4M3).cuda()
    q = torch.randn(4, 32, 128, generator=g).to(dtype).cuda()
    lens = torch.tensor([8192, 5000, 1, 0], dtype=torch.int32, device="cuda")
    o8 = lean_tvm.decode_attention(q, k8, v8, lens, k_scale=0.25, v_scale=0.5)
    o16 = lean_tvm.decode_attention(q, (k8.float() * 0.25).to(dtype), (v8.float() * 0.5).to(dtype), lens)
    torch.testing.assert_close(o8, o16, atol=2e-3 if dtype == F16 else 1.5e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype,fp8,head_dim,hq,hkv", [(F16, E4M3, 128, 32, 8), (BF16, E5M2, 64, 16, 1),
                                                       (F16, E4M3, 256, 64, 8)])
def test_dense_fp8_calls_run_the_dense_kernel_and_agree_with_the_paged_one(dtype, fp8, head_dim, hq, hkv):
    """One token over a dense fp8 cache goes to the dense fp8 kernel (no tile layout, no start
    rows); with start rows (the paged kernel) the same values give the same output, also under
    torch.compile and for a batch of many tiles (its batch variant)."""
    from lean_tvm import runtime
    from lean_tvm.library import DENSE

    lib = runtime.library_for(torch.device("cuda"))
    assert lib.attention_kernel(str(dtype).removeprefix("torch."), head_dim, hq // hkv, 1, DENSE,
                                str(fp8).removeprefix("torch.")) is not None
    g = torch.Generator().manual_seed(head_dim)
    ks = torch.linspace(0.01, 3.0, hkv, device="cuda")
    for lens in ([5000, 0, 37, 1000], [700] * 40):
        batch, length = len(lens), max(lens)
        k8 = torch.randn(batch, hkv, length, head_dim, generator=g).to(fp8).cuda()
        v8 = torch.randn(batch, hkv, length, head_dim, generator=g).to(fp8).cuda()
        q = torch.randn(batch, hq, head_dim, generator=g).to(dtype).cuda()
        lens_t = torch.tensor(lens, dtype=torch.int32, device="cuda")
        dense = lean_tvm.decode_attention(q, k8, v8, lens_t, k_scale=ks, v_scale=0.5)
        paged = lean_tvm.decode_attention(q, k8, v8, lens_t, cache_leftpad=torch.zeros_like(lens_t), k_scale=ks,
                                          v_scale=0.5)  # start rows: the paged form
        compiled = torch.compile(lambda q, k, v, n, s: lean_tvm.decode_attention(q, k, v, n, k_scale=s, v_scale=0.5),
                                 fullgraph=True)(q, k8, v8, lens_t, ks)
        tol = dict(atol=2e-3, rtol=1e-2) if dtype == F16 else dict(atol=1.5e-2, rtol=2e-2)
        torch.testing.assert_close(dense, paged, **tol)
        torch.testing.assert_close(compiled, paged, **tol)
        ref, _ = decode_attention_reference(q, dequantize(k8, ks), dequantize(v8, 0.5), lens, head_dim ** -0.5)
        torch.testing.assert_close(dense.double(), ref, **tol)


def test_dense_fp8_graph_replay_follows_scales_and_lengths_changed_in_place():
    g = torch.Generator().manual_seed(5)
    k8 = torch.randn(2, 8, 3000, 128, generator=g).to(E4M3).cuda()
    v8 = torch.randn(2, 8, 3000, 128, generator=g).to(E4M3).cuda()
    q = torch.randn(2, 32, 128, generator=g).to(F16).cuda()
    lens = torch.tensor([3000, 10], dtype=torch.int32, device="cuda")
    ks, vs = torch.full((8,), 0.5, device="cuda"), torch.full((8,), 2.0, device="cuda")
    out = torch.empty_like(q)
    lean_tvm.decode_attention(q, k8, v8, lens, out=out, k_scale=ks, v_scale=vs)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        lean_tvm.decode_attention(q, k8, v8, lens, out=out, k_scale=ks, v_scale=vs)
    for new_lens, k_s, v_s in (([3000, 10], 0.5, 2.0), ([17, 2999], 8.0, 0.25), ([0, 1500], 1e-2, 1.0)):
        lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
        ks.fill_(k_s)
        vs.fill_(v_s)
        graph.replay()
        torch.cuda.synchronize()
        ro, _ = decode_attention_reference(q, dequantize(k8, k_s), dequantize(v8, v_s), new_lens, 128 ** -0.5)
        torch.testing.assert_close(out.double(), ro, atol=4e-3 * max(v_s, 1), rtol=1e-2)


def test_graph_replay_follows_scales_and_lengths_changed_in_place():
    q, k, v, table, lens = paged_case([3000, 700], 2, 32, 8, 16, F16, "blhd", 128, device="cuda", spare=40)
    k8, v8 = k.float().to(E4M3), v.float().to(E4M3)
    k_scale = torch.full((8,), 0.5, device="cuda")
    out = torch.empty_like(q)
    lean_tvm.decode_attention(q, k8, v8, lens, block_table=table, layout="blhd", out=out, k_scale=k_scale,
                              v_scale=2.0)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        lean_tvm.decode_attention(q, k8, v8, lens, block_table=table, layout="blhd", out=out, k_scale=k_scale,
                                  v_scale=2.0)
    # rows hold 188 and 44 pages: after the swap sequence 0 can hold 704 rows, sequence 1 3008
    for new_lens, ks, swap in (([3000, 700], 0.5, False), ([600, 2900], 4.0, True), ([704, 0], 1e-2, False)):
        lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
        if swap:  # the sequences trade pages: a new table in place
            table.copy_(table.flip(0))
        k_scale.fill_(ks)
        graph.replay()
        torch.cuda.synchronize()
        kd = gather_pages(dequantize(k8, ks), table, lens.tolist(), "blhd")
        vd = gather_pages(dequantize(v8, 2.0), table, lens.tolist(), "blhd")
        ro, _ = decode_attention_reference(q, kd, vd, lens.tolist(), 128 ** -0.5)
        torch.testing.assert_close(out.double(), ro, atol=4e-3, rtol=1e-2)


def test_the_default_fp8_call_never_synchronizes():
    q = torch.randn(2, 32, 128, device="cuda", dtype=F16)
    k = torch.randn(2, 8, 4096, 128, device="cuda").to(E4M3)
    lens = torch.tensor([4096, 100], dtype=torch.int32, device="cuda")
    per_head = torch.full((8,), 0.5, device="cuda")
    lean_tvm.decode_attention(q, k, k, lens, k_scale=per_head, v_scale=0.5)  # plans, launchers, constants
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing call now raises
    try:
        lean_tvm.decode_attention(q, k, k, lens, k_scale=per_head, v_scale=0.5)
        lean_tvm.decode_attention(q, k, k, lens, k_scale=0.25, v_scale=per_head)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_gpu_scales_are_checked_when_asked():
    q = torch.randn(1, 8, 64, device="cuda", dtype=F16)
    k = torch.randn(1, 1, 64, 64, device="cuda").to(E4M3)
    with pytest.raises(ValueError, match="k_scale: expected finite scales > 0"):
        lean_tvm.decode_attention(q, k, k, k_scale=torch.zeros(1, device="cuda"), check_lengths=True)
