"""lean_tvm as a transformers attention backend, on CPU: a tiny random-weight Llama (GQA 8/2 heads,
head dim 64: one the kernel has, so a decode step that fell back would show in the counts)
generates what SDPA generates, with the dynamic and the static cache, eager and compiled; logits
agree step by step when teacher-forced; a left-padded batch attends no padding; what the kernel
cannot serve falls back to SDPA and says why once. Needs the ``hf`` extra."""

import logging

import pytest
import torch
from hf_models import (
    NO_SPECIAL_TOKENS,
    assert_greedy_choices_agree,
    assert_same_tokens_up_to_a_tie,
    check_left_padded_batch,
    generate,
    prompts,
    sdpa_logits_over,
    stepped_logits,
)
from transformers import (
    AttentionInterface,
    AttentionMaskInterface,
    CompileConfig,
    DynamicCache,
    Gemma2Config,
    LlamaConfig,
    MistralConfig,
    StaticCache,
)
from transformers.masking_utils import causal_mask_function, sdpa_mask

from lean_tvm.bench.hf_generate import random_model
from lean_tvm.integrations import transformers as lean_hf
from lean_tvm.integrations.transformers import rows

pytest.importorskip("tvm")  # the CPU library

LAYERS, NEW_TOKENS, TIE = 2, 32, 0.05  # TIE: fp16 logits closer than this are a tie rounding may break
LOGIT_TOL = dict(atol=0.05, rtol=0.02)  # fp16 model: logits of std ~4


def tiny_llama(**overrides) -> LlamaConfig:
    """GQA 8/2 heads of 64; weights with a larger spread than the default so that logits are
    spread and attention decides the tokens (at 0.02 a random model repeats one token)."""
    return LlamaConfig(**(dict(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=LAYERS,
                                num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                                max_position_embeddings=256, initializer_range=0.2, **NO_SPECIAL_TOKENS)
                           | overrides))


@pytest.fixture(scope="module", autouse=True)
def registered():
    lean_hf.register()


@pytest.fixture(scope="module")
def llama():
    return random_model(tiny_llama(), torch.float16, torch.device("cpu"))


def test_register_adds_the_attention_and_the_mask_function():
    assert AttentionInterface._global_mapping[lean_hf.NAME] is lean_hf.lean_tvm_attention
    assert AttentionMaskInterface._global_mapping[lean_hf.NAME] is lean_hf.lean_tvm_mask


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_greedy_generate_matches_sdpa_and_decodes_in_lean_tvm(llama, cache):
    ids, mask = prompts([20], 256)
    kwargs = {} if cache == "dynamic" else dict(cache_implementation="static")
    sdpa_seq, sdpa_scores, _ = generate(llama, "sdpa", ids, mask, NEW_TOKENS, **kwargs)
    seq, _, counts = generate(llama, "lean_tvm", ids, mask, NEW_TOKENS, **kwargs)
    assert counts == {"lean_tvm": LAYERS * (NEW_TOKENS - 1), "sdpa": LAYERS}  # every decode step; SDPA the prefill
    assert_same_tokens_up_to_a_tie(seq, sdpa_seq, sdpa_scores, ids.shape[1], TIE)
    assert_greedy_choices_agree(seq, ids.shape[1], sdpa_logits_over(llama, seq, mask), TIE)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("step", [1, 4], ids=["one token", "four tokens"])
