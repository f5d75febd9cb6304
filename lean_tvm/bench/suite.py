"""The benchmark suite: LeanAttention against its own variants and its peers, one shape at a time.

    python -m lean_tvm.bench --quick                 # the quick grid, a few minutes
    python -m lean_tvm.bench --full --out DIR        # the whole grid (use --resume/--max-minutes)
    python -m lean_tvm.bench --serving               # paged caches and several tokens per sequence
    python -m lean_tvm.bench --fp8                   # fp8 (e4m3) caches, dense and in pages of 16
    python -m lean_tvm.bench --list [--full]         # print the grid; needs no GPU
    python -m lean_tvm.bench --replot DIR            # rewrite results.md and plots from results.csv

Every system runs in this one process on the same K/V values (``systems.py``):

* ``lean`` (stream-K, ``lean_tvm.decode_attention`` as a user calls it) on the [B, Hkv, L, D]
  cache, ``lean-blhd`` on its [B, L, Hkv, D] copy; ``lean-nosplit`` (``num_splits=1``,
  FlashAttention-2 style) and ``lean-fixedsplit`` (Flash-Decoding: the best ``num_splits`` of
  2..128);
* ``cudnn`` and ``flash``: torch SDPA pinned to one backend (ragged batches padded to the longest
  sequence plus a boolean mask, which the flash backend may refuse);
* ``flashinfer`` / ``flashinfer-tc``: ``BatchDecodeWithPagedKVCacheWrapper`` without / with tensor
  cores, on a page-size-16 copy of the same cache; ``plan()`` host time in its own column;
* ``fa3``: FlashAttention-3 (vLLM's sm_90 build) with its own split heuristic, and ``fa3-best``:
  its best ``num_splits`` of 1..64 with pack_gqa off and on, on the [B, L, Hkv, D] copy;
* ``tvm-tir``: TVM's own decode kernel (what its PagedKVCache runs) on the paged copy;
* fp8 rows (``--fp8``): ``lean`` on the e4m3 cache with its scales, ``lean-16bit`` our kernel on
  the same values dequantised to 16 bits, FlashInfer's decode with ``kv_data_type`` e4m3, and
  FA3's fp8 path (which needs q in e4m3 too: checked with a looser tolerance);
* ``stream``: the TIR streaming read of exactly the K+V bytes that must move, the yardstick.

Every output is first checked against a reference (SDPA for uniform batches, float64 for ragged
ones), and the LSE where a runner reports one; a failing row is marked, never dropped. Then all
systems of the shape, the yardstick included, are timed in interleaved rounds
(``timing.interleaved``: L2 flushed by a 256 MB read before each call, the launch path hidden
behind a sleep, CUDA events); a row reports the median of the rounds' medians with p10/p90 of all
calls and the rounds' range. Host time: per-call wall time from Python with calls queued back to
back, and for ``lean`` also the replay of a captured CUDA graph.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from lean_tvm import library, runtime

from . import report
from .grid import KV_CAP_BYTES, Shape, fp8_grid, full_grid, quick_grid, select_shapes, serving_grid
from .libraries import BenchLibrary
from .report import STREAM, SYSTEMS, TVM_TIR, finite, shape_row
from .systems import (
    FA3,
    FA3_SPLITS,
    SPLITS,
    Case,
    FlashInfer,
    PagedCache,
    Runner,
    TvmPeer,
    Unsupported,
    check,
    fa3_runner,
    flashinfer_runner,
    lean_runner,
    lean_split_runner,
    make_case,
    paged_cache,
    reference,
    sdpa_runner,
    stream_runner,
    sync,
    tvm_runner,
)
from .timing import Timer, capture_graph, gpu_clocks, interleaved

PAGED_PEERS = ("flashinfer", "flashinfer-tc", TVM_TIR)  # they read a paged cache
DENSE_ONLY = ("lean-blhd", "lean-nosplit", "lean-fixedsplit")  # the dense one-token kernel's variants
SDPA_SYSTEMS = ("cudnn", "flash")
ROUNDS, REPS = 5, 10
REPO = Path(__file__).resolve().parents[2]


def parse_systems(only: str | None) -> tuple[str, ...]:
    if not only:
        return SYSTEMS
    names = tuple(x.strip() for x in only.split(",") if x.strip())
    bad = [n for n in names if n not in SYSTEMS]
    if bad:
        raise SystemExit(f"--only: unknown system(s) {bad}; choose from {','.join(SYSTEMS)}")
    return tuple(s for s in SYSTEMS if s in names)


def split_candidates(shape: Shape, block_size: int, max_group: int, workspace_cap: int = 2 << 30) -> list[int]:
    """Fixed splits worth trying: no more chunks than the longest tile has blocks, and a
    partials workspace (one [max_group, D] float32 state per chunk) under ``workspace_cap``."""
    blocks = -(-shape.max_len // block_size)
    return [S for S in SPLITS if S <= blocks
            and shape.batch * shape.hkv * S * max_group * shape.head_dim * 4 <= workspace_cap]


def host_reps(device_us: float) -> int:
    """Enough back-to-back calls for a stable mean, about 50 ms worth, 20..500."""
    return int(min(500, max(20, 50_000 / max(device_us, 5.0)))) if finite(device_us) else 20


def graph_host_us(timer: Timer, runner: Runner, device_us: float) -> float:
    """Per-call wall time of replaying a CUDA graph of one call (``timing.capture_graph``)."""
    graph = capture_graph(runner.fn, timer.device, warmups=2)
    us = timer.host_time(graph.replay, reps=host_reps(device_us))
    del graph
    return us


class Bench:
    """Runs the systems on one shape after another and keeps the rows."""

    def __init__(self, device: torch.device, systems: Sequence[str], reps: int, rounds: int, seed: int):
        self.device, self.systems, self.reps, self.rounds, self.seed = device, tuple(systems), reps, rounds, seed
        self.timer = Timer(device)
        self.sms = runtime.num_sms(device)
        self.sink = torch.empty(1 << 20, device=device, dtype=torch.float32)
        self.lib = BenchLibrary(library.find_library_dir(runtime.device_arch(device)))
        self.fi = FlashInfer(device) if any(s.startswith("flashinfer") for s in systems) else None
        self.fa3 = FA3(device) if any(s.startswith("fa3") for s in systems) else None
        self.tvm_peer = TvmPeer(self.lib) if TVM_TIR in systems else None

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
        runners = {STREAM: stream_runner(case, self.lib, self.sink, self.sms * 4)}
        results: dict[str, dict] = {STREAM: {}}
        caches: dict[str, PagedCache] = {}
        for system in self.systems:
            progress(system)
            try:
                paged = self.paged_for(system, case, caches)
                runner, res = self._prepare(system, case, paged)
                runners[system], results[system] = runner, res
            except Unsupported as e:
                results[system] = {"note": str(e)}
            except torch.cuda.OutOfMemoryError:
                gc.collect()
                torch.cuda.empty_cache()
                results[system] = {"note": "out of memory"}
            except Exception as e:  # noqa: BLE001 - one system's failure must not end a long run
                first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
                results[system] = {"ok": False, "note": f"error: {type(e).__name__}: {first}"}
        self.timer.warm_clocks(50.0)
        timed = interleaved(self.timer, {n: (r.fn, r.context) for n, r in runners.items()}, self.rounds, self.reps)
        for name, st in timed.items():
            results[name].update(median_us=st.median, p10_us=st.p10, p90_us=st.p90, round_lo_us=st.round_lo,
                                 round_hi_us=st.round_hi, reps=st.n)
            if name != STREAM:
                self._host_times(name, runners[name], results[name])
        rows = [shape_row(shape, name, **res) for name, res in results.items()]
        del case, caches, runners
        return report.derive(rows)

    def _host_times(self, name: str, runner: Runner, res: dict) -> None:
        with runner.context():
            res["host_us"] = self.timer.host_time(runner.fn, reps=host_reps(res["median_us"]))
        if name == "lean":
            try:
                res["graph_us"] = graph_host_us(self.timer, runner, res["median_us"])
            except Exception as e:  # noqa: BLE001 - the device time stands without it
                res["note"] = "; ".join(filter(None, [res.get("note"), f"CUDA graph capture failed: "
                                                      f"{type(e).__name__}: {str(e)[:120]}"]))

    def paged_for(self, system: str, case: Case, caches: dict[str, PagedCache]) -> PagedCache | None:
        """The paged cache ``system`` reads, made on first use and kept in ``caches`` for the
        shape's other paged peers: TVM's kernel takes a [P, 2, Hkv, 16, D] copy, FlashInfer a paged
        shape's own pool (else the same copy). A paged peer that cannot run says so before any copy."""
        if system not in PAGED_PEERS:
            return None
        if system == TVM_TIR and case.kv8 is not None:
            raise Unsupported("TVM's decode kernel takes no fp8 cache")
        error = (self.tvm_peer if system == TVM_TIR else self.fi).error
        if error:
            raise Unsupported(error)
        kind = "pool" if system != TVM_TIR and case.pool is not None else "copy"
        if kind not in caches:
            caches[kind] = paged_cache(case) if kind == "pool" else paged_cache(dataclasses.replace(case, pool=None))
        return caches[kind]

    def runner(self, system: str, case: Case, paged: PagedCache | None) -> Runner:
        """One call of ``system`` on ``case`` (``paged``: from :meth:`paged_for`); the sweeps
        (``lean-fixedsplit``, ``fa3-best``) are :meth:`_prepare`'s."""
        s = case.shape
        if system in DENSE_ONLY and s.serving:
            raise Unsupported(f"{system} runs the dense one-token rows (the lean row is the paged form here)")
        if system == "lean-dense" and not (s.page_size or s.q_len > 1):
            raise Unsupported("lean-dense runs the paged and several-token rows (the lean row is it here)")
        if system == "lean-16bit" and not s.kv_dtype:
            raise Unsupported("lean-16bit runs the fp8 rows (our kernel on their dequantised values)")
        if system in ("lean", "lean-blhd", "lean-dense", "lean-16bit"):
            paged = system in ("lean", "lean-16bit") and case.pool is not None
            return lean_runner(case, "blhd" if system == "lean-blhd" else "bhld", paged=paged,
                               bits16=system == "lean-16bit")
        if system == "lean-nosplit":
            return lean_split_runner(case, 1)
        if system in SDPA_SYSTEMS:
            return sdpa_runner(case, system)
        if system == TVM_TIR:
            return tvm_runner(case, self.tvm_peer, paged)
        if system == "fa3":
            return fa3_runner(case, self.fa3)
        if system.startswith("flashinfer"):
            t0 = time.perf_counter()
            runner = flashinfer_runner(case, self.fi, paged, tensor_cores=system == "flashinfer-tc")
            if time.perf_counter() - t0 > 2.0:  # it JIT-compiled while the GPU idled
                self.timer.warm_clocks(100.0)
            return runner
        raise Unsupported(f"{system} is a sweep, not one call")

    def _prepare(self, system: str, case: Case, paged: PagedCache | None) -> tuple[Runner, dict]:
        """The runner to time and its row's fields so far (correctness, extras, notes)."""
        if system == "lean-fixedsplit":
            if case.shape.serving:
                raise Unsupported(f"{system} runs the dense one-token rows (the lean row is the paged form here)")
            probe = lean_split_runner(case, 1)
            candidates = {f"S={S}": lambda S=S: lean_split_runner(case, S)
                          for S in split_candidates(case.shape, probe.extra["block_size"], probe.extra["max_group"])}
            return self._best_of(candidates, case)
        if system == "fa3-best":
            if self.fa3.error:
                raise Unsupported(self.fa3.error)
            if case.kv8 is not None:
                raise Unsupported("fa3-best runs the 16-bit rows (the fa3 row is its fp8 path here)")
            candidates = {f"S={S}{' pack_gqa' if pack else ''}": lambda S=S, pack=pack: fa3_runner(case, self.fa3, S,
                                                                                                     pack)
                          for S in FA3_SPLITS for pack in (False, True)}
            return self._best_of(candidates, case)
        runner = self.runner(system, case, paged)
        err, ok = check(runner, case)
        res = {"rel_err": err, "ok": ok, **{k: v for k, v in runner.extra.items() if k in report.FIELDS}}
        notes = [] if ok else [f"{'output or lse' if runner.lse is not None else 'output'} differs from the "
                               f"{case.ref_kind} reference (rel. err {err:.2e})"]
        if res.get("backend"):
            notes.append(f"backend {res['backend']}")
        res["note"] = "; ".join(notes)
        return runner, res

    def _best_of(self, candidates: dict[str, Callable[[], Runner]], case: Case) -> tuple[Runner, dict]:
        """Screen each candidate with a few calls, keep the fastest correct one."""
        if not candidates:
            raise Unsupported("no candidate fits this shape (tiles of one block)")
        screened, wrong = [], []
        for label, make in candidates.items():
            try:
                runner = make()
                err, ok = check(runner, case)
            except Exception as e:  # noqa: BLE001 - a configuration the system refuses is skipped
                wrong.append(f"{label} refused ({type(e).__name__})")
                sync()
                continue
            if not ok:
                wrong.append(f"{label} rel. err {err:.1e}")
                continue
            with runner.context():
                screened.append((self.timer.device_time(runner.fn, reps=6, warmup=1).median, label, err, runner))
        if not screened:
            return Runner(lambda: None, lambda: None), {"ok": False, "note": "every candidate failed: "
                                                        + ", ".join(wrong)}
        _, label, err, runner = min(screened, key=lambda x: x[0])
        res = {"rel_err": err, "ok": True, "splits": runner.extra.get("splits", int(label.split("=")[1].split()[0])),
               "backend": label, "note": f"best of {len(screened)}: {label}"}
        return runner, res


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


