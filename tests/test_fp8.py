"""fp8 KV caches (``float8_e4m3fn``, ``float8_e5m2``) through ``lean_tvm.decode_attention`` on CPU
tensors, against float64 on the dequantised values (so the test measures the kernel, not the
quantisation): dense and paged, one and several query tokens, fp16 and bf16 queries, per-tensor
and per-KV-head scales far from 1, large logits, empty sequences; torch.compile; bad input."""

import math

import pytest
import torch
from helpers import assert_fp8_dense_close, assert_fp8_paged_close, paged_case

import lean_tvm

pytest.importorskip("tvm")  # the CPU library

F16, BF16 = torch.float16, torch.bfloat16
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def stored(shape, fp8, generator, spread=1.0):
    """Random fp8 values (every exponent of a N(0, spread) sample, no NaN)."""
    return (torch.randn(shape, generator=generator) * spread).to(fp8)


def per_head(hkv, lo, hi, generator):
    """Per-KV-head scales spread log-uniformly over [lo, hi]."""
    return torch.exp(torch.empty(hkv).uniform_(math.log(lo), math.log(hi), generator=generator)).float()


DENSE = [  # B lens, Sq, Hq, Hkv, D, q dtype, fp8, k_scale, v_scale, layout
    ([100, 0, 37], 1, 8, 2, 64, F16, E4M3, 0.5, 2.0, "bhld"),
    ([100, 0, 37], 1, 8, 2, 128, BF16, E4M3, "head", "head", "blhd"),
    ([64, 65], 1, 32, 8, 128, F16, E5M2, 1e-3, 1e3, "bhld"),
    ([64, 65], 1, 4, 1, 256, BF16, E5M2, 1e3, 1e-3, "blhd"),  # large logits: k_scale 1e3
    ([90, 3], 3, 16, 2, 64, F16, E4M3, "head", 1.0, "bhld"),  # Sq 3 over G 8: 24 rows, 2 chunks
    ([50], 1, 7, 1, 128, F16, E4M3, None, None, "bhld"),  # G 7, default scales
]


def _scales(kind, hkv, generator):
    return per_head(hkv, 1e-3, 1e3, generator) if kind == "head" else kind


@pytest.mark.parametrize("lens,sq,hq,hkv,head_dim,dtype,fp8,ks,vs,layout", DENSE)
def test_dense_fp8_matches_float64(lens, sq, hq, hkv, head_dim, dtype, fp8, ks, vs, layout):
    g = torch.Generator().manual_seed(len(lens) * 7 + head_dim)
    batch, length = len(lens), max(lens)
    shape = (batch, hkv, length, head_dim) if layout == "bhld" else (batch, length, hkv, head_dim)
    k, v = stored(shape, fp8, g), stored(shape, fp8, g)
    k_scale, v_scale = _scales(ks, hkv, g), _scales(vs, hkv, g)
    q = torch.randn(batch, sq, hq, head_dim, generator=g).to(dtype)
    assert_fp8_dense_close(q, k, v, lens, layout, k_scale, v_scale)  # v_scale spans 1e-3..1e3: relative


PAGED = [  # lens, Sq, Hq, Hkv, page, q dtype, fp8, layout
    ([100, 0, 37, 64], 1, 8, 2, 16, F16, E4M3, "blhd"),
    ([100, 0, 37, 64], 2, 8, 2, 1, BF16, E5M2, "bhld"),
    ([256, 17, 1, 300], 5, 7, 1, 64, F16, E4M3, "bhld"),
    ([40, 7, 90], 16, 4, 1, 16, BF16, E4M3, "blhd"),  # Sq 16: 64 rows in 8 chunks
]


@pytest.mark.parametrize("lens,sq,hq,hkv,page,dtype,fp8,layout", PAGED)
def test_paged_fp8_matches_float64(lens, sq, hq, hkv, page, dtype, fp8, layout):
    q, k, v, table, lens_t = paged_case(lens, sq, hq, hkv, page, dtype, layout, share=True)
    g = torch.Generator().manual_seed(sq)
    k8, v8 = k.float().to(fp8), v.float().to(fp8)
    k_scale, v_scale = per_head(hkv, 0.01, 100, g), 0.25
    assert_fp8_paged_close(q, k8, v8, table, lens_t, layout, k_scale, v_scale)


