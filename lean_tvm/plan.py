"""Partitions of the decode-attention KV walk: stream-K (LeanAttention), fixed split, no split.

All three are one arithmetic, which the kernels evaluate on the device from ``seq_lens`` (so a
CUDA graph replays correctly after the lengths change) and which this module evaluates in plain
Python as the oracle for tests and the picture for users.

Output tiles are ``t = b * num_kv_heads + h``; tile ``t`` has ``ceil(seq_lens[b] / block_size)``
KV blocks. All tiles' blocks are laid end to end in tile order ("the block space"). A *worker*
(a CTA, or one of the items a persistent CTA walks) owns the contiguous range ``[lo, hi)``:

* stream-K (``num_splits == 0``): ``num_workers = num_ctas`` and
  ``lo(w) = w * total // num_workers`` -- equal shares to within one block; with a
  ``tile_cost`` (the fixed work of starting and finishing a tile, in 1/BLOCK_COST blocks) the
  shares are equal in *cost*: a tile costs ``BLOCK_COST * blocks + tile_cost``, the cost line is
  cut evenly, and a cut maps to the nearest block boundary (:func:`stream_k_edges`) -- so a
  worker walking many short tiles gets fewer blocks than one inside a long tile;
* fixed split (``num_splits = S``): worker ``w`` is chunk ``w % S`` of tile ``w // S``, i.e.
  ``lo = start_t + j * nb_t // S``; "no split" is ``S = 1`` (FlashAttention-2 style).

A range is cut at tile boundaries into *pieces*. The worker holding a tile's last block is its
*reducer*; every other worker overlapping the tile is a *contributor* with a lower index, which
publishes one partial state (a worker publishes at most one: only its last piece can stop short
of a tile's end). A worker walks its range starting after its first piece when that piece is a
reducer piece and does it last, so it publishes before it waits and, run in index order, never
waits on a later worker: the CPU form runs workers one after another, the GPU form hardly waits.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Sequence
from enum import Enum

import numpy as np

STREAM_K = 0  # the ``num_splits`` value that selects the stream-K partition
BLOCK_COST = 4  # a block's cost in the stream-K cost line; ``tile_cost`` is in these units


# Worker-count policy (device-independent: the caller passes the resident CTA count).
MIN_WORKERS = 8
MAX_SPLIT = 64
SPLIT_SCALE = 3.0
SPLIT_SNAP = 1.5  # a split may move by up to this factor to divide the tile's blocks evenly
ALIGN_MIN_FRACTION = 0.9
# Launches of at least this many tiles take the batch variant (schedule_records.py): H200 tuner
# (interleaved): 2 CTAs/SM 2-13% faster at B32 L2k, B128 L1k and a 2x32k+30x512 batch (256+ tiles),
# 3% slower at B16 L4k (128 tiles) and 6-13% slower on one sequence.
BATCH_VARIANT_TILES = 256


def stream_k_workers(tiles: int, blocks_per_tile: int, resident: int) -> int:
    """Stream-K workers for ``tiles`` tiles of at most ``blocks_per_tile`` blocks (from the cache's
    length: a shape-only choice, graph-safe). At most one block per worker, and a tile split about
    3 sqrt(blocks) ways (<= 64): its reducer merges the contributors, so a short or lone tile split
    over every SM spends more merging than streaming. The split moves to the nearest divisor of the
    blocks (within 1.5x, :func:`even_split`) so that every chunk is the same length. Two H200 sweeps
    of the worker count (``python -m lean_tvm.bench.workers``, ``results/h200/workers``): the rule's
    count is within 1% of the fastest on 8-9 of 11 shapes and within 6% on all (B8 8/1 L2k: 128
    workers, 12.7 us vs 12.0 at 64), and never more than 0.5% slower than the H100 rule's (3
    sqrt(blocks) without rounding), which was up to 10% off the fastest (12 workers at 16 blocks,
    34 at 128, 96 at B8 8/1 L2k)."""
    split = min(MAX_SPLIT, math.ceil(SPLIT_SCALE * math.sqrt(blocks_per_tile)))
    if split < MAX_SPLIT:
        split = even_split(blocks_per_tile, split)
    workers = max(1, min(resident, max(MIN_WORKERS, tiles * blocks_per_tile), tiles * split))
    return aligned_workers(tiles, resident) if workers == resident else workers


def even_split(blocks: int, split: int) -> int:
    """The divisor of ``blocks`` nearest ``split`` (by ratio; the larger on a tie) within a factor
    SPLIT_SNAP and at most MAX_SPLIT, else ``split``."""
    lo, hi = max(1, math.ceil(split / SPLIT_SNAP)), min(MAX_SPLIT, int(split * SPLIT_SNAP))
    near = [k for k in range(lo, hi + 1) if blocks % k == 0]
    return min(near, key=lambda k: (abs(math.log(k / split)), -k)) if near else split


def aligned_workers(tiles: int, resident: int) -> int:
    """The largest count >= 90% of ``resident`` that is a multiple or a divisor of ``tiles``
    (else ``resident``): with equal lengths every worker then holds whole tiles or equal parts of
    one, so fewer tiles are cut and merged. H100, 128 vs 132 workers: B1 32/8 L16k 31.4 vs 33.1 us,
    B8 L4k 52.2 vs 54.3, B32 L2k 94.8 vs 98.5, B16 L16k 352 vs 356; ragged batches gain nothing
    (1x128k + 15x2k: 231 vs 230; 64/8 2x64k + 30x512: 243-261 vs 238)."""
    if tiles <= 0:
        return resident
    for w in range(resident, max(int(resident * ALIGN_MIN_FRACTION), 1) - 1, -1):
        if w % tiles == 0 or tiles % w == 0:
            return w
    return resident


class PieceKind(Enum):
    FULL = "full"  # the whole tile: normalise and write the output directly
    CONTRIBUTOR = "contributor"  # stops before the tile's end: publish a partial state
    REDUCER = "reducer"  # holds the tile's last block: merge the contributors, write output


@dataclasses.dataclass(frozen=True)
class Piece:
    """A worker's share of one output tile: blocks ``[begin, end)`` of the block space."""

    tile: int
    begin: int
    end: int
    kind: PieceKind


