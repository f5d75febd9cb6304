"""A few small launches for compute-sanitizer (memcheck, racecheck, synccheck): the persistent
walk, the flag protocol, fixed splits, empty sequences, both cache layouts, and the GEMV.

    compute-sanitizer --tool memcheck python scripts/sanitize_check.py
"""

import math

import torch

import lean_tvm
from lean_tvm import runtime
from lean_tvm.reference import decode_attention_reference


def main() -> None:
    torch.manual_seed(0)
    cases = [(3, 32, 8, 128, [700, 0, 130], torch.float16, "bhld"),
             (2, 8, 1, 64, [4096, 1], torch.bfloat16, "blhd"),
             (1, 64, 8, 256, [2000], torch.float16, "bhld")]
    for batch, hq, hkv, d, lens, dtype, layout in cases:
        cache = (batch, hkv, max(lens), d) if layout == "bhld" else (batch, max(lens), hkv, d)
        k = torch.randn(cache, device="cuda", dtype=dtype)
        v = torch.randn(cache, device="cuda", dtype=dtype)
        q = torch.randn(batch, hq, d, device="cuda", dtype=dtype)
        lens_t = torch.tensor(lens, dtype=torch.int32, device="cuda")
        for splits in (0, 1, 4):
            o = torch.empty_like(q)
            lse = torch.empty(batch, hq, device="cuda")
            kb, vb = (k, v) if layout == "bhld" else (k.transpose(1, 2), v.transpose(1, 2))
            runtime.launch_attention(q, kb, vb, lens_t, o, lse, 1 / math.sqrt(d), num_splits=splits)
            ref, _ = decode_attention_reference(q, kb, vb, lens, 1 / math.sqrt(d))
            assert (o.double() - ref).abs().max() < 2e-2
        lean_tvm.decode_attention(q, k, v, lens_t, layout=layout)
    w = torch.randn(40, 4096, device="cuda", dtype=torch.float16)
    x = torch.randn(4096, device="cuda", dtype=torch.float16)
    y = torch.empty(40, device="cuda", dtype=torch.float16)
    runtime.launch_gemv(w, x, y)
    torch.cuda.synchronize()
    print("sanitize_check: all launches done")


if __name__ == "__main__":
    main()
