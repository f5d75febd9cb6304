"""A small Llama-style decoder in ``tvm.relax.frontend.nn``, in two forms, plus its float64 twin.

Model (random weights, fp16): token embedding; per layer RMSNorm -> Q/K/V projections -> RoPE
(rotate-half, fp32 angles) -> GQA attention over a KV cache -> o_proj, residual; RMSNorm ->
SwiGLU MLP, residual; final RMSNorm -> lm_head (logits in fp32). Two exported functions:

* ``decode(tokens int32[B], seq_lens int32[B], k_caches, v_caches)``: one new token per
  sequence. ``seq_lens[b]`` tokens are already in the caches (each [B, L, Hkv, D], one K and one V
  per layer, L = the caches' capacity); the step writes the new token's K/V at row
  ``seq_lens[b]`` **in place** (``op.tensor_ir_inplace_op``, the caller's tensors are updated),
  then attends over ``seq_lens[b] + 1`` rows with ordinary Relax ops:
  ``R.nn.attention_bias(q [B,1,Hq,D], R.repeat(k_cache, G, axis=2), R.repeat(v_cache, ...),
  bias)`` with the key-padding bias ``where(arange(L) < lens, 0, -inf)`` -> [B, 1, 1, L].
  Requires ``seq_lens[b] < L``.
* ``prefill(tokens int32[B, n])``: a fresh prompt of n tokens per sequence (causal attention,
  q_len = n); returns (logits [B, n, V], k_0, v_0, k_1, v_1, ...) with k_i, v_i [B, n, Hkv, D].

Forms: ``export(cfg)`` is TVM's default path (attention legalized and, for CUDA, scheduled by
dlight); ``lean_form(mod, target_kind)`` is the same module after
``lean_tvm.relax.RewriteDecodeAttention``: the decode attention becomes LeanAttention, prefill's
attention and every other op stay as they were. ``TorchLlama`` is the float64 reference with the
same weights. Run ``python examples/llama_relax.py`` for a CPU check of both forms.

The reference half (``LlamaConfig``, ``TorchLlama``, ``random_weights``, ``make_inputs``) imports
with torch alone (``HAVE_RELAX`` is False then), so the GPU machine's runtime-only TVM can use it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
try:  # the model half needs apache-tvm's compiler; the reference half (torch) never does
    import tvm
    from tvm import relax
    from tvm.relax.frontend import nn
    from tvm.relax.frontend.nn import op, spec
    from tvm.script import tirx as T

    from lean_tvm import relax as lean_relax
    HAVE_RELAX = True
except Exception:  # noqa: BLE001 -- e.g. a runtime-only TVM on the GPU machine: no tvm.relax
    HAVE_RELAX = False

    class nn:  # noqa: N801 -- lets the model classes below be defined (not used) without Relax
        Module = object


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 512
    hidden: int = 256
    layers: int = 2
    heads: int = 8
    kv_heads: int = 2
    head_dim: int = 64
    ffn: int = 512
    rope_theta: float = 10000.0
    eps: float = 1e-5
    dtype: str = "float16"

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    def inv_freq(self) -> np.ndarray:
        """RoPE frequencies, computed in float64 and stored in float32 (both implementations)."""
        i = np.arange(0, self.head_dim // 2, dtype=np.float64)
        return (self.rope_theta ** (-2.0 * i / self.head_dim)).astype(np.float32)


# --------------------------------------------------------------------------------------------
# The in-place KV append (a small TIR kernel; CPU and CUDA forms).
# --------------------------------------------------------------------------------------------


def make_append_kv(cfg: LlamaConfig, target_kind: str) -> tvm.tirx.PrimFunc:
    """cache[b, pos[b], h, :] = new[b, h, :] for K and V (rows outside [0, L) are skipped)."""
    HKV, D, dt = cfg.kv_heads, cfg.head_dim, cfg.dtype

    if target_kind == "cuda":
        @T.prim_func(s_tir=True)
        def append_kv(k_cache: T.handle, v_cache: T.handle, k_new: T.handle, v_new: T.handle, pos: T.handle):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            B, L = T.int64(), T.int64()
            KC = T.match_buffer(k_cache, (B, L, HKV, D), dt)
            VC = T.match_buffer(v_cache, (B, L, HKV, D), dt)
            KN = T.match_buffer(k_new, (B, HKV, D), dt)
            VN = T.match_buffer(v_new, (B, HKV, D), dt)
            P = T.match_buffer(pos, (B,), "int32")
            bx = T.launch_thread("blockIdx.x", B * HKV)
            tx = T.launch_thread("threadIdx.x", D)
            b = T.meta_var(T.truncdiv(bx, HKV))
            h = T.meta_var(T.truncmod(bx, HKV))
            if P[b] >= 0 and T.Cast("int64", P[b]) < L:
                KC[b, T.Cast("int64", P[b]), h, tx] = KN[b, h, tx]
                VC[b, T.Cast("int64", P[b]), h, tx] = VN[b, h, tx]
    else:
        @T.prim_func(s_tir=True)
        def append_kv(k_cache: T.handle, v_cache: T.handle, k_new: T.handle, v_new: T.handle, pos: T.handle):
            T.func_attr({"tirx.noalias": True})
            B, L = T.int64(), T.int64()
            KC = T.match_buffer(k_cache, (B, L, HKV, D), dt)
            VC = T.match_buffer(v_cache, (B, L, HKV, D), dt)
            KN = T.match_buffer(k_new, (B, HKV, D), dt)
            VN = T.match_buffer(v_new, (B, HKV, D), dt)
            P = T.match_buffer(pos, (B,), "int32")
            for b in range(B):
                if P[b] >= 0 and T.Cast("int64", P[b]) < L:
                    for h, d in T.grid(HKV, D):
                        KC[b, T.Cast("int64", P[b]), h, d] = KN[b, h, d]
                        VC[b, T.Cast("int64", P[b]), h, d] = VN[b, h, d]

    return append_kv.with_attr("op_pattern", lean_relax.OP_PATTERN_OPAQUE)


# --------------------------------------------------------------------------------------------
# The model (relax.frontend.nn).
# --------------------------------------------------------------------------------------------


def _const(value: float, dtype: str) -> nn.Tensor:
    return nn.Tensor.from_const(np.array(value, dtype=dtype))


def rope_angles(cfg: LlamaConfig, positions: nn.Tensor) -> tuple[nn.Tensor, nn.Tensor]:
    """cos, sin (fp32) of positions[..., None] * inv_freq: shape positions.shape + [D/2]."""
    inv = nn.Tensor.from_const(cfg.inv_freq())
    shape = list(positions.shape)
    ang = op.multiply(op.reshape(op.astype(positions, "float32"), [*shape, 1]),
                      op.reshape(inv, [*([1] * len(shape)), cfg.head_dim // 2]))
    return (nn.wrap_nested(relax.op.cos(ang._expr), "rope_cos"),
            nn.wrap_nested(relax.op.sin(ang._expr), "rope_sin"))


def apply_rope(x: nn.Tensor, cos: nn.Tensor, sin: nn.Tensor) -> nn.Tensor:
    """Rotate-half RoPE on x [..., H, D] with cos/sin [..., D/2] (broadcast over heads)."""
    xf = op.astype(x, "float32")
    x1, x2 = op.split(xf, 2, axis=-1)
    c = op.unsqueeze(cos, -2)
    s = op.unsqueeze(sin, -2)
    out = op.concat([op.subtract(op.multiply(x1, c), op.multiply(x2, s)),
                     op.add(op.multiply(x2, c), op.multiply(x1, s))], dim=-1)
    return op.astype(out, x.dtype)


def padding_bias(lens: nn.Tensor, kv_len, dtype: str) -> nn.Tensor:
    """Key-padding bias [B, 1, 1, L]: 0 where position < lens[b], -inf elsewhere."""
    batch = lens.shape[0]
    pos = op.reshape(op.arange(0, kv_len, dtype="int32"), [1, kv_len])
    valid = op.less(pos, op.reshape(lens, [batch, 1]))
    bias = op.where(valid, _const(0.0, dtype), _const(-np.inf, dtype))
    return op.reshape(bias, [batch, 1, 1, kv_len])


def attention(q: nn.Tensor, k: nn.Tensor, v: nn.Tensor, bias: nn.Tensor | None = None,
              causal_mask: str | None = None) -> nn.Tensor:
    """R.nn.attention(_bias) on BSNH tensors (nn.op.scaled_dot_product_attention takes no bias)."""
    call = relax.op.nn.attention(q._expr, k._expr, v._expr, None if bias is None else bias._expr,
                                 causal_mask=causal_mask)
    return nn.wrap_nested(call, "attention")


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        self.cfg = cfg
        H, HKV, D, dt = cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.dtype
        self.q_proj = nn.Linear(cfg.hidden, H * D, bias=False, dtype=dt)
        self.k_proj = nn.Linear(cfg.hidden, HKV * D, bias=False, dtype=dt)
        self.v_proj = nn.Linear(cfg.hidden, HKV * D, bias=False, dtype=dt)
        self.o_proj = nn.Linear(H * D, cfg.hidden, bias=False, dtype=dt)

    def _qkv(self, x, cos, sin, lead):
        cfg = self.cfg
        q = op.reshape(self.q_proj(x), [*lead, cfg.heads, cfg.head_dim])
        k = op.reshape(self.k_proj(x), [*lead, cfg.kv_heads, cfg.head_dim])
        v = op.reshape(self.v_proj(x), [*lead, cfg.kv_heads, cfg.head_dim])
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def decode(self, x, cos, sin, seq_lens, k_cache, v_cache, append):
        cfg = self.cfg
        batch = x.shape[0]
        q, k, v = self._qkv(x, cos, sin, [batch])  # q [B, H, D], k/v [B, Hkv, D]
        k_cache, v_cache = op.tensor_ir_inplace_op(
            append, "append_kv", args=[k_cache, v_cache, k, v, seq_lens], inplace_indices=[0, 1],
            out=[nn.Tensor.placeholder(k_cache.shape, cfg.dtype), nn.Tensor.placeholder(v_cache.shape, cfg.dtype)])
        lens = op.add(seq_lens, _const(1, "int32"))
        bias = padding_bias(lens, k_cache.shape[1], cfg.dtype)
        o = attention(op.reshape(q, [batch, 1, cfg.heads, cfg.head_dim]), op.repeat(k_cache, cfg.group, axis=2),
                      op.repeat(v_cache, cfg.group, axis=2), bias)
        return self.o_proj(op.reshape(o, [batch, cfg.heads * cfg.head_dim]))

    def prefill(self, x, cos, sin):
        cfg = self.cfg
        batch, n = x.shape[0], x.shape[1]
        q, k, v = self._qkv(x, cos, sin, [batch, n])  # [B, n, H(kv), D]
        o = attention(q, op.repeat(k, cfg.group, axis=2), op.repeat(v, cfg.group, axis=2), causal_mask="TopLeft")
        return self.o_proj(op.reshape(o, [batch, n, cfg.heads * cfg.head_dim])), k, v


class LlamaMLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        self.gate_proj = nn.Linear(cfg.hidden, cfg.ffn, bias=False, dtype=cfg.dtype)
        self.up_proj = nn.Linear(cfg.hidden, cfg.ffn, bias=False, dtype=cfg.dtype)
        self.down_proj = nn.Linear(cfg.ffn, cfg.hidden, bias=False, dtype=cfg.dtype)

    def forward(self, x):
        return self.down_proj(op.multiply(op.silu(self.gate_proj(x)), self.up_proj(x)))


class LlamaLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        self.input_layernorm = nn.RMSNorm(cfg.hidden, -1, cfg.eps, bias=False, dtype=cfg.dtype)
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden, -1, cfg.eps, bias=False, dtype=cfg.dtype)
        self.mlp = LlamaMLP(cfg)


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig, target_kind: str = "llvm"):
        self.cfg = cfg
        self.target_kind = target_kind
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden, dtype=cfg.dtype)
        self.layers = nn.ModuleList([LlamaLayer(cfg) for _ in range(cfg.layers)])
        self.norm = nn.RMSNorm(cfg.hidden, -1, cfg.eps, bias=False, dtype=cfg.dtype)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False, dtype=cfg.dtype)

    def _logits(self, x):
        return op.astype(self.lm_head(self.norm(x)), "float32")

    def decode(self, tokens: nn.Tensor, seq_lens: nn.Tensor, k_caches, v_caches):
        append = make_append_kv(self.cfg, self.target_kind)
        x = self.embed_tokens(tokens)  # [B, hidden]
        cos, sin = rope_angles(self.cfg, seq_lens)  # the new token sits at position seq_lens[b]
        for layer, kc, vc in zip(self.layers, k_caches, v_caches, strict=True):
            x = op.add(x, layer.self_attn.decode(layer.input_layernorm(x), cos, sin, seq_lens, kc, vc, append))
            x = op.add(x, layer.mlp(layer.post_attention_layernorm(x)))
        return self._logits(x)

    def prefill(self, tokens: nn.Tensor):
        x = self.embed_tokens(tokens)  # [B, n, hidden]
        cos, sin = rope_angles(self.cfg, op.arange(0, tokens.shape[1], dtype="int32"))  # [n, D/2]
        kvs = []
        for layer in self.layers:
            h, k, v = layer.self_attn.prefill(layer.input_layernorm(x), cos, sin)
            x = op.add(x, h)
            x = op.add(x, layer.mlp(layer.post_attention_layernorm(x)))
            kvs += [k, v]
        return (self._logits(x), *kvs)


def export(cfg: LlamaConfig = LlamaConfig(), target_kind: str = "llvm", prefill: bool = True):
    """TVM's default form: (IRModule, [(param name, shape, dtype)]) -- weights follow the inputs."""
    model = Llama(cfg, target_kind)
    cache = spec.Tensor(["batch", "max_len", cfg.kv_heads, cfg.head_dim], cfg.dtype)
    specs = {"decode": {"tokens": spec.Tensor(["batch"], "int32"), "seq_lens": spec.Tensor(["batch"], "int32"),
                        "k_caches": [cache] * cfg.layers, "v_caches": [cache] * cfg.layers}}
    if prefill:
        specs["prefill"] = {"tokens": spec.Tensor(["batch", "n"], "int32")}
    mod, params = model.export_tvm(spec=specs)
    return mod, [(name, tuple(int(s) for s in p.shape), p.dtype) for name, p in params]


