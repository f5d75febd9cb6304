"""Programmatic dependent launch (PDL), measured: our kernel alone, after a QKV-projection GEMV,
and in a chain of layers, with the launch attribute on and off and against another library.

Each configuration runs in its own process (``LEAN_TVM_PDL`` is read once per process), the
configurations interleaved over rounds, their order rotating. Per shape and configuration:

* ``alone``: one eager ``decode_attention`` call, L2 flushed by a 256 MB read before it;
* ``chain``: ``--layers`` calls on distinct caches back to back, replayed from a CUDA graph (a
  serving engine's decode step), per call;
* ``pair``: the same, each call after its layer's QKV projection (x [B, 4096] @ W^T, W
  [(Hq + 2 Hkv) D, 4096] fp16, distinct per layer), per layer;
* ``proj``: the projections alone, per layer (what ``pair`` adds to the attention).

    python -m lean_tvm.bench.pdl --out results/h200/pdl \\
        --configs "pdl:;off:LEAN_TVM_PDL=0;old:LEAN_TVM_LIB_DIR=build/old_sm_90a"
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

import lean_tvm

from .grid import K, select_shapes, uniform
from .report import write_csv
from .suite import git_commit, portable_argv
from .systems import make_case
from .timing import Timer, capture_graph, gpu_clocks

SHAPES = [uniform(1, 4 * K, 32, 8), uniform(1, 16 * K, 32, 8), uniform(8, 4 * K, 32, 8), uniform(32, 2 * K, 32, 8),
          uniform(1, 32 * K, 8, 1)]
HIDDEN = 4096


def measure(device: torch.device, shapes: Sequence, layers: int, reps: int) -> list[dict]:
    """One configuration's times (this process's library and launch switch), per shape and pattern."""
    timer = Timer(device)
    timer.warm_clocks()
    rows = []
    for shape in shapes:
        rows += _measure_shape(timer, device, shape, layers, reps)
        torch.cuda.empty_cache()
    return rows


def _measure_shape(timer: Timer, device: torch.device, shape, layers: int, reps: int) -> list[dict]:
    cases = [make_case(shape, device, seed=i) for i in range(layers)]
    outs = [torch.empty_like(c.q) for c in cases]
    dt = cases[0].q.dtype
    width = (shape.hq + 2 * shape.hkv) * shape.head_dim
    weights = [torch.randn(width, HIDDEN, device=device, dtype=dt) * 0.02 for _ in range(layers)]
    x = torch.randn(shape.batch, HIDDEN, device=device, dtype=dt)
    proj_out = torch.empty(shape.batch, width, device=device, dtype=dt)

    def attention(i):
        c = cases[i]
        lean_tvm.decode_attention(c.q, c.k, c.v, c.seq_lens, softmax_scale=c.scale, out=outs[i])

    def projection(i):
        torch.matmul(x, weights[i].t(), out=proj_out)

    steps = {"chain": lambda: [attention(i) for i in range(layers)],
             "pair": lambda: [(projection(i), attention(i)) for i in range(layers)],
             "proj": lambda: [projection(i) for i in range(layers)]}
    calls = {"alone": (lambda: attention(0), 1)}
    for name, step in steps.items():
        calls[name] = (capture_graph(step, device).replay, layers)
    rows = []
    for name, (fn, n) in calls.items():
        st = timer.device_time(fn, reps)
        rows.append({"shape": shape.name, "pattern": name, "us": st.median / n, "p10_us": st.p10 / n,
                     "p90_us": st.p90 / n})
    return rows


def parse_configs(text: str) -> list[tuple[str, dict[str, str]]]:
    """``"pdl:;off:LEAN_TVM_PDL=0;old:LEAN_TVM_LIB_DIR=DIR,LEAN_TVM_PDL=0"`` -> [(label, env)]."""
    configs = []
    for item in filter(None, (s.strip() for s in text.split(";"))):
        label, _, env = item.partition(":")
        pairs = [p.split("=", 1) for p in env.split(",") if p.strip()]
        if not label or any(len(p) != 2 for p in pairs):
            raise SystemExit(f"--configs: expected 'label:VAR=value,...' items separated by ';', got {item!r}")
        configs.append((label, dict(pairs)))
    if len({label for label, _ in configs}) != len(configs):
        raise SystemExit("--configs: labels must differ")
    return configs


def summarize(samples: list[dict], labels: Sequence[str]) -> list[dict]:
    """Per (shape, pattern, config): the median over rounds of the rounds' medians, and the range."""
    out = []
    keys = dict.fromkeys((s["shape"], s["pattern"]) for s in samples)
    for shape, pattern in keys:
        for label in labels:
            got = [s for s in samples if (s["shape"], s["pattern"], s["config"]) == (shape, pattern, label)]
            if got:
                us = [s["us"] for s in got]
                out.append({"shape": shape, "pattern": pattern, "config": label, "us": statistics.median(us),
                            "round_lo_us": min(us), "round_hi_us": max(us), "p10_us": min(s["p10_us"] for s in got),
                            "p90_us": max(s["p90_us"] for s in got), "rounds": len(got)})
    return out


