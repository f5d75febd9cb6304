"""Search the schedule's knobs per kernel on a GPU and record the winners in schedules/<arch>.json.

Three steps, so that the GPU machine needs neither TVM nor nvcc:

    python -m lean_tvm.bench.tune build   --arch sm_90a --out build/tune_sm_90a   # CPU machine
    python -m lean_tvm.bench.tune measure --lib build/tune_sm_90a --out tune.json  # GPU machine
    python -m lean_tvm.bench.tune select  tune.json --lib build/tune_sm_90a       # writes the record

``build`` compiles every candidate that fits the arch's shared memory (rows per warp step,
warps, pipeline stages, CTAs per SM) into one library; ``measure`` times each on a set of
shape classes (small / medium / long context, a batch, a ragged batch); ``select`` keeps, per
kernel, the candidate with the best geometric mean of (time / best time of that shape).
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
    from .. import build as builder
    from ..attention_gpu import make_gpu_kernel
    from ..library import ATTENTION_OP
    from ..schedule_records import fits

    funcs, kernels = {}, []
    for spec in specs:
        for knobs in CANDIDATES:
            if not fits(knobs, spec, arch):
                continue
            name = candidate_name(spec, knobs)
            funcs[name] = make_gpu_kernel(spec, knobs, name=name)
            kernels.append({"name": name, "op": ATTENTION_OP, "dtype": spec.dtype,
                            "head_dim": spec.head_dim, "max_group": spec.max_group,
                            "knobs": dataclasses.asdict(knobs), "block_size": knobs.block_size})
            print(f"[lean_tvm.bench.tune] candidate {name}", flush=True)
    builder.compile_library(arch, out_dir, funcs, kernels)


def _shape_group(spec_max_group: int) -> int:
    return 4 if spec_max_group == 8 else 16


def measure(lib_dir: str, out_path: str, reps: int = 10, rounds: int = 3) -> dict:
    """Every candidate on every shape class, the candidates of a kernel family timed in interleaved
    rounds (``timing.interleaved``) so that a slow minute of the GPU hits all of them alike."""
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
        groups.setdefault((k.dtype, k.head_dim, k.max_group), []).append(k)
    for (dtype, head_dim, max_group), kernels in groups.items():
        g = _shape_group(max_group)
        for shape, batch, hq, hkv, lens in SHAPES:
            hq = hkv * g
            tdt = getattr(torch, dtype)
            k_cache = torch.randn(batch, hkv, max(lens), head_dim, device=dev, dtype=tdt)
            v_cache = torch.randn_like(k_cache)
            q = torch.randn(batch, hq, head_dim, device=dev, dtype=tdt)
            lens_t = torch.tensor(lens, dtype=torch.int32, device=dev)
            out = torch.empty_like(q)
            lse = torch.empty(batch, hq, device=dev)
            args = (q, k_cache, v_cache, lens_t, out, lse, 1 / math.sqrt(head_dim))
            calls = {info.name: (_launch(args, info), contextlib.nullcontext) for info in kernels}
            for name, st in interleaved(timer, calls, rounds, reps).items():
                results["times"].append({"kernel": name, "dtype": dtype, "head_dim": head_dim,
                                         "max_group": max_group, "shape": shape, "us": st.median,
                                         "round_lo_us": st.round_lo, "round_hi_us": st.round_hi})
                print(f"{name:60s} {shape:22s} {st.median:8.1f} us [{st.round_lo:.1f}-{st.round_hi:.1f}]", flush=True)
            del args, k_cache, v_cache
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1)
    return results


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
    by_family: dict[tuple, dict[str, dict[str, float]]] = {}
    for r in results["times"]:
        fam = (r["dtype"], r["head_dim"], r["max_group"])
        by_family.setdefault(fam, {}).setdefault(r["kernel"], {})[r["shape"]] = r["us"]
    records = []
    for (dtype, head_dim, max_group), cands in by_family.items():
        shapes = set.intersection(*(set(v) for v in cands.values()))
        best = {s: min(c[s] for c in cands.values()) for s in shapes}
        few = {s: t for s, t in best.items() if s not in many}
        spec = AttentionSpec(dtype, head_dim, max_group)
        now = next((r for r in current if r.get("head_dim") == head_dim and r.get("max_group") == max_group), {})
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
