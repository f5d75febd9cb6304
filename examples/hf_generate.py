"""generate() of a transformers model with and without ``attn_implementation="lean_tvm"``.

A Llama- or Qwen2-style model built from a config with random weights (nothing is downloaded),
a batch of random prompts, greedy generation with SDPA and with lean_tvm; prints tokens/s
(prefill included) and how many tokens the two runs share. The defaults are small enough for a CPU
(the CPU form of the kernel, built once by ``lean_tvm.build.ensure_library("cpu")``); on a GPU try
a Llama-3-8B-shaped model:

    python examples/hf_generate.py --hidden 4096 --heads 32 --kv-heads 8 --intermediate 14336 --layers 4 \\
        --vocab 128256 --prompt 4096 --batch 8 --new-tokens 128 --static
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from lean_tvm.integrations import transformers as lean_hf


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=("llama", "qwen2"), default="llama")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=128, help="64, 128 or 256: others fall back to SDPA")
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--static", action="store_true", help="a static cache (on a GPU generate() compiles the step)")
    args = p.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float16
    make_config = LlamaConfig if args.arch == "llama" else Qwen2Config
    config = make_config(hidden_size=args.hidden, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                         head_dim=args.head_dim, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                         vocab_size=args.vocab, max_position_embeddings=args.prompt + args.new_tokens,
                         pad_token_id=0, bos_token_id=None, eos_token_id=None)  # no EOS: every run is as long
    torch.manual_seed(0)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    ids = torch.randint(1, args.vocab, (args.batch, args.prompt), device=device)
    lean_hf.register()

    tokens = {}
    for impl in ("sdpa", lean_hf.NAME):
        model.set_attn_implementation(impl)
        kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens, do_sample=False,
                      cache_implementation="static" if args.static else None)
        with torch.no_grad():
            model.generate(ids, **kwargs)  # warm-up: compiles, loads the kernel library
            lean_hf.reset()
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = model.generate(ids, **kwargs)
            if device.type == "cuda":
                torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        tokens[impl] = out[:, args.prompt:]
        served = ", ".join(f"{k} {v}" for k, v in sorted(lean_hf.counts.items())) or "compiled, not counted"
        note = f"  (attention calls served: {served})" if impl == lean_hf.NAME else ""
        print(f"{impl:>9}: {args.batch * args.new_tokens / seconds:8.1f} tokens/s{note}")
    same = (tokens["sdpa"] == tokens[lean_hf.NAME]).float().mean().item()
    print(f"tokens equal to SDPA's: {same:.0%} (random weights: near-ties may part them)")


if __name__ == "__main__":
    main()
