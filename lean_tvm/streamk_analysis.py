"""What the stream-K rule reads from a TensorIR function, and why it declines one.

Analysis only (nothing here schedules). A function is of the supported shape when, once its
elementwise intermediates are inlined, its reductions over one axis ``r`` combine as

* a plain sum:  ``acc[S] = sum_r value(S, r)``, then at most one elementwise block writing the
  output from ``acc`` (:class:`PlainSum`); or
* a softmax-weighted sum (``compute.py``'s decode attention): ``m[S'] = max_r s``,
  ``den[S'] = sum_r exp(s - m)``, ``acc[S] = sum_r exp(s - m) * v``, outputs from them
  (:class:`SoftmaxSum`), which a stream-K kernel computes as the online-softmax state
  (running max, rescaled sum, rescaled weighted sum) and merges by rescaling;

where ``S`` are the output's spatial axes and ``r`` runs over a constant or symbolic extent, or
is bounded per output by an int32 lengths buffer, ``lens[b]`` with ``b`` one of ``S`` (or a
constant index), written as the loop's extent or as the mask ``if_then_else(r < lens[b], x, e)``
(``e`` the combiner's identity) (:class:`RaggedExtent`).

:func:`analyse` returns one of those or :class:`Declined` with the reason; :func:`match_attention`
and :func:`match_gemv` recognise the two sums that have a hand-written block body.
"""

from __future__ import annotations

import dataclasses

from tvm import ir, s_tir, tirx

from .spec import DTYPES, HEAD_DIMS, MAX_GROUPS
from .tir_expr import (
    UnsupportedExpr,
    call_name,
    dtype_of,
    is_buffer,
    is_load,
    loads_in,
    rewrite,
    same,
    strip_casts,
    uses_var,
)

COMBINERS = {tirx.Add: "sum", tirx.Max: "max", tirx.Min: "min", tirx.Mul: "product"}
NEG_INF_BELOW = -3.0e38  # a max's identity: -inf or the float32 minimum


@dataclasses.dataclass(frozen=True)
class Declined:
    """The rule does not apply; ``reason`` says which part of the function it could not read."""

    reason: str


@dataclasses.dataclass(frozen=True)
class Block:
    """One ``T.sblock`` of the function: ``buffer[spatial] = value`` (a spatial block) or
    ``buffer[spatial] = combine(buffer[spatial], value)`` over ``reduce`` (a reduction)."""

    name: str
    spatial: tuple  # iteration variables, in the order they index the written buffer
    reduce: tuple
    extent: dict  # iteration variable -> its extent
    bound: dict  # iteration variable -> the extent of the loop it is bound to (in iteration variables)
    buffer: ir.Var
    value: ir.Expr
    combiner: str | None  # None for a spatial block; "sum", "max", "min", "product" or "unknown"

    def self_load(self):
        return tirx.BufferLoad(self.buffer, list(self.spatial))


@dataclasses.dataclass(frozen=True)
class RaggedExtent:
    """The reduction axis: ``rows`` long in the buffers (the cache length), of which an output
    whose sequence index is ``b`` sees ``lens[b]`` (``lens`` None: all ``rows``). ``position``:
    which output axis is ``b`` (None when ``lens`` is indexed by the constant ``index``)."""

    rows: ir.Expr
    lens: ir.Var | None = None
    position: int | None = None
    index: int = 0


@dataclasses.dataclass(frozen=True)
class PlainSum:
    """``acc[S] = sum_{r < extent} value``, then ``output = epilogue(acc)`` (``epilogue`` None:
    ``acc`` is the output). ``value`` is in ``block``'s variables, its mask removed."""

    block: Block
    row: ir.Var
    value: ir.Expr
    extent: RaggedExtent
    epilogue: Block | None
    row_producers: tuple  # reductions nested in ``value`` (none is supported by the generic body)


@dataclasses.dataclass(frozen=True)
class SoftmaxSum:
    """``m = max_r logits``, ``den = sum_r exp(logits - m)``, ``acc = sum_r exp(logits - m) * value``
    (in ``acc``'s variables, masks removed) and the ``outputs`` computed from them."""

    max_block: Block
    den_block: Block
    acc_block: Block
    row: ir.Var
    logits: ir.Expr
    value: ir.Expr
    extent: RaggedExtent
    outputs: tuple  # spatial blocks writing parameters
    row_producers: tuple


# --------------------------------------------------------------------------------------------
# Reading the blocks
# --------------------------------------------------------------------------------------------


