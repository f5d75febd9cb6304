"""The split-K GEMV on the stream-K primitive (its second operator): CPU form against numpy."""

import numpy as np
import pytest
import torch

from lean_tvm import runtime

pytest.importorskip("tvm")

CASES = [  # (N, K, workers, splits)
    (40, 3000, 7, 0),
    (16, 1024, 132, 0),
    (100, 5000, None, 3),
    (8, 8, 4, 0),
    (33, 12288, 20, 0),
    (64, 4096, None, 1),
]


@pytest.mark.parametrize("n,k,workers,splits", CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_stream_k_gemv_matches_numpy(n, k, workers, splits, dtype):
    g = torch.Generator().manual_seed(n * k)
    w = torch.randn(n, k, generator=g).to(dtype)
    x = torch.randn(k, generator=g).to(dtype)
    y = torch.full((n,), float("nan"), dtype=dtype)
    runtime.launch_gemv(w, x, y, num_splits=splits, num_ctas=workers)
    ref = w.double().numpy() @ x.double().numpy()
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    np.testing.assert_allclose(y.double().numpy(), ref, atol=tol * np.abs(ref).max(), rtol=0)


@pytest.mark.parametrize("w,x,y,exc", [
    (torch.randn(16, 64), torch.randn(64), torch.empty(16), TypeError),
    (torch.randn(16, 64).half(), torch.randn(64).bfloat16(), torch.empty(16).half(), TypeError),
    (torch.randn(16, 60).half(), torch.randn(60).half(), torch.empty(16).half(), ValueError),
    (torch.randn(16, 64).half(), torch.randn(32).half(), torch.empty(16).half(), ValueError),
    (torch.randn(64, 16).half().t(), torch.randn(64).half(), torch.empty(16).half(), ValueError),
])
def test_bad_gemv_arguments_are_rejected(w, x, y, exc):
    with pytest.raises(exc):
        runtime.launch_gemv(w, x, y)