def collect_meta(device: torch.device, args, bench: Bench) -> dict:
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
        "flashinfer": (bench.fi.version or bench.fi.error) if bench.fi else "not run",
        "fa3": (bench.fa3.version or bench.fa3.error) if bench.fa3 else "not run",
        "tvm_peer": (bench.tvm_peer.library or bench.tvm_peer.error) if bench.tvm_peer else "not run",
        "commit": git_commit(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": portable_argv(), "systems": list(bench.systems), "rounds": args.rounds, "reps": args.reps,
        "seed": args.seed,
        "timing": "timing.interleaved: per shape every system timed in turn, rounds x reps calls, 256 MB read-flush "
                  "+ torch.cuda._sleep before each call, CUDA events; median of the rounds' medians; host_us: "
                  "Timer.host_time, calls queued back to back; graph_us: replay of a 1-call CUDA graph",
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
            parts.append(f"{s} {report.fmt_us(by[s]['median_us'])}")
    if "lean" in by and finite(by["lean"]["pct_stream"]):
        parts.append(f"{by['lean']['pct_stream']:.0f}% of stream")
    peer, peer_us = report.best_peer(rows)
    if peer and "lean" in by:
        ratio = report.speedup(peer_us, by["lean"]["median_us"])
        parts.append(f"best peer {peer} {report.fmt_us(peer_us)} ({ratio:.2f}x)")
    if any(r.get("ok") is False for r in rows):
        parts.append("WRONG OUTPUT: " + ",".join(r["system"] for r in rows if r.get("ok") is False))
    return " | ".join(parts)


def parse_args(argv: Sequence[str] | None = None):
    p = argparse.ArgumentParser(prog="python -m lean_tvm.bench", description=__doc__.split("\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the quick grid, a few minutes (the default)")
    mode.add_argument("--full", action="store_true", help="the whole grid (~160 shapes)")
    mode.add_argument("--serving", action="store_true", help="paged caches (pages of 1/16/64) and Sq = 2/4/8 tokens")
    mode.add_argument("--fp8", action="store_true", help="fp8 (e4m3) caches: the quick shapes, dense and paged")
    p.add_argument("--only", help=f"comma-separated systems (default all): {','.join(SYSTEMS)}")
    p.add_argument("--shapes", help="regex: only shapes whose name matches, e.g. 'B1 32/8 D128 fp16'")
    p.add_argument("--out", help="output folder (default results/<gpu>/quick or full in the repository)")
    p.add_argument("--rounds", type=int, default=ROUNDS, help=f"interleaved rounds per shape (default {ROUNDS})")
    p.add_argument("--reps", type=int, default=REPS, help=f"timed calls per system and round (default {REPS})")
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
        rows = report.read_csv(out / "results.csv")
        (out / "results.md").write_text(report.markdown(rows, meta))
        print("\n".join(str(p) for p in [out / "results.md", *report.write_plots(rows, out)]))
        return 0
    which = "full" if args.full else "serving" if args.serving else "fp8" if args.fp8 else "quick"
    grid = {"full": full_grid, "serving": serving_grid, "fp8": fp8_grid, "quick": quick_grid}[which](
        args.cap_gb * 1e9, args.seed)
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
    out = Path(args.out) if args.out else REPO / "results" / gpu_dir_name(meta_gpu) / which
    rows = report.read_csv(out / "results.csv") if args.resume and (out / "results.csv").exists() else []
    done = {r["shape"] for r in rows}
    todo = [s for s in shapes if s.name not in done]
    bench = Bench(device, systems, args.reps, args.rounds, args.seed)
    meta = collect_meta(device, args, bench)
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
        report.write_outputs(rows, meta, out, plots=False)  # after every shape: a killed run keeps its rows
    progress.close()
    report.write_outputs(rows, meta, out)
    if stopped:
        print(f"[bench] --max-minutes reached: {stopped} shapes left; rerun with --resume to continue", flush=True)
    print(f"[bench] wrote {out}/results.csv, results.md, meta.json and plots", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
