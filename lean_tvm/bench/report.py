"""The benchmark's numbers and files (pure): derived columns, results.csv, results.md, plots.

Every row is one (shape, system); ``derive`` fills the columns that relate a shape's rows
(bandwidth, % of the streaming read, lean's speedup); the writers turn rows into the files a
result folder holds.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from .grid import Shape

STREAM = "stream"
LEAN_SYSTEMS = ("lean", "lean-blhd", "lean-dense", "lean-16bit", "lean-nosplit", "lean-fixedsplit")
TVM_TIR = "tvm-tir"
PEERS = ("cudnn", "flash", "flashinfer", "flashinfer-tc", "fa3", "fa3-best", TVM_TIR)
SYSTEMS = LEAN_SYSTEMS + PEERS
FIELDS = ("shape", "kind", "batch", "hq", "hkv", "head_dim", "dtype", "max_len", "total_len", "kv_bytes",
          "move_bytes", "system", "median_us", "p10_us", "p90_us", "round_lo_us", "round_hi_us", "reps", "tbps",
          "pct_stream", "lean_speedup", "stream_us", "host_us", "graph_us", "plan_us", "splits", "backend",
          "rel_err", "ok", "note", "lens")
NUMERIC = {"batch", "hq", "hkv", "head_dim", "max_len", "total_len", "kv_bytes", "move_bytes", "median_us",
           "p10_us", "p90_us", "round_lo_us", "round_hi_us", "reps", "tbps", "pct_stream", "lean_speedup",
           "stream_us", "host_us", "graph_us", "plan_us", "splits", "rel_err"}
NAN = float("nan")


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def pct_of_stream(stream_us: float, us: float) -> float:
    """How close a system is to the memory limit: the streaming read's time over the system's."""
    return stream_us / us * 100 if finite(stream_us) and finite(us) and us > 0 else NAN


def speedup(peer_us: float, lean_us: float) -> float:
    """``peer / lean``: above 1, lean is faster."""
    return peer_us / lean_us if finite(peer_us) and finite(lean_us) and lean_us > 0 else NAN


def tbps(nbytes: float, us: float) -> float:
    return nbytes / us / 1e6 if finite(us) and us > 0 else NAN


def derive(rows: list[dict]) -> list[dict]:
    """Fill the columns that relate one shape's rows: bandwidth, % of the stream read, lean's speedup."""
    by = {r["system"]: r for r in rows}
    stream_us = by[STREAM]["median_us"] if STREAM in by else NAN
    lean_us = by["lean"]["median_us"] if "lean" in by else NAN
    for r in rows:
        nbytes = r["kv_bytes"] if r["system"] == STREAM else r["move_bytes"]
        r["tbps"] = tbps(nbytes, r["median_us"])
        r["stream_us"] = stream_us
        r["pct_stream"] = pct_of_stream(stream_us, r["median_us"])
        r["lean_speedup"] = speedup(r["median_us"], lean_us)
    return rows


def best_peer(rows: list[dict]) -> tuple[str | None, float]:
    """The fastest peer with a number and a correct output (lean's own variants are not peers)."""
    timed = [(r["median_us"], r["system"]) for r in rows
             if r["system"] in PEERS and finite(r["median_us"]) and r.get("ok") is not False]
    if not timed:
        return None, NAN
    us, name = min(timed)
    return name, us


def shape_row(shape: Shape, system: str, **values) -> dict:
    row = {f: NAN if f in NUMERIC else "" for f in FIELDS}
    row.update(shape=shape.name, kind="ragged" if shape.ragged else "uniform", batch=shape.batch, hq=shape.hq,
               hkv=shape.hkv, head_dim=shape.head_dim, dtype=shape.dtype, max_len=shape.max_len,
               total_len=shape.total_len, kv_bytes=shape.kv_bytes, move_bytes=shape.move_bytes, system=system,
               lens=";".join(map(str, shape.lens)) if shape.ragged else f"{shape.batch}x{shape.max_len}")
    row.update(values)
    return row


def _fmt_num(x) -> str:
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, float):
        if not math.isfinite(x):
            return "nan"
        return f"{x:.6g}"
    return str(x)


