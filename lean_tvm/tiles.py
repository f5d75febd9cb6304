"""The paged form's tiles: which query rows a tile holds (TIR expressions shared by the CPU and
GPU kernels, ``attention_cpu.make_cpu_paged_kernel`` and ``attention_gpu.make_gpu_paged_kernel``)."""

from __future__ import annotations

from tvm.script import tirx as T


class TileLayout:
    """Where query row g of tile h sits: the tile is (KV head h // C, chunk h % C) of R rows of the
    Sq x G rows (i, g') of that KV head, i-major (``j = chunk * R + g``; i = j // G, g' = j % G).
    R = min(max_group, Sq x G), C = ceil(Sq x G / R): with one token a tile is a GQA group."""

    def __init__(self, rows: int, group, sq, chunks):
        self.R, self.G, self.SQ, self.C = rows, group, sq, chunks

    def kv_head(self, h):
        return T.truncdiv(h, self.C)

    def row(self, h, g):
        return T.truncmod(h, self.C) * self.R + g

    def valid(self, h, g):
        return self.row(h, g) < self.SQ * self.G

    def token(self, h, g):
        """The query token i of row g (clamped into range for a row past the last)."""
        return T.truncdiv(T.min(self.row(h, g), self.SQ * self.G - 1), self.G)

    def head(self, h, g):
        """The query head of row g (clamped like :meth:`token`)."""
        return self.kv_head(h) * self.G + T.truncmod(T.min(self.row(h, g), self.SQ * self.G - 1), self.G)

    def limit(self, n, h, g):
        """Rows of the n valid ones that row g sees: query i sees n - (Sq - 1 - i); none past the last row."""
        return T.if_then_else(self.valid(h, g), n - (self.SQ - 1 - self.token(h, g)), 0)


class _StartedLens:
    """``lens[b]``: the valid rows [leftpad[b], min(seq_lens[b], cache_len)) of sequence b."""

    def __init__(self, seq_lens, leftpad, cache_len):
        self.seq_lens, self.leftpad, self.cache_len = seq_lens, leftpad, cache_len

    def __getitem__(self, b):
        return T.min(self.seq_lens[b], self.cache_len) - T.max(self.leftpad[b], 0)


def started_lens(seq_lens, leftpad, cache_len) -> _StartedLens:
    """The walk's lengths of the paged form (both forms): rows from leftpad on, clamped to the cache."""
    return _StartedLens(seq_lens, leftpad, cache_len)
