"""CPU-only tests of the benchmark package: the grid, the byte arithmetic, the derived numbers, the
writers, the page copy, interleaved timing, and one shape run end to end with the GPU pieces
replaced by fakes."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys

import paged_cases
import pytest
import torch

import lean_tvm
from lean_tvm import runtime as rt
from lean_tvm.bench import grid as G
from lean_tvm.bench import libraries, report, suite, systems, timing, tvm_peer
from lean_tvm.bench.timing import Stats
from lean_tvm.reference import decode_attention_reference, gather_pages

K = 1024


# ---------------------------------------------------------------- grid


def test_quick_grid_is_small_and_has_the_named_shapes():
    names = [s.name for s in G.quick_grid()]
    assert 10 <= len(names) <= 16
    for must in ("B1 32/8 D128 fp16 L4k", "B1 32/8 D128 fp16 L16k", "B1 32/8 D128 fp16 L64k",
                 "B32 32/8 D128 fp16 L2k", "B128 32/8 D128 fp16 L1k", "B1 8/1 D128 fp16 L32k",
                 "B4 28/4 D128 fp16 L12k", "ragged 2x64k+30x512 64/8 D128 fp16"):
        assert must in names
    assert sum(n.startswith("ragged") for n in names) >= 2
    assert len(set(names)) == len(names)


def test_full_grid_covers_the_issue():
    grid = G.full_grid()
    names = {s.name for s in grid}
    assert len(names) == len(grid)
    b1 = [s for s in grid if s.batch == 1 and (s.hq, s.hkv, s.head_dim, s.dtype) == (32, 8, 128, "float16")]
    assert sorted(s.max_len for s in b1) == [1 << p for p in range(10, 20)]  # 1k .. 512k
    for hq, hkv in G.HEADS + G.ODD_HEADS:
        assert any(s.hq == hq and s.hkv == hkv for s in grid)
    assert {s.head_dim for s in grid} == {64, 128, 256}
    assert {s.dtype for s in grid} == {"float16", "bfloat16"}
    assert {s.batch for s in grid if not s.ragged} == {1, 4, 8, 16, 32, 64, 128}
    ragged = [s for s in grid if s.ragged]
    assert len(ragged) == 5
    # bf16 and D != 128 stay a subset
    assert sum(s.dtype == "bfloat16" for s in grid) < sum(s.dtype == "float16" and s.head_dim == 128 for s in grid) / 4


def test_grid_respects_the_byte_cap():
    full = G.full_grid()
    for cap in (40e9, 5e9, 1e9, 100e6):
        grid = G.full_grid(cap)
        assert all(s.kv_bytes <= cap for s in grid)
        assert {s.name for s in grid} == {s.name for s in full if s.kv_bytes <= cap}
    assert len(G.full_grid(100e6)) < len(G.full_grid(1e9)) < len(full)
    assert all(s.kv_bytes <= 1e9 for s in G.quick_grid(1e9))


def test_ragged_lengths_are_seeded_and_in_range():
    a, b = G.ragged_shapes(0), G.ragged_shapes(0)
    assert [s.lens for s in a] == [s.lens for s in b]
    assert [s.lens for s in G.ragged_shapes(1)] != [s.lens for s in a]
    by = {s.name.split()[1]: s for s in a}
    one = by["1x128k+15x1k-4k"]
    assert one.lens[0] == 128 * K and len(one.lens) == 16 and all(K <= n <= 4 * K for n in one.lens[1:])
    assert by["4x32k+28x1k"].lens == (32 * K,) * 4 + (K,) * 28
    r48 = by["48x1-16k"].lens
    assert len(r48) == 48 and all(1 <= n <= 16 * K for n in r48)
    big = by["2x64k+30x512"]
    assert (big.hq, big.hkv) == (64, 8) and big.lens == (64 * K,) * 2 + (512,) * 30
    # the quick grid's ragged shape has the same lengths as the full grid's
    quick = {s.name: s for s in G.quick_grid()}
    assert quick[one.name].lens == one.lens


def test_select_and_parse_systems():
    grid = G.full_grid()
    sel = G.select_shapes(grid, r"^B1 32/8 D128 fp16 ")
    assert len(sel) == 10
    assert suite.parse_systems(None) == report.SYSTEMS
    assert suite.parse_systems("cudnn, lean") == ("lean", "cudnn")
    with pytest.raises(SystemExit):
        suite.parse_systems("lean,nope")


# ---------------------------------------------------------------- bytes and derived numbers


def test_bytes_to_move():
    s = G.uniform(1, 4 * K, 32, 8)
    assert s.kv_bytes == 2 * 4096 * 8 * 128 * 2 == 16_777_216
    assert s.move_bytes == s.kv_bytes + 2 * 32 * 128 * 2
    r = G.ragged("t", [100, 37, 1], hq=8, hkv=2, d=64, dtype="bfloat16")
    assert r.kv_bytes == 2 * (100 + 37 + 1) * 2 * 64 * 2
    assert r.move_bytes == r.kv_bytes + 2 * 3 * 8 * 64 * 2
    assert r.alloc_len == 112 and r.max_len == 100 and r.total_len == 138 and r.batch == 3
    assert G.kv_bytes([4096] * 8, 8, 128, 2) == 8 * s.kv_bytes


def test_ratio_and_percent_math():
    assert report.pct_of_stream(9.6, 16.0) == pytest.approx(60.0)
    assert report.pct_of_stream(10.0, 10.0) == 100.0
    assert math.isnan(report.pct_of_stream(10.0, float("nan")))
    assert math.isnan(report.pct_of_stream(float("nan"), 10.0))
    assert report.speedup(20.0, 10.0) == 2.0
    assert math.isnan(report.speedup(20.0, float("nan")))
    assert report.tbps(3e6, 1.0) == 3.0  # 3 MB in 1 us = 3 TB/s


def fake_rows(shape, times: dict[str, float], **extra):
    rows = [report.shape_row(shape, name, median_us=us, p10_us=us * 0.9, p90_us=us * 1.1, reps=30,
                            **extra.get(name, {})) for name, us in times.items()]
    return report.derive(rows)


def test_derive_and_best_peer():
    s = G.uniform(1, 4 * K, 32, 8)
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
    assert report.best_peer(rows) == ("cudnn", 16.0)  # lean-nosplit is not a peer, flash has no number
    assert report.best_peer(fake_rows(s, {"stream": 1.0, "lean": 2.0})) == (None, pytest.approx(float("nan"),
                                                                                               nan_ok=True))


# ---------------------------------------------------------------- writers


def _two_shapes():
    a, b = G.uniform(1, 4 * K, 32, 8), G.ragged("4x32k+28x1k", [32 * K] * 4 + [K] * 28)
    rows = fake_rows(a, {"stream": 9.6, "lean": 10.0, "lean-fixedsplit": 11.0, "cudnn": 17.2, "flash": 24.0},
                     **{"lean": {"host_us": 8.0, "graph_us": 4.0, "ok": True},
                        "lean-fixedsplit": {"splits": 16, "backend": "S=16", "ok": True}})
    rows += fake_rows(b, {"stream": 220.0, "lean": 230.0, "cudnn": 1400.0, "flash": float("nan")},
                      **{"lean": {"ok": False, "note": "output differs"},
                         "flash": {"note": "SDPA flash refused (padded + mask): no mask support"}})
    return rows


def test_markdown_table():
    rows = _two_shapes()
    md = report.markdown(rows, {"gpu": "FAKE GPU", "sms": 132, "commit": "abc", "date": "today", "reps": 30})
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
    assert report.markdown(rows).startswith("| shape |")  # no meta: table only


def test_csv_round_trip(tmp_path):
    rows = _two_shapes()
    report.write_csv(rows, tmp_path / "results.csv")
    back = report.read_csv(tmp_path / "results.csv")
    assert len(back) == len(rows)
    assert list(back[0].keys())[:len(report.FIELDS)] == list(report.FIELDS)
    for r, b in zip(rows, back, strict=True):
        assert b["shape"] == r["shape"] and b["system"] == r["system"]
        for k in ("median_us", "pct_stream", "lean_speedup", "kv_bytes"):
            assert (math.isnan(r[k]) and math.isnan(b[k])) or b[k] == pytest.approx(r[k], rel=1e-5)
        assert b["ok"] == r["ok"]
    assert report.markdown(back) == report.markdown(rows)


def test_write_outputs_and_replot(tmp_path):
    pytest.importorskip("matplotlib")
    rows = []
    for n in (4 * K, 16 * K, 64 * K):
        rows += fake_rows(G.uniform(1, n, 32, 8), {"stream": n / 400, "lean": n / 350, "cudnn": n / 300})
    meta = {"gpu": "FAKE", "date": "now"}
    report.write_outputs(rows, meta, tmp_path)
    for f in ("results.csv", "results.md", "meta.json", "time_vs_context.png", "pct_vs_context.png"):
        assert (tmp_path / f).stat().st_size > 0
    assert json.loads((tmp_path / "meta.json").read_text())["gpu"] == "FAKE"
    (tmp_path / "results.md").unlink()
    assert suite.main(["--replot", str(tmp_path)]) == 0
    assert "FAKE" in (tmp_path / "results.md").read_text()


def test_gpu_dir_name():
    assert suite.gpu_dir_name("NVIDIA H100 80GB HBM3") == "h100"
    assert suite.gpu_dir_name("NVIDIA H200") == "h200"
    assert suite.gpu_dir_name("NVIDIA GeForce RTX 4090") == "nvidia-geforce-rtx-4090"


def test_list_needs_no_gpu(capsys):
    assert suite.main(["--list", "--full", "--cap-gb", "1"]) == 0
    out = capsys.readouterr().out
    assert out.strip().endswith("shapes") and "L512k" not in out.split("32/32")[0]


# ---------------------------------------------------------------- pages


def test_page_table_and_copy():
    lens = [100, 16, 1, 33]
    indptr, last = systems.page_table(lens)
    assert indptr == [0, 7, 8, 9, 12] and last == [4, 16, 1, 1]
    kv = torch.randn(2, 4, 3, 112, 8)
    pages = systems.copy_into_pages(kv, indptr)
    assert pages.shape == (12, 2, 3, 16, 8)
    for b, n in enumerate(lens):  # reading the pages back in order gives the sequence's K and V rows
        seq = pages[indptr[b]:indptr[b + 1]].permute(1, 2, 0, 3, 4).reshape(2, 3, -1, 8)[:, :, :n]
        assert torch.equal(seq, kv[:, b, :, :n])


def test_tvm_pages_gather_back_to_the_dense_cache():
    """The paged copy the paged peers read holds exactly the dense cache's rows."""
    shape = G.ragged("t", [100, 16, 1, 33], hq=8, hkv=2, d=64)
    case = systems.make_case(shape, torch.device("cpu"), seed=0)
    paged = systems.paged_cache(case)
    last = paged.last_page_len
    pc = paged_cases.PagedCase(case.q, paged.kv, paged.indptr, paged.indices, last, list(shape.lens))
    k, v = paged_cases.dense_from_pages(pc)
    for b, n in enumerate(shape.lens):
        assert torch.equal(k[b, :, :n], case.k[b, :, :n]) and torch.equal(v[b, :, :n], case.v[b, :, :n])


