"""The stream-K schedule primitive: a persistent walk over planned ranges of reduction blocks.

An operator whose output tiles each reduce over a run of blocks (decode attention: KV blocks of
one (sequence, KV head); a split-K GEMV: K blocks of a group of rows) hands this module a few
TIR macros (:class:`CpuOperator`, :class:`GpuOperator`) -- how to start a tile, load and fold one
block into its running state, merge partial states, publish and write a state -- and gets back
the whole persistent kernel structure:

* the device-side plan (``plan.py``'s arithmetic, evaluated from the lengths on the device, so a
  captured CUDA graph stays right when the lengths change in place);
* each worker's contiguous range, cut at tile boundaries, walked with its reducer piece last;
* on the GPU, one software pipeline (cp.async, ``stages`` deep, per warp) over the whole range,
  the tile switch inside the loop body so prefetch crosses tile boundaries;
* the cross-block reduction: contributors publish a partial and store-release a flag; the
  reducer acquires the flags of the lower workers in a fixed order, merges, resets the flags
  (graph-safe: no epoch from the host) and writes the tile's output.

The CPU form is the same walk with the worker index as a serial loop and no waits: the plan's
order rule makes worker ``v`` depend only on workers below ``v``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from tvm.script import tirx as T

from .plan import BLOCK_COST
from .spec import PROGRAMMATIC_MARK, TRACE_EVENTS, StreamKConfig

# Cursor layout (a local int32[5]): the block and the tile that holds it.
BLK, SEQ, HEAD, TSTART, TEND = range(5)
NO_FLAG, FLAG_SET = 0, 1
MAX_CONTRIBUTORS = 128  # partials the CPU reducer merges per round (GPU: one per thread)


@dataclasses.dataclass(frozen=True)
class CpuOperator:
    """The serial walk's view of an operator: TIR macros, each taking the operator's own buffer
    namespace ``bufs`` first. ``row0`` is a block's first row, ``n`` the tile's valid length."""

    begin_tile: Callable  # (bufs, b, h): reset the running state for tile (sequence b, tile h of it)
    step: Callable  # (bufs, b, h, row0, n): fold rows [row0, min(row0 + block, n)) into the state
    publish: Callable  # (bufs, slot): store the state as partial number ``slot``
    merge_partials: Callable  # (bufs, top, n, valid): fold partials top - i, i < n, valid[i] != 0, in i order
    write_output: Callable  # (bufs, b, h): finish the state and store tile (b, h)'s output
    write_empty: Callable  # (bufs, b): the output of sequence b when it has no rows


@dataclasses.dataclass(frozen=True)
class GpuOperator:
    """The persistent GPU walk's view of an operator (see :class:`CpuOperator` for the shared
    macros): each warp loads and folds its own slice of a block; ``combine`` turns the warps'
    states into the CTA's state at a piece's end, which ``publish``/``merge_partials``/
    ``write_output`` then use."""

    setup: Callable  # (bufs): per-CTA constants, once
    begin_tile: Callable
    load: Callable  # (bufs, stage, b, h, row0, n): issue the cp.async copies of a block into ``stage``
    compute: Callable  # (bufs, stage, b, h, row0, n): fold the block held in ``stage``
    combine: Callable  # (bufs): the warps' states -> the CTA's state
    publish: Callable
    merge_partials: Callable
    write_output: Callable
    write_empty: Callable
    # (bufs, b, h, row0, n): read ahead what ``load`` of that block needs (an address from memory)
    # while the current block computes; called for the next block after every load
    prefetch: Callable | None = None


@dataclasses.dataclass
class WalkContext:
    """What the walk reads and the scratch it owns (TIR buffers and expressions).

    Both forms: ``SL`` the lengths (indexable: a buffer or an object with ``__getitem__``), ``B``
    sequences, ``H`` tiles per sequence, ``LMAX`` rows in the cache (lengths are clamped to it),
    ``CUM`` int32[B + 1] (first block of each sequence's tiles), ``NW`` workers, ``SPLITS`` (0 =
    stream-K), ``QR`` int32[:func:`qr_len`] (divmod of the total cost by NW, then the tile cost in
    effect), ``srch`` int32[2] search scratch, ``FLAGS`` int32[workers].
    GPU form only: ``LENS`` shared int32[max batch] (clamped lengths: no global load sits before a
    K/V load), ``WSUM`` shared int32[warps], ``VALID`` shared int32[threads], ``seen`` local
    int32[1], the thread indices, ``grid`` (CTAs) and ``TRACE`` (uint64[grid, events] or None)."""

    SL: Any
    B: Any
    H: Any
    LMAX: Any
    CUM: Any
    NW: Any
    SPLITS: Any
    QR: Any
    srch: Any
    FLAGS: Any
    LENS: Any = None
    WSUM: Any = None
    VALID: Any = None
    seen: Any = None
    tx: Any = None
    lane: Any = None
    warp: Any = None
    bx: Any = None
    grid: Any = None
    TRACE: Any = None


def seq_len(ctx, b):
    """Valid rows of sequence b, clamped to the cache (a length past it reads nothing extra)."""
    return T.max(T.min(ctx.SL[b], ctx.LMAX), 0)


def blocks_of(ctx, b, block_size):
    return T.truncdiv(seq_len(ctx, b) + (block_size - 1), block_size)


def plan_macros(cfg: StreamKConfig):
    """Macros shared by both forms, over a :class:`WalkContext` ``ctx``. QR holds total cost // NW
    and % NW, and when ``cfg.tile_cost`` > 0 also QR[2], the tile cost in effect: 0 when every
    sequence has the same number of blocks (``plan.stream_k_edges``)."""

    tc = cfg.tile_cost

    def cost_start(ctx, b):
        """Where sequence b's tiles start on the cost line (``plan.stream_k_edges``)."""
        return ctx.CUM[b] * BLOCK_COST + b * (ctx.QR[2] * ctx.H)

    @T.macro
    def divide_among_workers(ctx, total):
        ctx.QR[0] = T.truncdiv(total, ctx.NW)
        ctx.QR[1] = T.truncmod(total, ctx.NW)

    @T.macro
    def split_total(ctx):
        """QR = divmod(total, NW) (total cost, with a tile cost in effect): then
        v * total // NW = v * q + v * r // NW in 32 bits."""
        if tc > 0:
            if ctx.QR[2] > 0:
                divide_among_workers(ctx, cost_start(ctx, ctx.B))
            else:
                divide_among_workers(ctx, ctx.CUM[ctx.B])
        else:
            divide_among_workers(ctx, ctx.CUM[ctx.B])

    @T.macro
    def to_block(ctx, out, k):
        """out[k]: a cut of the cost line -> the nearest block boundary of its tile, the tile's
        cost spread over its blocks (``plan.stream_k_edges``): a binary search for the cut's
        sequence, then its tile and the blocks done by then (64-bit: cut * blocks may not fit)."""
        ctx.srch[0] = 0
        ctx.srch[1] = ctx.B
        while ctx.srch[1] - ctx.srch[0] > 1:
            mid = T.meta_var(T.truncdiv(ctx.srch[0] + ctx.srch[1], 2))
            if cost_start(ctx, mid) <= out[k]:
                ctx.srch[0] = mid
            else:
                ctx.srch[1] = mid
        b = T.meta_var(ctx.srch[0])
        nb = T.meta_var(T.truncdiv(ctx.CUM[b + 1] - ctx.CUM[b], ctx.H))
        cost = T.meta_var(nb * BLOCK_COST + ctx.QR[2])
        rel = T.meta_var(out[k] - cost_start(ctx, b))
        head = T.meta_var(T.truncdiv(rel, cost))  # cost > 0: only called with a tile cost in effect
        done = T.meta_var(T.Cast("int32", T.truncdiv(
            T.Cast("int64", rel - head * cost) * T.Cast("int64", 2 * nb) + T.Cast("int64", cost),
            T.Cast("int64", 2 * cost))))
        out[k] = ctx.CUM[b] + head * nb + T.min(done, nb)

    @T.macro
    def worker_range(ctx, v, out):
        """out[0:2] = [lo, hi) of worker v: stream-K shares, or chunk v % S of tile v // S."""
        if ctx.SPLITS == 0:
            out[0] = v * ctx.QR[0] + T.truncdiv(v * ctx.QR[1], ctx.NW)
            out[1] = (v + 1) * ctx.QR[0] + T.truncdiv((v + 1) * ctx.QR[1], ctx.NW)
            if tc > 0:
                if ctx.QR[2] > 0:
                    to_block(ctx, out, 0)
                    to_block(ctx, out, 1)
        else:
            splits = T.meta_var(T.max(ctx.SPLITS, 1))  # the branches may become a select
            t = T.meta_var(T.truncdiv(v, splits))
            j = T.meta_var(T.truncmod(v, splits))
            b = T.meta_var(T.truncdiv(t, ctx.H))
            nb = T.meta_var(T.truncdiv(ctx.CUM[b + 1] - ctx.CUM[b], ctx.H))
            start = T.meta_var(ctx.CUM[b] + T.truncmod(t, ctx.H) * nb)
            out[0] = start + T.truncdiv(j * nb, splits)
            out[1] = start + T.truncdiv((j + 1) * nb, splits)

    @T.macro
    def locate(ctx, cur):
        """Fill cur[SEQ, HEAD, TSTART, TEND] for the block cur[BLK] (< total): a binary search
        for the last sequence whose first block is <= cur[BLK]."""
        ctx.srch[0] = 0
        ctx.srch[1] = ctx.B
        while ctx.srch[1] - ctx.srch[0] > 1:
            mid = T.meta_var(T.truncdiv(ctx.srch[0] + ctx.srch[1], 2))
            if ctx.CUM[mid] <= cur[BLK]:
                ctx.srch[0] = mid
            else:
                ctx.srch[1] = mid
        b = T.meta_var(ctx.srch[0])
        nb = T.meta_var(T.truncdiv(ctx.CUM[b + 1] - ctx.CUM[b], ctx.H))
        cur[SEQ] = b
        cur[HEAD] = T.truncdiv(cur[BLK] - ctx.CUM[b], nb)
        cur[TSTART] = ctx.CUM[b] + cur[HEAD] * nb
        cur[TEND] = cur[TSTART] + nb

    @T.macro
    def start_walk(ctx, v, rng, cur):
        """rng = [lo, hi, rot]: the walk is blocks [rot, hi) then [lo, rot), where rot skips
        a first piece that is a reducer piece (so it is done last). cur starts at rot."""
        worker_range(ctx, v, rng)
        rng[2] = rng[0]
        if rng[0] < rng[1]:
            cur[BLK] = rng[0]
            locate(ctx, cur)
            if cur[TSTART] < rng[0] and cur[TEND] < rng[1]:
                rng[2] = cur[TEND]
                cur[BLK] = rng[2]
                locate(ctx, cur)

    @T.macro
    def advance(ctx, rng, cur):
        cur[BLK] = cur[BLK] + 1
        if cur[BLK] == rng[1]:
            cur[BLK] = rng[0]
        if cur[BLK] < rng[1] and (cur[BLK] < cur[TSTART] or cur[BLK] >= cur[TEND]):
            locate(ctx, cur)

    return dict(
        worker_range=worker_range,
        locate=locate,
        start_walk=start_walk,
        advance=advance,
        split_total=split_total,
    )


