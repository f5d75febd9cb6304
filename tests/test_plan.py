"""The stream-K plan (plain Python): coverage, balance, the order rule, the classic partitions."""

import numpy as np
import pytest

from lean_tvm import plan as P


def assert_covers_every_block_once(p: P.Plan) -> None:
    seen = np.zeros(p.total_blocks, dtype=np.int64)
    for worker_pieces in p.pieces:
        for piece in worker_pieces:
            assert p.tile_start[piece.tile] <= piece.begin < piece.end <= p.tile_start[piece.tile + 1]
            seen[piece.begin:piece.end] += 1
    assert (seen == 1).all()


def assert_order_rule(p: P.Plan) -> None:
    """Reducers wait only on lower workers; each worker publishes at most once, before it reduces."""
    for worker_pieces in p.pieces:
        kinds = [piece.kind for piece in worker_pieces]
        assert kinds.count(P.PieceKind.CONTRIBUTOR) <= 1
        assert kinds.count(P.PieceKind.REDUCER) <= 1
        if P.PieceKind.REDUCER in kinds:
            assert kinds[-1] is P.PieceKind.REDUCER  # done last: its contributors publish first
    for t, r in p.reducer.items():
        assert all(c < r for c in p.contributors[t])
        assert list(p.contributors[t]) == sorted(p.contributors[t], reverse=True)


LENS = [
    [4096],
    [131072, 1024, 1024],
    [0, 5, 0, 64, 65, 1],
    [1] * 37,
    [7000] + [100] * 63,
    list(np.random.default_rng(0).integers(0, 16384, 48)),
    [65536, 4096, 2048, 30000, 1024, 1024, 8192],
]


@pytest.mark.parametrize("lens", LENS)
@pytest.mark.parametrize("ctas", [1, 7, 132, 1000])
def test_stream_k_plan_covers_every_block_once_and_balances(lens, ctas):
    p = P.stream_k_plan(lens, num_kv_heads=8, block_size=64, num_ctas=ctas)
    assert_covers_every_block_once(p)
    assert_order_rule(p)
    work = p.blocks_per_worker()
    assert work.sum() == p.total_blocks
    assert work.max() - work.min() <= 1  # equal to within one block


@pytest.mark.parametrize("lens", LENS)
@pytest.mark.parametrize("ctas", [1, 7, 132, 1000])
def test_stream_k_plan_with_a_tile_cost_balances_cost(lens, ctas):
    """Cover, order, monotone cuts for any lengths; for tiles of >= 8 blocks, shares equal in cost
    (BLOCK_COST per block + tile_cost per tile started) to within a block and a tile cost at each
    end."""
    tile_cost = 6
    p = P.stream_k_plan(lens, num_kv_heads=8, block_size=64, num_ctas=ctas, tile_cost=tile_cost)
    assert_covers_every_block_once(p)
    assert_order_rule(p)
    assert (np.diff(p.ranges, axis=0)[:, 0] >= 0).all()  # cuts in order: reducers wait only below
    if len(set(P.blocks_per_sequence(lens, 64).tolist())) <= 1:
        assert (p.ranges == P.stream_k_plan(lens, 8, 64, ctas).ranges).all()  # equal tiles: plain split
        return
    if min(lens) < 64 * 8 or ctas > p.total_blocks // 4:
        return  # tiles of a few blocks: a cut's rounding to a block outweighs the balance
    starts = [sum(piece.begin == p.tile_start[piece.tile] for piece in w) for w in p.pieces]
    cost = P.BLOCK_COST * p.blocks_per_worker() + tile_cost * np.array(starts)
    assert cost.max() - cost.min() <= 2 * (P.BLOCK_COST + tile_cost)


def test_tile_cost_moves_blocks_away_from_short_tiles():
    """Two long sequences then many short ones: the workers over the short tiles get fewer blocks."""
    lens = [65536] * 2 + [512] * 30
    plain = P.stream_k_plan(lens, 8, 128, 128)
    costed = P.stream_k_plan(lens, 8, 128, 128, tile_cost=6)
    assert plain.blocks_per_worker()[-1] == plain.blocks_per_worker().max()
    assert costed.blocks_per_worker()[-1] < plain.blocks_per_worker()[-1] - 5
    assert max(len(w) for w in costed.pieces) < max(len(w) for w in plain.pieces)
    with pytest.raises(ValueError, match="tile_cost"):
        P.stream_k_plan(lens, 8, 128, 128, tile_cost=-1)


