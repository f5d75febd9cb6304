"""The benchmark suite (issue 11): LeanAttention against its own split variants and its peers.

    python -m lean_tvm.bench --quick                 # ~8 shapes, < 2 minutes
    python -m lean_tvm.bench --full --out DIR        # the whole grid (use --resume/--max-minutes)
    python -m lean_tvm.bench --list [--full]         # print the grid; needs no GPU
    python -m lean_tvm.bench --replot DIR            # rewrite results.md and plots from results.csv

Every system runs in this one process on the same K/V values, one shape at a time:

* ``lean`` (stream-K), ``lean-nosplit`` (``num_splits=1``, FlashAttention-2 style) and
  ``lean-fixedsplit`` (Flash-Decoding: the best ``num_splits`` of 2..128, reported);
* ``cudnn`` and ``flash``: torch SDPA pinned to one backend (ragged batches padded to the
  longest sequence plus a boolean mask, which the flash backend may refuse);
* ``flashinfer`` / ``flashinfer-tc``: ``BatchDecodeWithPagedKVCacheWrapper`` without / with
  tensor cores, on a page-size-16 copy of the same cache; ``plan()`` host time in its own column;
* ``tvm-tir``: TVM's own decode TIR kernel (``tvm.relax.frontend.nn.llm``, what its PagedKVCache
  runs), built through ``cuda_host`` into a library of its own (``python -m lean_tvm.build ...
  --with-tvm-peer``), on the same paged copy; skipped with the reason when that library is missing;
* ``stream``: a TIR streaming read of exactly the K+V bytes that must move, the yardstick,
  timed before and after the systems (the faster one is used, so percentages are conservative).

Device time: :class:`lean_tvm.timing.Timer` (L2 flushed by a 256 MB read, the launch path hidden
behind a sleep, CUDA events, median and p10/p90 of >= 30 reps). Host time: per-call wall time from
Python with calls queued back to back, and for ``lean`` also the replay of a captured CUDA graph.
Before timing, every system's output is checked against a reference (SDPA for uniform batches,
float64 for ragged ones), and its LSE where the runner reports one; a failing row is marked,
never dropped.

This module imports without CUDA, flashinfer, apache-tvm or matplotlib: the grid, the byte
arithmetic and the writers are pure and tested on the CPU (``tests/test_bench.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime
import gc
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from . import runtime, tvm_peer
from .paged_cases import PagedCase, lse_natural
from .timing import Timer, gpu_clocks

K, M = 1024, 1024 * 1024
LEAN_SYSTEMS = ("lean", "lean-nosplit", "lean-fixedsplit")
TVM_TIR = "tvm-tir"
PEERS = ("cudnn", "flash", "flashinfer", "flashinfer-tc", TVM_TIR)
PAGED_PEERS = ("flashinfer", "flashinfer-tc", TVM_TIR)  # they share one paged copy of the cache
SYSTEMS = LEAN_SYSTEMS + PEERS
STREAM = "stream"
SPLITS = (2, 4, 8, 16, 32, 64, 128)
HEADS = ((32, 8), (64, 8), (32, 32), (8, 1))
KV_CAP_BYTES = 40e9
PAGE_SIZE = 16
ELEM_SIZE = {"float16": 2, "bfloat16": 2}
SHORT_DTYPE = {"float16": "fp16", "bfloat16": "bf16"}
REPO = Path(__file__).resolve().parents[1]

FIELDS = ("shape", "kind", "batch", "hq", "hkv", "head_dim", "dtype", "max_len", "total_len", "kv_bytes",
          "move_bytes", "system", "median_us", "p10_us", "p90_us", "reps", "tbps", "pct_stream", "lean_speedup",
          "stream_us", "stream_before_us", "stream_after_us", "host_us", "graph_us", "plan_us", "splits",
          "backend", "rel_err", "ok", "note", "lens")
NUMERIC = {"batch", "hq", "hkv", "head_dim", "max_len", "total_len", "kv_bytes", "move_bytes", "median_us",
           "p10_us", "p90_us", "reps", "tbps", "pct_stream", "lean_speedup", "stream_us", "stream_before_us",
           "stream_after_us", "host_us", "graph_us", "plan_us", "splits", "rel_err"}
NAN = float("nan")


# --------------------------------------------------------------------------------------------
# Shapes and the bytes they must move (pure)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Shape:
    """One decode step: a query token per sequence against ``lens[b]`` cached K/V rows."""

    name: str
    lens: tuple[int, ...]
    hq: int
    hkv: int
    head_dim: int
    dtype: str = "float16"
    ragged: bool = False

    @property
    def batch(self) -> int:
        return len(self.lens)

    @property
    def max_len(self) -> int:
        return max(self.lens)

    @property
    def total_len(self) -> int:
        return sum(self.lens)

    @property
    def kv_bytes(self) -> int:
        return kv_bytes(self.lens, self.hkv, self.head_dim, ELEM_SIZE[self.dtype])

    @property
    def move_bytes(self) -> int:
        return move_bytes(self.lens, self.hq, self.hkv, self.head_dim, ELEM_SIZE[self.dtype])

    @property
    def alloc_len(self) -> int:
        """Rows per sequence in the contiguous cache: the longest length rounded up to a page, so
        that every sequence's last (partial) page can be copied whole into the paged cache."""
        return -(-self.max_len // PAGE_SIZE) * PAGE_SIZE


def kv_bytes(lens: Iterable[int], hkv: int, head_dim: int, elem_size: int) -> int:
    """K and V rows that decode must read: each sequence's own length, never the padding."""
    return 2 * sum(lens) * hkv * head_dim * elem_size


def move_bytes(lens: Sequence[int], hq: int, hkv: int, head_dim: int, elem_size: int) -> int:
    """Bytes that must move: the K+V read, the query read and the output write."""
    return kv_bytes(lens, hkv, head_dim, elem_size) + 2 * len(lens) * hq * head_dim * elem_size


def fmt_len(n: int) -> str:
    return f"{n // K}k" if n >= K and n % K == 0 else str(n)


def uniform(batch: int, length: int, hq: int, hkv: int, d: int = 128, dtype: str = "float16") -> Shape:
    name = f"B{batch} {hq}/{hkv} D{d} {SHORT_DTYPE[dtype]} L{fmt_len(length)}"
    return Shape(name, (length,) * batch, hq, hkv, d, dtype)


def ragged(desc: str, lens: Sequence[int], hq: int = 32, hkv: int = 8, d: int = 128, dtype: str = "float16") -> Shape:
    name = f"ragged {desc} {hq}/{hkv} D{d} {SHORT_DTYPE[dtype]}"
    return Shape(name, tuple(int(x) for x in lens), hq, hkv, d, dtype, ragged=True)


def ragged_shapes(seed: int = 0, long_lens: Sequence[int] = (128 * K, 256 * K)) -> list[Shape]:
    """Mixed batches, where splitting by work (stream-K) and splitting by tile part ways."""
    def rng(tag: int):  # one stream per shape: a shape's lengths do not depend on the others
        return np.random.default_rng((seed, tag))

    out = [ragged(f"1x{fmt_len(n)}+15x1k-4k", [n, *rng(n).integers(K, 4 * K + 1, 15)]) for n in long_lens]
    out.append(ragged("4x32k+28x1k", [32 * K] * 4 + [K] * 28))
    out.append(ragged("48x1-16k", rng(48).integers(1, 16 * K + 1, 48)))
    out.append(ragged("2x64k+30x512", [64 * K] * 2 + [512] * 30, hq=64, hkv=8))
    return out


def full_grid(cap_bytes: float = KV_CAP_BYTES, seed: int = 0) -> list[Shape]:
    """fp16 D128 over every head layout (B=1 at 1k..512k, B=8..64 at 2k..16k); fp16 D64/D256 and
    bf16 D128 on a subset (32/8 and 64/8, five shapes each); the ragged batches. Rows whose K+V
    bytes exceed ``cap_bytes`` are left out (they, plus FlashInfer's paged copy, must fit)."""
    shapes = []
    for hq, hkv in HEADS:
        shapes += [uniform(1, 1 << p, hq, hkv) for p in range(10, 20)]
        shapes += [uniform(b, n, hq, hkv) for b in (8, 16, 32, 64) for n in (2 * K, 4 * K, 8 * K, 16 * K)]
    for dtype, d in (("float16", 64), ("float16", 256), ("bfloat16", 128)):
        for hq, hkv in HEADS[:2]:
            shapes += [uniform(1, n, hq, hkv, d, dtype) for n in (4 * K, 32 * K, 256 * K)]
            shapes += [uniform(8, 4 * K, hq, hkv, d, dtype), uniform(32, 16 * K, hq, hkv, d, dtype)]
    shapes += ragged_shapes(seed)
    return [s for s in shapes if s.kv_bytes <= cap_bytes]


def quick_grid(cap_bytes: float = KV_CAP_BYTES, seed: int = 0) -> list[Shape]:
    """Eight shapes that show the story in under two minutes."""
    shapes = [uniform(1, n, 32, 8) for n in (4 * K, 16 * K, 64 * K, 256 * K)]
    shapes += [uniform(8, 4 * K, 32, 8), uniform(32, 2 * K, 32, 8)]
    shapes += [s for s in ragged_shapes(seed, long_lens=(128 * K,)) if s.name.split()[1] in ("1x128k+15x1k-4k",
                                                                                           "2x64k+30x512")]
    return [s for s in shapes if s.kv_bytes <= cap_bytes]


def select_shapes(shapes: list[Shape], pattern: str | None) -> list[Shape]:
    return [s for s in shapes if not pattern or re.search(pattern, s.name)]


def parse_systems(only: str | None) -> tuple[str, ...]:
    if not only:
        return SYSTEMS
    names = tuple(x.strip() for x in only.split(",") if x.strip())
    bad = [n for n in names if n not in SYSTEMS]
    if bad:
        raise SystemExit(f"--only: unknown system(s) {bad}; choose from {','.join(SYSTEMS)}")
    return tuple(s for s in SYSTEMS if s in names)


# --------------------------------------------------------------------------------------------
# Derived numbers (pure)
# --------------------------------------------------------------------------------------------


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
    """The fastest peer with a number (lean's own variants are not peers)."""
    timed = [(r["median_us"], r["system"]) for r in rows if r["system"] in PEERS and finite(r["median_us"])]
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


# --------------------------------------------------------------------------------------------
# Writers (pure)
# --------------------------------------------------------------------------------------------


def _fmt_num(x) -> str:
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, float):
        if not math.isfinite(x):
            return "nan"
        return f"{x:.6g}"
    return str(x)


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt_num(r.get(k, "")) for k in FIELDS})


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
    if r["system"] == "lean-fixedsplit" and finite(r["splits"]):
        s += f" S={int(r['splits'])}"
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
                  f"Device time: median of {meta.get('reps', '?')} calls [p10-p90 in results.csv], L2 flushed "
                  "by a 256 MB read before each; % = streaming read of the same K+V bytes / system time. "
                  "speedup = best peer time / lean time.", ""]
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
            host_lines.append(f"| {name} | {_us(lean and lean['host_us'])} | {_us(lean and lean['graph_us'])} | "
                              f"{_us(min(plan) if plan else NAN)} |")
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


