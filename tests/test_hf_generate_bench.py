"""The generate() benchmark (``lean_tvm.bench.hf_generate``) on a CPU: a tiny model through every
step of a GPU run (caches filled and rewound, interleaved rounds, the compiled static-cache path,
the profiler's attention share, the files), and its table."""

import csv

import pytest

from lean_tvm.bench import hf_generate

pytest.importorskip("tvm")  # the CPU library


def test_a_cpu_run_writes_every_row_and_the_table(tmp_path):
    argv = ["--out", str(tmp_path), "--models", "llama-tiny", "--batches", "2", "--prompts", "24", "--new-tokens", "4",
            "--rounds", "2", "--backends", "sdpa,lean_tvm", "--layers", "2", "--dtype", "float16", "--device", "cpu",
            "--compile-backend", "eager", "--prefill-chunk", "10"]
    assert hf_generate.main(argv) == 0
    with (tmp_path / "results.csv").open() as f:
        rows = {(r["backend"], r["mode"]): r for r in csv.DictReader(f)}
    assert set(rows) == {(b, m) for b in ("sdpa", "lean_tvm") for m in ("eager", "compiled")}
    assert all(float(r["tokens_per_s"]) > 0 and r["rounds"] == "2" and not r["note"] for r in rows.values())
    assert rows["lean_tvm", "eager"]["lean_calls"] == str(2 * 4)  # every step of every layer
    assert rows["lean_tvm", "compiled"]["lean_calls"] == "2"  # the eager first step; compiled calls are not counted
    assert 0 < float(rows["lean_tvm", "eager"]["attention_share"]) < 1
    assert float(rows["sdpa", "compiled"]["agree"]) == 1.0  # the rewound static cache decodes what the dynamic one does
    table = (tmp_path / "results.md").read_text()
    assert "| llama-tiny | 2 | 24 |" in table and "lean_tvm / best other, compiled" in table


def test_the_table_compares_lean_tvm_with_the_best_other_backend_in_each_mode():
    rows = [dict(model="m", batch=1, prompt=8, backend=b, mode=m, tokens_per_s=v, note="", attention_share=0.5,
                 new_tokens=4, dtype="bfloat16", layers=4)
            for (b, m), v in {("sdpa", "eager"): 100, ("sdpa", "compiled"): 300, ("lean_tvm", "eager"): 150,
                              ("lean_tvm", "compiled"): 360}.items()]
    line = next(x for x in hf_generate.markdown(rows, {}).splitlines() if x.startswith("| m |"))
    assert line == "| m | 1 | 8 | 100 | 300 | 150 | 360 | 1.50x | 1.20x | 50% |"
