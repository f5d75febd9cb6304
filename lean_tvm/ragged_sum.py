"""Any plain-sum ragged reduction (``streamk_analysis.PlainSum``) as stream-K operators, read from
its TensorIR: the stream-K rule's body for a function nobody wrote macros for.

Tiles: the output's axis that indexes the lengths is the sequence ``b``; its last axis, when of
constant extent, runs inside a tile (``width`` outputs, e.g. the head dim); the other axes,
flattened, number the tiles of a sequence ``h``. Per tile the state is ``width`` partial sums in
the sum's dtype, the merge is ``+``, and the output is the function's own epilogue of the sum.

* CPU (``llvm``): the serial walk, one row at a time.
* CUDA: the persistent walk's per-warp cp.async pipeline caches each streamed operand's slice of
  a block (``rows_per_warp`` rows per warp, the ``width`` elements of each row) in shared memory,
  16-, 8- or 4-byte copies as the operand's strides allow (else plain loads); a warp's lanes split
  the slice into ``VEC``-wide runs of the output axis and rows, fold in registers, and reduce
  across lanes by shuffles and across warps through shared memory at a piece's end.
"""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

from tvm import ir, tirx
from tvm.script import tirx as T
from tvm.sym import Analyzer

from . import streamk
from .spec import StreamKConfig
from .streamk_analysis import Declined, PlainSum
from .tir_expr import dtype_of, loads_in, rewrite, same, uses_var

MAX_WIDTH = 512  # outputs a tile may hold: the last axis runs inside a tile up to this extent
WARPS, STAGES = 4, 4
STAGE_BYTES = 4096  # a warp's share of one pipeline stage; rows per warp follow from the row's bytes
MIN_ROWS, MAX_ROWS = 16, 256  # rows per warp per step
COPY_BYTES = (16, 8, 4)  # cp.async sizes, widest first
MAX_BATCH = 1024  # sequences the device plan holds in shared memory


@dataclasses.dataclass(frozen=True)
class Tiling:
    """How the sum's output axes map onto stream-K tiles (variables of the sum's block)."""

    seq: ir.Var | None  # indexes the lengths: the walk's sequence
    middle: tuple  # flattened (row-major) into the tile index within a sequence
    inner: ir.Var | None  # inside a tile
    width: int  # outputs per tile


def tiling(p: PlainSum) -> Tiling:
    spatial = list(p.block.spatial)
    seq = spatial[p.extent.position] if p.extent.position is not None else None
    inner = spatial[-1] if spatial and not (seq is not None and spatial[-1].same_as(seq)) else None
    ext = p.block.extent.get(inner)
    if not (isinstance(ext, tirx.IntImm) and ext.value <= MAX_WIDTH):
        inner = None
    middle = tuple(v for v in spatial if not any(v.same_as(u) for u in (seq, inner) if u is not None))
    return Tiling(seq, middle, inner, ext.value if inner is not None else 1)


def i32(e):
    return e if dtype_of(e) == "int32" else tirx.Cast("int32", e)


def as_type_of(var, e):
    if isinstance(e, int):
        return tirx.const(e, dtype_of(var))
    return e if dtype_of(e) == dtype_of(var) else tirx.Cast(dtype_of(var), e)