def _us(x) -> str:
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


# --------------------------------------------------------------------------------------------
# One shape's tensors on the GPU, and the reference output
# --------------------------------------------------------------------------------------------


class Unsupported(Exception):
    """A system cannot run this shape; the message is the reason recorded in the row."""


@dataclasses.dataclass
class Case:
    shape: Shape
    q: torch.Tensor  # [B, Hq, D]
    kv: torch.Tensor  # [2, B, Hkv, Lalloc, D]: K and V in one block, so the stream read can use it
    seq_lens: torch.Tensor  # int32 [B]
    scale: float
    ref: torch.Tensor | None = None
    ref_kind: str = ""
    ref_lse: torch.Tensor | None = None  # made on first use (reference_lse)

    @property
    def k(self) -> torch.Tensor:
        return self.kv[0]

    @property
    def v(self) -> torch.Tensor:
        return self.kv[1]


def make_case(shape: Shape, device: torch.device, seed: int) -> Case:
    dt = getattr(torch, shape.dtype)
    g = torch.Generator(device=device).manual_seed(seed)
    kv = torch.randn(2, shape.batch, shape.hkv, shape.alloc_len, shape.head_dim, device=device, dtype=dt, generator=g)
    q = torch.randn(shape.batch, shape.hq, shape.head_dim, device=device, dtype=dt, generator=g)
    seq_lens = torch.tensor(shape.lens, dtype=torch.int32, device=device)
    return Case(shape, q, kv, seq_lens, 1.0 / math.sqrt(shape.head_dim))