def test_tvm_peer_variants_cover_the_grid():
    variants = tvm_peer.suite_variants()
    assert len(variants) == len(set(variants)) == len({v.name for v in variants}) == 12
    for s in G.full_grid() + G.quick_grid() + G.serving_grid():
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
    shape = G.ragged("t", [100, 16, 1, 33], hq=8, hkv=2, d=64)
    case = systems.make_case(shape, torch.device("cpu"), seed=0)
    case.ref, case.ref_kind = systems.reference(case)
    runner = systems.tvm_runner(case, FakeTvmPeer(lse_log2), systems.paged_cache(case))
    err, ok = systems.check(runner, case)
    assert ok is lse_log2  # a natural-log lse taken for log2 is off by ln 2: caught
    assert case.ref_lse.shape == (4, 8)
    assert systems.rel_error(runner.output(), case.ref) < 1e-3


def test_reference_lse_matches_float64():
    shape = G.uniform(2, 96, 8, 4, 32)
    case = systems.make_case(shape, torch.device("cpu"), seed=1)
    _, lse = decode_attention_reference(case.q, case.k, case.v, shape.lens, case.scale)
    chunked = systems.reference_lse(case, chunk_bytes=96 * 32 * 4)  # one KV head per chunk
    assert torch.allclose(chunked.double(), lse, atol=1e-5)


