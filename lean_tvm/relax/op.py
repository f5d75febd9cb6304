"""LeanAttention as a Relax op: the kernel instantiated for a graph, its workspace, the ``nn`` op,
and the TIR pipeline that builds a module holding it.

* :func:`decode_attention` -- a ``relax.frontend.nn`` op (``nn.Tensor`` in and out) that emits
  ``call_tir`` to the stream-K PrimFunc (``attention_cpu.make_cpu_kernel`` /
  ``attention_gpu.make_gpu_kernel``, destination-passing form) together with its workspace;
  :func:`emit_lean_attention` is the same for a ``BlockBuilder`` (the rewrite pass uses it).
* :data:`TIR_PIPELINE` -- the name of a TIR pipeline for ``tvm.compile(..., tir_pipeline=...)``:
  our hand-synchronised GPU kernels (marked with :data:`KERNEL_ATTR`) go through
  ``codegen.PIPELINE``, every other PrimFunc (dlight-scheduled matmuls, norms...) through TVM's
  default one. Use :func:`build` (or pass ``tir_pipeline=TIR_PIPELINE`` yourself) for any module
  that holds a LeanAttention GPU kernel: TVM's default pipeline would insert barriers that break it.

Workspace. Each call site allocates, inside the graph, the cross-block partials
``ws_o f32[W, GM, D]`` and ``ws_ml f32[W, 2, GM]`` (uninitialised: ``R.builtin.alloc_tensor``;
Relax's memory planner reuses the storage across calls and layers) and the flags ``int32[W]`` as
``R.zeros``. TVM's FoldConstant turns that into a zero *constant*, i.e. one persistent flags buffer
per call site, uploaded once: correct because the kernel returns every flag it sets to zero (the
operator library's workspace relies on the same invariant), and it costs no memset per call.
Consequence: one executable must not run the same call site concurrently on two streams.

Workers. ``W = num_workers`` is fixed when the graph is built and is also the CUDA grid, so it must
not exceed the CTAs that can be co-resident on the GPU the executable runs on (the reducers
spin-wait on each other). On CUDA it defaults to the operator library's rule,
``plan.stream_k_workers``, for the batch and cache length when both are static, else to what that
rule gives long caches (132 SMs of an H100/H200 x the schedule's ``ctas_per_sm``); on the CPU to 4
(a serial loop over workers: any value gives the same result). Batch size and cache length may be
symbolic; ``B <= knobs.max_batch`` (1024) on CUDA.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import tvm
import tvm_ffi
from tvm import relax, tirx
from tvm.relax.frontend import nn
from tvm.tirx import compilation_pipeline

from .. import codegen
from ..attention_cpu import make_cpu_kernel
from ..attention_gpu import make_gpu_kernel
from ..plan import STREAM_K, stream_k_workers
from ..spec import DTYPES, HEAD_DIMS, LAYOUTS, MAX_GROUPS, AttentionSpec, GpuKnobs

KERNEL_ATTR = "lean_tvm.tir_pipeline"  # PrimFunc attr: compile me with codegen.PIPELINE
LEAN_ATTR = "lean_tvm.kernel"  # PrimFunc attr on every LeanAttention kernel: its AttentionSpec name
TIR_PIPELINE = "lean_tvm_relax"
DEFAULT_CPU_WORKERS = 4
DEFAULT_NUM_SMS = 132  # H100 SXM and H200
OP_PATTERN_OPAQUE = 8  # relax.transform.AnnotateTIROpPattern's kOpaque: never fused


# --------------------------------------------------------------------------------------------
# TIR pipeline: ours for our kernels, TVM's default for the rest of the module.
# --------------------------------------------------------------------------------------------


def _relax_tir_pipeline():
    ours, finalize_host, finalize_device = compilation_pipeline.get_tir_pipeline(codegen.PIPELINE)
    default, _, _ = compilation_pipeline.get_tir_pipeline("default")

    @tvm.transform.module_pass(opt_level=0, name="LeanTvmRelaxTIRPipeline")
    def _pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        mine, rest = {}, {}
        for gv, func in mod.functions_items():
            is_ours = isinstance(func, tirx.PrimFunc) and func.attrs is not None and KERNEL_ATTR in func.attrs
            (mine if is_ours else rest)[gv] = func
        if not mine:
            return default(mod)
        out = ours(tvm.IRModule(mine, attrs=mod.attrs))
        if rest:
            out.update(default(tvm.IRModule(rest, attrs=mod.attrs)))
        return out

    return _pipeline, finalize_host, finalize_device


compilation_pipeline.register_tir_pipeline(TIR_PIPELINE, _relax_tir_pipeline)


def build(mod: tvm.IRModule, target, **kwargs):
    """``tvm.compile`` with :data:`TIR_PIPELINE` (needed whenever a LeanAttention GPU kernel is in
    the module; harmless otherwise). A CUDA target also needs ``with target:`` around the call
    when compiling device code with nvcc (the compile callback reads ``Target.current()``)."""
    return tvm.compile(mod, target=target, tir_pipeline=TIR_PIPELINE, **kwargs)


# --------------------------------------------------------------------------------------------
# The kernel as a Relax-callable PrimFunc.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LeanConfig:
    """How :func:`decode_attention` and :func:`RewriteDecodeAttention` instantiate the kernel.

    ``target_kind``: ``"llvm"`` (CPU form) or ``"cuda"`` (the persistent GPU kernel; ``arch`` picks
    the tuned knobs from ``schedules/<arch>.json`` unless ``knobs`` is given). ``num_workers``:
    stream-K workers (= CUDA grid); ``None`` = 4 on the CPU, ``plan.stream_k_workers`` on CUDA
    (see :meth:`workers`). ``max_group``: the kernel's GQA bound (8 or 16); ``None`` = the
    smallest that fits."""

    target_kind: str = "llvm"
    num_workers: int | None = None
    arch: str = "sm_90a"
    knobs: GpuKnobs | None = None
    num_sms: int = DEFAULT_NUM_SMS
    max_group: int | None = None
    cpu_block_size: int = 64

    def __post_init__(self):
        if self.target_kind not in ("llvm", "cuda"):
            raise ValueError(f"target_kind: expected 'llvm' or 'cuda', got {self.target_kind!r}")

    def gpu_knobs(self, spec: AttentionSpec) -> GpuKnobs:
        if self.knobs is not None:
            return self.knobs
        from ..schedule_records import knobs_for, load_records

        return knobs_for(load_records(self.arch), spec, self.arch)

    def workers(self, spec: AttentionSpec, tiles: int | None = None, cache_len: int | None = None) -> int:
        """The stream-K worker count: ``num_workers`` if given; on CUDA the operator library's rule
        (``plan.stream_k_workers``) for ``tiles`` = B x Hkv tiles over a cache of ``cache_len``
        rows when both are known at build time, else every resident CTA (what the rule gives
        long caches)."""
        if self.num_workers is not None:
            if self.num_workers < 1:
                raise ValueError(f"num_workers: expected >= 1, got {self.num_workers}")
            return self.num_workers
        if self.target_kind == "llvm":
            return DEFAULT_CPU_WORKERS
        knobs = self.gpu_knobs(spec)
        resident = self.num_sms * knobs.ctas_per_sm
        if tiles is None or cache_len is None:
            return resident
        return stream_k_workers(tiles, -(-cache_len // knobs.block_size), resident)

    def spec_for(self, dtype: str, head_dim: int, group: int) -> AttentionSpec:
        if dtype not in DTYPES:
            raise ValueError(f"LeanAttention dtype: expected one of {DTYPES}, got {dtype}")
        if head_dim not in HEAD_DIMS:
            raise ValueError(f"LeanAttention head dim: expected one of {HEAD_DIMS}, got {head_dim}")
        bound = self.max_group or max(MAX_GROUPS)
        if group > bound:
            raise ValueError(f"GQA group Hq/Hkv = {group} exceeds the kernel's bound {bound}")
        return AttentionSpec(dtype, head_dim, self.max_group or min(g for g in MAX_GROUPS if g >= group))


def _relayout_blhd(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """The same kernel taking K and V as compact [B, L, Hkv, D] tensors (no copy, no transpose).

    The kernel addresses K/V through symbolic strides (skb, skh, skl); the new parameters bind the
    same stride variables from a [B, L, Hkv, D] tensor, and the body's [B, Hkv, L, D] views are
    re-declared on the same data pointer."""
    params, decls = list(func.params), []
    for i, p in enumerate(params):
        if p.name not in ("K", "V"):
            continue
        b, h, n, d = p.shape
        sb, sh, sn, one = p.strides
        new = tirx.decl_buffer((b, n, h, d), p.dtype, name=p.name, strides=(sb, sn, sh, one))
        params[i] = new
        decls.append(tirx.DeclBuffer(p, data=tirx.buffer_data(new)))
    if len(decls) != 2:
        raise RuntimeError("kernel signature changed: expected parameters K and V")
    return tirx.PrimFunc(params, tirx.SeqStmt([*decls, func.body]), func.ret_type, func.attrs)


@functools.cache
def attention_primfunc(spec: AttentionSpec, target_kind: str, layout: str = "bhld",
                       knobs: GpuKnobs | None = None, cpu_block_size: int = 64) -> tirx.PrimFunc:
    """The destination-passing PrimFunc ``(q, k, v, seq_lens, ws_o, ws_ml, flags, softmax_scale,
    num_workers, num_splits, grid, o, lse)``, ready for ``call_tir``; ``layout`` is K/V's."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    if target_kind == "cuda":
        func = make_gpu_kernel(spec, knobs or GpuKnobs(), dps=True)
        func = func.with_attrs({"tirx.is_scheduled": True, KERNEL_ATTR: codegen.PIPELINE})
    else:
        func = make_cpu_kernel(spec, cpu_block_size, dps=True)
    func = func.with_attrs({"op_pattern": OP_PATTERN_OPAQUE, LEAN_ATTR: spec.name})
    if layout == "blhd":
        func = _relayout_blhd(func)
    # no global_symbol: BlockBuilder.add_func names (and dedups) it
    return func.without_attr("global_symbol")


