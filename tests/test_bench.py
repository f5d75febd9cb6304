"""CPU-only tests of the benchmark suite: the grid, the byte arithmetic, the derived numbers, the
writers, the page copy, and one shape run end to end with the GPU pieces replaced by fakes."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from lean_tvm import bench, paged_cases, tvm_peer
from lean_tvm import runtime as rt
from lean_tvm.reference import decode_attention_reference
from lean_tvm.timing import Stats

K = 1024


# ---------------------------------------------------------------- grid


def test_quick_grid_is_small_and_has_the_named_shapes():
    names = [s.name for s in bench.quick_grid()]
    assert 6 <= len(names) <= 10
    for must in ("B1 32/8 D128 fp16 L4k", "B1 32/8 D128 fp16 L16k", "B1 32/8 D128 fp16 L64k",
                 "ragged 2x64k+30x512 64/8 D128 fp16"):
        assert must in names
    assert sum(n.startswith("ragged") for n in names) >= 2
    assert len(set(names)) == len(names)


def test_full_grid_covers_the_issue():
    grid = bench.full_grid()
    names = {s.name for s in grid}
    assert len(names) == len(grid)
    b1 = [s for s in grid if s.batch == 1 and (s.hq, s.hkv, s.head_dim, s.dtype) == (32, 8, 128, "float16")]
    assert sorted(s.max_len for s in b1) == [1 << p for p in range(10, 20)]  # 1k .. 512k
    for hq, hkv in bench.HEADS:
        assert any(s.hq == hq and s.hkv == hkv for s in grid)
    assert {s.head_dim for s in grid} == {64, 128, 256}
    assert {s.dtype for s in grid} == {"float16", "bfloat16"}
    assert {s.batch for s in grid if not s.ragged} == {1, 8, 16, 32, 64}
    ragged = [s for s in grid if s.ragged]
    assert len(ragged) == 5
    # bf16 and D != 128 stay a subset
    assert sum(s.dtype == "bfloat16" for s in grid) < sum(s.dtype == "float16" and s.head_dim == 128 for s in grid) / 4


def test_grid_respects_the_byte_cap():
    full = bench.full_grid()
    for cap in (40e9, 5e9, 1e9, 100e6):
        grid = bench.full_grid(cap)
        assert all(s.kv_bytes <= cap for s in grid)
        assert {s.name for s in grid} == {s.name for s in full if s.kv_bytes <= cap}
    assert len(bench.full_grid(100e6)) < len(bench.full_grid(1e9)) < len(full)
    assert all(s.kv_bytes <= 1e9 for s in bench.quick_grid(1e9))


def test_ragged_lengths_are_seeded_and_in_range():
    a, b = bench.ragged_shapes(0), bench.ragged_shapes(0)
    assert [s.lens for s in a] == [s.lens for s in b]
    assert [s.lens for s in bench.ragged_shapes(1)] != [s.lens for s in a]
    by = {s.name.split()[1]: s for s in a}
    one = by["1x128k+15x1k-4k"]
    assert one.lens[0] == 128 * K and len(one.lens) == 16 and all(K <= n <= 4 * K for n in one.lens[1:])
    assert by["4x32k+28x1k"].lens == (32 * K,) * 4 + (K,) * 28
    r48 = by["48x1-16k"].lens
    assert len(r48) == 48 and all(1 <= n <= 16 * K for n in r48)
    big = by["2x64k+30x512"]
    assert (big.hq, big.hkv) == (64, 8) and big.lens == (64 * K,) * 2 + (512,) * 30
    # the quick grid's ragged shape has the same lengths as the full grid's
    quick = {s.name: s for s in bench.quick_grid()}
    assert quick[one.name].lens == one.lens


def test_select_and_parse_systems():
    grid = bench.full_grid()
    sel = bench.select_shapes(grid, r"^B1 32/8 D128 fp16 ")
    assert len(sel) == 10
    assert bench.parse_systems(None) == bench.SYSTEMS
    assert bench.parse_systems("cudnn, lean") == ("lean", "cudnn")
    with pytest.raises(SystemExit):
        bench.parse_systems("lean,nope")


# ---------------------------------------------------------------- bytes and derived numbers


def test_bytes_to_move():
    s = bench.uniform(1, 4 * K, 32, 8)
    assert s.kv_bytes == 2 * 4096 * 8 * 128 * 2 == 16_777_216
    assert s.move_bytes == s.kv_bytes + 2 * 32 * 128 * 2
    r = bench.ragged("t", [100, 37, 1], hq=8, hkv=2, d=64, dtype="bfloat16")
    assert r.kv_bytes == 2 * (100 + 37 + 1) * 2 * 64 * 2
    assert r.move_bytes == r.kv_bytes + 2 * 3 * 8 * 64 * 2
    assert r.alloc_len == 112 and r.max_len == 100 and r.total_len == 138 and r.batch == 3
    assert bench.kv_bytes([4096] * 8, 8, 128, 2) == 8 * s.kv_bytes


def test_ratio_and_percent_math():
    assert bench.pct_of_stream(9.6, 16.0) == pytest.approx(60.0)
    assert bench.pct_of_stream(10.0, 10.0) == 100.0
    assert math.isnan(bench.pct_of_stream(10.0, float("nan")))
    assert math.isnan(bench.pct_of_stream(float("nan"), 10.0))
    assert bench.speedup(20.0, 10.0) == 2.0
    assert math.isnan(bench.speedup(20.0, float("nan")))
    assert bench.tbps(3e6, 1.0) == 3.0  # 3 MB in 1 us = 3 TB/s


def fake_rows(shape, times: dict[str, float], **extra):
    rows = [bench.shape_row(shape, name, median_us=us, p10_us=us * 0.9, p90_us=us * 1.1, reps=30,
                            **extra.get(name, {})) for name, us in times.items()]
    return bench.derive(rows)


def test_derive_and_best_peer():
    s = bench.uniform(1, 4 * K, 32, 8)
    rows = fake_rows(s, {"stream": 10.0, "lean": 12.5, "cudnn": 16.0, "flash": float("nan"), "flashinfer": 25.0,
                         "lean-nosplit": 100.0})
    by = {r["system"]: r for r in rows}
    assert by["lean"]["pct_stream"] == pytest.approx(80.0)
    assert by["stream"]["pct_stream"] == pytest.approx(100.0)
    assert by["cudnn"]["lean_speedup"] == pytest.approx(16.0 / 12.5)
    assert by["lean"]["lean_speedup"] == 1.0
    assert math.isnan(by["flash"]["pct_stream"])
    assert by["lean"]["tbps"] == pytest.approx(s.move_bytes / 12.5 / 1e6)
    assert by["stream"]["tbps"] == pytest.approx(s.kv_bytes / 10.0 / 1e6)
    assert all(r["stream_us"] == 10.0 for r in rows)
    assert bench.best_peer(rows) == ("cudnn", 16.0)  # lean-nosplit is not a peer, flash has no number
    assert bench.best_peer(fake_rows(s, {"stream": 1.0, "lean": 2.0})) == (None, pytest.approx(float("nan"),
                                                                                               nan_ok=True))


# ---------------------------------------------------------------- writers


def _two_shapes():
    a, b = bench.uniform(1, 4 * K, 32, 8), bench.ragged("4x32k+28x1k", [32 * K] * 4 + [K] * 28)
    rows = fake_rows(a, {"stream": 9.6, "lean": 10.0, "lean-fixedsplit": 11.0, "cudnn": 17.2, "flash": 24.0},
                     **{"lean": {"host_us": 8.0, "graph_us": 4.0, "ok": True},
                        "lean-fixedsplit": {"splits": 16, "ok": True}})
    rows += fake_rows(b, {"stream": 220.0, "lean": 230.0, "cudnn": 1400.0, "flash": float("nan")},
                      **{"lean": {"ok": False, "note": "output differs"},
                         "flash": {"note": "SDPA flash refused (padded + mask): no mask support"}})
    return rows


def test_markdown_table():
    rows = _two_shapes()
    md = bench.markdown(rows, {"gpu": "FAKE GPU", "sms": 132, "commit": "abc", "date": "today", "reps": 30})
    lines = md.splitlines()
    assert lines[0] == "# Decode attention on FAKE GPU"
    header = next(line for line in lines if line.startswith("| shape | KV MB"))
    assert header.split(" | ")[2:7] == ["stream", "lean", "lean-fixedsplit", "cudnn", "flash"]
    row_a = next(line for line in lines if line.startswith("| B1 32/8 D128 fp16 L4k |"))
    assert "10.0 us (96%)" in row_a and "S=16" in row_a and "1.72x (cudnn)" in row_a and "| 17 |" in row_a
    row_b = next(line for line in lines if line.startswith("| ragged 4x32k+28x1k"))
    assert "**WRONG**" in row_b and "n/a" in row_b and "6.09x (cudnn)" in row_b
    assert any("8.0 us | 4.0 us" in line for line in lines)  # lean host / graph
    assert any("SDPA flash refused" in line for line in lines)
    assert bench.markdown(rows).startswith("| shape |")  # no meta: table only


def test_csv_round_trip(tmp_path):
    rows = _two_shapes()
    bench.write_csv(rows, tmp_path / "results.csv")
    back = bench.read_csv(tmp_path / "results.csv")
    assert len(back) == len(rows)
    assert list(back[0].keys())[:len(bench.FIELDS)] == list(bench.FIELDS)
    for r, b in zip(rows, back, strict=True):
        assert b["shape"] == r["shape"] and b["system"] == r["system"]
        for k in ("median_us", "pct_stream", "lean_speedup", "kv_bytes"):
            assert (math.isnan(r[k]) and math.isnan(b[k])) or b[k] == pytest.approx(r[k], rel=1e-5)
        assert b["ok"] == r["ok"]
    assert bench.markdown(back) == bench.markdown(rows)


def test_write_outputs_and_replot(tmp_path):
    pytest.importorskip("matplotlib")
    rows = []
    for n in (4 * K, 16 * K, 64 * K):
        rows += fake_rows(bench.uniform(1, n, 32, 8), {"stream": n / 400, "lean": n / 350, "cudnn": n / 300})
    meta = {"gpu": "FAKE", "date": "now"}
    bench.write_outputs(rows, meta, tmp_path)
    for f in ("results.csv", "results.md", "meta.json", "time_vs_context.png", "pct_vs_context.png"):
        assert (tmp_path / f).stat().st_size > 0
    assert json.loads((tmp_path / "meta.json").read_text())["gpu"] == "FAKE"
    (tmp_path / "results.md").unlink()
    assert bench.main(["--replot", str(tmp_path)]) == 0
    assert "FAKE" in (tmp_path / "results.md").read_text()


def test_gpu_dir_name():
    assert bench.gpu_dir_name("NVIDIA H100 80GB HBM3") == "h100"
    assert bench.gpu_dir_name("NVIDIA H200") == "h200"
    assert bench.gpu_dir_name("NVIDIA GeForce RTX 4090") == "nvidia-geforce-rtx-4090"


def test_list_needs_no_gpu(capsys):
    assert bench.main(["--list", "--full", "--cap-gb", "1"]) == 0
    out = capsys.readouterr().out
    assert out.strip().endswith("shapes") and "L512k" not in out.split("32/32")[0]


# ---------------------------------------------------------------- pages


def test_page_table_and_copy():
    lens = [100, 16, 1, 33]
    indptr, last = bench.page_table(lens)
    assert indptr == [0, 7, 8, 9, 12] and last == [4, 16, 1, 1]
    kv = torch.randn(2, 4, 3, 112, 8)
    pages = bench.copy_into_pages(kv, indptr)
    assert pages.shape == (12, 2, 3, 16, 8)
    for b, n in enumerate(lens):  # reading the pages back in order gives the sequence's K and V rows
        seq = pages[indptr[b]:indptr[b + 1]].permute(1, 2, 0, 3, 4).reshape(2, 3, -1, 8)[:, :, :n]
        assert torch.equal(seq, kv[:, b, :, :n])


def test_tvm_pages_gather_back_to_the_dense_cache():
    """TVM's kernel reads row i of sequence b at pages[values[indptr[b] + i // 16], 0 or 1, h, i % 16]."""
    shape = bench.ragged("t", [100, 16, 1, 33], hq=8, hkv=2, d=64)
    case = bench.make_case(shape, torch.device("cpu"), seed=0)
    pc = bench.tvm_paged_case(case, bench.paged_cache(case))
    assert pc.pages.shape == (12, 2, 2, 16, 64) and pc.pages.is_contiguous()
    assert pc.indptr.tolist() == [0, 7, 8, 9, 12] and pc.last_len.tolist() == [4, 16, 1, 1]
    k, v = paged_cases.dense_from_pages(pc)
    for b, n in enumerate(shape.lens):
        assert torch.equal(k[b, :, :n], case.k[b, :, :n]) and torch.equal(v[b, :, :n], case.v[b, :, :n])