def test_bench_kernels_say_how_to_build_them(tmp_path):
    shape = G.uniform(1, 4 * K, 32, 8)
    lib = libraries.BenchLibrary(tmp_path)  # no bench_manifest.json there
    assert "python -m lean_tvm.bench.libraries" in lib.error
    with pytest.raises(RuntimeError, match="lean_tvm.bench.libraries"):
        lib.stream_read()
    with pytest.raises(systems.Unsupported, match="lean_tvm.bench.libraries"):
        systems.TvmPeer(lib).kernel(shape)
    (tmp_path / libraries.BENCH_MANIFEST).write_text(json.dumps({"arch": "sm_90a", "library": "x.so",
                                                                 "kernels": []}))
    with pytest.raises(systems.Unsupported, match="--with-tvm-peer"):
        systems.TvmPeer(libraries.BenchLibrary(tmp_path)).kernel(shape)
    (tmp_path / libraries.BENCH_MANIFEST).write_text(json.dumps({
        "arch": "sm_90a", "library": "x.so", "kernels": [],
        tvm_peer.MANIFEST_KEY: {"library": "tvm_decode_sm_90a.so", "kernels": [
            {"name": "k", "hq": 32, "hkv": 8, "head_dim": 128, "dtype": "float16"}]}}))
    with pytest.raises(systems.Unsupported, match="TVM peer library not loadable"):  # its file is not there
        systems.TvmPeer(libraries.BenchLibrary(tmp_path)).kernel(shape)


def test_fa3_missing_is_a_reason(monkeypatch, tmp_path):
    monkeypatch.setenv("LEAN_TVM_FA3", str(tmp_path))
    monkeypatch.setattr(sys, "path", [])
    fa3 = systems.FA3(torch.device("cpu"))
    assert "FA3 not loadable" in fa3.error
    case = systems.make_case(G.uniform(1, 64, 8, 2, 64), torch.device("cpu"), 0)
    with pytest.raises(systems.Unsupported, match="FA3 not loadable"):
        systems.fa3_runner(case, fa3)


# ---------------------------------------------------------------- one shape end to end, GPU faked


