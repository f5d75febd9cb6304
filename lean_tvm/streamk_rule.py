"""StreamK: the stream-K primitive as a TVM schedule rule in dlight's style.

``StreamK().apply(func, target, tunable=False)`` takes a TensorIR ``PrimFunc`` and returns a
``tvm.s_tir.Schedule`` whose module's ``main`` is the persistent stream-K kernel, or None when
the function is not of a shape it supports (``streamk_analysis`` says which, and
:meth:`StreamK.kernel` returns the reason instead of None). What it reads from the function, not
from its name: the output's spatial axes (the tiles), a reduction axis bounded by a constant or
an int32 lengths buffer (loop bound or mask) and the combiner (a sum, or the softmax-weighted sum
that ``compute.py`` writes as separate blocks).

The block body, per recognised sum and target:

========================  ===============================  ===============================
sum                       ``cuda`` (sm_80+)                ``llvm``
========================  ===============================  ===============================
decode attention          ``attention_gpu`` tensor cores   ``attention_cpu``
GEMV ``W x``              ``gemv``'s macros                ``gemv``'s macros
any other plain sum       ``ragged_sum`` (generated)       ``ragged_sum`` (generated)
========================  ===============================  ===============================

The kernel keeps the function's parameters in their order and adds what stream-K needs: its
buffers (partials workspace, then the flags, zeroed once: the kernel leaves them zero) right
after the function's last buffer, its scalars (``num_workers``, ``num_splits``: 0 = stream-K,
``grid``: CTAs, ignored by the CPU form: one signature for both) at the end: for ``compute.py``'s
functions that is the operator library's order (``signature.ATTENTION_PARAMS``, ``GEMV_PARAMS``).
The kernel's attribute :data:`ATTR` documents them (and the body, block size...), so a caller
(``relax/streamk_pass.py``, the operator library's launcher) can allocate them. dlight's
``ApplyDefaultSchedule`` cannot use the rule: a schedule rule there must keep the signature.
"""

from __future__ import annotations

import re

import tvm
from tvm import s_tir, tirx
from tvm.s_tir.dlight import ScheduleRule

from . import ragged_sum
from . import signature as sig
from .attention_cpu import dense_cpu_body
from .attention_gpu import dense_kernel_body
from .gemv import GemvSpec, cpu_gemv_body, gpu_gemv_body
from .schedule_records import knobs_for, load_records
from .spec import GEMV_ROWS, MAX_GROUPS, AttentionSpec, GpuKnobs
from .streamk_analysis import (
    AttentionRoles,
    Declined,
    GemvRoles,
    PlainSum,
    SoftmaxSum,
    analyse,
    match_attention,
    match_gemv,
)

ATTR = "lean_tvm.stream_k"  # the kernel's description: body, workspace, scalars, block size
MIN_SM = 80  # cp.async, and for attention movmatrix and bf16 mma
SCALARS = {"num_workers": "stream-K workers (<= co-resident CTAs on CUDA)",
           "num_splits": "0: stream-K; S > 0: a fixed split of every tile into S chunks",
           "grid": "CUDA grid (CTAs; each walks workers bx, bx + grid, ...); the CPU form ignores it"}


class StreamK(ScheduleRule):
    """The stream-K rule. ``knobs``: the attention kernel's schedule (default: the schedule
    records of the target's arch); ``cpu_block_size``: rows per block of the CPU forms."""

    def __init__(self, knobs: GpuKnobs | None = None, cpu_block_size: int = 64):
        self.knobs, self.cpu_block_size = knobs, cpu_block_size

    def is_target_available(self, target: tvm.target.Target) -> bool:
        return not isinstance(cuda_arch(target), Declined)

    def apply(self, func: tirx.PrimFunc, target: tvm.target.Target, tunable: bool = False) -> s_tir.Schedule | None:
        """dlight's entry point (``tunable`` is ignored: the knobs are fixed at construction)."""
        kernel = self.kernel(func, target)
        return None if isinstance(kernel, Declined) else s_tir.Schedule(kernel)

    def kernel(self, func: tirx.PrimFunc, target: tvm.target.Target) -> tirx.PrimFunc | Declined:
        """The stream-K kernel of ``func`` for ``target``, or why the rule declines it."""
        arch = cuda_arch(target)
        if isinstance(arch, Declined):
            return arch
        pattern = analyse(func)
        if isinstance(pattern, Declined):
            return pattern
        name = str(func.attrs["global_symbol"]) if func.attrs is not None and "global_symbol" in func.attrs \
            else "main"
        if isinstance(pattern, SoftmaxSum):
            roles = match_attention(pattern, func)
            if isinstance(roles, Declined):
                return Declined(f"a softmax-weighted sum without a block body: {roles.reason}")
            return self.attention_kernel(roles, func, arch, name)
        gemv = match_gemv(pattern)
        if isinstance(gemv, GemvRoles):
            return gemv_kernel(gemv, func, arch, name)
        return ragged_sum_kernel(pattern, func, arch, name, self.cpu_block_size)

    def attention_kernel(self, roles: AttentionRoles, func, arch: str | None, name: str):
        spec = AttentionSpec(roles.dtype, roles.head_dim, min(g for g in MAX_GROUPS if g >= roles.group))
        roles_of = {roles.q: "q", roles.k: "k", roles.v: "v", roles.lens: "seq_lens", roles.o: "o",
                    roles.lse: "lse", roles.scale: "softmax_scale"}
        gm, d = spec.max_group, spec.head_dim
        workspace = [("ws_o", "float32", ["num_workers", gm, d], "any"),
                     ("ws_ml", "float32", ["num_workers", 2, gm], "any"), ("flags", "int32", ["num_workers"], "zero")]
        order = [p.name for p in sig.ATTENTION_PARAMS if p.name != "grid"]
        if arch is not None:
            knobs = self.knobs or knobs_for(load_records(arch), spec, arch)
            body, info, order = dense_kernel_body(spec, knobs), {"knobs": knobs.tag, "block_size": knobs.block_size}, \
                [*order, "grid", None]  # None: trace_buf, the kernel without the debug trace
        else:
            body, info = dense_cpu_body(spec, self.cpu_block_size), {"block_size": self.cpu_block_size}
        info["spec"] = spec.name
        return build_kernel(func, arch, name, "attention", roles_of, workspace, body, order, info)


