r"""LeanAttention in TVM's paged-KV-cache form on the GPU (runtime-only TVM): correctness against
float64 and TVM's own paged decode kernel, and inside TVM's KV cache runtime. (Its speed is the
benchmark suite's: ``python -m lean_tvm.bench``.)

Build first on the CPU machine: ``python scripts/build_relax_gpu.py`` (writes build/relax_gpu/;
``paged_*`` files). On the GPU machine, carrying ``[".whl", "build/relax_gpu"]``:

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && \
    PYTHONPATH=/tmp/site:$PWD/build/relax_gpu/site:$PWD/build/relax_gpu:$PWD python3 scripts/paged_gpu.py

Environment: RELAX_GPU_DIR (default build/relax_gpu), OUT (writes $OUT/paged_gpu.json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIR = os.environ.get("RELAX_GPU_DIR", os.path.join(REPO, "build", "relax_gpu"))
sys.path[:0] = [os.path.join(DIR, "site"), DIR, REPO, os.path.join(REPO, "tests")]

from lean_runtime import load_tvm_cuda_runtime  # noqa: E402

tvm = load_tvm_cuda_runtime()
import paged_cases  # noqa: E402  (the tests' fixtures)
from tvm.runtime.vm import VirtualMachine  # noqa: E402

from lean_tvm.reference import decode_attention_reference  # noqa: E402
from lean_tvm.softmax import LSE_TVM, lse_natural_from_tvm  # noqa: E402

DEV = torch.device("cuda")
TOL = dict(atol=2e-3, rtol=1e-2)  # fp16 output vs float64
LSE_TOL = dict(atol=1e-3, rtol=1e-4)
CHECK_LENS = {
    "ragged + empty": [37, 0, 16, 1, 200, 64, 17, 4096, 4097, 15],
    "one long": [70001],
    "uniform 8 x 2k": [2048] * 8,
}
CACHE_LENS = [37, 1000, 16, 2900, 1]  # TVM's KV cache runtime: prefill these (one chunk), then one decode step


def log(msg: str) -> None:
    print(msg, flush=True)


class PagedKernels:
    def __init__(self, manifest: dict):
        p = manifest["paged"]
        self.hq, self.hkv, self.d, self.ps = p["num_qo_heads"], p["num_kv_heads"], p["head_dim"], p["page_size"]
        lib = tvm.runtime.load_module(os.path.join(DIR, manifest["files"]["paged_kernels"]["file"]))
        self.fns = {form: lib[symbol] for form, symbol in p["kernels"].items()}
        self.scale = 1 / math.sqrt(self.d)

    def case(self, lens, seed=0):
        return paged_cases.random_paged_cache(lens, self.hq, self.hkv, self.d, self.ps, device=DEV, seed=seed)

    def call(self, form: str, case):
        b = len(case.lens)
        o = torch.full((b, self.hq, self.d), float("nan"), dtype=case.q.dtype, device=DEV)
        lse = torch.full((b, self.hq), float("nan"), device=DEV)
        args = case.args()
        return (lambda: self.fns[form](*args, o, lse, 0, 1.0, 1e4, self.scale)), o, lse


def check_kernels(k: PagedKernels, results: dict) -> bool:
    ok = True
    for name, lens in CHECK_LENS.items():
        case = k.case(lens, seed=len(lens))
        kd, vd = paged_cases.dense_from_pages(case)
        ref_o, ref_lse = decode_attention_reference(case.q, kd, vd, lens, k.scale)
        outs = {}
        for form in k.fns:
            fn, o, lse = k.call(form, case)
            fn()
            torch.cuda.synchronize()
            outs[form] = (o, lse)
            empty = torch.tensor([n == 0 for n in lens], device=DEV)
            err = (o.double() - ref_o).abs().max().item()
            lse_err = (lse_natural_from_tvm(lse).double() - ref_lse)[~empty].abs().max().item()
            good = {"o": torch.allclose(o.double(), ref_o, **TOL) and not torch.isnan(lse).any(),
                    "lse": torch.allclose(lse_natural_from_tvm(lse).double()[~empty], ref_lse[~empty], **LSE_TOL),
                    "empty": bool((lse[empty] == LSE_TVM.empty).all() and (o[empty] == 0).all())}
            verdict = "OK" if all(good.values()) else "FAIL " + ",".join(k for k, v in good.items() if not v)
            log(f"[check] paged kernel {form:4s} {name:16s}: max|err| vs float64 o {err:.2e} lse {lse_err:.2e} "
                f"{verdict}")
            results["checks"][f"kernel_{form}_{name}"] = {"max_err": err, "lse_err": lse_err, "ok": verdict == "OK"}
            ok &= verdict == "OK" or form == "tvm"  # TVM's own kernel: reported, not fatal
        for form in k.fns:
            if form != "tvm":
                diff = (outs[form][0].float() - outs["tvm"][0].float()).abs().max().item()
                log(f"[check] paged kernel {form} vs tvm {name:16s}: max|diff| {diff:.2e}")
    return ok


def check_kv_cache(manifest: dict, k: PagedKernels, results: dict) -> bool:
    g = torch.Generator().manual_seed(5)
    width = k.hq + 2 * k.hkv
    qkv_prefill = torch.randn(sum(CACHE_LENS), width, k.d, generator=g).half().to(DEV)
    qkv_decode = torch.randn(len(CACHE_LENS), width, k.d, generator=g).half().to(DEV)
    kd, vd = paged_cases.dense_from_fused_qkv(CACHE_LENS, qkv_prefill, qkv_decode, k.hq, k.hkv)
    ref, _ = decode_attention_reference(qkv_decode[:, :k.hq], kd, vd, [n + 1 for n in CACHE_LENS], k.scale)
    ok, outs = True, {}
    for form in ("tvm", "lean"):
        path = os.path.join(DIR, manifest["files"][f"paged_cache_{form}"]["file"])
        create = VirtualMachine(tvm.runtime.load_module(path), tvm.cuda(0))["create"]
        outs[form] = paged_cases.kv_cache_decode(create, CACHE_LENS, qkv_prefill, qkv_decode, k.hq, k.scale)
        torch.cuda.synchronize()
        err = (outs[form].double() - ref).abs().max().item()
        good = torch.allclose(outs[form].double(), ref, **TOL)
        log(f"[check] TVM KV cache runtime, decode kernel {form:4s}: max|err| vs float64 {err:.2e} "
            f"{'OK' if good else 'FAIL'}")
        results["checks"][f"kv_cache_{form}"] = {"max_err": err, "ok": bool(good)}
        ok &= bool(good) or form == "tvm"
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.parse_args()
    with open(os.path.join(DIR, "manifest.json")) as f:
        manifest = json.load(f)
    props = torch.cuda.get_device_properties(0)
    resident = props.multi_processor_count * manifest["paged"]["knobs"]["ctas_per_sm"]
    if manifest["paged"]["workers"] > resident:
        log(f"LeanAttention built for {manifest['paged']['workers']} workers; this GPU holds {resident} CTAs")
        return 1
    log(f"{torch.cuda.get_device_name()} SMs={props.multi_processor_count} torch {torch.__version__} "
        f"tvm {tvm.__version__} (runtime only) paged config {manifest['paged']}")
    k = PagedKernels(manifest)
    results = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d %H:%M"),
               "config": manifest["paged"], "commit": os.environ.get("LEAN_TVM_COMMIT", ""), "checks": {}}
    ok = check_kernels(k, results)
    ok &= check_kv_cache(manifest, k, results)
    if os.environ.get("OUT"):
        os.makedirs(os.environ["OUT"], exist_ok=True)
        with open(os.path.join(os.environ["OUT"], "paged_gpu.json"), "w") as f:
            json.dump(results, f, indent=1)
    log("\nOK paged_gpu" if ok else "\nFAILED paged_gpu (see the [check] lines)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
