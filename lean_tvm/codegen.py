"""TIR -> CUDA C++ for our hand-scheduled persistent kernels (and, for the benchmark, TVM's own).

The ``lean_tvm`` TIR pipeline is TVM's default one with two passes switched off, because our
kernels are written at the level those passes would produce and they misread it:

* ``ThreadSync`` on shared memory inserts ``__syncthreads()`` where one thread writes what
  another reads. Our kernels place every barrier themselves: each warp streams its own slice
  of the shared-memory ring (``__syncwarp`` suffices, which the pass cannot know) and CTA
  barriers sit where the states merge. Left on, it rejects the kernel ("Cannot insert syncs
  inside condition"). Warp-scope sync stays on.
* ``CompactBufferAllocation`` shrinks a buffer to the region its accesses touch; with the GQA
  group a runtime value that region is symbolic, and CUDA cannot size shared memory by it.
"""

from __future__ import annotations

import contextlib

import tvm
from tvm import s_tir
from tvm.s_tir import pipeline as s_tir_pipeline
from tvm.tirx import compilation_pipeline

PIPELINE = "lean_tvm"
NVCC_DIAG_SUPPRESS = "-diag-suppress=174,177,550,1046"  # unused variables in generated code


@contextlib.contextmanager
def _passes_switched_off():
    """Swap the two pass factories the default pipeline looks up while it builds its list."""
    thread_sync, compact = s_tir.transform.ThreadSync, s_tir.transform.CompactBufferAllocation

    def no_pass(*_args):
        return tvm.transform.Sequential([])

    s_tir.transform.ThreadSync = lambda scope: thread_sync(scope) if scope == "warp" else no_pass()
    s_tir.transform.CompactBufferAllocation = no_pass
    try:
        yield
    finally:
        s_tir.transform.ThreadSync, s_tir.transform.CompactBufferAllocation = thread_sync, compact


def _lean_pipeline():
    base, finalize_host, finalize_device = s_tir_pipeline.default_s_tir_pipeline()

    @tvm.transform.module_pass(opt_level=0)
    def _pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with _passes_switched_off():
            return base(mod)

    return _pipeline, finalize_host, finalize_device


compilation_pipeline.register_tir_pipeline(PIPELINE, _lean_pipeline)


def cuda_target(arch: str) -> tvm.target.Target:
    """A CUDA target whose host side is ``cuda_host``: one .cu with tvm-ffi launchers."""
    return tvm.target.Target(tvm.target.Target({"kind": "cuda", "arch": arch}), host="cuda_host")


def cuda_source_of_module(mod: tvm.IRModule, arch: str, pipeline: str = PIPELINE) -> str:
    """One CUDA C++ translation unit (kernels + tvm-ffi host launchers) for nvcc; ``pipeline``
    names the registered TIR pipeline (``"default"`` for kernels that need TVM's barriers)."""
    from tvm.backend.cuda import export_cuda_host

    return export_cuda_host(tvm.compile(mod, target=cuda_target(arch), tir_pipeline=pipeline).mod)


def cuda_source(func: tvm.tirx.PrimFunc, arch: str) -> str:
    return cuda_source_of_module(tvm.IRModule({func.attrs["global_symbol"]: func}), arch)


def cpu_function(func: tvm.tirx.PrimFunc):
    """Compile one PrimFunc for the host CPU (``llvm``) and return the callable."""
    ex = tvm.compile(tvm.IRModule({func.attrs["global_symbol"]: func}), target="llvm")
    return ex[func.attrs["global_symbol"]]