@pytest.mark.parametrize("lens", LENS)
@pytest.mark.parametrize("splits", [1, 3, 16])
def test_fixed_split_and_no_split_plans_cover_every_block_once(lens, splits):
    p = P.fixed_split_plan(lens, num_kv_heads=4, block_size=64, num_splits=splits)
    assert_covers_every_block_once(p)
    assert_order_rule(p)
    assert p.num_workers == len(lens) * 4 * splits
    assert (p.splits_per_tile() <= splits).all()


def test_no_split_plan_has_one_full_piece_per_tile():
    p = P.no_split_plan([100, 0, 3000], num_kv_heads=2, block_size=64)
    pieces = [piece for wp in p.pieces for piece in wp]
    assert all(piece.kind is P.PieceKind.FULL for piece in pieces)
    assert sorted(piece.tile for piece in pieces) == [0, 1, 4, 5]  # sequence 1 is empty
    assert p.num_partials() == 0


def test_more_ctas_than_blocks_leaves_the_extra_ctas_idle():
    p = P.stream_k_plan([64, 64], num_kv_heads=1, block_size=64, num_ctas=132)
    assert p.total_blocks == 2
    assert (p.blocks_per_worker() > 0).sum() == 2
    assert_covers_every_block_once(p)


def test_zero_length_sequences_have_no_blocks():
    p = P.stream_k_plan([0, 0, 0], num_kv_heads=8, block_size=64, num_ctas=4)
    assert p.total_blocks == 0 and all(len(wp) == 0 for wp in p.pieces)


def test_one_huge_sequence_among_short_ones_is_split_and_balanced():
    lens = [262144] + [1024] * 31
    sk = P.stream_k_plan(lens, num_kv_heads=8, block_size=64, num_ctas=132)
    ns = P.no_split_plan(lens, num_kv_heads=8, block_size=64)
    assert sk.blocks_per_worker().max() <= -(-sk.total_blocks // 132)
    assert ns.blocks_per_worker().max() == 262144 // 64  # one CTA walks the whole long tile
    assert sk.splits_per_tile()[:8].min() > 1  # the long sequence's tiles are shared


def test_contributors_are_exactly_the_other_workers_of_a_split_tile():
    p = P.stream_k_plan([5000, 300, 9000], num_kv_heads=2, block_size=64, num_ctas=11)
    for t, r in p.reducer.items():
        holders = {w for w, wp in enumerate(p.pieces) for piece in wp if piece.tile == t}
        assert set(p.contributors[t]) | {r} == holders


def test_workspace_counts_one_slot_per_worker():
    p = P.stream_k_plan([4096], num_kv_heads=8, block_size=64, num_ctas=132)
    assert p.workspace_bytes(group_size=4, head_dim=128) == 132 * (4 * 128 * 4 + 2 * 4 * 4 + 4)


@pytest.mark.parametrize("bad", [dict(seq_lens=[-1]), dict(block_size=0), dict(num_kv_heads=0),
                                 dict(num_ctas=0), dict(num_splits=-1)])
def test_bad_arguments_raise_value_error(bad):
    args = dict(seq_lens=[10], num_kv_heads=1, block_size=64, num_ctas=4, num_splits=0) | bad
    with pytest.raises(ValueError):
        P.make_plan(**args)


def test_cli_prints_summary_and_draws_the_plan(tmp_path, capsys):
    png = tmp_path / "plan.png"
    assert P.main(["--seq-lens", "131072,1024,1024", "--heads", "32/8", "--ctas", "132", "--png", str(png)]) == 0
    text = capsys.readouterr().out
    assert "stream-K" in text and "fixed split 8" in text and "no split" in text
    assert png.stat().st_size > 10_000


def test_cli_rejects_bad_heads():
    with pytest.raises(SystemExit):
        P.main(["--seq-lens", "10", "--heads", "30/8"])


def test_cli_tile_cost_moves_blocks_off_the_short_tiles(capsys):
    lens = ",".join(["65536"] * 2 + ["512"] * 30)
    P.main(["--seq-lens", lens, "--heads", "64/8", "--block-size", "128", "--ctas", "128"])
    plain = capsys.readouterr().out.splitlines()[1]
    P.main(["--seq-lens", lens, "--heads", "64/8", "--block-size", "128", "--ctas", "128", "--tile-cost", "6"])
    costed = capsys.readouterr().out.splitlines()[1]
    assert plain == "  blocks per worker: min 71 max 72 (busy workers 128, idle 0)"
    assert costed.startswith("  blocks per worker: min ") and costed != plain
    with pytest.raises(SystemExit):
        P.main(["--seq-lens", lens, "--tile-cost", "-1"])
