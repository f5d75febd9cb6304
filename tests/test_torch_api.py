"""The PyTorch API on CPU tensors: results, layouts, out=, the Module, torch.compile, and every
bad input rejected with a clear error before anything runs."""

import math

import pytest
import torch
from helpers import assert_attention_close

import lean_tvm
from lean_tvm.reference import decode_attention_reference

pytest.importorskip("tvm")  # the CPU library is built on first use


def make(batch=2, hq=8, hkv=2, cache_len=100, head_dim=64, dtype=torch.float16, layout="bhld", seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, hkv, cache_len, head_dim) if layout == "bhld" else (batch, cache_len, hkv, head_dim)
    q = torch.randn(batch, hq, head_dim, generator=g).to(dtype)
    k = torch.randn(shape, generator=g).to(dtype)
    v = torch.randn(shape, generator=g).to(dtype)
    return q, k, v


def test_matches_float64_with_lse():
    q, k, v = make()
    lens = torch.tensor([100, 0], dtype=torch.int32)
    o, lse = lean_tvm.decode_attention(q, k, v, lens, return_lse=True)
    assert o.shape == q.shape and o.dtype == q.dtype and lse.dtype == torch.float32
    assert_attention_close(o, lse, *decode_attention_reference(q, k, v, [100, 0], 1 / 8), torch.float16)


def test_both_cache_layouts_agree_without_copies():
    q, k, v = make(layout="blhd", dtype=torch.bfloat16)
    o_blhd = lean_tvm.decode_attention(q, k, v, layout="blhd")
    o_bhld = lean_tvm.decode_attention(q, k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous())
    torch.testing.assert_close(o_blhd, o_bhld, atol=0, rtol=0)


def test_four_dim_query_out_and_scale():
    q, k, v = make()
    q4 = q.unsqueeze(1)
    out = torch.empty_like(q4)
    res = lean_tvm.decode_attention(q4, k, v, softmax_scale=0.3, out=out)
    assert res is out and out.shape == q4.shape
    ref, _ = decode_attention_reference(q, k, v, [100, 100], 0.3)
    torch.testing.assert_close(out[:, 0].double(), ref, atol=2e-3, rtol=1e-2)


def test_module_wrapper():
    q, k, v = make()
    mod = lean_tvm.LeanDecodeAttention(layout="bhld")
    torch.testing.assert_close(mod(q, k, v), lean_tvm.decode_attention(q, k, v), atol=0, rtol=0)


def test_torch_compile_fullgraph_traces_through_the_op():
    q, k, v = make()
    lens = torch.tensor([60, 7], dtype=torch.int32)

    def step(q, k, v, lens):
        return lean_tvm.decode_attention(q * 2, k, v, lens, check_lengths=False) + 1

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v, lens), step(q, k, v, lens), atol=0, rtol=0)


def test_custom_op_passes_torch_library_checks():
    q, k, v = make()
    lens = torch.tensor([60, 7], dtype=torch.int32)
    torch.library.opcheck(torch.ops.lean_tvm.decode_attention.default, (q, k, v, lens, 0.125),
                          test_utils=("test_schema", "test_faketensor"))


def _bad(**override):
    q, k, v = make()
    args = dict(q=q, k_cache=k, v_cache=v, cache_seqlens=torch.tensor([100, 3], dtype=torch.int32))
    args |= override
    return args


BAD = [
    ("q.dtype", TypeError, dict(q=torch.randn(2, 8, 64))),
    ("k_cache.dtype", TypeError, dict(k_cache=torch.randn(2, 2, 100, 64, dtype=torch.bfloat16))),
    ("head dim", ValueError, dict(q=torch.randn(2, 8, 96).half(), k_cache=torch.randn(2, 2, 100, 96).half(),
                                  v_cache=torch.randn(2, 2, 100, 96).half())),
    ("q heads", ValueError, dict(q=torch.randn(2, 6, 64).half(), k_cache=torch.randn(2, 4, 100, 64).half(),
                                 v_cache=torch.randn(2, 4, 100, 64).half())),
    ("Hq / Hkv", ValueError, dict(q=torch.randn(2, 32, 64).half(), k_cache=torch.randn(2, 1, 100, 64).half(),
                                  v_cache=torch.randn(2, 1, 100, 64).half())),
    ("stride(-1)", ValueError, dict(k_cache=torch.randn(2, 2, 64, 100).half().transpose(2, 3))),
    ("cache_seqlens", ValueError, dict(cache_seqlens=torch.tensor([101, 3], dtype=torch.int32))),
    ("cache_seqlens", ValueError, dict(cache_seqlens=torch.tensor([-1, 3], dtype=torch.int32))),
    ("cache_seqlens.dtype", TypeError, dict(cache_seqlens=torch.tensor([10, 3]))),
    ("cache_seqlens.shape", ValueError, dict(cache_seqlens=torch.tensor([10, 3, 4], dtype=torch.int32))),
    ("q.shape", ValueError, dict(q=torch.randn(2, 17, 8, 64).half())),
    ("q.shape", ValueError, dict(q=torch.randn(2, 8).half())),
    ("k_cache.shape[0]", ValueError, dict(k_cache=torch.randn(3, 2, 100, 64).half(),
                                          v_cache=torch.randn(3, 2, 100, 64).half())),
    ("k_cache/v_cache.shape", ValueError, dict(v_cache=torch.randn(2, 2, 99, 64).half())),
    ("q", ValueError, dict(q=torch.randn(2, 8, 64).half().requires_grad_())),
    ("q", TypeError, dict(q=[[1.0]])),
    ("softmax_scale", TypeError, dict(softmax_scale=float("nan"))),
    ("layout", ValueError, dict(layout="lbhd")),
    ("out", ValueError, dict(out=torch.empty(2, 8, 32).half())),
]


