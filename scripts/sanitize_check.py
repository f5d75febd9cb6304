"""A few small launches for compute-sanitizer (memcheck, racecheck, synccheck): the persistent
walk, the flag protocol, fixed splits, empty sequences, both cache layouts, the paged form (block
table, several tokens), fp8 caches (e4m3 and e5m2, dense and paged), and the GEMV.

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
    paged_and_fp8()
    w = torch.randn(40, 4096, device="cuda", dtype=torch.float16)
    x = torch.randn(4096, device="cuda", dtype=torch.float16)
    y = torch.empty(40, device="cuda", dtype=torch.float16)
    runtime.launch_gemv(w, x, y)
    torch.cuda.synchronize()
    print("sanitize_check: all launches done")


def paged_and_fp8() -> None:
    """The paged kernel (pages of 16, 3 tokens, an empty sequence) in 16 bits and over fp8 pools,
    and a dense fp8 cache with per-KV-head scales."""
    lens = torch.tensor([700, 0, 130], dtype=torch.int32, device="cuda")
    table = torch.randperm(3 * 44, device="cuda").to(torch.int32).view(3, 44)
    pool = torch.randn(3 * 44, 16, 8, 128, device="cuda", dtype=torch.float16)
    for q, k in ((torch.randn(3, 3, 32, 128, device="cuda", dtype=torch.float16), pool),
                 (torch.randn(3, 3, 32, 128, device="cuda", dtype=torch.bfloat16), pool.to(torch.float8_e5m2))):
        scales = dict(k_scale=0.5, v_scale=2.0) if k.dtype != q.dtype else {}
        lean_tvm.decode_attention(q, k, k, lens, block_table=table, layout="blhd", **scales)
    k8 = torch.randn(3, 8, 700, 128, device="cuda").to(torch.float8_e4m3fn)
    per_head = torch.rand(8, device="cuda") + 0.5
    lean_tvm.decode_attention(torch.randn(3, 32, 128, device="cuda", dtype=torch.float16), k8, k8, lens,
                              k_scale=per_head, v_scale=per_head)


if __name__ == "__main__":
    main()
