"""Per-call wall time from Python (no CUDA graph), B=1 Hq/Hkv 32/8 D=128 L=4k: the public API (dense
and paged), the pieces of its eager path, the launch path under it, the bare tvm-ffi call beside
a 3-argument one (what tvm-ffi's tensor conversion costs), torch's smallest launch (the
machine's floor) and torch SDPA.

    python scripts/host_overhead.py          # CUDA
    python scripts/host_overhead.py --cpu    # host-side proxy: CPU tensors, the kernel call a no-op

With ``--cpu`` the tvm-ffi kernel call is replaced by a no-op (the CPU kernel's compute would
swamp the host path); every other step runs as on the GPU.
"""

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import lean_tvm
from lean_tvm import runtime, torch_ops


def host_time(fn, device: torch.device, reps: int = 2000) -> float:
    """Wall time per call (us), calls queued back to back; the median of 5 runs."""
    for _ in range(20):
        fn()
    runs = []
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        runs.append((time.perf_counter() - t0) / reps * 1e6)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return statistics.median(runs)


def _no_kernel() -> None:
    """Make every attention launcher call a no-op kernel (the --cpu proxy)."""
    prepare = runtime._prepare_attention

    def prepare_without_kernel(*args):
        _, workers, grid, shapes = prepare(*args)
        return (lambda *_: None), workers, grid, shapes

    runtime._prepare_attention = prepare_without_kernel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="CPU tensors, the kernel call a no-op")
    args = ap.parse_args()
    dev = torch.device("cpu" if args.cpu else "cuda")
    if args.cpu:
        torch.set_num_threads(1)
        _no_kernel()
    import tvm_ffi

    print(f"torch {torch.__version__}, tvm-ffi {getattr(tvm_ffi, '__version__', '?')}, torch's DLPack C exchange "
          f"API: {hasattr(torch.Tensor, '__dlpack_c_exchange_api__')}, library {runtime.library_for(dev).path}",
          flush=True)
    q = torch.randn(1, 32, 128, device=dev, dtype=torch.float16)
    k = torch.randn(1, 8, 4096, 128, device=dev, dtype=torch.float16)
    v = torch.randn_like(k)
    lens = torch.full((1,), 4096, dtype=torch.int32, device=dev)
    out = torch.empty_like(q)
    lse = torch.empty(1, 32, device=dev)
    scale = 1 / math.sqrt(128)
    fn, workers, grid, shapes = runtime._prepare_attention(q, 8, 0, None, None, k.shape[2])
    ws = runtime.WORKSPACE.get(dev, workers, *shapes)
    plan = torch_ops._plan(q, k, v, lens, "bhld", None)
    pages = k.transpose(1, 2).reshape(256, 16, 8, 128)  # [P, page, Hkv, D], table 0..255
    table = torch.arange(256, dtype=torch.int32, device=dev).view(1, 256)
    rows = {
        "lean_tvm.decode_attention (the default: no host sync)": lambda: lean_tvm.decode_attention(q, k, v, lens),
        "  ... out=out": lambda: lean_tvm.decode_attention(q, k, v, lens, out=out),
        "  ... return_lse=True": lambda: lean_tvm.decode_attention(q, k, v, lens, return_lse=True),
        "  ... check_lengths=True (one D2H copy)": lambda: lean_tvm.decode_attention(q, k, v, lens, check_lengths=True),
        "  ... paged (block_table, pages of 16)":
            lambda: lean_tvm.decode_attention(q, pages, pages, lens, block_table=table, layout="blhd"),
        "piece: cached checks (torch_ops._plan, a hit)": lambda: torch_ops._plan(q, k, v, lens, "bhld", None),
        "piece: all checks (torch_ops.check_inputs, a miss)":
            lambda: torch_ops.check_inputs(q, k, v, lens, None, "bhld", None, False),
        "piece: allocate out (torch.empty)": lambda: torch.empty(*plan.out_shape, dtype=plan.dtype, device=dev),
        "piece: lse scratch (WORKSPACE.scratch)": lambda: runtime.WORKSPACE.scratch(dev, plan.lse_shape),
        "piece: launcher (workspace + kernel call)": lambda: plan.launch(q, k, v, lens, out, lse, scale),
        "runtime.launch_attention": lambda: runtime.launch_attention(q, k, v, lens, out, lse, scale),
        "bare tvm-ffi kernel call, 13 arguments" + (" (a no-op here)" if args.cpu else ""):
            lambda: fn(q, k, v, lens, out, lse, *ws, scale, workers, 0, grid),
    }
    if not args.cpu:
        small = runtime.library_for(dev).function("stream_k_gemv_float16")
        w, x, y = (torch.randn(16, 8, device=dev).half(), torch.randn(8, device=dev).half(),
                   torch.empty(16, device=dev).half())
        one, ws_g, flags_g = torch.tensor([8], dtype=torch.int32, device=dev), *runtime.WORKSPACE.get(dev, 1, (16,))
        rows["bare tvm-ffi GEMV call, 9 arguments (6 tensors)"] = lambda: small(w, x, one, y, ws_g, flags_g, 1, 0, 1)
    if not args.cpu:
        one_elem = torch.zeros(1, device=dev)
        rows["torch one-element add_ (this machine's launch floor)"] = lambda: one_elem.add_(1)
        q4 = q[:, :, None]
        rows["torch SDPA (cuDNN)"] = lambda: F.scaled_dot_product_attention(q4, k, v, enable_gqa=True)
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        for name, f in rows.items():
            print(f"{name:62s} {host_time(f, dev):6.1f} us/call", flush=True)


if __name__ == "__main__":
    main()
