"""LeanAttention inside TVM Relax: an ``nn`` op, a rewrite pass, and the TIR pipeline to build them.

* :func:`decode_attention` -- a ``relax.frontend.nn`` op (``nn.Tensor`` in and out) that emits
  ``call_tir`` to the stream-K PrimFunc (``attention.make_cpu_kernel`` / ``make_gpu_kernel``,
  destination-passing form) together with its workspace.
* :func:`RewriteDecodeAttention` -- a module pass that replaces decode-shaped ``R.nn.attention``
  / ``R.nn.attention_bias`` calls of an existing IRModule by that ``call_tir`` and leaves every
  other binding alone. What it matches is spelled out in its docstring.
* :data:`TIR_PIPELINE` -- the name of a TIR pipeline for ``tvm.compile(..., tir_pipeline=...)``:
  our hand-synchronised GPU kernels (marked with :data:`KERNEL_ATTR`) go through
  ``codegen.PIPELINE``, every other PrimFunc (dlight-scheduled matmuls, norms...) through TVM's
  default one. Use :func:`build` (or pass ``tir_pipeline=TIR_PIPELINE`` yourself) for any module
  that holds a LeanAttention GPU kernel: TVM's default pipeline would insert barriers that break it.
* TVM's paged KV cache (``TIRPagedKVCache``) takes LeanAttention through ``lean_tvm.paged``.

Workspace. Each call site allocates, inside the graph, the cross-block partials
``ws_o f32[W, GM, D]`` and ``ws_ml f32[W, 2, GM]`` (uninitialised: ``R.builtin.alloc_tensor``;
Relax's memory planner reuses the storage across calls and layers) and the flags ``int32[W]`` as
``R.zeros``. TVM's FoldConstant turns that into a zero *constant*, i.e. one persistent flags buffer
per call site, uploaded once: correct because the kernel returns every flag it sets to zero (the
operator library's workspace relies on the same invariant), and it costs no memset per call.
Consequence: one executable must not run the same call site concurrently on two streams.

Workers. ``W = num_workers`` is fixed when the graph is built: on CUDA it defaults to
132 SMs (H100/H200) x the schedule's ``ctas_per_sm`` and is also the grid, so it must not exceed
the CTAs that can be co-resident on the GPU the executable runs on (the reducers spin-wait on each
other); on the CPU it defaults to 4 (a serial loop over workers: any value gives the same result).
Batch size and cache length stay symbolic; ``B <= knobs.max_batch`` (1024) on CUDA.
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

from . import codegen
from .attention import make_cpu_kernel, make_gpu_kernel
from .spec import DTYPES, HEAD_DIMS, MAX_GROUPS, AttentionSpec, GpuKnobs

KERNEL_ATTR = "lean_tvm.tir_pipeline"  # PrimFunc attr: compile me with codegen.PIPELINE
LEAN_ATTR = "lean_tvm.kernel"  # PrimFunc attr on every LeanAttention kernel: its AttentionSpec name
TIR_PIPELINE = "lean_tvm_relax"
LAYOUTS = ("bhld", "blhd")  # K/V as [B, Hkv, L, D] (SDPA) or [B, L, Hkv, D] (R.nn.attention's BSNH)
DEFAULT_CPU_WORKERS = 4
DEFAULT_NUM_SMS = 132  # H100 SXM and H200
STREAM_K = 0
OP_PATTERN_OPAQUE = 8  # relax.transform.AnnotateTIROpPattern's kOpaque: never fused
MASK_MAX = -1.0e4  # a padding bias at or below this is "minus infinity" for softmax in fp32


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
    stream-K workers (= CUDA grid); ``None`` = 4 on the CPU, ``num_sms`` x ``ctas_per_sm`` on CUDA.
    ``max_group``: the kernel's GQA bound (8 or 16); ``None`` = the smallest that fits."""

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
        from .schedule_records import knobs_for, load_records

        return knobs_for(load_records(self.arch), spec, self.arch)

    def workers(self, spec: AttentionSpec) -> int:
        if self.num_workers is not None:
            if self.num_workers < 1:
                raise ValueError(f"num_workers: expected >= 1, got {self.num_workers}")
            return self.num_workers
        if self.target_kind == "llvm":
            return DEFAULT_CPU_WORKERS
        return self.num_sms * self.gpu_knobs(spec).ctas_per_sm

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