def read_blocks(func: tirx.PrimFunc) -> tuple[list[Block], list[ir.Var]] | Declined:
    """The function's blocks in order and its intermediate buffers; declines anything but a root
    block holding perfect loop nests of one block each."""
    root = func.body
    if not isinstance(root, s_tir.SBlockRealize):
        return Declined("the body is not a TensorIR root block (write it with T.sblock)")
    body = root.block.body
    stmts = list(body.seq) if isinstance(body, tirx.SeqStmt) else [body]
    blocks = []
    for stmt in stmts:
        loops = []
        while isinstance(stmt, tirx.For):
            loops.append(stmt)
            stmt = stmt.body
        if not isinstance(stmt, s_tir.SBlockRealize):
            return Declined(f"a {type(stmt).__name__} where a loop nest of one block was expected")
        block = read_block(stmt, loops)
        if isinstance(block, Declined):
            return block
        if any(b.name == block.name for b in blocks):
            return Declined(f"two blocks named {block.name}")
        blocks.append(block)
    return blocks, list(root.block.alloc_buffers)


def read_block(realize, loops) -> Block | Declined:
    block = realize.block
    name = block.name_hint
    bound, spatial, reduce, extent, to_iter = {}, [], [], {}, {}
    for iv, value in zip(block.iter_vars, realize.iter_values, strict=True):
        loop = next((lp for lp in loops if lp.loop_var.same_as(value)), None)
        if loop is None or not isinstance(iv.dom.min, tirx.IntImm) or iv.dom.min.value != 0:
            return Declined(f"block {name}: iteration variable {iv.var} is not bound to a loop from 0")
        extent[iv.var], bound[iv.var], to_iter[loop.loop_var] = iv.dom.extent, loop.extent, iv.var
        if iv.iter_type == tirx.IterVar.DataPar:
            spatial.append(iv.var)
        elif iv.iter_type == tirx.IterVar.CommReduce:
            reduce.append(iv.var)
        else:
            return Declined(f"block {name}: iteration variable {iv.var} is neither spatial nor a reduction")
    bound = {v: rewrite(e, to_iter) for v, e in bound.items()}
    store = block.body
    if not isinstance(store, tirx.BufferStore):
        return Declined(f"block {name}: the body is not one buffer store")
    indices = list(store.indices)
    order = [next((v for v in spatial if v.same_as(i)), None) for i in indices]
    if None in order or len(order) != len(spatial):
        return Declined(f"block {name}: the output {store.buffer.name}{indices} is not indexed by its spatial axes")
    value, combiner = store.value, None
    if reduce:
        if block.init is None:
            return Declined(f"block {name}: a reduction without T.init()")
        combiner = COMBINERS.get(type(value), "unknown")
        self_load = tirx.BufferLoad(store.buffer, indices)
        if combiner != "unknown" and same(value.a, self_load):
            value = value.b
        elif combiner != "unknown" and same(value.b, self_load):
            value = value.a
        else:
            combiner = "unknown"
    return Block(name, tuple(order), tuple(reduce), extent, bound, store.buffer, value, combiner)


def inliner(blocks: list[Block], intermediates: list[ir.Var]):
    """``inline(expr)``: loads of intermediates written by spatial blocks replaced by the value
    those blocks store (what ``compute_inline`` would do)."""
    producers = {b.buffer: b for b in blocks if not b.reduce and any(b.buffer.same_as(i) for i in intermediates)}

    def inline(expr):
        def load(buf, idx):
            p = producers.get(buf)
            return None if p is None else inline(rewrite(p.value, dict(zip(p.spatial, idx, strict=True))))

        return rewrite(expr, loads=load)

    return inline


# --------------------------------------------------------------------------------------------
# The ragged axis
# --------------------------------------------------------------------------------------------


def is_identity(e, combiner: str) -> bool:
    e = strip_casts(e)
    if not isinstance(e, (tirx.IntImm, tirx.FloatImm)):
        return False
    return e.value == 0 if combiner == "sum" else combiner == "max" and e.value <= NEG_INF_BELOW


def as_mask(e):
    """(condition, kept, otherwise) of ``if_then_else``/``Select``, else None."""
    if call_name(e) == "if_then_else":
        return tuple(e.args)
    if isinstance(e, tirx.Select):
        return e.condition, e.true_value, e.false_value
    return None


def row_bound(cond, row):
    """``b`` of the condition ``row < b`` (or ``b > row``), else None."""
    if isinstance(cond, tirx.LT) and strip_casts(cond.a).same_as(row):
        return cond.b
    if isinstance(cond, tirx.GT) and strip_casts(cond.b).same_as(row):
        return cond.a
    return None