def gemv_kernel(roles: GemvRoles, func, arch: str | None, name: str):
    spec = GemvSpec(roles.dtype)
    roles_of = {roles.w: "w", roles.x: "x", roles.lens: "k_len", roles.y: "y"}
    workspace = [("ws", "float32", ["num_workers", GEMV_ROWS], "any"), ("flags", "int32", ["num_workers"], "zero")]
    order = [p.name for p in sig.GEMV_PARAMS if arch is not None or p.name != "grid"]  # CPU: grid unused
    body = gpu_gemv_body(spec) if arch is not None else cpu_gemv_body(spec)
    return build_kernel(func, arch, name, "gemv", roles_of, workspace, body, order, spec.describe())


def ragged_sum_kernel(pattern: PlainSum, func, arch: str | None, name: str, cpu_block_size: int):
    made = ragged_sum.kernel_body(pattern, "cuda" if arch is not None else "llvm", cpu_block_size)
    if isinstance(made, Declined):
        return made
    body, info = made
    workspace = [(n, w["dtype"], w["shape"], w["init"]) for n, w in zip(("ws", "flags"), info.pop("workspace"),
                                                                       strict=True)]
    order = ["ws", "flags", "num_workers", "num_splits", *(["grid"] if arch is not None else [])]
    return build_kernel(func, arch, name, "ragged_sum", None, workspace, body, order, info)


def build_kernel(func, arch: str | None, name: str, kind: str, roles_of: dict | None, workspace: list, body,
                 order: list, info: dict) -> tirx.PrimFunc | Declined:
    """``func``'s parameters, the ``workspace`` buffers (name, dtype, shape, init) right after the
    last of its buffers, and the stream-K scalars at the end. ``roles_of`` maps each parameter of
    ``func`` to the name the body macro takes it by (a buffer's parameter is named by its role, a
    scalar keeps its own name); None: the body reads ``func``'s parameters directly. ``order``:
    the body macro's arguments by role (None: Python's None)."""
    scalars = [sig.Param(s, "int32") for s in SCALARS]
    params, names = [], {}
    for p in func.params:
        is_buf = isinstance(p.ty, tirx.BufferType)
        if roles_of is None:
            params.append(sig.Param(p.name, var=p))
            continue
        role = next((r for q, r in roles_of.items() if p.same_as(q)), None)
        if role is None:
            return Declined(f"{kind}: parameter {p.name} has no role in the kernel")
        names[role] = role if is_buf else p.name
        params.append(sig.Param(names[role]) if is_buf else sig.Param(p.name, str(p.ty.dtype)))
    last = max((i for i, p in enumerate(func.params) if isinstance(p.ty, tirx.BufferType)), default=-1)
    params[last + 1:last + 1] = sig.handles(*(w[0] for w in workspace))
    params += scalars
    args = [None if r is None else names.get(r, r) for r in order]
    attrs = {"tirx.noalias": True, **({"tirx.is_scheduled": True} if arch is not None else {})}
    kernel = sig.prim_func(name, params, body, args, attrs)
    doc = {"body": kind, "target": arch or "llvm", **info, "scalars": SCALARS,
           "workspace": [{"param": kernel.params[last + 1 + i].name, "dtype": dt, "shape": shape, "init": init}
                         for i, (_, dt, shape, init) in enumerate(workspace)]}
    return kernel.with_attr(ATTR, doc)


def cuda_arch(target: tvm.target.Target) -> str | None | Declined:
    """None for ``llvm``, the arch (``"sm_90a"``) for CUDA sm_80 or newer, else why not."""
    kind = target.kind.name
    if kind == "llvm":
        return None
    if kind != "cuda":
        return Declined(f"target {kind}: the rule builds for llvm and cuda")
    arch = str(target.attrs.get("arch", ""))
    m = re.fullmatch(r"sm_(\d+)a?", arch)
    if m is None or int(m.group(1)) < MIN_SM:
        return Declined(f"target arch {arch or '(none)'}: stream-K's pipeline needs cp.async (sm_{MIN_SM} or newer)")
    return arch
