"""TVM's own decode kernel as a benchmark peer, in a library of its own beside the operator library.

The kernel is ``_attention_decode`` of ``tvm.relax.frontend.nn.llm`` (what TVM's PagedKVCache runs
for a decode step; pages ``[P, 2, Hkv, 16, D]``, lse in log2 units), one variant per head layout,
head dim and dtype of the benchmark grid. It is built like ours (``cuda_host`` + nvcc, loaded by
tvm-ffi alone, no workspace) but through TVM's default TIR pipeline, whose inserted barriers it
relies on. Only the benchmark loads it, so the product library does not carry it:

    python -m lean_tvm.bench.libraries --arch sm_90a --out build/sm_90a --with-tvm-peer

writes ``tvm_decode_<arch>.so`` and the ``"tvm_peer"`` entry of that folder's
``bench_manifest.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os

from .grid import PAGE_SIZE, full_grid, quick_grid

LIBRARY = "tvm_decode_{arch}.so"
MANIFEST_KEY = "tvm_peer"
PIPELINE = "default"  # TVM's: the kernel's shared-memory reuse needs the barriers ThreadSync inserts


@dataclasses.dataclass(frozen=True, order=True)
class Variant:
    hq: int
    hkv: int
    head_dim: int
    dtype: str

    @property
    def name(self) -> str:
        return f"tvm_decode_{self.dtype}_d{self.head_dim}_h{self.hq}_{self.hkv}"


def suite_variants() -> list[Variant]:
    """The variants the benchmark needs: every one of its full and quick grids."""
    shapes = full_grid(cap_bytes=math.inf) + quick_grid(cap_bytes=math.inf)
    return sorted({Variant(s.hq, s.hkv, s.head_dim, s.dtype) for s in shapes})


def make_kernel(variant: Variant, arch: str):
    """TVM's PrimFunc for one variant, renamed so that all variants share one library."""
    from tvm.relax.frontend.nn.llm._decode_kernels import _attention_decode

    from ..codegen import cuda_target

    func = _attention_decode(variant.hkv, variant.hq, variant.head_dim, variant.dtype, False, {},
                             cuda_target(arch), PAGE_SIZE)
    return func.with_attr("global_symbol", variant.name)


def build_library(arch: str, out_dir: str, variants: list[Variant] | None = None) -> dict:
    """Compile the variants (default: the suite's) into ``tvm_decode_<arch>.so``; returns the
    manifest entry that tells the benchmark which kernel serves which shape."""
    import tvm

    from ..build import nvcc_library
    from ..codegen import cuda_source_of_module

    variants = variants if variants is not None else suite_variants()
    src = cuda_source_of_module(tvm.IRModule({v.name: make_kernel(v, arch) for v in variants}), arch, PIPELINE)
    lib = os.path.join(out_dir, LIBRARY.format(arch=arch))
    usage = nvcc_library(arch, src, lib)
    return {"library": os.path.basename(lib), "source": "tvm.relax.frontend.nn.llm._attention_decode",
            "tir_pipeline": PIPELINE, "page_size": PAGE_SIZE,
            "kernels": [{"name": v.name, **dataclasses.asdict(v), "resources": usage.get(v.name, {})}
                        for v in variants],
            "source_sha256": hashlib.sha256(src.encode()).hexdigest()}
