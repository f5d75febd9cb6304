"""lean_tvm as a transformers attention backend on the GPU (marked ``gpu``): random-weight bf16 models
shaped like Llama-3-8B (32/8 heads of 128, hidden 4096) and Qwen2-7B (28/4, hidden 3584), 4 layers:
greedy generation with the dynamic cache, with the static cache compiled by inductor into CUDA
graphs (as generate() compiles it, the graph recorded to see the kernel in it), teacher-forced
logits, several new tokens at once, a left-padded batch of three prompts, and the fallback.

Tolerances come from the model itself: two correct bf16 attentions (transformers' eager and SDPA)
differ by some rounding noise on the same tokens; lean_tvm may differ from SDPA by at most twice
that, and a greedy token may differ only where SDPA's top two logits are that close.

``LEAN_TVM_LIB_DIR=build/sm_90a python -m pytest -m gpu tests/test_gpu_transformers.py``
"""

import pytest
import torch
from hf_models import (
    assert_greedy_choices_agree,
    assert_same_tokens_up_to_a_tie,
    check_left_padded_batch,
    generate,
    prompts,
    sdpa_logits_over,
    stepped_logits,
)
from transformers import CompileConfig, DynamicCache, StaticCache

from lean_tvm.bench.hf_generate import model_config, random_model
from lean_tvm.integrations import transformers as lean_hf

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
LAYERS, NEW_TOKENS, PROMPT = 4, 32, 300
CUDA = torch.device("cuda")


@pytest.fixture(scope="module", params=["llama3-8b", "qwen2-7b"])
def model(request):
    lean_hf.register()
    m = random_model(model_config(request.param, LAYERS, 4096), torch.bfloat16, CUDA)
    yield m
    del m
    torch.cuda.empty_cache()


@pytest.fixture(scope="module")
def noise(model):
    """How far two correct bf16 attentions (eager, SDPA) put the logits apart on the same tokens."""
    tokens, _ = prompts([PROMPT + NEW_TOKENS], model.config.vocab_size, CUDA, seed=11)
    eager, _ = stepped_logits(model, "eager", tokens, PROMPT, DynamicCache(config=model.config))
    sdpa, _ = stepped_logits(model, "sdpa", tokens, PROMPT, DynamicCache(config=model.config))
    return 2 * (eager - sdpa).abs().max().item() + 1e-3


def test_greedy_generate_matches_sdpa_and_decodes_in_lean_tvm(model, noise):
    ids, mask = prompts([PROMPT], model.config.vocab_size, CUDA)
    sdpa_seq, sdpa_scores, _ = generate(model, "sdpa", ids, mask, NEW_TOKENS)
    seq, _, counts = generate(model, "lean_tvm", ids, mask, NEW_TOKENS)
    assert counts == {"lean_tvm": LAYERS * (NEW_TOKENS - 1), "sdpa": LAYERS}
    assert_same_tokens_up_to_a_tie(seq, sdpa_seq, sdpa_scores, PROMPT, noise)
    assert_greedy_choices_agree(seq, PROMPT, sdpa_logits_over(model, seq, mask), noise)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("step", [1, 5])
def test_teacher_forced_logits_are_as_close_to_sdpa_as_eager_is(model, noise, cache, step):
    tokens, _ = prompts([PROMPT + 30], model.config.vocab_size, CUDA, seed=12)
    make = (lambda: DynamicCache(config=model.config)) if cache == "dynamic" else \
        (lambda: StaticCache(config=model.config, max_cache_len=PROMPT + 64))
    ref, _ = stepped_logits(model, "sdpa", tokens, PROMPT, make(), step)
    got, counts = stepped_logits(model, "lean_tvm", tokens, PROMPT, make(), step)
    assert counts == {"lean_tvm": LAYERS * 30 // step, "sdpa": LAYERS}
    assert (got - ref).abs().max().item() <= noise


def test_left_padded_batch_attends_no_padding(model, noise):
    check_left_padded_batch(model, [50, 131, 300], model.config.vocab_size, CUDA, seed=13, layers=LAYERS, tol=noise)


def test_static_cache_compiled_into_cuda_graphs_matches_sdpa(model, noise):
    """generate(cache_implementation="static") compiled as transformers compiles it (inductor with
    CUDA graphs, i.e. cudagraph trees: its mode "reduce-overhead"), with the traced graph recorded on
    the way: it holds the lean_tvm op in every layer, and the tokens are SDPA's."""
    from torch._inductor.compile_fx import compile_fx

    graphs = []

    def inductor_with_cuda_graphs(gm, example_inputs):
        graphs.append(gm)
        return compile_fx(gm, example_inputs, config_patches={"triton.cudagraphs": True})

    ids, mask = prompts([40, PROMPT], model.config.vocab_size, CUDA, seed=14)
    sdpa_seq, sdpa_scores, _ = generate(model, "sdpa", ids, mask, NEW_TOKENS)
    torch._dynamo.reset()
    # The trees' own check that every live tensor of their memory pool is one they track (a cached
    # workspace made while they record would not be: runtime.new_workspace).
    with torch._inductor.config.patch({"triton.slow_path_cudagraph_asserts": True}):
        seq, _, counts = generate(model, "lean_tvm", ids, mask, NEW_TOKENS, cache_implementation="static",
                                  compile_config=CompileConfig(backend=inductor_with_cuda_graphs, mode=None))
    assert counts == {"sdpa": LAYERS}  # the eager prefill; compiled calls are not counted
    ops = [str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    assert graphs and sum(op.startswith("lean_tvm.") for op in ops) == LAYERS * len(graphs), ops
    assert_same_tokens_up_to_a_tie(seq, sdpa_seq, sdpa_scores, ids.shape[1], noise)


def test_a_head_dim_the_kernel_lacks_falls_back_to_sdpa():
    config = model_config("llama3-8b", 2, 1024)
    config.head_dim = 96  # 32 x 96 over hidden 4096
    odd = random_model(config, torch.bfloat16, CUDA)
    ids, mask = prompts([100, 60], config.vocab_size, CUDA, seed=15)
    sdpa_seq, _, _ = generate(odd, "sdpa", ids, mask, 8)
    seq, _, counts = generate(odd, "lean_tvm", ids, mask, 8)
    assert counts == {"sdpa": 2 * 8} and torch.equal(seq, sdpa_seq)
