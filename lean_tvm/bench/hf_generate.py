"""Tokens/s of transformers' ``generate()`` with SDPA, flex attention and lean_tvm, eager and compiled.

Random-weight models shaped like Llama-3-8B (32/8 heads of 128, hidden 4096) and Qwen2-7B (28/4
heads, hidden 3584), a few layers (``--layers``, default 4: 32 would not hold batch 32 x 32k of
cache), bf16. For every (model, batch, prompt) the prompt's first P - 1 tokens are put in a
dynamic and a static cache once (SDPA, in chunks), so every timed ``generate()`` call is decode
only: it feeds the prompt's last token, then ``--new-tokens`` - 1 more, and its cache is rewound
after. "eager" is the dynamic cache; "compiled" the static cache with ``generate``'s own
``torch.compile`` (mode reduce-overhead: CUDA graphs). The (backend, mode) runs of a shape are
timed in interleaved rounds (median and p10/p90 of the rounds). For the eager rows the torch
profiler also gives the attention share of a decode step: the device time of the kernels the
attention function launched over that of all kernels of the step.

    python -m lean_tvm.bench.hf_generate --out results/h200/hf_generate --prompts 4096 --batches 1,8,32

Rows are appended to ``results.csv`` in ``--out`` (so a grid can be run over several calls) and
``results.md`` is rewritten from all of them after each shape.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import inspect
import json
import statistics
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

import torch
import transformers
from torch.autograd import DeviceType
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM, CompileConfig, DynamicCache, StaticCache

from lean_tvm.integrations import transformers as lean_hf

from .suite import git_commit, portable_argv

MODELS = {  # the attention and matrix shapes of the named models; the layer count is an argument
    "llama3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=128, vocab_size=128256, rope_theta=500000.0),
    "qwen2-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
                     num_key_value_heads=4, head_dim=128, vocab_size=152064, rope_theta=1000000.0),
    "llama-tiny": dict(model_type="llama", hidden_size=256, intermediate_size=512, num_attention_heads=8,
                       num_key_value_heads=2, head_dim=64, vocab_size=256),  # the benchmark's own check, on a CPU
}
GPU_MODELS = ("llama3-8b", "qwen2-7b")
BACKENDS = ("sdpa", "flex_attention", lean_hf.NAME)
MODES = ("eager", "compiled")
FIELDS = ("model", "layers", "dtype", "batch", "prompt", "new_tokens", "backend", "mode", "tokens_per_s",
          "tokens_per_s_p10", "tokens_per_s_p90", "ms_per_step", "rounds", "attention_share", "lean_calls",
          "agree", "note")


def model_config(name: str, layers: int, max_positions: int):
    """The config of ``name`` in ``MODELS`` with ``layers`` layers; generate() runs to the end (no EOS)."""
    shape = dict(MODELS[name])
    return AutoConfig.for_model(shape.pop("model_type"), num_hidden_layers=layers,
                                max_position_embeddings=max_positions, pad_token_id=0, bos_token_id=None,
                                eos_token_id=None, tie_word_embeddings=False, **shape)


def random_model(config, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """Seeded random weights, initialised on ``device`` (a CPU init of 2B parameters takes minutes)."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def cache_argument(model) -> str:
    """The forward's and generate's name for the cache: ``cache`` since transformers 5.2x, else ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def fill(model, cache, ids: torch.Tensor, chunk: int) -> None:
    """Put ``ids`` [B, P] into ``cache`` with SDPA, ``chunk`` tokens per forward."""
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        for start in range(0, ids.shape[1], chunk):
            model(ids[:, start:start + chunk], logits_to_keep=1, **{cache_argument(model): cache})


def rewind(cache, length: int) -> None:
    """Back to the first ``length`` cached tokens: a static cache's rows past them are overwritten
    by the next tokens, a dynamic cache's are cut off."""
    for layer in cache.layers:
        if isinstance(getattr(layer, "cumulative_length", None), torch.Tensor):
            layer.cumulative_length.fill_(length)
        else:
            layer.keys, layer.values = layer.keys[..., :length, :], layer.values[..., :length, :]


def generate_timed(model, ids, cache, new_tokens: int, compile_config) -> tuple[float, torch.Tensor]:
    """One greedy ``generate()`` from a cache holding all of ``ids`` [B, P] but its last token:
    (seconds, the new tokens [B, new_tokens]); the cache is rewound after."""
    device = ids.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, compile_config=compile_config,
                             **{cache_argument(model): cache})
    sync()
    seconds = time.perf_counter() - start
    rewind(cache, ids.shape[1] - 1)
    return seconds, out[:, ids.shape[1]:]