def reference_float64(case: Case, chunk_bytes: int = 512 * M) -> torch.Tensor:
    """The package's float64 reference, a sequence and a few KV heads at a time, so that a 512k
    context does not need its whole cache in float64 at once."""
    from .reference import decode_attention_reference

    s = case.shape
    g = s.hq // s.hkv
    out = torch.empty(s.batch, s.hq, s.head_dim, dtype=torch.float64, device=case.q.device)
    for b, n, h0, h1 in head_chunks(s, chunk_bytes, 8):
        o, _ = decode_attention_reference(case.q[b:b + 1, h0 * g:h1 * g], case.k[b:b + 1, h0:h1],
                                          case.v[b:b + 1, h0:h1], [n], case.scale)
        out[b, h0 * g:h1 * g] = o[0]
    return out


def reference_lse(case: Case, chunk_bytes: int = 512 * M) -> torch.Tensor:
    """Natural-log LSE [B, Hq] from float32 scores: it needs K only, so it is cheap next to the
    output's reference even where that one is SDPA."""
    s = case.shape
    g = s.hq // s.hkv
    out = torch.empty(s.batch, s.hq, dtype=torch.float32, device=case.q.device)
    for b, n, h0, h1 in head_chunks(s, chunk_bytes, 4):
        q = case.q[b, h0 * g:h1 * g].float().view(h1 - h0, g, s.head_dim)
        scores = torch.einsum("hgd,hld->hgl", q, case.k[b, h0:h1, :n].float()) * case.scale
        out[b, h0 * g:h1 * g] = torch.logsumexp(scores, -1).flatten()
    return out