def assume(expr, cond):
    """``expr`` inside ``if cond``: masks by the same condition reduced to their kept value."""

    def node(e):
        m = as_mask(e)
        return assume(m[1], cond) if m is not None and same(m[0], cond) else None

    return rewrite(expr, node=node)


def unmask(block: Block, value, row) -> tuple[ir.Expr | None, ir.Expr] | Declined:
    """(the bound of ``row`` the value is masked by, or None; the value inside the mask)."""
    m = as_mask(value)
    if m is None or row_bound(m[0], row) is None:
        return None, value
    cond, kept, other = m
    if not is_identity(other, block.combiner):
        return Declined(f"block {block.name}: outside the mask {cond} the value is {other}, not the "
                        f"identity of its {block.combiner}")
    return row_bound(cond, row), assume(kept, cond)


def ragged_extent(block: Block, row, mask_bound, params) -> RaggedExtent | Declined:
    """Read the bound of ``row``: the loop's extent or the mask's, a lengths buffer indexed by an
    output axis or a constant; an extent that depends on the output otherwise cannot be planned."""
    bound = mask_bound
    if not same(block.bound[row], block.extent[row]):
        if bound is not None:
            return Declined(f"block {block.name}: {row} is bounded by both its loop and a mask")
        bound = block.bound[row]
    if bound is None:
        if any(uses_var(block.extent[row], v) for v in block.spatial):
            return Declined(f"block {block.name}: the extent of {row} depends on the output index")
        return RaggedExtent(rows=block.extent[row])
    lens = strip_casts(bound)
    if not (is_load(lens) and any(lens.source.same_as(p) for p in params) and len(lens.indices) == 1
            and dtype_of(lens) == "int32"):
        return Declined(f"block {block.name}: the extent of {row} is {bound}, not lens[b] of an int32 lengths "
                        "parameter: the plan cannot follow it")
    index = strip_casts(lens.indices[0])
    if isinstance(index, tirx.IntImm):
        return RaggedExtent(rows=block.extent[row], lens=lens.source, index=index.value)
    position = next((i for i, v in enumerate(block.spatial) if v.same_as(index)), None)
    if position is None:
        return Declined(f"block {block.name}: the lengths are indexed by {index}, not by one output axis: the plan "
                        "cannot follow them")
    return RaggedExtent(rows=block.extent[row], lens=lens.source, position=position)


# --------------------------------------------------------------------------------------------
# The combiner
# --------------------------------------------------------------------------------------------


def analyse(func: tirx.PrimFunc) -> PlainSum | SoftmaxSum | Declined:
    """Read ``func`` into a :class:`PlainSum` or :class:`SoftmaxSum`, or say why not."""
    try:
        return _analyse(func)
    except UnsupportedExpr as e:
        return Declined(f"an expression the rule does not read: {e}")


def _analyse(func):
    read = read_blocks(func)
    if isinstance(read, Declined):
        return read
    blocks, intermediates = read
    params = [p for p in func.params if is_buffer(p)]
    inline = inliner(blocks, intermediates)
    reductions = [b for b in blocks if b.reduce]
    if not reductions:
        return Declined("no reduction: nothing for stream-K to split")
    for b in reductions:
        if len(b.reduce) != 1:
            return Declined(f"block {b.name}: reduces over {len(b.reduce)} axes (the rule splits one)")
    values = {b.name: inline(b.value) for b in reductions}
    nested = row_producers(reductions, values)
    outer = [b for b in reductions if b.name not in nested]
    unmasked = {}
    for b in outer:
        if b.combiner not in ("sum", "max"):
            return Declined(f"block {b.name}: combiner {b.combiner} is not one the rule knows (sum, or the "
                            "max/sum/weighted sum of a softmax)")
        got = unmask(b, values[b.name], b.reduce[0])
        if isinstance(got, Declined):
            return got
        extent = ragged_extent(b, b.reduce[0], got[0], params)
        if isinstance(extent, Declined):
            return extent
        unmasked[b.name] = (got[1], extent)
    extents = [e for _, e in unmasked.values()]
    if any(not same_extent(extents[0], e) for e in extents[1:]):
        return Declined("the reductions run over different extents")
    outputs = [b for b in blocks if not b.reduce and any(b.buffer.same_as(p) for p in params)]
    producers = tuple(b for b in reductions if b.name in nested)
    if len(outer) == 1 and outer[0].combiner == "sum":
        return plain_sum(outer[0], *unmasked[outer[0].name], outputs, inline, producers, params)
    if sorted(b.combiner for b in outer) == ["max", "sum", "sum"]:
        return softmax_sum(outer, unmasked, outputs, producers)
    kinds = ", ".join(f"{b.name}: {b.combiner}" for b in outer)
    return Declined(f"reductions ({kinds}) are not a combiner the rule knows (a sum, or max + sum of exp + "
                    "weighted sum of exp)")