def test_tvm_peer_variants_cover_the_grid():
    variants = tvm_peer.suite_variants()
    assert len(variants) == len(set(variants)) == 10 and len({v.name for v in variants}) == 10
    for s in bench.full_grid() + bench.quick_grid():
        assert tvm_peer.Variant(s.hq, s.hkv, s.head_dim, s.dtype) in variants, s.name


# ---------------------------------------------------------------- TVM's kernel as a peer


class FakeTvmPeer:
    """TVM's kernel in torch: pages read through the page table, lse written in log2 units (or,
    to see the check catch it, in natural log)."""

    def __init__(self, lse_log2: bool = True):
        self.lse_log2 = lse_log2

    def kernel(self, shape):
        return self.run

    def run(self, q, pages, indptr, values, last_len, k_rope, q_rope, out, lse, rotary_mode, rope_scale,
            rope_theta, sm_scale):
        assert rotary_mode == 0 and pages.shape[1] == 2
        lens = ((indptr[1:] - indptr[:-1] - 1) * pages.shape[3] + last_len).tolist()
        k, v = paged_cases.dense_from_pages(paged_cases.PagedCase(q, pages, indptr, values, last_len, lens))
        o, lse_e = decode_attention_reference(q, k, v, lens, sm_scale)
        out.copy_(o)
        lse.copy_(lse_e * math.log2(math.e) if self.lse_log2 else lse_e)


