"""The paged form of ``lean_tvm.decode_attention`` on CPU tensors against float64: block tables
with page sizes 1..256, shuffled and shared pages, both pool layouts, combined K/V tensors,
several query tokens per sequence (bottom-right causal), first valid rows, torch.compile, and every
bad input rejected before anything runs."""

import math

import pytest
import torch
from helpers import assert_attention_close, paged_case, paged_reference

import lean_tvm
from lean_tvm.reference import decode_attention_reference, gather_pages

pytest.importorskip("tvm")  # the CPU library

F16, BF16 = torch.float16, torch.bfloat16


CASES = [  # lens, Sq, Hq, Hkv, page, dtype, layout
    ([100, 0, 37, 64], 1, 8, 2, 16, F16, "blhd"),
    ([100, 0, 37, 64], 2, 8, 2, 1, BF16, "bhld"),
    ([256, 17, 1, 300], 5, 7, 1, 64, F16, "bhld"),
    ([33, 80], 8, 8, 1, 256, BF16, "blhd"),
    ([40, 7, 90], 16, 4, 1, 16, F16, "blhd"),  # Sq 16, G 4: 64 rows in 8 chunks
    ([70, 5], 8, 16, 2, 4, F16, "bhld"),  # G 8: 64 rows
    ([16, 32, 48], 4, 32, 8, 16, BF16, "blhd"),  # lengths that fill their last page
]


@pytest.mark.parametrize("lens,sq,hq,hkv,page,dtype,layout", CASES)
def test_paged_matches_float64(lens, sq, hq, hkv, page, dtype, layout):
    q, k, v, table, lens_t = paged_case(lens, sq, hq, hkv, page, dtype, layout, share=True)
    o, lse = lean_tvm.decode_attention(q, k, v, lens_t, block_table=table, layout=layout, return_lse=True)
    assert o.shape == q.shape and lse.shape == q.shape[:3]
    ro, rl = paged_reference(q, k, v, table, lens_t, layout, 1 / 8)
    assert_attention_close(o, lse, ro, rl, dtype)


def test_one_token_q_and_a_combined_kv_tensor():
    """q [B, Hq, D]; K and V as views of one [P, 2, page, Hkv, D] tensor (FlashInfer's NHD)."""
    g = torch.Generator().manual_seed(3)
    kv = torch.randn(9, 2, 16, 2, 64, generator=g).half()
    table = torch.tensor([[4, 1, 7], [2, 0, 0]], dtype=torch.int32)
    lens = torch.tensor([40, 9], dtype=torch.int32)
    q = torch.randn(2, 8, 64, generator=g).half()
    o, lse = lean_tvm.decode_attention(q, kv[:, 0], kv[:, 1], lens, block_table=table, layout="blhd", return_lse=True)
    assert o.shape == (2, 8, 64) and lse.shape == (2, 8)
    ro, rl = paged_reference(q, kv[:, 0], kv[:, 1], table, lens, "blhd", 1 / 8)
    assert_attention_close(o, lse, ro, rl, torch.float16)


@pytest.mark.parametrize("sq,hq,hkv", [(1, 8, 2), (3, 8, 2), (5, 7, 1)])
def test_dense_cache_with_tokens_and_start_rows(sq, hq, hkv):
    g = torch.Generator().manual_seed(sq)
    q = torch.randn(3, sq, hq, 64, generator=g).half()
    k = torch.randn(3, hkv, 120, 64, generator=g).half()
    v = torch.randn_like(k)
    lens = torch.tensor([120, 60, 4], dtype=torch.int32)
    pad = torch.tensor([0, 17, 2], dtype=torch.int32)
    o, lse = lean_tvm.decode_attention(q, k, v, lens, cache_leftpad=pad, return_lse=True)
    assert_attention_close(o, lse, *decode_attention_reference(q, k, v, lens, 1 / 8, pad), torch.float16)
    o2 = lean_tvm.decode_attention(q, k.transpose(1, 2), v.transpose(1, 2), lens, cache_leftpad=pad, layout="blhd")
    torch.testing.assert_close(o2, o, atol=0, rtol=0)


def test_several_tokens_over_a_dense_cache_match_the_paged_form():
    q, k, v, table, lens = paged_case([50, 20], 4, 8, 2, 16, layout="bhld", spare=0)
    dense_k = gather_pages(k, table, lens.tolist(), "bhld")
    dense_v = gather_pages(v, table, lens.tolist(), "bhld")
    paged = lean_tvm.decode_attention(q, k, v, lens, block_table=table)
    dense = lean_tvm.decode_attention(q, dense_k, dense_v, lens)
    torch.testing.assert_close(paged, dense, atol=2e-3, rtol=1e-2)


def test_a_sequence_shorter_than_its_tokens_gives_empty_rows():
    q, k, v, table, lens = paged_case([2, 0], 4, 4, 1, 8)
    o, lse = lean_tvm.decode_attention(q, k, v, lens, block_table=table, layout="blhd", return_lse=True)
    assert (o[0, :2] == 0).all() and (lse[0, :2] == -math.inf).all()  # tokens 0, 1 see no key
    assert (lse[0, 2:] > -math.inf).all() and (o[1] == 0).all() and (lse[1] == -math.inf).all()
    ro, rl = paged_reference(q, k, v, table, lens, "blhd", 1 / 8)
    assert_attention_close(o, lse, ro, rl, F16)


