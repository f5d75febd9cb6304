"""The stream-K schedule rule (``lean_tvm.streamk.StreamK``): what it recognises and what it
declines, its CPU kernels against numpy / the direct generators, the Relax pass, and the PTX of the
attention and GEMV kernels it builds against the direct generators' (byte-identical entries)."""

import dataclasses
import functools
import re
import runpy
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("tvm")

import tvm  # noqa: E402
from segment_sum import VARIANTS, make_segment_sum, reference  # noqa: E402
from tvm import relax  # noqa: E402
from tvm.script import tirx as T  # noqa: E402

from lean_tvm import codegen, streamk  # noqa: E402
from lean_tvm import relax as lean_relax  # noqa: E402
from lean_tvm.attention_cpu import make_cpu_kernel  # noqa: E402
from lean_tvm.attention_gpu import make_gpu_kernel  # noqa: E402
from lean_tvm.compute import make_decode_attention, make_gemv  # noqa: E402
from lean_tvm.gemv import GEMV_SPECS, make_cpu_gemv, make_gpu_gemv  # noqa: E402
from lean_tvm.reference import decode_attention_reference  # noqa: E402
from lean_tvm.relax.streamk_pass import apply_stream_k  # noqa: E402
from lean_tvm.schedule_records import batch_tile_cost, knobs_for, load_records  # noqa: E402
from lean_tvm.spec import AttentionSpec, GpuKnobs  # noqa: E402
from lean_tvm.streamk_rule import ATTR, StreamK  # noqa: E402

LLVM = tvm.target.Target("llvm")
SM90 = tvm.target.Target({"kind": "cuda", "arch": "sm_90a"})
needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")


def kernel(func, target=LLVM, rule=None):
    got = (rule or StreamK()).kernel(func, target)
    assert isinstance(got, tvm.tirx.PrimFunc), getattr(got, "reason", got)
    return got


@functools.cache
def cpu_segment_sum(head_dim: int, dtype: str, loop_bound: bool = False):
    return codegen.cpu_function(kernel(make_segment_sum(head_dim, dtype, loop_bound)))


# --------------------------------------------------------------------------------------------
# Recognised
# --------------------------------------------------------------------------------------------


def test_the_rule_is_reachable_as_streamk_StreamK_and_is_a_dlight_rule():
    from tvm.s_tir.dlight import ScheduleRule

    assert streamk.StreamK is StreamK and isinstance(StreamK(), ScheduleRule)
    sch = StreamK().apply(make_segment_sum(64, "float16"), LLVM, tunable=False)
    assert isinstance(sch, tvm.s_tir.Schedule) and ATTR in sch.mod["main"].attrs


@pytest.mark.parametrize("dtype,head_dim,group,bound", [("bfloat16", 64, 4, 8), ("float16", 64, 1, 8),
                                                         ("bfloat16", 64, 16, 16)])
def test_decode_attention_gets_the_tensor_core_body_for_its_group_bound(dtype, head_dim, group, bound):
    k = kernel(make_decode_attention(dtype, head_dim, group), SM90, StreamK(knobs=GpuKnobs()))
    doc = k.attrs[ATTR]
    assert doc["body"] == "attention" and doc["spec"] == AttentionSpec(dtype, head_dim, bound).name
    assert [p.name for p in k.params] == ["Q", "K", "V", "SL", "O", "LSE", "WSO", "WSML", "FLAGS", "softmax_scale",
                                          "num_workers", "num_splits", "grid"]
    assert [dict(w)["shape"] for w in doc["workspace"]] == [("num_workers", bound, head_dim),
                                                             ("num_workers", 2, bound), ("num_workers",)]


def test_cpu_attention_and_gemv_from_the_rule_are_the_direct_kernels():
    """The llvm forms are the operator library's CPU kernels (same TIR), so its tests cover them."""
    for dtype, head_dim, group in [("float16", 64, 4), ("bfloat16", 256, 16)]:
        spec = AttentionSpec(dtype, head_dim, 8 if group <= 8 else 16)
        got = kernel(make_decode_attention(dtype, head_dim, group)).with_attr("global_symbol", spec.name + "_cpu")
        assert got.without_attr(ATTR).script() == make_cpu_kernel(spec, 64).script()
    for gspec in GEMV_SPECS:
        got = kernel(make_gemv(gspec.dtype)).with_attr("global_symbol", gspec.name + "_cpu")
        assert got.without_attr(ATTR).script() == make_cpu_gemv(gspec).script()