@pytest.mark.parametrize("lse_log2", [True, False])
def test_tvm_runner_checks_output_and_lse_in_natural_log(lse_log2):
    shape = bench.ragged("t", [100, 16, 1, 33], hq=8, hkv=2, d=64)
    case = bench.make_case(shape, torch.device("cpu"), seed=0)
    case.ref, case.ref_kind = bench.reference(case)
    runner = bench.tvm_runner(case, FakeTvmPeer(lse_log2), bench.paged_cache(case))
    err, ok = bench.check(runner, case)
    assert ok is lse_log2  # a natural-log lse taken for log2 is off by ln 2: caught
    assert case.ref_lse.shape == (4, 8)
    assert bench.rel_error(runner.output(), case.ref) < 1e-3


def test_reference_lse_matches_float64():
    shape = bench.uniform(2, 96, 8, 4, 32)
    case = bench.make_case(shape, torch.device("cpu"), seed=1)
    _, lse = decode_attention_reference(case.q, case.k, case.v, shape.lens, case.scale)
    chunked = bench.reference_lse(case, chunk_bytes=96 * 32 * 4)  # one KV head per chunk
    assert torch.allclose(chunked.double(), lse, atol=1e-5)


def test_tvm_peer_is_skipped_without_its_library(monkeypatch, tmp_path):
    shape = bench.uniform(1, 4 * K, 32, 8)
    monkeypatch.setattr(bench.runtime, "library_for", lambda device: FakeLib())  # a manifest without the peer
    peer = bench.TvmPeer(torch.device("cpu"))
    with pytest.raises(bench.Unsupported, match="--arch sm_90a --out DIR --with-tvm-peer"):
        peer.kernel(shape)
    lib = FakeLib()
    lib.manifest = {"arch": "sm_90a", tvm_peer.MANIFEST_KEY: {"library": "tvm_decode_sm_90a.so", "kernels": []}}
    lib.path = tmp_path / "lean_tvm_sm_90a.so"  # the peer's file is not there
    monkeypatch.setattr(bench.runtime, "library_for", lambda device: lib)
    with pytest.raises(bench.Unsupported, match="TVM peer library not loadable"):
        bench.TvmPeer(torch.device("cpu")).kernel(shape)

    def no_library(device):
        raise rt.LibraryNotFound("no lean_tvm library for sm_90a")

    monkeypatch.setattr(bench.runtime, "library_for", no_library)
    with pytest.raises(bench.Unsupported, match="no lean_tvm library"):
        bench.TvmPeer(torch.device("cpu")).kernel(shape)


