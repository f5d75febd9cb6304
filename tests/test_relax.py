"""LeanAttention in TVM Relax on the CPU: the nn op, the rewrite pass (what it matches and what it
leaves alone), the Llama example in both forms against float64, and the mixed TIR pipeline."""

import math
import os
import re
import sys

import numpy as np
import pytest
import torch
from helpers import assert_attention_close

from lean_tvm.reference import decode_attention_reference

tvm = pytest.importorskip("tvm")
import paged_cases  # noqa: E402
from tvm import relax, tirx  # noqa: E402
from tvm.relax.frontend import nn  # noqa: E402
from tvm.relax.frontend.nn import spec  # noqa: E402

from lean_tvm import relax as lean_relax  # noqa: E402
from lean_tvm.relax import kv_cache as paged  # noqa: E402
from lean_tvm.softmax import LSE_TVM, lse_natural_from_tvm  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
import llama_relax  # noqa: E402

CPU = tvm.cpu()
F16 = "float16"


def run_vm(mod, fn, *args):
    vm = relax.VirtualMachine(lean_relax.build(mod, "llvm"), CPU)
    return vm[fn](*args)


# --------------------------------------------------------------------------------------------
# The nn op.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout,dtype,hq,hkv,workers", [
    ("bhld", torch.float16, 8, 2, None),
    ("blhd", torch.bfloat16, 8, 2, 3),
    ("blhd", torch.float16, 16, 1, 7),  # MQA, G = 16: the max_group 16 kernel
])
def test_decode_attention_op_matches_float64(layout, dtype, hq, hkv, workers):
    D, L = 64, 150
    lens = [150, 0, 37, 1, 64]  # ragged, an empty sequence, a single row, a block edge

    class M(nn.Module):
        def forward(self, q, k, v, seq_lens):
            return lean_relax.decode_attention(q, k, v, seq_lens, layout=layout, num_workers=workers,
                                               return_lse=True)

    dt = str(dtype).removeprefix("torch.")
    kv = ("b", hkv, "L", D) if layout == "bhld" else ("b", "L", hkv, D)
    mod, _ = M().export_tvm(spec={"forward": {
        "q": spec.Tensor(("b", 1, hq, D), dt), "k": spec.Tensor(kv, dt), "v": spec.Tensor(kv, dt),
        "seq_lens": spec.Tensor(("b",), "int32")}})
    g = torch.Generator().manual_seed(0)
    q = torch.randn(len(lens), 1, hq, D, generator=g).to(dtype)
    k = torch.randn(len(lens), hkv, L, D, generator=g).to(dtype)
    v = torch.randn(len(lens), hkv, L, D, generator=g).to(dtype)
    kk, vv = (k, v) if layout == "bhld" else (k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous())
    o, lse = run_vm(mod, "forward", q, kk, vv, torch.tensor(lens, dtype=torch.int32))
    o, lse = torch.from_dlpack(o), torch.from_dlpack(lse)
    assert o.shape == q.shape and o.dtype == dtype
    ref_o, ref_lse = decode_attention_reference(q[:, 0], k, v, lens, 1 / math.sqrt(D))
    assert_attention_close(o[:, 0], lse, ref_o, ref_lse, dtype)


def test_decode_attention_op_rejects_unsupported_shapes():
    class M(nn.Module):
        def forward(self, q, k, v, seq_lens):
            return lean_relax.decode_attention(q, k, v, seq_lens)

    def export(hq, hkv, d, dt=F16):
        M().export_tvm(spec={"forward": {"q": spec.Tensor(("b", hq, d), dt),
                                         "k": spec.Tensor(("b", hkv, "L", d), dt),
                                         "v": spec.Tensor(("b", hkv, "L", d), dt),
                                         "seq_lens": spec.Tensor(("b",), "int32")}})

    with pytest.raises(ValueError, match="head dim"):
        export(8, 2, 96)
    with pytest.raises(ValueError, match="exceeds"):
        export(64, 2, 64)
    with pytest.raises(ValueError, match="dtype"):
        export(8, 2, 64, "float32")


# --------------------------------------------------------------------------------------------
# The pass: exactly the decode-shaped calls.
# --------------------------------------------------------------------------------------------

