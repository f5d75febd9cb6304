"""Per-call wall time from Python (no CUDA graph), B=1 Hq/Hkv 32/8 D=128 L=4k: the public API,
the launch path under it, the bare tvm-ffi call, and torch SDPA (cuDNN) for scale.

    python scripts/host_overhead.py
"""

import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import lean_tvm
from lean_tvm import runtime
from lean_tvm.timing import Timer


def main() -> None:
    dev = torch.device("cuda")
    q = torch.randn(1, 32, 128, device=dev, dtype=torch.float16)
    k = torch.randn(1, 8, 4096, 128, device=dev, dtype=torch.float16)
    v = torch.randn_like(k)
    lens = torch.full((1,), 4096, dtype=torch.int32, device=dev)
    out = torch.empty_like(q)
    lse = torch.empty(1, 32, device=dev)
    timer = Timer(dev)
    scale = 1 / math.sqrt(128)
    fn, workers, grid, shapes = runtime._prepare_attention(q, 8, 0, None, None)
    ws = runtime.WORKSPACE.get(dev, workers, *shapes)
    rows = {
        "lean_tvm.decode_attention(..., check_lengths=False)":
            lambda: lean_tvm.decode_attention(q, k, v, lens, check_lengths=False),
        "lean_tvm.decode_attention(..., out=out, check_lengths=False)":
            lambda: lean_tvm.decode_attention(q, k, v, lens, out=out, check_lengths=False),
        "lean_tvm.decode_attention (checks lengths: one D2H copy)": lambda: lean_tvm.decode_attention(q, k, v, lens),
        "runtime.launch_attention": lambda: runtime.launch_attention(q, k, v, lens, out, lse, scale),
        "bare tvm-ffi kernel call": lambda: fn(q, k, v, lens, out, lse, *ws, scale, workers, 0, grid),
    }
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        q4 = q[:, :, None]
        rows["torch SDPA (cuDNN)"] = lambda: F.scaled_dot_product_attention(q4, k, v, enable_gqa=True)
        for name, f in rows.items():
            print(f"{name:62s} {timer.host_time(f, reps=2000):6.1f} us/call", flush=True)


if __name__ == "__main__":
    main()
