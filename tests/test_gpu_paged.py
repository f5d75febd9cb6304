"""The paged form on the GPU (marked ``gpu``): block tables with page sizes 1..256, shuffled and
shared pages, both pool layouts, several query tokens per sequence over GQA groups 1..8, first
valid rows, fp16 and bf16, head dims 64/128/256, against float64; the paged form equals the dense
kernel on the same K/V; CUDA graph replay with lengths and tables changed in place; torch.compile.

``LEAN_TVM_LIB_DIR=build/sm_90a python -m pytest -m gpu tests/test_gpu_paged.py``
"""

import pytest
import torch
from helpers import assert_attention_close, paged_case, paged_reference

import lean_tvm
from lean_tvm.reference import decode_attention_reference, gather_pages

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
F16, BF16 = torch.float16, torch.bfloat16

GRID = [  # lens, Sq, Hq, Hkv, page, dtype, layout, D
    ([4096, 0, 37, 1000], 1, 32, 8, 16, F16, "blhd", 128),
    ([4096, 0, 37, 1000], 1, 32, 8, 1, BF16, "bhld", 128),
    ([70000, 5, 513], 1, 64, 8, 64, F16, "blhd", 128),
    ([3000, 16, 32, 48, 1], 1, 8, 1, 256, BF16, "blhd", 64),
    ([2500, 1, 700], 2, 8, 1, 16, F16, "bhld", 256),  # G 8
    ([2500, 3, 700], 5, 28, 4, 16, BF16, "blhd", 128),  # G 7
    ([8192, 100], 8, 32, 8, 32, F16, "blhd", 128),  # G 4, 32 rows: 2 chunks
    ([6000, 64], 8, 8, 8, 1, F16, "blhd", 64),  # G 1
    ([5000, 9, 200], 16, 16, 4, 16, BF16, "bhld", 128),  # G 4, Sq 16: 64 rows
    ([100000], 4, 32, 8, 128, F16, "blhd", 128),
    ([4100, 130], 8, 16, 2, 16, F16, "blhd", 128),  # the last block's 4 rows: tokens 0-3 see none of them
    ([3000, 0, 1] + [100 + 61 * i for i in range(37)], 1, 32, 8, 16, BF16, "blhd", 128),  # 320 tiles: batch variant
    ([900] * 40, 2, 32, 8, 16, F16, "blhd", 128),  # 320 tiles of 8 rows
]


@pytest.mark.parametrize("lens,sq,hq,hkv,page,dtype,layout,head_dim", GRID)
def test_paged_matches_float64(lens, sq, hq, hkv, page, dtype, layout, head_dim):
    q, k, v, table, lens_t = paged_case(lens, sq, hq, hkv, page, dtype, layout, head_dim, share=True, device="cuda")
    o, lse = lean_tvm.decode_attention(q, k, v, lens_t, block_table=table, layout=layout, return_lse=True)
    ro, rl = paged_reference(q, k, v, table, lens_t, layout, head_dim ** -0.5)
    assert_attention_close(o, lse, ro, rl, dtype)


@pytest.mark.parametrize("sq", [1, 3, 8])
def test_dense_cache_with_start_rows(sq):
    torch.manual_seed(sq)
    q = torch.randn(4, sq, 32, 128, device="cuda", dtype=F16)
    k = torch.randn(4, 8, 3000, 128, device="cuda", dtype=F16)
    v = torch.randn_like(k)
    lens = torch.tensor([3000, 1500, 40, 7], dtype=torch.int32, device="cuda")
    pad = torch.tensor([0, 999, 35, 7], dtype=torch.int32, device="cuda")
    o, lse = lean_tvm.decode_attention(q, k, v, lens, cache_leftpad=pad, return_lse=True)
    assert_attention_close(o, lse, *decode_attention_reference(q, k, v, lens, 128 ** -0.5, pad), F16)


def test_paged_one_token_equals_the_dense_kernel():
    q, k, v, table, lens = paged_case([20000, 3, 4096], 1, 32, 8, 16, F16, "blhd", 128, device="cuda", spare=0)
    paged = lean_tvm.decode_attention(q[:, 0], k, v, lens, block_table=table, layout="blhd")
    dk, dv = gather_pages(k, table, lens.tolist(), "blhd"), gather_pages(v, table, lens.tolist(), "blhd")
    dense = lean_tvm.decode_attention(q[:, 0], dk, dv, lens)
    torch.testing.assert_close(paged, dense, atol=2e-3, rtol=1e-2)


def test_graph_replay_follows_lengths_and_tables_changed_in_place():
    q, k, v, table, lens = paged_case([3000, 700], 2, 32, 8, 16, F16, "blhd", 128, device="cuda", spare=40)
    out = torch.empty_like(q)
    lean_tvm.decode_attention(q, k, v, lens, block_table=table, layout="blhd", out=out)  # warm-up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        lean_tvm.decode_attention(q, k, v, lens, block_table=table, layout="blhd", out=out)
    # rows hold 188 and 44 pages: after the swap sequence 0 can hold 704 rows, sequence 1 3008
    for new_lens, swap in (([3000, 700], False), ([600, 2900], True), ([704, 0], False)):
        lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
        if swap:  # the sequences trade pages: a new table in place
            table.copy_(table.flip(0))
        graph.replay()
        torch.cuda.synchronize()
        ro, _ = paged_reference(q, k, v, table, lens, "blhd", 128 ** -0.5)
        torch.testing.assert_close(out.double(), ro, atol=2e-3, rtol=1e-2)


def test_torch_compile_fullgraph():
    q, k, v, table, lens = paged_case([3000, 700], 4, 32, 8, 16, BF16, "blhd", 128, device="cuda")

    def step(q, k, v, table, lens):
        return lean_tvm.decode_attention(q * 1.5, k, v, lens, block_table=table, layout="blhd").float().sum(-1)

    compiled = torch.compile(step, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, table, lens), step(q, k, v, table, lens), atol=1e-2, rtol=1e-3)


def test_the_default_paged_call_never_synchronizes():
    q, k, v, table, lens = paged_case([3000, 17, 0], 4, 32, 8, 16, F16, "blhd", 128, device="cuda")
    first = lean_tvm.decode_attention(q, k, v, lens, block_table=table, layout="blhd")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        again = lean_tvm.decode_attention(q, k, v, lens, block_table=table, layout="blhd")
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.testing.assert_close(again, first, atol=0, rtol=0)
