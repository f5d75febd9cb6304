"""Issue 11's targets from a results.csv: each target's number and verdict follow the rows."""

import math

from lean_tvm import bench, targets

L4K = bench.uniform(1, 4096, 32, 8)
L16K = bench.uniform(1, 16384, 32, 8)
RAGGED = bench.ragged("2x64k+30x512", [65536] * 2 + [512] * 30, hq=64, hkv=8)


def rows_for(shape, lean, stream, peer, fixed=math.nan, cudnn=math.nan, host=12.0):
    rows = [bench.shape_row(shape, bench.STREAM, median_us=stream, ok=True),
            bench.shape_row(shape, "lean", median_us=lean, ok=True, host_us=host, graph_us=3.0),
            bench.shape_row(shape, "flashinfer", median_us=peer, ok=True),
            bench.shape_row(shape, "cudnn", median_us=cudnn, ok=True),
            bench.shape_row(shape, "lean-fixedsplit", median_us=fixed, ok=True)]
    return rows


def verdicts(rows):
    return {t: (m, s) for t, m, s in targets.evaluate(rows)}


def test_targets_met_and_missed_follow_the_numbers():
    rows = rows_for(L4K, lean=10.0, stream=9.0, peer=15.0) + rows_for(L16K, lean=30.0, stream=25.0, peer=33.0)
    rows += rows_for(RAGGED, lean=200.0, stream=196.0, peer=360.0, fixed=280.0, cudnn=2800.0)
    v = verdicts(rows)
    assert v["B1 32/8 L4k within 1.15x of the stream read"] == ("1.11x (10.0 vs 9.0 us)", "met")
    assert v[">= 1.4x the best peer at B1 L4k"][1] == "met"
    assert v[">= 1.2x the best peer at B1 L16k"] == ("1.10x (30.0 us vs flashinfer 33.0 us)", "missed")
    assert v[">= 1.7x the best peer on ragged 64/8"][1] == "met"
    assert v[">= 5x over padded SDPA on ragged batches"] == ("14.0x-14.0x over 1 shapes", "met")
    assert v[">= 1.3x over our best fixed split on ragged batches"][1] == "met"
    big = v[">= 95% of the stream read on every fp16 D128 shape >= 64 MB"]
    assert big[1] == "missed" and big[0].startswith("1 of 2; lowest 83%")  # L16k (67 MB) at 83%
    assert v["wall time per call <= 15 us at B1 L4k (no graph, no host sync)"][1] == "met"
    every = v["at least the best peer on every shape"]
    assert every[1] == "met" and every[0].startswith("3 of 3")


def test_a_wrong_peer_output_is_not_the_best_peer():
    rows = rows_for(L4K, lean=10.0, stream=9.0, peer=5.0)
    rows[2]["ok"] = False  # flashinfer's 5 us output was wrong: cudnn (NaN) leaves no peer
    v = verdicts(rows)
    assert v[">= 1.4x the best peer at B1 L4k"] == ("no peer with a correct output", "n/a")


def test_cli_writes_targets_md(tmp_path, capsys):
    bench.write_csv(rows_for(L4K, lean=10.0, stream=9.0, peer=15.0), tmp_path / "results.csv")
    assert targets.main([str(tmp_path)]) == 0
    assert "| B1 32/8 L4k within 1.15x of the stream read | 1.11x" in (tmp_path / "targets.md").read_text()
    assert targets.main([str(tmp_path / "missing")]) == 2
