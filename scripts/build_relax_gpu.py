"""Build the Llama example's CUDA Relax executables (both forms) for a GPU machine, with no GPU here.

    python scripts/build_relax_gpu.py [--out build/relax_gpu] [--arch sm_90a] [--num-workers N]

Writes into OUT (git-ignored):
  llama_tvm_<arch>.so      TVM's default form: R.nn.attention legalized, every PrimFunc dlight-scheduled
  llama_lean_<arch>.so     the same model after RewriteDecodeAttention (LeanAttention decode kernel)
  attn_tvm_<arch>.so,      the decode attention alone, both forms (examples/llama_relax.AttentionOnly)
  attn_lean_<arch>.so
  paged_kernels_<arch>.so  TVM's paged decode kernel (batch_decode_paged_kv) and ours in its form
                           (lean_tvm.relax.kv_cache), as plain TIR functions
  paged_cache_tvm_<arch>.so, paged_cache_lean_<arch>.so
                           create() of TVM's TIRPagedKVCache (one layer), with TVM's decode kernel and
                           with ours swapped in (lean_tvm.relax.kv_cache.use_lean_paged_decode)
  manifest.json            model config, weight names/shapes (the VM takes weights after the inputs),
                           num_workers, knobs, kernel lists, sizes, versions
  site/tvm/                the TVM package for runtime-only use (no libtvm_compiler.so, 3rdparty, src,
                           web): what examples/pack_runtime.py of the shared docs copies
  lean_runtime.py          load_tvm_cuda_runtime() for the GPU side (the same helper as pack_runtime.py)

Each .so is an embedded-fatbin Relax VM executable (TVM.md §4): the build runs in a child process
that preloads a stub ``libcuda.so.1`` so that ``libtvm_runtime_cuda.so`` loads and TVM's build-time
nvcc callback compiles the device code (``TVM_CUDA_COMPILE_MODE=nvcc``, no ``--use_fast_math``,
like the operator library). The executables need no CUDA compiler and no TVM compiler on the GPU.
The tvm-ffi wheel is not copied: the GPU command installs ``.whl/*.whl`` (README; 3.2 MB).
Checks here: every .so holds a fatbin and no CUDA source, the runtime-only TVM from OUT/site loads
every executable (with the stub driver), and OUT + .whl fit the 64 MiB a GPU call carries.
Run on the GPU machine: scripts/relax_gpu.py (its header has the one command).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CARRY_LIMIT_MIB = 64
STUB_SRC = "#define S(n) int n(void){return 100;}\n"  # 100 == CUDA_ERROR_NO_DEVICE
FATBIN_MAGIC = b"\x50\xed\x55\xba"
RUNTIME_IGNORE = ("libtvm_compiler.so", "3rdparty", "src", "web", "__pycache__", "*.pyc")
FORMS = ("tvm", "lean")

if "--child" in sys.argv:  # before `import tvm`: the stub driver lets libtvm_runtime_cuda.so load
    ctypes.CDLL(os.environ["LEAN_CUDA_STUB"], mode=ctypes.RTLD_GLOBAL)
    os.environ["TVM_CUDA_COMPILE_MODE"] = "nvcc"
    os.environ["TVM_CUDA_NVCC_NO_FAST_MATH"] = "1"


def log(msg: str) -> None:
    print(f"[build_relax_gpu] {msg}", flush=True)


def du(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def make_stub(directory: str) -> str:
    """A libcuda.so.1 exporting the driver symbols libtvm_runtime_cuda.so imports (all fail)."""
    import tvm

    lib = os.path.join(os.path.dirname(tvm.__file__), "lib", "libtvm_runtime_cuda.so")
    nm = subprocess.run(["nm", "-D", "--undefined-only", lib], capture_output=True, text=True, check=True)
    syms = sorted(set(re.findall(r"\bU (cu[A-Z]\w*)", nm.stdout)))
    os.makedirs(directory, exist_ok=True)
    c = os.path.join(directory, "cuda_stub.c")
    with open(c, "w") as f:
        f.write(STUB_SRC + "".join(f"S({s})\n" for s in syms))
    so = os.path.join(directory, "libcuda.so.1")
    subprocess.run(["gcc", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", c, "-o", so], check=True)
    return so


# --------------------------------------------------------------------------------------------
# Child: compile (stub driver loaded).
# --------------------------------------------------------------------------------------------


def build_child(out: str, arch: str, num_workers: int | None) -> None:

    import tvm
    from tvm.base import _LOADED_LIBS

    sys.path.insert(0, REPO)
    sys.path.insert(0, os.path.join(REPO, "examples"))
    import llama_relax as L

    from lean_tvm import relax as lean_relax

    assert "tvm_runtime_cuda" in _LOADED_LIBS, "the stub libcuda did not let libtvm_runtime_cuda.so load"
    target = tvm.target.Target({"kind": "cuda", "arch": arch}, host="llvm")
    cfg = L.LlamaConfig()
    mod, params = L.export(cfg, target_kind="cuda", prefill=False)
    attn = L.export_attention_only(cfg)
    modules = {"llama_tvm": mod, "llama_lean": L.lean_form(mod, "cuda", num_workers=num_workers, arch=arch),
               "attn_tvm": attn, "attn_lean": L.lean_form(attn, "cuda", num_workers=num_workers, arch=arch)}
    lean_cfg = lean_relax.LeanConfig("cuda", num_workers=num_workers, arch=arch)
    spec = lean_cfg.spec_for(cfg.dtype, cfg.head_dim, cfg.group)
    manifest = {"arch": arch, "config": dataclasses.asdict(cfg),
                "params": [[n, list(s), d] for n, s, d in params],
                "lean": {"kernel": spec.name, "num_workers": lean_cfg.workers(spec),
                         "knobs": dataclasses.asdict(lean_cfg.gpu_knobs(spec))},
                "functions": {"llama": "decode(tokens, seq_lens, k_caches, v_caches, *weights) -> logits f32",
                              "attn": "forward(q [B,Hq,D], k_cache, v_cache [B,L,Hkv,D], seq_lens) -> o"},
                "files": {}, "tvm_version": tvm.__version__, "built": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for name, m in modules.items():
        counts = lean_relax.count_attention_calls(m)
        t0 = time.time()
        with target:  # the nvcc callback reads the arch from Target.current()
            ex = lean_relax.build(m, target)
        path = os.path.join(out, f"{name}_{arch}.so")
        ex.export_library(path)
        cuda = ex.mod._collect_from_import_tree(lambda x: x.kind == "cuda")
        log(f"{os.path.basename(path)}: {time.time() - t0:.1f} s, {du(path) / 2**20:.2f} MiB, "
            f"attention calls {counts}, device modules {[x.kind for x in cuda]}")
        manifest["files"][name] = {"file": os.path.basename(path), "bytes": du(path), "attention_calls": counts}
    build_paged(out, arch, target, lean_cfg, manifest)
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)


PAGED = dict(num_qo_heads=32, num_kv_heads=8, head_dim=128, dtype="float16", page_size=16)
PAGED_CACHE_TOKENS = 16384  # the cache module's max_total_seq_len
PAGED_VARIANTS = ((4, 3), (4, 4))  # (warps, stages): extra builds of our paged kernel, timed beside the tuned one


def build_paged(out: str, arch: str, target, lean_cfg, manifest: dict) -> None:
    """The paged-KV-cache artifacts (Llama-3-8B heads: 32/8 x 128, fp16, pages of 16)."""
    import tvm
    from tvm.relax.frontend.nn.llm._decode_kernels import _attention_decode

    from lean_tvm import relax as lean_relax
    from lean_tvm.relax import kv_cache as paged

    hq, hkv, d, dt, ps = (PAGED[k] for k in ("num_qo_heads", "num_kv_heads", "head_dim", "dtype", "page_size"))
    lean = paged.make_paged_decode_gpu(hkv, hq, d, dt, ps, lean_cfg)
    theirs = _attention_decode(hkv, hq, d, dt, False, {}, target, ps)
    base = paged.kv_cache_module("cuda", hq, hkv, d, dt, ps, max_batch_size=16, max_total_seq_len=PAGED_CACHE_TOKENS)
    swapped, n = paged.use_lean_paged_decode(base, "cuda", lean_cfg)
    assert n == 1, n
    spec = lean_cfg.spec_for(dt, d, hq // hkv)
    knobs = paged.paged_knobs(lean_cfg.gpu_knobs(spec), ps)
    kernels = {"tvm": theirs, "lean": lean}
    for warps, stages in PAGED_VARIANTS:  # deeper pipelines: the page-table read sits before each load
        cfg = dataclasses.replace(lean_cfg, knobs=dataclasses.replace(knobs, num_warps=warps, stages=stages))
        kernels[f"lean_w{warps}s{stages}"] = paged.make_paged_decode_gpu(hkv, hq, d, dt, ps, cfg).with_attr(
            "global_symbol", f"{lean.attrs['global_symbol']}_w{warps}s{stages}")
    manifest["paged"] = {**PAGED, "cache_tokens": PAGED_CACHE_TOKENS, "workers": lean_cfg.workers(spec),
                         "knobs": dataclasses.asdict(knobs),
                         "kernels": {name: f.attrs["global_symbol"] for name, f in kernels.items()}}
    modules = {"paged_kernels": tvm.IRModule(kernels),
               "paged_cache_tvm": base, "paged_cache_lean": swapped}
    for name, m in modules.items():
        t0 = time.time()
        with target:
            ex = lean_relax.build(m, target)
        path = os.path.join(out, f"{name}_{arch}.so")
        ex.export_library(path)
        log(f"{os.path.basename(path)}: {time.time() - t0:.1f} s, {du(path) / 2**20:.2f} MiB")
        manifest["files"][name] = {"file": os.path.basename(path), "bytes": du(path)}


# --------------------------------------------------------------------------------------------
# Parent: stub, child build, runtime payload, checks.
# --------------------------------------------------------------------------------------------

HELPER = r'''"""GPU-side helper: make a runtime-only TVM able to load CUDA modules (from pack_runtime.py)."""
import ctypes, glob, os, site, sys


def _find_cudart():
    cands = []
    for sp in site.getsitepackages() + sys.path:
        cands += glob.glob(os.path.join(sp, "nvidia", "cu13", "lib", "libcudart.so.13"))
        cands += glob.glob(os.path.join(sp, "nvidia", "cuda_runtime", "lib", "libcudart.so.13"))
    cands += glob.glob("/usr/local/cuda*/lib64/libcudart.so.13") + glob.glob("/usr/local/cuda*/lib/libcudart.so.13")
    return cands[0] if cands else "libcudart.so.13"


def load_tvm_cuda_runtime():
    """Import tvm (runtime only) and load libtvm_runtime_cuda.so, which runtime-only mode
    does not load by itself (no 'ffi.Module.load_from_bytes.cuda' without it)."""
    os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")
    import tvm
    from tvm.base import _LOADED_LIBS
    if "tvm_runtime_cuda" not in _LOADED_LIBS:
        ctypes.CDLL(_find_cudart(), mode=ctypes.RTLD_GLOBAL)
        libdir = os.path.dirname(_LOADED_LIBS["tvm_runtime"]._name)
        _LOADED_LIBS["tvm_runtime_cuda"] = ctypes.CDLL(os.path.join(libdir, "libtvm_runtime_cuda.so"))
    return tvm
'''

RUNTIME_CHECK = r'''
import ctypes, json, os, sys
ctypes.CDLL(sys.argv[2], mode=ctypes.RTLD_GLOBAL)  # the stub driver: loading needs no GPU
sys.path.insert(0, sys.argv[1])
from lean_runtime import load_tvm_cuda_runtime
tvm = load_tvm_cuda_runtime()
from tvm.base import _RUNTIME_ONLY, _LOADED_LIBS
assert _RUNTIME_ONLY and tvm.__file__.startswith(sys.argv[1]), (tvm.__file__, _RUNTIME_ONLY)
m = json.load(open(os.path.join(sys.argv[1], "manifest.json")))
for name, info in m["files"].items():
    lib = tvm.runtime.load_module(os.path.join(sys.argv[1], info["file"]))
    kinds = [x.kind for x in lib._collect_from_import_tree(lambda x: True)]
    assert "cuda" in kinds, kinds
    print(f"  runtime-only load OK: {info['file']} modules {kinds}")
print("  libs:", sorted(_LOADED_LIBS))
'''


def pack_runtime(out: str) -> None:
    import tvm

    dst = os.path.join(out, "site", "tvm")
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(os.path.dirname(tvm.__file__), dst, ignore=shutil.ignore_patterns(*RUNTIME_IGNORE))
    with open(os.path.join(out, "lean_runtime.py"), "w") as f:
        f.write(HELPER)


def check_artifacts(out: str, stub: str) -> None:
    with open(os.path.join(out, "manifest.json")) as f:
        manifest = json.load(f)
    for info in manifest["files"].values():
        data = open(os.path.join(out, info["file"]), "rb").read()
        if FATBIN_MAGIC not in data or b'extern "C" __global__' in data:
            raise SystemExit(f"{info['file']}: expected an embedded fatbin and no CUDA source")
    log("every executable holds a fatbin, no CUDA source")
    res = subprocess.run([sys.executable, "-c", RUNTIME_CHECK, os.path.abspath(out), stub], cwd="/",
                         env={**os.environ, "PYTHONPATH": os.path.join(os.path.abspath(out), "site"),
                              "TVM_USE_RUNTIME_LIB": "1"}, capture_output=True, text=True)
    print(res.stdout, end="")
    if res.returncode != 0:
        raise SystemExit(f"runtime-only load failed:\n{res.stderr[-3000:]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(REPO, "build", "relax_gpu"))
    ap.add_argument("--arch", default="sm_90a")
    ap.add_argument("--num-workers", type=int, default=None,
                    help="LeanAttention workers = CUDA grid (default 132 SMs x ctas_per_sm of the knobs)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        build_child(args.out, args.arch, args.num_workers)
        return 0
    t0 = time.time()
    os.makedirs(args.out, exist_ok=True)
    for stale in os.listdir(args.out):
        if stale.endswith(".so"):
            os.remove(os.path.join(args.out, stale))
    stub_dir = os.path.join(args.out, "stub")
    stub = make_stub(stub_dir)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--out", args.out, "--arch", args.arch]
    if args.num_workers:
        cmd += ["--num-workers", str(args.num_workers)]
    subprocess.run(cmd, check=True, env={**os.environ, "LEAN_CUDA_STUB": stub}, cwd=REPO)
    pack_runtime(args.out)
    check_artifacts(args.out, stub)
    shutil.rmtree(stub_dir)
    sizes = {name: du(os.path.join(args.out, name)) for name in sorted(os.listdir(args.out))}
    for name, size in sizes.items():
        log(f"  {name:28s} {size / 2**20:7.2f} MiB")
    total = sum(sizes.values())
    whl = du(os.path.join(REPO, ".whl")) if os.path.isdir(os.path.join(REPO, ".whl")) else 0
    tree = int(subprocess.run("git ls-files -z | xargs -0 du -cb | tail -1", shell=True, cwd=REPO,
                              capture_output=True, text=True).stdout.split()[0] or 0)
    carried = total + whl + tree
    log(f"OUT {total / 2**20:.1f} MiB + .whl {whl / 2**20:.1f} MiB + tracked files {tree / 2**20:.1f} MiB = "
        f"{carried / 2**20:.1f} MiB of the {CARRY_LIMIT_MIB} MiB a GPU call carries "
        f"({(CARRY_LIMIT_MIB * 2**20 - carried) / 2**20:.1f} MiB left, e.g. for build/sm_90a)")
    if carried > CARRY_LIMIT_MIB * 2**20:
        raise SystemExit("too big to carry")
    with open(os.path.join(args.out, "manifest.json")) as f:
        manifest = json.load(f)
    manifest["payload_bytes"] = total
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    log(f"done in {time.time() - t0:.0f} s: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
