"""Context-parallel decode attention: the KV cache sharded along the sequence across ranks.

Each rank holds one piece of every sequence's KV rows, runs LeanAttention on it with its LSE, and
the partial states ``(o, lse)`` of all ranks are joined with the same LSE merge that joins CTAs
inside one GPU (``merge.merge_states``). Attention does not care which rows a rank holds, only that
the pieces are disjoint and cover the sequence: ``shard_bounds`` gives the usual contiguous split,
but any split (say, a different one per sequence for ragged batches) works.

Communication is one collective of ``B * Hq * (D * itemsize + 4)`` bytes per rank: an all-gather
(every rank gets the output) or, with ``dst``, a gather to the rank that needs it. The gathered
states are merged in rank order, so the result is as reproducible as the local operator (bitwise)
and, after an all-gather, bitwise equal on every rank. NCCL on GPUs, gloo on CPU (the backend of the process group).

Every rank must call ``context_parallel_decode_attention`` with the same q (same values, shape and
dtype), head counts, head dim and ``softmax_scale``; the caches may have different capacities. That
is not checked (it would cost another collective): mismatched shapes make the collective fail or hang,
and so does an argument error raised on some ranks only (the others wait in the collective).

Importing this module sets NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and
NVSHMEM_DISABLE_NVLS=1 unless already set (NVLink multicast off); NCCL reads them when a
communicator is created, so import it before ``torch.distributed.init_process_group``.
"""

from __future__ import annotations

import os

for _name, _value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
                      ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ.setdefault(_name, _value)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from .merge import merge_states  # noqa: E402
from .spec import LAYOUTS  # noqa: E402
from .torch_ops import decode_attention  # noqa: E402

__all__ = ["context_parallel_decode_attention", "shard_bounds", "shard_cache", "shard_capacity"]


# torch >= 2.13 renames all_gather_into_tensor (the concatenated form works on NCCL and gloo alike)
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _lengths_tensor(seq_lens) -> torch.Tensor:
    lens = torch.as_tensor(seq_lens)
    if lens.numel() and (lens.is_floating_point() or lens.is_complex() or lens.dtype == torch.bool or (lens < 0).any()):
        raise ValueError(f"seq_lens: expected non-negative integer lengths, got {seq_lens!r}")
    return lens.to(torch.int64).reshape(-1)


def _check_world(world_size: int, rank: int) -> None:
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size: expected a positive int, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank: expected an int in [0, {world_size}), got {rank!r}")