@dataclasses.dataclass(frozen=True)
class Plan:
    """A partition of every tile's KV blocks over workers.

    ``pieces[w]`` lists worker ``w``'s pieces in walk order; ``contributors[t]`` lists, for a
    tile split across workers, the workers whose partials its reducer merges (in merge order).
    """

    name: str
    seq_lens: tuple[int, ...]
    num_kv_heads: int
    block_size: int
    num_workers: int
    tile_start: np.ndarray  # [num_tiles + 1] exclusive prefix of blocks per tile
    ranges: np.ndarray  # [num_workers, 2] (lo, hi) in the block space
    pieces: tuple[tuple[Piece, ...], ...]
    reducer: dict[int, int]  # tile -> worker that finishes it (split tiles only)
    contributors: dict[int, tuple[int, ...]]

    @property
    def num_tiles(self) -> int:
        return len(self.tile_start) - 1

    @property
    def total_blocks(self) -> int:
        return int(self.tile_start[-1])

    def blocks_per_worker(self) -> np.ndarray:
        return self.ranges[:, 1] - self.ranges[:, 0]

    def splits_per_tile(self) -> np.ndarray:
        """How many workers share each tile (0 for an empty tile)."""
        counts = np.zeros(self.num_tiles, dtype=np.int64)
        for worker_pieces in self.pieces:
            for piece in worker_pieces:
                counts[piece.tile] += 1
        return counts

    def num_partials(self) -> int:
        return sum(len(c) for c in self.contributors.values())

    def workspace_bytes(self, group_size: int, head_dim: int) -> int:
        """fp32 partial output + (max, sum) per worker slot, and one int32 flag per worker."""
        return self.num_workers * (group_size * head_dim * 4 + 2 * group_size * 4 + 4)


