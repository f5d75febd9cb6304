"""The stream-K rule's third operator, defined only here, as TensorIR with no macros of its own: a
ragged weighted segment sum (masked weighted pooling of variable-length sequences),

    y[b, h, d] = sum_{n < lens[b]} w[b, h, n] * x[b, h, n, d]

w float32 [B, H, L], x fp16/bf16 [B, H, L, D], lens int32 [B] (clamped to [0, L] by the kernel),
y float32 [B, H, D]. The CPU form is tested in ``test_streamk_rule.py``. The CUDA form needs a GPU;
build its library here, then run the test and the benchmark hook on the GPU machine:

    python tests/segment_sum.py build --arch sm_90a --out build/segment_sum        # here (nvcc)
    python -m pytest -m gpu tests/test_segment_sum_gpu.py                          # GPU machine
    python tests/segment_sum.py bench --lib build/segment_sum --yardstick build/sm_90a

``bench`` times the kernel against the streaming read of the same bytes (the benchmark's
yardstick: ``python -m lean_tvm.bench.libraries --arch sm_90a --out build/sm_90a``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

MANIFEST = "segment_sum.json"
VARIANTS = [(128, "float16"), (64, "bfloat16"), (256, "float16")]  # (D, x dtype) of the built library
BENCH_SHAPES = [  # (B, H, L, D, x dtype, lengths): each reads >= 256 MB
    (8, 8, 32768, 128, "float16", "full"),
    (1, 1, 1 << 21, 128, "float16", "full"),
    (32, 8, 16384, 64, "bfloat16", "ragged"),
    (4, 4, 65536, 256, "float16", "ragged"),
]


def kernel_name(head_dim: int, x_dtype: str) -> str:
    return f"segment_sum_{x_dtype}_d{head_dim}"


def make_segment_sum(head_dim: int, x_dtype: str, loop_bound: bool = False):
    """The TensorIR; ``loop_bound=True`` writes the ragged extent as the loop's bound instead of a mask."""
    from tvm.script import tirx as T

    if loop_bound:
        @T.prim_func(s_tir=True)
        def segment_sum(w: T.handle, x: T.handle, lens: T.handle, y: T.handle):
            B, H, L = T.int64(), T.int64(), T.int64()
            W = T.match_buffer(w, (B, H, L), "float32")
            X = T.match_buffer(x, (B, H, L, head_dim), x_dtype)
            LN = T.match_buffer(lens, (B,), "int32")
            Y = T.match_buffer(y, (B, H, head_dim), "float32")
            for b, h, d in T.grid(B, H, head_dim):
                for n in range(T.Cast("int64", LN[b])):
                    with T.sblock("Y"):
                        vb, vh, vd = T.axis.remap("SSS", [b, h, d])
                        vn = T.axis.reduce(L, n)
                        with T.init():
                            Y[vb, vh, vd] = T.float32(0)
                        Y[vb, vh, vd] = Y[vb, vh, vd] + W[vb, vh, vn] * T.Cast("float32", X[vb, vh, vn, vd])
    else:
        @T.prim_func(s_tir=True)
        def segment_sum(w: T.handle, x: T.handle, lens: T.handle, y: T.handle):
            B, H, L = T.int64(), T.int64(), T.int64()
            W = T.match_buffer(w, (B, H, L), "float32")
            X = T.match_buffer(x, (B, H, L, head_dim), x_dtype)
            LN = T.match_buffer(lens, (B,), "int32")
            Y = T.match_buffer(y, (B, H, head_dim), "float32")
            for b, h, d, n in T.grid(B, H, head_dim, L):
                with T.sblock("Y"):
                    vb, vh, vd, vn = T.axis.remap("SSSR", [b, h, d, n])
                    with T.init():
                        Y[vb, vh, vd] = T.float32(0)
                    Y[vb, vh, vd] = Y[vb, vh, vd] + T.if_then_else(vn < T.Cast("int64", LN[vb]), W[vb, vh, vn] * T.Cast(
                        "float32", X[vb, vh, vn, vd]), T.float32(0))

    return segment_sum.with_attr("global_symbol", kernel_name(head_dim, x_dtype))


def float64(t) -> np.ndarray:
    """A torch tensor (any dtype or device) or an array as float64 numpy."""
    return t.double().cpu().numpy() if hasattr(t, "double") else np.asarray(t, dtype=np.float64)


def reference(w, x, lens) -> np.ndarray:
    """float64 numpy: y[b] = sum over the first min(lens[b], L) rows (w [B, H, L], x [B, H, L, D])."""
    w, x = float64(w), float64(x)
    y = np.zeros(x.shape[:2] + x.shape[3:])
    for b, n in enumerate(np.clip(float64(lens).astype(np.int64), 0, x.shape[2])):
        y[b] = np.einsum("hn,hnd->hd", w[b, :, :n], x[b, :, :n])
    return y