def head_chunks(shape: Shape, chunk_bytes: int, elem_size: int):
    """(b, n, h0, h1): sequence b (length n) a few KV heads at a time, so that a 512k context
    never needs its whole cache at ``elem_size`` bytes per element at once."""
    for b, n in enumerate(shape.lens):
        step = max(1, chunk_bytes // (n * shape.head_dim * elem_size))
        for h0 in range(0, shape.hkv, step):
            yield b, n, h0, min(shape.hkv, h0 + step)


def reference(case: Case) -> tuple[torch.Tensor, str]:
    """SDPA (default dispatch) for uniform batches, float64 for ragged ones (or if SDPA fails)."""
    if not case.shape.ragged:
        n = case.shape.max_len
        try:
            o = torch.nn.functional.scaled_dot_product_attention(
                case.q[:, :, None], case.k[:, :, :n], case.v[:, :, :n], scale=case.scale, enable_gqa=True)
            return o[:, :, 0].float(), "sdpa"
        except RuntimeError:  # no kernel for it, or out of memory (math's GQA expands K/V): float64
            gc.collect()
            torch.cuda.empty_cache()
    return reference_float64(case).float(), "float64"


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute difference relative to the reference's largest magnitude (NaN -> inf)."""
    diff = (out.float() - ref).abs().max().item()
    return diff / max(ref.abs().max().item(), 1e-30) if math.isfinite(diff) else math.inf


def tolerance(dtype: str) -> float:
    """Loose on purpose: the check catches a wrong partition or merge, not rounding."""
    return 2e-2 if dtype == "float16" else 5e-2


# --------------------------------------------------------------------------------------------
# Systems: each runner returns the timed callable, the context it must run in, and its output
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Runner:
    fn: Callable[[], object]
    output: Callable[[], torch.Tensor]  # [B, Hq, D], valid after fn() ran
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    extra: dict = dataclasses.field(default_factory=dict)
    lse: Callable[[], torch.Tensor] | None = None  # natural-log [B, Hq] after fn(); checked when given


def lean_runner(case: Case, num_splits: int) -> Runner:
    s = case.shape
    info = runtime.library_for(case.q.device).attention_kernel(s.dtype, s.head_dim, s.hq // s.hkv, s.batch)
    if info is None:
        raise Unsupported(f"no lean kernel for {s.dtype} D{s.head_dim} G{s.hq // s.hkv}")
    out = torch.empty_like(case.q)
    lse = torch.empty(s.batch, s.hq, device=case.q.device, dtype=torch.float32)

    def fn():
        runtime.launch_attention(case.q, case.k, case.v, case.seq_lens, out, lse, case.scale, num_splits=num_splits,
                                 kernel=info)

    return Runner(fn, lambda: out, extra={"block_size": info.block_size, "max_group": info.max_group})


def split_candidates(shape: Shape, block_size: int, max_group: int, workspace_cap: int = 2 << 30) -> list[int]:
    """Fixed splits worth trying: no more chunks than the longest tile has blocks, and a
    partials workspace (one [max_group, D] float32 state per chunk) under ``workspace_cap``."""
    blocks = -(-shape.max_len // block_size)
    return [S for S in SPLITS if S <= blocks
            and shape.batch * shape.hkv * S * max_group * shape.head_dim * 4 <= workspace_cap]


SDPA_BACKENDS = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION"}
_SDPA_REASONS: dict[tuple[str, bool], str] = {}


def sdpa_runner(case: Case, system: str) -> Runner:
    """SDPA on q [B, Hq, 1, D] and the [B, Hkv, L, D] caches; ragged batches padded + masked."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, SDPA_BACKENDS[system])
    q4 = case.q[:, :, None]
    k, v = case.k, case.v
    mask = None
    if case.shape.ragged:
        pos = torch.arange(k.shape[2], device=k.device)
        mask = (pos[None, :] < case.seq_lens[:, None].long())[:, None, None, :]  # [B, 1, 1, Lalloc]
    elif k.shape[2] != case.shape.max_len:
        k, v = k[:, :, :case.shape.max_len], v[:, :, :case.shape.max_len]
    box = {}

    def fn():
        box["o"] = torch.nn.functional.scaled_dot_product_attention(q4, k, v, attn_mask=mask, scale=case.scale,
                                                                    enable_gqa=True)

    def context():
        return sdpa_kernel(backend)

    with warnings.catch_warnings(record=True) as caught, context():
        warnings.simplefilter("always")
        try:
            fn()
        except torch.cuda.OutOfMemoryError:
            raise
        except (RuntimeError, ValueError, NotImplementedError) as e:
            # torch states its reasons as warnings, some only once per process: keep the first seen
            key = (system, mask is not None)
            why = "; ".join(dict.fromkeys(str(w.message).strip().split("\n")[0] for w in caught))
            why = _SDPA_REASONS.setdefault(key, why) if why else _SDPA_REASONS.get(key, str(e).split("\n")[0])
            raise Unsupported(f"SDPA {system} refused{' (padded + mask)' if mask is not None else ''}: {why[:300]}"
                              ) from None
    return Runner(fn, lambda: box["o"][:, :, 0], context,
                  extra={"backend": "padded + mask" if mask is not None else ""})


class FlashInfer:
    """FlashInfer's decode wrappers, imported once; ``error`` says why they are missing."""

    def __init__(self, device: torch.device):
        self.device, self.error, self.wrappers, self.version = device, "", {}, ""
        try:
            if device.type == "cuda":  # what its JIT compiles for; sm_90 needs the "a" (wgmma) target
                major, minor = torch.cuda.get_device_capability(device)
                os.environ.setdefault("FLASHINFER_CUDA_ARCH_LIST", f"{major}.{minor}" + ("a" if major == 9 else ""))
            from flashinfer.decode import BatchDecodeWithPagedKVCacheWrapper

            try:
                from flashinfer.version import __version__ as version
            except ImportError:
                version = "?"
            self.version = version
            self.workspace = torch.zeros(128 * M, dtype=torch.uint8, device=device)
            self.cls = BatchDecodeWithPagedKVCacheWrapper
        except Exception as e:  # noqa: BLE001 - any import failure is a reason, not a crash
            self.error = f"flashinfer not importable: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"

    def wrapper(self, tensor_cores: bool):
        if tensor_cores not in self.wrappers:
            self.wrappers[tensor_cores] = self.cls(self.workspace, "HND", use_tensor_cores=tensor_cores)
        return self.wrappers[tensor_cores]


@dataclasses.dataclass
class PagedCache:
    kv: torch.Tensor  # [pages, 2, Hkv, 16, D]: TVM's layout, and FlashInfer's 5-D HND form
    indptr: torch.Tensor  # int32 [B + 1], host
    indices: torch.Tensor  # int32 [pages], device
    last_page_len: torch.Tensor  # int32 [B], host


def page_table(lens: Sequence[int], page_size: int = PAGE_SIZE) -> tuple[list[int], list[int]]:
    """(indptr, last_page_len) of sequences laid out page after page."""
    pages = [-(-n // page_size) for n in lens]
    indptr = [0, *np.cumsum(pages).tolist()]
    return indptr, [n - (p - 1) * page_size for n, p in zip(lens, pages, strict=True)]


def copy_into_pages(kv: torch.Tensor, indptr: Sequence[int]) -> torch.Tensor:
    """[2, B, Hkv, Lalloc, D] -> [pages, 2, Hkv, 16, D]: sequence b's K and V rows fill pages
    indptr[b]..indptr[b+1] (its last page whole, rows past its length included: last_page_len says
    where it ends)."""
    _, _, hkv, _, d = kv.shape
    dst = torch.empty(indptr[-1], 2, hkv, PAGE_SIZE, d, dtype=kv.dtype, device=kv.device)
    for b in range(len(indptr) - 1):
        p = indptr[b + 1] - indptr[b]
        dst[indptr[b]:indptr[b + 1]] = kv[:, b, :, :p * PAGE_SIZE].reshape(2, hkv, p, PAGE_SIZE, d).permute(
            2, 0, 1, 3, 4)
    return dst


def paged_cache(case: Case) -> PagedCache:
    """Copy the contiguous cache into 16-row pages (HND), once, outside timing: same values, one
    copy for every paged peer."""
    s = case.shape
    indptr, last = page_table(s.lens)
    need = 2 * indptr[-1] * s.hkv * PAGE_SIZE * s.head_dim * ELEM_SIZE[s.dtype]
    if case.q.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(case.q.device)
        if need > free - 512 * M:
            raise Unsupported(f"paged copy of {need / 1e9:.1f} GB does not fit ({free / 1e9:.1f} GB free)")
    i32 = dict(dtype=torch.int32)
    return PagedCache(copy_into_pages(case.kv, indptr), torch.tensor(indptr, **i32),
                      torch.arange(indptr[-1], device=case.q.device, **i32), torch.tensor(last, **i32))


def flashinfer_runner(case: Case, fi: FlashInfer, paged: PagedCache, tensor_cores: bool) -> Runner:
    s = case.shape
    w = None

    def plan():
        w.plan(paged.indptr, paged.indices, paged.last_page_len, s.hq, s.hkv, s.head_dim, PAGE_SIZE,
               pos_encoding_mode="NONE", q_data_type=case.q.dtype, kv_data_type=case.q.dtype, sm_scale=case.scale)

    try:
        w = fi.wrapper(tensor_cores)
        plan()  # the first plan/run JIT-compiles the module (15-25 s), outside any timing
        out = torch.empty_like(case.q)
        w.run(case.q, paged.kv, out=out)
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise Unsupported(f"flashinfer{'-tc' if tensor_cores else ''} failed: {type(e).__name__}: {first}") from None
    plan_us = []
    for _ in range(5):  # host time of plan() alone: once per decode step in a server
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        plan()
        plan_us.append((time.perf_counter() - t0) * 1e6)
    backend = getattr(w, "resolved_backend", "")
    return Runner(lambda: w.run(case.q, paged.kv, out=out), lambda: out,
                  extra={"plan_us": float(np.median(plan_us)), "backend": str(backend)})


class TvmPeer:
    """TVM's decode kernels from the library beside the lean one (``tvm_peer``), loaded once with
    tvm-ffi; ``error`` says why they are missing."""

    def __init__(self, device: torch.device):
        self.error, self.library, self.kernels = "", "", {}
        try:
            lib = runtime.library_for(device)
            entry = lib.manifest.get(tvm_peer.MANIFEST_KEY)
            if entry is None:
                arch = lib.manifest.get("arch", "<arch>")
                raise Unsupported(f"no TVM peer library beside the lean one: build it with `python -m lean_tvm.build "
                                  f"--arch {arch} --out DIR --with-tvm-peer`")
            import tvm_ffi

            module = tvm_ffi.load_module(str(lib.path.parent / entry["library"]))
            self.kernels = {(k["hq"], k["hkv"], k["head_dim"], k["dtype"]): module[k["name"]] for k in entry["kernels"]}
            self.library = entry["library"]
        except Unsupported as e:
            self.error = str(e)
        except Exception as e:  # noqa: BLE001 - a library that does not load is a reason, not a crash
            self.error = f"TVM peer library not loadable: {type(e).__name__}: {str(e).strip()[:200]}"

    def kernel(self, shape: Shape):
        if self.error:
            raise Unsupported(self.error)
        fn = self.kernels.get((shape.hq, shape.hkv, shape.head_dim, shape.dtype))
        if fn is None:
            raise Unsupported(f"no TVM kernel for {shape.hq}/{shape.hkv} D{shape.head_dim} {shape.dtype} in "
                              f"{self.library}")
        return fn


def tvm_paged_case(case: Case, paged: PagedCache) -> PagedCase:
    """The paged copy as TVM's kernel takes it (page table and last-page lengths on the device)."""
    dev = case.q.device
    return PagedCase(case.q, paged.kv, paged.indptr.to(dev), paged.indices, paged.last_page_len.to(dev),
                     list(case.shape.lens))


def tvm_runner(case: Case, peer: TvmPeer, paged: PagedCache) -> Runner:
    """TVM's kernel without RoPE (rotary_mode 0); its lse comes in log2 units."""
    fn = peer.kernel(case.shape)
    args = tvm_paged_case(case, paged).args()
    out = torch.empty_like(case.q)
    lse = torch.empty(case.shape.batch, case.shape.hq, device=case.q.device, dtype=torch.float32)
    return Runner(lambda: fn(*args, out, lse, 0, 1.0, 1e4, case.scale), lambda: out, lse=lambda: lse_natural(lse))


def stream_runner(case: Case, sink: torch.Tensor, grid: int) -> Runner:
    """The TIR streaming read of exactly ``kv_bytes``, taken from the start of the K/V block."""
    fn_read = runtime.library_for(case.q.device).function("stream_read")
    rows = case.shape.kv_bytes // 16
    flat = case.kv.view(torch.float16) if case.kv.dtype != torch.float16 else case.kv
    x = flat.view(-1)[:rows * 8].view(rows, 8)
    return Runner(lambda: fn_read(x, sink, grid), lambda: None)


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------


def host_reps(device_us: float) -> int:
    """Enough back-to-back calls for a stable mean, about 50 ms worth, 20..500."""
    return int(min(500, max(20, 50_000 / max(device_us, 5.0)))) if finite(device_us) else 20


def sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def check(runner: Runner, case: Case) -> tuple[float, bool]:
    """The larger relative error of the output and (when the runner reports it) the LSE."""
    with runner.context():
        runner.fn()
    sync()
    err = rel_error(runner.output(), case.ref)
    if runner.lse is not None:
        if case.ref_lse is None:
            case.ref_lse = reference_lse(case)
        err = max(err, rel_error(runner.lse(), case.ref_lse))
    return err, err <= tolerance(case.shape.dtype)


def time_runner(timer: Timer, runner: Runner, reps: int, host: bool = True) -> dict:
    with runner.context():
        st = timer.device_time(runner.fn, reps=reps)
        host_us = timer.host_time(runner.fn, reps=host_reps(st.median)) if host else NAN
    return {"median_us": st.median, "p10_us": st.p10, "p90_us": st.p90, "reps": st.n, "host_us": host_us}


_CAPTURE_STREAM: dict[str, torch.cuda.Stream] = {}


def graph_host_us(timer: Timer, runner: Runner, device_us: float) -> float:
    """Per-call wall time of replaying a CUDA graph of one call (one stream for every capture, so
    the lean workspace cached per stream is allocated once)."""
    dev = str(timer.device)
    if dev not in _CAPTURE_STREAM:
        _CAPTURE_STREAM[dev] = torch.cuda.Stream(timer.device)
    stream = _CAPTURE_STREAM[dev]
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            runner.fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        runner.fn()
    us = timer.host_time(graph.replay, reps=host_reps(device_us))
    del graph
    return us


class Bench:
    """Runs the systems on one shape after another and keeps the rows."""

    def __init__(self, device: torch.device, systems: Sequence[str], reps: int, seed: int):
        self.device, self.systems, self.reps, self.seed = device, tuple(systems), reps, seed
        self.timer = Timer(device)
        self.sms = runtime.num_sms(device)
        self.sink = torch.empty(1 << 20, device=device, dtype=torch.float32)
        self.fi = FlashInfer(device) if any(s.startswith("flashinfer") for s in systems) else None
        self.tvm_peer = TvmPeer(device) if TVM_TIR in systems else None

    def run_shape(self, shape: Shape, progress: Callable[[str], None] = lambda s: None) -> list[dict]:
        try:
            return self._run_shape(shape, progress)
        except torch.cuda.OutOfMemoryError as e:
            reason = f"skipped: out of memory ({str(e).splitlines()[0][:120]})"
            return [shape_row(shape, s, note=reason) for s in (STREAM, *self.systems)]
        finally:
            gc.collect()
            torch.cuda.empty_cache()

    def _run_shape(self, shape: Shape, progress: Callable[[str], None]) -> list[dict]:
        self.timer.warm_clocks(100.0)  # the GPU may have idled (data set-up, a JIT compile): clocks up
        case = make_case(shape, self.device, self.seed)
        case.ref, case.ref_kind = reference(case)
        stream = stream_runner(case, self.sink, self.sms * 4)
        before = self.timer.device_time(stream.fn, reps=self.reps)
        results = {}
        paged = None
        for system in self.systems:
            progress(system)
            try:
                paged = self.paged_for(system, case, paged)
                results[system] = self._run_system(system, case, paged)
            except Unsupported as e:
                results[system] = {"note": str(e)}
            except torch.cuda.OutOfMemoryError:
                gc.collect()
                torch.cuda.empty_cache()
                results[system] = {"note": "out of memory"}
            except Exception as e:  # noqa: BLE001 - one system's failure must not end a long run
                first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
                results[system] = {"ok": False, "note": f"error: {type(e).__name__}: {first}"}
        after = self.timer.device_time(stream.fn, reps=self.reps)
        best = min(before, after, key=lambda st: st.median)
        spread = {"stream_before_us": before.median, "stream_after_us": after.median}
        rows = [shape_row(shape, STREAM, median_us=best.median, p10_us=best.p10, p90_us=best.p90, reps=best.n,
                          **spread)]
        for system, res in results.items():
            rows.append(shape_row(shape, system, **spread, **res))
        del case, paged, results
        return derive(rows)

    def paged_for(self, system: str, case: Case, paged: PagedCache | None) -> PagedCache | None:
        """The shape's paged copy of the cache, made when the first paged peer needs it; a paged
        peer that cannot run says so before the cache is copied for it."""
        if system not in PAGED_PEERS or paged is not None:
            return paged
        error = (self.tvm_peer if system == TVM_TIR else self.fi).error
        if error:
            raise Unsupported(error)
        return paged_cache(case)

    def runner(self, system: str, case: Case, paged: PagedCache | None) -> Runner:
        """One call of ``system`` on ``case`` (``paged``: from :meth:`paged_for`)."""
        if system == "lean-fixedsplit":
            raise Unsupported("lean-fixedsplit is a sweep over split counts, not one call")
        if system in LEAN_SYSTEMS:
            return lean_runner(case, 0 if system == "lean" else 1)
        if system in SDPA_BACKENDS:
            return sdpa_runner(case, system)
        if system == TVM_TIR:
            return tvm_runner(case, self.tvm_peer, paged)
        t0 = time.perf_counter()
        runner = flashinfer_runner(case, self.fi, paged, tensor_cores=system == "flashinfer-tc")
        if time.perf_counter() - t0 > 2.0:  # it JIT-compiled while the GPU idled
            self.timer.warm_clocks(100.0)
        return runner

    def _run_system(self, system: str, case: Case, paged: PagedCache | None) -> dict:
        if system == "lean-fixedsplit":
            return self._best_fixed_split(case)
        runner = self.runner(system, case, paged)
        err, ok = check(runner, case)
        res = {"rel_err": err, "ok": ok, **{k: v for k, v in runner.extra.items() if k in FIELDS}}
        res.update(time_runner(self.timer, runner, self.reps))
        what = "output or lse" if runner.lse is not None else "output"
        notes = [] if ok else [f"{what} differs from the {case.ref_kind} reference (rel. err {err:.2e})"]
        if system == "lean":
            try:
                res["graph_us"] = graph_host_us(self.timer, runner, res["median_us"])
            except Exception as e:  # noqa: BLE001 - the device time stands without it
                notes.append(f"CUDA graph capture failed: {type(e).__name__}: {str(e)[:120]}")
        if res.get("backend"):
            notes.append(f"backend {res['backend']}")
        res["note"] = "; ".join(notes)
        return res

    def _best_fixed_split(self, case: Case) -> dict:
        """Screen each split with a few reps, keep the fastest correct one, time it in full."""
        probe = lean_runner(case, 1)
        candidates = split_candidates(case.shape, probe.extra["block_size"], probe.extra["max_group"])
        if not candidates:
            raise Unsupported("no fixed split fits (tiles of one block)")
        screened, wrong = [], []
        for S in candidates:
            runner = lean_runner(case, S)
            err, ok = check(runner, case)
            if not ok:
                wrong.append(f"S={S} rel. err {err:.1e}")
                continue
            screened.append((self.timer.device_time(runner.fn, reps=10).median, S, err))
        if not screened:
            return {"ok": False, "note": "every fixed split gave a wrong output: " + ", ".join(wrong)}
        _, S, err = min(screened)
        res = {"splits": S, "rel_err": err, "ok": not wrong, **time_runner(self.timer, lean_runner(case, S), self.reps)}
        res["note"] = f"wrong at {', '.join(wrong)}" if wrong else ""
        return res


# --------------------------------------------------------------------------------------------
# Meta, progress, CLI
# --------------------------------------------------------------------------------------------


def portable_argv(path_options: Sequence[str] = ("--out",)) -> list[str]:
    """sys.argv with the script named relative to the repository and the options that name this
    machine's folders dropped (result files carry no machine's paths)."""
    script = Path(sys.argv[0]).resolve()
    name = str(script.relative_to(REPO)) if script.is_relative_to(REPO) else script.name
    args, out = sys.argv[1:], []
    i = 0
    while i < len(args):
        if args[i] in path_options:
            i += 2
            continue
        out.append(args[i])
        i += 1
    return [name, *out]


def git_commit() -> str:
    if os.environ.get("LEAN_TVM_COMMIT"):
        return os.environ["LEAN_TVM_COMMIT"]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10)
        if sha.returncode == 0:
            return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def gpu_dir_name(gpu_name: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``h100``; unknown GPUs get their name, slugged."""
    m = re.search(r"\b([A-Z]\d{2,4}[A-Z]?)\b", gpu_name)
    return (m.group(1) if m else re.sub(r"[^a-z0-9]+", "-", gpu_name.lower()).strip("-")).lower() or "gpu"


def collect_meta(device: torch.device, args, systems: Sequence[str], fi: FlashInfer | None,
                 tvm_peer: TvmPeer | None) -> dict:
    props = torch.cuda.get_device_properties(device)
    lib = runtime.library_for(device)
    try:
        import tvm_ffi

        ffi_version = getattr(tvm_ffi, "__version__", "?")
    except ImportError:
        ffi_version = "?"
    so_sha = hashlib.sha256(Path(lib.path).read_bytes()).hexdigest()
    return {
        "gpu": props.name, "sms": props.multi_processor_count, "l2_bytes": getattr(props, "L2_cache_size", None),
        "memory_bytes": props.total_memory, "capability": f"{props.major}.{props.minor}",
        "clocks_before": gpu_clocks(device), "torch": torch.__version__, "cuda": torch.version.cuda,
        "tvm_ffi": ffi_version, "lean_library": lib.path.name, "lean_library_sha256": so_sha,
        "lean_source_sha256": lib.manifest.get("source_sha256"), "lean_built": lib.manifest.get("built"),
        "flashinfer": (fi.version or fi.error) if fi else "not run",
        "tvm_peer": (tvm_peer.library or tvm_peer.error) if tvm_peer else "not run", "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": portable_argv(), "systems": list(systems), "reps": args.reps, "seed": args.seed,
        "timing": "Timer.device_time: 256 MB read-flush + torch.cuda._sleep before each call, CUDA events; "
                  "host_us: Timer.host_time, calls queued back to back; graph_us: replay of a 1-call CUDA graph",
    }


class Progress:
    """tqdm when importable, else a printed counter; one summary line per shape either way."""

    def __init__(self, total: int):
        self.total, self.done = total, 0
        try:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="run", mininterval=2.0, dynamic_ncols=True)
        except ImportError:
            self.bar = None

    def finish_shape(self, steps: int) -> None:
        """Account for a shape's systems that never started (a shape skipped for memory)."""
        while self.done < steps:
            self.step("")

    def step(self, label: str) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.set_description(label[:60], refresh=False)
            self.bar.update(1)
        else:
            print(f"[{self.done}/{self.total}] {label}", flush=True)

    def write(self, line: str) -> None:
        (self.bar.write if self.bar is not None else print)(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def summary_line(rows: list[dict]) -> str:
    by = {r["system"]: r for r in rows}
    parts = [rows[0]["shape"]]
    for s in (STREAM, "lean"):
        if s in by:
            parts.append(f"{s} {_us(by[s]['median_us'])}")
    if "lean" in by and finite(by["lean"]["pct_stream"]):
        parts.append(f"{by['lean']['pct_stream']:.0f}% of stream")
    peer, peer_us = best_peer(rows)
    if peer and "lean" in by:
        parts.append(f"best peer {peer} {_us(peer_us)} ({speedup(peer_us, by['lean']['median_us']):.2f}x)")
    if any(r.get("ok") is False for r in rows):
        parts.append("WRONG OUTPUT: " + ",".join(r["system"] for r in rows if r.get("ok") is False))
    return " | ".join(parts)


def parse_args(argv: Sequence[str] | None = None):
    p = argparse.ArgumentParser(prog="python -m lean_tvm.bench", description=__doc__.split("\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="8 shapes, under 2 minutes (the default)")
    mode.add_argument("--full", action="store_true", help="the whole grid (~140 shapes)")
    p.add_argument("--only", help=f"comma-separated systems (default all): {','.join(SYSTEMS)}")
    p.add_argument("--shapes", help="regex: only shapes whose name matches, e.g. 'B1 32/8 D128 fp16'")
    p.add_argument("--out", help="output folder (default bench/results/<gpu> in the repository)")
    p.add_argument("--reps", type=int, default=30, help="timed calls per system and shape (default 30)")
    p.add_argument("--cap-gb", type=float, default=KV_CAP_BYTES / 1e9, help="skip shapes with more K+V bytes")
    p.add_argument("--seed", type=int, default=0, help="seed of the ragged lengths and of the tensors")
    p.add_argument("--lib", help="lean library folder (sets LEAN_TVM_LIB_DIR)")
    p.add_argument("--resume", action="store_true", help="keep --out's results.csv rows, skip their shapes")
    p.add_argument("--max-minutes", type=float, default=0, help="stop (and write) before a shape past this")
    p.add_argument("--list", action="store_true", help="print the grid and exit (no GPU needed)")
    p.add_argument("--replot", metavar="DIR", help="rewrite results.md and plots from DIR/results.csv, exit")
    return p.parse_args(argv)


def bench_device() -> torch.device | None:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    systems = parse_systems(args.only)
    if args.replot:
        out = Path(args.replot)
        meta = json.loads((out / "meta.json").read_text()) if (out / "meta.json").exists() else {}
        rows = read_csv(out / "results.csv")
        (out / "results.md").write_text(markdown(rows, meta))
        print("\n".join(str(p) for p in [out / "results.md", *write_plots(rows, out)]))
        return 0
    grid = (full_grid if args.full else quick_grid)(args.cap_gb * 1e9, args.seed)
    shapes = select_shapes(grid, args.shapes)
    if args.list:
        for s in shapes:
            print(f"{s.name:40s} B={s.batch:3d} KV {s.kv_bytes / 1e6:9.1f} MB")
        print(f"{len(shapes)} shapes")
        return 0
    device = bench_device()
    if device is None:
        print("[bench] no CUDA device: the benchmark needs a GPU (--list and --replot do not)", file=sys.stderr)
        return 2
    if args.lib:
        os.environ["LEAN_TVM_LIB_DIR"] = os.path.abspath(args.lib)
    meta_gpu = torch.cuda.get_device_name(device)
    out = Path(args.out) if args.out else REPO / "bench" / "results" / gpu_dir_name(meta_gpu)
    rows = read_csv(out / "results.csv") if args.resume and (out / "results.csv").exists() else []
    done = {r["shape"] for r in rows}
    todo = [s for s in shapes if s.name not in done]
    bench = Bench(device, systems, args.reps, args.seed)
    meta = collect_meta(device, args, systems, bench.fi, bench.tvm_peer)
    meta["rows_kept_from_earlier_run"] = len(rows)  # --resume: those rows carry an earlier run's clocks
    print(f"[bench] {meta['gpu']}, {len(todo)} shapes x {len(systems)} systems (+ stream) -> {out}", flush=True)
    bench.timer.warm_clocks()
    t0, progress = time.time(), Progress(len(todo) * len(systems))
    stopped = 0
    for i, shape in enumerate(todo):
        if args.max_minutes and time.time() - t0 > args.max_minutes * 60:
            stopped = len(todo) - i
            break
        shape_rows = bench.run_shape(shape, lambda system, s=shape: progress.step(f"{s.name} {system}"))
        progress.finish_shape((i + 1) * len(systems))
        rows += shape_rows
        progress.write(summary_line(shape_rows))
        meta["clocks_after"] = gpu_clocks(device)
        meta["elapsed_s"] = round(time.time() - t0, 1)
        write_outputs(rows, meta, out, plots=False)  # after every shape: a killed run keeps its rows
    progress.close()
    write_outputs(rows, meta, out)
    if stopped:
        print(f"[bench] --max-minutes reached: {stopped} shapes left; rerun with --resume to continue", flush=True)
    print(f"[bench] wrote {out}/results.csv, results.md, meta.json and plots", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
