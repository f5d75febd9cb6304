r"""The Llama example's CUDA Relax executables on the GPU machine (runtime-only TVM, no compiler):
both forms checked against float64, then per-token latency, LeanAttention vs TVM's default attention.

Build them first on the CPU machine: ``python scripts/build_relax_gpu.py`` (writes build/relax_gpu/).
Then one command on the GPU machine, from the repository root, carrying the git-ignored paths
``[".whl", "build/relax_gpu"]`` (tvm-ffi wheel 3.2 MB + executables and runtime-only TVM ~14.4 MB):

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && \
    PYTHONPATH=/tmp/site:$PWD/build/relax_gpu/site:$PWD/build/relax_gpu timeout 540 python3 scripts/relax_gpu.py

Optional environment: RELAX_GPU_DIR (default build/relax_gpu); RELAX_GPU_SHAPES, the timed shapes as
``BxL`` (B sequences each holding L - 1 tokens before the step, cache capacity L) or ``ragged``
(1 x 32k + 7 x 2k in a 32k cache), default ``1x4096,8x4096,1x32768,4x32768,16x8192,ragged``;
RELAX_GPU_ITERS (timed calls per measurement, default 100); RELAX_GPU_WARMUP (default 10);
OUT (a directory: results are also written to $OUT/relax_gpu.json).

What is timed, per shape and form, with CUDA events around each call, median [p10-p90] in us:
* ``llama``: one decode step of the whole model (2 layers, embedding to logits), called from Python
  through the Relax VM -- the per-token latency; ``steady`` = back-to-back calls (host launch
  overhead included where it dominates), ``cold`` = each call queued behind a 256 MB read that
  flushes L2 (device time with the caches coming from HBM);
* ``attn``: the decode attention alone (examples/llama_relax.AttentionOnly), same two ways.
TVM's default form materialises ``R.repeat`` of both caches (G = 4) and reads the whole padded
cache; LeanAttention reads each sequence's valid rows once, in place.
"""

from __future__ import annotations

import functools
import json
import math
import os
import statistics
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIR = os.environ.get("RELAX_GPU_DIR", os.path.join(REPO, "build", "relax_gpu"))
sys.path[:0] = [os.path.join(DIR, "site"), DIR, os.path.join(REPO, "examples"), REPO]

from lean_runtime import load_tvm_cuda_runtime  # noqa: E402

tvm = load_tvm_cuda_runtime()
import llama_relax as L  # noqa: E402  (its reference half: torch only)
from tvm.runtime.vm import VirtualMachine  # noqa: E402

from lean_tvm.reference import decode_attention_reference  # noqa: E402

DEV = torch.device("cuda")
LOGIT_TOL = dict(atol=6e-2, rtol=3e-2)
ATTN_TOL = dict(atol=2e-2, rtol=2e-2)  # TVM's default attention accumulates in fp16
ITERS = int(os.environ.get("RELAX_GPU_ITERS", "100"))
WARMUP = int(os.environ.get("RELAX_GPU_WARMUP", "10"))
SHAPES = os.environ.get("RELAX_GPU_SHAPES", "1x4096,8x4096,1x32768,4x32768,16x8192,ragged").split(",")


def log(msg: str) -> None:
    print(msg, flush=True)


def lengths(shape: str) -> tuple[list[int], int]:
    """(tokens already cached per sequence, cache capacity L)."""
    if shape == "ragged":
        return [32767] + [2047] * 7, 32768
    b, n = (int(x) for x in shape.lower().split("x"))
    return [n - 1] * b, n


def load(manifest: dict, name: str):
    path = os.path.join(DIR, manifest["files"][name]["file"])
    return VirtualMachine(tvm.runtime.load_module(path), tvm.cuda(0))