@pytest.mark.parametrize("arg,exc,override", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_is_rejected_naming_the_argument(arg, exc, override):
    with pytest.raises(exc, match=arg.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]").replace("/", r"/")):
        lean_tvm.decode_attention(**_bad(**override))


def test_a_repeated_call_signature_is_still_checked_every_call():
    q, k, v = make(seed=3)
    lens = torch.tensor([100, 3], dtype=torch.int32)
    first = lean_tvm.decode_attention(q, k, v, lens)  # the checks of this signature are now cached
    o, _ = lean_tvm.decode_attention(q, k, v, lens, return_lse=True)
    torch.testing.assert_close(o, first, atol=0, rtol=0)
    with pytest.raises(ValueError, match="cache_seqlens"):
        lean_tvm.decode_attention(q, k, v, torch.tensor([101, 3], dtype=torch.int32))
    with pytest.raises(TypeError, match="softmax_scale"):
        lean_tvm.decode_attention(q, k, v, lens, softmax_scale=float("inf"))
    q.requires_grad_()
    with pytest.raises(ValueError, match="q"):
        lean_tvm.decode_attention(q, k, v, lens)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_mixed_devices_are_rejected():
    q, k, v = make()
    with pytest.raises(ValueError, match="k_cache.device"):
        lean_tvm.decode_attention(q.cuda(), k, v)


def test_scale_defaults_to_inverse_sqrt_head_dim():
    q, k, v = make(head_dim=128)
    torch.testing.assert_close(lean_tvm.decode_attention(q, k, v),
                               lean_tvm.decode_attention(q, k, v, softmax_scale=1 / math.sqrt(128)), atol=0, rtol=0)


def test_an_empty_batch_returns_empty_tensors():
    q, k, v = make()
    o, lse = lean_tvm.decode_attention(q[:0], k[:0], v[:0], torch.zeros(0, dtype=torch.int32), return_lse=True)
    assert o.shape == (0, 8, 64) and lse.shape == (0, 8) and o.dtype == q.dtype
    assert lean_tvm.decode_attention(q[:0].unsqueeze(1), k[:0], v[:0]).shape == (0, 1, 8, 64)


def test_default_length_checks_never_wait_for_the_gpu(monkeypatch):
    """The default checks lengths already on the CPU, never ones on a GPU (that would be a
    device-to-host copy) unless LEAN_TVM_CHECK=1; True and False are honoured as given."""
    from lean_tvm import checks

    on_gpu = torch.empty(2, dtype=torch.int32, device="meta")  # stands in for a CUDA tensor
    on_cpu = torch.zeros(2, dtype=torch.int32)
    monkeypatch.delenv("LEAN_TVM_CHECK", raising=False)
    assert checks.checks_lengths(None, on_cpu) and not checks.checks_lengths(None, on_gpu)
    assert checks.checks_lengths(True, on_gpu) and not checks.checks_lengths(False, on_cpu)
    monkeypatch.setenv("LEAN_TVM_CHECK", "1")
    assert checks.checks_lengths(None, on_gpu)


def test_unchecked_lengths_past_the_cache_are_clamped():
    q, k, v = make()
    long = torch.tensor([500, 3], dtype=torch.int32)
    o = lean_tvm.decode_attention(q, k, v, long, check_lengths=False)
    torch.testing.assert_close(o, lean_tvm.decode_attention(q, k, v, long.clamp(max=100)), atol=0, rtol=0)
