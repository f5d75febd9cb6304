"""Max error of the fp8-cache path against float64, per query dtype, cache dtype and scale kind.

The reference runs on the dequantised fp8 values (stored value times its scale), so the numbers
measure the kernel, not the quantisation. Errors of the output are taken relative to the V scale
of each head (outputs scale with it); lse errors are absolute (natural log). Each row also gives
the worst ratio of an error to the test suite's tolerance for the query dtype (<= 1: within).

    python -m lean_tvm.bench.fp8_accuracy --out results/h200/fp8_accuracy     # GPU
    python -m lean_tvm.bench.fp8_accuracy --device cpu --small --out /tmp/acc  # the CPU library
"""

from __future__ import annotations

import argparse
import datetime
import math
from collections.abc import Sequence
from pathlib import Path

import torch

import lean_tvm
from lean_tvm.reference import decode_attention_reference, dequantize, gather_pages

from .suite import git_commit

# Output vs float64 (the tests' tolerances: tests/helpers.py), lse absolute.
TOLERANCES = {torch.float16: (2e-3, 1e-2), torch.bfloat16: (1.5e-2, 2e-2)}
LSE_ATOL = 2e-3
SCALE_KINDS = {"1": (1.0, 1.0), "1e-3 / 1e3": (1e-3, 1e3), "1e3 / 1e-3 (large logits)": (1e3, 1e-3),
               "per head, 1e-3..1e3": ("head", "head")}
# (lens, Sq, Hq, Hkv, D, page): dense rows (page None) and paged ones (pages of 16)
CASES = [([4096, 0, 37, 1000], 1, 32, 8, 128, None), ([2500, 3, 700], 4, 28, 4, 128, 16),
         ([3000, 48], 1, 8, 1, 64, None), ([2000, 700], 1, 16, 2, 256, 16)]
SMALL_CASES = [([200, 0, 37], 1, 8, 2, 64, None), ([150, 3], 2, 8, 1, 64, 16)]


def _scale(kind, hkv: int, device, seed: int):
    if kind != "head":
        return kind
    g = torch.Generator().manual_seed(seed)
    return torch.exp(torch.empty(hkv).uniform_(math.log(1e-3), math.log(1e3), generator=g)).float().to(device)


def _per_head(scale, hq: int, hkv: int) -> torch.Tensor:
    s = scale if isinstance(scale, torch.Tensor) else torch.tensor([scale] * hkv)
    return s.double().cpu().repeat_interleave(hq // hkv).view(1, 1, hq, 1)


def case_errors(lens, sq, hq, hkv, head_dim, page, dtype, fp8, kind, device, seed=0) -> tuple[float, float, float]:
    """(max output error relative to V's scale, max lse error, worst error / tolerance) of one call."""
    g = torch.Generator().manual_seed(seed)
    batch, length = len(lens), max(max(lens), 1)
    if page:
        pages = -(-length // page)
        k = torch.randn(batch * pages, page, hkv, head_dim, generator=g).to(fp8)
        v = torch.randn(batch * pages, page, hkv, head_dim, generator=g).to(fp8)
        table = torch.randperm(batch * pages, generator=g).to(torch.int32).view(batch, pages)
        layout = "blhd"
    else:
        k = torch.randn(batch, hkv, length, head_dim, generator=g).to(fp8)
        v = torch.randn(batch, hkv, length, head_dim, generator=g).to(fp8)
        table, layout = None, "bhld"
    q = torch.randn(batch, sq, hq, head_dim, generator=g).to(dtype)
    ks, vs = (_scale(s, hkv, device, seed + i) for i, s in enumerate(SCALE_KINDS[kind]))
    lens_t = torch.tensor(lens, dtype=torch.int32)
    o, lse = lean_tvm.decode_attention(q.to(device), k.to(device), v.to(device), lens_t.to(device),
                                       block_table=None if table is None else table.to(device), layout=layout,
                                       k_scale=ks, v_scale=vs, return_lse=True)
    kd, vd = dequantize(k, ks, layout), dequantize(v, vs, layout)
    if page:  # the reference reads the pages as a dense [B, Hkv, L, D] cache
        kd, vd = gather_pages(kd, table, lens, layout), gather_pages(vd, table, lens, layout)
    ref_o, ref_lse = decode_attention_reference(q.cpu(), kd.cpu(), vd.cpu(), lens, 1 / math.sqrt(head_dim))
    unit = _per_head(vs, hq, hkv)
    err = (o.cpu().double() - ref_o) / unit
    ref = ref_o / unit
    atol, rtol = TOLERANCES[dtype]
    seen = torch.isfinite(ref_lse)
    lse_err = torch.cat([(lse.cpu().double() - ref_lse)[seen].abs(), torch.zeros(1, dtype=torch.float64)])
    lse_tol = LSE_ATOL + 1e-4 * torch.cat([ref_lse[seen].abs(), torch.zeros(1, dtype=torch.float64)])
    ratio = max(float((err.abs() / (atol + rtol * ref.abs())).max()), float((lse_err / lse_tol).max()))
    return float(err.abs().max()), float(lse_err.max()), ratio


def measure(device: torch.device, cases: Sequence) -> list[dict]:
    rows = []
    for dtype in (torch.float16, torch.bfloat16):
        for fp8 in (torch.float8_e4m3fn, torch.float8_e5m2):
            for kind in SCALE_KINDS:
                worst = [0.0, 0.0, 0.0]
                for i, (lens, sq, hq, hkv, d, page) in enumerate(cases):
                    errs = case_errors(lens, sq, hq, hkv, d, page, dtype, fp8, kind, device, seed=i)
                    worst = [max(a, b) for a, b in zip(worst, errs, strict=True)]
                rows.append({"q": str(dtype).removeprefix("torch."), "cache": str(fp8).removeprefix("torch."),
                             "scales": kind, "o_err": worst[0], "lse_err": worst[1], "vs_tolerance": worst[2]})
                print(f"[lean_tvm.bench.fp8_accuracy] {rows[-1]}", flush=True)
    return rows


def markdown(rows: list[dict], device: torch.device, cases: Sequence) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (llvm)"
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    lines = [f"# fp8 caches: max error vs float64 ({name}, commit {git_commit()}, {date})", "",
             "Over the cases (lens, Sq, Hq, Hkv, D, page; page None = dense): "
             + "; ".join(str(c) for c in cases) + ". k_scale / v_scale as named. Output error relative "
             "to the head's V scale; lse error absolute; last column: worst error over the tests' tolerance.",
             "", "| q | cache | k_scale / v_scale | max output error | max lse error | worst / tolerance |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['q']} | {r['cache']} | {r['scales']} | {r['o_err']:.2e} | {r['lse_err']:.2e} | "
              f"{r['vs_tolerance']:.2f} |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lean_tvm.bench.fp8_accuracy", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="folder for results.md")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="small cases (a CPU run)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    cases = SMALL_CASES if args.small else CASES
    rows = measure(device, cases)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(markdown(rows, device, cases))
    print((args.out / "results.md").read_text())
    return 0 if all(r["vs_tolerance"] <= 1 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
