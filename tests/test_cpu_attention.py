"""LeanAttention's CPU form (the same walk, workers run in order) against float64.

A pairwise subset of the numerics grid (B 1..8, G 1/4/8, D 64/128/256, lengths 0..~70k, fp16 and
bf16) covers every value of every axis; the long-context rows are marked ``slow``.
"""

import math

import pytest
import torch
from helpers import assert_attention_close

from lean_tvm import plan as P
from lean_tvm import runtime
from lean_tvm.reference import decode_attention_reference

pytest.importorskip("tvm")  # the CPU library is built on first use

CPU = torch.device("cpu")


def run_case(batch, hq, hkv, head_dim, lens, dtype, num_ctas=None, num_splits=0, layout="bhld", qscale=1.0,
             seed=0):
    g = torch.Generator().manual_seed(seed)
    cache_len = max(max(lens), 1)
    shape = (batch, hkv, cache_len, head_dim) if layout == "bhld" else (batch, cache_len, hkv, head_dim)
    k = torch.randn(shape, generator=g).to(dtype)
    v = torch.randn(shape, generator=g).to(dtype)
    if layout == "blhd":
        k, v = k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)
    q = (torch.randn(batch, hq, head_dim, generator=g) * qscale).to(dtype)
    lens_t = torch.tensor(lens, dtype=torch.int32)
    out = torch.full((batch, hq, head_dim), float("nan"), dtype=dtype)
    lse = torch.full((batch, hq), float("nan"))
    scale = 1 / math.sqrt(head_dim)
    runtime.launch_attention(q, k, v, lens_t, out, lse, scale, num_splits=num_splits, num_ctas=num_ctas)
    ref_o, ref_lse = decode_attention_reference(q, k, v, lens, scale)
    assert_attention_close(out, lse, ref_o, ref_lse, dtype)


F16, BF16 = torch.float16, torch.bfloat16
GRID = [  # (B, Hq, Hkv, D, lengths, dtype, workers)
    (1, 8, 8, 64, [1], F16, 1),
    (1, 4, 1, 128, [300], BF16, 5),
    (2, 32, 4, 256, [0, 129], F16, 7),
    (3, 8, 1, 64, [700, 0, 130], BF16, 40),
    (4, 16, 4, 128, [64, 65, 1, 0], F16, 13),
    (5, 8, 8, 256, [17, 300, 64, 0, 5], BF16, 3),
    (8, 32, 4, 64, [1, 2, 3, 100, 200, 300, 63, 0], F16, 16),
    (8, 8, 1, 128, [1000, 0, 1, 999, 64, 128, 7, 300], BF16, 132),
    (2, 16, 2, 128, [2048, 1500], F16, 132),
]


@pytest.mark.parametrize("batch,hq,hkv,head_dim,lens,dtype,workers", GRID)
def test_stream_k_cpu_matches_float64(batch, hq, hkv, head_dim, lens, dtype, workers):
    run_case(batch, hq, hkv, head_dim, lens, dtype, num_ctas=workers)


@pytest.mark.parametrize("splits", [1, 2, 7])
def test_fixed_split_and_no_split_cpu_match_float64(splits):
    run_case(3, 16, 4, 128, [500, 0, 77], F16, num_splits=splits)


def test_flash_attn_cache_layout_is_read_by_strides():
    run_case(2, 8, 2, 64, [300, 45], BF16, num_ctas=9, layout="blhd")


def test_large_logits_stay_finite():
    run_case(2, 8, 2, 128, [1000, 3], F16, num_ctas=11, qscale=30.0)


def test_gqa_group_sizes_up_to_sixteen():
    run_case(2, 32, 2, 64, [300, 200], F16, num_ctas=6)


