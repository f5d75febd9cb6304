"""Nsight Compute metrics of one cold-L2 call per system and shape: DRAM throughput and stall reasons.

Why a speed target is missed, in ncu's terms. This runs itself under ``ncu`` (child
mode: each system is warmed up, then exactly one call sits between cudaProfilerStart/Stop, so
every kernel that call launches is profiled -- FlashInfer's merge kernel and cuDNN's kernels
included; a one-cycle ``torch.cuda._sleep`` kernel marks where each call starts), then reads
ncu's CSV and writes ``ncu_raw.csv``, ``ncu_summary.md`` and ``meta.json`` (GPU, clocks, commit,
date) to --out:
per kernel the duration, DRAM throughput (% of peak and bytes), and the warp-stall reasons that
take the largest share of issue slots.

    python -m lean_tvm.bench.ncu --shapes 'B1 32/8 D128 fp16 L4k$' --only lean,flashinfer --out DIR

The systems and shapes are those of the suite (``python -m lean_tvm.bench --list --full``); the streaming read
of the same bytes is always profiled as the reference. ncu keeps the boost clocks
(--clock-control none) and flushes the caches before every replay pass (--cache-control all).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

METRICS = [
    "gpu__time_duration.sum",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed",
    "dram__bytes_read.sum",
    "sm__throughput.avg.pct_of_peak_sustained_elapsed",
    "sm__warps_active.avg.pct_of_peak_sustained_active",
    "launch__grid_size",
    "launch__registers_per_thread",
    "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\\.ratio",
    "regex:sm__inst_executed_pipe_[a-z0-9_]+\\.avg\\.pct_of_peak_sustained_active",
]
STALL_PREFIX, STALL_SUFFIX = "smsp__average_warps_issue_stalled_", "_per_issue_active.ratio"
PIPE_PREFIX, PIPE_SUFFIX = "sm__inst_executed_pipe_", ".avg.pct_of_peak_sustained_active"
MARKER = "spin_kernel"  # torch.cuda._sleep's kernel: launched first in every profiled region


def child(args) -> None:
    """Runs under ncu: one profiled call per (shape, system)."""
    import torch

    from lean_tvm import runtime

    from . import suite, timing
    from . import systems as sy
    from .grid import fp8_grid, full_grid, select_shapes

    dev = torch.device("cuda")
    grid = select_shapes(full_grid() + fp8_grid(), args.shapes)
    systems = suite.parse_systems(args.only)
    b = suite.Bench(dev, systems, reps=1, rounds=1, seed=args.seed)
    cudart = torch.cuda.cudart()
    order = []
    for shape in grid:
        case = sy.make_case(shape, dev, args.seed)
        runners = {suite.STREAM: sy.stream_runner(case, b.lib, b.sink, b.sms * 4)}
        caches = {}
        for system in systems:
            try:
                runners[system] = b.runner(system, case, b.paged_for(system, case, caches))
            except sy.Unsupported as e:
                print(f"[lean_tvm.bench.ncu] {shape.name} {system}: skipped ({e})", flush=True)
        for system, runner in runners.items():
            with runner.context():
                for _ in range(3):
                    runner.fn()
                torch.cuda.synchronize()
                cudart.cudaProfilerStart()
                torch.cuda._sleep(1)
                runner.fn()
                torch.cuda.synchronize()
                cudart.cudaProfilerStop()
            order.append(f"{shape.name} | {system}")
            print(f"[lean_tvm.bench.ncu] {shape.name} {system}: profiled", flush=True)
        del case, caches, runners
        torch.cuda.empty_cache()
    Path(args.order).write_text("\n".join(order) + "\n")
    lib = runtime.library_for(dev)
    meta = {"gpu": torch.cuda.get_device_name(dev), "clocks": timing.gpu_clocks(dev), "commit": suite.git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "lean_source_sha256": lib.manifest.get("source_sha256"), "torch": torch.__version__,
            "flashinfer": (b.fi.version or b.fi.error) if b.fi else "not run",
            "argv": suite.portable_argv(("--out", "--order"))}
    (Path(args.out) / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")


def parse(text: str) -> list[dict]:
    """ncu --csv --page raw: a header row, a units row, then one row per kernel."""
    lines = [ln for ln in text.splitlines() if ln.startswith('"')]
    rows = list(csv.reader(io.StringIO("\n".join(lines))))
    if len(rows) < 3:
        return []
    header = rows[0]
    return [dict(zip(header, r, strict=False)) for r in rows[2:]]


def num(x: str) -> float:
    try:
        return float(x.replace(",", ""))
    except (AttributeError, ValueError):
        return float("nan")


def label(kernels: list[dict], order: list[str]) -> list[tuple[str, dict]]:
    """(shape | system, kernel) for every kernel after a marker; the markers themselves dropped."""
    out, i = [], -1
    for k in kernels:
        if MARKER in k.get("Kernel Name", ""):
            i += 1
        elif 0 <= i < len(order):
            out.append((order[i], k))
    return out


def summarize(labelled: list[tuple[str, dict]], top: int = 4) -> list[dict]:
    out = []
    for what, k in labelled:
        stalls = {m[len(STALL_PREFIX):-len(STALL_SUFFIX)]: num(v) for m, v in k.items()
                  if m.startswith(STALL_PREFIX) and m.endswith(STALL_SUFFIX)}
        stalls.pop("not_selected", None)  # a warp ready but not picked is not a stall
        stalls.pop("selected", None)
        total = sum(v for v in stalls.values() if v == v) or float("nan")
        worst = sorted(stalls.items(), key=lambda kv: -kv[1])[:top]
        pipes = {m[len(PIPE_PREFIX):-len(PIPE_SUFFIX)]: num(v) for m, v in k.items()
                 if m.startswith(PIPE_PREFIX) and m.endswith(PIPE_SUFFIX)}
        busiest = sorted(((n, v) for n, v in pipes.items() if v == v), key=lambda kv: -kv[1])[:top]
        out.append({
            "call": what,
            "kernel": k.get("Kernel Name", "")[:60],
            "us": num(k.get("gpu__time_duration.sum", "")) / 1e3,
            "dram_pct": num(k.get("dram__throughput.avg.pct_of_peak_sustained_elapsed", "")),
            "dram_mb": num(k.get("dram__bytes_read.sum", "")) / 1e6,
            "grid": k.get("launch__grid_size", ""),
            "regs": k.get("launch__registers_per_thread", ""),
            "stalls": ", ".join(f"{n} {100 * v / total:.0f}%" for n, v in worst),
            "pipes": ", ".join(f"{n} {v:.0f}%" for n, v in busiest),
        })
    return out


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m lean_tvm.bench.ncu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", help="regex over the suite's shape names (the full and the fp8 grids)")
    ap.add_argument("--only", default="lean,flashinfer,flashinfer-tc,cudnn,fa3", help="systems, as in the suite")
    ap.add_argument("--out", required=True, help="folder for ncu_raw.csv and ncu_summary.md")
    ap.add_argument("--summary-only", action="store_true", help="rewrite --out's ncu_summary.md from its "
                    "ncu_raw.csv, no GPU")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--order", help=argparse.SUPPRESS)  # child: where to list the profiled calls
    args = ap.parse_args()
    out = Path(args.out)
    if args.summary_only:
        with open(out / "ncu_raw.csv", newline="") as f:
            write_summary([(r.pop("call"), r) for r in csv.DictReader(f)], out)
        return
    if not args.shapes:
        ap.error("--shapes is required")
    if args.child:
        child(args)
        return
    ncu = shutil.which("ncu")
    if ncu is None:
        sys.exit("lean_tvm.bench.ncu: ncu (Nsight Compute) is not on PATH")
    out.mkdir(parents=True, exist_ok=True)
    order = out / "ncu_order.txt"
    cmd = [ncu, "--profile-from-start", "off", "--clock-control", "none", "--cache-control", "all",
           "--csv", "--page", "raw", "--metrics", ",".join(METRICS), sys.executable, "-m", "lean_tvm.bench.ncu",
           "--child", "--shapes", args.shapes, "--only", args.only,
           "--seed", str(args.seed), "--out", str(out), "--order", str(order)]
    print("[lean_tvm.bench.ncu] " + " ".join(cmd[:12]) + " ...", flush=True)
    res = subprocess.run(cmd, capture_output=True, text=True)
    (out / "ncu_log.txt").write_text(res.stderr + "\n".join(ln for ln in res.stdout.splitlines()
                                                             if not ln.startswith('"')))
    labelled = label(parse(res.stdout), order.read_text().splitlines() if order.exists() else [])
    if res.returncode != 0 or not labelled:
        sys.exit(f"lean_tvm.bench.ncu: ncu exit {res.returncode}, {len(labelled)} kernels; see {out / 'ncu_log.txt'}")
    with open(out / "ncu_raw.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["call", *labelled[0][1]])
        w.writeheader()
        w.writerows({"call": what, **k} for what, k in labelled)
    write_summary(labelled, out)


def write_summary(labelled: list[tuple[str, dict]], out: Path) -> None:
    rows = summarize(labelled)
    lines = ["| shape | system | kernel | us | DRAM % of peak | DRAM MB read | grid | regs | top stall reasons "
             "(share of stalled warp-issue slots) | busiest pipes (% of peak issue) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['call']} | `{r['kernel']}` | {r['us']:.1f} | {r['dram_pct']:.0f} | {r['dram_mb']:.1f} | "
              f"{r['grid']} | {r['regs']} | {r['stalls']} | {r['pipes'] or 'n/a'} |" for r in rows]
    (out / "ncu_summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
