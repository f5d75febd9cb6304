"""The paged form's tiles: which query rows a tile holds, and the buffers its kernels declare
(TIR shared by the CPU and GPU kernels, ``attention_cpu.make_cpu_paged_kernel`` and
``attention_gpu.make_gpu_paged_kernel``)."""

from __future__ import annotations

from types import SimpleNamespace

import tvm
from tvm.script import tirx as T
from tvm.script.ir_builder import IRBuilder


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


def paged_buffers(spec, q, k, v, block_table, seq_lens, leftpad, k_scale, v_scale, o, lse, ws_o, ws_ml, flags):
    """The paged form's buffers over its parameters (``sig.PAGED_PARAMS`` / ``PAGED_FP8_PARAMS``),
    called inside the CPU and GPU kernels' body macros (``T.meta_var(paged_buffers(...))``): q, o
    [B, Sq, Hq, D]; k, v pools [P, Hkv, page, D] (bytes for an fp8 spec, whose k_scale, v_scale are
    fp32 [Hkv]); the table, lengths, start rows and workspaces; their shape and stride variables;
    and the tiles' ``TileLayout`` (rows per tile, chunks per KV head)."""
    GM, D, dt = spec.max_group, spec.head_dim, spec.dtype
    fp8 = spec.kv_dtype is not None
    kv_dt = "uint8" if fp8 else dt
    one, two, d64, g64 = (tvm.tirx.const(x, "int64") for x in (1, 2, D, GM))
    b, sq_, hq_, hkv_, p, ps, mp, wsn = (tvm.tirx.Var(n, "int64") for n in ("B", "SQ", "HQ", "HKV", "P", "PS", "MP",
                                                                            "WSN"))
    sqb, sqs, sqh, skp, skh, skr, svp, svh, svr, stb = (tvm.tirx.Var(n, "int64") for n in (
        "sqb", "sqs", "sqh", "skp", "skh", "skr", "svp", "svh", "svr", "stb"))
    f = SimpleNamespace(B=b, P=p, sqb=sqb, sqs=sqs, sqh=sqh, skp=skp, skh=skh, skr=skr, svp=svp, svh=svh, svr=svr,
                        stb=stb)
    def named(name, buf):  # the name the kernels' own assignments gave it (the generated source keeps it)
        return IRBuilder.name(name, buf) if buf is not None else None

    f.Q = named("Q", T.match_buffer(q, (b, sq_, hq_, d64), dt, strides=(sqb, sqs, sqh, one)))
    f.K = named("K", T.match_buffer(k, (p, hkv_, ps, d64), kv_dt, strides=(skp, skh, skr, one)))
    f.V = named("V", T.match_buffer(v, (p, hkv_, ps, d64), kv_dt, strides=(svp, svh, svr, one)))
    f.TABLE = named("TABLE", T.match_buffer(block_table, (b, mp), "int32", strides=(stb, one)))
    f.SL = named("SL", T.match_buffer(seq_lens, (b,), "int32"))
    f.LP = named("LP", T.match_buffer(leftpad, (b,), "int32"))
    f.KSC = T.match_buffer(k_scale, (hkv_,), "float32", strides=(T.int64(),)) if fp8 else None
    f.VSC = T.match_buffer(v_scale, (hkv_,), "float32", strides=(T.int64(),)) if fp8 else None
    f.O = named("O", T.match_buffer(o, (b, sq_, hq_, d64), dt))
    f.LSE = named("LSE", T.match_buffer(lse, (b, sq_, hq_), "float32"))
    f.WSO = named("WSO", T.match_buffer(ws_o, (wsn, g64, d64), "float32"))
    f.WSML = named("WSML", T.match_buffer(ws_ml, (wsn, two, g64), "float32"))
    f.FLAGS = named("FLAGS", T.match_buffer(flags, (wsn,), "int32"))
    f.hkv, f.hq, f.sq = T.Cast("int32", hkv_), T.Cast("int32", hq_), T.Cast("int32", sq_)
    g = T.truncdiv(f.hq, f.hkv)
    f.rows = T.min(GM, f.sq * g)
    f.lay = TileLayout(f.rows, g, f.sq, T.truncdiv(f.sq * g + (f.rows - 1), f.rows))
    return f
