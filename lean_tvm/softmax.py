"""Conventions of the online-softmax state that every attention form shares (pure constants).

The kernels keep the running state (m, l, acc) in the log2 domain: scores are scaled by
``softmax_scale * LOG2E`` so that every exponential is one ``exp2``. The log-sum-exp they
write is converted by an :class:`LseConvention`: natural log with -inf for an empty row (the
PyTorch API and Relax), or TVM's paged-kernel convention (log2 units, -5e4 when empty).
"""

from __future__ import annotations

import dataclasses
import math

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
NEG_INF = float("-inf")
FLT_MAX = 3.4028234663852886e38


@dataclasses.dataclass(frozen=True)
class LseConvention:
    unit: float  # the lse output = (m + log2 l) * unit
    empty: float  # the lse of a row with no visible key


LSE_NATURAL = LseConvention(LN2, NEG_INF)
LSE_TVM = LseConvention(1.0, -5e4)


def lse_natural_from_tvm(lse_log2):
    """TVM's convention -> natural log with -inf for empty rows (a torch tensor)."""
    import torch

    return torch.where(lse_log2 == LSE_TVM.empty, -math.inf, lse_log2 / math.log2(math.e))