class SumAt:
    """The sum's expressions at tile (b, h), output i of the tile and row r (int32 walk values)."""

    def __init__(self, p: PlainSum, t: Tiling):
        self.p, self.t = p, t
        ext = p.block.extent
        self.B = i32(ext[t.seq]) if t.seq is not None else 1
        self.H = math.prod([i32(ext[v]) for v in t.middle]) if t.middle else 1
        self.rows = i32(p.extent.rows)

    def axes(self, b, h, i) -> dict:
        """The sum block's spatial variables at tile (b, h), output i."""
        t, ext = self.t, self.p.block.extent
        out = {} if t.seq is None else {t.seq: as_type_of(t.seq, b)}
        for k in range(len(t.middle) - 1, -1, -1):
            var = t.middle[k]
            out[var] = as_type_of(var, h if k == 0 else T.truncmod(h, i32(ext[var])))
            h = T.truncdiv(h, i32(ext[var]))
        if t.inner is not None:
            out[t.inner] = as_type_of(t.inner, i)
        return out

    def value(self, b, h, i, r, loads=None):
        return rewrite(self.p.value, {**self.axes(b, h, i), self.p.row: as_type_of(self.p.row, r)}, loads)

    def store(self, b, h, i, total):
        """Emit the output store of tile (b, h), output i, from the sum ``total``."""
        blk, epi, ax = self.p.block, self.p.epilogue, self.axes(b, h, i)
        if epi is None:
            T.buffer_store(blk.buffer, tirx.Cast(blk.buffer.dtype, total), [ax[v] for v in blk.spatial])
            return
        at = {e: ax[v] for e, v in zip(epi.spatial, blk.spatial, strict=True)}
        value = rewrite(epi.value, at, loads=lambda buf, idx: total if buf.same_as(blk.buffer) else None)
        T.buffer_store(epi.buffer, value, [at[v] for v in epi.spatial])

    def zero(self):
        return tirx.const(0, dtype_of(self.p.block.self_load()))

    @property
    def acc_dtype(self) -> str:
        return dtype_of(self.p.block.self_load())


class Lengths:
    """``SL[b]`` for the walk when the lengths are one entry (``lens[c]``) or absent (every row)."""

    def __init__(self, p: PlainSum, rows):
        self.lens, self.index, self.rows = p.extent.lens, p.extent.index, rows

    def __getitem__(self, b):
        return self.rows if self.lens is None else self.lens[self.index]


def walk_lengths(p: PlainSum, at: SumAt):
    return p.extent.lens if p.extent.position is not None else Lengths(p, at.rows)


# --------------------------------------------------------------------------------------------
# CPU
# --------------------------------------------------------------------------------------------


def cpu_operator(at: SumAt, block_size: int) -> streamk.CpuOperator:
    """``bufs``: acc (width partial sums), WS [workers, width]."""
    W = at.t.width

    @T.macro
    def begin_tile(bufs, b, h):
        for i in range(W):
            bufs.acc[i] = at.zero()

    @T.macro
    def step(bufs, b, h, row0, n):
        for r in range(T.min(block_size, n - row0)):
            for i in range(W):
                bufs.acc[i] = bufs.acc[i] + at.value(b, h, i, row0 + r)

    @T.macro
    def publish(bufs, slot):
        for i in range(W):
            bufs.WS[slot, i] = bufs.acc[i]

    @T.macro
    def merge_partials(bufs, top, n, valid):
        for j in range(n):
            if valid[j] != 0:
                for i in range(W):
                    bufs.acc[i] = bufs.acc[i] + bufs.WS[top - j, i]

    @T.macro
    def write_output(bufs, b, h):
        for i in range(W):
            at.store(b, h, i, bufs.acc[i])

    @T.macro
    def write_empty(bufs, b):
        for h in range(at.H):
            for i in range(W):
                at.store(b, h, i, at.zero())

    return streamk.CpuOperator(begin_tile=begin_tile, step=step, publish=publish, merge_partials=merge_partials,
                               write_output=write_output, write_empty=write_empty)