def test_teacher_forced_logits_match_sdpa_at_every_step(llama, cache, step):
    """One new token per forward (decode), or four (a speculative verification step: bottom-right
    causal over the cache)."""
    tokens, _ = prompts([48], 256, seed=2)
    make = (lambda: DynamicCache(config=llama.config)) if cache == "dynamic" else \
        (lambda: StaticCache(config=llama.config, max_cache_len=64))
    ref, _ = stepped_logits(llama, "sdpa", tokens, 16, make(), step)
    got, counts = stepped_logits(llama, "lean_tvm", tokens, 16, make(), step)
    assert counts == {"lean_tvm": LAYERS * 32 // step, "sdpa": LAYERS}
    torch.testing.assert_close(got, ref, **LOGIT_TOL)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_a_forward_without_a_padding_mask_decodes_over_lengths_only(llama, cache):
    """No 2-d mask: no start rows, the dense one-token kernel."""
    tokens, _ = prompts([30], 256, seed=8)
    make = (lambda: DynamicCache(config=llama.config)) if cache == "dynamic" else \
        (lambda: StaticCache(config=llama.config, max_cache_len=40))
    ref, _ = stepped_logits(llama, "sdpa", tokens, 16, make(), padding_mask=False)
    got, counts = stepped_logits(llama, "lean_tvm", tokens, 16, make(), padding_mask=False)
    assert counts == {"lean_tvm": LAYERS * 14, "sdpa": LAYERS}
    torch.testing.assert_close(got, ref, **LOGIT_TOL)


def test_left_padded_batch_attends_no_padding(llama):
    """Three prompts of 5, 13 and 22 tokens in one left-padded batch: each sequence generates what
    it generates alone (where padding, if attended, would change it), and what SDPA generates."""
    check_left_padded_batch(llama, [5, 13, 22], 256, "cpu", seed=4, layers=LAYERS, tol=TIE)


def test_static_cache_compiled_fullgraph_matches_sdpa(llama):
    """generate(cache_implementation="static") with its decode step compiled, fullgraph (here the
    FX graph runs as traced; inductor and CUDA graphs in the GPU tests): the graph holds the
    lean_tvm op (compiled calls are not counted), and the tokens are SDPA's."""
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    ids, mask = prompts([3, 20], 256, seed=5)
    compiled = CompileConfig(fullgraph=True, backend=recording_backend, mode=None)
    compiled._compile_all_devices = True
    sdpa_seq, sdpa_scores, _ = generate(llama, "sdpa", ids, mask, 12, cache_implementation="static")
    seq, _, counts = generate(llama, "lean_tvm", ids, mask, 12, cache_implementation="static",
                              compile_config=compiled)
    assert counts == {"sdpa": LAYERS}  # the eager prefill
    assert len(graphs) == 1, "the decode step recompiled"
    ops = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert sum(op.startswith("lean_tvm.") for op in ops) == LAYERS, ops
    assert_same_tokens_up_to_a_tie(seq, sdpa_seq, sdpa_scores, ids.shape[1], TIE)


FALLBACKS = [  # (config, dtype, what the log line names)
    ("head dim 32", tiny_llama(head_dim=32), torch.float16, "head dim 32"),
    ("float32", tiny_llama(), torch.float32, "dtype torch.float32"),
    ("sliding window", MistralConfig(**(tiny_llama().to_dict() | dict(sliding_window=8))), torch.float16,
     "sliding-window"),
]


@pytest.mark.parametrize("config,dtype,reason", [f[1:] for f in FALLBACKS], ids=[f[0] for f in FALLBACKS])
def test_what_the_kernel_cannot_serve_falls_back_to_sdpa_and_says_why_once(config, dtype, reason, caplog):
    model = random_model(config, dtype, torch.device("cpu"))
    ids, mask = prompts([6, 10], 256, seed=6)
    sdpa_seq, _, _ = generate(model, "sdpa", ids, mask, 8)
    with caplog.at_level(logging.INFO, logger="lean_tvm.integrations.transformers"):
        seq, _, counts = generate(model, "lean_tvm", ids, mask, 8)
    assert counts == {"sdpa": LAYERS * 8}
    said = [r.getMessage() for r in caplog.records if reason in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("lean_tvm falls back to SDPA"), caplog.text
    assert torch.equal(seq, sdpa_seq)


def test_soft_capping_is_refused_naming_it():
    """Gemma2 caps its logits: neither the kernel nor SDPA (its fallback) computes that."""
    config = Gemma2Config(**(tiny_llama().to_dict() | dict(query_pre_attn_scalar=64, sliding_window=8,
                                                           layer_types=["full_attention"] * LAYERS)))
    model = random_model(config, torch.float16, torch.device("cpu"))
    model.set_attn_implementation("lean_tvm")
    with pytest.raises(ValueError, match="soft-capping.*attn_implementation='eager'"), torch.no_grad():
        model(torch.ones(1, 4, dtype=torch.long))


def test_right_padding_falls_back_where_the_mask_is_read_for_free(llama, caplog):
    ids, mask = prompts([4, 9], 256, seed=7)
    right = torch.stack([torch.roll(m, -int((m == 0).sum())) for m in mask])  # zeros after the tokens
    with caplog.at_level(logging.WARNING, logger="lean_tvm.integrations.transformers"):
        bounds = lean_hf.lean_tvm_mask(2, 1, 10, q_offset=9, attention_mask=right.bool())
    assert not rows.is_row_bounds(bounds) and "not left padding" in caplog.text


# The mask function alone (no model).


def _sdpa(**kw):
    return sdpa_mask(mask_function=causal_mask_function, allow_is_causal_skip=False, **kw)


@pytest.mark.parametrize("offset", [9, torch.tensor(9)], ids=["dynamic cache", "static cache"])
@pytest.mark.parametrize("q_len", [1, 3])
def test_row_bounds_describe_sdpas_mask(offset, q_len):
    """Lengths from the cache's offset, first rows from the padding: as a boolean mask they are
    exactly SDPA's mask of the same forward (the form the fallback uses)."""
    padding = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1] + [1] * q_len, [1] * (9 + q_len)], dtype=torch.bool)
    kv_len = 16 if isinstance(offset, torch.Tensor) else 9 + q_len  # a static cache hands its whole length
    bounds = lean_hf.lean_tvm_mask(2, q_len, kv_len, q_offset=offset, attention_mask=padding)
    assert rows.is_row_bounds(bounds)
    lengths, starts = rows.lengths_and_starts(bounds)
    assert lengths.tolist() == [9 + q_len] * 2 and starts.tolist() == [3, 0]
    assert lengths.is_contiguous() and starts.is_contiguous() and lengths.dtype == torch.int32
    want = _sdpa(batch_size=2, q_length=q_len, kv_length=kv_len, q_offset=9, attention_mask=padding)
    assert torch.equal(rows.boolean_mask(bounds, q_len, kv_len), want)


