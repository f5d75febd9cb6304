"""Decode loop of a Llama-shaped model (random weights, PyTorch) with lean_tvm vs SDPA attention.

RMSNorm, QKV projections, RoPE, GQA attention over a KV cache of ``--context`` tokens (random
contents: the timing does not depend on them), SwiGLU MLP. Each step appends one token per
sequence and attends over the cache. Reports tokens/s for SDPA (eager), lean_tvm (eager) and
lean_tvm inside a CUDA graph (its plan lives on the device, so the captured step is replayed
with the lengths advanced in place), and checks the three agree.

    python scripts/llama_decode.py --layers 32 --context 8192 --batch 4 --steps 32
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

import lean_tvm


class Layer(torch.nn.Module):
    def __init__(self, hidden, heads, kv_heads, head_dim, ffn, dtype, device):
        super().__init__()
        mk = dict(dtype=dtype, device=device)
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.wqkv = torch.randn(hidden, (heads + 2 * kv_heads) * head_dim, **mk) / math.sqrt(hidden)
        self.wo = torch.randn(heads * head_dim, hidden, **mk) / math.sqrt(heads * head_dim)
        self.w13 = torch.randn(hidden, 2 * ffn, **mk) / math.sqrt(hidden)
        self.w2 = torch.randn(ffn, hidden, **mk) / math.sqrt(ffn)
        self.n1 = torch.ones(hidden, **mk)
        self.n2 = torch.ones(hidden, **mk)


def rms_norm(x, w):
    return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype) * w


def rope(x, pos, theta=500000.0):
    """x [B, H, D] at positions pos [B]."""
    half = x.shape[-1] // 2
    freqs = pos.float()[:, None] * theta ** (-torch.arange(half, device=x.device).float() / half)
    cos, sin = freqs.cos()[:, None, :], freqs.sin()[:, None, :]
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).to(x.dtype)


class Model:
    def __init__(self, args, device):
        self.args = args
        dt = getattr(torch, args.dtype)
        self.layers = [Layer(args.hidden, args.heads, args.kv_heads, args.head_dim, args.ffn, dt, device)
                       for _ in range(args.layers)]
        cache = (args.batch, args.kv_heads, args.context + args.steps + 1, args.head_dim)
        self.k = [torch.randn(cache, dtype=dt, device=device) for _ in self.layers]
        self.v = [torch.randn(cache, dtype=dt, device=device) for _ in self.layers]

    def step(self, x, lens, n, attention):
        """One decode step: x [B, hidden]; lens [B] int32 = cache lengths before this token (n on
        the host: all sequences advance together here)."""
        bsz, a = x.shape[0], self.args
        rows = torch.arange(bsz, device=x.device)
        for i, layer in enumerate(self.layers):
            h = rms_norm(x, layer.n1) @ layer.wqkv
            q, k, v = h.split([a.heads * a.head_dim, a.kv_heads * a.head_dim, a.kv_heads * a.head_dim], -1)
            q = rope(q.view(bsz, a.heads, a.head_dim), lens)
            k = rope(k.view(bsz, a.kv_heads, a.head_dim), lens)
            self.k[i][rows, :, lens.long()] = k
            self.v[i][rows, :, lens.long()] = v.view(bsz, a.kv_heads, a.head_dim)
            o = attention(q, self.k[i], self.v[i], lens + 1, n + 1)
            x = x + o.reshape(bsz, -1) @ layer.wo
            g, u = (rms_norm(x, layer.n2) @ layer.w13).chunk(2, -1)
            x = x + (F.silu(g) * u) @ layer.w2
        return x


def lean_attention(q, k, v, lens, n):
    return lean_tvm.decode_attention(q, k, v, lens, check_lengths=False)


def sdpa_attention(q, k, v, lens, n):
    """As a torch user would: the length on the host, attention over a slice of the cache."""
    return F.scaled_dot_product_attention(q[:, :, None], k[:, :, :n], v[:, :, :n], enable_gqa=True)[:, :, 0]


def decode(model, attention, x0, steps, graph=False):
    lens = torch.full((x0.shape[0],), model.args.context, dtype=torch.int32, device=x0.device)
    x = x0.clone()
    if graph:
        static_x = x.clone()
        model.step(static_x, lens, model.args.context, attention)  # warm-up outside capture
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            static_out = model.step(static_x, lens, model.args.context, attention)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            g.replay()
            static_x.copy_(static_out)
            lens.add_(1)
        torch.cuda.synchronize()
        return static_x, time.perf_counter() - t0
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(steps):
        x = model.step(x, lens, model.args.context + i, attention)
        lens.add_(1)
    torch.cuda.synchronize()
    return x, time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--ffn", type=int, default=14336)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16"])
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = Model(args, dev)
    x0 = torch.randn(args.batch, args.hidden, device=dev, dtype=getattr(torch, args.dtype))
    # Correctness: the first layer's attention on the same inputs. Through many random layers (and
    # steps) two correct bf16 attentions drift apart, so the model-level differences are reported.
    lens = torch.full((args.batch,), args.context + 1, dtype=torch.int32, device=dev)
    qa = torch.randn(args.batch, args.heads, args.head_dim, device=dev, dtype=x0.dtype)
    att = {name: attn(qa, model.k[0], model.v[0], lens, args.context + 1).float() for name, attn in
           [("sdpa", sdpa_attention), ("lean_tvm", lean_attention)]}
    err_attn = ((att["lean_tvm"] - att["sdpa"]).norm() / att["sdpa"].norm()).item()
    print(f"attention on the same inputs: relative difference lean_tvm vs sdpa {err_attn:.2e}")
    assert err_attn < 1e-2, err_attn
    lens = torch.full((args.batch,), args.context, dtype=torch.int32, device=dev)
    one = {name: model.step(x0, lens, args.context, attn).float() for name, attn in
           [("sdpa", sdpa_attention), ("lean_tvm", lean_attention)]}
    err1 = ((one["lean_tvm"] - one["sdpa"]).norm() / one["sdpa"].norm()).item()
    print(f"one decode step through {args.layers} layers: relative difference lean_tvm vs sdpa {err1:.2e}")
    results = {}
    for name, attn, graph in [("sdpa", sdpa_attention, False), ("lean_tvm", lean_attention, False),
                              ("lean_tvm + cuda graph", lean_attention, True)]:
        decode(model, attn, x0, 2, graph)  # warm-up (library load, kernels, autotuning of SDPA)
        out, secs = decode(model, attn, x0, args.steps, graph)
        results[name] = (out.float(), args.steps * args.batch / secs)
        print(f"{name:22s} {results[name][1]:8.1f} tokens/s  ({secs / args.steps * 1e3:.2f} ms/step)", flush=True)
    ref = results["sdpa"][0]
    for name in ("lean_tvm", "lean_tvm + cuda graph"):
        err = ((results[name][0] - ref).norm() / ref.norm()).item()
        print(f"{name}: relative drift from sdpa after {args.steps} steps {err:.2e}")
    graph_vs_eager = ((results["lean_tvm + cuda graph"][0] - results["lean_tvm"][0]).norm()
                      / results["lean_tvm"][0].norm()).item()
    print(f"lean_tvm graph replay vs eager after {args.steps} steps: {graph_vs_eager:.2e}")
    assert graph_vs_eager < 1e-3, graph_vs_eager
    print(f"model: {args.layers} layers, hidden {args.hidden}, heads {args.heads}/{args.kv_heads} x {args.head_dim}, "
          f"context {args.context}, batch {args.batch}, {args.dtype}, GPU {torch.cuda.get_device_name()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