def qr_len(cfg: StreamKConfig) -> int:
    """Length of the plan's local QR buffer the caller allocates (see :func:`plan_macros`)."""
    return 3 if cfg.tile_cost > 0 else 2


def piece_ends_at(rng, cur):
    """Is the block at cur[BLK] the last of its piece (its tile ends, or the range does)?"""
    return T.Or(cur[BLK] + 1 == cur[TEND], cur[BLK] + 1 == rng[1])


def row0_of(cur, block_size):
    return (cur[BLK] - cur[TSTART]) * block_size


def cpu_walk(cfg: StreamKConfig):
    """The serial form: plan, then workers 0, 1, ... in order; a reducer never waits."""
    pm = plan_macros(cfg)
    bs = cfg.block_size

    @T.macro
    def plan_setup(ctx):
        ctx.CUM[0] = 0
        if cfg.tile_cost > 0:
            ctx.QR[2] = 0
        for b in range(ctx.B):
            ctx.CUM[b + 1] = ctx.CUM[b] + blocks_of(ctx, b, bs) * ctx.H
            if cfg.tile_cost > 0:
                if blocks_of(ctx, b, bs) != blocks_of(ctx, 0, bs):
                    ctx.QR[2] = cfg.tile_cost
        pm["split_total"](ctx)

    @T.macro
    def reduce(ctx, op, bufs, v, tile_start, rng2, valid, count):
        """Workers v - 1, v - 2, ... while their range reaches into the tile: the contributors
        (the non-empty ones), merged in that order, MAX_CONTRIBUTORS per round."""
        rng2[2] = v - 1  # top of this round
        rng2[3] = 1  # another round?
        while rng2[3] == 1:
            rng2[3] = 0
            count[0] = 0
            for i in range(MAX_CONTRIBUTORS):
                valid[i] = 0
                if rng2[2] - i >= 0:
                    pm["worker_range"](ctx, rng2[2] - i, rng2)
                    if rng2[1] > tile_start:
                        count[0] = i + 1
                        valid[i] = T.if_then_else(rng2[0] < rng2[1], 1, 0)
                        if i == MAX_CONTRIBUTORS - 1:
                            rng2[3] = 1
            op.merge_partials(bufs, rng2[2], count[0], valid)
            rng2[2] = rng2[2] - MAX_CONTRIBUTORS

    @T.macro
    def walk(ctx, op, bufs):
        plan_setup(ctx)
        for b in range(ctx.B):
            if seq_len(ctx, b) == 0:
                op.write_empty(bufs, b)
        rng = T.alloc_buffer((3,), "int32")
        rng2 = T.alloc_buffer((4,), "int32")
        valid = T.alloc_buffer((MAX_CONTRIBUTORS,), "int32")
        count = T.alloc_buffer((1,), "int32")
        cur = T.alloc_buffer((5,), "int32")
        pstart = T.alloc_buffer((1,), "int32")
        for v in range(ctx.NW):
            pm["start_walk"](ctx, v, rng, cur)
            if rng[0] < rng[1]:
                pstart[0] = cur[BLK]
                op.begin_tile(bufs, cur[SEQ], cur[HEAD])
                for i in range(rng[1] - rng[0]):
                    op.step(bufs, cur[SEQ], cur[HEAD], row0_of(cur, bs), seq_len(ctx, cur[SEQ]))
                    if piece_ends_at(rng, cur):
                        if cur[BLK] + 1 < cur[TEND]:
                            op.publish(bufs, v)
                        else:
                            if pstart[0] > cur[TSTART]:
                                reduce(ctx, op, bufs, v, cur[TSTART], rng2, valid, count)
                            op.write_output(bufs, cur[SEQ], cur[HEAD])
                        pm["advance"](ctx, rng, cur)
                        pstart[0] = cur[BLK]
                        if i + 1 < rng[1] - rng[0]:
                            op.begin_tile(bufs, cur[SEQ], cur[HEAD])
                    else:
                        pm["advance"](ctx, rng, cur)

    return walk