HQ, HKV, D = 8, 2, 64


def _tensor(name, shape, dtype=F16):
    return relax.Var(name, relax.TensorType(shape, dtype))


def synthetic_module():
    """One function, nine attention calls: the first three decode-shaped, the rest not."""
    B, L, n = tirx.Var("batch", "int64"), tirx.Var("L", "int64"), tirx.Var("n", "int64")
    q1 = _tensor("q1", [B, 1, HQ, D])
    q4 = _tensor("q4", [B, 4, HQ, D])
    qn = _tensor("qn", [B, n, HQ, D])
    kc, vc = _tensor("kc", [B, L, HKV, D]), _tensor("vc", [B, L, HKV, D])  # blhd caches
    kt, vt = _tensor("kt", [B, HKV, L, D]), _tensor("vt", [B, HKV, L, D])  # bhld caches
    lens = _tensor("lens", [B], "int32")
    arb = _tensor("arb", [B, 1, 1, L])
    q32, k32 = _tensor("q32", [B, 1, HQ, D], "float32"), _tensor("k32", [B, L, HQ, D], "float32")
    params = [q1, q4, qn, kc, vc, kt, vt, lens, arb, q32, k32]
    bb = relax.BlockBuilder()
    with bb.function("main", params):
        with bb.dataflow():
            def rep(x, axis):
                return bb.emit(relax.op.repeat(x, HQ // HKV, axis))

            def mask(fill):
                pos = bb.emit(relax.op.reshape(bb.emit(relax.op.arange(0, L, 1, "int32")), [1, L]))
                col = bb.emit(relax.op.reshape(lens, [B, 1]))
                valid = bb.emit(relax.op.less(pos, col))
                m = bb.emit(relax.op.where(valid, relax.const(np.array(0, F16)), relax.const(np.array(fill, F16))))
                return bb.emit(relax.op.reshape(m, [B, 1, 1, L]))

            def perm(x):
                return bb.emit(relax.op.permute_dims(x, [0, 2, 1, 3]))

            att = relax.op.nn.attention
            outs = [
                att(q1, rep(kc, 2), rep(vc, 2), mask(-np.inf)),  # decode, padding mask
                att(q1, perm(rep(kt, 1)), perm(rep(vt, 1))),  # decode, bhld cache, no mask
                att(q1, rep(kc, 2), rep(vc, 2), scale=0.05, causal_mask="BottomRight"),  # decode
                att(q4, rep(kc, 2), rep(vc, 2), causal_mask="BottomRight"),  # q_len 4
                att(qn, rep(kc, 2), rep(vc, 2), causal_mask="BottomRight"),  # symbolic q_len
                att(q1, rep(kc, 2), rep(vc, 2), causal_mask="TopLeft"),  # sees key 0 only
                att(q1, rep(kc, 2), rep(vc, 2), arb),  # an arbitrary bias
                att(q1, rep(kc, 2), rep(vc, 2), mask(-1.0)),  # a soft mask is not padding
                att(q32, k32, k32),  # fp32: not a kernel dtype
            ]
            out = bb.emit_output(relax.Tuple([bb.emit(x) for x in outs]))
        bb.emit_func_output(out)
    return bb.finalize()


def test_pass_rewrites_exactly_the_decode_calls():
    mod = synthetic_module()
    assert lean_relax.count_attention_calls(mod) == {"attention": 9, "lean": 0}
    new, count = lean_relax.rewrite_decode_attention(mod)
    assert count == 3
    assert lean_relax.count_attention_calls(new) == {"attention": 6, "lean": 3}
    text = new.script()
    assert text.count("R.repeat(") == 2 * 6 - 2  # the matched calls' repeats are gone (fp32 has none)
    assert "R.permute_dims" not in text  # the bhld cache is read in place

    # numerics: each rewritten call equals TVM's own attention; the others are the same code
    B, L, n = 3, 70, 5
    g = torch.Generator().manual_seed(0)

    def r(*shape, dtype=torch.float16):
        return torch.randn(*shape, generator=g).to(dtype)

    args = [r(B, 1, HQ, D), r(B, 4, HQ, D), r(B, n, HQ, D), r(B, L, HKV, D), r(B, L, HKV, D),
            r(B, HKV, L, D), r(B, HKV, L, D), torch.tensor([70, 1, 33], dtype=torch.int32), r(B, 1, 1, L),
            r(B, 1, HQ, D, dtype=torch.float32), r(B, L, HQ, D, dtype=torch.float32)]
    want = [torch.from_dlpack(x) for x in run_vm(mod, "main", *args)]
    got = [torch.from_dlpack(x) for x in run_vm(new, "main", *args)]
    for i, (a, b) in enumerate(zip(want, got, strict=True)):
        assert a.shape == b.shape, i
        if i < 3:
            torch.testing.assert_close(b.float(), a.float(), atol=2e-2, rtol=2e-2, msg=f"call {i}")
        else:
            torch.testing.assert_close(b, a, atol=0, rtol=0, equal_nan=True, msg=f"call {i}")


def test_pass_on_the_llama_module_touches_only_decode_attention():
    cfg = llama_relax.LlamaConfig()
    mod, _ = llama_relax.export(cfg)
    new = llama_relax.lean_form(mod)
    assert lean_relax.count_attention_calls(mod) == {"attention": 2 * cfg.layers, "lean": 0}
    assert lean_relax.count_attention_calls(new) == {"attention": cfg.layers, "lean": cfg.layers}
    tvm.ir.assert_structural_equal(new["prefill"], mod["prefill"])  # prefill (q_len = n): untouched
    decode = new["decode"].script()
    assert "R.repeat" not in decode and "R.where" not in decode and "R.arange" not in decode
    for op_name in ("R.nn.rms_norm", "R.matmul", "R.call_tir_inplace", "R.cos"):  # the rest stays
        assert decode.count(op_name) == mod["decode"].script().count(op_name)


# --------------------------------------------------------------------------------------------
# The Llama example, both forms, against float64.
# --------------------------------------------------------------------------------------------

LOGIT_TOL = dict(atol=6e-2, rtol=3e-2)  # fp16 weights, activations and matmul accumulation


@pytest.fixture(scope="module")
def llama():
    cfg = llama_relax.LlamaConfig()
    mod, params = llama_relax.export(cfg)
    weights = llama_relax.random_weights(params)
    vms = {"tvm": relax.VirtualMachine(lean_relax.build(mod, "llvm"), CPU),
           "lean": relax.VirtualMachine(lean_relax.build(llama_relax.lean_form(mod), "llvm"), CPU)}
    return cfg, params, weights, llama_relax.TorchLlama(cfg, weights), vms


@pytest.mark.parametrize("form", ["tvm", "lean"])
def test_llama_decode_matches_float64(llama, form):
    cfg, params, weights, ref, vms = llama
    wl = llama_relax.weight_list(params, weights)
    lens = [37, 0, 100, 5, 127]  # ragged; 0 = an empty cache (the step attends to its own token)
    tokens, seq_lens, kc, vc = llama_relax.make_inputs(cfg, lens, 128)
    kc0, vc0 = [t.clone() for t in kc], [t.clone() for t in vc]
    want, new_kv = ref.decode(tokens, seq_lens, kc0, vc0)
    logits = torch.from_dlpack(vms[form]["decode"](tokens, seq_lens, kc, vc, *wl))
    assert logits.shape == (len(lens), cfg.vocab_size) and logits.dtype == torch.float32
    torch.testing.assert_close(logits.double(), want, **LOGIT_TOL)
    for layer in range(cfg.layers):  # the caller's caches were updated in place, at row seq_lens[b] only
        for b, n in enumerate(lens):
            torch.testing.assert_close(kc[layer][b, n].double(), new_kv[layer][0][b], atol=2e-2, rtol=1e-2)
            torch.testing.assert_close(vc[layer][b, n].double(), new_kv[layer][1][b], atol=2e-2, rtol=1e-2)
            others = torch.ones(128, dtype=torch.bool)
            others[n] = False
            assert torch.equal(kc[layer][b, others], kc0[layer][b, others])
    # a second step reads the first step's rows
    seq_lens2 = seq_lens + 1
    want2, _ = ref.decode(tokens, seq_lens2, kc, vc)
    logits2 = torch.from_dlpack(vms[form]["decode"](tokens, seq_lens2, kc, vc, *wl))
    torch.testing.assert_close(logits2.double(), want2, **LOGIT_TOL)


def test_llama_forms_agree_and_decode_continues_prefill(llama):
    """Prefill n tokens, copy its K/V into the caches, decode token n: equals prefill of n + 1."""
    cfg, params, weights, ref, vms = llama
    wl = llama_relax.weight_list(params, weights)
    B, n, L = 2, 9, 16
    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(0, cfg.vocab_size, (B, n + 1), generator=g, dtype=torch.int32)
    out = vms["lean"]["prefill"](prompt[:, :n].contiguous(), *wl)
    logits_p = torch.from_dlpack(out[0])
    want_p, kvs = ref.prefill(prompt[:, :n])
    torch.testing.assert_close(logits_p.double(), want_p, **LOGIT_TOL)
    results = {}
    for form, vm in vms.items():
        kc = [torch.zeros(B, L, cfg.kv_heads, cfg.head_dim, dtype=torch.float16) for _ in range(cfg.layers)]
        vc = [torch.zeros_like(t) for t in kc]
        for i in range(cfg.layers):
            kc[i][:, :n] = torch.from_dlpack(out[1 + 2 * i])
            vc[i][:, :n] = torch.from_dlpack(out[2 + 2 * i])
        seq_lens = torch.full((B,), n, dtype=torch.int32)
        results[form] = torch.from_dlpack(vm["decode"](prompt[:, n].contiguous(), seq_lens, kc, vc, *wl)).clone()
    want_next, _ = ref.prefill(prompt)
    for form, logits in results.items():
        torch.testing.assert_close(logits.double(), want_next[:, n], **LOGIT_TOL, msg=form)
    torch.testing.assert_close(results["lean"], results["tvm"], atol=3e-2, rtol=2e-2)


# --------------------------------------------------------------------------------------------
# CUDA builds (no GPU needed: TVM keeps the CUDA source when there is no driver).
# --------------------------------------------------------------------------------------------


def test_cuda_build_uses_our_pipeline_for_our_kernel_only():
    from lean_tvm import codegen
    from lean_tvm.attention_gpu import make_gpu_kernel

    cfg = llama_relax.LlamaConfig(layers=1)
    mod, _ = llama_relax.export(cfg, target_kind="cuda", prefill=False)
    lean_mod = llama_relax.lean_form(mod, "cuda")
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90a"}, host="llvm")
    with target:
        ex = lean_relax.build(lean_mod, target)
    src = ex.mod._collect_from_import_tree(lambda m: m.kind == "cuda")[0].inspect_source()
    kernels = set(re.findall(r"__global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(", src))
    assert "lean_decode_attention_kernel" in kernels
    assert any("matmul" in k for k in kernels) and any("rms_norm" in k for k in kernels)  # dlight's
    # our kernel's CUDA equals the operator library's (codegen.PIPELINE: no barrier inserted)
    config = lean_relax.LeanConfig("cuda")
    spec_ = config.spec_for("float16", cfg.head_dim, cfg.group)
    lib_src = codegen.cuda_source(make_gpu_kernel(spec_, config.gpu_knobs(spec_)), "sm_90a")

    def body(text, name):
        m = re.search(r"__global__ void (?:__launch_bounds__\(\d+\) )?" + name + r"\(.*?\n}\n", text, re.S)
        return m.group(0)

    ours = body(src, "lean_decode_attention_kernel")
    theirs = body(lib_src, spec_.name + "_kernel")
    assert ours.count("__syncthreads()") == theirs.count("__syncthreads()") > 0
    # the rms_norm reduction kept TVM's inserted barriers (default pipeline)
    assert "__syncthreads()" in body(src, "rms_norm_kernel")


# --------------------------------------------------------------------------------------------
# Paged KV cache: the decode kernel in TIRPagedKVCache's form.
# --------------------------------------------------------------------------------------------

PAGE = 16


def test_paged_decode_kernel_matches_tvms_own():
    from tvm.relax.frontend.nn.llm._decode_kernels import _attention_decode_cpu

    lens = [37, 0, 16, 1, 200, 64, 17]
    case = paged_cases.random_paged_cache(lens, HQ, HKV, D, PAGE)
    outs = {}
    for name, func in (("lean", paged.make_paged_decode_cpu(HKV, HQ, D, F16, PAGE, num_workers=5)),
                       ("tvm", _attention_decode_cpu(HKV, HQ, D, F16, False, {}))):
        f = tvm.compile(tvm.IRModule({"main": func}), target="llvm")[func.attrs["global_symbol"]]
        o = torch.full((len(lens), HQ, D), float("nan"), dtype=torch.float16)
        lse = torch.full((len(lens), HQ), float("nan"))
        f(*case.args(), o, lse, 0, 1.0, 1e4, 1 / math.sqrt(D))
        outs[name] = (o, lse)
    torch.testing.assert_close(outs["lean"][0], outs["tvm"][0], atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(outs["lean"][1], outs["tvm"][1], atol=1e-4, rtol=1e-5)  # log2 units, -5e4 if empty
    assert (outs["lean"][1][1] == LSE_TVM.empty).all() and (outs["lean"][0][1] == 0).all()
    # and against float64 on the gathered caches
    k, v = paged_cases.dense_from_pages(case)
    ref_o, ref_lse = decode_attention_reference(case.q, k, v, lens, 1 / math.sqrt(D))
    assert_attention_close(outs["lean"][0], lse_natural_from_tvm(outs["lean"][1]), ref_o, ref_lse, torch.float16)


def test_paged_gpu_kernel_rejects_page_sizes_it_cannot_tile():
    with pytest.raises(ValueError, match="multiple of 16"):
        paged.make_paged_decode_gpu(HKV, HQ, D, F16, page_size=8)


def kv_cache_module(target_kind: str):
    return paged.kv_cache_module(target_kind, HQ, HKV, D, F16, PAGE)


def test_paged_kv_cache_runtime_runs_lean_decode():
    """TVM's own PagedKVCache runtime (llvm), prefill then one decode step, with its decode kernel
    swapped for LeanAttention: the same output as with TVM's kernel and float64."""
    lens = [37, 100, 16]
    g = torch.Generator().manual_seed(0)
    qkv_prefill = torch.randn(sum(lens), HQ + 2 * HKV, D, generator=g).half()
    qkv_decode = torch.randn(len(lens), HQ + 2 * HKV, D, generator=g).half()
    base = kv_cache_module("llvm")
    lean_mod, swapped = paged.use_lean_paged_decode(base, "llvm")
    assert swapped == 1
    outs = {}
    for name, mod in (("tvm", base), ("lean", lean_mod)):
        create = relax.VirtualMachine(lean_relax.build(mod, "llvm"), CPU)["create"]
        outs[name] = paged_cases.kv_cache_decode(create, lens, qkv_prefill, qkv_decode, HQ, 1 / math.sqrt(D))
    torch.testing.assert_close(outs["lean"], outs["tvm"], atol=1e-3, rtol=1e-3)
    k, v = paged_cases.dense_from_fused_qkv(lens, qkv_prefill, qkv_decode, HQ, HKV)
    ref_o, _ = decode_attention_reference(qkv_decode[:, :HQ], k, v, [n + 1 for n in lens], 1 / math.sqrt(D))
    torch.testing.assert_close(outs["lean"].double(), ref_o, atol=2e-3, rtol=1e-2)


def test_paged_swap_on_cuda_module_uses_the_gpu_kernel():
    base = kv_cache_module("cuda")
    mod, swapped = paged.use_lean_paged_decode(base, "cuda")
    assert swapped == 1
    funcs = [f for _, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)
             and f.attrs.get("global_symbol") == "batch_decode_paged_kv"]
    assert len(funcs) == 1 and funcs[0].attrs[lean_relax.KERNEL_ATTR] == "lean_tvm"
    with pytest.raises(ValueError, match="target_kind"):
        paged.use_lean_paged_decode(base, "rocm")