def row_producers(reductions: list[Block], values: dict) -> set[str]:
    """Reductions whose result another reduction reads per row (at an index using its reduction
    axis): they are part of that reduction's summand, not reductions stream-K splits."""
    by_buffer = {b.buffer: b for b in reductions}
    nested = set()
    for b in reductions:
        for ld in loads_in(values[b.name]):
            producer = by_buffer.get(ld.source)
            if producer is not None and producer is not b and any(uses_var(i, b.reduce[0]) for i in ld.indices):
                nested.add(producer.name)
    return nested


def same_extent(a: RaggedExtent, b: RaggedExtent) -> bool:
    same_lens = (a.lens is None and b.lens is None) or (a.lens is not None and b.lens is not None
                                                          and a.lens.same_as(b.lens))
    return same_lens and same(a.rows, b.rows) and a.position == b.position and a.index == b.index


def plain_sum(block, value, extent, outputs, inline, producers, params) -> PlainSum | Declined:
    if any(block.buffer.same_as(p) for p in params):
        if outputs:
            return Declined(f"block {block.name} writes the output and other blocks write more: the rule handles one")
        return PlainSum(block, block.reduce[0], value, extent, None, producers)
    readers = [o for o in outputs if any(is_load(ld, block.buffer) for ld in loads_in(inline(o.value)))]
    if len(outputs) != 1 or len(readers) != 1:
        return Declined(f"the sum {block.name} is not followed by exactly one elementwise block writing the output")
    epi = outputs[0]
    if len(epi.spatial) != len(block.spatial) or not all(same(epi.extent[a], block.extent[b]) for a, b in
                                                         zip(epi.spatial, block.spatial, strict=True)):
        return Declined(f"block {epi.name} does not have the shape of the sum {block.name}")
    epi_value = inline(epi.value)
    mine = tirx.BufferLoad(block.buffer, list(epi.spatial))
    if any(is_load(ld, block.buffer) and not same(ld, mine) for ld in loads_in(epi_value)):
        return Declined(f"block {epi.name} reads {block.buffer.name} at other indices than its own")
    epi = dataclasses.replace(epi, value=epi_value)
    return PlainSum(block, block.reduce[0], value, extent, epi, producers)


def softmax_sum(outer, unmasked, outputs, producers) -> SoftmaxSum | Declined:
    """Check den = sum exp(s - m) and acc = sum exp(s - m) * v against m = max s."""
    mx = next(b for b in outer if b.combiner == "max")
    sums = [b for b in outer if b.combiner == "sum"]
    logits = unmasked[mx.name][0]
    weights = {b.name: softmax_weight(unmasked[b.name][0], mx, logits, b) for b in sums}
    plain = [b for b in sums if weights[b.name] is not None and weights[b.name][1] is None]
    weighted = [b for b in sums if weights[b.name] is not None and weights[b.name][1] is not None]
    if len(plain) != 1 or len(weighted) != 1:
        return Declined(f"the max {mx.name} is not followed by a sum of exp(s - max) and a weighted sum of it")
    den, acc = plain[0], weighted[0]
    acc_logits, value = weights[acc.name]
    return SoftmaxSum(mx, den, acc, acc.reduce[0], acc_logits, value, unmasked[acc.name][1], tuple(outputs), producers)


def softmax_weight(value, mx: Block, logits, block: Block):
    """(logits in ``block``'s variables, the other factor or None) when ``value`` is
    ``exp(logits - m[..])`` or ``exp(logits - m[..]) * v`` (either order), else None."""
    factors = [value] if not isinstance(value, tirx.Mul) else [value.a, value.b]
    for i, f in enumerate(factors):
        if call_name(f) != "exp" or not isinstance(f.args[0], tirx.Sub):
            continue
        s, m = f.args[0].a, f.args[0].b
        if not is_load(m, mx.buffer):
            continue
        mapping = dict(zip(mx.spatial, m.indices, strict=True))
        mapping[mx.reduce[0]] = block.reduce[0]
        if same(rewrite(logits, mapping), s):
            rest = factors[1 - i] if len(factors) == 2 else None
            return s, rest
    return None


