"""The rows each sequence attends, in the form the mask function hands to the attention function.

transformers passes a prepared 4-d mask through its model code untouched (a 2-d one it would expand),
so the mask function returns the rows as a 4-d int32 tensor that no transformers mask function
makes: ``bounds`` [1, 1, R, B] with row 0 the valid lengths (``cache_seqlens``: new tokens
included) and, when the model got a padding mask, row 1 the first valid row of each sequence
(``cache_leftpad``). Each row is a contiguous [B] view, what ``lean_tvm.decode_attention`` takes.
Everything here runs on the device: no value is read on the host.
"""

from __future__ import annotations

import torch


def row_bounds(ends: torch.Tensor, starts: torch.Tensor | None) -> torch.Tensor:
    """ends, starts: int32 [B] (any strides) -> bounds int32 [1, 1, R, B], contiguous (R = 2 with
    starts, else 1)."""
    rows = torch.stack((ends,) if starts is None else (ends, starts))
    return rows.view(1, 1, *rows.shape)


def is_row_bounds(mask) -> bool:
    """Whether a mask the attention function got is row bounds (metadata only: traced as a constant)."""
    return isinstance(mask, torch.Tensor) and mask.dtype == torch.int32 and mask.dim() == 4 and \
        mask.shape[:2] == (1, 1) and mask.shape[2] in (1, 2)


def lengths_and_starts(bounds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(cache_seqlens int32 [B], cache_leftpad int32 [B] or None): views of ``bounds`` (one unbind:
    this runs in every layer of every step, and two indexings cost twice as much on the host)."""
    rows = bounds.view(bounds.shape[2], -1).unbind(0)
    return rows[0], (rows[1] if len(rows) == 2 else None)


def boolean_mask(bounds: torch.Tensor, q_len: int, kv_len: int) -> torch.Tensor:
    """The SDPA mask of the same rows, bool [B, 1, q_len, kv_len]: query i of sequence b sees keys
    [start_b, end_b - q_len + 1 + i) (the new tokens are the last q_len rows before end_b)."""
    ends, starts = lengths_and_starts(bounds)
    keys = torch.arange(kv_len, device=bounds.device)
    last = ends.view(-1, 1, 1) - q_len + torch.arange(q_len, device=bounds.device).view(1, -1, 1)  # [B, q, 1]
    mask = keys.view(1, 1, -1) <= last
    if starts is not None:
        mask = mask & (keys.view(1, 1, -1) >= starts.view(-1, 1, 1))
    return mask.unsqueeze(1)


def left_padding(padding_mask: torch.Tensor) -> torch.Tensor:
    """padding_mask bool [B, T] (True: a token) -> int32 [B], the padding before each sequence's first
    token: its first valid row when the padding is on the left (as ``generate`` pads a batch)."""
    return (padding_mask.cumsum(-1) == 0).sum(-1, dtype=torch.int32)


def is_left_padding(padding_mask: torch.Tensor) -> torch.Tensor:
    """bool []: no sequence has padding after its first token (reads all of the mask)."""
    tokens = padding_mask.sum(-1, dtype=torch.int32)
    return (tokens == padding_mask.shape[-1] - left_padding(padding_mask)).all()
