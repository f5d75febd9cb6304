"""Reading and rebuilding TIR expressions: what the stream-K rule's analysis matches on and its
generated operators instantiate (TVM 0.27 exposes no ``substitute``/``ir_transform`` to Python).

:func:`rewrite` rebuilds an expression with variables and buffer loads replaced; it knows the
node types of arithmetic TensorIR (constants, variables, loads, casts, unary/binary operators,
``Select`` and intrinsic calls) and raises :class:`UnsupportedExpr` on any other, so an
analysis built on it never passes over a node it did not read.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import tvm_ffi
from tvm import ir, tirx

BINARY = (tirx.Add, tirx.Sub, tirx.Mul, tirx.Div, tirx.Mod, tirx.FloorDiv, tirx.FloorMod, tirx.Min, tirx.Max,
          tirx.EQ, tirx.NE, tirx.LT, tirx.LE, tirx.GT, tirx.GE, tirx.And, tirx.Or)
CONSTANTS = (tirx.IntImm, tirx.FloatImm)


class UnsupportedExpr(ValueError):
    """An expression node :func:`rewrite` does not know."""


def is_buffer(v) -> bool:
    return isinstance(v, ir.Var) and isinstance(v.ty, tirx.BufferType)


def is_load(e, buffer=None) -> bool:
    return isinstance(e, ir.expr.TensorLoad) and (buffer is None or e.source.same_as(buffer))


def call_name(e) -> str | None:
    """``"exp"`` for ``T.exp(x)``, ``"if_then_else"``...: the op's name without its namespace."""
    if isinstance(e, ir.Call) and isinstance(e.op, ir.Op):
        return e.op.name.split(".")[-1]
    return None


def dtype_of(e) -> str:
    return str(e.ty.dtype)


def same(a, b) -> bool:
    return bool(tvm_ffi.structural_equal(a, b, map_free_vars=False))


def strip_casts(e):
    while isinstance(e, tirx.Cast):
        e = e.value
    return e


def rewrite(expr, variables: Mapping | None = None, loads: Callable | None = None, node: Callable | None = None):
    """``expr`` with each variable ``v`` in ``variables`` replaced by ``variables[v]`` and each
    buffer load ``buf[idx]`` by ``loads(buf, new_idx)`` when that returns an expression (else the
    load at the rewritten indices); ``node(e)``, when given and not None, replaces a whole node
    before any of that. Raises :class:`UnsupportedExpr` on a node it does not know."""
    variables = variables or {}

    def go(e):
        replaced = node(e) if node is not None else None
        if replaced is not None:
            return replaced
        if isinstance(e, CONSTANTS):
            return e
        if isinstance(e, ir.expr.TensorLoad):
            idx = [go(i) for i in e.indices]
            new = loads(e.source, idx) if loads is not None else None
            return new if new is not None else tirx.BufferLoad(e.source, idx)
        if isinstance(e, ir.Var):
            return variables.get(e, e)
        if isinstance(e, tirx.Cast):
            return tirx.Cast(dtype_of(e), go(e.value))
        if isinstance(e, BINARY):
            return type(e)(go(e.a), go(e.b))
        if isinstance(e, tirx.Not):
            return tirx.Not(go(e.a))
        if isinstance(e, tirx.Select):
            return tirx.Select(go(e.condition), go(e.true_value), go(e.false_value))
        if call_name(e) is not None:
            return ir.Call(e.op, [go(a) for a in e.args], attrs=e.attrs, ret_ty=e.ty)
        raise UnsupportedExpr(f"{type(e).__name__} node: {e}")

    return go(expr)


def loads_in(expr) -> list:
    """Every buffer load in ``expr`` (outermost first), read with :func:`rewrite`'s node set."""
    found = []

    def record(buf, idx):
        found.append(tirx.BufferLoad(buf, idx))

    rewrite(expr, loads=record)
    return found


def uses_var(expr, var) -> bool:
    """Does ``var`` occur in ``expr`` (load indices included)?"""
    probe = ir.Var(var.name + "_probe", var.ty)
    return not same(rewrite(expr, {var: probe}), expr)
