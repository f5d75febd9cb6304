"""The ncu profiler's reading of ncu's CSV (no GPU): calls labelled by their markers, stalls ranked."""

import pytest

from lean_tvm.bench import ncu as ncu_module


@pytest.fixture(scope="module")
def ncu():
    return ncu_module


def fake_csv(kernels):
    stall = "smsp__average_warps_issue_stalled_{}_per_issue_active.ratio"
    cols = ["ID", "Kernel Name", "gpu__time_duration.sum", "dram__throughput.avg.pct_of_peak_sustained_elapsed",
            "dram__bytes_read.sum", "launch__grid_size", "launch__registers_per_thread",
            *(stall.format(s) for s in ("long_scoreboard", "barrier", "selected", "wait"))]
    rows = [cols, ["", "", "nsecond", "%", "byte", "", "", "", "", "", ""]]
    for i, (name, us, stalls) in enumerate(kernels):
        rows.append([str(i), name, str(us * 1000), "50", "16,800,000", "128", "208", *map(str, stalls)])
    text = "==PROF== Connected\n" + "\n".join(",".join(f'"{c}"' for c in r) for r in rows) + "\n"
    return text


def test_calls_are_labelled_by_markers_and_stalls_ranked(ncu):
    text = fake_csv([("spin_kernel", 1, (0, 0, 0, 0)), ("stream_read_kernel", 8.6, (8, 0, 1, 1)),
                     ("spin_kernel", 1, (0, 0, 0, 0)), ("decode_kernel", 12.6, (3, 2, 9, 5)),
                     ("merge_kernel", 5.2, (1, 3, 0, 0))])
    labelled = ncu.label(ncu.parse(text), ["S | stream", "S | peer"])
    assert [(what, k["Kernel Name"]) for what, k in labelled] == [
        ("S | stream", "stream_read_kernel"), ("S | peer", "decode_kernel"), ("S | peer", "merge_kernel")]
    rows = ncu.summarize(labelled, top=2)
    assert rows[1]["us"] == pytest.approx(12.6) and rows[1]["dram_mb"] == pytest.approx(16.8)
    assert rows[1]["stalls"] == "wait 50%, long_scoreboard 30%"  # "selected" is no stall
    assert rows[2]["stalls"].startswith("barrier 75%")


def test_no_kernels_gives_nothing(ncu):
    assert ncu.parse("==ERROR== no kernels were profiled\n") == []
    assert ncu.label([], ["S | lean"]) == []
