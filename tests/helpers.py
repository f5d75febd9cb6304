"""Test helpers: tolerances by dtype, the attention comparison, the CUDA skip."""

import pytest
import torch

TOLERANCES = {  # output vs float64: P is rounded to the input dtype for the second product
    torch.float16: dict(atol=2e-3, rtol=1e-2),
    torch.bfloat16: dict(atol=1.5e-2, rtol=2e-2),
}
LSE_TOL = dict(atol=2e-3, rtol=1e-4)

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def assert_attention_close(o, lse, ref_o, ref_lse, dtype):
    """Within the dtype's tolerance; empty sequences exactly (o == 0, lse == -inf); no NaN."""
    assert not torch.isnan(o).any() and not torch.isnan(lse).any()
    empty = torch.isinf(ref_lse)
    torch.testing.assert_close(o.double(), ref_o, **TOLERANCES[dtype])
    assert (lse[empty] == float("-inf")).all() and (o.double()[empty] == 0).all()
    torch.testing.assert_close(lse.double()[~empty], ref_lse[~empty], **LSE_TOL)