def cpu_body(at: SumAt, block_size: int):
    """Body macro over (ws, flags, num_workers, num_splits); the function's own buffers are read directly."""
    op, cfg = cpu_operator(at, block_size), StreamKConfig(block_size=block_size)
    walk = streamk.cpu_walk(cfg)
    p = at.p

    @T.macro
    def body(ws, flags, num_workers, num_splits):
        WSN = T.int64()
        WS = T.match_buffer(ws, (WSN, at.t.width), at.acc_dtype)
        FLAGS = T.match_buffer(flags, (WSN,), "int32")
        cum = T.alloc_buffer((at.B + 1,), "int32")
        srch = T.alloc_buffer((2,), "int32")
        qr = T.alloc_buffer((streamk.qr_len(cfg),), "int32")
        acc = T.alloc_buffer((at.t.width,), at.acc_dtype)
        ctx = T.meta_var(streamk.WalkContext(SL=walk_lengths(p, at), B=at.B, H=at.H, LMAX=at.rows, CUM=cum,
                                             NW=num_workers, SPLITS=num_splits, srch=srch, QR=qr, FLAGS=FLAGS))
        walk(ctx, op, SimpleNamespace(WS=WS, acc=acc))

    return body


# --------------------------------------------------------------------------------------------
# CUDA
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Streamed:
    """An operand read at the reduction's row: its slice of a block goes through shared memory.
    Element (row r, output e) of tile (b, h) is ``buffer[index(b, h, r, e)]``; ``elems`` per row
    (the tile's width when the operand has the output axis, else 1); ``copy``: the cp.async size
    in bytes, 0 for plain loads; ``run``: the rows are contiguous (one run per warp slice)."""

    buffer: ir.Var
    load: ir.Expr  # the load as the sum's value writes it
    elems: int
    copy: int
    run: bool

    @property
    def esize(self) -> int:
        return self.buffer.dtype.bits // 8


def strides_of(buf) -> list:
    if buf.strides:
        return list(buf.strides)
    shape, out = list(buf.shape), []
    for k in range(len(shape)):
        out.append(math.prod(shape[k + 1:]) if k + 1 < len(shape) else tirx.const(1, dtype_of(shape[k])))
    return out


def divisible(e, k: int) -> bool:
    return Analyzer().can_prove(tirx.floormod(e, tirx.const(k, dtype_of(e))) == 0)


def is_one(e) -> bool:
    return Analyzer().can_prove(e == 1)


def streamed_operands(p: PlainSum, t: Tiling, rows_per_warp: int) -> list[Streamed] | Declined:
    found = []
    for ld in loads_in(p.value):
        if not any(uses_var(i, p.row) for i in ld.indices):
            continue
        if any(x.buffer.same_as(ld.source) for x in found):
            if not any(same(x.load, ld) for x in found):
                return Declined(f"cuda: {ld.source.name} is read at two different rows")
            continue
        idx, strides = list(ld.indices), strides_of(ld.source)
        pos = [k for k, i in enumerate(idx) if uses_var(i, p.row)]
        if len(pos) != 1 or not idx[pos[0]].same_as(p.row):
            return Declined(f"cuda: {ld} is not indexed by the row itself in one place")
        has_inner = t.inner is not None and any(uses_var(i, t.inner) for i in idx)
        if has_inner and (not idx[-1].same_as(t.inner) or any(uses_var(i, t.inner) for i in idx[:-1])
                          or not is_one(strides[-1])):
            return Declined(f"cuda: {ld} does not read the output axis as its last, contiguous index")
        elems = t.width if has_inner else 1
        row_stride = strides[pos[0]]
        others = [s for k, s in enumerate(strides) if k != pos[0] and not (has_inner and k == len(idx) - 1)]
        run = not has_inner and is_one(row_stride)
        esize = ld.source.dtype.bits // 8
        copy = 0
        for c in COPY_BYTES:
            span = rows_per_warp * esize if run else elems * esize
            step = rows_per_warp * row_stride * esize if run else row_stride * esize
            if span % c == 0 and divisible(step, c) and all(divisible(s * esize, c) for s in others):
                copy = c
                break
        found.append(Streamed(ld.source, ld, elems, copy, run))
    return found


@dataclasses.dataclass(frozen=True)
class Lanes:
    """A warp's lanes over a slice: ``LI`` lanes along the output axis, each ``VEC`` wide and
    ``KI`` times, ``LR`` lanes along the rows."""

    VEC: int
    LI: int
    LR: int
    KI: int


