"""On the GPU (marked ``gpu``, skipped without CUDA): the built CUDA library against float64 and
torch SDPA, determinism, CUDA graphs with lengths changed in place, torch.compile, the GEMV.

Run on the GPU machine with the library built by ``python -m lean_tvm.build`` on any machine:
``LEAN_TVM_LIB_DIR=build/sm_90a python -m pytest -m gpu tests/test_gpu.py``.
"""

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_attention_close

import lean_tvm
from lean_tvm import runtime
from lean_tvm.reference import decode_attention_reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
F16, BF16 = torch.float16, torch.bfloat16
KV_BYTES_CAP = 12 << 30  # the float64 reference must fit next to the cache


def make(batch, hq, hkv, head_dim, lens, dtype, layout="bhld", qscale=1.0, seed=0):
    torch.manual_seed(seed)
    cache_len = max(max(lens), 1)
    shape = (batch, hkv, cache_len, head_dim) if layout == "bhld" else (batch, cache_len, hkv, head_dim)
    k = torch.randn(shape, device="cuda", dtype=dtype)
    v = torch.randn(shape, device="cuda", dtype=dtype)
    q = (torch.randn(batch, hq, head_dim, device="cuda") * qscale).to(dtype)
    return q, k, v, torch.tensor(lens, dtype=torch.int32, device="cuda")


GRID = [  # (B, Hq, Hkv, D, lengths, dtype)
    (1, 32, 8, 128, [1], F16),
    (1, 32, 8, 128, [4096], F16),
    (1, 32, 8, 128, [32768], BF16),
    (1, 32, 8, 128, [262144], F16),
    (1, 64, 8, 128, [131072], BF16),
    (2, 32, 32, 128, [16384, 3], F16),
    (4, 8, 1, 128, [65536, 0, 1, 4097], F16),
    (3, 32, 8, 64, [70000, 2, 513], BF16),
    (3, 32, 8, 256, [40000, 0, 1000], F16),
    (2, 16, 2, 256, [8192, 8191], BF16),
    (16, 32, 8, 128, [131072] + [2048] * 15, F16),
    (16, 64, 8, 128, [65536, 65536] + [512] * 14, BF16),
    (8, 64, 4, 128, [3000, 1, 0, 17, 999, 4096, 2, 64], F16),
    (16, 32, 8, 64, [1, 2, 3, 0, 5, 6, 7, 8, 100, 200, 300, 400, 1000, 2000, 3000, 4000], BF16),
    (40, 32, 8, 128, [9000, 0, 1, 17] + [300 + 97 * i for i in range(36)], F16),  # 320 tiles: the batch variant
    (32, 64, 4, 128, [5000] * 2 + [700] * 30, BF16),  # G 16, 128 tiles
    (80, 16, 4, 128, [2048] * 80, F16),  # 320 tiles of G 4, uniform
]


@pytest.mark.parametrize("batch,hq,hkv,head_dim,lens,dtype", GRID)
def test_lean_attention_matches_float64(batch, hq, hkv, head_dim, lens, dtype):
    assert 2 * batch * hkv * max(lens) * head_dim * 2 < KV_BYTES_CAP
    q, k, v, lens_t = make(batch, hq, hkv, head_dim, lens, dtype)
    o, lse = lean_tvm.decode_attention(q, k, v, lens_t, return_lse=True)
    assert_attention_close(o, lse, *decode_attention_reference(q, k, v, lens, 1 / math.sqrt(head_dim)), dtype)


@pytest.mark.parametrize("splits", [1, 3, 16])
def test_fixed_split_and_no_split_match_float64(splits):
    q, k, v, lens_t = make(4, 32, 8, 128, [9000, 0, 1, 300], F16)
    o = torch.empty_like(q)
    lse = torch.empty(4, 32, device="cuda")
    runtime.launch_attention(q, k, v, lens_t, o, lse, 1 / math.sqrt(128), num_splits=splits)
    assert_attention_close(o, lse, *decode_attention_reference(q, k, v, [9000, 0, 1, 300], 1 / math.sqrt(128)), F16)


@pytest.mark.parametrize("ctas", [1, 7, 64])
def test_fewer_ctas_than_sms(ctas):
    q, k, v, lens_t = make(2, 32, 8, 128, [20000, 5], BF16)
    o = torch.empty_like(q)
    lse = torch.empty(2, 32, device="cuda")
    runtime.launch_attention(q, k, v, lens_t, o, lse, 0.1, num_ctas=ctas)
    assert_attention_close(o, lse, *decode_attention_reference(q, k, v, [20000, 5], 0.1), BF16)


@pytest.mark.parametrize("layout", ["bhld", "blhd"])
@pytest.mark.parametrize("dtype", [F16, BF16])
def test_matches_torch_sdpa_in_both_layouts(layout, dtype):
    q, k, v, _ = make(4, 32, 8, 128, [8192] * 4, dtype, layout=layout)
    o = lean_tvm.decode_attention(q, k, v, layout=layout)
    kb, vb = (k, v) if layout == "bhld" else (k.transpose(1, 2), v.transpose(1, 2))
    ref = F.scaled_dot_product_attention(q[:, :, None].float(), kb.float(), vb.float(), enable_gqa=True)[:, :, 0]
    torch.testing.assert_close(o.float(), ref, atol=4e-3 if dtype == F16 else 2e-2, rtol=2e-2)


def test_large_logits():
    q, k, v, lens_t = make(2, 32, 8, 128, [50000, 7], F16, qscale=30.0)
    o, lse = lean_tvm.decode_attention(q, k, v, lens_t, return_lse=True)
    ref_o, ref_lse = decode_attention_reference(q, k, v, [50000, 7], 1 / math.sqrt(128))
    assert torch.isfinite(o).all() and torch.isfinite(lse).all()
    torch.testing.assert_close(o.double(), ref_o, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-2, rtol=1e-4)


