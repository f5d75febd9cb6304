"""The benchmark's own kernels, built beside an operator library and loaded with tvm-ffi alone.

* ``lean_bench_<arch>.so``: the streaming-read yardstick (``yardstick.py``);
* ``tvm_decode_<arch>.so`` (``--with-tvm-peer``): TVM's own decode kernel, a peer (``tvm_peer.py``).

Both are recorded in ``bench_manifest.json`` in the same folder; the operator library and its
manifest are not touched:

    python -m lean_tvm.build --arch sm_90a --out build/sm_90a
    python -m lean_tvm.bench.libraries --arch sm_90a --out build/sm_90a [--with-tvm-peer]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

BENCH_LIBRARY = "lean_bench_{arch}.so"
BENCH_MANIFEST = "bench_manifest.json"


def _log(msg: str) -> None:
    print(f"[lean_tvm.bench.libraries] {msg}", flush=True)


def build(arch: str, out_dir: str, with_tvm_peer: bool = False, peer_variants=None) -> dict:
    """Compile the yardstick (and TVM's peer kernel: ``peer_variants``, default the grid's) into
    ``out_dir``; returns the manifest."""
    import tvm

    from ..build import compile_library
    from . import tvm_peer, yardstick

    os.makedirs(out_dir, exist_ok=True)
    t0 = time.time()
    _log(f"yardstick for {arch}")
    lib = compile_library(arch, out_dir, {yardstick.NAME: yardstick.make_stream_read()},
                          [{"name": yardstick.NAME, "op": "stream_read"}], keep_source=False,
                          library=BENCH_LIBRARY.format(arch=arch), manifest_name=None)
    manifest = {"arch": arch, "library": lib["library"], "kernels": lib["kernels"], "tvm_version": tvm.__version__,
                "built": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if with_tvm_peer:
        _log(f"TVM's decode kernel for {arch} (the benchmark grid's variants)")
        manifest[tvm_peer.MANIFEST_KEY] = tvm_peer.build_library(arch, out_dir, peer_variants)
    with open(os.path.join(out_dir, BENCH_MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
    _log(f"wrote {BENCH_MANIFEST} in {out_dir} ({time.time() - t0:.0f} s)")
    return manifest


class BenchLibrary:
    """The benchmark's kernels from a folder, loaded with tvm-ffi; ``error`` says what is missing."""

    def __init__(self, folder: Path | None):
        self.folder, self.error, self.manifest, self._modules = folder, "", {}, {}
        path = None if folder is None else folder / BENCH_MANIFEST
        if path is None or not path.exists():
            self.error = (f"no {BENCH_MANIFEST} in {folder}: build the benchmark's kernels with "
                          "`python -m lean_tvm.bench.libraries --arch <arch> --out <the library folder>`")
            return
        self.manifest = json.loads(path.read_text())

    def _module(self, name: str):
        if name not in self._modules:
            import tvm_ffi

            self._modules[name] = tvm_ffi.load_module(str((self.folder / name).resolve()))
        return self._modules[name]

    def stream_read(self):
        if self.error:
            raise RuntimeError(self.error)
        return self._module(self.manifest["library"])["stream_read"]

    def tvm_peer(self) -> dict | None:
        return self.manifest.get("tvm_peer")

    def tvm_peer_function(self, name: str):
        return self._module(self.manifest["tvm_peer"]["library"])[name]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lean_tvm.bench.libraries", description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="sm_90a")
    ap.add_argument("--out", required=True, help="the operator library's folder")
    ap.add_argument("--with-tvm-peer", action="store_true", help="also build TVM's own decode kernel (a peer)")
    args = ap.parse_args(argv)
    if args.arch == "cpu":
        ap.error("--arch: the benchmark's kernels are GPU kernels; pick a GPU arch")
    build(args.arch, args.out, args.with_tvm_peer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