@contextlib.contextmanager
def attention_marked(backend: str):
    """Every call of ``backend``'s attention function inside a profiler range named "attention"."""
    plain = AttentionInterface._global_mapping[backend]

    def marked(*args, **kwargs):
        with torch.profiler.record_function("attention"):
            return plain(*args, **kwargs)

    AttentionInterface.register(backend, marked)
    try:
        yield
    finally:
        AttentionInterface.register(backend, plain)


def attention_share(model, backend: str, ids, cache, steps: int = 3) -> float:
    """The share of eager decode steps' kernel time (CPU time on a CPU) spent in attention."""
    model.set_attn_implementation(backend)
    on_gpu = ids.device.type == "cuda"
    mask = torch.ones_like(ids)
    token = ids[:, -1:]
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if on_gpu else [])
    with torch.no_grad():
        model(token, attention_mask=mask, **{cache_argument(model): cache})  # warm up
        rewind(cache, ids.shape[1] - 1)
        with attention_marked(backend), torch.profiler.profile(activities=activities) as prof:
            for t in range(steps):
                step_mask = torch.cat([mask, mask.new_ones(mask.shape[0], t)], 1)
                model(token, attention_mask=step_mask, **{cache_argument(model): cache})
            if on_gpu:
                torch.cuda.synchronize()
    rewind(cache, ids.shape[1] - 1)
    # The raw events, not key_averages (which would merge the range with its GPU-side annotation of
    # the same name); kernels counted once, as device events, as the profiler's own table does.
    events = prof.events()
    ranges = [e for e in events if e.name == "attention" and e.device_type == DeviceType.CPU]
    if on_gpu:
        total = sum(e.self_device_time_total for e in events
                    if e.device_type == DeviceType.CUDA and not e.is_user_annotation)
        attention = sum(e.device_time_total for e in ranges)
    else:
        total = sum(e.self_cpu_time_total for e in events)
        attention = sum(e.cpu_time_total for e in ranges)
    return attention / total if total else float("nan")


def compile_config(args, on_gpu: bool) -> CompileConfig:
    """generate()'s own compilation (inductor, reduce-overhead: CUDA graphs); other backends for CPU smoke runs."""
    config = CompileConfig(backend=args.compile_backend,
                           mode="reduce-overhead" if args.compile_backend == "inductor" else None)
    if not on_gpu:
        config._compile_all_devices = True
    return config


