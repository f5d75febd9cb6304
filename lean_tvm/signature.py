"""One builder for the PrimFunc signature of every kernel (attention, paged attention, GEMV).

A kernel's body is a TIR macro that declares its buffers from the parameters (``match_buffer``)
and runs the walk. What differs between the forms of one kernel is only its parameter list: the
operator library's order, Relax's destination-passing order (outputs after the scalars), or
debug parameters. TVMScript parses a function from source, so this module writes the ``def``
line once, from a list of :class:`Param`, and calls the body macro with its arguments by name
(``None`` for one the form leaves out).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import tvm
from tvm.script import tirx as T

SCALAR_TYPES = ("int32", "int64", "float32")


@dataclasses.dataclass(frozen=True)
class Param:
    name: str
    type: str = "handle"  # a buffer, or one of SCALAR_TYPES
    var: object = None  # a parameter of another function, kept as it is (its buffer or scalar variable)


def handles(*names: str) -> list[Param]:
    return [Param(n) for n in names]


def scalars(**types: str) -> list[Param]:
    return [Param(n, t) for n, t in types.items()]


def outputs_last(params: Sequence[Param], outputs: Sequence[str]) -> list[Param]:
    """Destination-passing order (Relax's ``call_tir``): every other parameter, then ``outputs``."""
    by_name = {p.name: p for p in params}
    return [p for p in params if p.name not in outputs] + [by_name[n] for n in outputs]


def prim_func(name: str, params: Sequence[Param], body: Callable, body_args: Sequence[str | None],
              attrs: dict) -> tvm.tirx.PrimFunc:
    """``def <name>(<params>): T.func_attr(attrs); body(<body_args>)`` as a PrimFunc whose
    ``global_symbol`` is ``name``. ``body_args`` name parameters (in the body macro's own order);
    ``None`` passes Python's None (the body leaves that part out). A parameter with a ``var`` is
    that variable itself, in its place in the list: the body refers to it directly (the stream-K
    rule keeps a function's own buffers this way), so it is not a body argument."""
    parsed = [p for p in params if p.var is None]
    known = {p.name for p in parsed}
    for p in parsed:
        if p.type != "handle" and p.type not in SCALAR_TYPES:
            raise ValueError(f"parameter {p.name}: type {p.type!r} is not a handle or one of {SCALAR_TYPES}")
    missing = [a for a in body_args if a is not None and a not in known]
    if missing:
        raise ValueError(f"{name}: body arguments {missing} are not parameters")
    sig = ", ".join(f"{p.name}: T.{p.type}" for p in parsed)
    args = ", ".join("None" if a is None else a for a in body_args)
    src = f"@T.prim_func(s_tir=True)\ndef {name}({sig}):\n    T.func_attr(attrs)\n    body({args})\n"
    kept = len(parsed) < len(params)
    # With kept parameters the parsed function alone refers to variables it does not declare.
    func = tvm.script.from_source(src, extra_vars={"T": T, "body": body, "attrs": attrs}, check_well_formed=not kept)
    if kept:
        made = dict(zip((p.name for p in parsed), func.params, strict=True))
        func = tvm.tirx.PrimFunc([made[p.name] if p.var is None else p.var for p in params], func.body,
                                 func.ret_type, func.attrs)
        tvm.s_tir.analysis.verify_well_formed(func)
    return func.with_attr("global_symbol", name)


# Decode attention over one KV cache: the operator library's order (destination-passing: OUTPUTS
# moved last with ``outputs_last``).
ATTENTION_PARAMS = (handles("q", "k", "v", "seq_lens", "o", "lse", "ws_o", "ws_ml", "flags")
                    + scalars(softmax_scale="float32", num_workers="int32", num_splits="int32", grid="int32"))
ATTENTION_OUTPUTS = ("o", "lse")
# The dense kernel over an fp8 cache (one token, no start rows): the per-KV-head scales after the lengths.
ATTENTION_FP8_PARAMS = (handles("q", "k", "v", "seq_lens", "k_scale", "v_scale", "o", "lse", "ws_o", "ws_ml", "flags")
                        + scalars(softmax_scale="float32", num_workers="int32", num_splits="int32", grid="int32"))
# The split-K GEMV y = W x.
GEMV_PARAMS = (handles("w", "x", "k_len", "y", "ws", "flags")
               + scalars(num_workers="int32", num_splits="int32", grid="int32"))
# Decode attention over a paged (or dense, through a one-page-per-sequence table) KV cache with
# several query tokens per sequence and a first valid row per sequence.
PAGED_PARAMS = (handles("q", "k", "v", "block_table", "seq_lens", "leftpad", "o", "lse", "ws_o", "ws_ml", "flags")
                + scalars(softmax_scale="float32", cache_len="int32", page_size_log2="int32", num_workers="int32",
                          num_splits="int32", grid="int32"))
# The paged form over an fp8 cache: the per-KV-head scales (fp32 [Hkv], any stride) after the
# start rows; the stored value times its head's scale is the real K/V.
PAGED_FP8_PARAMS = (handles("q", "k", "v", "block_table", "seq_lens", "leftpad", "k_scale", "v_scale", "o", "lse",
                            "ws_o", "ws_ml", "flags")
                    + scalars(softmax_scale="float32", cache_len="int32", page_size_log2="int32", num_workers="int32",
                              num_splits="int32", grid="int32"))