def _shape(expr: relax.Expr) -> list | None:
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None or not isinstance(ty.shape, relax.ShapeExpr):
        return None
    return list(ty.shape.values)


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(tvm_ffi.structural_equal(a, b, map_free_vars=False))


def _eq_prim(a, b) -> bool:
    if _same(a, b):
        return True
    try:
        return bool(tvm.arith.Analyzer().can_prove_equal(a, b))
    except Exception:  # noqa: BLE001 -- mismatched dtypes and the like: not provably equal
        return False


def _dtype(expr: relax.Expr) -> str:
    return str(expr.ty.dtype)


def _static(x) -> int | None:
    return int(x.value) if isinstance(x, tirx.IntImm) else None


def _i32(x: int) -> tirx.IntImm:
    return relax.prim_value(tirx.IntImm("int32", int(x)))


def emit_lean_attention(bb: relax.BlockBuilder, q: relax.Expr, k: relax.Expr, v: relax.Expr,
                        seq_lens: relax.Expr, softmax_scale: float | None = None, layout: str = "bhld",
                        config: LeanConfig = LeanConfig(), name: str = "lean_decode_attention"):
    """Emit workspace + ``call_tir`` into ``bb``; returns the (o [B, Hq, D], lse f32[B, Hq]) vars.

    q [B, Hq, D]; k, v [B, Hkv, L, D] (``layout="bhld"``) or [B, L, Hkv, D] (``"blhd"``), q's dtype;
    seq_lens int32 [B] (clamped to [0, L] by the kernel; 0 gives o = 0, lse = -inf)."""
    qs, ks = _shape(q), _shape(k)
    if qs is None or len(qs) != 3 or ks is None or len(ks) != 4:
        raise ValueError(f"q: expected [B, Hq, D], k: expected 4-d; got {qs} and {ks}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    hq, d = _static(qs[1]), _static(qs[2])
    hkv = _static(ks[1] if layout == "bhld" else ks[2])
    if hq is None or d is None or hkv is None:
        raise ValueError("LeanAttention needs static head counts and head dim")
    if hq % hkv:
        raise ValueError(f"q heads ({hq}) must be a multiple of the KV heads ({hkv})")
    dtype = _dtype(q)
    for t, n in ((k, "k"), (v, "v")):
        if _dtype(t) != dtype:
            raise ValueError(f"{n}.dtype {_dtype(t)} differs from q's {dtype}")
    if _dtype(seq_lens) != "int32":
        seq_lens = bb.emit(relax.op.astype(seq_lens, "int32"))
    spec = config.spec_for(dtype, d, hq // hkv)
    knobs = config.gpu_knobs(spec) if config.target_kind == "cuda" else None
    workers = config.workers(spec)
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
        qs = _shape(q_expr)
        if _static(qs[1]) != 1:
            raise ValueError(f"q: expected [B, 1, Hq, D] (one new token), got {qs}")
        q_expr = bb.emit(relax.op.reshape(q_expr, [qs[0], qs[2], qs[3]]))
    o, lse = emit_lean_attention(bb, q_expr, k._expr, v._expr, seq_lens._expr, softmax_scale, layout, config, name)
    if four_d:
        os_ = _shape(o)
        o = bb.emit(relax.op.reshape(o, [os_[0], 1, os_[1], os_[2]]))
    o = nn.wrap_nested(o, name)
    return (o, nn.wrap_nested(lse, name + "_lse")) if return_lse else o


# --------------------------------------------------------------------------------------------
# The rewrite pass.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Match:
    q: relax.Expr
    k: relax.Expr
    v: relax.Expr
    layout: str
    seq_lens: relax.Expr | None  # None: every sequence is the whole cache
    scale: float | None


def _op_name(expr) -> str | None:
    return expr.op.name if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) else None


def _int_list(xs) -> list[int] | None:
    try:
        return [int(x) for x in xs]
    except (TypeError, ValueError):
        return None


def _prim(x):
    """A PrimExpr argument (0.27 passes PrimExprs to Relax ops directly; older wrap them)."""
    return x if tvm.ir.is_prim_expr(x) else getattr(x, "value", x)


class _Matcher:
    """Reads producers through the function's bindings (``get_var2val``)."""

    def __init__(self, var2val):
        self.var2val = var2val

    def value(self, expr):
        seen = 0
        while isinstance(expr, relax.Var) and expr in self.var2val and seen < 64:
            expr = self.var2val[expr]
            seen += 1
        return expr

    def call(self, expr, *names):
        val = self.value(expr)
        return val if _op_name(val) in names else None

    def peel_kv(self, expr, hq: int):
        """The cache tensor behind an attention K/V operand: (tensor, layout) or None.

        Accepted: X [B, L, Hkv, D] (blhd); permute_dims(X [B, Hkv, L, D], [0, 2, 1, 3]) (bhld);
        either with R.repeat(..., G, axis=head axis) in between, Hkv * G == Hq (GQA)."""
        rep = self.call(expr, "relax.repeat")
        if rep is not None and self._head_repeat(rep, axis_heads=2):
            expr = rep.args[0]
        perm = self.call(expr, "relax.permute_dims")
        if perm is not None and perm.attrs.axes is not None and _int_list(perm.attrs.axes) == [0, 2, 1, 3]:
            base, layout = perm.args[0], "bhld"
            if rep is None or not self._head_repeat(rep, 2):
                inner = self.call(base, "relax.repeat")
                if inner is not None and self._head_repeat(inner, axis_heads=1):
                    base = inner.args[0]
        else:
            base, layout = expr, "blhd"
        shape = _shape(base)
        if shape is None or len(shape) != 4:
            return None
        heads = _static(shape[1] if layout == "bhld" else shape[2])
        if heads is None or heads == 0 or hq % heads:
            return None
        return base, layout

    @staticmethod
    def _head_repeat(call, axis_heads: int) -> bool:
        shape = _shape(call.args[0])
        if shape is None or len(shape) != 4 or call.attrs.axis is None:
            return False
        return int(call.attrs.axis) % 4 == axis_heads

    def scalar_const(self, expr) -> float | None:
        val = self.value(expr)
        data = getattr(val, "value", None) if isinstance(val, tvm.ir.Constant) else None
        if data is not None and hasattr(data, "numpy"):
            arr = data.numpy()
            if arr.size >= 1 and (arr == arr.flat[0]).all():
                return float(arr.flat[0])
        return None

    def padding_lengths(self, bias, batch, kv_len):
        """seq_lens if ``bias`` is a key-padding mask, else None. Accepted (through any reshape /
        expand_dims / astype of the result to a shape broadcastable to [B, 1, 1, L]):

            where(less(pos, lens_col), 0, NEG)  or  where(greater(lens_col, pos), 0, NEG)
            where(greater_equal(pos, lens_col), NEG, 0)  or  where(less_equal(lens_col, pos), NEG, 0)

        with pos = arange(0, L, 1) (optionally reshaped to [1, L]), lens_col = lens [B] reshaped /
        expand_dims'ed to [B, 1] (optionally astype'd), NEG a constant <= -1e4 (or -inf)."""
        bshape = _shape(bias)
        if bshape is None or len(bshape) != 4:
            return None
        if not all(_static(x) == 1 for x in bshape[1:3]):
            return None
        if not _eq_prim(bshape[3], kv_len):
            return None
        if _static(bshape[0]) != 1 and not _same(bshape[0], batch):
            return None
        expr = bias
        for _ in range(8):
            val = self.call(expr, "relax.reshape", "relax.expand_dims", "relax.astype")
            if val is None:
                break
            expr = val.args[0]
        where = self.call(expr, "relax.where")
        if where is None:
            return None
        cond, a, b = where.args
        ca, cb = self.scalar_const(a), self.scalar_const(b)
        if ca is None or cb is None:
            return None
        cmp = self.call(cond, "relax.less", "relax.greater", "relax.greater_equal", "relax.less_equal")
        if cmp is None:
            return None
        name = cmp.op.name
        if name in ("relax.less", "relax.greater"):
            keep, masked = ca, cb  # true = position is valid
        else:
            keep, masked = cb, ca
        if keep != 0.0 or not masked <= MASK_MAX:
            return None
        pos_arg, lens_arg = (cmp.args[0], cmp.args[1]) if name in ("relax.less", "relax.greater_equal") else (
            cmp.args[1], cmp.args[0])
        if not self._is_positions(pos_arg, kv_len):
            return None
        return self._lengths_column(lens_arg, batch)

    def _is_positions(self, expr, kv_len) -> bool:
        val = self.call(expr, "relax.reshape", "relax.expand_dims")
        if val is not None:
            shape = _shape(expr)
            if shape is None or any(_static(x) != 1 for x in shape[:-1]):
                return False
            expr = val.args[0]
        ar = self.call(expr, "relax.arange")
        if ar is None or len(ar.args) != 3:
            return False
        start, end, step = (_prim(x) for x in ar.args)
        return _static(start) == 0 and _static(step) == 1 and tvm.ir.is_prim_expr(end) and _eq_prim(end, kv_len)

    def _lengths_column(self, expr, batch):
        shape = _shape(expr)
        if shape is None or len(shape) != 2 or _static(shape[1]) != 1:
            return None
        if not _same(shape[0], batch):
            return None
        val = self.call(expr, "relax.reshape", "relax.expand_dims")
        if val is None:
            return None
        lens = val.args[0]
        ls = _shape(lens)
        if ls is None or len(ls) != 1 or not _dtype(lens).startswith("int"):
            return None
        return lens

    def match(self, call) -> _Match | None:
        name = _op_name(call)
        if name not in ("relax.nn.attention", "relax.nn.attention_bias"):
            return None
        attrs = call.attrs
        if getattr(attrs, "window_size", None) is not None:
            return None
        if attrs.causal_mask not in (None, "BottomRight"):  # TopLeft at q_len 1 keeps key 0 only
            return None
        q, k_arg, v_arg = call.args[:3]
        qs = _shape(q)
        if qs is None or len(qs) != 4 or _static(qs[1]) != 1:
            return None
        hq, d = _static(qs[2]), _static(qs[3])
        if hq is None or d not in HEAD_DIMS or _dtype(q) not in DTYPES:
            return None
        kv = [self.peel_kv(x, hq) for x in (k_arg, v_arg)]
        if kv[0] is None or kv[1] is None or kv[0][1] != kv[1][1]:
            return None
        (k, layout), (v, _) = kv
        kshape, vshape = _shape(k), _shape(v)
        if not _same(kshape, vshape) or _dtype(k) != _dtype(q) or _dtype(v) != _dtype(q):
            return None
        if _static(kshape[3]) != d or not _same(kshape[0], qs[0]):
            return None
        hkv = _static(kshape[1] if layout == "bhld" else kshape[2])
        if hq // hkv > max(MAX_GROUPS):
            return None
        kv_len = kshape[2] if layout == "bhld" else kshape[1]
        seq_lens = None
        if name == "relax.nn.attention_bias":
            seq_lens = self.padding_lengths(call.args[3], qs[0], kv_len)
            if seq_lens is None:
                return None
        scale = None if attrs.scale is None else float(attrs.scale.value)
        return _Match(q, k, v, layout, seq_lens, scale)


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, config: LeanConfig):
        super().__init__(mod)
        self.mod_, self.config, self.matcher, self.count = mod, config, None, 0

    def transform(self) -> tvm.IRModule:
        for gv, func in self.mod_.functions_items():
            if not isinstance(func, relax.Function):
                continue
            self.matcher = _Matcher(relax.analysis.get_var2val(func))
            before = self.count
            new = self.visit_expr(func)
            if self.count != before:
                self.builder_.update_func(gv, relax.analysis.remove_all_unused(new))
        return self.builder_.get()

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        m = self.matcher.match(call) if self.matcher is not None else None
        call = self.visit_expr_post_order(call)
        if m is None:
            return call
        bb = self.builder_
        q, k, v = (self.visit_expr(x) for x in (m.q, m.k, m.v))
        qs = _shape(q)
        batch = qs[0]
        if m.seq_lens is None:  # no mask: every sequence spans the cache (the kernel clamps to L)
            lens = bb.emit(relax.op.full(relax.ShapeExpr([batch]), relax.const(2**31 - 1, "int32"), "int32"))
        else:
            lens = self.visit_expr(m.seq_lens)
        q3 = bb.emit(relax.op.reshape(q, [batch, qs[2], qs[3]]))
        o, _ = emit_lean_attention(bb, q3, k, v, lens, m.scale, m.layout, self.config)
        self.count += 1
        return relax.op.reshape(o, qs)


