"""Prompts and the checks that a lean_tvm generation agrees with SDPA's, shared by the CPU and GPU
tests (models: random weights from configs, ``lean_tvm.bench.hf_generate``; nothing from a hub)."""

from __future__ import annotations

import torch

from lean_tvm.bench.hf_generate import cache_argument
from lean_tvm.integrations import transformers as lean_hf

NO_SPECIAL_TOKENS = dict(pad_token_id=0, bos_token_id=None, eos_token_id=None)  # generate() runs to the end


def with_cache(model, cache) -> dict:
    return {cache_argument(model): cache}


def prompts(lengths, vocab: int, device: str = "cpu", seed: int = 1):
    """Left-padded token ids [B, max(lengths)] (pad 0, tokens 1..vocab-1) and their padding mask."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, width - n:] = torch.randint(1, vocab, (n,), generator=g)
        mask[b, width - n:] = 1
    return ids.to(device), mask.to(device)


def generate(model, impl: str, ids, mask, new_tokens: int, **kwargs):
    """Greedy ``generate`` with attention ``impl``: (sequences [B, T + new_tokens], scores [B, new_tokens, V]
    fp32, counts of the attention calls lean_tvm and SDPA served)."""
    model.set_attn_implementation(impl)
    lean_hf.reset()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, output_scores=True, return_dict_in_generate=True, **kwargs)
    return out.sequences, torch.stack(out.scores, 1).float(), dict(lean_hf.counts)


def sdpa_logits_over(model, sequences, mask_prefix):
    """SDPA's logits [B, T, V] (fp32) over whole sequences in one forward without a cache: the
    teacher-forced view of every step. ``mask_prefix``: the prompts' padding mask [B, T0]."""
    model.set_attn_implementation("sdpa")
    generated = sequences.shape[1] - mask_prefix.shape[1]
    mask = torch.cat([mask_prefix, mask_prefix.new_ones(sequences.shape[0], generated)], 1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(sequences, attention_mask=mask, position_ids=positions).logits.float()


def assert_greedy_choices_agree(sequences, prompt_len: int, sdpa_logits, tol: float):
    """Every generated token is SDPA's greedy choice over the same prefix, up to a near tie: its
    SDPA logit within ``tol`` of the largest. (Exact token equality would hang on ties that
    rounding breaks either way.)"""
    new = sequences[:, prompt_len:]
    steps = sdpa_logits[:, prompt_len - 1:-1]  # the logits that chose each new token
    chosen = steps.gather(-1, new.unsqueeze(-1)).squeeze(-1)
    gap = steps.max(-1).values - chosen
    assert (gap <= tol).all(), f"tokens SDPA would not choose, at (sequence, step) {(gap > tol).nonzero().tolist()}"


def assert_same_tokens_up_to_a_tie(lean_seq, sdpa_seq, sdpa_scores, prompt_len: int, tol: float):
    """The same tokens as SDPA's generation, or the same up to a step where SDPA's top two logits
    were within ``tol`` (where the two may part ways)."""
    for b in range(lean_seq.shape[0]):
        differ = (lean_seq[b, prompt_len:] != sdpa_seq[b, prompt_len:]).nonzero()
        if len(differ):
            step = differ[0].item()
            top2 = sdpa_scores[b, step].topk(2).values
            assert top2[0] - top2[1] <= tol, f"sequence {b} departs from SDPA's at step {step} without a tie"


def check_left_padded_batch(model, lengths, vocab: int, device, seed: int, layers: int, tol: float) -> None:
    """A left-padded batch of prompts of ``lengths``, 16 new tokens: every decode step of every layer
    in lean_tvm; the tokens SDPA's (up to a tie of ``tol``) and SDPA's greedy choices; and each
    sequence what it generates alone (where padding, if attended, would change it)."""
    ids, mask = prompts(lengths, vocab, device, seed=seed)
    seq, _, counts = generate(model, "lean_tvm", ids, mask, 16)
    assert counts["lean_tvm"] == layers * 15
    sdpa_seq, sdpa_scores, _ = generate(model, "sdpa", ids, mask, 16)
    assert_same_tokens_up_to_a_tie(seq, sdpa_seq, sdpa_scores, ids.shape[1], tol)
    assert_greedy_choices_agree(seq, ids.shape[1], sdpa_logits_over(model, seq, mask), tol)
    for b, n in enumerate(lengths):
        alone, alone_scores, _ = generate(model, "lean_tvm", ids[b:b + 1, -n:], mask[b:b + 1, -n:], 16)
        assert_same_tokens_up_to_a_tie(seq[b:b + 1, -16:], alone[:, -16:], alone_scores, 0, tol)


def stepped_logits(model, impl: str, tokens, prompt_len: int, cache, step: int = 1, padding_mask: bool = True):
    """Teacher-forced logits [forwards, step, V] (fp32) with attention ``impl``: a prompt of
    ``prompt_len`` tokens of ``tokens`` [1, T] into ``cache``, then the rest, ``step`` tokens per
    forward (with the padding mask generate() passes, or none). Also who served the calls."""
    model.set_attn_implementation(impl)
    lean_hf.reset()
    with torch.no_grad():
        model(tokens[:, :prompt_len], **with_cache(model, cache))
        out = []
        for t in range(prompt_len, tokens.shape[1], step):
            mask = {"attention_mask": tokens.new_ones(1, t + step)} if padding_mask else {}
            out.append(model(tokens[:, t:t + step], **mask, **with_cache(model, cache)).logits[0].float())
    return torch.stack(out), dict(lean_hf.counts)