def write_csv(rows: list[dict], path: Path, fields: Sequence[str] = FIELDS) -> None:
    """The suite's columns by default; a tool with rows of its own passes their keys."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt_num(r.get(k, "")) for k in fields})


def read_csv(path: Path) -> list[dict]:
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            for k in NUMERIC:
                try:
                    r[k] = float(r[k]) if r.get(k, "") not in ("", None) else NAN
                except ValueError:
                    r[k] = NAN
            r["ok"] = {"True": True, "False": False}.get(r.get("ok", ""), "")
            rows.append(r)
    return rows


def group_by_shape(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["shape"], []).append(r)
    return out


def _cell(r: dict | None) -> str:
    if r is None:
        return ""
    if not finite(r["median_us"]):
        return "n/a"
    s = f"{r['median_us']:.1f} us"
    if finite(r["pct_stream"]) and r["system"] != STREAM:
        s += f" ({r['pct_stream']:.0f}%)"
    if r["system"] in ("lean-fixedsplit", "fa3-best") and r.get("backend"):
        s += f" {r['backend']}"
    if r.get("ok") is False:
        s += " **WRONG**"
    return s


def markdown(rows: list[dict], meta: dict | None = None) -> str:
    """One row per shape: each system's median time and % of the stream read, lean vs the best peer;
    then the host-side numbers and every reason a number is missing."""
    systems = [s for s in (STREAM, *SYSTEMS) if any(r["system"] == s for r in rows)]
    lines = []
    if meta:
        clk = meta.get("clocks_before") or {}
        lines += [f"# Decode attention on {meta.get('gpu', '?')}", "",
                  f"{meta.get('sms', '?')} SMs, SM clock {clk.get('sm_mhz', '?')} MHz; commit "
                  f"{meta.get('commit', '?')}; {meta.get('date', '?')}; torch {meta.get('torch', '?')}; "
                  f"lean library {str(meta.get('lean_library_sha256', '?'))[:12]}.", "",
                  f"Device time: every system of a shape timed in turn, {meta.get('rounds', '?')} interleaved "
                  f"rounds of {meta.get('reps', '?')} calls, L2 flushed by a 256 MB read before each call; the "
                  "median of the rounds' medians [p10-p90 of all calls and the rounds' range in results.csv]. "
                  "% = streaming read of the same K+V bytes / system time; speedup = best peer time / lean time.",
                  ""]
    lines += ["| shape | KV MB | " + " | ".join(systems) + " | lean vs best peer |",
              "|---|---:|" + "---:|" * len(systems) + "---|"]
    host_lines, reasons = [], {}
    for name, rs in group_by_shape(rows).items():
        by = {r["system"]: r for r in rs}
        peer, peer_us = best_peer(rs)
        lean_us = by["lean"]["median_us"] if "lean" in by else NAN
        ratio = speedup(peer_us, lean_us)
        vs = f"{ratio:.2f}x ({peer})" if finite(ratio) else ""
        lines.append(f"| {name} | {rs[0]['kv_bytes'] / 1e6:.0f} | " + " | ".join(_cell(by.get(s)) for s in systems)
                     + f" | {vs} |")
        lean, fi = by.get("lean"), [by[s] for s in ("flashinfer", "flashinfer-tc") if s in by]
        plan = [r["plan_us"] for r in fi if finite(r["plan_us"])]
        if lean is not None or plan:
            host_lines.append(f"| {name} | {fmt_us(lean and lean['host_us'])} | "
                              f"{fmt_us(lean and lean['graph_us'])} | {fmt_us(min(plan) if plan else NAN)} |")
        for r in rs:
            if r.get("note"):
                reasons.setdefault(f"{r['system']}: {r['note']}", []).append(name)
    if host_lines:
        lines += ["", "Per-call wall time from Python (calls queued back to back), and FlashInfer's plan():", "",
                  "| shape | lean | lean, CUDA graph replay | FlashInfer plan() |", "|---|---:|---:|---:|",
                  *host_lines]
    if reasons:
        lines += ["", "Notes:", ""]
        for reason, names in reasons.items():
            where = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
            lines.append(f"- {reason} ({where})")
    return "\n".join(lines) + "\n"


def fmt_us(x) -> str:
    return f"{x:.1f} us" if finite(x) else "n/a"


def plot_rows(rows: list[dict]) -> list[dict]:
    """The context-length sweep the plots show: B=1, 32/8, D128, fp16."""
    return [r for r in rows if r["kind"] == "uniform" and int(r["batch"]) == 1 and int(r["hq"]) == 32
            and int(r["hkv"]) == 8 and int(r["head_dim"]) == 128 and r["dtype"] == "float16"]


def write_plots(rows: list[dict], out: Path) -> list[Path]:
    sweep = plot_rows(rows)
    if not sweep:
        return []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[bench] matplotlib is not installed: no plots (rerun `python -m lean_tvm.bench --replot DIR` "
              "where it is)", file=sys.stderr)
        return []
    written = []
    for fname, key, systems, ylabel in (
            ("time_vs_context.png", "median_us", (STREAM, *SYSTEMS), "device time (us), L2 flushed"),
            ("pct_vs_context.png", "pct_stream", SYSTEMS, "% of a streaming read of the same K+V bytes")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for s in systems:
            pts = sorted((r["max_len"], r[key]) for r in sweep if r["system"] == s and finite(r[key]))
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=s, linestyle="--" if s == STREAM else "-")
        ax.set_xscale("log", base=2)
        if key == "median_us":
            ax.set_yscale("log")
        else:
            ax.axhline(100, color="grey", linewidth=0.8)
        ax.set_xlabel("context length (B=1, Hq/Hkv 32/8, D128, fp16)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        plt.close(fig)
        written.append(out / fname)
    return written


def write_outputs(rows: list[dict], meta: dict, out: Path, plots: bool = True) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "results.csv")
    (out / "results.md").write_text(markdown(rows, meta))
    with open(out / "meta.json", "w") as f:
        json.dump(meta, f, indent=1, default=str)
    if plots:
        write_plots(rows, out)