class FakeTimer:
    def __init__(self, device):
        self.device = device

    def warm_clocks(self, ms=150.0):
        pass

    def device_samples(self, fn, reps=30, warmup=3):
        fn()
        return [10.0] * reps

    def device_time(self, fn, reps=30, warmup=3):
        return Stats.of(self.device_samples(fn, reps, warmup))

    def host_time(self, fn, reps=1000):
        fn()
        return 5.0


class FakeLib:
    manifest = {"arch": "sm_90a"}

    def attention_kernel(self, dtype, head_dim, group, batch=1):
        return rt.KernelInfo("fake", dtype, head_dim, 8, 64, 1) if group <= 8 else None


class FakeBenchLib:
    error = ""

    def stream_read(self):
        def read(x, sink, grid):
            assert x.shape[1] == 8 and x.dtype == torch.float16

        return read

    def tvm_peer(self):
        return None


def exact(q, k, v, seq_lens, scale):
    """Attention in float64 over [B, Hkv, L, D] caches."""
    g = q.shape[1] // k.shape[1]
    out = torch.empty(q.shape, dtype=torch.float64)
    for b, n in enumerate(seq_lens.tolist()):
        kk = k[b, :, :n].double().repeat_interleave(g, 0)
        vv = v[b, :, :n].double().repeat_interleave(g, 0)
        p = torch.softmax(torch.einsum("hd,hld->hl", q[b].double(), kk) * scale, -1)
        out[b] = torch.einsum("hl,hld->hd", p, vv)
    return out


def fake_launch(q, k, v, seq_lens, out, lse, scale, num_splits=0, num_ctas=None, kernel=None):
    """Exact attention; wrong on purpose at num_splits=4, to see the suite notice."""
    out.copy_(exact(q, k, v, seq_lens, scale))
    if num_splits == 4:
        out.mul_(1.5)


def fake_decode_attention(q, k, v, lens, *, softmax_scale, out, layout, block_table=None):
    if block_table is not None:
        k, v = gather_pages(k, block_table, lens.tolist(), layout), gather_pages(v, block_table, lens.tolist(), layout)
    elif layout == "blhd":
        k, v = k.transpose(1, 2), v.transpose(1, 2)
    out.copy_(decode_attention_reference(q, k, v, lens.tolist(), softmax_scale)[0])
    return out


def fake_gpu(monkeypatch):
    monkeypatch.setattr(suite, "Timer", FakeTimer)
    monkeypatch.setattr(suite, "BenchLibrary", lambda folder: FakeBenchLib())
    monkeypatch.setattr(rt, "library_for", lambda device: FakeLib())
    monkeypatch.setattr(rt, "launch_attention", fake_launch)
    monkeypatch.setattr(lean_tvm, "decode_attention", fake_decode_attention)
    monkeypatch.setattr(suite, "graph_host_us", lambda timer, runner, us: 3.0)


def test_one_shape_end_to_end_with_fakes(monkeypatch, tmp_path):
    fake_gpu(monkeypatch)
    monkeypatch.setenv("LEAN_TVM_FA3", str(tmp_path))  # no FA3 here
    b = suite.Bench(torch.device("cpu"), report.SYSTEMS, reps=3, rounds=2, seed=0)
    assert b.fi is not None and b.fi.error  # no flashinfer here
    for shape in (G.uniform(2, 300, 8, 2, 64),
                  G.ragged("t", [260, 37, 1], hq=8, hkv=2, d=64)):
        seen = []
        rows = b.run_shape(shape, seen.append)
        assert seen == list(report.SYSTEMS)
        by = {r["system"]: r for r in rows}
        assert set(by) == {report.STREAM, *report.SYSTEMS}
        for lean in ("lean", "lean-blhd", "lean-nosplit"):
            assert by[lean]["ok"] is True and by[lean]["rel_err"] < 1e-2, lean
            assert by[lean]["reps"] == 6 and by[lean]["median_us"] == 10.0  # 2 rounds x 3 calls
        assert by["lean"]["graph_us"] == 3.0 and by["lean"]["host_us"] == 5.0
        assert by["lean"]["pct_stream"] == pytest.approx(100.0)
        fs = by["lean-fixedsplit"]
        assert fs["splits"] == 2 and fs["ok"] is True and "S=4 rel. err" not in fs["note"]
        assert "best of" in fs["note"]
        for fi in ("flashinfer", "flashinfer-tc"):
            assert math.isnan(by[fi]["median_us"]) and "flashinfer not importable" in by[fi]["note"]
        for fa in ("fa3", "fa3-best"):
            assert math.isnan(by[fa]["median_us"]) and "FA3 not loadable" in by[fa]["note"]
        assert math.isnan(by[report.TVM_TIR]["median_us"]) and "--with-tvm-peer" in by[report.TVM_TIR]["note"]
        for sd in ("cudnn", "flash"):  # CPU SDPA: either a checked number or a recorded reason
            assert by[sd]["ok"] is True or by[sd]["note"]
        assert by[report.STREAM]["round_lo_us"] == 10.0
    md = report.markdown(rows)
    assert "flashinfer not importable" in md