GLOBALTIMER = """
__forceinline__ __device__ unsigned long long lean_globaltimer() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
  return t;
}
"""


# Programmatic dependent launch (Hopper): a kernel launched with the programmatic-serialization
# attribute (``build.programmatic_launch``) may start while the previous kernel of its stream still
# runs; it waits here, before its first global memory access, until that kernel has finished and
# its writes are visible (the lengths, q and K/V may be its outputs), then lets the next such
# kernel start early. Without the attribute both instructions are no-ops; below sm_90 they are
# compiled out. ``spec.PROGRAMMATIC_MARK`` is how the build finds the kernels that wait.
AFTER_PREVIOUS_GRID = """
__forceinline__ __device__ int lean_after_previous_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
  return 0;
}
"""


def gpu_walk(cfg: StreamKConfig):
    """The persistent GPU form: CTAs walk workers bx, bx + grid, ...; per warp a cp.async
    pipeline ``stages`` deep runs over the whole range, across tile boundaries."""
    pm = plan_macros(cfg)
    bs, nt, stages, nwarps = cfg.block_size, cfg.num_threads, cfg.stages, cfg.num_warps
    full_mask = T.uint32(0xFFFFFFFF)

    @T.macro
    def trace(ctx, event):
        if ctx.TRACE is not None:
            if ctx.tx == 0:
                ctx.TRACE[ctx.bx, TRACE_EVENTS.index(event)] = T.cuda.func_call(
                    "lean_globaltimer", source_code=GLOBALTIMER, return_type="uint64")

    @T.macro
    def plan_setup(ctx):
        """CUM by a parallel scan: a serial chunk per thread, warp shuffles, warp totals."""
        chunk = T.meta_var(T.truncdiv(ctx.B + (nt - 1), nt))
        scan = T.alloc_buffer((4 if cfg.tile_cost > 0 else 3,), "int32", scope="local")
        scan[0] = 0
        if cfg.tile_cost > 0:
            scan[3] = 1  # this thread's sequences have as many blocks as sequence 0
        for j in range(chunk):
            if ctx.tx * chunk + j < ctx.B:
                ctx.LENS[ctx.tx * chunk + j] = seq_len(ctx, ctx.tx * chunk + j)
                scan[0] = scan[0] + blocks_of(ctx, ctx.tx * chunk + j, bs)
                if cfg.tile_cost > 0:
                    if blocks_of(ctx, ctx.tx * chunk + j, bs) != blocks_of(ctx, 0, bs):
                        scan[3] = 0
        scan[1] = scan[0]
        for o in T.unroll(5):
            up = T.meta_var(T.tvm_warp_shuffle_up(full_mask, scan[1], 1 << o, 32, 32))
            scan[2] = up
            if ctx.lane >= (1 << o):
                scan[1] = scan[1] + scan[2]
        if ctx.lane == 31:
            ctx.WSUM[ctx.warp] = scan[1]
        if cfg.tile_cost > 0:
            ctx.QR[2] = T.Select(T.cuda.syncthreads_and(scan[3]) != 0, 0, cfg.tile_cost)
        else:
            T.tvm_storage_sync("shared")
        for w in T.unroll(nwarps):
            if w < ctx.warp:
                scan[1] = scan[1] + ctx.WSUM[w]
        scan[2] = scan[1] - scan[0]  # exclusive prefix of this thread's chunk
        for j in range(chunk):
            if ctx.tx * chunk + j < ctx.B:
                ctx.CUM[ctx.tx * chunk + j] = scan[2] * ctx.H
                scan[2] = scan[2] + blocks_of(ctx, ctx.tx * chunk + j, bs)
        if ctx.tx == nt - 1:
            ctx.CUM[ctx.B] = scan[1] * ctx.H
        T.tvm_storage_sync("shared")
        pm["split_total"](ctx)

    @T.macro
    def prefetch(ctx, op, bufs, ld):
        if op.prefetch is not None:
            op.prefetch(bufs, ld[SEQ], ld[HEAD], row0_of(ld, bs), ctx.LENS[ld[SEQ]])

    @T.macro
    def load_step(ctx, op, bufs, stage, rng, ld):
        """Issue the copies of block ld into ``stage``, move ld to the next block of the walk and
        let the operator read ahead what that one's load needs."""
        op.load(bufs, stage, ld[SEQ], ld[HEAD], row0_of(ld, bs), ctx.LENS[ld[SEQ]])
        pm["advance"](ctx, rng, ld)
        prefetch(ctx, op, bufs, ld)

    @T.macro
    def reduce(ctx, op, bufs, v, tile_start, rng2):
        """The reducer: thread i checks worker v - 1 - i, and if it is a contributor acquires its
        flag and resets it for the next launch; after one barrier every thread merges the
        partials. The workers reaching into the tile are a prefix of i, counted by warp ballots.
        Rounds of ``num_threads`` workers continue while the range reaches back further."""
        rng2[2] = v - 1  # top of this round
        rng2[3] = 1  # another round?
        while rng2[3] != 0:
            ctx.VALID[ctx.tx] = 0
            rng2[0] = 0
            rng2[1] = 0
            if rng2[2] - ctx.tx >= 0:
                pm["worker_range"](ctx, rng2[2] - ctx.tx, rng2)
                if rng2[1] > tile_start and rng2[0] < rng2[1]:
                    ctx.VALID[ctx.tx] = 1
                    T.cuda.wait_until(ctx.seen, T.address_of(ctx.FLAGS[rng2[2] - ctx.tx]),
                                      lambda x: x == FLAG_SET, backoff_ns=20)
                    ctx.FLAGS[rng2[2] - ctx.tx] = NO_FLAG
            in_tile = T.meta_var(T.And(rng2[2] - ctx.tx >= 0, rng2[1] > tile_start))
            ctx.seen[0] = T.popcount(T.cuda.ballot_sync(full_mask, in_tile))
            if ctx.lane == 0:
                ctx.WSUM[ctx.warp] = ctx.seen[0]
            rng2[3] = T.cuda.syncthreads_or(T.And(ctx.tx == nt - 1, in_tile))
            trace(ctx, "flags_acquired")
            rng2[0] = 0
            for w in T.unroll(nwarps):
                rng2[0] = rng2[0] + ctx.WSUM[w]
            op.merge_partials(bufs, rng2[2], rng2[0], ctx.VALID)
            trace(ctx, "merged")
            rng2[2] = rng2[2] - nt
            T.tvm_storage_sync("shared")

    @T.macro
    def finish_piece(ctx, op, bufs, v, cur, pstart, rng2):
        trace(ctx, "piece_end")
        op.combine(bufs)
        trace(ctx, "combined")
        if cur[BLK] + 1 < cur[TEND]:
            # Contributor: publish; after the barrier one release store (cumulative over the
            # CTA's writes ordered before it by the barrier) raises the flag.
            op.publish(bufs, v)
            T.tvm_storage_sync("shared")
            if ctx.tx == 0:
                T.ptx.st.release.gpu.global_.s32(T.address_of(ctx.FLAGS[v]), FLAG_SET)
            trace(ctx, "published")
        else:
            if pstart[0] > cur[TSTART]:
                reduce(ctx, op, bufs, v, cur[TSTART], rng2)
            op.write_output(bufs, cur[SEQ], cur[HEAD])
        T.tvm_storage_sync("shared")

    @T.macro
    def walk(ctx, op, bufs):
        T.evaluate(T.cuda.func_call(PROGRAMMATIC_MARK, source_code=AFTER_PREVIOUS_GRID, return_type="int32"))
        trace(ctx, "start")
        plan_setup(ctx)
        op.setup(bufs)
        trace(ctx, "planned")
        rng = T.alloc_buffer((3,), "int32", scope="local")
        rng2 = T.alloc_buffer((4,), "int32", scope="local")
        cur = T.alloc_buffer((5,), "int32", scope="local")
        ld = T.alloc_buffer((5,), "int32", scope="local")
        pstart = T.alloc_buffer((1,), "int32", scope="local")
        for k in range(T.truncdiv(ctx.NW - ctx.bx + ctx.grid - 1, ctx.grid)):
            v = T.meta_var(ctx.bx + k * ctx.grid)
            pm["start_walk"](ctx, v, rng, cur)
            if rng[0] < rng[1]:
                # The tile's query first: its loads must not queue behind the KV prefetch.
                pstart[0] = cur[BLK]
                op.begin_tile(bufs, cur[SEQ], cur[HEAD])
                trace(ctx, "tile_begun")
                for j in T.unroll(5):
                    ld[j] = cur[j]
                prefetch(ctx, op, bufs, ld)
                for s in T.unroll(stages - 1):
                    if s < rng[1] - rng[0]:
                        load_step(ctx, op, bufs, s, rng, ld)
                    T.ptx["cp.async.commit_group"]()
                trace(ctx, "prefetch_issued")
                for i in range(rng[1] - rng[0]):
                    if i + (stages - 1) < rng[1] - rng[0]:
                        load_step(ctx, op, bufs, T.truncmod(i + (stages - 1), stages), rng, ld)
                    T.ptx["cp.async.commit_group"]()
                    T.ptx["cp.async.wait_group"](stages - 1)
                    T.cuda.warp_sync()
                    op.compute(bufs, T.truncmod(i, stages), cur[SEQ], cur[HEAD], row0_of(cur, bs),
                               ctx.LENS[cur[SEQ]])
                    T.cuda.warp_sync()
                    if i == 0:
                        trace(ctx, "first_step_done")
                    if piece_ends_at(rng, cur):
                        finish_piece(ctx, op, bufs, v, cur, pstart, rng2)
                        pm["advance"](ctx, rng, cur)
                        pstart[0] = cur[BLK]
                        if i + 1 < rng[1] - rng[0]:
                            op.begin_tile(bufs, cur[SEQ], cur[HEAD])
                    else:
                        pm["advance"](ctx, rng, cur)

        # Empty sequences last: nothing waits on them, and their length test is not on the way
        # to the first K/V load.
        for k in range(T.truncdiv(ctx.B - ctx.bx + ctx.grid - 1, ctx.grid)):
            if ctx.LENS[ctx.bx + k * ctx.grid] == 0:
                op.write_empty(bufs, ctx.bx + k * ctx.grid)
        trace(ctx, "done")

    return walk


def __getattr__(name: str):
    """``lean_tvm.streamk.StreamK``: this primitive as a TVM schedule rule (``streamk_rule.py``).
    The rule's block bodies are the operators built on this module, so it lives a layer above and
    is looked up here on first use (PEP 562), never at import: no import circle."""
    if name == "StreamK":
        from .streamk_rule import StreamK

        return StreamK
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
