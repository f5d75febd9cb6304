"""LeanAttention in TVM's paged KV cache, in the form ``TIRPagedKVCache`` takes its decode kernel.

``relax.frontend.nn.llm.kv_cache.TIRPagedKVCache`` calls one PrimFunc per decode step with the
signature of TVM's ``batch_decode_paged_kv`` (``_decode_kernels.py``)::

    (Q [B, Hq, D], pages [P, 2, Hkv, page_size, D], page_indptr int32[B + 1],
     page_values int32[nnz], last_page_len int32[B], k_rope_pos_offset int32[B],
     q_rope_position int32[B], output [B, Hq, D], lse f32[B, Hq], rotary_mode: int32,
     rope_scale: f32, rope_theta: f32, sm_scale: f32)

Sequence b owns pages ``page_values[page_indptr[b]:page_indptr[b + 1]]`` and holds
``(npages - 1) * page_size + last_page_len[b]`` rows. Like TVM's kernels, lse is in log2 units
and an empty sequence gives output 0 and lse -5e4. The stream-K walk, the plan and the merge are
the ones of the dense operator; only the addressing of K/V rows differs (a page-table read per
block and warp on the GPU). The cross-block workspace is allocated inside the PrimFunc (TVM's
workspace pool); on CUDA a first small kernel clears the flags, the attention kernel follows.

Not supported (asserted at run time): ``rotary_mode == 1`` (RoPE applied inside attention,
``RopeMode.INLINE``); no sliding-window variant. CUDA: ``page_size`` a multiple of 16.

:func:`use_lean_paged_decode` swaps these kernels into a module that creates such a cache;
:func:`kv_cache_module` makes a minimal one (tests, the GPU check). (The PyTorch API's paged form,
with block tables, is ``lean_tvm.decode_attention(..., block_table=...)``.)
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import tvm
from tvm import tirx
from tvm.script import tirx as T

from .. import codegen
from .. import signature as sig
from ..attention_cpu import run_walk_macro
from ..attention_gpu import K_ROW, K_TILE, V_ROW, V_TILE, gpu_kernel_macro
from ..softmax import LSE_TVM
from ..spec import GpuKnobs
from .op import DEFAULT_CPU_WORKERS, KERNEL_ATTR, LEAN_ATTR, LeanConfig

# TVM's batch_decode_paged_kv signature (both forms).
PARAMS = (sig.handles("Q_handle", "pages_handle", "page_table_indptr_handle", "page_table_values_handle",
                      "var_length_info", "k_rope_pos_offset_handle", "q_rope_position_handle", "output_handle",
                      "lse_handle")
          + sig.scalars(rotary_mode="int32", rope_scale="float32", rope_theta="float32", sm_scale="float32"))
BODY_ARGS = [p.name for p in PARAMS if p.name not in ("rope_scale", "rope_theta")]
TVM_PAGED_DECODE = {"llvm": "batch_decode_paged_kv_cpu", "cuda": "batch_decode_paged_kv"}  # global_symbols


class _PagedLens:
    """``lens[b]``: rows of sequence b from the page table (0 when it owns no page)."""

    def __init__(self, indptr, last_len, page_size: int):
        self.indptr, self.last_len, self.page_size = indptr, last_len, page_size

    def __getitem__(self, b):
        npages = self.indptr[b + 1] - self.indptr[b]
        return T.if_then_else(npages > 0, (npages - 1) * self.page_size + self.last_len[b], 0)


class _PagedRows:
    """One of K (kv=0) or V (kv=1) of ``pages[P, 2, Hkv, page_size, D]``, read by the CPU
    operator as ``[b, h, row, d]``: row -> page ``values[indptr[b] + row // page_size]``, slot
    ``row % page_size``. (The operator's loads are TVMScript subscripts: any object with a
    ``__getitem__`` returning a PrimExpr can stand in for the buffer.)"""

    def __init__(self, pages, kv: int, indptr, values, page_size: int):
        self.pages, self.kv, self.indptr, self.values, self.page_size = pages, kv, indptr, values, page_size

    def __getitem__(self, index):
        b, h, row, d = index
        page = self.values[self.indptr[b] + T.truncdiv(row, self.page_size)]
        return self.pages[page, self.kv, h, T.truncmod(row, self.page_size), d]


def paged_rows(num_kv_heads: int, page_size: int, head_dim: int):
    """The GPU loader's addressing (see ``attention_gpu.dense_rows``) for a paged cache: the warp's
    rows rbase.. lie in one page (page_size is a multiple of the warp's rows), found through the
    page table; past the sequence's last page the last page stands in (its rows are zero-filled)."""
    page_elems = page_size * head_dim
    v_offset = num_kv_heads * page_elems  # pages[p, 1] follows pages[p, 0]

    @T.macro
    def rows(bufs, b, h, rbase):
        first = T.meta_var(bufs.INDPTR[b])
        page = T.meta_var(bufs.VALUES[T.min(first + T.truncdiv(rbase, page_size), bufs.INDPTR[b + 1] - 1)])
        bufs.gaddr[K_ROW] = ((T.Cast("int64", page) * (2 * num_kv_heads) + T.Cast("int64", h)) * page_elems
                         + T.Cast("int64", T.truncmod(rbase, page_size) * head_dim) + bufs.goff[K_ROW])
        bufs.gaddr[V_ROW] = bufs.gaddr[K_ROW] + v_offset
        bufs.gaddr[K_TILE] = bufs.gaddr[K_ROW]
        bufs.gaddr[V_TILE] = bufs.gaddr[V_ROW]

    return rows


def paged_knobs(knobs: GpuKnobs, page_size: int) -> GpuKnobs:
    """The tuned knobs with a warp's rows cut to fit in one page."""
    if page_size % 16:
        raise ValueError(f"LeanAttention paged decode (CUDA): page_size must be a multiple of 16, got {page_size}")
    rw = knobs.rows_per_warp
    while page_size % rw:
        rw -= 16
    return dataclasses.replace(knobs, rows_per_warp=rw)


def make_paged_decode_cpu(num_kv_heads: int, num_qo_heads: int, head_dim: int, dtype: str, page_size: int = 16,
                          num_workers: int = DEFAULT_CPU_WORKERS, block_size: int = 64) -> tirx.PrimFunc:
    """The CPU form, standing in for ``tir_attention_decode_cpu`` (``_attention_decode_cpu``)."""
    spec = LeanConfig().spec_for(dtype, head_dim, num_qo_heads // num_kv_heads)
    GM, D, HQ, HKV, W = spec.max_group, head_dim, num_qo_heads, num_kv_heads, num_workers
    run = run_walk_macro(spec, block_size, lse=LSE_TVM)

    @T.macro
    def body(Q_handle, pages_handle, page_table_indptr_handle, page_table_values_handle, var_length_info,
             k_rope_pos_offset_handle, q_rope_position_handle, output_handle, lse_handle, rotary_mode, sm_scale):
        B, nnz_pages, max_num_pages = T.int32(), T.int32(), T.int32()
        off_indptr, off_values, off_len, off_krope, off_qrope = T.int32(), T.int32(), T.int32(), T.int32(), T.int32()
        Q = T.match_buffer(Q_handle, (B, HQ, D), dtype)
        pages = T.match_buffer(pages_handle, (max_num_pages, 2, HKV, page_size, D), dtype)
        indptr = T.match_buffer(page_table_indptr_handle, (B + 1,), "int32", elem_offset=off_indptr)
        values = T.match_buffer(page_table_values_handle, (nnz_pages,), "int32", elem_offset=off_values)
        last_len = T.match_buffer(var_length_info, (B,), "int32", elem_offset=off_len)
        _k_rope = T.match_buffer(k_rope_pos_offset_handle, (B,), "int32", elem_offset=off_krope)
        _q_rope = T.match_buffer(q_rope_position_handle, (B,), "int32", elem_offset=off_qrope)
        O = T.match_buffer(output_handle, (B, HQ, D), dtype)
        LSE = T.match_buffer(lse_handle, (B, HQ), "float32")
        assert rotary_mode == 0, "LeanAttention paged decode: rotary_mode 1 (RoPE inside attention) unsupported"
        ws_o = T.alloc_buffer((W, GM, D), "float32")
        ws_ml = T.alloc_buffer((W, 2, GM), "float32")
        flags = T.alloc_buffer((W,), "int32")
        ctx = T.meta_var(SimpleNamespace(SL=_PagedLens(indptr, last_len, page_size), B=B, H=HKV,
                                         LMAX=max_num_pages * page_size, NW=W, SPLITS=0, FLAGS=flags))
        inputs = T.meta_var(SimpleNamespace(
            Q=Q, K=_PagedRows(pages, 0, indptr, values, page_size), V=_PagedRows(pages, 1, indptr, values, page_size),
            O=O, LSE=LSE, WSO=ws_o, WSML=ws_ml, HQ=HQ, G=HQ // HKV, scale=sm_scale))
        run(ctx, inputs)

    return sig.prim_func(f"lean_decode_paged_kv_cpu_{spec.name}", PARAMS, body, BODY_ARGS,
                         {"tirx.is_scheduled": True, "tirx.noalias": True})


def make_paged_decode_gpu(num_kv_heads: int, num_qo_heads: int, head_dim: int, dtype: str, page_size: int = 16,
                          config: LeanConfig | None = None) -> tirx.PrimFunc:
    """The CUDA form, standing in for ``tir_attention_decode`` (``_attention_decode``): the
    persistent stream-K kernel with ``config.workers()`` CTAs (the grid; they must be co-resident),
    B <= the knobs' ``max_batch``. Compile with ``relax.build`` / ``TIR_PIPELINE``.
    ``config``: workers and knobs (default ``LeanConfig("cuda")``: 132 SMs, ``schedules/sm_90a.json``)."""
    config = config or LeanConfig("cuda")
    spec = config.spec_for(dtype, head_dim, num_qo_heads // num_kv_heads)
    knobs = paged_knobs(config.gpu_knobs(spec), page_size)
    GM, D, HQ, HKV, W, NT = spec.max_group, head_dim, num_qo_heads, num_kv_heads, config.workers(spec), \
        32 * knobs.num_warps
    kernel = gpu_kernel_macro(spec, knobs, lse=LSE_TVM)
    rows = paged_rows(HKV, page_size, D)
    max_batch = knobs.max_batch

    @T.macro
    def body(Q_handle, pages_handle, page_table_indptr_handle, page_table_values_handle, var_length_info,
             k_rope_pos_offset_handle, q_rope_position_handle, output_handle, lse_handle, rotary_mode, sm_scale):
        B, nnz_pages, max_num_pages = T.int32(), T.int32(), T.int32()
        off_pages = T.int64()
        off_indptr, off_values, off_len, off_krope, off_qrope = T.int32(), T.int32(), T.int32(), T.int32(), T.int32()
        Q = T.match_buffer(Q_handle, (B, HQ, D), dtype)
        pages = T.match_buffer(pages_handle, (max_num_pages, 2, HKV, page_size, D), dtype, elem_offset=off_pages)
        indptr = T.match_buffer(page_table_indptr_handle, (B + 1,), "int32", elem_offset=off_indptr)
        values = T.match_buffer(page_table_values_handle, (nnz_pages,), "int32", elem_offset=off_values)
        last_len = T.match_buffer(var_length_info, (B,), "int32", elem_offset=off_len)
        _k_rope = T.match_buffer(k_rope_pos_offset_handle, (B,), "int32", elem_offset=off_krope)
        _q_rope = T.match_buffer(q_rope_position_handle, (B,), "int32", elem_offset=off_qrope)
        O = T.match_buffer(output_handle, (B, HQ, D), dtype)
        LSE = T.match_buffer(lse_handle, (B, HQ), "float32")
        assert rotary_mode == 0, "LeanAttention paged decode: rotary_mode 1 (RoPE inside attention) unsupported"
        assert B <= max_batch, "LeanAttention paged decode: batch exceeds the kernel's max_batch"
        ws_o = T.alloc_buffer((W, GM, D), "float32")
        ws_ml = T.alloc_buffer((W, 2, GM), "float32")
        flags = T.alloc_buffer((W,), "int32")
        for _bx in T.thread_binding(1, thread="blockIdx.x"):
            for tx in T.thread_binding(NT, thread="threadIdx.x"):
                for i in range((W + NT - 1) // NT):
                    if i * NT + tx < W:
                        flags[i * NT + tx] = 0
        QW = T.decl_buffer((B * (HQ * D // 2),), "uint32", data=Q.data)
        KF = T.decl_buffer((max_num_pages * (2 * HKV * page_size * D),), dtype, data=pages.data,
                           elem_offset=off_pages)
        src = T.meta_var(SimpleNamespace(
            QW=QW, KF=KF, VF=KF, sqb=HQ * D, sqh=D, skl=D, svl=D, SL=_PagedLens(indptr, last_len, page_size), B=B,
            HQ=HQ, HKV=HKV, LMAX=max_num_pages * page_size, ROWS=HQ // HKV, TILES=HKV, rows=rows, INDPTR=indptr,
            VALUES=values))
        kernel(src, O, LSE, ws_o, ws_ml, flags, sm_scale, W, 0, W, None)

    func = sig.prim_func(f"lean_decode_paged_kv_{spec.name}", PARAMS, body, BODY_ARGS,
                         {"tirx.is_scheduled": True, "tirx.noalias": True})
    return func.with_attrs({KERNEL_ATTR: codegen.PIPELINE, LEAN_ATTR: spec.name})


def use_lean_paged_decode(mod: tvm.IRModule, target_kind: str = "llvm", config: LeanConfig | None = None,
                          block_size: int = 64) -> tuple[tvm.IRModule, int]:
    """Swap TIRPagedKVCache's decode kernel in ``mod`` (a module whose Relax code creates the cache
    for ``target_kind``, ``"llvm"`` or ``"cuda"``) for LeanAttention's: the KV cache runtime then
    runs it for every decode step. Returns (module, kernels swapped). Build CUDA modules with
    ``lean_tvm.relax.build``. ``config``: workers and knobs (default ``LeanConfig(target_kind)``)."""
    if target_kind not in TVM_PAGED_DECODE:
        raise ValueError(f"target_kind: expected one of {tuple(TVM_PAGED_DECODE)}, got {target_kind!r}")
    config = config or LeanConfig(target_kind)
    symbol = TVM_PAGED_DECODE[target_kind]
    mod = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
    swapped = 0
    for gv, func in list(mod.functions_items()):
        if not (isinstance(func, tirx.PrimFunc) and func.attrs is not None
                and func.attrs.get("global_symbol") == symbol):
            continue
        q_buf, pages_buf = func.params[0], func.params[1]  # TVM 0.27: buffer parameters
        hq, d = int(q_buf.shape[1]), int(q_buf.shape[2])
        hkv, page_size = int(pages_buf.shape[2]), int(pages_buf.shape[3])
        dtype = str(q_buf.dtype)
        if target_kind == "llvm":
            new = make_paged_decode_cpu(hkv, hq, d, dtype, page_size, config.workers(
                config.spec_for(dtype, d, hq // hkv)), block_size)
        else:
            new = make_paged_decode_gpu(hkv, hq, d, dtype, page_size, config)
        mod[gv] = new.with_attr("global_symbol", symbol)
        swapped += 1
    return mod, swapped


def kv_cache_module(target_kind: str, num_qo_heads: int, num_kv_heads: int, head_dim: int, dtype: str = "float16",
                    page_size: int = 16, max_batch_size: int = 4, max_total_seq_len: int = 1024) -> tvm.IRModule:
    """A Relax module whose ``create()`` makes TVM's TIRPagedKVCache (one layer, no RoPE)."""
    from tvm import relax
    from tvm.relax.frontend.nn.llm.kv_cache import RopeMode, TIRPagedKVCache

    bb = relax.BlockBuilder()
    with bb.function("create", []):
        kv = TIRPagedKVCache(
            attn_kind="mha", max_batch_size=max_batch_size, max_total_seq_len=max_total_seq_len,
            prefill_chunk_size=min(max_total_seq_len, 4096), page_size=page_size, support_sliding_window=0,
            layer_partition=relax.ShapeExpr([0, 1]), num_hidden_layers=1, num_attention_heads=num_qo_heads,
            num_key_value_heads=num_kv_heads, qk_head_dim=head_dim, v_head_dim=head_dim, mla_original_qk_head_dim=0,
            mla_original_v_head_dim=0, rope_mode=RopeMode.NONE, rope_scale=1, rope_theta=10000, rope_scaling={},
            rope_ext_factors=relax.prim_value(0), rotary_dim=head_dim, enable_disaggregation=False, dtype=dtype,
            target=tvm.target.Target(target_kind))
        bb.emit_func_output(bb.emit(kv._expr))
    return bb.finalize()