def test_serving_rows_end_to_end_with_fakes(monkeypatch, tmp_path):
    """Paged and several-token rows: the lean row reads the page pool, lean-dense the dense copy,
    the dense kernel's variants say they do not apply, SDPA gets the bottom-right mask."""
    fake_gpu(monkeypatch)
    monkeypatch.setenv("LEAN_TVM_FA3", str(tmp_path))
    b = suite.Bench(torch.device("cpu"), report.SYSTEMS, reps=2, rounds=1, seed=0)
    for shape in (G.served(G.uniform(2, 300, 8, 2, 64), 16, 3), G.served(G.ragged("t", [260, 37, 1], hq=8, hkv=2,
                                                                                     d=64), 4)):
        by = {r["system"]: r for r in b.run_shape(shape)}
        for lean in ("lean", "lean-dense"):
            assert by[lean]["ok"] is True and by[lean]["rel_err"] < 1e-2, (shape.name, lean, by[lean]["note"])
        for dense_only in ("lean-blhd", "lean-nosplit", "lean-fixedsplit"):
            assert "dense one-token rows" in by[dense_only]["note"]
        assert by["cudnn"]["ok"] is True or by["cudnn"]["note"]
        assert by["lean"]["move_bytes"] == shape.move_bytes


@pytest.mark.skipif(not hasattr(torch, "float8_e4m3fn"), reason="torch without fp8")
def test_fp8_rows_end_to_end_on_the_cpu_library(monkeypatch, tmp_path):
    """fp8 rows: lean reads the e4m3 cache with its scales, lean-16bit the same values in 16 bits
    (both the real CPU library, checked against the reference), the bytes are the fp8 ones, and
    the systems that take no fp8 cache say so."""
    pytest.importorskip("tvm")
    monkeypatch.setattr(suite, "Timer", FakeTimer)
    monkeypatch.setattr(suite, "BenchLibrary", lambda folder: FakeBenchLib())
    monkeypatch.setattr(suite, "graph_host_us", lambda timer, runner, us: 3.0)
    monkeypatch.setenv("LEAN_TVM_FA3", str(tmp_path))
    b = suite.Bench(torch.device("cpu"), report.SYSTEMS, reps=2, rounds=1, seed=0)
    dense = G.quantized(G.uniform(2, 300, 8, 2, 64))
    assert dense.kv_bytes * 2 == G.uniform(2, 300, 8, 2, 64).kv_bytes and dense.serving
    for shape in (dense, G.served(G.quantized(G.ragged("t", [260, 37, 1], hq=8, hkv=2, d=64)), 16)):
        by = {r["system"]: r for r in b.run_shape(shape)}
        for lean in ("lean", "lean-16bit"):
            assert by[lean]["ok"] is True and by[lean]["rel_err"] < 1e-2, (shape.name, lean, by[lean]["note"])
        assert by["lean"]["kv_bytes"] == shape.kv_bytes
        for dense_only in ("lean-blhd", "lean-nosplit", "lean-fixedsplit"):
            assert "dense one-token rows" in by[dense_only]["note"]
        assert "no fp8 cache" in by["cudnn"]["note"] and "no fp8 cache" in by[report.TVM_TIR]["note"]
        assert ("paged" in by["lean-dense"]["note"]) == (shape.page_size == 0)


