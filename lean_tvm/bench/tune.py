"""Search the schedule's knobs per kernel on a GPU and record the winners in schedules/<arch>.json.

Three steps, so that the GPU machine needs neither TVM nor nvcc:

    python -m lean_tvm.bench.tune build   --arch sm_90a --out build/tune_sm_90a   # CPU machine
    python -m lean_tvm.bench.tune measure --lib build/tune_sm_90a --out tune.json  # GPU machine
    python -m lean_tvm.bench.tune select  tune.json --lib build/tune_sm_90a       # writes the record

``build`` compiles every candidate that fits the arch's shared memory (rows per warp step,
warps, pipeline stages, CTAs per SM; fp8 caches' paged kernels with ``--kv-dtypes``) into one
library; ``measure`` times each on a set of shape classes (small / medium / long
context, a batch, a ragged batch) and checks its output against the float64 reference; ``select``
keeps, per kernel, the correct candidate with the best geometric mean of (time / best time of
that shape).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Sequence

from ..spec import AttentionSpec, GpuKnobs

CANDIDATES = (
    GpuKnobs(rows_per_warp=16, num_warps=4, stages=4),
    GpuKnobs(rows_per_warp=16, num_warps=4, stages=2),
    GpuKnobs(rows_per_warp=32, num_warps=4, stages=3),
    GpuKnobs(rows_per_warp=32, num_warps=4, stages=2),
    GpuKnobs(rows_per_warp=16, num_warps=8, stages=2),
    GpuKnobs(rows_per_warp=16, num_warps=4, stages=2, ctas_per_sm=2),
    GpuKnobs(rows_per_warp=16, num_warps=4, stages=8),
)
# fp8 caches (the paged kernel): a stage holds half the bytes while the per-step work (ldmatrix,
# widening, mma, softmax) stays, so candidates with more rows per warp step. (Widening the bytes
# with integer bit moves instead of cvt was measured on the H200 and lost on every shape: NOTES.)
FP8_CANDIDATES = tuple(
    GpuKnobs(rows_per_warp=rw, num_warps=w, stages=st, ctas_per_sm=c)
    for rw, w, st, c in ((16, 8, 4, 1), (16, 4, 4, 2), (16, 4, 4, 1), (32, 8, 2, 1), (32, 4, 2, 2), (32, 4, 2, 1),
                         (32, 4, 4, 1), (64, 4, 2, 1)))
# (name, batch, Hq, Hkv, lengths): the shape classes a schedule must serve.
SHAPES = (
    ("B1 L4k", 1, 32, 8, [4096]),
    ("B1 L32k", 1, 32, 8, [32768]),
    ("B1 L256k", 1, 32, 8, [262144]),
    ("B16 L4k", 16, 32, 8, [4096] * 16),
    ("B32 L2k", 32, 32, 8, [2048] * 32),
    ("B128 L1k", 128, 32, 8, [1024] * 128),
    ("ragged 1x128k+15x2k", 16, 32, 8, [131072] + [2048] * 15),
    ("ragged 2x32k+30x512", 32, 32, 8, [32768] * 2 + [512] * 30),
)


def candidate_name(spec: AttentionSpec, knobs: GpuKnobs) -> str:
    return f"{spec.name}__{knobs.tag}"


def build(arch: str, out_dir: str, specs: Sequence[AttentionSpec]) -> None:
    """Every fitting candidate of every spec: the dense kernel for 16-bit caches, the paged one
    (which serves dense fp8 caches) for a spec with a ``kv_dtype``."""
    from .. import build as builder
    from ..attention_gpu import make_gpu_kernel, make_gpu_paged_kernel
    from ..library import ATTENTION_OP, DENSE, PAGED
    from ..schedule_records import fits

    funcs, kernels = {}, []
    for spec in specs:
        for knobs in FP8_CANDIDATES if spec.kv_dtype else CANDIDATES:
            if not fits(knobs, spec, arch):
                continue
            name = candidate_name(spec, knobs)
            make = make_gpu_paged_kernel if spec.kv_dtype else make_gpu_kernel
            funcs[name] = make(spec, knobs, name=name)
            kernels.append({"name": name, "op": ATTENTION_OP, "form": PAGED if spec.kv_dtype else DENSE,
                            "dtype": spec.dtype, "kv_dtype": spec.kv_dtype,
                            "head_dim": spec.head_dim, "max_group": spec.max_group,
                            "knobs": dataclasses.asdict(knobs), "block_size": knobs.block_size})
            print(f"[lean_tvm.bench.tune] candidate {name}", flush=True)
    builder.compile_library(arch, out_dir, funcs, kernels)


def _shape_group(spec_max_group: int) -> int:
    return 4 if spec_max_group == 8 else 16


def measure(lib_dir: str, out_path: str, reps: int = 10, rounds: int = 3) -> dict:
    """Every candidate on every shape class, the candidates of a kernel family timed in interleaved
    rounds (``timing.interleaved``) so that a slow minute of the GPU hits all of them alike; each
    candidate's output is then compared with the float64 reference (``max_err``, relative to the
    largest output), so that ``select`` never keeps a fast wrong kernel."""
    import torch

    from .. import runtime
    from .timing import Timer, gpu_clocks, interleaved

    os.environ["LEAN_TVM_LIB_DIR"] = lib_dir
    dev = torch.device("cuda")
    lib = runtime.library_for(dev)
    timer = Timer(dev)
    timer.warm_clocks()
    results = {"gpu": torch.cuda.get_device_name(dev), "clocks": gpu_clocks(dev),
               "date": time.strftime("%Y-%m-%d"), "rounds": rounds, "reps": reps, "times": []}
    groups: dict[tuple, list] = {}
    for k in lib.kernels:
        groups.setdefault((k.dtype, k.kv_dtype, k.head_dim, k.max_group), []).append(k)
    for (dtype, kv_dtype, head_dim, max_group), kernels in groups.items():
        g = _shape_group(max_group)
        for shape, batch, _, hkv, lens in SHAPES:
            case = _Case(dev, dtype, kv_dtype, batch, hkv * g, hkv, head_dim, lens)
            calls = {info.name: (case.launch(info), contextlib.nullcontext) for info in kernels}
            for name, st in interleaved(timer, calls, rounds, reps).items():
                calls[name][0]()
                err = case.error()
                results["times"].append({"kernel": name, "dtype": dtype, "kv_dtype": kv_dtype,
                                         "head_dim": head_dim, "max_group": max_group, "shape": shape,
                                         "us": st.median, "round_lo_us": st.round_lo, "round_hi_us": st.round_hi,
                                         "max_err": err})
                print(f"{name:60s} {shape:22s} {st.median:8.1f} us [{st.round_lo:.1f}-{st.round_hi:.1f}] "
                      f"err {err:.1e}", flush=True)
            del case, calls
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1)
    return results


MAX_ERR = 2e-2  # a candidate's output error (relative to the largest output) past which it is wrong


class _Case:
    """One shape's inputs (a 16-bit [B, Hkv, L, D] cache, or an fp8 one with per-head scales served
    by the paged kernel as one page per sequence), its float64 reference and its launches."""

    def __init__(self, dev, dtype: str, kv_dtype: str | None, batch: int, hq: int, hkv: int, head_dim: int,
                 lens: list[int]):
        import torch

        tdt = getattr(torch, dtype)
        shape = (batch, hkv, max(lens), head_dim)
        self.k = torch.randn(shape, device=dev, dtype=tdt)
        self.v = torch.randn(shape, device=dev, dtype=tdt)
        self.kv_dtype, self.scale = kv_dtype, 1 / math.sqrt(head_dim)
        if kv_dtype:
            fp8 = getattr(torch, kv_dtype)
            self.k, self.v = self.k.to(fp8), self.v.to(fp8)
            self.scales = [torch.linspace(0.5, 2.0, hkv, device=dev) * s for s in (1.0, 0.25)]
        self.q = torch.randn(batch, 1, hq, head_dim, device=dev, dtype=tdt)
        self.lens = torch.tensor(lens, dtype=torch.int32, device=dev)
        self.out = torch.empty_like(self.q)
        self.lse = torch.empty(batch, 1, hq, device=dev)
        self.ref = self._reference(lens)

    def _reference(self, lens: list[int]):
        from ..reference import decode_attention_reference, dequantize

        k, v = self.k, self.v
        if self.kv_dtype:
            k, v = dequantize(k, self.scales[0]), dequantize(v, self.scales[1])
        return decode_attention_reference(self.q, k, v, lens, self.scale)[0]

    def launch(self, info):
        from .. import runtime

        batch, hkv, cache_len = self.k.shape[0], self.k.shape[1], self.k.shape[2]
        if not self.kv_dtype:
            q3, o3, lse2 = self.q[:, 0], self.out[:, 0], self.lse[:, 0]
            return lambda: runtime.launch_attention(q3, self.k, self.v, self.lens, o3, lse2, self.scale, kernel=info)
        import torch

        table = torch.arange(batch, dtype=torch.int32, device=self.q.device).view(batch, 1)
        start = torch.zeros_like(self.lens)
        k8, v8 = self.k.view(torch.uint8), self.v.view(torch.uint8)
        fn = runtime.paged_launcher(self.q, hkv, cache_len, kv_dtype=self.kv_dtype, kernel=info)
        return lambda: fn(self.q, k8, v8, table, self.lens, start, self.out, self.lse, self.scale, 30, *self.scales)

    def error(self) -> float:
        return float((self.out.double() - self.ref).abs().max() / self.ref.abs().max())


def _pick(cands: dict[str, dict[str, float]], best: dict[str, float], current: dict | None, knobs_of: dict) -> str:
    """The candidate with the best geomean over ``best``'s shapes, unless the one with the
    ``current`` knobs is within KEEP_MARGIN of it."""
    score = {n: _geomean_vs_best(cands[n], best) for n in cands}
    top = min(score, key=score.get)
    keep = [n for n in cands if current and _same_knobs(knobs_of[n], current)]
    return keep[0] if keep and score[keep[0]] <= score[top] * (1 + KEEP_MARGIN) else top


def _same_knobs(a: dict, b: dict) -> bool:
    fields = ("rows_per_warp", "num_warps", "stages", "ctas_per_sm")
    return all(a.get(f) == b.get(f) for f in fields)


def _launch(args: tuple, info):
    from .. import runtime

    return lambda: runtime.launch_attention(*args, kernel=info)


def _geomean_vs_best(times: dict[str, float], best: dict[str, float]) -> float:
    return math.exp(sum(math.log(times[s] / best[s]) for s in best) / len(best))


KEEP_MARGIN = 0.01  # a candidate replaces the current knobs only if its geomean is this much better


def select(results: dict, manifest: dict, current: list[dict] = ()) -> list[dict]:
    """Per kernel family, the plain kernel's knobs: the candidate with the best geometric mean of
    time / best time over the shapes of one sequence and of few tiles; the batch variant's
    (``batch_knobs``, kept only where they differ): the same over the shapes of at least
    ``plan.BATCH_VARIANT_TILES`` tiles, which the runtime sends to it. The ``current`` records'
    knobs stay unless a candidate beats them by ``KEEP_MARGIN``: a change must pay for itself."""
    from ..plan import BATCH_VARIANT_TILES
    from ..schedule_records import record

    many = {name for name, batch, _, hkv, _ in SHAPES if batch * hkv >= BATCH_VARIANT_TILES}
    knobs_of = {k["name"]: k["knobs"] for k in manifest["kernels"] if k["op"] == "decode_attention"}
    wrong = {r["kernel"] for r in results["times"] if not r.get("max_err", 0) <= MAX_ERR}
    by_family: dict[tuple, dict[str, dict[str, float]]] = {}
    for r in results["times"]:
        if r["kernel"] not in wrong:
            fam = (r["dtype"], r.get("kv_dtype"), r["head_dim"], r["max_group"])
            by_family.setdefault(fam, {}).setdefault(r["kernel"], {})[r["shape"]] = r["us"]
    records = []
    for (dtype, kv_dtype, head_dim, max_group), cands in by_family.items():
        shapes = set.intersection(*(set(v) for v in cands.values()))
        best = {s: min(c[s] for c in cands.values()) for s in shapes}
        few = {s: t for s, t in best.items() if s not in many}
        spec = AttentionSpec(dtype, head_dim, max_group, kv_dtype=kv_dtype)
        now = next((r for r in current if (r.get("head_dim"), r.get("max_group"), r.get("kv_dtype"))
                    == (head_dim, max_group, kv_dtype)), {})
        name = _pick(cands, few, now.get("knobs"), knobs_of)
        extra = {}
        if few != best:
            batch = _pick(cands, {s: best[s] for s in many & shapes}, now.get("batch_knobs", now.get("knobs")),
                          knobs_of)
            if batch != name:
                extra["batch_knobs"] = knobs_of[batch]
                extra["batch_times_us"] = {s: round(cands[batch][s], 2) for s in sorted(many & shapes)}
        # The knobs do not depend on the dtype (only the mma's type does): one record serves both.
        records.append(record(spec, GpuKnobs(**knobs_of[name]), any_dtype=True,
                              geomean_vs_best=round(_geomean_vs_best(cands[name], few), 4),
                              times_us={s: round(cands[name][s], 2) for s in sorted(shapes)},
                              measured_on=results["gpu"], date=results["date"], **extra))
    return records


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lean_tvm.bench.tune", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="compile every fitting candidate (CPU machine with nvcc)")
    b.add_argument("--arch", default="sm_90a")
    b.add_argument("--out", required=True)
    b.add_argument("--dtypes", default="float16", help="the knobs serve every dtype; tune one")
    b.add_argument("--head-dims", default="64,128,256")
    b.add_argument("--max-groups", default="8,16")
    b.add_argument("--kv-dtypes", default="", help="also fp8 caches' paged kernels (comma-separated "
                   "float8_e4m3fn, float8_e5m2), over FP8_CANDIDATES")
    b.add_argument("--no-16bit", action="store_true", help="only the fp8 kernels")
    m = sub.add_parser("measure", help="time the candidates (GPU machine)")
    m.add_argument("--lib", required=True)
    m.add_argument("--out", required=True)
    m.add_argument("--reps", type=int, default=10, help="calls per candidate and round")
    m.add_argument("--rounds", type=int, default=3)
    s = sub.add_parser("select", help="write the winners to schedules/<arch>.json")
    s.add_argument("results")
    s.add_argument("--lib", required=True, help="the tuning library (its manifest names the knobs)")
    s.add_argument("--out", default=None, help="default schedules/<arch>.json")
    args = ap.parse_args(argv)
    if args.cmd == "build":
        from ..build import attention_specs

        specs = attention_specs(args.dtypes.split(","), [int(x) for x in args.head_dims.split(",")],
                                [int(x) for x in args.max_groups.split(",")])
        kvs = [kv for kv in args.kv_dtypes.split(",") if kv]
        specs = ([] if args.no_16bit else specs) + [dataclasses.replace(s, kv_dtype=kv) for s in specs for kv in kvs]
        build(args.arch, args.out, specs)
    elif args.cmd == "measure":
        measure(args.lib, args.out, args.reps, args.rounds)
    else:
        from ..schedule_records import load_records, merge_records, records_dir

        with open(args.results) as f:
            results = json.load(f)
        with open(os.path.join(args.lib, "manifest.json")) as f:
            manifest = json.load(f)
        out = args.out or str(records_dir() / f"{manifest['arch']}.json")
        current = load_records(manifest["arch"], out)
        records = merge_records(select(results, manifest, current), current)
        data = {"arch": manifest["arch"], "note": "written by python -m lean_tvm.bench.tune select",
                "records": records}
        with open(out, "w") as f:
            json.dump(data, f, indent=1)
        print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