def test_results_do_not_depend_on_the_partition():
    """The same inputs under stream-K with 1..64 workers and a fixed split agree closely."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 8, 64, generator=g).half()
    k = torch.randn(2, 2, 900, 64, generator=g).half()
    v = torch.randn(2, 2, 900, 64, generator=g).half()
    lens = torch.tensor([900, 333], dtype=torch.int32)
    outs = []
    for workers, splits in [(1, 0), (5, 0), (64, 0), (None, 4)]:
        o = torch.empty(2, 8, 64, dtype=torch.float16)
        lse = torch.empty(2, 8)
        runtime.launch_attention(q, k, v, lens, o, lse, 0.125, num_splits=splits, num_ctas=workers)
        outs.append(o.double())
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], atol=1e-3, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("batch,lens,dtype,head_dim,hq,hkv", [
    (1, [70000], F16, 128, 8, 1),
    (2, [65536, 4097], BF16, 64, 8, 8),
    (4, [30000, 0, 1, 70000], F16, 256, 4, 1),
])
def test_long_contexts_cpu_match_float64(batch, lens, dtype, head_dim, hq, hkv):
    run_case(batch, hq, hkv, head_dim, lens, dtype, num_ctas=132)


@pytest.mark.parametrize("tiles,blocks,resident", [(1, 8, 132), (1, 32, 132), (1, 4096, 132), (8, 32, 132),
                                                   (64, 256, 132), (3, 1, 132), (1, 1, 4), (200, 1000, 264)])
def test_stream_k_workers_bounded_by_the_work(tiles, blocks, resident):
    w = P.stream_k_workers(tiles, blocks, resident)
    assert 1 <= w <= resident
    assert w <= tiles * P.MAX_SPLIT  # no lone tile split over every SM
    assert w <= max(P.MIN_WORKERS, tiles * blocks)  # at most one block per worker
    if tiles >= resident:
        assert w == P.aligned_workers(tiles, resident)  # plenty of tiles: (nearly) every SM
    if tiles == 1:
        assert w <= 3 * math.sqrt(blocks) + 1  # a lone tile: few partials to merge


@pytest.mark.parametrize("tiles,blocks,want", [(1, 16, 16), (1, 64, 32), (1, 128, 32), (1, 256, 64), (1, 512, 64),
                                               (1, 1024, 64), (8, 16, 128), (8, 32, 128), (1, 100, 25), (1, 97, 30),
                                               (1, 1000, 64)])
def test_stream_k_workers_follow_the_h200_sweep(tiles, blocks, want):
    """The counts the H200 sweeps (results/h200/workers) found fastest, or within 6% of it; a split
    moves to the nearest divisor of the blocks (100 blocks: 25 x 4), a prime count keeps
    3 sqrt(blocks), and a split at the cap stays there (1000 blocks: 64, not the divisor 50)."""
    assert P.stream_k_workers(tiles, blocks, 132) == want


@pytest.mark.parametrize("tiles,resident,want", [(8, 132, 128), (64, 132, 128), (256, 132, 128), (1, 132, 132),
                                                 (3, 132, 132), (48, 132, 132), (24, 132, 120), (7, 4, 4)])
def test_aligned_workers_cut_tiles_evenly_without_idling_many_sms(tiles, resident, want):
    w = P.aligned_workers(tiles, resident)
    assert w == want
    assert w >= P.ALIGN_MIN_FRACTION * resident or w == resident


def test_no_tiles_is_not_a_division_by_zero():
    assert P.aligned_workers(0, 132) == 132 and P.stream_k_workers(0, 0, 1) == 1


def test_launcher_sizes_the_workers_from_the_cache_length(monkeypatch):
    """With 132 SMs, a lone tile of a few blocks gets the few workers ``stream_k_workers`` picks
    (not 132); the result matches float64 either way. (The CPU kernel runs any worker count.)"""
    monkeypatch.setattr(runtime, "num_sms", lambda device: 132)
    monkeypatch.setattr(runtime, "_LAUNCHES", {})
    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, 8, 64, generator=g).half()
    k = torch.randn(1, 1, 300, 64, generator=g).half()
    v = torch.randn_like(k)
    lens = torch.tensor([300], dtype=torch.int32)
    info = runtime.library_for(q.device).attention_kernel("float16", 64, 8)
    _, workers, grid, _ = runtime._prepare_attention(q, 1, P.STREAM_K, None, None, k.shape[2])
    want = P.stream_k_workers(1, -(-300 // info.block_size), 132 * info.ctas_per_sm)
    assert workers == grid == want < 132
    ref_o, ref_lse = decode_attention_reference(q, k, v, [300], 0.125)
    for ctas in (None, 132):
        o, lse = torch.empty_like(q), torch.empty(1, 8)
        runtime.launch_attention(q, k, v, lens, o, lse, 0.125, num_ctas=ctas)
        assert_attention_close(o, lse, ref_o, ref_lse, torch.float16)


def test_launchers_of_a_cache_that_grows_every_step_stay_bounded(monkeypatch):
    """A cache one row longer per step (transformers' dynamic cache) makes a launcher per length:
    the cache of launchers is emptied when full instead of growing with the generation."""
    monkeypatch.setattr(runtime, "_LAUNCHES", {})
    monkeypatch.setattr(runtime, "_MAX_LAUNCHES", 3)
    q = torch.randn(1, 8, 64).half()
    for length in range(10, 20):
        runtime.attention_launcher(q, 2, max_len=length)
        runtime.paged_launcher(q.unsqueeze(1), 2, length)
        assert len(runtime._LAUNCHES) <= 3