# --------------------------------------------------------------------------------------------
# Sums with a hand-written block body
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AttentionRoles:
    """Decode attention read from a :class:`SoftmaxSum`: the parameters by role and the spec."""

    q: ir.Var
    k: ir.Var
    v: ir.Var
    lens: ir.Var
    o: ir.Var
    lse: ir.Var
    scale: ir.Var
    dtype: str
    head_dim: int
    group: int


def as_product(e) -> list:
    """The factors of ``a * b * ...``."""
    return as_product(e.a) + as_product(e.b) if isinstance(e, tirx.Mul) else [e]


def f32_load(e):
    """``buf[idx]`` of ``Cast("float32", buf[idx])`` (or an fp32 load), else None."""
    if isinstance(e, tirx.Cast) and dtype_of(e) == "float32" and is_load(e.value):
        return e.value
    return e if is_load(e) and dtype_of(e) == "float32" else None


def kv_head(index, h):
    """G of ``h // G`` (floor division by a constant; ``h`` itself is G = 1), else None."""
    if index.same_as(h):
        return 1
    if isinstance(index, tirx.FloorDiv) and index.a.same_as(h) and isinstance(index.b, tirx.IntImm):
        return index.b.value
    return None


def match_attention(pattern: SoftmaxSum, func: tirx.PrimFunc) -> AttentionRoles | Declined:
    """Decode attention (``compute.make_decode_attention``): logits ``scale * sum_d q[b, h, d] *
    k[b, h // G, r, d]`` (fp32 products of fp16/bf16 loads), value ``v[b, h // G, r, d]``, lengths
    ``lens[b]``, outputs ``o = acc / den`` and ``lse = m + log(den)`` (natural log; each may be
    guarded by ``den > 0`` with 0 and -inf: the kernel's empty-sequence values)."""
    acc = pattern.acc_block
    if len(acc.spatial) != 3 or pattern.extent.lens is None or pattern.extent.position != 0:
        return Declined("attention: expected acc[b, h, d] with the lengths indexed by b")
    b, h, d = acc.spatial
    r = pattern.row
    factors = as_product(pattern.logits)
    scales = [f for f in factors if isinstance(f, ir.Var) and not is_buffer(f) and str(f.ty.dtype) == "float32"]
    dots = [f for f in factors if is_load(f)]
    if len(factors) != 2 or len(scales) != 1 or len(dots) != 1 or not any(scales[0].same_as(p) for p in func.params):
        return Declined(f"attention: logits {pattern.logits} are not a scale parameter times a dot product")
    dot = next((p for p in pattern.row_producers if dots[0].source.same_as(p.buffer)), None)
    if dot is None or dot.combiner != "sum" or len(dot.spatial) != 3:
        return Declined("attention: the logits are not a sum over the head dimension")
    if not all(same(i, x) for i, x in zip(dots[0].indices, (b, h, r), strict=True)):
        return Declined("attention: the scores are not read as s[b, h, r]")
    qb, qh, ql = dot.spatial
    dd = dot.reduce[0]
    terms = [f32_load(f) for f in as_product(dot.value)]
    if len(terms) != 2 or None in terms:
        return Declined("attention: the score is not a product of two fp32-cast loads")
    q = next((t for t in terms if len(t.indices) == 3), None)
    k = next((t for t in terms if len(t.indices) == 4), None)
    if q is None or k is None or not all(same(i, x) for i, x in zip(q.indices, (qb, qh, dd), strict=True)):
        return Declined("attention: no q[b, h, d] among the score's factors")
    group = kv_head(k.indices[1], qh)
    if group is None or not all(same(i, x) for i, x in zip([k.indices[j] for j in (0, 2, 3)], (qb, ql, dd),
                                                          strict=True)):
        return Declined("attention: no k[b, h // G, r, d] among the score's factors")
    v = f32_load(pattern.value)
    if v is None or len(v.indices) != 4 or kv_head(v.indices[1], h) != group or not all(
            same(i, x) for i, x in zip([v.indices[j] for j in (0, 2, 3)], (b, r, d), strict=True)):
        return Declined("attention: the weighted value is not v[b, h // G, r, d]")
    dtype = dtype_of(q)
    if dtype not in DTYPES or dtype_of(k) != dtype or dtype_of(v) != dtype:
        return Declined(f"attention: q, k, v must share one of {DTYPES}")
    head_dim = dot.extent[dd]
    if not isinstance(head_dim, tirx.IntImm) or head_dim.value not in HEAD_DIMS or not same(acc.extent[d], head_dim):
        return Declined(f"attention: head dim {head_dim} is not one of {HEAD_DIMS}")
    if group > max(MAX_GROUPS):
        return Declined(f"attention: group {group} exceeds {max(MAX_GROUPS)}")
    o = next((x for x in pattern.outputs if is_attention_output(x, pattern)), None)
    lse = next((x for x in pattern.outputs if is_natural_lse(x, pattern)), None)
    if o is None or lse is None or len(pattern.outputs) != 2:
        return Declined("attention: the outputs are not o = acc / den and lse = max + log(den)")
    return AttentionRoles(q.source, k.source, v.source, pattern.extent.lens, o.buffer, lse.buffer, scales[0], dtype,
                          head_dim.value, group)


