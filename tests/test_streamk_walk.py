"""The device-side plan and walk of the stream-K primitive against the Python plan (the oracle).

A probe operator plugged into the primitive's CPU form records what the walk does: which blocks
each step covers, which workers publish, which partials each reducer merges (in order), which
tiles get written. Everything must equal ``lean_tvm.plan`` for the same lengths.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

tvm = pytest.importorskip("tvm")
from tvm.script import tirx as T  # noqa: E402

from lean_tvm import plan as P  # noqa: E402
from lean_tvm import streamk  # noqa: E402
from lean_tvm.spec import StreamKConfig  # noqa: E402

BS = 16  # rows per block
MAXBLK = 64  # blocks per tile the probe can record
MAXC = 256  # contributors per tile the probe can record


def probe_operator():
    @T.macro
    def begin_tile(bufs, b, h):
        pass

    @T.macro
    def step(bufs, b, h, row0, n):
        bufs.COVER[b, h, T.truncdiv(row0, BS)] = bufs.COVER[b, h, T.truncdiv(row0, BS)] + 1

    @T.macro
    def publish(bufs, slot):
        bufs.PUB[slot] = bufs.PUB[slot] + 1

    @T.macro
    def merge_partials(bufs, top, n, valid):
        for i in range(n):
            if valid[i] != 0:
                bufs.LOG[bufs.cnt[0]] = top - i
                bufs.cnt[0] = bufs.cnt[0] + 1

    @T.macro
    def write_output(bufs, b, h):
        bufs.OUT[b, h] = bufs.OUT[b, h] + 1
        bufs.NC[b, h] = bufs.cnt[0]
        for i in range(bufs.cnt[0]):
            bufs.CONTRIB[b, h, i] = bufs.LOG[i]
        bufs.cnt[0] = 0

    @T.macro
    def write_empty(bufs, b):
        bufs.EMPTY[b] = bufs.EMPTY[b] + 1

    return streamk.CpuOperator(begin_tile=begin_tile, step=step, publish=publish, merge_partials=merge_partials,
                               write_output=write_output, write_empty=write_empty)


@pytest.fixture(scope="module", params=[0, 3], ids=["tile_cost0", "tile_cost3"])
def probe(request):
    op = probe_operator()
    walk = streamk.cpu_walk(StreamKConfig(block_size=BS, tile_cost=request.param))

    @T.prim_func(s_tir=True)
    def probe_walk(seq_lens: T.handle, cover: T.handle, pub: T.handle, out: T.handle, nc: T.handle,
                   contrib: T.handle, empty: T.handle, flags: T.handle, num_heads: T.int32, cache_len: T.int32,
                   num_workers: T.int32, num_splits: T.int32):
        B = T.int32()
        SL = T.match_buffer(seq_lens, (B,), "int32")
        COVER = T.match_buffer(cover, (B, num_heads, MAXBLK), "int32")
        PUB = T.match_buffer(pub, (num_workers,), "int32")
        OUT = T.match_buffer(out, (B, num_heads), "int32")
        NC = T.match_buffer(nc, (B, num_heads), "int32")
        CONTRIB = T.match_buffer(contrib, (B, num_heads, MAXC), "int32")
        EMPTY = T.match_buffer(empty, (B,), "int32")
        FLAGS = T.match_buffer(flags, (num_workers,), "int32")
        cum = T.alloc_buffer((B + 1,), "int32")
        srch = T.alloc_buffer((2,), "int32")
        qr = T.alloc_buffer((3,), "int32")
        log = T.alloc_buffer((MAXC,), "int32")
        cnt = T.alloc_buffer((1,), "int32")
        cnt[0] = 0
        ctx = T.meta_var(streamk.WalkContext(SL=SL, B=B, H=num_heads, LMAX=cache_len, CUM=cum, NW=num_workers,
                                             SPLITS=num_splits, srch=srch, QR=qr, FLAGS=FLAGS))
        bufs = T.meta_var(SimpleNamespace(COVER=COVER, PUB=PUB, OUT=OUT, NC=NC, CONTRIB=CONTRIB, EMPTY=EMPTY,
                                          LOG=log, cnt=cnt))
        walk(ctx, op, bufs)

    fn = tvm.compile(probe_walk, target="llvm")["probe_walk"]
    fn.tile_cost = request.param
    return fn


def run_probe(fn, lens, heads, workers, splits):
    lens_t = torch.tensor(lens, dtype=torch.int32)
    B = len(lens)
    nw = workers if splits == 0 else B * heads * splits
    z = dict(dtype=torch.int32)
    rec = SimpleNamespace(cover=torch.zeros(B, heads, MAXBLK, **z), pub=torch.zeros(nw, **z),
                          out=torch.zeros(B, heads, **z), nc=torch.zeros(B, heads, **z),
                          contrib=torch.full((B, heads, MAXC), -1, **z), empty=torch.zeros(B, **z))
    fn(lens_t, rec.cover, rec.pub, rec.out, rec.nc, rec.contrib, rec.empty, torch.zeros(nw, **z), heads,
       max(lens + [1]), nw, splits)
    return rec


CASES = [
    ([256], 8, 132, 0),
    ([1000, 0, 37, 640], 2, 7, 0),
    ([1000, 0, 37, 640], 2, 64, 0),
    ([1, 1, 1, 1, 1], 3, 2, 0),
    ([1000, 16, 17], 1, 200, 0),
    ([1000, 0, 37, 640], 2, 0, 3),
    ([1000, 16, 17], 4, 0, 1),
    ([500] * 3, 1, 0, 8),
    ([1000, 0, 0, 37, 640, 16, 1, 1, 900], 2, 13, 0),  # short tiles among long: the tile cost moves cuts
    ([0, 0, 5], 3, 40, 0),  # more workers than blocks; empty tiles still cost
    ([300] * 4, 2, 5, 0),  # equal tiles: the plain split
    ([33, 40, 48], 3, 7, 0),  # equal in blocks, not in rows: the plain split too
]


@pytest.mark.parametrize("lens,heads,workers,splits", CASES)
def test_device_walk_equals_python_plan(probe, lens, heads, workers, splits):
    rec = run_probe(probe, lens, heads, workers, splits)
    p = P.make_plan(lens, heads, BS, workers, splits, probe.tile_cost)
    nb = P.blocks_per_sequence(lens, BS)
    for b in range(len(lens)):
        assert rec.empty[b] == (1 if lens[b] == 0 else 0)
        for h in range(heads):
            t = b * heads + h
            cover = rec.cover[b, h].numpy()
            assert (cover[: nb[b]] == 1).all() and (cover[nb[b]:] == 0).all(), (b, h, cover[: nb[b] + 1])
            assert rec.out[b, h] == (1 if nb[b] else 0)
            expect = list(p.contributors.get(t, ()))
            assert rec.contrib[b, h, : rec.nc[b, h]].tolist() == expect
    published = np.flatnonzero(rec.pub.numpy())
    assert (rec.pub.numpy() <= 1).all()
    assert sorted(published.tolist()) == sorted(c for cs in p.contributors.values() for c in cs)
