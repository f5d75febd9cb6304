"""The unscheduled TensorIR decode attention (llvm) against the float64 torch reference."""

import functools
import math

import pytest
import torch
import tvm

from lean_tvm.compute import make_decode_attention
from lean_tvm.reference import decode_attention_reference

TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
O_TOL = {"float16": (2e-3, 1e-2), "bfloat16": (1e-2, 2e-2)}  # (atol, rtol)
LMAX = 300
SEQ_LENS = [0, 1, LMAX, 137, 0, 64]  # empty, one row, full cache, ragged


@functools.cache
def kernel(dtype, head_dim, group_size):
    ex = tvm.compile(make_decode_attention(dtype, head_dim, group_size), target="llvm")
    return ex[f"decode_attention_{dtype}_d{head_dim}_g{group_size}"]


def inputs(dtype, head_dim, group_size, q_scale, num_kv_heads=2, seed=0):
    """Random q/k/v with NaN in every row past a sequence's length (they must never be read)."""
    gen = torch.Generator().manual_seed(seed)
    tdt = TORCH_DTYPES[dtype]
    b, hq = len(SEQ_LENS), num_kv_heads * group_size
    q = (torch.randn(b, hq, head_dim, generator=gen) * q_scale).to(tdt)
    k = torch.randn(b, num_kv_heads, LMAX, head_dim, generator=gen).to(tdt)
    v = torch.randn(b, num_kv_heads, LMAX, head_dim, generator=gen).to(tdt)
    seq_lens = torch.tensor(SEQ_LENS, dtype=torch.int32)
    pad = torch.arange(LMAX)[None, :] >= seq_lens[:, None].long()
    k[pad[:, None].expand(-1, num_kv_heads, -1)] = float("nan")
    v[pad[:, None].expand(-1, num_kv_heads, -1)] = float("nan")
    return q, k, v, seq_lens


def run(dtype, head_dim, group_size, q, k, v, seq_lens, scale):
    o = torch.empty(q.shape, dtype=q.dtype)
    lse = torch.empty(q.shape[:2], dtype=torch.float32)
    kernel(dtype, head_dim, group_size)(q, k, v, seq_lens, o, lse, scale)
    return o, lse


@pytest.mark.parametrize("q_scale", [1.0, 20.0], ids=["logits", "large_logits"])
@pytest.mark.parametrize("group_size", [1, 4])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", list(TORCH_DTYPES))
def test_matches_reference(dtype, head_dim, group_size, q_scale):
    q, k, v, seq_lens = inputs(dtype, head_dim, group_size, q_scale)
    scale = 1 / math.sqrt(head_dim)
    o, lse = run(dtype, head_dim, group_size, q, k, v, seq_lens, scale)
    ref_o, ref_lse = decode_attention_reference(q, k, v, seq_lens, scale)
    live = seq_lens > 0
    atol, rtol = O_TOL[dtype]
    torch.testing.assert_close(o[live].double(), ref_o[live], atol=atol, rtol=rtol)
    torch.testing.assert_close(lse[live].double(), ref_lse[live], atol=1e-3, rtol=0)
    assert torch.equal(o[~live], torch.zeros_like(o[~live]))  # empty sequences: exactly 0, -inf
    assert torch.isneginf(lse[~live]).all()


def test_reference_is_plain_softmax_attention():
    """The reference itself, on one sequence, against a loop over query heads (GQA by h // G)."""
    q, k, v, seq_lens = inputs("float16", 64, 4, 1.0)
    o, lse = decode_attention_reference(q, k, v, seq_lens, 0.125)
    b, n = 3, SEQ_LENS[3]
    for h in range(q.shape[1]):
        s = (k[b, h // 4, :n].double() @ q[b, h].double()) * 0.125
        torch.testing.assert_close(o[b, h], torch.softmax(s, 0) @ v[b, h // 4, :n].double())
        torch.testing.assert_close(lse[b, h], torch.logsumexp(s, 0))
    assert torch.isneginf(lse[0]).all() and torch.equal(o[0], torch.zeros_like(o[0]))


def test_rejects_head_count_not_matching_group():
    q, k, v, seq_lens = inputs("float16", 64, 4, 1.0)
    with pytest.raises(ValueError, match=r"Q\.(shape|strides)"):  # Hq = Hkv * G is checked at the call
        run("float16", 64, 4, q[:, :6].contiguous(), k, v, seq_lens, 0.125)