class AttentionOnly(nn.Module):
    """Just the model's decode attention (after the append): q [B, Hq, D] over the caches with the
    same ops as ``LlamaAttention.decode``, for timing attention alone."""

    def __init__(self, cfg: LlamaConfig):
        self.cfg = cfg

    def forward(self, q: nn.Tensor, k_cache: nn.Tensor, v_cache: nn.Tensor, seq_lens: nn.Tensor):
        cfg = self.cfg
        batch = q.shape[0]
        bias = padding_bias(seq_lens, k_cache.shape[1], cfg.dtype)
        o = attention(op.reshape(q, [batch, 1, cfg.heads, cfg.head_dim]), op.repeat(k_cache, cfg.group, axis=2),
                      op.repeat(v_cache, cfg.group, axis=2), bias)
        return op.reshape(o, [batch, cfg.heads, cfg.head_dim])


def export_attention_only(cfg: LlamaConfig = LlamaConfig()) -> tvm.IRModule:
    """``forward(q [B, Hq, D], k_cache, v_cache [B, L, Hkv, D], seq_lens [B]) -> o`` (default form)."""
    cache = spec.Tensor(["batch", "max_len", cfg.kv_heads, cfg.head_dim], cfg.dtype)
    mod, _ = AttentionOnly(cfg).export_tvm(spec={"forward": {
        "q": spec.Tensor(["batch", cfg.heads, cfg.head_dim], cfg.dtype), "k_cache": cache, "v_cache": cache,
        "seq_lens": spec.Tensor(["batch"], "int32")}})
    return mod