def shape_of(expr: relax.Expr) -> list | None:
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None or not isinstance(ty.shape, relax.ShapeExpr):
        return None
    return list(ty.shape.values)


def same(a, b) -> bool:
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(tvm_ffi.structural_equal(a, b, map_free_vars=False))


def provably_equal(a, b) -> bool:
    if same(a, b):
        return True
    try:
        return bool(tvm.arith.Analyzer().can_prove_equal(a, b))
    except Exception:  # noqa: BLE001 -- mismatched dtypes and the like: not provably equal
        return False


def dtype_of(expr: relax.Expr) -> str:
    return str(expr.ty.dtype)


def static_int(x) -> int | None:
    return int(x.value) if isinstance(x, tirx.IntImm) else None


def _i32(x: int) -> tirx.IntImm:
    return relax.prim_value(tirx.IntImm("int32", int(x)))


def emit_lean_attention(bb: relax.BlockBuilder, q: relax.Expr, k: relax.Expr, v: relax.Expr,
                        seq_lens: relax.Expr, softmax_scale: float | None = None, layout: str = "bhld",
                        config: LeanConfig = LeanConfig(), name: str = "lean_decode_attention"):
    """Emit workspace + ``call_tir`` into ``bb``; returns the (o [B, Hq, D], lse f32[B, Hq]) vars.

    q [B, Hq, D]; k, v [B, Hkv, L, D] (``layout="bhld"``) or [B, L, Hkv, D] (``"blhd"``), q's dtype;
    seq_lens int32 [B] (clamped to [0, L] by the kernel; 0 gives o = 0, lse = -inf)."""
    qs, ks = shape_of(q), shape_of(k)
    if qs is None or len(qs) != 3 or ks is None or len(ks) != 4:
        raise ValueError(f"q: expected [B, Hq, D], k: expected 4-d; got {qs} and {ks}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    hq, d = static_int(qs[1]), static_int(qs[2])
    hkv = static_int(ks[1] if layout == "bhld" else ks[2])
    if hq is None or d is None or hkv is None:
        raise ValueError("LeanAttention needs static head counts and head dim")
    if hq % hkv:
        raise ValueError(f"q heads ({hq}) must be a multiple of the KV heads ({hkv})")
    dtype = dtype_of(q)
    for t, n in ((k, "k"), (v, "v")):
        if dtype_of(t) != dtype:
            raise ValueError(f"{n}.dtype {dtype_of(t)} differs from q's {dtype}")
    if dtype_of(seq_lens) != "int32":
        seq_lens = bb.emit(relax.op.astype(seq_lens, "int32"))
    spec = config.spec_for(dtype, d, hq // hkv)
    knobs = config.gpu_knobs(spec) if config.target_kind == "cuda" else None
    batch, cache_len = static_int(qs[0]), static_int(ks[2] if layout == "bhld" else ks[1])
    workers = config.workers(spec, None if batch is None else batch * hkv, cache_len)
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else float(softmax_scale)
    func = attention_primfunc(spec, config.target_kind, layout, knobs, config.cpu_block_size)
    gv = bb.add_func(func, name)
    gm = spec.max_group
    ws_o = bb.emit(relax.op.builtin.alloc_tensor(relax.ShapeExpr([workers, gm, d]), "float32", 0))
    ws_ml = bb.emit(relax.op.builtin.alloc_tensor(relax.ShapeExpr([workers, 2, gm]), "float32", 0))
    flags = bb.emit(relax.op.zeros(relax.ShapeExpr([workers]), "int32"))
    batch = qs[0]
    out = bb.emit(relax.call_tir(
        gv, [q, k, v, seq_lens, ws_o, ws_ml, flags, relax.prim_value(tirx.FloatImm("float32", scale)),
             _i32(workers), _i32(STREAM_K), _i32(workers)],
        [relax.TensorType([batch, hq, d], dtype), relax.TensorType([batch, hq], "float32")]))
    return bb.emit(relax.TupleGetItem(out, 0)), bb.emit(relax.TupleGetItem(out, 1))


def decode_attention(q: nn.Tensor, k: nn.Tensor, v: nn.Tensor, seq_lens: nn.Tensor,
                     softmax_scale: float | None = None, *, layout: str = "bhld", target_kind: str = "llvm",
                     num_workers: int | None = None, arch: str = "sm_90a", knobs: GpuKnobs | None = None,
                     max_group: int | None = None, return_lse: bool = False,
                     name: str = "lean_decode_attention"):
    """LeanAttention decode as a ``relax.frontend.nn`` op.

    q: [B, Hq, D] or [B, 1, Hq, D]; k, v: [B, Hkv, L, D] (``layout="bhld"``) or [B, L, Hkv, D]
    (``"blhd"``, the layout of ``R.nn.attention``); seq_lens: int32 [B] valid lengths (0 allowed).
    fp16/bf16, D in 64/128/256, Hq/Hkv <= 16, static head counts; B and L may be symbolic
    (CUDA: B <= 1024, the device plan's capacity). Returns o shaped like q (and lse f32 [B, Hq]
    with ``return_lse``). ``target_kind`` must match the target the module is compiled for
    (``"llvm"`` or ``"cuda"``); compile with :func:`build`.
    """
    config = LeanConfig(target_kind=target_kind, num_workers=num_workers, arch=arch, knobs=knobs,
                        max_group=max_group)
    bb = relax.BlockBuilder.current()
    q_expr = q._expr
    four_d = q.ndim == 4
    if four_d:
        qs = shape_of(q_expr)
        if static_int(qs[1]) != 1:
            raise ValueError(f"q: expected [B, 1, Hq, D] (one new token), got {qs}")
        q_expr = bb.emit(relax.op.reshape(q_expr, [qs[0], qs[2], qs[3]]))
    o, lse = emit_lean_attention(bb, q_expr, k._expr, v._expr, seq_lens._expr, softmax_scale, layout, config, name)
    if four_d:
        os_ = shape_of(o)
        o = bb.emit(relax.op.reshape(o, [os_[0], 1, os_[1], os_[2]]))
    o = nn.wrap_nested(o, name)
    return (o, nn.wrap_nested(lse, name + "_lse")) if return_lse else o