def blocks_per_sequence(seq_lens: Sequence[int], block_size: int) -> np.ndarray:
    lens = np.asarray(seq_lens, dtype=np.int64)
    if lens.ndim != 1:
        raise ValueError(f"seq_lens: expected a 1-D sequence, got shape {lens.shape}")
    if (lens < 0).any():
        raise ValueError(f"seq_lens: expected lengths >= 0, got {lens.min()}")
    if block_size <= 0:
        raise ValueError(f"block_size: expected > 0, got {block_size}")
    return (lens + block_size - 1) // block_size


def tile_starts(seq_lens: Sequence[int], num_kv_heads: int, block_size: int) -> np.ndarray:
    """Exclusive prefix sum of blocks over tiles ``b * num_kv_heads + h`` (length tiles + 1)."""
    nb = np.repeat(blocks_per_sequence(seq_lens, block_size), num_kv_heads)
    return np.concatenate([[0], np.cumsum(nb)]).astype(np.int64)


def stream_k_edges(tile_start: np.ndarray, num_workers: int, tile_cost: int = 0) -> np.ndarray:
    """The ``num_workers + 1`` block boundaries of the stream-K shares: the cost line (a tile of
    n blocks costs ``BLOCK_COST * n + tile_cost``) cut evenly, each cut moved to the nearest block
    boundary of its tile with the tile's cost spread evenly over its blocks: a worker walking many
    short tiles gets fewer blocks. When every tile has the same number of blocks the tile cost is
    not applied (the plain even split of the blocks, as with ``tile_cost = 0``): the workers then
    hold about as many pieces each, and the kernel skips the cost arithmetic."""
    if tile_cost < 0:
        raise ValueError(f"tile_cost: expected >= 0, got {tile_cost}")
    cuts = np.arange(num_workers + 1, dtype=np.int64)
    if tile_cost == 0 or len(set(np.diff(tile_start).tolist())) <= 1:  # equal tiles: the plain split
        return cuts * int(tile_start[-1]) // num_workers
    tiles = np.arange(len(tile_start), dtype=np.int64)
    cost_start = BLOCK_COST * tile_start + tile_cost * tiles  # [tiles + 1]
    cuts = cuts * int(cost_start[-1]) // num_workers
    t = np.clip(np.searchsorted(cost_start[:-1], cuts, side="right") - 1, 0, None)
    nb = np.diff(tile_start)[t]
    cost = BLOCK_COST * nb + tile_cost
    done = (2 * (cuts - cost_start[t]) * nb + cost) // (2 * cost)  # rounded to the nearest block
    return tile_start[t] + np.clip(done, 0, nb)


def worker_ranges(tile_start: np.ndarray, num_workers: int, num_splits: int, tile_cost: int = 0) -> np.ndarray:
    """``[num_workers, 2]`` block ranges: the formulas the device plan evaluates too."""
    if num_splits == STREAM_K:
        edges = stream_k_edges(tile_start, num_workers, tile_cost)
        return np.stack([edges[:-1], edges[1:]], axis=1)
    start, nb = tile_start[:-1], np.diff(tile_start)
    j = np.arange(num_splits, dtype=np.int64)
    lo = start[:, None] + j[None, :] * nb[:, None] // num_splits
    hi = start[:, None] + (j[None, :] + 1) * nb[:, None] // num_splits
    return np.stack([lo.ravel(), hi.ravel()], axis=1)


def _pieces_of(lo: int, hi: int, tile_start: np.ndarray) -> list[Piece]:
    """Cut ``[lo, hi)`` at tile boundaries, classify, and put a reducer piece last."""
    pieces = []
    x = lo
    while x < hi:
        t = int(np.searchsorted(tile_start, x, side="right")) - 1
        t_begin, t_end = int(tile_start[t]), int(tile_start[t + 1])
        end = min(hi, t_end)
        if end < t_end:
            kind = PieceKind.CONTRIBUTOR
        elif x > t_begin:
            kind = PieceKind.REDUCER
        else:
            kind = PieceKind.FULL
        pieces.append(Piece(t, x, end, kind))
        x = end
    if pieces and pieces[0].kind is PieceKind.REDUCER:
        pieces.append(pieces.pop(0))
    return pieces


