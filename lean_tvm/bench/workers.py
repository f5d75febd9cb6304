"""Sweep the stream-K worker count per shape: what ``plan.stream_k_workers`` should pick.

Every count of a shape is timed in interleaved rounds (``timing.interleaved``, L2 flushed by a
read before each call), beside the count the rule picks for the default call. Writes
``results.csv`` (shape, workers, median, range), ``results.md`` (per shape: the rule's count
and time, the best count and time) and ``meta.json``.

    python -m lean_tvm.bench.workers --out results/h200/workers --shapes 'B1 8/1'
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from lean_tvm import runtime
from lean_tvm.plan import stream_k_workers

from .grid import K, select_shapes, uniform
from .report import write_csv
from .suite import git_commit, portable_argv
from .systems import make_case
from .timing import Timer, gpu_clocks, interleaved

SHAPES = [*(uniform(1, n * K, 8, 1) for n in (2, 8, 16, 32, 64, 128)), uniform(8, 2 * K, 8, 1),
          *(uniform(1, n * K, 32, 8) for n in (2, 4, 16)), uniform(1, K, 32, 32), uniform(1, 4 * K, 64, 8, d=256)]
COUNTS = (8, 16, 24, 32, 48, 64, 96, 128, 132, 192, 264)


def sweep(device: torch.device, shape, counts: Sequence[int], rounds: int, reps: int, timer: Timer) -> list[dict]:
    case = make_case(shape, device, seed=0)
    g = shape.hq // shape.hkv
    info = runtime.library_for(device).attention_kernel(shape.dtype, shape.head_dim, g, shape.batch * shape.hkv)
    resident = runtime.num_sms(device) * info.ctas_per_sm
    rule = stream_k_workers(shape.batch * shape.hkv, -(-shape.max_len // info.block_size), resident)
    out = torch.empty_like(case.q)
    lse = torch.empty(shape.batch, shape.hq, device=device, dtype=torch.float32)

    def call(n):
        return lambda: runtime.launch_attention(case.q, case.k, case.v, case.seq_lens, out, lse, case.scale,
                                                num_ctas=n, kernel=info)

    picks = sorted({n for n in counts if n <= resident} | {rule})
    stats = interleaved(timer, {n: (call(n), contextlib.nullcontext) for n in picks}, rounds, reps)
    return [{"shape": shape.name, "workers": n, "rule": int(n == rule), "us": s.median, "round_lo_us": s.round_lo,
             "round_hi_us": s.round_hi, "p10_us": s.p10, "p90_us": s.p90, "resident": resident,
             "block_size": info.block_size} for n, s in stats.items()]


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# Stream-K worker count sweep, {meta['gpu']}, {meta['date']}, commit {meta['commit']}", "",
             "Device time (us, median of interleaved rounds, L2 flushed); `rule` = `plan.stream_k_workers`'s pick.", "",
             "| shape | rule: workers | rule: us | best: workers | best: us | rule / best | all (workers: us) |",
             "|---|---|---|---|---|---|---|"]
    for shape in dict.fromkeys(r["shape"] for r in rows):
        got = [r for r in rows if r["shape"] == shape]
        rule = next(r for r in got if r["rule"])
        best = min(got, key=lambda r: r["us"])
        every = ", ".join(f"{r['workers']}: {r['us']:.1f}" for r in sorted(got, key=lambda r: r["workers"]))
        lines.append(f"| {shape} | {rule['workers']} | {rule['us']:.1f} | {best['workers']} | {best['us']:.1f} | "
                     f"{rule['us'] / best['us']:.3f} | {every} |")
    return "\n".join(lines) + "\n"


def _counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(c) for c in text.split(","))
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lean_tvm.bench.workers", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for results.csv, results.md, meta.json")
    ap.add_argument("--shapes", help="regex over the shape names")
    ap.add_argument("--counts", type=_counts, default=COUNTS, help="comma-separated worker counts (those past the "
                    "resident CTAs are skipped)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: the sweep times the GPU kernel")
    device = torch.device("cuda")
    timer = Timer(device)
    timer.warm_clocks()
    rows = []
    for shape in select_shapes(SHAPES, args.shapes):
        rows += sweep(device, shape, args.counts, args.rounds, args.reps, timer)
        best = min((r for r in rows if r["shape"] == shape.name), key=lambda r: r["us"])
        print(f"[workers] {shape.name}: best {best['workers']} ({best['us']:.1f} us)", flush=True)
    meta = {"gpu": torch.cuda.get_device_name(device), "clocks": gpu_clocks(device), "commit": git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "rounds": args.rounds, "reps": args.reps, "argv": portable_argv()}
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, args.out / "results.csv", fields=list(rows[0]))
    (args.out / "results.md").write_text(markdown(rows, meta))
    (args.out / "meta.json").write_text(json.dumps(meta, indent=1))
    print((args.out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
