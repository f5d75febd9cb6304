"""lean_tvm: LeanAttention decode attention as a compiler-scheduled (TVM) stream-K operator.

The run half (this namespace) needs torch and tvm-ffi only; building kernels (``lean_tvm.build``,
``lean_tvm.attention``) needs apache-tvm and, for GPUs, nvcc.
"""

from .plan import fixed_split_plan, make_plan, no_split_plan, stream_k_plan
from .torch_ops import LeanDecodeAttention, decode_attention

__all__ = [
    "LeanDecodeAttention",
    "decode_attention",
    "fixed_split_plan",
    "make_plan",
    "no_split_plan",
    "stream_k_plan",
]
__version__ = "0.1.0"