def build(arch: str, out: str) -> dict:
    """The CUDA library of :data:`VARIANTS` through the rule (needs apache-tvm and nvcc, no GPU)."""
    import tvm

    from lean_tvm import build as builder
    from lean_tvm.streamk_rule import ATTR, StreamK

    target = tvm.target.Target({"kind": "cuda", "arch": arch})
    funcs, kernels = {}, []
    for d, dt in VARIANTS:
        name = kernel_name(d, dt)
        funcs[name] = builder.rule_kernel(make_segment_sum(d, dt), target, name, StreamK())
        doc = funcs[name].attrs[ATTR]
        kernels.append({"name": name, "head_dim": d, "dtype": dt, "threads": int(doc["threads"]),
                        "block_size": int(doc["block_size"]), "dynamic_smem_bytes": int(doc["dynamic_smem_bytes"])})
    return builder.compile_library(arch, out, funcs, kernels, library=f"segment_sum_{arch}.so",
                                   manifest_name=MANIFEST)


class Library:
    """The built kernels, loaded with tvm-ffi alone (the GPU machine has no apache-tvm)."""

    def __init__(self, folder: str | Path):
        import tvm_ffi

        self.folder = Path(folder)
        path = self.folder / MANIFEST
        if not path.exists():
            raise FileNotFoundError(f"{path}: build it with `python tests/segment_sum.py build --out {folder}`")
        self.manifest = json.loads(path.read_text())
        self.module = tvm_ffi.load_module(str((self.folder / self.manifest["library"]).resolve()))

    def run(self, w, x, lens, y, workers: int, splits: int = 0, grid: int | None = None, flags=None):
        """y <- the segment sum (torch CUDA tensors); ``flags`` int32 [workers], zero (kept zero)."""
        import torch

        fn = self.module[kernel_name(x.shape[-1], str(x.dtype).removeprefix("torch."))]
        ws = torch.empty(workers, x.shape[-1], device=x.device, dtype=torch.float32)
        if flags is None:
            flags = torch.zeros(workers, device=x.device, dtype=torch.int32)
        fn(w, x, lens, y, ws, flags, workers, splits, grid or workers)
        return flags


def bench(lib_dir: str, yardstick_dir: str, ctas_per_sm: tuple[int, ...] = (1, 2), rounds: int = 5,
          reps: int = 20) -> list[dict]:
    """Device time of the kernel against the streaming read of the bytes it must read (w and x
    rows below the lengths), interleaved rounds, cold L2 (``lean_tvm.bench.timing``)."""
    import torch

    from lean_tvm.bench import libraries, timing

    lib, read = Library(lib_dir), libraries.BenchLibrary(Path(yardstick_dir)).stream_read()
    device = torch.device("cuda")
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    timer, sink, rows = timing.Timer(device), torch.empty(1 << 20, device=device, dtype=torch.float32), []
    timer.warm_clocks()
    for b, h, length, d, dt, kind in BENCH_SHAPES:
        gen = torch.Generator().manual_seed(b * h + d)
        lens = torch.full((b,), length, dtype=torch.int32) if kind == "full" else \
            torch.randint(length // 8, length + 1, (b,), generator=gen, dtype=torch.int32)
        x = torch.randn(b, h, length, d, device=device).to(getattr(torch, dt))
        w = torch.randn(b, h, length, device=device)
        y = torch.empty(b, h, d, device=device)
        lens = lens.to(device)
        needed = int(lens.sum()) * h * (d * x.element_size() + 4)  # the rows of x and w below the lengths
        same_bytes = torch.ones(needed // 16, 8, device=device, dtype=torch.float16)
        systems = {"stream_read": (lambda c=same_bytes: read(c, sink, sms * 4), _nothing)}
        for c in ctas_per_sm:
            flags = torch.zeros(sms * c, device=device, dtype=torch.int32)
            systems[f"segment_sum_c{c}"] = (lambda c=c, f=flags, w=w, x=x, lens=lens, y=y:
                                            lib.run(w, x, lens, y, sms * c, flags=f), _nothing)
        times = timing.interleaved(timer, systems, rounds, reps)
        base = times["stream_read"].median
        for name, t in times.items():
            rows.append({"shape": f"B{b} H{h} L{length} D{d} {dt} {kind}", "MB": needed / 1e6, "system": name,
                         "us": t.median, "of_read": base / t.median})
    return rows


def _nothing():
    import contextlib

    return contextlib.nullcontext()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python tests/segment_sum.py", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the CUDA library (no GPU needed)")
    b.add_argument("--arch", default="sm_90a")
    b.add_argument("--out", default="build/segment_sum")
    r = sub.add_parser("bench", help="on the GPU: time it against the streaming read")
    r.add_argument("--lib", default="build/segment_sum")
    r.add_argument("--yardstick", default="build/sm_90a", help="folder of the benchmark's stream_read library")
    args = ap.parse_args(argv)
    if args.cmd == "build":
        build(args.arch, args.out)
        return 0
    print(f"{'shape':<34} {'MB':>8} {'system':<16} {'us':>10} {'of read':>8}")
    for row in bench(args.lib, args.yardstick):
        print(f"{row['shape']:<34} {row['MB']:8.0f} {row['system']:<16} {row['us']:10.1f} {row['of_read']:8.0%}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