def lean_form(mod: tvm.IRModule, target_kind: str = "llvm", **kwargs) -> tvm.IRModule:
    """The same module with its decode attention rewritten to LeanAttention."""
    return lean_relax.RewriteDecodeAttention(target_kind=target_kind, **kwargs)(mod)


def random_weights(params, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape, dtype in params:
        if name.endswith("norm.weight"):
            w = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif "embed" in name:
            w = torch.randn(shape, generator=g)
        else:
            w = torch.randn(shape, generator=g) / math.sqrt(shape[-1])
        out[name] = w.to(getattr(torch, dtype))
    return out


# --------------------------------------------------------------------------------------------
# The float64 reference.
# --------------------------------------------------------------------------------------------


class TorchLlama:
    """The same model in float64 (weights upcast); RoPE angles in float32 like the Relax model."""

    def __init__(self, cfg: LlamaConfig, weights: dict[str, torch.Tensor]):
        self.cfg = cfg
        self.w = {k: v.double() for k, v in weights.items()}
        self.inv_freq = torch.from_numpy(cfg.inv_freq())

    def _norm(self, x, name):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.cfg.eps) * self.w[name]

    def _lin(self, x, name):
        return x @ self.w[name].T

    def _rope(self, x, positions):
        ang = (positions.to(torch.float32)[..., None] * self.inv_freq.to(positions.device)).double()
        c, s = torch.cos(ang).unsqueeze(-2), torch.sin(ang).unsqueeze(-2)
        x1, x2 = x.chunk(2, -1)
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)

    def _mlp(self, x, p):
        g = self._lin(x, p + "mlp.gate_proj.weight")
        up = self._lin(x, p + "mlp.up_proj.weight")
        return self._lin(torch.nn.functional.silu(g) * up, p + "mlp.down_proj.weight")

    def _logits(self, x):
        return self._lin(self._norm(x, "norm.weight"), "lm_head.weight")

    def decode(self, tokens, seq_lens, k_caches, v_caches):
        """float64 logits [B, V] and the new K/V rows per layer ([B, Hkv, D], for checking the
        in-place append). The caches are read, not modified; row seq_lens[b] is taken from the
        new K/V."""
        cfg = self.cfg
        H, HKV, D = cfg.heads, cfg.kv_heads, cfg.head_dim
        x = self.w["embed_tokens.weight"][tokens.long()]
        lens = seq_lens.long()
        new_kv = []
        for i in range(cfg.layers):
            p = f"layers.{i}."
            h = self._norm(x, p + "input_layernorm.weight")
            q = self._rope(self._lin(h, p + "self_attn.q_proj.weight").view(-1, H, D), seq_lens)
            k = self._rope(self._lin(h, p + "self_attn.k_proj.weight").view(-1, HKV, D), seq_lens)
            v = self._lin(h, p + "self_attn.v_proj.weight").view(-1, HKV, D)
            new_kv.append((k, v))
            outs = []
            for b in range(x.shape[0]):
                n = int(lens[b])
                kb = torch.cat([k_caches[i][b, :n].double(), k[b][None]], 0)  # [n + 1, Hkv, D]
                vb = torch.cat([v_caches[i][b, :n].double(), v[b][None]], 0)
                qb = q[b].view(HKV, cfg.group, D)
                s = torch.einsum("hgd,lhd->hgl", qb, kb) / math.sqrt(D)
                outs.append(torch.einsum("hgl,lhd->hgd", torch.softmax(s, -1), vb).reshape(H * D))
            x = x + self._lin(torch.stack(outs), p + "self_attn.o_proj.weight")
            x = x + self._mlp(self._norm(x, p + "post_attention_layernorm.weight"), p)
        return self._logits(x), new_kv

    def prefill(self, tokens):
        cfg = self.cfg
        H, HKV, D = cfg.heads, cfg.kv_heads, cfg.head_dim
        bsz, n = tokens.shape
        x = self.w["embed_tokens.weight"][tokens.long()]
        pos = torch.arange(n, dtype=torch.int32)
        mask = torch.ones(n, n, dtype=torch.bool).tril()
        kvs = []
        for i in range(cfg.layers):
            p = f"layers.{i}."
            h = self._norm(x, p + "input_layernorm.weight")
            q = self._rope(self._lin(h, p + "self_attn.q_proj.weight").view(bsz, n, H, D), pos)
            k = self._rope(self._lin(h, p + "self_attn.k_proj.weight").view(bsz, n, HKV, D), pos)
            v = self._lin(h, p + "self_attn.v_proj.weight").view(bsz, n, HKV, D)
            kvs += [k, v]
            kr, vr = k.repeat_interleave(cfg.group, 2), v.repeat_interleave(cfg.group, 2)
            s = torch.einsum("bqhd,bkhd->bhqk", q, kr) / math.sqrt(D)
            s = s.masked_fill(~mask, -math.inf)
            o = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), vr).reshape(bsz, n, H * D)
            x = x + self._lin(o, p + "self_attn.o_proj.weight")
            x = x + self._mlp(self._norm(x, p + "post_attention_layernorm.weight"), p)
        return self._logits(x), kvs