def test_torch_compile_fullgraph_and_opcheck():
    q, k, v, table, lens = paged_case([30, 9], 2, 8, 2, 8)

    def step(q, k, v, table, lens):
        return lean_tvm.decode_attention(q * 2, k, v, lens, block_table=table, layout="blhd") + 1

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v, table, lens), step(q, k, v, table, lens), atol=0, rtol=0)
    pools = (k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3))
    torch.library.opcheck(torch.ops.lean_tvm.decode_attention_paged.default,
                          (q, *pools, table, lens, None, 0.125, 8 * table.shape[1], 3),
                          test_utils=("test_schema", "test_faketensor"))


def test_out_and_an_empty_batch():
    q, k, v, table, lens = paged_case([30, 9], 3, 8, 2, 8)
    out = torch.empty_like(q)
    assert lean_tvm.decode_attention(q, k, v, lens, block_table=table, layout="blhd", out=out) is out
    torch.testing.assert_close(out, lean_tvm.decode_attention(q, k, v, lens, block_table=table, layout="blhd"),
                               atol=0, rtol=0)
    o, lse = lean_tvm.decode_attention(q[:0], k, v, lens[:0], block_table=table[:0], layout="blhd", return_lse=True)
    assert o.shape == (0, 3, 8, 64) and lse.shape == (0, 3, 8)


def _bad(**override):
    q, k, v, table, lens = paged_case([30, 9], 2, 8, 2, 8)
    args = dict(q=q, k_cache=k, v_cache=v, cache_seqlens=lens, block_table=table, layout="blhd")
    return args | override


BAD = [
    ("block_table.dtype", TypeError, dict(block_table=torch.zeros(2, 7, dtype=torch.int64))),
    ("block_table", ValueError, dict(block_table=torch.zeros(3, 7, dtype=torch.int32))),
    ("block_table", ValueError, dict(block_table=torch.zeros(7, 2, dtype=torch.int32).t())),
    ("page size", ValueError, dict(k_cache=torch.randn(9, 6, 2, 64).half(), v_cache=torch.randn(9, 6, 2, 64).half())),
    ("cache_seqlens", ValueError, dict(cache_seqlens=None)),
    ("cache_seqlens", ValueError, dict(cache_seqlens=torch.tensor([57, 9], dtype=torch.int32))),  # 7 pages x 8
    ("cache_leftpad", ValueError, dict(cache_leftpad=torch.zeros(2, dtype=torch.int32))),
    ("q.shape", ValueError, dict(q=torch.randn(2, 17, 8, 64).half())),
    ("k_cache.dtype", TypeError, dict(k_cache=torch.randn(9, 8, 2, 64).float())),
    ("out", ValueError, dict(out=torch.empty(2, 8, 64).half())),
]


@pytest.mark.parametrize("arg,exc,override", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_paged_input_is_rejected_naming_the_argument(arg, exc, override):
    with pytest.raises(exc, match=arg.replace("(", r"\(").replace(")", r"\)")):
        lean_tvm.decode_attention(**_bad(**override))


def test_start_rows_past_the_length_are_rejected_when_checked():
    q = torch.randn(2, 8, 64).half()
    k = torch.randn(2, 2, 50, 64).half()
    with pytest.raises(ValueError, match="cache_seqlens"):
        lean_tvm.decode_attention(q, k, k, torch.tensor([10, 40], dtype=torch.int32),
                                  cache_leftpad=torch.tensor([11, 0], dtype=torch.int32))


def test_the_registered_ops_keep_nothing_between_calls(monkeypatch):
    """What torch.compile calls (the registered ops) allocates its workspace and default tensors per
    call: under CUDA graphs of torch.compile a cached tensor first made while a graph is warmed up
    or recorded would live untracked in the graphs' memory pool. The eager calls keep theirs."""
    from lean_tvm import paged_ops, runtime, torch_ops

    monkeypatch.setattr(runtime.WORKSPACE, "_buffers", {})
    monkeypatch.setattr(paged_ops, "_CONSTANTS", {})
    monkeypatch.setattr(torch_ops, "_FULL_LENGTHS", {})
    g = torch.Generator().manual_seed(9)
    q = torch.randn(2, 2, 8, 64, generator=g).half()  # 2 tokens per sequence
    kv = torch.randn(2, 2, 40, 64, generator=g).half()
    paged, _ = torch.ops.lean_tvm.decode_attention_paged(q, kv, kv, None, None, None, 0.125, 40,
                                                         runtime.DENSE_PAGE_LOG2)
    dense, _ = torch.ops.lean_tvm.decode_attention(q[:, 1], kv, kv, None, 0.125)
    assert not runtime.WORKSPACE._buffers and not paged_ops._CONSTANTS and not torch_ops._FULL_LENGTHS
    eager = lean_tvm.decode_attention(q[:, 1], kv, kv)  # the last token sees the whole cache
    torch.testing.assert_close(paged[:, 1], eager, atol=2e-3, rtol=1e-2)
    torch.testing.assert_close(dense, eager, atol=2e-3, rtol=1e-2)
    assert runtime.WORKSPACE._buffers and torch_ops._FULL_LENGTHS  # the eager calls cache theirs