def RewriteDecodeAttention(target_kind: str = "llvm", num_workers: int | None = None, arch: str = "sm_90a",
                           knobs: GpuKnobs | None = None, max_group: int | None = None):
    """A module pass: decode-shaped Relax attention -> LeanAttention ``call_tir``.

    Matches a call ``R.nn.attention(q, k, v)`` or ``R.nn.attention_bias(q, k, v, bias)`` (what
    ``nn.op.scaled_dot_product_attention`` and the PyTorch importer's SDPA emit) when all hold:

    * q is [B, 1, Hq, D] with a **static 1** query length (a symbolic or larger one is prefill:
      left alone), fp16/bf16, static Hq, D in 64/128/256;
    * k and v are the same cache shape, either [B, L, Hkv, D] tensors, or
      ``permute_dims(x, [0, 2, 1, 3])`` of [B, Hkv, L, D] tensors, optionally with GQA's
      ``R.repeat(., G, axis=head axis)`` between (the repeat and permute are dropped: the kernel
      reads the cache in place), Hq = G * Hkv, G <= 16;
    * ``causal_mask`` is None or "BottomRight" (with one query both see every key; "TopLeft"
      would see key 0 only: left alone); no ``window_size``;
    * no bias (every sequence is the whole cache), or a key-padding bias of shape broadcastable
      to [B, 1, 1, L] built as ``where(less(arange(0, L), reshape(lens, [B, 1])), 0, NEG)`` (or
      the mirrored comparisons; see ``_Matcher.padding_lengths``) with NEG <= -1e4: then
      seq_lens = lens. Any other bias: left alone.

    The call becomes ``reshape(o, [B, 1, Hq, D])`` of the kernel's o (scale: the call's, or
    1/sqrt(D)). One difference from TVM's softmax: a sequence with no valid key gives o = 0
    (with an additive mask TVM gives NaN for -inf, a uniform average for a finite NEG).
    Arguments are :class:`LeanConfig`'s. :func:`rewrite_decode_attention` also returns the count."""

    config = LeanConfig(target_kind=target_kind, num_workers=num_workers, arch=arch, knobs=knobs,
                        max_group=max_group)

    @tvm.transform.module_pass(opt_level=0, name="RewriteDecodeAttention")
    def _pass(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return _Rewriter(mod, config).transform()

    return _pass


def rewrite_decode_attention(mod: tvm.IRModule, **kwargs) -> tuple[tvm.IRModule, int]:
    """Run the rewrite; returns (new module, number of attention calls rewritten)."""
    config = LeanConfig(**kwargs)
    rw = _Rewriter(mod, config)
    out = rw.transform()
    return out, rw.count


def count_attention_calls(mod: tvm.IRModule) -> dict[str, int]:
    """{"attention": n, "lean": m} over the module's Relax functions (for tests and reports)."""
    counts = {"attention": 0, "lean": 0}

    @relax.expr_functor.visitor
    class _Counter(relax.PyExprVisitor):
        def visit_call_(self, call):
            if _op_name(call) in ("relax.nn.attention", "relax.nn.attention_bias"):
                counts["attention"] += 1
            if _op_name(call) == "relax.call_tir" and isinstance(call.args[0], tvm.ir.GlobalVar):
                f = mod[call.args[0]]
                if isinstance(f, tirx.PrimFunc) and f.attrs is not None and LEAN_ATTR in f.attrs:
                    counts["lean"] += 1
            super().visit_call_(call)

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            _Counter().visit_expr(func)
    return counts
