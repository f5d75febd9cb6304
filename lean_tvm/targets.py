"""Issue 11's targets, evaluated from a benchmark run's ``results.csv`` (no GPU).

``python -m lean_tvm.targets bench/results/h100`` writes ``targets.md`` beside the results: one
row per target with what the run measured, so a closing note quotes numbers a file shows and
anyone can recompute. The targets are for fp16, D = 128 unless a target says otherwise; "best
peer" is the fastest of FlashInfer (either path) and cuDNN, as the issue defines it.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from .bench import STREAM, group_by_shape, read_csv

TARGET_PEERS = ("flashinfer", "flashinfer-tc", "cudnn")
MIN_MB = 64
L4K, L16K, L512K = "B1 32/8 D128 fp16 L4k", "B1 32/8 D128 fp16 L16k", "B1 32/8 D128 fp16 L512k"
RAGGED_64_8 = "ragged 2x64k+30x512 64/8 D128 fp16"


def _us(by: dict, system: str) -> float:
    r = by.get(system)
    return r["median_us"] if r is not None and r.get("ok") is not False else math.nan


def _best_peer(by: dict) -> tuple[str, float]:
    timed = [(_us(by, p), p) for p in TARGET_PEERS if math.isfinite(_us(by, p))]
    return (min(timed)[1], min(timed)[0]) if timed else ("", math.nan)


def evaluate(rows: list[dict]) -> list[tuple[str, str, str]]:
    """(target, measured, met / missed / n/a) for each target of the issue."""
    shapes = {name: {r["system"]: r for r in rs} for name, rs in group_by_shape(rows).items()}
    fp16_d128 = {n: by for n, by in shapes.items() if "fp16" in n and " D128 " in n}
    out = []

    def ratio_row(target: str, name: str, need: float) -> None:
        by = shapes.get(name)
        if by is None:
            out.append((target, "shape not in this run", "n/a"))
            return
        peer, peer_us = _best_peer(by)
        if not peer:
            out.append((target, "no peer with a correct output", "n/a"))
            return
        x = peer_us / _us(by, "lean")
        out.append((target, f"{x:.2f}x ({_us(by, 'lean'):.1f} us vs {peer} {peer_us:.1f} us)",
                    "met" if x >= need else "missed"))

    big = {n: by for n, by in fp16_d128.items() if by["lean"]["kv_bytes"] >= MIN_MB * 1e6}
    pct = {n: _us(by, STREAM) / _us(by, "lean") for n, by in big.items()}
    ok = [n for n, p in pct.items() if p >= 0.95]
    worst = min(pct, key=pct.get) if pct else ""
    out.append((f">= 95% of the stream read on every fp16 D128 shape >= {MIN_MB} MB",
                f"{len(ok)} of {len(pct)}; lowest {100 * pct[worst]:.0f}% ({worst})" if pct else "no such shape",
                "met" if pct and len(ok) == len(pct) else "missed"))
    by = shapes.get(L4K)
    if by is not None:
        x = _us(by, "lean") / _us(by, STREAM)
        out.append(("B1 32/8 L4k within 1.15x of the stream read", f"{x:.2f}x ({_us(by, 'lean'):.1f} vs "
                    f"{_us(by, STREAM):.1f} us)", "met" if x <= 1.15 else "missed"))
    peer_us = {n: _best_peer(by)[1] for n, by in shapes.items()}
    vs = {n: peer_us[n] / _us(by, "lean") for n, by in shapes.items() if math.isfinite(peer_us[n])}
    worst = min(vs, key=vs.get) if vs else ""
    geo = math.exp(sum(math.log(v) for v in vs.values()) / len(vs)) if vs else math.nan
    out.append(("at least the best peer on every shape",
                f"{sum(v >= 1 for v in vs.values())} of {len(vs)} (within 2%: {sum(v >= 0.98 for v in vs.values())}); "
                f"geomean {geo:.2f}x; worst {vs[worst]:.2f}x ({worst})" if vs else "no peer ran",
                "met" if vs and min(vs.values()) >= 1 else "missed"))
    ratio_row(">= 1.4x the best peer at B1 L4k", L4K, 1.4)
    ratio_row(">= 1.2x the best peer at B1 L16k", L16K, 1.2)
    ratio_row(">= 1.7x the best peer on ragged 64/8", RAGGED_64_8, 1.7)
    ragged = {n: by for n, by in fp16_d128.items() if n.startswith("ragged")}
    sdpa = [_us(by, "cudnn") / _us(by, "lean") for by in ragged.values() if math.isfinite(_us(by, "cudnn"))]
    out.append((">= 5x over padded SDPA on ragged batches", f"{min(sdpa):.1f}x-{max(sdpa):.1f}x over {len(sdpa)} shapes"
                if sdpa else "no SDPA row", "met" if sdpa and min(sdpa) >= 5 else "missed"))
    fixed = [_us(by, "lean-fixedsplit") / _us(by, "lean") for by in ragged.values()
             if math.isfinite(_us(by, "lean-fixedsplit"))]
    out.append((">= 1.3x over our best fixed split on ragged batches",
                f"{min(fixed):.2f}x-{max(fixed):.2f}x over {len(fixed)} shapes" if fixed else "no fixed-split row",
                "met" if fixed and min(fixed) >= 1.3 else "missed"))
    if by is not None:
        host = by["lean"].get("host_us", math.nan)
        out.append(("wall time per call <= 15 us at B1 L4k (no graph, no host sync)",
                    f"{host:.1f} us (CUDA graph replay {by['lean'].get('graph_us', math.nan):.1f} us)",
                    "met" if host <= 15 else "missed"))
    by = shapes.get(L512K)
    if by is not None:
        out.append(("the paper's headline: speedup over our no-split plan at B1 L512k",
                    f"{_us(by, 'lean-nosplit') / _us(by, 'lean'):.1f}x ({_us(by, 'lean-nosplit'):.0f} vs "
                    f"{_us(by, 'lean'):.0f} us; lean at {100 * _us(by, STREAM) / _us(by, 'lean'):.0f}% of the "
                    f"stream read)", "reported"))
    return out


def markdown(rows: list[dict], source: str) -> str:
    lines = [f"# Issue 11 targets, from {source}", "", "| target | measured | |", "|---|---|---|"]
    lines += [f"| {t} | {m} | {s} |" for t, m, s in evaluate(rows)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lean_tvm.targets", description=__doc__.split("\n")[0])
    p.add_argument("results", help="a benchmark output folder (with results.csv)")
    args = p.parse_args(argv)
    folder = Path(args.results)
    if not (folder / "results.csv").exists():
        print(f"targets: no results.csv in {folder}", file=sys.stderr)
        return 2
    text = markdown(read_csv(folder / "results.csv"), f"`{folder.name}/results.csv`")
    (folder / "targets.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