def time_calls(fn, flush=None) -> dict:
    for _ in range(WARMUP):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(ITERS)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(ITERS)]
    for i in range(ITERS):
        if flush is not None:
            flush()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    us = sorted(s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends, strict=True))
    return {"median_us": statistics.median(us), "p10_us": us[len(us) // 10], "p90_us": us[(9 * len(us)) // 10]}


def fmt(t: dict | None) -> str:
    return "failed" if t is None else f"{t['median_us']:8.1f} [{t['p10_us']:.0f}-{t['p90_us']:.0f}]"


def time_shape(shape: str, cfg, forms, vms, wl, flush) -> dict:
    lens, cap = lengths(shape)
    tokens, seq_lens, kc, vc = L.make_inputs(cfg, lens, cap, device=DEV)
    q = torch.randn(len(lens), cfg.heads, cfg.head_dim, device=DEV).half()
    lens1 = seq_lens + 1
    kv_mb = 2 * sum(n + 1 for n in lens) * cfg.kv_heads * cfg.head_dim * 2 / 1e6
    calls = {"llama": lambda f: vms["llama", f]["decode"](tokens, seq_lens, kc, vc, *wl),
             "attn": lambda f: vms["attn", f]["forward"](q, kc[0], vc[0], lens1)}
    row = {}
    for form in forms:
        t = {}
        for kind, call in calls.items():
            for mode in ("steady", "cold"):
                try:
                    t[f"{kind}_{mode}"] = time_calls(functools.partial(call, form), flush if mode == "cold" else None)
                except Exception as e:  # noqa: BLE001 -- report and go on
                    log(f"{shape} {form} {kind} {mode}: FAILED {str(e)[:300]}")
                    t[f"{kind}_{mode}"] = None
        row[form] = t
        log(f"{shape:>10} {form:>5} | {fmt(t['llama_steady']):>22} {fmt(t['llama_cold']):>22} | "
            f"{fmt(t['attn_steady']):>22} {fmt(t['attn_cold']):>22} | {kv_mb:.1f}")
    if "lean" in row and "tvm" in row:
        sp = {k: row["tvm"][k]["median_us"] / row["lean"][k]["median_us"] for k in row["lean"]
              if row["lean"][k] and row["tvm"].get(k)}
        log(f"{'':>10} {'x':>5} | tvm/lean: " + "  ".join(f"{k} {v:.2f}x" for k, v in sp.items()))
    return {"lens": lens if len(lens) <= 16 else f"{len(lens)} x {lens[0]}", "capacity": cap,
            "kv_mb_per_layer": kv_mb, **row}


def main() -> int:
    with open(os.path.join(DIR, "manifest.json")) as f:
        manifest = json.load(f)
    props = torch.cuda.get_device_properties(0)
    log(f"{torch.cuda.get_device_name()} SMs={props.multi_processor_count} torch {torch.__version__} "
        f"tvm {tvm.__version__} (runtime only: {tvm.base._RUNTIME_ONLY}) built {manifest['built']}")
    cfg = L.LlamaConfig(**manifest["config"])
    lean = manifest["lean"]
    resident = props.multi_processor_count * lean["knobs"]["ctas_per_sm"]
    forms = ["tvm", "lean"]
    if lean["num_workers"] > resident:  # the stream-K reducers wait on each other: all CTAs must be resident
        log(f"SKIP LeanAttention: built for {lean['num_workers']} workers, this GPU holds {resident} CTAs "
            f"(rebuild with scripts/build_relax_gpu.py --num-workers {resident})")
        forms = ["tvm"]
    log(f"LeanAttention kernel {lean['kernel']} workers={lean['num_workers']} knobs={lean['knobs']}")
    vms = {(kind, form): load(manifest, f"{kind}_{form}") for kind in ("llama", "attn") for form in forms}
    params = [(n, tuple(s), d) for n, s, d in manifest["params"]]
    weights = L.random_weights(params)
    wl = L.weight_list(params, weights, DEV)
    ref = L.TorchLlama(cfg, {k: v.to(DEV) for k, v in weights.items()})
    results = {"device": torch.cuda.get_device_name(), "sms": props.multi_processor_count,
               "date": time.strftime("%Y-%m-%d %H:%M"), "iters": ITERS, "checks": {}, "timings": {}}
    ok = True

    # ---- correctness: ragged lengths, an empty cache, a long one --------------------------------
    lens, cap = [37, 0, 1000, 4094, 1], 4096
    tokens, seq_lens, kc, vc = L.make_inputs(cfg, lens, cap, device=DEV)
    want, new_kv = ref.decode(tokens, seq_lens, kc, vc)
    for form in forms:
        kcf, vcf = [t.clone() for t in kc], [t.clone() for t in vc]
        try:
            logits = torch.from_dlpack(vms["llama", form]["decode"](tokens, seq_lens, kcf, vcf, *wl))
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 -- report and go on with the other form
            log(f"[check] llama {form}: FAILED to run: {e}")
            ok = False
            continue
        err = (logits.double() - want).abs().max().item()
        good = torch.allclose(logits.double(), want, **LOGIT_TOL)
        rows = all(torch.allclose(kcf[i][b, n].double(), new_kv[i][0][b], atol=2e-2, rtol=1e-2)
                   for i in range(cfg.layers) for b, n in enumerate(lens))
        log(f"[check] llama decode {form:4s}: logits max|err| vs float64 = {err:.2e} "
            f"(max|logit| {want.abs().max().item():.2f}) {'OK' if good else 'FAIL'}; "
            f"cache append {'OK' if rows else 'FAIL'}")
        results["checks"][f"llama_{form}"] = {"max_err": err, "ok": bool(good and rows)}
        ok &= rows and (good or form == "tvm")  # TVM's own fp16 numerics: reported, not fatal
    g = torch.Generator(device=DEV).manual_seed(3)
    q = torch.randn(len(lens), cfg.heads, cfg.head_dim, device=DEV, generator=g).half()
    lens_attn = torch.tensor([37, 0, 1000, 4096, 1], dtype=torch.int32, device=DEV)
    ro, _ = decode_attention_reference(q, kc[0].permute(0, 2, 1, 3), vc[0].permute(0, 2, 1, 3),
                                       lens_attn.tolist(), 1 / math.sqrt(cfg.head_dim))
    for form in forms:
        try:
            o = torch.from_dlpack(vms["attn", form]["forward"](q, kc[0], vc[0], lens_attn))
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001
            log(f"[check] attention {form}: FAILED to run: {e}")
            ok = False
            continue
        nonempty = lens_attn > 0  # TVM's -inf mask gives NaN for an empty sequence; lean gives 0
        err = (o.double() - ro)[nonempty].abs().max().item()
        good = torch.allclose(o.double()[nonempty], ro[nonempty], **ATTN_TOL)
        if form == "lean":
            good &= bool((o[~nonempty] == 0).all())
        log(f"[check] attention only {form:4s}: max|err| vs float64 = {err:.2e} {'OK' if good else 'FAIL'}")
        results["checks"][f"attn_{form}"] = {"max_err": err, "ok": bool(good)}
        ok &= good or form == "tvm"
    del kc, vc

    # ---- per-token latency -----------------------------------------------------------------------
    flush_buf = torch.empty(256 * 2**20 // 4, device=DEV)

    def flush():
        flush_buf.sum()

    log(f"\nper-token latency, us: median [p10-p90] of {ITERS} calls after {WARMUP} warm-up; "
        "steady = back to back, cold = behind a 256 MB L2-flushing read")
    log(f"{'shape':>10} {'form':>5} | {'llama steady':>22} {'llama cold':>22} | {'attn steady':>22} {'attn cold':>22}"
        f" | KV MB/layer")
    for shape in SHAPES:
        results["timings"][shape] = time_shape(shape, cfg, forms, vms, wl, flush)
        torch.cuda.empty_cache()
    if os.environ.get("OUT"):
        os.makedirs(os.environ["OUT"], exist_ok=True)
        with open(os.path.join(os.environ["OUT"], "relax_gpu.json"), "w") as f:
            json.dump(results, f, indent=1)
    log("\nOK relax_gpu" if ok else "\nFAILED relax_gpu (see the [check] lines)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