def test_fp8_equals_the_16bit_path_on_the_dequantised_values():
    """Where the dequantised values are exact in fp16, the fp8 kernel and the fp16 one agree."""
    g = torch.Generator().manual_seed(5)
    k, v = stored((2, 2, 80, 64), E4M3, g), stored((2, 2, 80, 64), E4M3, g)
    q = torch.randn(2, 8, 64, generator=g).half()
    lens = torch.tensor([80, 33], dtype=torch.int32)
    o8 = lean_tvm.decode_attention(q, k, v, lens, k_scale=0.5, v_scale=0.25)
    o16 = lean_tvm.decode_attention(q, (k.float() * 0.5).half(), (v.float() * 0.25).half(), lens)
    torch.testing.assert_close(o8, o16, atol=1e-3, rtol=1e-3)


def test_compile_fullgraph():
    g = torch.Generator().manual_seed(2)
    k, v = stored((2, 2, 40, 64), E5M2, g), stored((2, 2, 40, 64), E5M2, g)
    q = torch.randn(2, 8, 64, generator=g).half()
    lens = torch.tensor([40, 9], dtype=torch.int32)
    ks = torch.tensor([0.5, 2.0])

    def step(q, k, v, lens, ks):
        return lean_tvm.decode_attention(q, k, v, lens, k_scale=ks, v_scale=3.0)

    eager = step(q, k, v, lens, ks)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, v, lens, ks)
    torch.testing.assert_close(compiled, eager)
    q4, table, zeros = q[:, None], torch.zeros(2, 1, dtype=torch.int32), torch.zeros(2, dtype=torch.int32)
    torch.library.opcheck(torch.ops.lean_tvm.decode_attention_paged.default,
                          (q4, k, v, table, lens, zeros, 0.125, 40, 30, ks, torch.full((2,), 3.0)),
                          test_utils=("test_faketensor",))  # test_schema multiplies inputs: no fp8 on CPU


def _bad(**over):
    g = torch.Generator().manual_seed(0)
    args = dict(q=torch.randn(2, 8, 64, generator=g).half(), k=stored((2, 2, 16, 64), E4M3, g),
                v=stored((2, 2, 16, 64), E4M3, g), lens=torch.tensor([16, 3], dtype=torch.int32), k_scale=1.0,
                v_scale=1.0)
    args.update(over)
    return lean_tvm.decode_attention(args["q"], args["k"], args["v"], args["lens"], k_scale=args["k_scale"],
                                     v_scale=args["v_scale"])


@pytest.mark.parametrize("over,exc,match", [
    (dict(q=torch.zeros(2, 8, 64).to(E4M3)), TypeError, "q.dtype"),
    (dict(k_scale=torch.ones(3)), ValueError, r"k_scale.shape: expected \[2\]"),
    (dict(v_scale=torch.ones(2, dtype=torch.float64)), TypeError, "v_scale.dtype"),
    (dict(k_scale="1"), TypeError, "k_scale"),
    (dict(k_scale=float("nan")), ValueError, "k_scale: expected a finite scale > 0"),
    (dict(v_scale=0.0), ValueError, "v_scale: expected a finite scale > 0"),
    (dict(k_scale=torch.tensor([1.0, 0.0])), ValueError, "k_scale: expected finite scales > 0"),
    (dict(v_scale=torch.tensor([float("nan"), 1.0])), ValueError, "v_scale: expected finite scales > 0"),
    (dict(v=torch.zeros(2, 2, 16, 64).to(E5M2)), TypeError, "v_cache.dtype"),
    (dict(k=torch.zeros(2, 2, 16, 64).half(), v=torch.zeros(2, 2, 16, 64).half()), ValueError,
     "k_scale: expected None with a 16-bit cache"),
])
def test_bad_fp8_input_is_rejected_naming_the_argument(over, exc, match):
    with pytest.raises(exc, match=match):
        _bad(**over)