# ---------------------------------------------------------------- one shape end to end, GPU faked


class FakeTimer:
    def __init__(self, device):
        self.device = device

    def warm_clocks(self, ms=150.0):
        pass

    def device_time(self, fn, reps=30, warmup=3):
        fn()
        return Stats(10.0, 9.0, 11.0, reps)

    def host_time(self, fn, reps=1000):
        fn()
        return 5.0


class FakeLib:
    manifest = {"arch": "sm_90a"}

    def attention_kernel(self, dtype, head_dim, group, batch=1):
        return rt.KernelInfo("fake", dtype, head_dim, 8, 64, 1) if group <= 8 else None

    def function(self, name):
        assert name == "stream_read"

        def read(x, sink, grid):
            assert x.shape[1] == 8 and x.dtype == torch.float16

        return read


def fake_launch(q, k, v, seq_lens, out, lse, scale, num_splits=0, num_ctas=None, kernel=None):
    """Exact attention; wrong on purpose at num_splits=4, to see the suite notice."""
    g = q.shape[1] // k.shape[1]
    for b, n in enumerate(seq_lens.tolist()):
        kk = k[b, :, :n].double().repeat_interleave(g, 0)
        vv = v[b, :, :n].double().repeat_interleave(g, 0)
        p = torch.softmax(torch.einsum("hd,hld->hl", q[b].double(), kk) * scale, -1)
        out[b] = torch.einsum("hl,hld->hd", p, vv).to(out.dtype)
    if num_splits == 4:
        out.mul_(1.5)


