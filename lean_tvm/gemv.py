"""A split-K GEMV, y = W x, on the stream-K primitive: the primitive is not attention-specific.

Decode-shaped matrix-vector products have few outputs and a long K, so one CTA per output group
leaves most SMs idle; the primitive gives every CTA an equal share of all groups' K blocks and
merges the partial sums (the merge is a plain sum). In the primitive's terms there is one
"sequence" of length K and ``ceil(N / ROWS)`` tiles of ``ROWS`` output rows.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

from tvm.script import tirx as T

from . import signature as sig
from . import streamk
from .spec import GEMV_ROWS as ROWS
from .spec import StreamKConfig

COLS = 256  # K columns a warp folds per step (8 per lane)
WARPS, STAGES = 4, 4


@dataclasses.dataclass(frozen=True)
class GemvSpec:
    dtype: str

    @property
    def name(self) -> str:
        return f"stream_k_gemv_{self.dtype}"

    def describe(self) -> dict:
        return {"dtype": self.dtype, "rows_per_tile": ROWS, "block_size": COLS * WARPS}


GEMV_SPECS = (GemvSpec("float16"), GemvSpec("bfloat16"))


def _cpu_operator(dt: str, block: int):
    @T.macro
    def begin_tile(bufs, b, h):
        for r in range(ROWS):
            bufs.acc[r] = T.float32(0)

    @T.macro
    def step(bufs, b, h, row0, n):
        for r in range(ROWS):
            if h * ROWS + r < bufs.N:
                for c in range(T.min(block, n - row0)):
                    bufs.acc[r] = bufs.acc[r] + T.Cast("float32", bufs.W[h * ROWS + r, row0 + c]) * T.Cast(
                        "float32", bufs.X[row0 + c])

    @T.macro
    def publish(bufs, slot):
        for r in range(ROWS):
            bufs.WS[slot, r] = bufs.acc[r]

    @T.macro
    def merge_partials(bufs, top, n, valid):
        for i in range(n):
            if valid[i] != 0:
                for r in range(ROWS):
                    bufs.acc[r] = bufs.acc[r] + bufs.WS[top - i, r]

    @T.macro
    def write_output(bufs, b, h):
        for r in range(ROWS):
            if h * ROWS + r < bufs.N:
                bufs.Y[h * ROWS + r] = T.Cast(dt, bufs.acc[r])

    @T.macro
    def write_empty(bufs, b):
        for r in range(bufs.N):
            bufs.Y[r] = T.Cast(dt, T.float32(0))

    return streamk.CpuOperator(begin_tile=begin_tile, step=step, publish=publish, merge_partials=merge_partials,
                               write_output=write_output, write_empty=write_empty)


def cpu_gemv_body(spec: GemvSpec):
    """The serial kernel's body macro, taking the parameters of ``sig.GEMV_PARAMS`` but ``grid`` by
    name (this module's kernel and the stream-K rule's are ``sig.prim_func`` of it)."""
    dt, block = spec.dtype, COLS * WARPS
    op = _cpu_operator(dt, block)
    walk = streamk.cpu_walk(StreamKConfig(block_size=block))

    @T.macro
    def body(w, x, k_len, y, ws, flags, num_workers, num_splits):
        N, K, WSN = T.int32(), T.int32(), T.int32()
        W = T.match_buffer(w, (N, K), dt)
        X = T.match_buffer(x, (K,), dt)
        KL = T.match_buffer(k_len, (1,), "int32")
        Y = T.match_buffer(y, (N,), dt)
        WS = T.match_buffer(ws, (WSN, ROWS), "float32")
        FLAGS = T.match_buffer(flags, (WSN,), "int32")
        cum = T.alloc_buffer((2,), "int32")
        srch = T.alloc_buffer((2,), "int32")
        qr = T.alloc_buffer((2,), "int32")
        acc = T.alloc_buffer((ROWS,), "float32")
        ctx = T.meta_var(streamk.WalkContext(SL=KL, B=1, H=T.truncdiv(N + ROWS - 1, ROWS), LMAX=K, CUM=cum,
                                             NW=num_workers, SPLITS=num_splits, srch=srch, QR=qr, FLAGS=FLAGS))
        bufs = T.meta_var(SimpleNamespace(W=W, X=X, Y=Y, WS=WS, N=N, acc=acc))
        walk(ctx, op, bufs)

    return body


def make_cpu_gemv(spec: GemvSpec):
    return sig.prim_func(spec.name + "_cpu", sig.GEMV_PARAMS, cpu_gemv_body(spec),
                         ["w", "x", "k_len", "y", "ws", "flags", "num_workers", "num_splits"], {"tirx.noalias": True})


def _gpu_operator(dt: str):
    NT = 32 * WARPS
    full = T.uint32(0xFFFFFFFF)
    per_stage = (ROWS + 1) * COLS  # ROWS rows of W, then x, per warp and stage

    def ring(warp, stage):
        return (warp * STAGES + stage) * per_stage

    @T.macro
    def setup(bufs):
        pass

    @T.macro
    def begin_tile(bufs, b, h):
        for r in T.unroll(ROWS):
            bufs.acc[r] = T.float32(0)

    @T.macro
    def load(bufs, stage, b, h, row0, n):
        """Lane l copies columns [8l, 8l + 8) of this warp's COLS for all ROWS rows and x;
        columns past K and rows past N are zero-filled."""
        col = T.meta_var(row0 + bufs.warp * COLS + bufs.lane * 8)
        ok = T.meta_var(col < n)  # K is a multiple of 8 (the caller checks)
        base = T.meta_var(ring(bufs.warp, stage) + bufs.lane * 8)
        for r in T.unroll(ROWS):
            row = T.meta_var(h * ROWS + r)
            T.ptx["cp.async.cg.shared.global"](
                T.address_of(bufs.RING[base + r * COLS]),
                T.address_of(bufs.W[T.min(row, bufs.N - 1), T.Select(ok, col, 0)]), 16,
                T.if_then_else(T.And(ok, row < bufs.N), T.uint32(16), T.uint32(0)))
        T.ptx["cp.async.cg.shared.global"](T.address_of(bufs.RING[base + ROWS * COLS]),
                                           T.address_of(bufs.X[T.Select(ok, col, 0)]), 16,
                                           T.if_then_else(ok, T.uint32(16), T.uint32(0)))

    @T.macro
    def compute(bufs, stage, b, h, row0, n):
        base = T.meta_var(ring(bufs.warp, stage) + bufs.lane * 8)
        for j in T.vectorized(8):
            bufs.xv[j] = bufs.RINGT[base + ROWS * COLS + j]
        for r in T.unroll(ROWS):
            for j in T.vectorized(8):
                bufs.wv[j] = bufs.RINGT[base + r * COLS + j]
            for j in T.unroll(8):
                bufs.acc[r] = bufs.acc[r] + T.Cast("float32", bufs.wv[j]) * T.Cast("float32", bufs.xv[j])

    @T.macro
    def combine(bufs):
        for r in T.unroll(ROWS):
            for o in T.unroll(5):
                bufs.acc[r] = bufs.acc[r] + T.tvm_warp_shuffle_xor(full, bufs.acc[r], 1 << o, 32, 32)
        if bufs.lane == 0:
            for r in T.unroll(ROWS):
                bufs.PART[bufs.warp * ROWS + r] = bufs.acc[r]
        T.tvm_storage_sync("shared")
        if bufs.tx < ROWS:
            bufs.state[0] = T.float32(0)
            for w in T.unroll(WARPS):
                bufs.state[0] = bufs.state[0] + bufs.PART[w * ROWS + bufs.tx]

    @T.macro
    def publish(bufs, slot):
        if bufs.tx < ROWS:
            bufs.WS[slot, bufs.tx] = bufs.state[0]

    @T.macro
    def merge_partials(bufs, top, n, valid):
        if bufs.tx < ROWS:
            for i in range(n):
                if valid[i] != 0:
                    bufs.state[0] = bufs.state[0] + bufs.WS[top - i, bufs.tx]

    @T.macro
    def write_output(bufs, b, h):
        if bufs.tx < ROWS and h * ROWS + bufs.tx < bufs.N:
            bufs.Y[h * ROWS + bufs.tx] = T.Cast(dt, bufs.state[0])

    @T.macro
    def write_empty(bufs, b):
        for k in range(T.truncdiv(bufs.N + NT - 1, NT)):
            if k * NT + bufs.tx < bufs.N:
                bufs.Y[k * NT + bufs.tx] = T.Cast(dt, T.float32(0))

    return streamk.GpuOperator(setup=setup, begin_tile=begin_tile, load=load, compute=compute, combine=combine,
                               publish=publish, merge_partials=merge_partials, write_output=write_output,
                               write_empty=write_empty)


RING_ELEMS = WARPS * STAGES * (ROWS + 1) * COLS  # per warp and stage: ROWS rows of W, then x


def gpu_gemv_body(spec: GemvSpec):
    """The persistent kernel's body macro, taking the parameters of ``sig.GEMV_PARAMS`` by name
    (this module's kernel and the stream-K rule's are ``sig.prim_func`` of it)."""
    dt = spec.dtype
    op = _gpu_operator(dt)
    cfg = StreamKConfig(block_size=COLS * WARPS, num_threads=32 * WARPS, stages=STAGES, max_batch=1)
    walk = streamk.gpu_walk(cfg)
    ring_elems = RING_ELEMS

    @T.macro
    def body(w, x, k_len, y, ws, flags, num_workers, num_splits, grid):
        N, K, WSN = T.int32(), T.int32(), T.int32()
        W = T.match_buffer(w, (N, K), dt)
        X = T.match_buffer(x, (K,), dt)
        KL = T.match_buffer(k_len, (1,), "int32")
        Y = T.match_buffer(y, (N,), dt)
        WS = T.match_buffer(ws, (WSN, ROWS), "float32")
        FLAGS = T.match_buffer(flags, (WSN,), "int32")
        bx = T.launch_thread("blockIdx.x", grid)
        tx = T.launch_thread("threadIdx.x", 32 * WARPS)
        ring = T.alloc_buffer((ring_elems,), "uint16", scope="shared.dyn")
        ring_t = T.decl_buffer((ring_elems,), dt, data=ring.data, scope="shared.dyn")
        part = T.alloc_buffer((WARPS * ROWS,), "float32", scope="shared")
        cum = T.alloc_buffer((2,), "int32", scope="shared")
        lens = T.alloc_buffer((1,), "int32", scope="shared")
        wsum = T.alloc_buffer((WARPS,), "int32", scope="shared")
        valid = T.alloc_buffer((32 * WARPS,), "int32", scope="shared")
        srch = T.alloc_buffer((2,), "int32", scope="local")
        qr = T.alloc_buffer((2,), "int32", scope="local")
        seen = T.alloc_buffer((1,), "int32", scope="local")
        acc = T.alloc_buffer((ROWS,), "float32", scope="local")
        state = T.alloc_buffer((1,), "float32", scope="local")
        xv = T.alloc_buffer((8,), dt, scope="local")
        wv = T.alloc_buffer((8,), dt, scope="local")
        lane, warp = T.meta_var(T.truncmod(tx, 32)), T.meta_var(T.truncdiv(tx, 32))
        ctx = T.meta_var(streamk.WalkContext(
            SL=KL, LENS=lens, B=1, H=T.truncdiv(N + ROWS - 1, ROWS), LMAX=K, CUM=cum, NW=num_workers,
            SPLITS=num_splits, srch=srch, QR=qr, FLAGS=FLAGS, seen=seen, WSUM=wsum, VALID=valid, tx=tx, lane=lane,
            warp=warp, bx=bx, grid=grid, TRACE=None))
        bufs = T.meta_var(SimpleNamespace(W=W, X=X, Y=Y, WS=WS, N=N, RING=ring, RINGT=ring_t, PART=part, acc=acc,
                                          state=state, xv=xv, wv=wv, tx=tx, lane=lane, warp=warp))
        walk(ctx, op, bufs)

    return body


def make_gpu_gemv(spec: GemvSpec):
    return sig.prim_func(spec.name, sig.GEMV_PARAMS, gpu_gemv_body(spec),
                         ["w", "x", "k_len", "y", "ws", "flags", "num_workers", "num_splits", "grid"],
                         {"tirx.noalias": True, "tirx.is_scheduled": True})

