"""The speed targets from a results.csv: each target's number and verdict follow the rows."""

import math

from lean_tvm.bench import grid, report, targets

L4K = grid.uniform(1, 4096, 32, 8)
L16K = grid.uniform(1, 16384, 32, 8)
RAGGED = grid.ragged("2x64k+30x512", [65536] * 2 + [512] * 30, hq=64, hkv=8)


def rows_for(shape, lean, stream, peer, blhd=None, fa3=math.nan, cudnn=math.nan, host=8.0, wrong=()):
    return [report.shape_row(shape, report.STREAM, median_us=stream, ok=True),
            report.shape_row(shape, "lean", median_us=lean, ok="lean" not in wrong, host_us=host, graph_us=3.0),
            report.shape_row(shape, "lean-blhd", median_us=lean if blhd is None else blhd, ok=True),
            report.shape_row(shape, "flashinfer", median_us=peer, ok=True, host_us=20.0),
            report.shape_row(shape, "fa3-best", median_us=fa3, ok="fa3-best" not in wrong),
            report.shape_row(shape, "cudnn", median_us=cudnn, ok=True)]


def verdicts(rows):
    return {t: (m, s) for t, m, s in targets.evaluate(rows)}


def test_targets_met_and_missed_follow_the_numbers():
    rows = rows_for(L4K, lean=10.0, stream=8.0, peer=15.0) + rows_for(L16K, lean=30.0, stream=25.0, peer=33.0)
    rows += rows_for(RAGGED, lean=200.0, stream=196.0, peer=360.0, cudnn=2800.0, blhd=210.0)
    v = verdicts(rows)
    assert v["B1 32/8 L4k within 1.3x of the stream read"] == ("1.25x (10.0 vs 8.0 us)", "met")
    assert v[">= 1.2x the best peer at L4k (B1 32/8)"][1] == "met"
    assert v[">= 1.2x the best peer at L16k (B1 32/8)"] == ("1.10x (30.0 us vs flashinfer 33.0 us)", "missed")
    assert v["at least the best peer on every shape"][1] == "met"
    assert v[">= 95% of the stream read on every shape >= 64 MB"][0].startswith("1 of 2; lowest 83%")
    assert v["layout='blhd' within 3% of 'bhld' on every shape"][1] == "missed"  # 210 vs 200 on the ragged row
    assert v["eager wall time per call <= 10 us at B1 L4k (no graph, no host sync)"][1] == "met"
    assert "14.0x" in v["ragged batches: speedup over padded SDPA (cuDNN)"][0]


def test_fa3_counts_as_a_peer_and_wrong_rows_do_not():
    rows = rows_for(L4K, lean=10.0, stream=8.0, peer=15.0, fa3=9.0, host=12.0)
    v = verdicts(rows)
    assert v["at least the best peer on every shape"][1] == "missed"  # FA3 9.0 beats lean 10.0
    assert v["eager wall time per call <= 10 us at B1 L4k (no graph, no host sync)"][1] == "missed"
    v = verdicts(rows_for(L4K, lean=10.0, stream=8.0, peer=15.0, fa3=9.0, wrong=("fa3-best",)))
    assert v["at least the best peer on every shape"][1] == "met"  # a wrong FA3 row is no peer


def test_markdown_cli(tmp_path):
    rows = rows_for(L4K, lean=10.0, stream=8.0, peer=15.0)
    report.write_csv(rows, tmp_path / "results.csv")
    assert targets.main([str(tmp_path)]) == 0
    text = (tmp_path / "targets.md").read_text()
    assert text.startswith("# Speed targets") and "| B1 32/8 L4k within 1.3x of the stream read |" in text
    assert targets.main([str(tmp_path / "nowhere")]) == 2


def test_fp8_targets_follow_the_numbers():
    big = grid.quantized(grid.uniform(1, 262144, 32, 8))  # 512 MB in 16 bits, 256 MB... of fp8: 268 MB
    small = grid.quantized(grid.uniform(1, 4096, 32, 8))  # 16 MB in 16 bits: no 1.8x target
    rows = []
    for shape, lean, stream, b16, fi in ((big, 60.0, 57.0, 115.0, 90.0), (small, 10.0, 5.0, 11.0, 14.0)):
        rows += [report.shape_row(shape, report.STREAM, median_us=stream, ok=True),
                 report.shape_row(shape, "lean", median_us=lean, ok=True),
                 report.shape_row(shape, "lean-16bit", median_us=b16, ok=True),
                 report.shape_row(shape, "flashinfer", median_us=fi, ok=True),
                 report.shape_row(shape, "flashinfer-tc", median_us=math.nan, note="failed")]
    v = verdicts(rows)
    assert v["fp8: >= 1.8x our 16-bit kernel where the 16-bit K+V >= 64 MB"] == (
        f"1 of 1; 1.92x-1.92x (lowest: {big.name})", "met")
    assert v["fp8: >= 93% of the stream read of the fp8 bytes where >= 256 MB"] == (
        f"1 of 1; lowest 95% ({big.name})", "met")
    assert v["fp8: >= 1.3x FlashInfer's fp8 decode (its faster path) on every row"] == (
        f"2 of 2; 1.40x-1.50x (lowest: {small.name})", "met")
    assert not any(t.startswith("fp8") for t in verdicts(rows_for(L4K, lean=10.0, stream=8.0, peer=15.0)))
    # a 16-bit grid lists lean-16bit as unsupported (no time): no fp8 targets either
    unsupported = [report.shape_row(L4K, "lean-16bit", median_us=math.nan, note="Unsupported: ...")]
    assert not any(t.startswith("fp8") for t in verdicts(rows_for(L4K, lean=10.0, stream=8.0, peer=15.0)
                                                            + unsupported))