def make_plan(
    seq_lens: Sequence[int],
    num_kv_heads: int,
    block_size: int,
    num_ctas: int,
    num_splits: int = STREAM_K,
    tile_cost: int = 0,
) -> Plan:
    """Partition the blocks of all ``len(seq_lens) * num_kv_heads`` tiles.

    ``num_splits == 0`` gives stream-K over ``num_ctas`` workers (``tile_cost``: see
    :func:`stream_k_edges`); ``num_splits >= 1`` gives a fixed split with
    ``num_tiles * num_splits`` workers (``num_ctas`` is then ignored).
    """
    if num_kv_heads <= 0:
        raise ValueError(f"num_kv_heads: expected > 0, got {num_kv_heads}")
    if num_splits < 0:
        raise ValueError(f"num_splits: expected >= 0 (0 = stream-K), got {num_splits}")
    if num_splits == STREAM_K and num_ctas <= 0:
        raise ValueError(f"num_ctas: expected > 0, got {num_ctas}")
    tile_start = tile_starts(seq_lens, num_kv_heads, block_size)
    num_tiles = len(tile_start) - 1
    num_workers = num_ctas if num_splits == STREAM_K else num_tiles * num_splits
    ranges = worker_ranges(tile_start, num_workers, num_splits, tile_cost)
    pieces = tuple(tuple(_pieces_of(int(lo), int(hi), tile_start)) for lo, hi in ranges)
    reducer, parts = {}, {}
    for w in range(num_workers):
        for piece in pieces[w]:
            if piece.kind is PieceKind.REDUCER:
                reducer[piece.tile] = w
            elif piece.kind is PieceKind.CONTRIBUTOR:
                parts.setdefault(piece.tile, []).append(w)
    # Merge order is the device's: from the reducer downwards over lower workers.
    contributors = {t: tuple(sorted(parts.get(t, ()), reverse=True)) for t in reducer}
    name = "stream-K" if num_splits == STREAM_K else ("no split" if num_splits == 1 else f"fixed split {num_splits}")
    return Plan(
        name=name,
        seq_lens=tuple(int(x) for x in seq_lens),
        num_kv_heads=num_kv_heads,
        block_size=block_size,
        num_workers=num_workers,
        tile_start=tile_start,
        ranges=ranges,
        pieces=pieces,
        reducer=reducer,
        contributors=contributors,
    )


def stream_k_plan(seq_lens, num_kv_heads, block_size, num_ctas, tile_cost: int = 0) -> Plan:
    """LeanAttention: every worker gets an equal contiguous share of all tiles' blocks (equal in
    cost when ``tile_cost`` charges each tile its fixed work)."""
    return make_plan(seq_lens, num_kv_heads, block_size, num_ctas, STREAM_K, tile_cost)


def fixed_split_plan(seq_lens, num_kv_heads, block_size, num_splits) -> Plan:
    """Flash-Decoding: every tile cut into ``num_splits`` chunks, then merged."""
    if num_splits < 1:
        raise ValueError(f"num_splits: expected >= 1, got {num_splits}")
    return make_plan(seq_lens, num_kv_heads, block_size, 0, num_splits)


def no_split_plan(seq_lens, num_kv_heads, block_size) -> Plan:
    """FlashAttention-2 decode: one worker per output tile."""
    return make_plan(seq_lens, num_kv_heads, block_size, 0, 1)


