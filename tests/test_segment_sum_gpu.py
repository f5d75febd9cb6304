"""On the GPU (marked ``gpu``, skipped without CUDA): the stream-K rule's CUDA form of the third
operator (``segment_sum.py``, no macros of its own) against float64 numpy.

Needs its library, built on any machine with nvcc (no GPU, needs apache-tvm):
``python tests/segment_sum.py build --arch sm_90a --out build/segment_sum``; then on the GPU
machine (torch + tvm-ffi only): ``LEAN_TVM_SEGMENT_SUM_DIR=build/segment_sum python -m pytest -m gpu
tests/test_segment_sum_gpu.py``.
"""

import os

import numpy as np
import pytest
import torch
from segment_sum import Library, reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CASES = [  # (B, H, L, D, dtype, lengths, workers, splits)
    (1, 1, 1, 128, torch.float16, [1], 8, 0),
    (1, 1, 100_000, 128, torch.float16, [100_000], 132, 0),  # one tile split over every SM
    (4, 3, 5000, 128, torch.float16, [5000, 0, 1, 4097], 132, 0),
    (8, 8, 4096, 64, torch.bfloat16, [4096, 17, 0, 1000, 64, 65, 4095, 3], 264, 0),
    (3, 2, 3000, 256, torch.float16, [3000, 2999, 12], 50, 0),
    (5, 4, 2048, 64, torch.bfloat16, [2048, 7, 0, 300, 5000], 132, 0),  # a length past the cache
    (4, 3, 5000, 128, torch.float16, [5000, 0, 1, 4097], 48, 4),  # fixed split
]


@pytest.fixture(scope="module")
def lib():
    return Library(os.environ.get("LEAN_TVM_SEGMENT_SUM_DIR", "build/segment_sum"))


@pytest.mark.parametrize("b,h,length,d,dtype,lens,workers,splits", CASES)
def test_segment_sum_matches_float64(lib, b, h, length, d, dtype, lens, workers, splits):
    gen = torch.Generator().manual_seed(b * length + d)
    w = torch.randn(b, h, length, generator=gen).cuda()
    x = torch.randn(b, h, length, d, generator=gen).to(dtype).cuda()
    lens_t = torch.tensor(lens, dtype=torch.int32, device="cuda")
    y = torch.full((b, h, d), float("nan"), device="cuda")
    flags = lib.run(w, x, lens_t, y, workers, splits)
    want = reference(w, x, lens)
    scale = np.abs(want).max() + 1
    np.testing.assert_allclose(y.cpu().double().numpy(), want, rtol=1e-4, atol=1e-5 * scale)
    assert (flags == 0).all()  # the reducers reset every flag they consumed: the next launch can reuse them
    y2 = torch.full_like(y, float("nan"))
    lib.run(w, x, lens_t, y2, workers, splits, flags=flags)
    assert torch.equal(y, y2)  # deterministic: the plan fixes every partial and its merge order
