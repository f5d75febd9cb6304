"""A Relax module pass: decode-shaped ``R.nn.attention`` / ``R.nn.attention_bias`` calls of an
existing IRModule become LeanAttention's ``call_tir`` (:func:`RewriteDecodeAttention`); every other
binding is left alone. What it matches is spelled out in the pass's docstring.
"""

from __future__ import annotations

import dataclasses

import tvm
from tvm import relax, tirx

from ..spec import DTYPES, HEAD_DIMS, MAX_GROUPS, GpuKnobs
from .op import LEAN_ATTR, LeanConfig, dtype_of, emit_lean_attention, provably_equal, same, shape_of, static_int

MASK_MAX = -1.0e4  # a padding bias at or below this is "minus infinity" for softmax in fp32

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
        shape = shape_of(base)
        if shape is None or len(shape) != 4:
            return None
        heads = static_int(shape[1] if layout == "bhld" else shape[2])
        if heads is None or heads == 0 or hq % heads:
            return None
        return base, layout

    @staticmethod
    def _head_repeat(call, axis_heads: int) -> bool:
        shape = shape_of(call.args[0])
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
        bshape = shape_of(bias)
        if bshape is None or len(bshape) != 4:
            return None
        if not all(static_int(x) == 1 for x in bshape[1:3]):
            return None
        if not provably_equal(bshape[3], kv_len):
            return None
        if static_int(bshape[0]) != 1 and not same(bshape[0], batch):
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
            shape = shape_of(expr)
            if shape is None or any(static_int(x) != 1 for x in shape[:-1]):
                return False
            expr = val.args[0]
        ar = self.call(expr, "relax.arange")
        if ar is None or len(ar.args) != 3:
            return False
        start, end, step = (_prim(x) for x in ar.args)
        return (static_int(start) == 0 and static_int(step) == 1 and tvm.ir.is_prim_expr(end)
                and provably_equal(end, kv_len))

    def _lengths_column(self, expr, batch):
        shape = shape_of(expr)
        if shape is None or len(shape) != 2 or static_int(shape[1]) != 1:
            return None
        if not same(shape[0], batch):
            return None
        val = self.call(expr, "relax.reshape", "relax.expand_dims")
        if val is None:
            return None
        lens = val.args[0]
        ls = shape_of(lens)
        if ls is None or len(ls) != 1 or not dtype_of(lens).startswith("int"):
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
        qs = shape_of(q)
        if qs is None or len(qs) != 4 or static_int(qs[1]) != 1:
            return None
        hq, d = static_int(qs[2]), static_int(qs[3])
        if hq is None or d not in HEAD_DIMS or dtype_of(q) not in DTYPES:
            return None
        kv = [self.peel_kv(x, hq) for x in (k_arg, v_arg)]
        if kv[0] is None or kv[1] is None or kv[0][1] != kv[1][1]:
            return None
        (k, layout), (v, _) = kv
        kshape, vshape = shape_of(k), shape_of(v)
        if not same(kshape, vshape) or dtype_of(k) != dtype_of(q) or dtype_of(v) != dtype_of(q):
            return None
        if static_int(kshape[3]) != d or not same(kshape[0], qs[0]):
            return None
        hkv = static_int(kshape[1] if layout == "bhld" else kshape[2])
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
        qs = shape_of(q)
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