def markdown(rows: list[dict], labels: Sequence[str], meta: dict) -> str:
    base = labels[0]
    lines = [f"# PDL: device time per call (us), {meta['gpu']}, {meta['date']}, commit {meta['commit']}", "",
             "Median over interleaved rounds (each round a process per configuration) of the median of "
             f"{meta['reps']} timed calls; [lowest, highest round]. Configurations: "
             + ", ".join(f"`{label}` ({' '.join(f'{k}={v}' for k, v in env.items()) or 'defaults'})"
                         for label, env in meta["configs"]) + ".", "",
             "| shape | pattern | " + " | ".join(labels) + " | " + " | ".join(f"{label}/{base}" for label in labels[1:])
             + " |", "|---|---|" + "---|" * (2 * len(labels) - 1)]
    by_key = {(r["shape"], r["pattern"], r["config"]): r for r in rows}
    for shape, pattern in dict.fromkeys((r["shape"], r["pattern"]) for r in rows):
        cells = [by_key.get((shape, pattern, label)) for label in labels]
        times = [f"{r['us']:.2f} [{r['round_lo_us']:.2f}, {r['round_hi_us']:.2f}]" if r else "n/a" for r in cells]
        ratios = [f"{c['us'] / cells[0]['us']:.3f}" if c and cells[0] else "n/a" for c in cells[1:]]
        lines.append(f"| {shape} | {pattern} | " + " | ".join(times) + " | " + " | ".join(ratios) + " |")
    return "\n".join(lines) + "\n"


def write_plot(rows: list[dict], labels: Sequence[str], out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[pdl] matplotlib is not installed: no plot", file=sys.stderr)
        return
    keys = list(dict.fromkeys((r["shape"], r["pattern"]) for r in rows if r["pattern"] != "proj"))
    by_key = {(r["shape"], r["pattern"], r["config"]): r["us"] for r in rows}
    fig, ax = plt.subplots(figsize=(max(7, len(keys) * 0.6), 4.5))
    width = 0.8 / len(labels)
    for j, label in enumerate(labels):
        ax.bar([i + j * width for i in range(len(keys))], [by_key.get((*k, label), 0) for k in keys], width,
               label=label)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(keys))])
    ax.set_xticklabels([f"{s}\n{p}" for s, p in keys], rotation=90, fontsize=6)
    ax.set_ylabel("device time per call (us)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "pdl.png", dpi=120)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None = None):
    ap = argparse.ArgumentParser(prog="python -m lean_tvm.bench.pdl", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="folder for results.csv, results.md, pdl.png, meta.json")
    ap.add_argument("--configs", default="pdl:;off:LEAN_TVM_PDL=0",
                    help="';'-separated 'label:VAR=value,...' (the first is the baseline of the ratios)")
    ap.add_argument("--rounds", type=int, default=3, help="processes per configuration, interleaved (default 3)")
    ap.add_argument("--reps", type=int, default=20, help="timed calls per pattern and round (default 20)")
    ap.add_argument("--layers", type=int, default=16, help="layers of the chain and pair patterns (default 16)")
    ap.add_argument("--shapes", help="regex over the shape names")
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # one configuration's process: JSON here
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    shapes = select_shapes(SHAPES, args.shapes)
    if args.worker:
        device = torch.device("cuda")
        args.worker.write_text(json.dumps(measure(device, shapes, args.layers, args.reps)))
        return 0
    if args.out is None:
        raise SystemExit("--out: required")
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: the PDL benchmark runs on a GPU")
    configs = parse_configs(args.configs)
    labels = [label for label, _ in configs]
    samples = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for label, env in configs[r % len(configs):] + configs[:r % len(configs)]:
                print(f"[pdl] round {r + 1}/{args.rounds}: {label}", flush=True)
                path = Path(tmp) / f"{label}_{r}.json"
                cmd = [sys.executable, "-m", "lean_tvm.bench.pdl", "--worker", str(path), "--layers", str(args.layers),
                       "--reps", str(args.reps)] + (["--shapes", args.shapes] if args.shapes else [])
                subprocess.run(cmd, env={**os.environ, **env}, check=True)
                samples += [{**s, "config": label, "round": r} for s in json.loads(path.read_text())]
    rows = summarize(samples, labels)
    device = torch.device("cuda")
    meta = {"gpu": torch.cuda.get_device_name(device), "clocks": gpu_clocks(device), "commit": git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "configs": configs, "rounds": args.rounds, "reps": args.reps,
            "layers": args.layers, "argv": portable_argv()}
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, args.out / "results.csv", fields=list(rows[0]))
    write_csv(samples, args.out / "rounds.csv", fields=list(samples[0]))
    (args.out / "results.md").write_text(markdown(rows, labels, meta))
    (args.out / "meta.json").write_text(json.dumps(meta, indent=1))
    write_plot(rows, labels, args.out)
    print((args.out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