def test_one_shape_end_to_end_with_fakes(monkeypatch, tmp_path):
    monkeypatch.setattr(bench, "Timer", FakeTimer)
    monkeypatch.setattr(bench.runtime, "library_for", lambda device: FakeLib())
    monkeypatch.setattr(bench.runtime, "launch_attention", fake_launch)
    monkeypatch.setattr(bench, "graph_host_us", lambda timer, runner, us: 3.0)
    b = bench.Bench(torch.device("cpu"), bench.SYSTEMS, reps=30, seed=0)
    assert b.fi is not None and b.fi.error  # no flashinfer here
    for shape in (bench.uniform(2, 300, 8, 2, 64),
                  bench.ragged("t", [260, 37, 1], hq=8, hkv=2, d=64)):
        seen = []
        rows = b.run_shape(shape, seen.append)
        assert seen == list(bench.SYSTEMS)
        by = {r["system"]: r for r in rows}
        assert set(by) == {bench.STREAM, *bench.SYSTEMS}
        assert by["lean"]["ok"] is True and by["lean"]["rel_err"] < 1e-2
        assert by["lean"]["graph_us"] == 3.0 and by["lean"]["host_us"] == 5.0
        assert by["lean"]["pct_stream"] == pytest.approx(100.0)
        assert by["lean-nosplit"]["ok"] is True
        fs = by["lean-fixedsplit"]
        assert fs["splits"] == 2 and fs["ok"] is False and "S=4" in fs["note"]
        for fi in ("flashinfer", "flashinfer-tc"):
            assert math.isnan(by[fi]["median_us"]) and "flashinfer not importable" in by[fi]["note"]
        assert math.isnan(by[bench.TVM_TIR]["median_us"]) and "--with-tvm-peer" in by[bench.TVM_TIR]["note"]
        for sd in ("cudnn", "flash"):  # CPU SDPA: either a checked number or a recorded reason
            assert by[sd]["ok"] is True or by[sd]["note"]
        assert by[bench.STREAM]["stream_before_us"] == 10.0
    md = bench.markdown(rows)
    assert "flashinfer not importable" in md


