"""ApplyStreamK: the stream-K rule on every matching PrimFunc of an IRModule, with the call sites
rewritten to pass the kernel's workspace.

dlight's ``ApplyDefaultSchedule`` cannot do this: a rule there must keep the function's
signature, and the stream-K kernel adds parameters (partials workspace, flags, worker count,
split, grid). A model that carries its own ragged reduction as a ``call_tir`` gets stream-K
without a Relax-level pattern: each PrimFunc the rule accepts (``streamk_rule.StreamK``) becomes
its kernel in destination-passing order (the function's inputs, the kernel's workspace and
scalars, then the function's outputs), and each ``call_tir`` to it allocates the workspace in the
graph as ``emit_lean_attention`` does (partials uninitialised, flags ``R.zeros``: the kernel
leaves them zero) and passes ``num_workers`` (also the grid) and ``num_splits = 0``. Other
PrimFuncs and calls are left alone; already scheduled PrimFuncs are not offered to the rule.
"""

from __future__ import annotations

import tvm
from tvm import relax, tirx

from .. import codegen
from ..plan import STREAM_K
from ..streamk_analysis import Declined
from ..streamk_rule import ATTR, StreamK
from .op import DEFAULT_CPU_WORKERS, DEFAULT_NUM_SMS, KERNEL_ATTR, OP_PATTERN_OPAQUE

CALL_TIR = "relax.call_tir"


def dps_kernel(kernel: tirx.PrimFunc, outputs: int) -> tirx.PrimFunc:
    """The kernel with the function's last ``outputs`` parameters (its outputs, just before the
    stream-K buffers) moved last, as ``call_tir`` passes them."""
    params = list(kernel.params)
    first = next(i for i, p in enumerate(params) if p.name == kernel.attrs[ATTR]["workspace"][0]["param"])
    outs = params[first - outputs:first]
    if first < outputs or any(not isinstance(p.ty, tirx.BufferType) for p in outs):
        raise ValueError(f"{kernel.attrs['global_symbol']}: its last {outputs} parameters are not output buffers")
    return tirx.PrimFunc(params[:first - outputs] + params[first:] + outs, kernel.body, kernel.ret_type, kernel.attrs)


def _outputs_of(call: relax.Call) -> int:
    ty = call.ty_args[0]
    return len(ty.fields) if isinstance(ty, relax.TupleType) else 1


def _prim_i32(x: int):
    return relax.prim_value(tirx.IntImm("int32", int(x)))


@relax.expr_functor.mutator
class _CallSites(relax.PyExprMutator):
    """Appends workspace and scalars to the ``call_tir`` calls of the rewritten PrimFuncs."""

    def __init__(self, mod: tvm.IRModule, kernels: dict, workers: int):
        super().__init__(mod)
        self.mod_, self.kernels, self.workers, self.callee = mod, kernels, workers, {}

    def transform(self) -> tvm.IRModule:
        """The kernels under new names (a GlobalVar keeps its function's type), the calls
        rewritten, the replaced PrimFuncs dropped."""
        for gv, kernel in self.kernels.items():
            self.callee[gv] = self.builder_.add_func(kernel.without_attr("global_symbol"), gv.name_hint)
        for gv, func in self.mod_.functions_items():
            if isinstance(func, relax.Function):
                self.builder_.update_func(gv, self.visit_expr(func))
        out = self.builder_.get()
        return tvm.IRModule({gv: f for gv, f in out.functions_items() if gv not in self.kernels}, attrs=out.attrs,
                            global_infos=out.global_infos)

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = self.visit_expr_post_order(call)
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name == CALL_TIR and call.args[0] in self.kernels):
            return call
        doc = self.kernels[call.args[0]].attrs[ATTR]
        extra = []
        for w in doc["workspace"]:
            shape = relax.ShapeExpr([self.workers if s == "num_workers" else int(s) for s in w["shape"]])
            alloc = relax.op.zeros(shape, str(w["dtype"])) if w["init"] == "zero" else \
                relax.op.builtin.alloc_tensor(shape, str(w["dtype"]), 0)
            extra.append(self.builder_.emit(alloc))
        extra += [_prim_i32(self.workers), _prim_i32(STREAM_K), _prim_i32(self.workers)]
        ty = call.ty_args[0]
        out = list(ty.fields) if isinstance(ty, relax.TupleType) else ty
        return relax.call_tir(self.callee[call.args[0]], [*call.args[1].fields, *extra], out)


def apply_stream_k(mod: tvm.IRModule, target: tvm.target.Target, num_workers: int | None = None,
                   rule: StreamK | None = None) -> tuple[tvm.IRModule, dict[str, str]]:
    """Run the pass; returns (new module, {PrimFunc name: the rule's body, or why it declined}).
    ``num_workers``: stream-K workers (= CUDA grid: at most the co-resident CTAs); default 4 on the
    CPU, one per SM of an H100/H200 on CUDA."""
    rule = rule or StreamK()
    target = tvm.target.Target(target) if isinstance(target, str) else target
    workers = num_workers or (DEFAULT_CPU_WORKERS if target.kind.name == "llvm" else DEFAULT_NUM_SMS)
    outputs = _outputs_per_callee(mod)
    kernels, report = {}, {}
    for gv, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc) or (func.attrs is not None and "tirx.is_scheduled" in func.attrs):
            continue
        kernel = rule.kernel(func, target)
        if isinstance(kernel, Declined) or gv not in outputs:
            report[gv.name_hint] = kernel.reason if isinstance(kernel, Declined) else "not called by call_tir"
            continue
        kernel = dps_kernel(kernel, outputs[gv]).with_attr("op_pattern", OP_PATTERN_OPAQUE)
        if target.kind.name == "cuda":
            kernel = kernel.with_attrs({"tirx.is_scheduled": True, KERNEL_ATTR: codegen.PIPELINE})
        kernels[gv] = kernel
        report[gv.name_hint] = str(kernel.attrs[ATTR]["body"])
    return _CallSites(mod, kernels, workers).transform(), report


def _outputs_per_callee(mod: tvm.IRModule) -> dict:
    """{GlobalVar of a PrimFunc: its output count} over the module's ``call_tir`` calls."""
    found = {}

    @relax.expr_functor.visitor
    class _Calls(relax.PyExprVisitor):
        def visit_call_(self, call):
            if isinstance(call.op, tvm.ir.Op) and call.op.name == CALL_TIR:
                found[call.args[0]] = _outputs_of(call)
            super().visit_call_(call)

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            _Calls().visit_expr(func)
    return found


def ApplyStreamK(target, num_workers: int | None = None, rule: StreamK | None = None):
    """A module pass: :func:`apply_stream_k`. Compile the result with ``lean_tvm.relax.build``
    (our kernels need their own TIR pipeline on CUDA)."""

    @tvm.transform.module_pass(opt_level=0, name="ApplyStreamK")
    def _pass(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return apply_stream_k(mod, target, num_workers, rule)[0]

    return _pass