def lanes_for(width: int, operands: list[Streamed]) -> Lanes:
    widest = max([x.esize for x in operands if x.elems > 1], default=4)
    vec = next(v for v in (8, 4, 2, 1) if width % v == 0 and v * widest <= 16)
    li = 1
    while li * 2 <= min(32, width // vec):
        li *= 2
    return Lanes(vec, li, 32 // li, -(-width // (li * vec)))


def rows_per_warp_for(t: Tiling, p: PlainSum) -> int:
    row_bytes = sum(ld.source.dtype.bits // 8 * (t.width if t.inner is not None and any(
        uses_var(i, t.inner) for i in ld.indices) else 1) for ld in loads_in(p.value) if any(
        uses_var(i, p.row) for i in ld.indices)) or 4
    rows = 1 << round(math.log2(max(STAGE_BYTES / row_bytes, 1)))
    return max(MIN_ROWS, min(MAX_ROWS, rows))


def in_order(macros: list):
    """One macro ``(bufs, a)`` running each of ``macros`` (same signature) in turn: TVMScript has
    no Python-level loop, and the operands are a Python list."""
    head = macros[0]
    if len(macros) == 1:
        return head
    tail = in_order(macros[1:])

    @T.macro
    def both(bufs, a):
        head(bufs, a)
        tail(bufs, a)

    return both


def ring_slot(bufs, x: Streamed, stage, RW: int):
    """First element of this warp's ``stage`` in operand ``x``'s ring."""
    return (bufs.warp * STAGES + stage) * RW * x.elems


