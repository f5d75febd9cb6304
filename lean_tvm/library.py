"""Where an operator library lives and what its manifest says: shared by the build half (which
writes them) and the run half (which reads them), so it imports neither TVM nor torch.

A library is a folder holding ``lean_tvm_<arch>.so`` and ``manifest.json``. It is looked up, in
order, in ``$LEAN_TVM_LIB_DIR``, the package's ``_lib/<arch>`` and the cache
``$LEAN_TVM_CACHE/<arch>`` (default ``~/.cache/lean_tvm/<arch>``), which is where
``lean_tvm.build.ensure_library`` builds one.
"""

from __future__ import annotations

import os
from pathlib import Path

LIBRARY = "lean_tvm_{arch}.so"
MANIFEST = "manifest.json"
# manifest["kernels"][i]["op"]: what a kernel computes; an attention kernel's "form": DENSE takes
# [B, Hkv, L, D] caches and one query token, PAGED block tables, Sq tokens and a first valid row.
ATTENTION_OP, GEMV_OP = "decode_attention", "gemv"
DENSE, PAGED = "dense", "paged"


def library_name(arch: str) -> str:
    return LIBRARY.format(arch=arch)


def cache_root() -> Path:
    return Path(os.environ.get("LEAN_TVM_CACHE", Path.home() / ".cache" / "lean_tvm"))


def search_dirs(arch: str) -> list[Path]:
    dirs = []
    if "LEAN_TVM_LIB_DIR" in os.environ:
        dirs.append(Path(os.environ["LEAN_TVM_LIB_DIR"]))
    dirs += [Path(__file__).resolve().parent / "_lib" / arch, cache_root() / arch]
    return dirs


def find_library_dir(arch: str) -> Path | None:
    for d in search_dirs(arch):
        if (d / MANIFEST).exists() and (d / library_name(arch)).exists():
            return d
    return None