def summarize(plan: Plan, group_size: int = 1, head_dim: int = 128) -> str:
    """A few lines a user can read: balance, splits, partials, workspace."""
    work = plan.blocks_per_worker()
    busy = work[work > 0]
    splits = plan.splits_per_tile()
    lines = [
        f"{plan.name}: {plan.num_tiles} tiles, {plan.total_blocks} blocks of {plan.block_size} rows, "
        f"{plan.num_workers} workers",
        f"  blocks per worker: min {work.min() if len(work) else 0} max {work.max() if len(work) else 0} "
        f"(busy workers {len(busy)}, idle {len(work) - len(busy)})",
        f"  critical path: {work.max() if len(work) else 0} blocks "
        f"(perfect balance {plan.total_blocks / max(plan.num_workers, 1):.1f})",
        f"  splits per tile: max {splits.max() if len(splits) else 0}, tiles split {int((splits > 1).sum())}, "
        f"partials merged {plan.num_partials()}",
        f"  workspace: {plan.workspace_bytes(group_size, head_dim) / 1024:.1f} KiB "
        f"(G={group_size}, D={head_dim})",
    ]
    return "\n".join(lines)


def draw(plans: Sequence[Plan], path: str, num_slots: int | None = None) -> None:
    """Workers (rows) against time in blocks (columns), coloured by output tile, one panel a plan.

    Each worker's row is its walk in order; a fixed-split plan's workers are packed onto
    ``num_slots`` persistent CTAs in index order to show the critical path the GPU sees.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(plans), 1, figsize=(11, 3.2 * len(plans)), squeeze=False)
    cmap = plt.get_cmap("tab20")
    for ax, plan in zip(axes[:, 0], plans, strict=True):
        slots = num_slots or plan.num_workers
        clock = np.zeros(slots, dtype=np.int64)
        for w, worker_pieces in enumerate(plan.pieces):
            lane = w % slots
            for piece in worker_pieces:
                n = piece.end - piece.begin
                hatch = None if piece.kind is PieceKind.FULL else "//"
                ax.barh(lane, n, left=clock[lane], color=cmap(piece.tile % 20), hatch=hatch,
                        edgecolor="black", linewidth=0.2)
                clock[lane] += n
        ax.set_title(f"{plan.name}: critical path {clock.max()} blocks on {slots} CTAs")
        ax.set_ylabel("CTA")
        ax.set_xlabel("KV blocks processed (colour = output tile, hatched = split tile)")
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _parse_heads(text: str) -> tuple[int, int]:
    try:
        hq, hkv = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--heads: expected HQ/HKV like 32/8, got {text!r}") from None
    if hkv <= 0 or hq % hkv:
        raise argparse.ArgumentTypeError(f"--heads: HQ must be a positive multiple of HKV, got {text!r}")
    return hq, hkv


def _parse_lens(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seq-lens: expected comma-separated ints, got {text!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m lean_tvm.plan",
        description="Print and draw the stream-K (LeanAttention) partition of a decode batch "
        "beside the fixed-split (Flash-Decoding) and no-split plans.",
    )
    ap.add_argument("--seq-lens", type=_parse_lens, required=True, help="e.g. 131072,1024,1024")
    ap.add_argument("--heads", type=_parse_heads, default=(32, 8), help="HQ/HKV (default 32/8)")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=64, help="KV rows per block (default 64)")
    ap.add_argument("--ctas", type=int, default=132, help="persistent CTAs (default 132, H100 SMs)")
    ap.add_argument("--splits", type=int, default=8, help="chunks per tile of the fixed-split plan")
    ap.add_argument("--tile-cost", type=int, default=0, help="stream-K: a tile's fixed work in 1/4 blocks "
                    "(the batch kernels' schedule; default 0: equal block shares)")
    ap.add_argument("--png", help="write the picture here")
    args = ap.parse_args(argv)
    if args.tile_cost < 0:
        ap.error(f"--tile-cost: expected >= 0, got {args.tile_cost}")
    hq, hkv = args.heads
    group = hq // hkv
    plans = [
        stream_k_plan(args.seq_lens, hkv, args.block_size, args.ctas, args.tile_cost),
        fixed_split_plan(args.seq_lens, hkv, args.block_size, args.splits),
        no_split_plan(args.seq_lens, hkv, args.block_size),
    ]
    for p in plans:
        print(summarize(p, group, args.head_dim))
    if args.png:
        draw(plans, args.png, num_slots=args.ctas)
        print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