@pytest.mark.parametrize("offset", [39, torch.tensor(39)], ids=["dynamic cache", "static cache"])
def test_without_a_padding_mask_the_bounds_are_lengths_only(offset):
    bounds = lean_hf.lean_tvm_mask(3, 1, 40, q_offset=offset)
    lengths, starts = rows.lengths_and_starts(bounds)
    assert bounds.shape == (1, 1, 1, 3) and starts is None
    assert lengths.is_contiguous() and lengths.tolist() == [40] * 3


@pytest.mark.parametrize("kw,reason", [
    (dict(q_length=17, q_offset=100), "prefill"),
    (dict(q_length=4, q_offset=0), "prefill"),
    (dict(q_length=4, q_offset=torch.tensor(0)), "prefill"),  # a static cache without a padding mask: unknown past
    (dict(q_length=1, q_offset=5, local_size=4), "sliding-window"),
    (dict(q_length=1, q_offset=5, kv_offset=2), "kv_offset"),
    (dict(q_length=1, q_offset=5, mask_function=lambda b, h, q, kv: kv <= q), "other than causal"),
])
def test_the_mask_function_hands_sdpa_what_the_kernel_cannot_serve(kw, reason, caplog):
    lean_hf.reset()
    kw = dict(batch_size=2, kv_length=kw.get("q_offset", 0) + kw["q_length"]) | kw
    if isinstance(kw["kv_length"], torch.Tensor):
        kw["kv_length"] = 32
    with caplog.at_level(logging.INFO, logger="lean_tvm.integrations.transformers"):
        got = lean_hf.lean_tvm_mask(**kw)
    assert not rows.is_row_bounds(got) and reason in caplog.text