def operand_macros(at: SumAt, k: int, x: Streamed, RW: int, VEC: int):
    """(load, fetch) of operand ``k``: copy this warp's rows of a block into its ring (``a``: stage,
    b, h, first: the slice's first row; ``bufs.load_left``: its rows that hold data); copy the
    lane's VEC-wide run of a row from the ring to registers (``a``: stage, row, i0). Rows past the
    data are zero-filled (src-size 0) from row 0 of the tile, an address that is always valid;
    addresses by arithmetic, not a branch per copy."""

    def at_row(b, h, r, e):
        return rewrite(x.load, {**at.axes(b, h, e), at.p.row: as_type_of(at.p.row, r)})

    ce = max(x.copy // x.esize, 1)
    per_row = max(x.elems // ce, 1)

    @T.macro
    def load(bufs, a):
        base = T.meta_var(ring_slot(bufs, x, a.stage, RW))
        left = T.meta_var(bufs.load_left[0])
        if x.copy == 0:  # plain loads: the operand's strides allow no 4-byte copy
            for u in T.unroll(-(-RW * x.elems // 32)):
                if u * 32 + bufs.lane < RW * x.elems:
                    rr = T.meta_var(T.truncdiv(u * 32 + bufs.lane, x.elems))
                    bufs.RING[k][base + u * 32 + bufs.lane] = T.if_then_else(
                        rr < left, at_row(a.b, a.h, a.first + rr, T.truncmod(u * 32 + bufs.lane, x.elems)),
                        tirx.const(0, x.buffer.dtype))
        elif x.run:  # rows contiguous: chunks of ce rows, a partial last one zero-filled by src-size
            for u in T.unroll(-(-RW // ce // 32)):
                if (u * 32 + bufs.lane) * ce < RW:
                    rr = T.meta_var((u * 32 + bufs.lane) * ce)
                    T.ptx["cp.async.ca.shared.global"](
                        T.address_of(bufs.RING[k][base + rr]),
                        T.address_of(at_row(a.b, a.h, T.Cast("int32", rr < left) * (a.first + rr), 0)), x.copy,
                        T.Cast("uint32", T.max(T.min(left - rr, ce), 0) * x.esize))
        else:  # per row: chunks of ce outputs
            for u in T.unroll(-(-RW * per_row // 32)):
                if u * 32 + bufs.lane < RW * per_row:
                    rr = T.meta_var(T.truncdiv(u * 32 + bufs.lane, per_row))
                    e = T.meta_var(T.truncmod(u * 32 + bufs.lane, per_row) * ce)
                    T.ptx["cp.async.cg.shared.global" if x.copy == 16 else "cp.async.ca.shared.global"](
                        T.address_of(bufs.RING[k][base + rr * x.elems + e]),
                        T.address_of(at_row(a.b, a.h, T.Cast("int32", rr < left) * (a.first + rr), e)), x.copy,
                        T.Select(rr < left, T.uint32(x.copy), T.uint32(0)))

    @T.macro
    def fetch(bufs, a):
        if x.elems > 1:
            for v in T.vectorized(VEC):
                bufs.RUN[k][v] = bufs.RING[k][ring_slot(bufs, x, a.stage, RW) + a.row * x.elems + a.i0 + v]

    return load, fetch


def gpu_operator(at: SumAt, operands: list[Streamed], lanes: Lanes, RW: int) -> streamk.GpuOperator:
    """``bufs``: RING[k] (operand k's stages), RUN[k] (a lane's VEC-wide run of it), acc (the
    lane's KI * VEC sums), state (the CTA's: outputs tx, tx + NT, ...), PART (the warps' sums), WS."""
    W, NT = at.t.width, 32 * WARPS
    VEC, LI, LR, KI = lanes.VEC, lanes.LI, lanes.LR, lanes.KI
    SJ = -(-W // NT)
    full = T.uint32(0xFFFFFFFF)
    loads, fetches = zip(*(operand_macros(at, k, x, RW, VEC) for k, x in enumerate(operands)), strict=True)
    load_all, fetch_all = in_order(list(loads)), in_order(list(fetches))

    def from_ring(bufs, stage, row, v):
        """The sum's loads of streamed operands: this lane's run, or the ring (one per row)."""

        def load(buf, idx):
            for k, x in enumerate(operands):
                if buf.same_as(x.buffer):
                    return bufs.RUN[k][v] if x.elems > 1 else bufs.RING[k][ring_slot(bufs, x, stage, RW) + row]
            return None

        return load

    @T.macro
    def setup(bufs):
        pass

    @T.macro
    def begin_tile(bufs, b, h):
        for j in T.unroll(KI * VEC):
            bufs.acc[j] = at.zero()

    @T.macro
    def load(bufs, stage, b, h, row0, n):
        # In a register: n may live in shared memory, and every cp.async (an asm with a memory
        # clobber) would make nvcc load it again.
        bufs.load_left[0] = n - row0 - bufs.warp * RW
        load_all(bufs, SimpleNamespace(stage=stage, b=b, h=h, first=row0 + bufs.warp * RW))

    @T.macro
    def compute(bufs, stage, b, h, row0, n):
        li, lr = T.meta_var(T.truncmod(bufs.lane, LI)), T.meta_var(T.truncdiv(bufs.lane, LI))
        bufs.fold_left[0] = n - row0 - bufs.warp * RW
        for rr in range(RW // LR):
            row = T.meta_var(rr * LR + lr)
            if row < bufs.fold_left[0]:  # one test per row: the value of a zero-filled row need not be 0
                for kk in T.unroll(KI):
                    i0 = T.meta_var((kk * LI + li) * VEC)
                    if i0 < W:
                        fetch_all(bufs, SimpleNamespace(stage=stage, row=row, i0=i0))
                        for v in T.unroll(VEC):
                            bufs.acc[kk * VEC + v] = bufs.acc[kk * VEC + v] + at.value(
                                b, h, i0 + v, row0 + bufs.warp * RW + row, from_ring(bufs, stage, row, v))

    @T.macro
    def combine(bufs):
        for j in T.unroll(KI * VEC):
            for o in T.unroll(int(math.log2(LR))):
                bufs.acc[j] = bufs.acc[j] + T.tvm_warp_shuffle_xor(full, bufs.acc[j], LI << o, 32, 32)
        if bufs.lane < LI:
            for kk in T.unroll(KI):
                for v in T.unroll(VEC):
                    if (kk * LI + bufs.lane) * VEC + v < W:
                        bufs.PART[bufs.warp * W + (kk * LI + bufs.lane) * VEC + v] = bufs.acc[kk * VEC + v]
        T.tvm_storage_sync("shared")
        for j in T.unroll(SJ):
            if j * NT + bufs.tx < W:
                bufs.state[j] = at.zero()
                for w in T.unroll(WARPS):
                    bufs.state[j] = bufs.state[j] + bufs.PART[w * W + j * NT + bufs.tx]

    @T.macro
    def publish(bufs, slot):
        for j in T.unroll(SJ):
            if j * NT + bufs.tx < W:
                bufs.WS[slot, j * NT + bufs.tx] = bufs.state[j]

    @T.macro
    def merge_partials(bufs, top, n, valid):
        for j in T.unroll(SJ):
            if j * NT + bufs.tx < W:
                for q in range(n):
                    if valid[q] != 0:
                        bufs.state[j] = bufs.state[j] + bufs.WS[top - q, j * NT + bufs.tx]

    @T.macro
    def write_output(bufs, b, h):
        for j in T.unroll(SJ):
            if j * NT + bufs.tx < W:
                at.store(b, h, j * NT + bufs.tx, bufs.state[j])

    @T.macro
    def write_empty(bufs, b):
        for k in range(T.truncdiv(at.H * W + NT - 1, NT)):
            if k * NT + bufs.tx < at.H * W:
                at.store(b, T.truncdiv(k * NT + bufs.tx, W), T.truncmod(k * NT + bufs.tx, W), at.zero())

    return streamk.GpuOperator(setup=setup, begin_tile=begin_tile, load=load, compute=compute, combine=combine,
                               publish=publish, merge_partials=merge_partials, write_output=write_output,
                               write_empty=write_empty)


@dataclasses.dataclass(frozen=True)
class GpuPlan:
    """The CUDA form's numbers, read from the function (``describe`` puts them in the kernel's attrs)."""

    rows_per_warp: int
    lanes: Lanes
    operands: tuple
    max_batch: int

    @property
    def block_size(self) -> int:
        return self.rows_per_warp * WARPS

    def ring_bytes(self) -> int:
        return sum(WARPS * STAGES * self.rows_per_warp * x.elems * x.esize for x in self.operands)


def gpu_plan(at: SumAt) -> GpuPlan | Declined:
    rw = rows_per_warp_for(at.t, at.p)
    operands = streamed_operands(at.p, at.t, rw)
    if isinstance(operands, Declined):
        return operands
    if not operands:
        return Declined("cuda: no operand is read at the reduction's row")
    return GpuPlan(rw, lanes_for(at.t.width, operands), tuple(operands), MAX_BATCH if at.t.seq is not None else 1)


def alloc_each(operands: list[Streamed], shape, scope: str) -> list:
    """One buffer of each operand's dtype (``shape(operand)``), allocated where this is called."""
    return [T.alloc_buffer(shape(x), x.buffer.dtype, scope=scope) for x in operands]


def gpu_body(at: SumAt, plan: GpuPlan):
    """Body macro over (ws, flags, num_workers, num_splits, grid); the function's own buffers are read directly."""
    RW, NT, W = plan.rows_per_warp, 32 * WARPS, at.t.width
    operands = list(plan.operands)
    op = gpu_operator(at, operands, plan.lanes, RW)
    cfg = StreamKConfig(block_size=plan.block_size, num_threads=NT, stages=STAGES, max_batch=plan.max_batch)
    walk = streamk.gpu_walk(cfg)
    p = at.p

    @T.macro
    def body(ws, flags, num_workers, num_splits, grid):
        WSN = T.int64()
        WS = T.match_buffer(ws, (WSN, W), at.acc_dtype)
        FLAGS = T.match_buffer(flags, (WSN,), "int32")
        bx = T.launch_thread("blockIdx.x", grid)
        tx = T.launch_thread("threadIdx.x", NT)
        rings = T.meta_var(alloc_each(operands, lambda x: (WARPS * STAGES * RW * x.elems,), "shared.dyn"))
        runs = T.meta_var(alloc_each(operands, lambda x: (plan.lanes.VEC,), "local"))
        part = T.alloc_buffer((WARPS * W,), at.acc_dtype, scope="shared")
        cum = T.alloc_buffer((cfg.max_batch + 1,), "int32", scope="shared")
        lens = T.alloc_buffer((cfg.max_batch,), "int32", scope="shared")
        wsum = T.alloc_buffer((WARPS,), "int32", scope="shared")
        valid = T.alloc_buffer((NT,), "int32", scope="shared")
        srch = T.alloc_buffer((2,), "int32", scope="local")
        qr = T.alloc_buffer((streamk.qr_len(cfg),), "int32", scope="local")
        seen = T.alloc_buffer((1,), "int32", scope="local")
        acc = T.alloc_buffer((plan.lanes.KI * plan.lanes.VEC,), at.acc_dtype, scope="local")
        state = T.alloc_buffer((-(-W // NT),), at.acc_dtype, scope="local")
        load_left = T.alloc_buffer((1,), "int32", scope="local")  # rows of the warp's slice that hold data
        fold_left = T.alloc_buffer((1,), "int32", scope="local")  # ... of the block being folded
        lane, warp = T.meta_var(T.truncmod(tx, 32)), T.meta_var(T.truncdiv(tx, 32))
        ctx = T.meta_var(streamk.WalkContext(
            SL=walk_lengths(p, at), LENS=lens, B=at.B, H=at.H, LMAX=at.rows, CUM=cum, NW=num_workers,
            SPLITS=num_splits, srch=srch, QR=qr, FLAGS=FLAGS, seen=seen, WSUM=wsum, VALID=valid, tx=tx, lane=lane,
            warp=warp, bx=bx, grid=grid, TRACE=None))
        walk(ctx, op, SimpleNamespace(RING=rings, RUN=runs, PART=part, acc=acc, state=state, WS=WS, tx=tx,
                                      lane=lane, warp=warp, load_left=load_left, fold_left=fold_left))

    return body


def workspace(at: SumAt) -> list[dict]:
    """The kernel's stream-K buffers (in parameter order), for whoever allocates them."""
    return [{"dtype": at.acc_dtype, "shape": ["num_workers", at.t.width], "init": "any"},
            {"dtype": "int32", "shape": ["num_workers"], "init": "zero"}]


def kernel_body(p: PlainSum, target_kind: str, cpu_block_size: int = 64):
    """(body macro over (ws, flags, num_workers, num_splits[, grid]), facts for the kernel's attrs)
    of the sum for ``"llvm"`` or ``"cuda"``, or :class:`Declined`. The body reads the function's
    own buffers and scalars directly: the kernel keeps them as its parameters."""
    at = SumAt(p, tiling(p))
    info = {"tile_width": at.t.width, "workspace": workspace(at)}
    if target_kind != "cuda":
        return cpu_body(at, cpu_block_size), {**info, "block_size": cpu_block_size}
    plan = gpu_plan(at)
    if isinstance(plan, Declined):
        return plan
    return gpu_body(at, plan), {**info, "block_size": plan.block_size, "max_batch": plan.max_batch,
                                "dynamic_smem_bytes": plan.ring_bytes(), "threads": 32 * WARPS}