def test_attention_through_the_rule_matches_float64_on_the_cpu():
    f = codegen.cpu_function(kernel(make_decode_attention("float16", 64, 4)))
    gen = torch.Generator().manual_seed(1)
    lens = torch.tensor([300, 0, 1, 129], dtype=torch.int32)
    q = torch.randn(4, 8, 64, generator=gen).half()
    k = torch.randn(4, 2, 300, 64, generator=gen).half()
    v = torch.randn(4, 2, 300, 64, generator=gen).half()
    o, lse = torch.empty_like(q), torch.empty(4, 8)
    ws_o, ws_ml, flags = torch.empty(7, 8, 64), torch.empty(7, 2, 8), torch.zeros(7, dtype=torch.int32)
    f(q, k, v, lens, o, lse, ws_o, ws_ml, flags, 0.125, 7, 0, 7)
    ref_o, ref_lse = decode_attention_reference(q, k, v, lens, 0.125)
    live = lens > 0
    torch.testing.assert_close(o[live].double(), ref_o[live], atol=2e-3, rtol=1e-2)
    torch.testing.assert_close(lse[live].double(), ref_lse[live], atol=1e-3, rtol=0)
    assert (o[~live] == 0).all() and torch.isneginf(lse[~live]).all()


def segment_inputs(b, h, length, d, dtype, lens, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(b, h, length, generator=gen)
    x = torch.randn(b, h, length, d, generator=gen).to(getattr(torch, dtype))
    return w, x, torch.tensor(lens, dtype=torch.int32)


SEGMENT_CASES = [  # (D, dtype, B, H, L, lengths, workers, splits)
    (64, "float16", 4, 3, 200, [200, 0, 1, 77], 7, 0),
    (64, "float16", 1, 1, 1000, [999], 16, 0),  # one tile over 16 workers: a long chain of partials
    (16, "bfloat16", 3, 2, 130, [130, 64, 65], 1, 0),
    (16, "bfloat16", 5, 1, 90, [0, 0, 90, 300, 5], 4, 0),  # a length past the cache reads the cache
    (64, "float16", 3, 2, 150, [150, 3, 80], 12, 2),  # fixed split
]


@pytest.mark.parametrize("d,dtype,b,h,length,lens,workers,splits", SEGMENT_CASES)
def test_the_third_operator_matches_numpy_on_the_cpu(d, dtype, b, h, length, lens, workers, splits):
    w, x, lens_t = segment_inputs(b, h, length, d, dtype, lens)
    y = torch.full((b, h, d), float("nan"))
    flags = torch.zeros(workers, dtype=torch.int32)
    cpu_segment_sum(d, dtype)(w, x, lens_t, y, torch.empty(workers, d), flags, workers, splits, workers)
    np.testing.assert_allclose(y.numpy(), reference(w, x, lens), rtol=1e-5, atol=1e-4)
    assert (flags == 0).all()


def test_the_loop_bound_form_is_the_same_operator():
    w, x, lens_t = segment_inputs(3, 2, 120, 16, "float16", [120, 0, 50])
    y = torch.empty(3, 2, 16)
    cpu_segment_sum(16, "float16", loop_bound=True)(w, x, lens_t, y, torch.empty(5, 16),
                                                    torch.zeros(5, dtype=torch.int32), 5, 0, 5)
    np.testing.assert_allclose(y.numpy(), reference(w, x, [120, 0, 50]), rtol=1e-5, atol=1e-4)


@T.prim_func(s_tir=True)
def scaled_row_sums(x: T.handle, alpha: T.float32, y: T.handle):
    """y[r, c] = fp16(alpha * sum_{n < 96} x[r, n, c]): a constant extent, no lengths, an epilogue and
    a scalar parameter of the function's own."""
    R = T.int64()
    X = T.match_buffer(x, (R, 96, 8), "float16")
    Y = T.match_buffer(y, (R, 8), "float16")
    Acc = T.sblock_alloc_buffer((R, 8), "float32")
    for r, c, n in T.grid(R, 8, 96):
        with T.sblock("Acc"):
            vr, vc, vn = T.axis.remap("SSR", [r, c, n])
            with T.init():
                Acc[vr, vc] = T.float32(0)
            Acc[vr, vc] = Acc[vr, vc] + T.Cast("float32", X[vr, vn, vc])
    for r, c in T.grid(R, 8):
        with T.sblock("Y"):
            vr, vc = T.axis.remap("SS", [r, c])
            Y[vr, vc] = T.Cast("float16", Acc[vr, vc] * alpha)


def test_a_constant_extent_with_an_epilogue_keeps_the_functions_scalar():
    k = kernel(scaled_row_sums)
    assert [p.name for p in k.params] == ["X", "alpha", "Y", "WS", "FLAGS", "num_workers", "num_splits", "grid"]
    x = torch.randn(5, 96, 8).half()
    y = torch.empty(5, 8).half()
    codegen.cpu_function(k.with_attr("global_symbol", "scaled_row_sums"))(
        x, 0.5, y, torch.empty(3, 8), torch.zeros(3, dtype=torch.int32), 3, 0, 3)
    np.testing.assert_allclose(y.double().numpy(), 0.5 * x.double().sum(1).numpy(), rtol=2e-3, atol=2e-3)


# --------------------------------------------------------------------------------------------
# Declined
# --------------------------------------------------------------------------------------------


@T.prim_func(s_tir=True)
def elementwise(x: T.handle, y: T.handle):
    X = T.match_buffer(x, (64,), "float32")
    Y = T.match_buffer(y, (64,), "float32")
    for i in range(64):
        with T.sblock("Y"):
            vi = T.axis.spatial(64, i)
            Y[vi] = X[vi] * T.float32(2)


def ragged(combine, init, identity, bound="lens"):
    """y[b, d] = combine_{n < bound} x[b, n, d], lengths as a mask."""
    def limit(LN, vb, vd):
        if bound == "triangular":
            return T.Cast("int64", vd)
        if bound == "shifted":
            return T.Cast("int64", LN[vb]) - T.Cast("int64", vd)
        return T.Cast("int64", LN[vb + 1] if bound == "next" else LN[vb])

    @T.prim_func(s_tir=True)
    def func(x: T.handle, lens: T.handle, y: T.handle):
        B, L = T.int64(), T.int64()
        X = T.match_buffer(x, (B, L, 16), "float32")
        LN = T.match_buffer(lens, (B,), "int32")
        Y = T.match_buffer(y, (B, 16), "float32")
        for b, d, n in T.grid(B, 16, L):
            with T.sblock("Y"):
                vb, vd, vn = T.axis.remap("SSR", [b, d, n])
                with T.init():
                    Y[vb, vd] = T.float32(init)
                Y[vb, vd] = combine(Y[vb, vd], T.if_then_else(vn < limit(LN, vb, vd), X[vb, vn, vd],
                                                              T.float32(identity)))

    return func


@T.prim_func(s_tir=True)
def softmax_pooling(w: T.handle, x: T.handle, lens: T.handle, y: T.handle):
    """A softmax-weighted sum whose logits are a buffer, not a query-key dot product."""
    B, L = T.int64(), T.int64()
    W = T.match_buffer(w, (B, L), "float32")
    X = T.match_buffer(x, (B, L, 16), "float32")
    LN = T.match_buffer(lens, (B,), "int32")
    Y = T.match_buffer(y, (B, 16), "float32")
    M = T.sblock_alloc_buffer((B,), "float32")
    Den = T.sblock_alloc_buffer((B,), "float32")
    Acc = T.sblock_alloc_buffer((B, 16), "float32")
    for b, n in T.grid(B, L):
        with T.sblock("M"):
            vb, vn = T.axis.remap("SR", [b, n])
            with T.init():
                M[vb] = T.float32("-inf")
            M[vb] = T.max(M[vb], T.if_then_else(vn < T.Cast("int64", LN[vb]), W[vb, vn], T.float32("-inf")))
    for b, n in T.grid(B, L):
        with T.sblock("Den"):
            vb, vn = T.axis.remap("SR", [b, n])
            with T.init():
                Den[vb] = T.float32(0)
            Den[vb] = Den[vb] + T.if_then_else(vn < T.Cast("int64", LN[vb]), T.exp(W[vb, vn] - M[vb]), T.float32(0))
    for b, d, n in T.grid(B, 16, L):
        with T.sblock("Acc"):
            vb, vd, vn = T.axis.remap("SSR", [b, d, n])
            with T.init():
                Acc[vb, vd] = T.float32(0)
            Acc[vb, vd] = Acc[vb, vd] + T.if_then_else(vn < T.Cast("int64", LN[vb]),
                                                       T.exp(W[vb, vn] - M[vb]) * X[vb, vn, vd], T.float32(0))
    for b, d in T.grid(B, 16):
        with T.sblock("Y"):
            vb, vd = T.axis.remap("SS", [b, d])
            Y[vb, vd] = Acc[vb, vd] / Den[vb]


DECLINED = {  # what the rule must decline, and the reason it gives
    "no_reduction": (elementwise, "no reduction"),
    "product": (ragged(lambda a, b: a * b, 1.0, 1.0), "combiner product"),
    "max_only": (ragged(T.max, float("-inf"), float("-inf")), "not a combiner the rule knows"),
    "min": (ragged(T.min, float("inf"), float("inf")), "combiner min"),
    "triangular_extent": (ragged(lambda a, b: a + b, 0.0, 0.0, "triangular"), "the plan cannot follow it"),
    "extent_minus_output": (ragged(lambda a, b: a + b, 0.0, 0.0, "shifted"), "the plan cannot follow it"),
    "lengths_at_b_plus_1": (ragged(lambda a, b: a + b, 0.0, 0.0, "next"), "not by one output axis"),
    "softmax_without_attention": (softmax_pooling, "softmax-weighted sum without a block body"),
}


@pytest.mark.parametrize("name", list(DECLINED))
def test_the_rule_declines(name):
    func, reason = DECLINED[name]
    for target in (LLVM, SM90):
        assert StreamK().apply(func, target) is None
        assert reason in StreamK().kernel(func, target).reason


def test_the_plain_ragged_sum_the_declined_ones_vary_is_accepted():
    """The control for the declines above: the same function with a sum over n < lens[b]."""
    assert kernel(ragged(lambda a, b: a + b, 0.0, 0.0)).attrs[ATTR]["body"] == "ragged_sum"


@pytest.mark.parametrize("target", [{"kind": "cuda", "arch": "sm_75"}, {"kind": "c"}])
def test_the_rule_declines_targets_it_cannot_build_for(target):
    target = tvm.target.Target(target)
    assert StreamK().apply(make_segment_sum(64, "float16"), target) is None
    assert not StreamK().is_target_available(target) and StreamK().is_target_available(SM90)


# --------------------------------------------------------------------------------------------
# Relax
# --------------------------------------------------------------------------------------------


def segment_sum_module(declined: bool = True):
    """main(w, x, lens) = twice(first 64 of segment_sum(w, x, lens)): one PrimFunc the rule takes, one it
    declines (``declined=False``: R.add instead of twice, for CUDA where FuseTIR would fuse the slice into it)."""
    bb = relax.BlockBuilder()
    length = tvm.tirx.Var("L", "int64")
    w = relax.Var("w", relax.TensorType((3, 2, length), "float32"))
    x = relax.Var("x", relax.TensorType((3, 2, length, 16), "float16"))
    lens = relax.Var("lens", relax.TensorType((3,), "int32"))
    with bb.function("main", [w, x, lens]):
        with bb.dataflow():
            seg = bb.add_func(make_segment_sum(16, "float16").without_attr("global_symbol"), "segment_sum")
            y = bb.emit(relax.call_tir(seg, [w, x, lens], relax.TensorType((3, 2, 16), "float32")))
            first = bb.emit(relax.op.strided_slice(bb.emit(relax.op.reshape(y, [96])), [0], [0], [64]))
            if declined:
                twice = bb.add_func(elementwise.without_attr("global_symbol"), "twice")
                out = bb.emit_output(relax.call_tir(twice, [first], relax.TensorType((64,), "float32")))
            else:
                out = bb.emit_output(relax.op.add(first, first))
        bb.emit_func_output(out)
    return bb.finalize()


def test_relax_pass_applies_the_rule_and_passes_the_workspace():
    mod, report = apply_stream_k(segment_sum_module(), LLVM, num_workers=5)
    assert report == {"segment_sum": "ragged_sum", "twice": "no reduction: nothing for stream-K to split"}
    assert "R.zeros(R.shape([5])" in mod["main"].script()
    vm = relax.VirtualMachine(lean_relax.build(mod, "llvm"), tvm.cpu())
    wv, xv, lv = segment_inputs(3, 2, 70, 16, "float16", [70, 0, 9])
    got = torch.from_dlpack(vm["main"](wv, xv, lv)).numpy()
    np.testing.assert_allclose(got, 2 * reference(wv, xv, [70, 0, 9]).reshape(-1)[:64], rtol=1e-5, atol=1e-4)


def test_relax_pass_on_cuda_builds_the_stream_k_kernel_with_our_pipeline():
    mod, report = apply_stream_k(segment_sum_module(declined=False), SM90)
    assert report == {"segment_sum": "ragged_sum"}
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90a"}, host="llvm")
    with target:
        ex = lean_relax.build(mod, target)
    src = ex.mod._collect_from_import_tree(lambda m: m.kind == "cuda")[0].inspect_source()
    body = re.search(r"void (?:__launch_bounds__\(\d+\) )?segment_sum\w*_kernel\(.*?\n}\n", src, re.S).group(0)
    assert "cp_async" in body and "st_release_gpu_global_s32" in body
    assert mod["main"].script().count("R.shape([132") == 2  # partials and flags of one worker per SM


# --------------------------------------------------------------------------------------------
# CUDA (no GPU: generated code through nvcc)
# --------------------------------------------------------------------------------------------


def nvcc(src: str, tmp_path, name: str, *flags: str) -> subprocess.CompletedProcess:
    import tvm_ffi.libinfo as li

    cu = tmp_path / f"{name}.cu"
    cu.write_text(src)
    cmd = ["nvcc", "-O3", "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a", f"-I{li.find_include_path()}",
           f"-I{li.find_dlpack_include_path()}", codegen.NVCC_DIAG_SUPPRESS, *flags, str(cu)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def ptx_entries(ptx: str) -> dict[str, str]:
    """Each ``.entry``'s text to its closing brace, ``//`` comments dropped."""
    text = "\n".join(line.split("//")[0].rstrip() for line in ptx.splitlines())
    return {m.group(1): text[m.start():text.index("\n}\n", m.start())]
            for m in re.finditer(r"\.entry (\w+)\(", text)}


def ptx_of(funcs: dict, tmp_path, name: str) -> dict[str, str]:
    src = codegen.cuda_source_of_module(tvm.IRModule(funcs), "sm_90a")
    nvcc(src, tmp_path, name, "-ptx", "-o", f"{name}.ptx")
    return ptx_entries((tmp_path / f"{name}.ptx").read_text())


def identity_cases(everything: bool):
    """(name, TensorIR, rule, the direct generator's kernel): the library's kernels for sm_90a
    (``everything``), else one attention kernel and one GEMV."""
    records = load_records("sm_90a")
    specs = [AttentionSpec(dt, d, g) for dt in ("float16", "bfloat16") for d in (64, 128, 256) for g in (8, 16)
             if not (d == 256 and g == 16)] if everything else [AttentionSpec("bfloat16", 64, 16)]
    for spec in specs:
        knobs = knobs_for(records, spec, "sm_90a")
        variants = [(spec.name, knobs)]
        cost = batch_tile_cost(records, spec)
        if cost:
            variants.append((spec.name + "_batch", dataclasses.replace(knobs, tile_cost=cost)))
        for name, kn in variants:
            yield (name, make_decode_attention(spec.dtype, spec.head_dim, spec.max_group), StreamK(knobs=kn),
                   make_gpu_kernel(spec, kn, name=name))
    for gspec in GEMV_SPECS if everything else GEMV_SPECS[:1]:
        yield gspec.name, make_gemv(gspec.dtype), StreamK(), make_gpu_gemv(gspec)


def assert_ptx_identical(tmp_path, everything: bool):
    cases = list(identity_cases(everything))
    rule = {name: kernel(func, SM90, r).with_attr("global_symbol", name) for name, func, r, _ in cases}
    direct = {name: d for name, _, _, d in cases}
    got, want = ptx_of(rule, tmp_path, "rule"), ptx_of(direct, tmp_path, "direct")
    assert sorted(got) == sorted(want) == sorted(f"{n}_kernel" for n in direct)
    for entry in want:
        assert got[entry] == want[entry], entry


@needs_nvcc
def test_attention_and_gemv_from_the_rule_compile_to_the_direct_ptx(tmp_path):
    """One attention kernel and one GEMV, one nvcc run each side (the slow test below: all 14)."""
    assert_ptx_identical(tmp_path, everything=False)


@pytest.mark.slow
@needs_nvcc
def test_every_library_kernel_from_the_rule_compiles_to_the_direct_ptx(tmp_path):
    assert_ptx_identical(tmp_path, everything=True)


@pytest.mark.parametrize("variants", [
    [(128, "float16", False)],
    pytest.param([(d, dt, False) for d, dt in VARIANTS] + [(64, "float16", True)], marks=pytest.mark.slow),
], ids=["d128", "all"])
@needs_nvcc
def test_the_third_operators_cuda_form_compiles_without_spills(tmp_path, variants):
    funcs = {f"seg_{d}_{dt}_{lb}": kernel(make_segment_sum(d, dt, lb), SM90).with_attr("global_symbol",
                                                                                        f"seg_{d}_{dt}_{lb}")
             for d, dt, lb in variants}
    src = codegen.cuda_source_of_module(tvm.IRModule(funcs), "sm_90a")
    for needle in ["cp_async_cg_src_size_async_cg_shared_global_16", "cp_async_ca_src_size_async_ca_shared_global_4",
                   "cp_async_wait_group", "st_release_gpu_global_s32", "__shfl_xor_sync"]:
        assert needle in src, needle
    res = nvcc(src, tmp_path, "seg", "-cubin", "--resource-usage", "-o", "seg.cubin")
    usage = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", res.stdout + res.stderr)
    assert len(usage) == len(funcs) and all(s == l == "0" for s, l in usage), res.stdout + res.stderr


@pytest.mark.slow
@needs_nvcc
def test_build_writes_the_third_operators_library(tmp_path):
    import segment_sum

    manifest = segment_sum.build("sm_90a", str(tmp_path))
    assert (tmp_path / manifest["library"]).stat().st_size > 100_000
    assert [k["name"] for k in manifest["kernels"]] == [segment_sum.kernel_name(d, dt) for d, dt in VARIANTS]
    assert all(k["resources"]["spill_bytes"] == 0 for k in manifest["kernels"])


def test_the_readme_example_runs_and_pools(tmp_path):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    example = tmp_path / "example.py"  # TVMScript reads a function's source from its file
    example.write_text(readme.split("<!-- readme-example -->\n```python\n")[1].split("```")[0])
    scope = runpy.run_path(str(example))
    w, x, lens, y = (scope[n] for n in ("w", "x", "lens", "y"))
    want = np.stack([w[b, :n].double().numpy() @ x[b, :n].double().numpy() for b, n in enumerate(lens.tolist())])
    np.testing.assert_allclose(y.numpy(), want, rtol=1e-5, atol=1e-4)