def test_page_pool_holds_the_dense_rows():
    shape = G.served(G.ragged("t", [100, 16, 1, 33], hq=8, hkv=2, d=64), 8)
    case = systems.make_case(shape, torch.device("cpu"), seed=0)
    for kv in (0, 1):
        dense = gather_pages(case.pool[kv], case.table, list(shape.lens), "blhd")
        for b, n in enumerate(shape.lens):
            assert torch.equal(dense[b, :, :n], case.kv[kv, b, :, :n])
    used = torch.cat([case.table[b, :-(-n // 8)] for b, n in enumerate(shape.lens)])
    assert sorted(used.tolist()) == list(range(case.pool.shape[1])) and used.tolist() != sorted(used.tolist())


def test_a_sweep_skips_wrong_candidates(monkeypatch):
    fake_gpu(monkeypatch)
    b = suite.Bench(torch.device("cpu"), ("lean-fixedsplit",), reps=3, rounds=1, seed=0)
    case = systems.make_case(G.uniform(2, 300, 8, 2, 64), torch.device("cpu"), 0)
    case.ref, case.ref_kind = systems.reference(case)
    runner, res = b._best_of({"S=4": lambda: systems.lean_split_runner(case, 4)}, case)
    assert res["ok"] is False and "S=4 rel. err" in res["note"]


def test_interleaved_rounds_rotate_and_take_the_median_of_round_medians():
    calls = []

    class Clock:
        def device_samples(self, fn, reps, warmup=1):
            fn()
            name = calls[-1]
            slow = len([c for c in calls if c == name]) == 2  # each system's second round is slow
            return [100.0 if slow else 10.0 + i for i in range(reps)]

    fns = {n: ((lambda n=n: calls.append(n)), contextlib.nullcontext) for n in ("a", "b", "c")}
    out = timing.interleaved(Clock(), fns, rounds=3, reps=3)
    assert calls[:3] == ["a", "b", "c"] and calls[3:6] == ["b", "c", "a"] and calls[6:] == ["c", "a", "b"]
    for st in out.values():
        assert st.median == 11.0 and st.round_lo == 11.0 and st.round_hi == 100.0 and st.n == 9


def test_split_candidates():
    s = G.uniform(1, 4 * K, 32, 8)
    assert suite.split_candidates(s, 64, 8) == [2, 4, 8, 16, 32, 64]  # 64 blocks: no 128
    assert suite.split_candidates(G.uniform(1, 64, 32, 8), 64, 8) == []
    big = G.uniform(64, 16 * K, 32, 32)
    assert max(suite.split_candidates(big, 64, 8)) * 64 * 32 * 8 * 128 * 4 <= 2 << 30


def test_chunked_float64_reference_matches_sdpa():
    shape = G.uniform(2, 96, 8, 4, 32)
    case = systems.make_case(shape, torch.device("cpu"), seed=1)
    ref = systems.reference_float64(case, chunk_bytes=96 * 32 * 8)  # one KV head per chunk
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        case.q[:, :, None].double(), case.k.double(), case.v.double(), scale=case.scale, enable_gqa=True)[:, :, 0]
    assert torch.allclose(ref, sdpa, atol=1e-10)
    assert systems.rel_error(ref.half(), ref.float()) < systems.tolerance("float16")
    assert systems.rel_error(torch.full_like(ref, float("nan")), ref.float()) == math.inf


def test_main_loop_with_fakes(monkeypatch, tmp_path, capsys):
    """The CLI loop: progress, results after every shape, --resume skipping what is done."""
    fake_gpu(monkeypatch)
    monkeypatch.setattr(suite, "bench_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(suite.torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(suite, "collect_meta", lambda device, args, bench: {"gpu": "FAKE", "reps": args.reps})
    monkeypatch.setattr(suite, "gpu_clocks", lambda device: {})
    args = ["--out", str(tmp_path), "--only", "lean,lean-nosplit,flashinfer", "--shapes", r"B1 32/8 D128 fp16 L4k$",
            "--rounds", "2", "--reps", "2"]
    assert suite.main(args) == 0
    rows = report.read_csv(tmp_path / "results.csv")
    assert [r["system"] for r in rows] == ["stream", "lean", "lean-nosplit", "flashinfer"]
    assert "B1 32/8 D128 fp16 L4k" in (tmp_path / "results.md").read_text()
    args[args.index("--shapes") + 1] = r"B1 32/8 D128 fp16 L(4k|16k)$"
    assert suite.main([*args, "--resume"]) == 0
    rows = report.read_csv(tmp_path / "results.csv")
    assert [r["shape"] for r in rows].count("B1 32/8 D128 fp16 L4k") == 4 and len(rows) == 8
    assert capsys.readouterr().out.count("1 shapes x 3 systems") == 2  # the second run ran only L16k


def test_result_meta_argv_carries_no_machine_path(monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(suite.REPO / "lean_tvm" / "bench" / "suite.py"), "--out", "/abs/out",
                                      "--quick"])
    assert suite.portable_argv() == ["lean_tvm/bench/suite.py", "--quick"]


def test_runner_and_paged_copy_say_why_a_system_cannot_run(monkeypatch):
    """The per-system dispatch the ncu profiler shares: a sweep is not one call; a paged peer that
    cannot load refuses before the cache is copied; others need no copy."""
    fake_gpu(monkeypatch)
    b = suite.Bench(torch.device("cpu"), ("lean", "flashinfer"), reps=3, rounds=1, seed=0)
    case = systems.make_case(G.uniform(1, 64, 8, 2, 64), torch.device("cpu"), 0)
    for sweep in ("lean-fixedsplit", "fa3-best"):
        with pytest.raises(systems.Unsupported, match="sweep"):
            b.runner(sweep, case, None)
    assert b.paged_for("lean", case, None) is None and b.paged_for("cudnn", case, None) is None
    with pytest.raises(systems.Unsupported, match="flashinfer"):
        b.paged_for("flashinfer", case, None)  # not importable on this machine


def test_tune_select_picks_plain_and_batch_knobs_and_keeps_a_near_tie():
    """Plain knobs from the few-tile shapes, batch knobs from the many-tile ones, and the current
    knobs kept unless a candidate beats them by KEEP_MARGIN."""
    from lean_tvm.bench import tune

    few_shapes = [s[0] for s in tune.SHAPES if s[1] * s[3] < 256]
    many_shapes = [s[0] for s in tune.SHAPES if s[1] * s[3] >= 256]
    knobs = {"a": {"rows_per_warp": 16, "num_warps": 8, "stages": 2, "ctas_per_sm": 1},
             "b": {"rows_per_warp": 32, "num_warps": 4, "stages": 2, "ctas_per_sm": 1},
             "c": {"rows_per_warp": 16, "num_warps": 4, "stages": 2, "ctas_per_sm": 2}}
    manifest = {"kernels": [{"name": n, "op": "decode_attention", "knobs": k} for n, k in knobs.items()]}

    def times(few: dict, many: dict):
        return {"gpu": "FAKE", "date": "today", "times": [
            {"kernel": n, "dtype": "float16", "head_dim": 128, "max_group": 8, "shape": s,
             "us": (few if s in few_shapes else many)[n]} for n in knobs for s in few_shapes + many_shapes]}

    results = times({"a": 10.0, "b": 9.95, "c": 12.0}, {"a": 10.0, "b": 10.0, "c": 9.0})
    current = [{"head_dim": 128, "max_group": 8, "knobs": knobs["a"]}]
    def picked(k):
        return {f: k[f] for f in knobs["a"]}

    (rec,) = tune.select(results, manifest, current)
    assert picked(rec["knobs"]) == knobs["a"]  # b is only 0.5% better: a stays
    assert rec["batch_knobs"] == knobs["c"] and set(rec["batch_times_us"]) == set(many_shapes)
    (rec,) = tune.select(times({"a": 10.0, "b": 9.0, "c": 12.0}, {"a": 10.0, "b": 9.0, "c": 9.5}), manifest, current)
    assert picked(rec["knobs"]) == knobs["b"] and "batch_knobs" not in rec  # b wins both, by 10%


def test_tune_select_drops_a_wrong_candidate_and_records_the_fp8_kernel_apart():
    """A candidate whose output missed the reference is never picked, however fast; an fp8
    family's record names its cache dtype, so the 16-bit record of the same kernel stays."""
    from lean_tvm.bench import tune

    knobs = {"fast_wrong": {"rows_per_warp": 64, "num_warps": 4, "stages": 2, "ctas_per_sm": 1},
             "right": {"rows_per_warp": 32, "num_warps": 8, "stages": 2, "ctas_per_sm": 1}}
    manifest = {"kernels": [{"name": n, "op": "decode_attention", "knobs": k} for n, k in knobs.items()]}
    results = {"gpu": "FAKE", "date": "today", "times": [
        {"kernel": n, "dtype": "float16", "kv_dtype": "float8_e4m3fn", "head_dim": 128, "max_group": 8, "shape": s[0],
         "us": 5.0 if n == "fast_wrong" else 9.0, "max_err": 0.5 if n == "fast_wrong" else 3e-4}
        for n in knobs for s in tune.SHAPES]}
    (rec,) = tune.select(results, manifest, [{"head_dim": 128, "max_group": 8, "knobs": knobs["fast_wrong"]}])
    assert rec["kv_dtype"] == "float8_e4m3fn" and rec["knobs"]["rows_per_warp"] == 32


def test_fp8_kernels_share_a_record_across_fp8_dtypes_and_fall_back_to_the_16bit_one():
    """e5m2 takes e4m3's record (same bytes, same code but one instruction); without any fp8
    record an fp8 kernel takes the 16-bit knobs with twice the stages and the 16-bit tile cost."""
    from lean_tvm.schedule_records import batch_knobs, batch_tile_cost, knobs_for
    from lean_tvm.spec import AttentionSpec, GpuKnobs

    k16 = {"rows_per_warp": 16, "num_warps": 8, "stages": 2, "ctas_per_sm": 1}
    k8 = {"rows_per_warp": 32, "num_warps": 8, "stages": 2, "ctas_per_sm": 1}
    b8 = {"rows_per_warp": 32, "num_warps": 4, "stages": 2, "ctas_per_sm": 2}
    base = {"head_dim": 128, "max_group": 8, "knobs": k16, "batch_tile_cost": 6}
    fp8 = {"kv_dtype": "float8_e4m3fn", "head_dim": 128, "max_group": 8, "knobs": k8, "batch_knobs": b8}
    e5m2 = AttentionSpec("float16", 128, 8, kv_dtype="float8_e5m2")
    assert knobs_for([base, fp8], e5m2, "sm_90a") == GpuKnobs(**k8)
    assert batch_knobs([base, fp8], e5m2, "sm_90a") == GpuKnobs(**b8)
    assert batch_tile_cost([base, fp8], e5m2) == 6  # the fp8 record has none of its own
    assert knobs_for([base], e5m2, "sm_90a") == GpuKnobs(**{**k16, "stages": 4})
    assert knobs_for([base, fp8], AttentionSpec("float16", 128, 8), "sm_90a") == GpuKnobs(**k16)


@pytest.mark.parametrize("kv_dtype", [None, "float8_e4m3fn"])
def test_tune_case_reference_is_attention_over_the_real_values(kv_dtype):
    """The tuner's correctness gate compares each candidate with this reference: softmax(q K^T) V per
    sequence over its own length, on the dequantised values (each head's scale) for an fp8 cache."""
    from lean_tvm.bench.tune import _Case

    lens = [100, 37, 64]
    case = _Case(torch.device("cpu"), "float16", kv_dtype, 3, 8, 2, 64, lens)
    k, v = case.k.float(), case.v.float()
    if kv_dtype:
        k, v = k * case.scales[0].view(1, 2, 1, 1), v * case.scales[1].view(1, 2, 1, 1)
    for b, n in enumerate(lens):
        for h in range(8):
            p = torch.softmax(case.q[b, 0, h].float() @ k[b, h // 4, :n].T * case.scale, -1)
            torch.testing.assert_close(case.ref[b, 0, h].float(), p @ v[b, h // 4, :n], atol=1e-5, rtol=1e-5)


def test_fp8_accuracy_on_the_cpu_library(tmp_path):
    """``python -m lean_tvm.bench.fp8_accuracy --device cpu --small``: a row per q dtype, fp8 dtype
    and scale kind, each within the tests' tolerance (exit 0), written to results.md."""
    from lean_tvm.bench import fp8_accuracy

    assert fp8_accuracy.main(["--device", "cpu", "--small", "--out", str(tmp_path)]) == 0
    rows = [ln for ln in (tmp_path / "results.md").read_text().splitlines() if ln.startswith("|") and "| float8" in ln]
    assert len(rows) == 2 * 2 * len(fp8_accuracy.SCALE_KINDS)
    assert all(0 < float(r.split("|")[-2]) <= 1 for r in rows)


def test_pdl_bench_configs_summary_and_table(tmp_path):
    """The PDL benchmark's driver: configurations parsed from the command line, rounds reduced to
    a median per (shape, pattern, configuration) with their range, the table's ratios against the
    first configuration; bad --configs and a machine without CUDA are clear errors."""
    from lean_tvm.bench import pdl

    configs = pdl.parse_configs("pdl:;off:LEAN_TVM_PDL=0;old:LEAN_TVM_LIB_DIR=lib,LEAN_TVM_PDL=0")
    assert configs == [("pdl", {}), ("off", {"LEAN_TVM_PDL": "0"}),
                       ("old", {"LEAN_TVM_LIB_DIR": "lib", "LEAN_TVM_PDL": "0"})]
    for bad in ("pdl:X", "a:;a:", ":B=1"):
        with pytest.raises(SystemExit, match="--configs"):
            pdl.parse_configs(bad)
    samples = [{"shape": "B1", "pattern": "chain", "config": c, "us": us, "p10_us": us - 1, "p90_us": us + 1}
               for c, us in (("pdl", 10.0), ("pdl", 12.0), ("pdl", 11.0), ("off", 13.0), ("off", 15.0))]
    rows = pdl.summarize(samples, ["pdl", "off"])
    assert [(r["config"], r["us"], r["round_lo_us"], r["round_hi_us"], r["rounds"]) for r in rows] == [
        ("pdl", 11.0, 10.0, 12.0, 3), ("off", 14.0, 13.0, 15.0, 2)]
    meta = {"gpu": "G", "date": "D", "commit": "C", "reps": 20, "configs": configs[:2]}
    table = pdl.markdown(rows, ["pdl", "off"], meta)
    assert "| B1 | chain | 11.00 [10.00, 12.00] | 14.00 [13.00, 15.00] | 1.273 |" in table
    assert "`off` (LEAN_TVM_PDL=0)" in table
    report.write_csv(rows, tmp_path / "pdl.csv", fields=list(rows[0]))
    assert (tmp_path / "pdl.csv").read_text().splitlines()[:2] == [
        "shape,pattern,config,us,round_lo_us,round_hi_us,p10_us,p90_us,rounds", "B1,chain,pdl,11,10,12,9,13,3"]
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="CUDA"):
            pdl.main(["--out", str(tmp_path)])


def test_worker_sweep_table_names_the_rule_and_the_best_count(tmp_path):
    from lean_tvm.bench import workers

    rows = [{"shape": "B1 8/1", "workers": n, "rule": int(n == 48), "us": us} for n, us in ((32, 20.0), (48, 19.0),
                                                                                           (64, 17.1))]
    table = workers.markdown(rows, {"gpu": "G", "date": "D", "commit": "C"})
    assert "| B1 8/1 | 48 | 19.0 | 64 | 17.1 | 1.111 | 32: 20.0, 48: 19.0, 64: 17.1 |" in table
    assert {s.name for s in workers.SHAPES} >= {"B1 8/1 D128 fp16 L32k", "B1 32/8 D128 fp16 L4k"}
    assert workers._counts("8,16,132") == (8, 16, 132)
    for bad in ("8,x", "0,16", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="positive integers"):
            workers._counts(bad)
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="CUDA"):
            workers.main(["--out", str(tmp_path)])