def guarded(e, positive_of, empty: float):
    """The value of ``if_then_else(den > 0, x, empty)`` (or ``e`` itself when unguarded)."""
    m = as_mask(e)
    if m is None:
        return e
    cond, kept, other = m
    ok = isinstance(cond, tirx.GT) and is_load(cond.a, positive_of) and isinstance(strip_casts(other), tirx.FloatImm)
    return kept if ok and strip_casts(other).value == empty else None


def is_attention_output(block: Block, p: SoftmaxSum) -> bool:
    if not isinstance(block.value, tirx.Cast) or len(block.spatial) != 3:
        return False
    ratio = guarded(block.value.value, p.den_block.buffer, 0.0)
    return (isinstance(ratio, tirx.Div) and same(ratio.a, tirx.BufferLoad(p.acc_block.buffer, list(block.spatial)))
            and same(ratio.b, tirx.BufferLoad(p.den_block.buffer, list(block.spatial[:2]))))


def is_natural_lse(block: Block, p: SoftmaxSum) -> bool:
    if len(block.spatial) != 2 or dtype_of(block.value) != "float32":
        return False
    total = guarded(block.value, p.den_block.buffer, float("-inf"))
    if not isinstance(total, tirx.Add):
        return False
    m_here, den_here = (tirx.BufferLoad(x.buffer, list(block.spatial)) for x in (p.max_block, p.den_block))
    for m, lg in ((total.a, total.b), (total.b, total.a)):
        if same(m, m_here) and call_name(lg) == "log" and same(lg.args[0], den_here):
            return True
    return False


@dataclasses.dataclass(frozen=True)
class GemvRoles:
    """y = W x read from a :class:`PlainSum`."""

    w: ir.Var
    x: ir.Var
    lens: ir.Var
    y: ir.Var
    dtype: str


def match_gemv(pattern: PlainSum) -> GemvRoles | Declined:
    """``y[n] = cast(sum_{c < lens[0]} w[n, c] * x[c])`` with fp32 products of fp16/bf16 loads."""
    blk = pattern.block
    if len(blk.spatial) != 1 or pattern.extent.lens is None or pattern.extent.position is not None:
        return Declined("gemv: expected acc[n] over c < lens[0]")
    if pattern.extent.index != 0 or dtype_of(blk.self_load()) != "float32" or pattern.row_producers:
        return Declined("gemv: expected an fp32 sum over c < lens[0]")
    (n,), c = blk.spatial, pattern.row
    terms = [f32_load(f) for f in as_product(pattern.value)]
    if len(terms) != 2 or None in terms:
        return Declined("gemv: the summand is not a product of two fp32-cast loads")
    w = next((t for t in terms if len(t.indices) == 2), None)
    x = next((t for t in terms if len(t.indices) == 1), None)
    if w is None or x is None or not (same(w.indices[0], n) and same(w.indices[1], c) and same(x.indices[0], c)):
        return Declined("gemv: the summand is not w[n, c] * x[c]")
    dtype = dtype_of(w)
    epi = pattern.epilogue
    if dtype not in DTYPES or dtype_of(x) != dtype or epi is None or dtype_of(epi.self_load()) != dtype:
        return Declined(f"gemv: w, x and y must share one of {DTYPES}")
    if not (isinstance(epi.value, tirx.Cast) and same(epi.value.value, tirx.BufferLoad(blk.buffer, list(epi.spatial)))):
        return Declined("gemv: the output is not the sum cast to the input dtype")
    return GemvRoles(w.source, x.source, pattern.extent.lens, epi.buffer, dtype)