def shard_bounds(seq_lens, world_size: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's contiguous piece of every sequence: rows [offset, offset + length).

    seq_lens: B lengths (a sequence or a tensor). Rank r holds rows [n r / W, n (r + 1) / W)
    (floored) of a sequence of n rows: pieces differ by at most one row, ranks come in sequence
    order, and a sequence shorter than W leaves some ranks with 0 rows. Returns (lengths int32 [B],
    offsets int64 [B]) on seq_lens' device (CPU for a list)."""
    _check_world(world_size, rank)
    lens = _lengths_tensor(seq_lens)
    start = lens * rank // world_size
    stop = lens * (rank + 1) // world_size
    return (stop - start).to(torch.int32), start


def shard_capacity(seq_lens, world_size: int) -> int:
    """Rows of a local cache that holds any rank's piece of every sequence: ceil(max n / W), at
    least 1 (no zero-size cache tensors). The same on every rank."""
    _check_world(world_size, 0)
    lens = _lengths_tensor(seq_lens)
    longest = int(lens.max()) if lens.numel() else 0
    return max(1, -(-longest // world_size))


def shard_cache(cache: torch.Tensor, seq_lens, world_size: int, rank: int, *,
                layout: str = "bhld") -> tuple[torch.Tensor, torch.Tensor]:
    """Copy this rank's piece of a full cache (for tests and benchmarks; a serving system writes
    its shard directly). cache: [B, Hkv, L, D] (``bhld``) or [B, L, Hkv, D] (``blhd``); returns
    (shard in the same layout with ``shard_capacity`` rows, contiguous; its lengths int32 [B]).
    Rows past a piece's length are zero."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    seq_dim = 2 if layout == "bhld" else 1
    lens_full = _lengths_tensor(seq_lens)
    if cache.dim() != 4 or lens_full.shape != (cache.shape[0],):
        raise ValueError(f"cache/seq_lens: expected a 4-d cache and one length per sequence, got "
                         f"{tuple(cache.shape)} and {tuple(lens_full.shape)}")
    if lens_full.numel() and int(lens_full.max()) > cache.shape[seq_dim]:
        raise ValueError(f"seq_lens: expected lengths <= the cache length {cache.shape[seq_dim]}, "
                         f"got {lens_full.tolist()}")
    lens, offsets = shard_bounds(lens_full, world_size, rank)
    shape = list(cache.shape)
    shape[seq_dim] = shard_capacity(lens_full, world_size)
    shard = cache.new_zeros(shape)
    for b, (n, off) in enumerate(zip(lens.tolist(), offsets.tolist(), strict=True)):
        shard[b].narrow(seq_dim - 1, 0, n).copy_(cache[b].narrow(seq_dim - 1, off, n))
    return shard, lens.to(cache.device)


def _group_size(group) -> int:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("context_parallel_decode_attention: torch.distributed is not initialised; call "
                           "torch.distributed.init_process_group (NCCL for CUDA tensors, gloo for CPU) first")
    if dist.get_rank(group) < 0:
        raise ValueError("group: this process is not a member of the process group")
    return dist.get_world_size(group)


def context_parallel_decode_attention(q: torch.Tensor, k_shard: torch.Tensor, v_shard: torch.Tensor,
                                      shard_seqlens: torch.Tensor | None, *, group=None,
                                      softmax_scale: float | None = None, return_lse: bool = False,
                                      layout: str = "bhld", dst: int | None = None,
                                      check_lengths: bool = True):
    """Decode attention over a KV cache sharded along the sequence across the ranks of ``group``.

    A collective: every rank of ``group`` calls it with the same q and its own shard. q, k_shard,
    v_shard, shard_seqlens, softmax_scale, layout and check_lengths are as in ``decode_attention``,
    for this rank's piece (shard_seqlens may be 0, a rank may hold no rows of a sequence).
    ``dst`` (a global rank, like ``torch.distributed.gather``'s): only that rank gets the result,
    the others get None (``(None, None)`` with ``return_lse``); default: every rank gets it.
    Returns out (q's shape and dtype) and with ``return_lse`` also lse [B, Hq] float32 over the
    whole sequence: -inf and a zero output for a sequence empty on every rank."""
    world = _group_size(group)
    if dist.get_backend(group) == "nccl" and q.device.type != "cuda":
        raise ValueError(f"q.device: expected CUDA tensors for an NCCL process group, got {q.device} "
                         "(CPU tensors need a gloo group)")
    if dst is not None:
        members = range(world) if group is None else dist.get_process_group_ranks(group)
        if dst not in members:
            raise ValueError(f"dst: expected a global rank of the group ({list(members)}), got {dst!r}")
    o, lse = decode_attention(q, k_shard, v_shard, shard_seqlens, softmax_scale=softmax_scale, return_lse=True,
                              layout=layout, check_lengths=check_lengths)
    packed = _pack(o, lse)
    if dst is None:
        parts = packed.new_empty(world * packed.numel())
        _all_gather_single(parts, packed, group=group)  # one flat buffer: no copies on NCCL
        parts = parts.view(world, -1)
    else:
        parts = packed.new_empty((world, packed.numel())) if dist.get_rank() == dst else None
        dist.gather(packed, None if parts is None else list(parts.unbind(0)), dst=dst, group=group)
        if parts is None:
            return (None, None) if return_lse else None
    o_parts, lse_parts = _unpack(parts, o, lse)
    o_all, lse_all = merge_states(o_parts, lse_parts)  # in rank order: deterministic
    o_all = o_all.reshape(o.shape)
    return (o_all, lse_all) if return_lse else o_all


def _pack(o: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """One message per rank: o's bytes (q's dtype, exact) then lse's (fp32), as uint8."""
    return torch.cat([o.contiguous().view(-1).view(torch.uint8), lse.contiguous().view(-1).view(torch.uint8)])


def _unpack(parts: torch.Tensor, o: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[W, bytes] -> o parts [W, B, Hq, D] (o's dtype), lse parts [W, B, Hq] fp32."""
    world, o_bytes = parts.shape[0], o.numel() * o.element_size()
    batch, hq = lse.shape
    o_parts = parts[:, :o_bytes].contiguous().view(o.dtype).view(world, batch, hq, -1)
    lse_parts = parts[:, o_bytes:].contiguous().view(torch.float32).view(world, batch, hq)
    return o_parts, lse_parts