# --------------------------------------------------------------------------------------------
# Running a form on the Relax VM.
# --------------------------------------------------------------------------------------------


def make_inputs(cfg: LlamaConfig, lens, max_len: int, device="cpu", seed: int = 1):
    """tokens, seq_lens and random caches (rows past seq_lens[b] are garbage, as in a real cache)."""
    g = torch.Generator().manual_seed(seed)
    batch = len(lens)
    tokens = torch.randint(0, cfg.vocab_size, (batch,), generator=g, dtype=torch.int32)
    shape = (batch, max_len, cfg.kv_heads, cfg.head_dim)
    kc = [torch.randn(shape, generator=g).to(getattr(torch, cfg.dtype)) for _ in range(cfg.layers)]
    vc = [torch.randn(shape, generator=g).to(getattr(torch, cfg.dtype)) for _ in range(cfg.layers)]
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    return [t.to(device) for t in (tokens, seq_lens)] + [[t.to(device) for t in kc], [t.to(device) for t in vc]]


def weight_list(params, weights: dict[str, torch.Tensor], device="cpu"):
    return [weights[name].to(device) for name, _, _ in params]


def compile_cpu(mod: tvm.IRModule):
    return relax.VirtualMachine(lean_relax.build(mod, "llvm"), tvm.cpu())


def main():
    cfg = LlamaConfig()
    mod, params = export(cfg)
    lean_mod = lean_form(mod)
    print("default form:", lean_relax.count_attention_calls(mod))
    print("lean form:   ", lean_relax.count_attention_calls(lean_mod))
    weights = random_weights(params)
    ref = TorchLlama(cfg, weights)
    lens = [37, 0, 100, 5]
    for label, m in (("tvm default", mod), ("LeanAttention", lean_mod)):
        vm = compile_cpu(m)
        tokens, seq_lens, kc, vc = make_inputs(cfg, lens, 128)
        want, _ = ref.decode(tokens, seq_lens, kc, vc)
        logits = torch.from_dlpack(vm["decode"](tokens, seq_lens, kc, vc, *weight_list(params, weights)))
        err = (logits.double() - want).abs().max().item()
        print(f"{label}: decode logits {tuple(logits.shape)} max|err| vs float64 = {err:.2e}")


if __name__ == "__main__":
    main()
