"""Build the operator library for a GPU arch (or the CPU) on a machine that needs no GPU.

The TensorIR of decode attention and the GEMV (``compute.py``) -> the stream-K schedule rule
(``streamk_rule.StreamK``, whose block bodies are ``attention_gpu.py``'s and ``gemv.py``'s) -> CUDA
C++ with tvm-ffi launchers (``cuda_host``) -> nvcc -> ``lean_tvm_<arch>.so`` + ``manifest.json``. The library needs only
``libtvm_ffi`` at run time (no TVM): the GPU machines and serving boxes carry torch and tvm-ffi.
``--arch cpu`` builds the ``llvm`` form the same way (no nvcc needed).

    python -m lean_tvm.build --arch sm_90a --out build/sm_90a

Build on first use: :func:`ensure_library` builds the library for a device into the cache the
run half searches (``library.py``), once; the run half itself never builds.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .library import ATTENTION_OP, DENSE, GEMV_OP, MANIFEST, PAGED, cache_root, find_library_dir, library_name
from .schedule_records import batch_knobs, batch_tile_cost, knobs_for, load_records
from .spec import DTYPES, HEAD_DIMS, KV_DTYPES, MAX_GROUPS, PROGRAMMATIC_MARK, AttentionSpec

SUPPORTED_ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90", "sm_90a")  # mma bf16, cp.async, movmatrix
FP8_ARCHS = ("sm_89", "sm_90", "sm_90a")  # cvt.rn.f16x2.e4m3x2 / e5m2x2: the fp8 cache kernels
PDL_ARCHS = ("sm_90", "sm_90a")  # griddepcontrol: programmatic dependent launch (programmatic_launch)


class BuildError(RuntimeError):
    pass


def _log(msg: str) -> None:
    print(f"[lean_tvm.build] {msg}", flush=True)


def find_nvcc() -> str:
    nvcc = shutil.which("nvcc") or (
        os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if "CUDA_HOME" in os.environ else None
    )
    if not nvcc or not os.path.exists(nvcc):
        raise BuildError("nvcc not found: install the CUDA toolkit (12.4 or newer) or set CUDA_HOME, "
                         "or build the CPU form with --arch cpu")
    return nvcc


def nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release ([\d.]+)", out)
    return m.group(1) if m else "unknown"


def tvm_ffi_link_flags() -> list[str]:
    import tvm_ffi.libinfo as li

    return ["-I" + li.find_include_path(), "-I" + li.find_dlpack_include_path(),
            "-L" + os.path.dirname(li.find_libtvm_ffi()), "-ltvm_ffi"]


def gencode(arch: str) -> list[str]:
    # The -gencode form: the -arch shorthand also runs a plain pass that rejects sm_90a-only code.
    num = arch.removeprefix("sm_")
    return [f"-gencode=arch=compute_{num},code=sm_{num}"]


def parse_resource_usage(text: str) -> dict[str, dict[str, int]]:
    """ptxas --resource-usage lines -> {kernel: {registers, spill_bytes, stack_bytes, smem_bytes}}."""
    usage, current = {}, None
    for line in text.splitlines():
        m = re.search(r"Function properties for (\S+)", line) or re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            current = m.group(1)
            usage.setdefault(current, {})
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and current:
            usage[current].update(stack_bytes=int(m.group(1)), spill_bytes=int(m.group(2)) + int(m.group(3)))
        m = re.search(r"Used (\d+) registers.*?(\d+) bytes smem", line)
        if m and current:
            usage[current].update(registers=int(m.group(1)), smem_bytes=int(m.group(2)))
    return {k.removesuffix("_kernel"): v for k, v in usage.items() if "registers" in v}


def attention_specs(dtypes: Sequence[str], head_dims: Sequence[int], max_groups: Sequence[int]):
    """Every combination, except G up to 16 at D = 256 (its registers would spill)."""
    return [AttentionSpec(dt, d, g) for dt in dtypes for d in head_dims for g in max_groups
            if not (d == 256 and g == 16)]


def default_specs():
    return attention_specs(DTYPES, HEAD_DIMS, MAX_GROUPS)


def build_cuda(arch: str, out_dir: str, specs: Sequence[AttentionSpec], records_path: str | None = None,
               keep_source: bool = True, kv_dtypes: Sequence[str] = KV_DTYPES) -> dict:
    """Generate, compile and describe one library for ``arch``; returns the manifest. Each spec
    gets its dense and paged kernels and, on ``FP8_ARCHS``, the same two per fp8 cache dtype in
    ``kv_dtypes`` (the dense one for one token without start rows; the paged one serves the rest of
    the dense calls as one page per sequence)."""
    import tvm

    from .attention_gpu import make_gpu_kernel, make_gpu_paged_kernel
    from .compute import make_decode_attention, make_gemv
    from .gemv import GEMV_SPECS
    from .streamk_rule import StreamK

    if arch not in SUPPORTED_ARCHS:
        raise BuildError(f"--arch: expected one of {SUPPORTED_ARCHS}, got {arch!r} "
                         "(the kernel needs cp.async, movmatrix and bf16 mma: sm_80 or newer)")
    find_nvcc()
    records = load_records(arch, records_path)
    kernels, funcs = [], {}
    target = tvm.target.Target({"kind": "cuda", "arch": arch})
    t0 = time.time()
    fp8 = [kv for kv in kv_dtypes if kv] if arch in FP8_ARCHS else []
    jobs = [(spec, form) for spec in specs for form in (DENSE, PAGED)]
    jobs += [(dataclasses.replace(spec, kv_dtype=kv), form) for spec in specs for kv in fp8 for form in (DENSE, PAGED)]
    for i, (spec, form) in enumerate(jobs):
        knobs = knobs_for(records, spec, arch)
        variants = [("plain", knobs)]
        cost, many = batch_tile_cost(records, spec), batch_knobs(records, spec, arch)
        if cost or many:
            variants.append(("batch", dataclasses.replace(many or knobs, tile_cost=cost)))
        for variant, kn in variants:
            name = spec.name + ("_paged" if form == PAGED else "") + ("_batch" if variant == "batch" else "")
            _log(f"[{i + 1}/{len(jobs)}] TensorIR -> schedule: {name} {kn}")
            if form == DENSE and not spec.kv_dtype:  # the rule applied to the TensorIR
                compute = make_decode_attention(spec.dtype, spec.head_dim, spec.max_group)
                funcs[name] = rule_kernel(compute, target, name, StreamK(knobs=kn))
            elif form == DENSE:  # fp8: the dense form's generator (the TensorIR compute is 16-bit)
                funcs[name] = make_gpu_kernel(spec, kn, name=name)
            else:  # the paged form's generator (same operator macros, table addressing)
                funcs[name] = make_gpu_paged_kernel(spec, kn, name=name)
            kernels.append({"name": name, "op": ATTENTION_OP, "form": form, "variant": variant, "dtype": spec.dtype,
                            "kv_dtype": spec.kv_dtype, "head_dim": spec.head_dim, "max_group": spec.max_group,
                            "knobs": dataclasses.asdict(kn), "block_size": kn.block_size,
                            "dynamic_smem_bytes": kn.ring_bytes(spec)})
    for gspec in GEMV_SPECS:
        funcs[gspec.name] = rule_kernel(make_gemv(gspec.dtype), target, gspec.name, StreamK())
        kernels.append({"name": gspec.name, "op": GEMV_OP, **gspec.describe()})
    manifest = compile_library(arch, out_dir, funcs, kernels, keep_source)
    _log(f"done in {time.time() - t0:.0f} s")
    return manifest


def compile_library(arch: str, out_dir: str, funcs: dict, kernels: list[dict], keep_source: bool = True,
                    library: str | None = None, manifest_name: str | None = MANIFEST) -> dict:
    """Kernels -> one CUDA translation unit -> nvcc -> ``library`` (default ``lean_tvm_<arch>.so``)
    in ``out_dir``; returns its manifest, also written to ``manifest_name`` unless that is None."""
    import tvm

    from .codegen import cuda_source_of_module

    nvcc = find_nvcc()
    os.makedirs(out_dir, exist_ok=True)
    _log(f"TIR -> CUDA C++ ({len(funcs)} kernels, {arch})")
    src = remember_smem_attribute(cuda_source_of_module(tvm.IRModule(funcs), arch))
    if arch in PDL_ARCHS:
        src = programmatic_launch(src)
    lib = os.path.join(out_dir, library or library_name(arch))
    usage = nvcc_library(arch, src, lib)
    for k in kernels:
        k["resources"] = usage.get(k["name"], {})
    spills = {k["name"]: k["resources"].get("spill_bytes") for k in kernels if k["resources"].get("spill_bytes")}
    if spills:
        _log(f"WARNING: register spills {spills}")
    if not keep_source:
        os.remove(_source_path(lib))
    manifest = {
        "arch": arch,
        "library": os.path.basename(lib),
        "kernels": kernels,
        "tvm_version": tvm.__version__,
        "tvm_ffi_version": _tvm_ffi_version(),
        "nvcc_version": nvcc_version(nvcc),
        "source_sha256": hashlib.sha256(src.encode()).hexdigest(),
        "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if manifest_name is not None:
        with open(os.path.join(out_dir, manifest_name), "w") as f:
            json.dump(manifest, f, indent=1)
    _log(f"wrote {lib} ({os.path.getsize(lib) // 1024} KiB)")
    return manifest


_SET_SMEM = re.compile(
    r"  if \((cuda_arg_\d+) >= 49152\) \{\n"
    r"    if \(::tvm_cuda_host_check\(cudaFuncSetAttribute\(::(\w+), cudaFuncAttributeMaxDynamicSharedMemorySize, "
    r"\1\)\) != 0\) return -1;\n  \}\n")


def remember_smem_attribute(src: str) -> str:
    """TVM's generated launchers raise a kernel's dynamic shared memory limit before every launch
    (a driver call each time), and only for 48 KB of dynamic memory or more, though the limit
    counts static memory too (40 KB dynamic + 9 KB static fails to launch: "invalid argument");
    raise it once per device and kernel, whatever the size (per device: the attribute belongs to
    the device's context). A benign race: two threads may both set it."""
    def once(m: re.Match) -> str:
        arg, kernel = m.group(1), m.group(2)
        return (f"  static int {kernel}_smem[64] = {{0}};\n"
                f"  if ({kernel}_smem[cuda_device & 63] < {arg}) {{\n"
                f"    if (::tvm_cuda_host_check(cudaFuncSetAttribute(::{kernel}, "
                f"cudaFuncAttributeMaxDynamicSharedMemorySize, {arg})) != 0) return -1;\n"
                f"    {kernel}_smem[cuda_device & 63] = {arg};\n  }}\n")

    return _SET_SMEM.sub(once, src)


_KERNEL_DEF = re.compile(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\([^;{]*\) \{')
_LAUNCH = re.compile(r"(  cuda_config\.stream = cuda_stream;\n)"
                     r"(  if \(::tvm_cuda_host_check\(tvm_cuda_host_launch\(::(\w+), )")
_PDL_SWITCH = """
#include <stdlib.h>
static int lean_programmatic_launch() {
  // LEAN_TVM_PDL=0 launches without the programmatic-serialization attribute (read once).
  static const int on = [] { const char* v = getenv("LEAN_TVM_PDL"); return v == NULL || v[0] != '0'; }();
  return on;
}
"""


def programmatic_launch(src: str) -> str:
    """Launch the kernels that wait for the previous grid (``spec.PROGRAMMATIC_MARK``) with
    programmatic stream serialization: a kernel then starts while its predecessor in the stream
    finishes (its CTAs scheduled, its parameters loaded) and waits in ``griddepcontrol.wait``
    before touching memory. Only those kernels: another kernel launched so would read its inputs
    before they are written. ``LEAN_TVM_PDL=0`` turns it off at run time."""
    starts = [(m.start(), m.group(1)) for m in _KERNEL_DEF.finditer(src)]
    host = src.find("static int tvm_cuda_host_check")
    waiting = set()
    for i, (pos, name) in enumerate(starts):
        end = starts[i + 1][0] if i + 1 < len(starts) else host
        if PROGRAMMATIC_MARK + "();" in src[pos:end]:
            waiting.add(name)

    def attribute(m: re.Match) -> str:
        if m.group(3) not in waiting:
            return m.group(0)
        return (m.group(1) + "  cudaLaunchAttribute cuda_attr[1];\n"
                "  cuda_attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;\n"
                "  cuda_attr[0].val.programmaticStreamSerializationAllowed = lean_programmatic_launch();\n"
                "  cuda_config.attrs = cuda_attr;\n  cuda_config.numAttrs = 1;\n" + m.group(2))

    if not waiting:
        return src
    return src[:host] + _PDL_SWITCH.lstrip("\n") + _LAUNCH.sub(attribute, src[host:])


def nvcc_library(arch: str, src: str, lib: str) -> dict[str, dict[str, int]]:
    """CUDA C++ (kept beside the library as ``.cu``) -> a shared library that needs only libtvm_ffi
    at run time; returns ptxas's resource usage per kernel."""
    nvcc = find_nvcc()
    cu = _source_path(lib)
    with open(cu, "w") as f:
        f.write(src)
    cmd = [nvcc, "-O3", "-std=c++17", *gencode(arch), "-shared", "-Xcompiler", "-fPIC",
           "--resource-usage", "-diag-suppress=174,177,550,1046", cu, "-o", lib, *tvm_ffi_link_flags()]
    _log(f"nvcc {arch}: compiling {os.path.basename(cu)} ({len(src) // 1024} KiB of CUDA)")
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise BuildError(f"nvcc failed for {arch}:\n{res.stderr[-4000:]}")
    return parse_resource_usage(res.stdout + res.stderr)


def _source_path(lib: str) -> str:
    return os.path.splitext(lib)[0] + ".cu"


def build_cpu(out_dir: str, specs: Sequence[AttentionSpec], block_size: int = 64,
              kv_dtypes: Sequence[str] = KV_DTYPES) -> dict:
    """The ``llvm`` form: the package's fallback when there is no GPU, loadable by tvm-ffi (the
    same kernels as ``build_cuda``'s, fp8 caches included)."""
    import tvm

    from .attention_cpu import make_cpu_paged_kernel
    from .compute import make_decode_attention, make_gemv
    from .gemv import GEMV_SPECS
    from .streamk_rule import StreamK

    os.makedirs(out_dir, exist_ok=True)
    t0 = time.time()
    funcs, kernels = {}, []
    seen = set()
    target, rule = tvm.target.Target("llvm"), StreamK(cpu_block_size=block_size)
    for spec in specs:
        if (spec.dtype, spec.head_dim, spec.max_group) in seen:
            continue
        seen.add((spec.dtype, spec.head_dim, spec.max_group))
        name = spec.name + "_cpu"
        funcs[name] = rule_kernel(make_decode_attention(spec.dtype, spec.head_dim, spec.max_group), target, name, rule)
        kernels.append({"name": name, "op": ATTENTION_OP, "form": DENSE, "dtype": spec.dtype, "kv_dtype": None,
                        "head_dim": spec.head_dim, "max_group": spec.max_group, "block_size": block_size})
        for kv in (None, *(kv for kv in kv_dtypes if kv)):
            paged = make_cpu_paged_kernel(dataclasses.replace(spec, kv_dtype=kv), block_size)
            funcs[paged.attrs["global_symbol"]] = paged
            kernels.append({"name": paged.attrs["global_symbol"], "op": ATTENTION_OP, "form": PAGED,
                            "dtype": spec.dtype, "kv_dtype": kv, "head_dim": spec.head_dim,
                            "max_group": spec.max_group, "block_size": block_size})
    for gspec in GEMV_SPECS:
        name = gspec.name + "_cpu"
        funcs[name] = rule_kernel(make_gemv(gspec.dtype), target, name, rule)
        kernels.append({"name": name, "op": GEMV_OP, **gspec.describe()})
    _log(f"TIR -> llvm ({len(funcs)} kernels)")
    ex = tvm.compile(tvm.IRModule(funcs), target="llvm")
    lib = os.path.join(out_dir, library_name("cpu"))
    ex.export_library(lib)
    manifest = {"arch": "cpu", "library": os.path.basename(lib), "kernels": kernels,
                "tvm_version": tvm.__version__, "tvm_ffi_version": _tvm_ffi_version(),
                "built": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    with open(os.path.join(out_dir, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
    _log(f"wrote {lib} and {MANIFEST} in {time.time() - t0:.0f} s")
    return manifest


def rule_kernel(func, target, name: str, rule):
    """``func``'s stream-K kernel from ``rule`` (a ``streamk_rule.StreamK``) for ``target``, named
    ``name``; the rule declining one of the library's own functions is a build error."""
    sch = rule.apply(func, target)
    if sch is None:
        raise BuildError(f"{name}: the stream-K rule declined its TensorIR: {rule.kernel(func, target).reason}")
    return sch.mod["main"].with_attr("global_symbol", name)


def ensure_library(arch: str) -> Path:
    """The folder of the library for ``arch`` (``"sm_90a"``..., or ``"cpu"``), built once into the
    cache (``$LEAN_TVM_CACHE/<arch>``) when no search folder has one: the documented way to build
    on first use, e.g. ``lean_tvm.build.ensure_library(lean_tvm.runtime.device_arch(device))``."""
    found = find_library_dir(arch)
    if found is not None:
        return found
    target = cache_root() / arch
    _log(f"building the operator library for {arch} into {target} (once)")
    if arch == "cpu":
        build_cpu(str(target), default_specs())
    else:
        build_cuda(arch, str(target), default_specs())
    return target


def _tvm_ffi_version() -> str:
    from importlib.metadata import version

    return version("apache-tvm-ffi")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lean_tvm.build", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="sm_90a", help=f"one of {SUPPORTED_ARCHS} or 'cpu' (default sm_90a)")
    ap.add_argument("--out", default=None, help="output directory (default build/<arch>)")
    ap.add_argument("--dtypes", default=",".join(DTYPES))
    ap.add_argument("--head-dims", default=",".join(map(str, HEAD_DIMS)))
    ap.add_argument("--max-groups", default=",".join(map(str, MAX_GROUPS)),
                    help="kernels per GQA bound: 8 serves Hq/Hkv <= 8, 16 serves up to 16")
    ap.add_argument("--kv-dtypes", default=",".join(KV_DTYPES),
                    help=f"fp8 cache dtypes to build paged kernels for (comma-separated from {KV_DTYPES}, or "
                         f"'none'; CUDA only on {FP8_ARCHS})")
    ap.add_argument("--records", default=None, help="schedule records JSON (default schedules/<arch>.json)")
    args = ap.parse_args(argv)
    kv_dtypes = [] if args.kv_dtypes in ("", "none") else args.kv_dtypes.split(",")
    bad = [kv for kv in kv_dtypes if kv not in KV_DTYPES]
    if bad:
        ap.error(f"--kv-dtypes: expected names from {KV_DTYPES} or 'none', got {bad}")
    try:
        specs = attention_specs(args.dtypes.split(","), [int(x) for x in args.head_dims.split(",")],
                                [int(x) for x in args.max_groups.split(",")])
    except ValueError as e:
        ap.error(str(e))
    out = args.out or os.path.join("build", args.arch)
    try:
        if args.arch == "cpu":
            build_cpu(out, specs, kv_dtypes=kv_dtypes)
        else:
            build_cuda(args.arch, out, specs, args.records, kv_dtypes=kv_dtypes)
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