def bench_shape(model, name: str, batch: int, prompt: int, args, device: torch.device) -> list[dict]:
    """All (backend, mode) rows of one shape, timed in interleaved rounds."""
    g = torch.Generator().manual_seed(batch * 100003 + prompt)
    ids = torch.randint(1, model.config.vocab_size, (batch, prompt), generator=g).to(device)
    caches = {"eager": DynamicCache(config=model.config),
              "compiled": StaticCache(config=model.config, max_cache_len=prompt + args.new_tokens)}
    for cache in caches.values():
        fill(model, cache, ids[:, :-1], args.prefill_chunk)
    compiled = compile_config(args, device.type == "cuda")
    runs = [(b, m) for b in args.backends for m in args.modes]
    samples: dict[tuple, list[float]] = {run: [] for run in runs}
    tokens, notes, lean_calls = {}, {}, {}
    for backend, mode in runs:  # warm-up: compiles, captures, loads the library
        model.set_attn_implementation(backend)
        lean_hf.reset()
        try:
            _, tokens[backend, mode] = generate_timed(model, ids, caches[mode], args.new_tokens,
                                                      compiled if mode == "compiled" else None)
            lean_calls[backend, mode] = lean_hf.counts.get(lean_hf.NAME, 0)
        except Exception as e:  # a backend that does not run on this shape: a row that says why
            notes[backend, mode] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            traceback.print_exc()
            rewind(caches[mode], prompt - 1)
    for _ in range(args.rounds):
        for backend, mode in runs:
            if (backend, mode) in notes:
                continue
            model.set_attn_implementation(backend)
            seconds, _ = generate_timed(model, ids, caches[mode], args.new_tokens,
                                        compiled if mode == "compiled" else None)
            samples[backend, mode].append(seconds)
    shares = {b: attention_share(model, b, ids, caches["eager"]) for b in args.backends
              if (b, "eager") not in notes and args.profile}
    reference = tokens.get(("sdpa", "eager"))
    rows = []
    for backend, mode in runs:
        row = dict(model=name, layers=model.config.num_hidden_layers, dtype=args.dtype, batch=batch, prompt=prompt,
                   new_tokens=args.new_tokens, backend=backend, mode=mode, note=notes.get((backend, mode), ""))
        if samples[backend, mode]:
            rates = sorted(batch * args.new_tokens / s for s in samples[backend, mode])
            row.update(tokens_per_s=statistics.median(rates), tokens_per_s_p10=rates[len(rates) // 10],
                       tokens_per_s_p90=rates[-1 - len(rates) // 10], rounds=len(rates),
                       ms_per_step=statistics.median(samples[backend, mode]) / args.new_tokens * 1e3,
                       lean_calls=lean_calls.get((backend, mode)),
                       agree=float((tokens[backend, mode] == reference).float().mean()) if reference is not None
                       else None)
        if mode == "eager" and backend in shares:
            row["attention_share"] = shares[backend]
        rows.append(row)
    del caches
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    """One line per (model, batch, prompt): tokens/s of every (backend, mode), lean_tvm over the
    best other backend in each mode, and the attention share of an SDPA eager decode step."""
    runs = [(b, m) for b in BACKENDS for m in MODES if any(r["backend"] == b and r["mode"] == m for r in rows)]
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    head = ["model", "batch", "prompt", *[f"{b} {m}" for b, m in runs], *[f"lean_tvm / best other, {m}" for m in modes],
            "attention share"]
    first = rows[0] if rows else {}
    lines = [f"# generate() tokens/s ({meta.get('gpu', '?')}, commit {meta.get('commit', '?')})", "",
             f"Decode only: {first.get('new_tokens', '?')} new tokens per sequence after a cached prompt, "
             f"{first.get('dtype', '?')} random weights, {first.get('layers', '?')} layers; median of interleaved "
             "rounds. `agree` (in results.csv): share of tokens equal to SDPA eager's (near-ties of a random model "
             "may part them). Attention share: SDPA eager, device time (torch profiler).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    shapes = sorted({(r["model"], int(r["batch"]), int(r["prompt"])) for r in rows})
    for model, batch, prompt in shapes:
        by = {(r["backend"], r["mode"]): r for r in rows
              if (r["model"], int(r["batch"]), int(r["prompt"])) == (model, batch, prompt)}
        rate = {k: float(r["tokens_per_s"]) for k, r in by.items() if r.get("tokens_per_s") not in (None, "")}
        cells = [f"{rate[k]:.0f}" if k in rate else (by[k]["note"][:40] or "-") if k in by else "" for k in runs]
        for mode in modes:
            lean = rate.get((lean_hf.NAME, mode))
            other = max((v for (b, m), v in rate.items() if m == mode and b != lean_hf.NAME), default=None)
            cells.append(f"{lean / other:.2f}x" if lean and other else "")
        share = by.get(("sdpa", "eager"), {}).get("attention_share")
        cells.append("" if share in (None, "") else f"{float(share):.0%}")
        lines.append("| " + " | ".join([model, str(batch), str(prompt), *cells]) + " |")
    lines += ["", "All rows with p10/p90, ms per step, agreement and the share of every backend: `results.csv`."]
    return "\n".join(lines) + "\n"


def append_rows(rows: list[dict], path: Path) -> list[dict]:
    """Append ``rows`` to the CSV at ``path`` (header once); returns all its rows."""
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in FIELDS})
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def collect_meta(device: torch.device) -> dict:
    return {"gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "transformers": transformers.__version__, "commit": git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "argv": portable_argv()}


def parse_args(argv: Sequence[str] | None = None):
    def ints(s):
        return [int(x) for x in s.split(",")]

    def names(choices):
        def parse(s):
            got = s.split(",")
            bad = [x for x in got if x not in choices]
            if bad:
                raise argparse.ArgumentTypeError(f"{bad}: expected some of {choices}")
            return got
        return parse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder of results.csv (appended to) and results.md")
    p.add_argument("--models", type=names(tuple(MODELS)), default=list(GPU_MODELS))
    p.add_argument("--batches", type=ints, default=[1, 8, 32])
    p.add_argument("--prompts", type=ints, default=[4096, 32768])
    p.add_argument("--backends", type=names(BACKENDS), default=list(BACKENDS))
    p.add_argument("--modes", type=names(MODES), default=list(MODES))
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    p.add_argument("--prefill-chunk", type=int, default=4096, help="tokens per forward filling the caches")
    p.add_argument("--no-profile", dest="profile", action="store_false", help="skip the attention share")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compiled rows")
    p.add_argument("--device", default="cuda")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    lean_hf.register()
    # Each (backend, shape) may add a graph of the decode step: more than the default limit, past
    # which Dynamo would quietly run the compiled rows eagerly.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = collect_meta(device)
    (args.out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    for name in args.models:
        config = model_config(name, args.layers, max(args.prompts) + args.new_tokens)
        model = random_model(config, getattr(torch, args.dtype), device)
        for prompt in args.prompts:
            for batch in args.batches:
                print(f"{name} B{batch} P{prompt}", flush=True)
                all_rows = append_rows(bench_shape(model, name, batch, prompt, args, device), args.out / "results.csv")
                (args.out / "results.md").write_text(markdown(all_rows, meta))
        del model
    print((args.out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