def test_split_candidates():
    s = bench.uniform(1, 4 * K, 32, 8)
    assert bench.split_candidates(s, 64, 8) == [2, 4, 8, 16, 32, 64]  # 64 blocks: no 128
    assert bench.split_candidates(bench.uniform(1, 64, 32, 8), 64, 8) == []
    big = bench.uniform(64, 16 * K, 32, 32)
    assert max(bench.split_candidates(big, 64, 8)) * 64 * 32 * 8 * 128 * 4 <= 2 << 30


def test_chunked_float64_reference_matches_sdpa():
    shape = bench.uniform(2, 96, 8, 4, 32)
    case = bench.make_case(shape, torch.device("cpu"), seed=1)
    ref = bench.reference_float64(case, chunk_bytes=96 * 32 * 8)  # one KV head per chunk
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        case.q[:, :, None].double(), case.k.double(), case.v.double(), scale=case.scale, enable_gqa=True)[:, :, 0]
    assert torch.allclose(ref, sdpa, atol=1e-10)
    assert bench.rel_error(ref.half(), ref.float()) < bench.tolerance("float16")
    assert bench.rel_error(torch.full_like(ref, float("nan")), ref.float()) == math.inf


def test_main_loop_with_fakes(monkeypatch, tmp_path, capsys):
    """The CLI loop: progress, results after every shape, --resume skipping what is done."""
    monkeypatch.setattr(bench, "Timer", FakeTimer)
    monkeypatch.setattr(bench.runtime, "library_for", lambda device: FakeLib())
    monkeypatch.setattr(bench.runtime, "launch_attention", fake_launch)
    monkeypatch.setattr(bench, "graph_host_us", lambda timer, runner, us: 3.0)
    monkeypatch.setattr(bench, "bench_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(bench.torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(bench, "collect_meta",
                        lambda device, args, systems, fi, tvm_peer: {"gpu": "FAKE", "reps": args.reps})
    monkeypatch.setattr(bench, "gpu_clocks", lambda device: {})
    args = ["--out", str(tmp_path), "--only", "lean,lean-nosplit,flashinfer", "--shapes", r"B1 32/8 D128 fp16 L4k$"]
    assert bench.main(args) == 0
    rows = bench.read_csv(tmp_path / "results.csv")
    assert [r["system"] for r in rows] == ["stream", "lean", "lean-nosplit", "flashinfer"]
    assert "B1 32/8 D128 fp16 L4k" in (tmp_path / "results.md").read_text()
    assert bench.main([*args[:-1], r"B1 32/8 D128 fp16 L(4k|16k)$", "--resume"]) == 0
    rows = bench.read_csv(tmp_path / "results.csv")
    assert [r["shape"] for r in rows].count("B1 32/8 D128 fp16 L4k") == 4 and len(rows) == 8
    assert capsys.readouterr().out.count("1 shapes x 3 systems") == 2  # the second run ran only L16k


def test_result_meta_argv_carries_no_machine_path(monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(bench.REPO / "lean_tvm" / "bench.py"), "--out", "/abs/out", "--quick"])
    assert bench.portable_argv() == ["lean_tvm/bench.py", "--quick"]


def test_runner_and_paged_copy_say_why_a_system_cannot_run(monkeypatch):
    """The per-system dispatch scripts/ncu_profile.py shares: a fixed split is a sweep, not one
    call; a paged peer that cannot load refuses before the cache is copied; others need no copy."""
    monkeypatch.setattr(bench, "Timer", FakeTimer)
    b = bench.Bench(torch.device("cpu"), ("lean", "flashinfer"), reps=3, seed=0)
    case = bench.make_case(bench.uniform(1, 64, 8, 2, 64), torch.device("cpu"), 0)
    with pytest.raises(bench.Unsupported, match="sweep"):
        b.runner("lean-fixedsplit", case, None)
    assert b.paged_for("lean", case, None) is None and b.paged_for("cudnn", case, None) is None
    with pytest.raises(bench.Unsupported, match="flashinfer"):
        b.paged_for("flashinfer", case, None)  # not importable on this machine