def test_bitwise_deterministic_over_ten_runs():
    q, k, v, lens_t = make(16, 32, 8, 128, [131072] + [2048] * 15, BF16)
    first = lean_tvm.decode_attention(q, k, v, lens_t, return_lse=True, check_lengths=False)
    for _ in range(9):
        again = lean_tvm.decode_attention(q, k, v, lens_t, return_lse=True, check_lengths=False)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_cuda_graph_replay_follows_lengths_changed_in_place():
    q, k, v, lens_t = make(4, 32, 8, 128, [4096, 100, 2000, 0], F16)
    out = torch.empty_like(q)
    lean_tvm.decode_attention(q, k, v, lens_t, out=out, check_lengths=False)  # warm-up: workspace, library
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        lean_tvm.decode_attention(q, k, v, lens_t, out=out, check_lengths=False)
    for lens in ([4096, 100, 2000, 0], [1, 4096, 0, 33], [2048, 2048, 2048, 4096], [0, 0, 0, 1]):
        lens_t.copy_(torch.tensor(lens, dtype=torch.int32))
        q.normal_()
        graph.replay()
        torch.cuda.synchronize()
        ref, _ = decode_attention_reference(q, k, v, lens, 1 / math.sqrt(128))
        torch.testing.assert_close(out.double(), ref, atol=2e-3, rtol=1e-2)


def test_torch_compile_fullgraph_with_inductor():
    q, k, v, lens_t = make(2, 32, 8, 128, [3000, 17], BF16)

    def step(q, k, v, lens):
        return lean_tvm.decode_attention(q * 1.5, k, v, lens, check_lengths=False).float().sum(-1)

    compiled = torch.compile(step, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, lens_t), step(q, k, v, lens_t), atol=1e-2, rtol=1e-3)


def test_lengths_past_the_cache_are_rejected_when_checks_are_asked_for(monkeypatch):
    q, k, v, _ = make(2, 32, 8, 128, [100, 100], F16)
    long = torch.tensor([101, 3], dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match="cache_seqlens"):
        lean_tvm.decode_attention(q, k, v, long, check_lengths=True)
    monkeypatch.setenv("LEAN_TVM_CHECK", "1")
    with pytest.raises(ValueError, match="cache_seqlens"):
        lean_tvm.decode_attention(q, k, v, long)
    monkeypatch.delenv("LEAN_TVM_CHECK")
    clamped = lean_tvm.decode_attention(q, k, v, long)  # unchecked: the kernel clamps to the cache
    torch.testing.assert_close(clamped, lean_tvm.decode_attention(q, k, v, long.clamp(max=100)), atol=0, rtol=0)
    with pytest.raises(ValueError, match="device"):
        lean_tvm.decode_attention(q, k.cpu(), v.cpu())


def test_the_default_call_never_synchronizes():
    q, k, v, lens = make(3, 32, 8, 128, [4096, 17, 0], F16)
    out = lean_tvm.decode_attention(q, k, v, lens)  # first call: library, workspace
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing call now raises
    try:
        for layout_k, layout_v, layout in ((k, v, "bhld"), (k.transpose(1, 2), v.transpose(1, 2), "blhd")):
            again = lean_tvm.decode_attention(q, layout_k, layout_v, lens, layout=layout)
            again, lse = lean_tvm.decode_attention(q, layout_k, layout_v, lens, layout=layout, return_lse=True)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.testing.assert_close(again, out, atol=0, rtol=0)


def test_an_empty_batch_returns_empty_tensors():
    q, k, v, lens = make(1, 32, 8, 128, [16], F16)
    o, lse = lean_tvm.decode_attention(q[:0], k[:0], v[:0], lens[:0], return_lse=True)
    assert o.shape == (0, 32, 128) and lse.shape == (0, 32) and o.device.type == "cuda"


@pytest.mark.parametrize("dtype", [F16, BF16])
@pytest.mark.parametrize("n,k,splits", [(16, 8192, 0), (40, 131072, 0), (4096, 4096, 0), (100, 5000, 3)])
def test_stream_k_gemv_matches_float64(n, k, splits, dtype):
    torch.manual_seed(n + k)
    w = torch.randn(n, k, device="cuda", dtype=dtype)
    x = torch.randn(k, device="cuda", dtype=dtype)
    y = torch.full((n,), float("nan"), device="cuda", dtype=dtype)
    runtime.launch_gemv(w, x, y, num_splits=splits)
    ref = w.double() @ x.double()
    tol = (1e-2 if dtype == BF16 else 2e-3) * ref.abs().max().item()
    torch.testing.assert_close(y.double(), ref, atol=tol, rtol=0)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELAX_GPU_DIR = os.environ.get("RELAX_GPU_DIR", os.path.join(REPO, "build", "relax_gpu"))


@pytest.mark.skipif(not os.path.exists(os.path.join(RELAX_GPU_DIR, "manifest.json")),
                    reason="needs the paged-cache artifacts: python scripts/build_relax_gpu.py")
def test_paged_decode_matches_tvms_kernel_and_float64():
    """LeanAttention in TIRPagedKVCache's form (CUDA) against float64 and TVM's own paged decode
    kernel (ragged, empty, one long sequence), and inside TVM's KV cache runtime: the checks of
    scripts/paged_gpu.py, which runs in a process of its own (runtime-only TVM)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.join(RELAX_GPU_DIR, "site"), RELAX_GPU_DIR, REPO, os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "paged_gpu.py")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    assert "OK paged_gpu" in res.stdout and res.stdout.count("[check]") >= 8
