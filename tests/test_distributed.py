"""Context-parallel decode attention on CPU: gloo process groups of 2 and 4 ranks (spawned with
torch.multiprocessing, 127.0.0.1 only), each rank holding a contiguous piece of every sequence.
The merged result equals the single-process operator on the full cache and the float64 reference,
is bitwise reproducible and the same on every rank; sharding helpers and argument errors."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import LSE_TOL, TOLERANCES, assert_attention_close

import lean_tvm
from lean_tvm.distributed import context_parallel_decode_attention, shard_bounds, shard_cache, shard_capacity
from lean_tvm.reference import decode_attention_reference

pytest.importorskip("tvm")  # the CPU library is built on first use

DTYPES = (torch.float16, torch.bfloat16)
BATCH, HQ, HKV, HEAD_DIM, CACHE_LEN = 5, 8, 2, 64, 150
# ragged: a full sequence, one shorter than the world size (some ranks hold 0 rows), an empty one
LENGTHS = (150, 1, 0, 3, 67)


def make(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(BATCH, HQ, HEAD_DIM, generator=g).to(dtype)
    k = torch.randn(BATCH, HKV, CACHE_LEN, HEAD_DIM, generator=g).to(dtype)
    v = torch.randn(BATCH, HKV, CACHE_LEN, HEAD_DIM, generator=g).to(dtype)
    return q, k, v


def _worker(rank, world, port, out_dir):
    import tvm  # noqa: F401 - the CPU library needs apache-tvm's runtime loaded before its first call

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if "lo" in {name for _, name in socket.if_nameindex()}:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {}
        for dtype in DTYPES:
            q, k, v = make(dtype)
            k_shard, lens = shard_cache(k, LENGTHS, world, rank)
            v_shard, _ = shard_cache(v, LENGTHS, world, rank)
            for run in ("first", "again"):
                results[run, dtype] = context_parallel_decode_attention(q, k_shard, v_shard, lens, return_lse=True)
            # gather to the last rank only; flash-attn's cache layout and a [B, 1, Hq, D] query
            k_blhd, _ = shard_cache(k.transpose(1, 2), LENGTHS, world, rank, layout="blhd")
            v_blhd, _ = shard_cache(v.transpose(1, 2), LENGTHS, world, rank, layout="blhd")
            o = context_parallel_decode_attention(q.unsqueeze(1), k_blhd, v_blhd, lens, layout="blhd", dst=world - 1)
            assert (o is None) == (rank != world - 1)
            results["dst", dtype] = o
        with pytest.raises(ValueError, match="dst"):  # every rank raises before any collective
            context_parallel_decode_attention(q, k_shard, v_shard, lens, dst=world)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"world{w}")
def ranks(request, tmp_path_factory):
    """Results of every rank of one spawned process group."""
    world = request.param
    q, k, v = make(torch.float16)
    lean_tvm.decode_attention(q, k, v)  # build the CPU library once; the children find it in $LEAN_TVM_CACHE
    out_dir = tmp_path_factory.mktemp(f"world{world}")
    mp.spawn(_worker, args=(world, _free_port(), str(out_dir)), nprocs=world, join=True)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(world)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_equals_single_process_operator_and_reference(ranks, dtype):
    q, k, v = make(dtype)
    lens = torch.tensor(LENGTHS, dtype=torch.int32)
    o, lse = ranks[0]["first", dtype]
    assert o.dtype == dtype and o.shape == q.shape and lse.dtype == torch.float32
    o_1, lse_1 = lean_tvm.decode_attention(q, k, v, lens, return_lse=True)
    torch.testing.assert_close(o, o_1, **TOLERANCES[dtype])
    torch.testing.assert_close(lse, lse_1, **LSE_TOL)  # -inf == -inf for the empty sequence
    assert_attention_close(o, lse, *decode_attention_reference(q, k, v, LENGTHS, HEAD_DIM**-0.5), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_deterministic_and_the_same_on_every_rank(ranks, dtype):
    o, lse = ranks[0]["first", dtype]
    for r in ranks:
        for run in ("first", "again"):
            torch.testing.assert_close(r[run, dtype], (o, lse), atol=0, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gather_to_one_rank(ranks, dtype):
    """Only dst gets the output; the cache layout and q's rank change nothing, bit for bit."""
    assert all(r["dst", dtype] is None for r in ranks[:-1])
    o = ranks[-1]["dst", dtype]
    assert o.shape == (BATCH, 1, HQ, HEAD_DIM)
    torch.testing.assert_close(o[:, 0], ranks[0]["first", dtype][0], atol=0, rtol=0)


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_shard_bounds_split_every_sequence_into_contiguous_balanced_pieces(world):
    lens = [0, 1, 2, 5, 150, 1 << 21]
    pieces = [shard_bounds(lens, world, r) for r in range(world)]
    for b, n in enumerate(lens):
        start = 0
        for piece_lens, offsets in pieces:
            assert int(offsets[b]) == start
            start += int(piece_lens[b])
        assert start == n
        sizes = [int(p[0][b]) for p in pieces]
        assert max(sizes) - min(sizes) <= 1 and max(sizes) <= shard_capacity(lens, world)
    assert pieces[0][0].dtype == torch.int32 and pieces[0][1].dtype == torch.int64


def test_shard_cache_reassembles_the_cache():
    _, k, _ = make(torch.float16)
    world = 3
    shards = [shard_cache(k, LENGTHS, world, r) for r in range(world)]
    assert all(s.shape == (BATCH, HKV, shard_capacity(LENGTHS, world), HEAD_DIM) for s, _ in shards)
    for b, n in enumerate(LENGTHS):
        rows = torch.cat([s[b, :, : int(lens[b])] for s, lens in shards], dim=1)
        torch.testing.assert_close(rows, k[b, :, :n], atol=0, rtol=0)
    assert shard_capacity([0, 0], 4) == 1  # never a cache of 0 rows


def test_bad_arguments():
    with pytest.raises(ValueError, match="rank"):
        shard_bounds([4], 2, 2)
    with pytest.raises(ValueError, match="world_size"):
        shard_bounds([4], 0, 0)
    with pytest.raises(ValueError, match="seq_lens"):
        shard_bounds([4, -1], 2, 0)
    with pytest.raises(ValueError, match="seq_lens"):
        shard_bounds([1.5], 2, 0)
    _, k, _ = make(torch.float16)
    with pytest.raises(ValueError, match="seq_lens"):
        shard_cache(k, [CACHE_LEN + 1] * BATCH, 2, 0)
    with pytest.raises(ValueError, match="layout"):
        shard_cache(k, LENGTHS, 2, 0, layout="bld")
    assert not dist.is_initialized()
    q, k, v = make(torch.float16)
    with pytest.raises(RuntimeError, match="init_process_group"):
        context_parallel_decode_attention(q, k, v, None)
