"""Test fixtures for TVM's paged KV cache, shared by the CPU tests and the GPU check
(``scripts/paged_gpu.py``): torch and tvm-ffi only, the GPU machine has no TVM compiler.

* :func:`random_paged_cache` -- a page table with shuffled pages (and pages nobody owns) over
  ``pages [P, 2, Hkv, page_size, D]``, TIRPagedKVCache's layout;
* :func:`dense_from_pages` -- the same K/V as [B, Hkv, L, D] for the float64 reference;
* :func:`kv_cache_decode` -- TVM's KV cache runtime: add sequences, prefill, one decode step.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class PagedCase:
    q: torch.Tensor  # [B, Hq, D]
    pages: torch.Tensor  # [P, 2, Hkv, page_size, D]
    indptr: torch.Tensor  # int32 [B + 1]
    values: torch.Tensor  # int32 [nnz]
    last_len: torch.Tensor  # int32 [B]
    lens: list[int]

    @property
    def page_size(self) -> int:
        return self.pages.shape[3]

    def args(self) -> tuple:
        """The kernel's leading arguments, up to (not including) output and lse."""
        zeros = torch.zeros_like(self.last_len)
        return self.q, self.pages, self.indptr, self.values, self.last_len, zeros, zeros


def random_paged_cache(lens, hq: int, hkv: int, head_dim: int, page_size: int = 16, dtype=torch.float16,
                       device="cpu", seed: int = 0, spare_pages: int = 3) -> PagedCase:
    g = torch.Generator().manual_seed(seed)
    npages = [-(-n // page_size) for n in lens]
    total = sum(npages) + spare_pages
    perm = torch.randperm(total, generator=g).to(torch.int32)
    indptr = torch.tensor([0, *torch.tensor(npages).cumsum(0).tolist()], dtype=torch.int32)
    values = perm[: int(indptr[-1])].contiguous()
    last = torch.tensor([n - (p - 1) * page_size if p else 0 for n, p in zip(lens, npages, strict=True)],
                        dtype=torch.int32)
    pages = torch.randn(total, 2, hkv, page_size, head_dim, generator=g).to(dtype)
    q = torch.randn(len(lens), hq, head_dim, generator=g).to(dtype)
    return PagedCase(*(t.to(device) for t in (q, pages, indptr, values, last)), lens=list(lens))


def dense_from_pages(case: PagedCase) -> tuple[torch.Tensor, torch.Tensor]:
    """K, V as [B, Hkv, max(lens), D] (zero past each length)."""
    ps, (_, _, hkv, _, d) = case.page_size, case.pages.shape
    width = max(max(case.lens), 1)
    k = torch.zeros(len(case.lens), hkv, width, d, dtype=case.pages.dtype, device=case.pages.device)
    v = torch.zeros_like(k)
    indptr, values = case.indptr.tolist(), case.values.long()
    for b, n in enumerate(case.lens):
        if n == 0:
            continue
        rows = torch.arange(n, device=values.device)
        page = values[indptr[b] + rows // ps]
        k[b, :, :n] = case.pages[page, 0, :, rows % ps].transpose(0, 1)
        v[b, :, :n] = case.pages[page, 1, :, rows % ps].transpose(0, 1)
    return k, v


def kv_cache_decode(create, lens, qkv_prefill, qkv_decode, hq: int, softmax_scale: float):
    """Run TVM's KV cache runtime (``create``: the compiled module's "create" function): add one
    sequence per length, append the prefill tokens, then one decode step. Returns the decode
    step's attention output [B, Hq, D]."""
    import tvm_ffi

    fn = {n: tvm_ffi.get_global_func("vm.builtin." + n) for n in (
        "kv_state_add_sequence", "kv_state_begin_forward", "kv_state_end_forward",
        "attention_kv_cache_attention_with_fused_qkv")}
    kv = create()
    seqs = tvm_ffi.Shape(list(range(len(lens))))
    for s in range(len(lens)):
        fn["kv_state_add_sequence"](kv, s)
    for qkv, append in ((qkv_prefill, lens), (qkv_decode, [1] * len(lens))):
        fn["kv_state_begin_forward"](kv, seqs, tvm_ffi.Shape(list(append)))
        out = torch.zeros(qkv.shape[0], hq, qkv.shape[2], dtype=qkv.dtype, device=qkv.device)
        fn["attention_kv_cache_attention_with_fused_qkv"](kv, 0, softmax_scale, qkv, out)
        fn["kv_state_end_forward"](kv)
    return out


def dense_from_fused_qkv(lens, qkv_prefill, qkv_decode, hq: int, hkv: int):
    """K, V [B, Hkv, max(lens) + 1, D] of the cache after :func:`kv_cache_decode`."""
    d = qkv_prefill.shape[2]
    k = torch.zeros(len(lens), hkv, max(lens) + 1, d, dtype=qkv_prefill.dtype, device=qkv_prefill.device)
    v = torch.zeros_like(k)
    off = 0
    for b, n in enumerate(lens):
        k[b, :, :n] = qkv_prefill[off:off + n, hq:hq + hkv].transpose(0, 1)
        v[b, :, :n] = qkv_prefill[off:off + n, hq + hkv:].transpose(0, 1)
        k[b, :, n], v[b, :, n] = qkv_decode[b, hq:hq + hkv], qkv_decode[b, hq + hkv:]
        off += n
    return k, v
