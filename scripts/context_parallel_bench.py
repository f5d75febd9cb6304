"""Context-parallel decode attention across GPUs: equality with one GPU, time and scaling.

One process per GPU (torchrun), NCCL. For every length and every group size W (1, 2, 4, ... up
to the launched world size; ranks 0..W-1), each rank of the group holds its contiguous piece of
the KV cache (``lean_tvm.distributed.shard_bounds``) and runs
``context_parallel_decode_attention`` (local LeanAttention with LSE, an all-gather of the
partial states, the merge in rank order). W = 1 is the plain operator on one GPU with the whole
cache, where it fits. Checked: the output and LSE equal one GPU's (within rounding), the same bits
on every rank, bitwise reproducible, and the gather-to-one-rank variant bitwise equal to the
all-gather one. Timed: device time (CUDA events, median, cold L2, host barrier before each call
so ranks start together; a group's time is the slowest rank's median), the local attention alone
(all-gather + merge is the difference of the two medians), and host time per call back to back.

The cache contents are a hash of (seed, sequence, head, position, dim): every rank makes only
its own rows, and they are the same rows on any device and for any split.

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
        torchrun --standalone --nproc-per-node 2 scripts/context_parallel_bench.py --out out/cp_h200x2

CPU smoke test of the logic (gloo, tiny sizes):

    torchrun --nproc-per-node 2 --master-addr 127.0.0.1 --master-port 29511 \\
        scripts/context_parallel_bench.py --backend gloo --device cpu --lengths 4096 --out out/cp_cpu
"""

from __future__ import annotations

import argparse
import csv
import os
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import lean_tvm  # noqa: E402
import lean_tvm.distributed as cp  # noqa: E402 - sets the NVLS variables (before init_process_group)

M32 = 0xFFFFFFFF
FLUSH_BYTES = 256 * 1024 * 1024
CYCLES_PER_US = 2000  # torch.cuda._sleep spins this many cycles per microsecond at ~2 GHz
# a group passes when max|o - o_1| <= RTOL * max|o_1| and max|lse - lse_1| <= LSE_ATOL
RTOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
LSE_ATOL = 1e-3


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="nccl", choices=["nccl", "gloo"])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--lengths", default="262144,1048576,2097152", help="tokens per sequence, comma-separated")
    ap.add_argument("--worlds", default=None, help="group sizes (default 1, 2, 4, ... and the world size)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16"])
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--sleep-us", type=float, default=1000.0,
                    help="GPU spin before each timed call, longer than the host needs to queue the call")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="out/context_parallel")
    return ap.parse_args()


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash of int64 values in [0, 2^32): products stay below 2^59 (exact)."""
    for _ in range(2):
        x = (((x >> 16) ^ x) * 0x45D9F3B) & M32
    return (x >> 16) ^ x


def hashed_rows(seed: int, batch: int, heads: int, start: int, stop: int, head_dim: int, dtype, device,
                chunk: int = 1 << 15) -> torch.Tensor:
    """Rows [start, stop) of a [batch, heads, L, head_dim] tensor of uniform values in [-sqrt 3, sqrt 3)
    (unit variance), each a function of (seed, b, h, position, d) only."""
    out = torch.empty(batch, heads, stop - start, head_dim, dtype=dtype, device=device)
    bh = torch.arange(batch * heads, dtype=torch.int64, device=device).view(batch, heads, 1, 1)
    salt = _hash32((bh * 0x9E3779 + seed) & M32)
    d = torch.arange(head_dim, dtype=torch.int64, device=device)
    for p0 in range(start, stop, chunk):
        p1 = min(p0 + chunk, stop)
        pos = torch.arange(p0, p1, dtype=torch.int64, device=device).view(1, 1, -1, 1)
        x = _hash32(((pos * head_dim + d) ^ salt) & M32)
        out[:, :, p0 - start:p1 - start] = ((x & 0xFFFFFF).float() * 2.0**-23 - 1.0) * 3**0.5
    return out


class Setup:
    def __init__(self, args):
        self.args = args
        self.rank, self.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        if args.device == "cuda":
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(self.device)
            self.flush = torch.ones(FLUSH_BYTES // 4, device=self.device)
            self.name = torch.cuda.get_device_name(self.device)
        else:
            try:  # the CPU library needs apache-tvm's runtime loaded before its first call
                import tvm  # noqa: F401
            except ImportError:
                pass
            self.device, self.flush, self.name = torch.device("cpu"), None, "cpu"
        kwargs = {"device_id": self.device} if args.backend == "nccl" else {}
        dist.init_process_group(args.backend, **kwargs)
        self.dtype = getattr(torch, args.dtype)
        worlds = sorted({1 << i for i in range(self.world.bit_length()) if 1 << i <= self.world} | {self.world})
        self.worlds = [int(w) for w in args.worlds.split(",")] if args.worlds else worlds
        if any(not 1 <= w <= self.world for w in self.worlds):
            raise SystemExit(f"--worlds: group sizes in [1, {self.world}], got {self.worlds}")
        self.groups = {w: dist.new_group(list(range(w))) for w in self.worlds if w > 1}  # every rank, same order
        if self.rank == 0:  # finds (or builds, once) the operator library before the others look for it
            x = torch.zeros(1, args.kv_heads, args.head_dim, dtype=self.dtype, device=self.device)
            lean_tvm.decode_attention(x, x[:, :, None], x[:, :, None])
        self.sync(dist.group.WORLD)

    def rows(self, which: int, heads: int, start: int, stop: int) -> torch.Tensor:
        a = self.args
        return hashed_rows(a.seed * 3 + which, a.batch, heads, start, stop, a.head_dim, self.dtype, self.device)

    def sync(self, group=None) -> None:
        """Host barrier of the group (or none): every member's host passes it once its device is idle."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if group is not None:
            t = torch.zeros(1, device=self.device)
            dist.all_reduce(t, group=group)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)

    def time_calls(self, fn, group=None) -> dict:
        """Device time per call (us): median/p10/p90 of this rank, then host time per call back to back."""
        a = self.args
        for _ in range(a.warmup):
            fn()
        samples = []
        for _ in range(a.reps):
            if self.device.type == "cuda":
                self.flush.sum()  # a read: evicts the last call's rows from L2 without dirty lines
                self.sync(group)
                torch.cuda._sleep(int(a.sleep_us * CYCLES_PER_US))  # the host queues the call meanwhile
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end) * 1e3)
            else:
                self.sync(group)
                t0 = time.perf_counter()
                fn()
                samples.append((time.perf_counter() - t0) * 1e6)
        s = sorted(samples)
        self.sync(group)
        t0 = time.perf_counter()
        for _ in range(a.reps):
            fn()
        self.sync()
        host = (time.perf_counter() - t0) / a.reps * 1e6
        return {"median": statistics.median(s), "p10": s[len(s) // 10], "p90": s[-1 - len(s) // 10], "host": host}

    def slowest(self, stats: dict, group) -> dict:
        """The stats of the group member with the largest median (on every member)."""
        mine = torch.tensor([stats[k] for k in ("median", "p10", "p90", "host")], dtype=torch.float64,
                            device=self.device)
        every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
        dist.all_gather(every, mine, group=group)
        worst = max(every, key=lambda t: float(t[0])).tolist()
        return dict(zip(("median", "p10", "p90", "host"), worst, strict=True))


def single_device(s: Setup, length: int, q: torch.Tensor):
    """The plain operator on rank 0 with the whole cache: (o, lse, stats), or None when it does not fit."""
    a = s.args
    try:
        k, v = s.rows(1, a.kv_heads, 0, length), s.rows(2, a.kv_heads, 0, length)
        lens = torch.full((a.batch,), length, dtype=torch.int32, device=s.device)
        o, lse = lean_tvm.decode_attention(q, k, v, lens, return_lse=True)
        stats = s.time_calls(lambda: lean_tvm.decode_attention(q, k, v, lens, check_lengths=False))
        return o, lse, stats
    except torch.cuda.OutOfMemoryError:
        return None
    finally:
        k = v = None
        if s.device.type == "cuda":
            torch.cuda.empty_cache()


def context_parallel(s: Setup, length: int, q: torch.Tensor, world: int, group):
    """On ranks 0..world-1: (o, lse, checks, stats of the whole call, stats of the local attention)."""
    a = s.args
    seq_lens = [length] * a.batch
    lens, offsets = cp.shard_bounds(seq_lens, world, s.rank)
    start, n = int(offsets[0]), int(lens[0])  # every sequence has the same length
    cap = cp.shard_capacity(seq_lens, world)
    k = torch.zeros(a.batch, a.kv_heads, cap, a.head_dim, dtype=s.dtype, device=s.device)
    v = torch.zeros_like(k)
    k[:, :, :n], v[:, :, :n] = s.rows(1, a.kv_heads, start, start + n), s.rows(2, a.kv_heads, start, start + n)
    lens = lens.to(s.device)

    def call(**kw):
        return cp.context_parallel_decode_attention(q, k, v, lens, group=group, **kw)

    o, lse = call(return_lse=True)
    o2, lse2 = call(return_lse=True)
    o_dst = call(dst=0)
    # every member's bits, on rank 0
    packed = torch.cat([o.reshape(-1).view(torch.uint8), lse.reshape(-1).view(torch.uint8)])
    every = [torch.empty_like(packed) for _ in range(world)] if s.rank == 0 else None
    dist.gather(packed, every, dst=0, group=group)
    checks = {}
    if s.rank == 0:
        checks = {"deterministic": torch.equal(o, o2) and torch.equal(lse, lse2),
                  "same_on_ranks": all(torch.equal(x, packed) for x in every),
                  "gather_equals_all_gather": torch.equal(o_dst, o)}
    total = s.slowest(s.time_calls(lambda: call(check_lengths=False), group), group)
    local = s.slowest(s.time_calls(
        lambda: lean_tvm.decode_attention(q, k, v, lens, check_lengths=False), group), group)
    return o, lse, checks, total, local


def compare(o, lse, ref, dtype) -> dict:
    if ref is None:
        return {"max_abs_diff": "", "rel_diff": "", "lse_max_diff": "", "equal": ""}
    o_1, lse_1 = ref[0].float(), ref[1]
    diff = float((o.float() - o_1).abs().max())
    rel = diff / max(float(o_1.abs().max()), 1e-30)
    lse_diff = float((lse - lse_1).abs().max())
    return {"max_abs_diff": diff, "rel_diff": rel, "lse_max_diff": lse_diff,
            "equal": rel <= RTOL[dtype] and lse_diff <= LSE_ATOL}


def main() -> int:
    args = parse_args()
    s = Setup(args)
    rows, ok = [], True
    kv_bytes = 2 * args.batch * args.kv_heads * args.head_dim * torch.finfo(s.dtype).bits // 8
    for length in (int(x) for x in args.lengths.split(",")):
        q = s.rows(0, args.heads, 0, 1)[:, :, 0].contiguous()  # the same q on every rank
        ref = single_device(s, length, q) if s.rank == 0 and 1 in s.worlds else None
        base = {"tokens": length, "batch": args.batch, "heads": args.heads, "kv_heads": args.kv_heads,
                "head_dim": args.head_dim, "dtype": args.dtype, "device": s.name, "backend": args.backend,
                "kv_gib": round(kv_bytes * length / 2**30, 3)}
        if s.rank == 0 and 1 in s.worlds:
            t = ref[2] if ref else None
            rows.append(base | {"gpus": 1, "fits": ref is not None,
                                "time_us": t and t["median"], "p10_us": t and t["p10"], "p90_us": t and t["p90"],
                                "local_us": t and t["median"], "comm_merge_us": 0.0 if t else None,
                                "host_us": t and t["host"]})
        s.sync(dist.group.WORLD)
        for world in (w for w in s.worlds if w > 1):
            if s.rank < world:
                o, lse, checks, total, local = context_parallel(s, length, q, world, s.groups[world])
                if s.rank == 0:
                    row = base | {"gpus": world, "fits": True, "time_us": total["median"], "p10_us": total["p10"],
                                  "p90_us": total["p90"], "local_us": local["median"],
                                  "comm_merge_us": total["median"] - local["median"], "host_us": total["host"]}
                    row |= compare(o, lse, ref, s.dtype) | checks
                    ok &= row["equal"] is not False and all(checks.values())
                    rows.append(row)
            s.sync(dist.group.WORLD)
            if s.device.type == "cuda":
                torch.cuda.empty_cache()
    if s.rank == 0:
        write(args, s, rows)
        print(("PASS" if ok else "FAIL") + f": results in {args.out}", flush=True)
    dist.destroy_process_group()
    return 0 if ok else 1


COLUMNS = ["tokens", "gpus", "batch", "heads", "kv_heads", "head_dim", "dtype", "device", "backend", "kv_gib",
           "fits", "time_us", "p10_us", "p90_us", "local_us", "comm_merge_us", "host_us", "speedup", "efficiency",
           "max_abs_diff", "rel_diff", "lse_max_diff", "equal", "deterministic", "same_on_ranks",
           "gather_equals_all_gather"]


def write(args, s: Setup, rows: list[dict]) -> None:
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    single = {r["tokens"]: r["time_us"] for r in rows if r["gpus"] == 1 and r["time_us"]}
    for r in rows:
        if r["tokens"] in single and r["time_us"]:
            r["speedup"] = single[r["tokens"]] / r["time_us"]
            r["efficiency"] = r["speedup"] / r["gpus"]
    with open(out / "context_parallel.csv", "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS, restval="")
        w.writeheader()
        w.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)

    def num(x, fmt):
        return "" if x in (None, "") else format(x, fmt)

    unit = "us (CUDA events)" if s.device.type == "cuda" else "us (wall clock)"
    lines = [f"# Context-parallel decode attention: {s.name} x{s.world}, {args.backend}", "",
             f"B={args.batch}, Hq={args.heads}, Hkv={args.kv_heads}, D={args.head_dim}, {args.dtype}; "
             f"median of {args.reps} calls, {unit}; a group's time is its slowest rank's. torch {torch.__version__}"
             + (f", NCCL {torch.cuda.nccl.version()}" if s.device.type == "cuda" else "")
             + ", " + ", ".join(f"{k}={os.environ.get(k)}" for k in
                                ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS")),
             "", "| tokens | GPUs | KV GiB | time | p10-p90 | local attention | all-gather + merge | host/call "
             "| speedup | efficiency | max abs diff / max abs o | max lse diff | equal |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|"]
    for r in rows:
        if not r["fits"]:
            lines.append(f"| {r['tokens']} | {r['gpus']} | {r['kv_gib']} | does not fit |||||||||")
            continue
        lines.append(
            f"| {r['tokens']} | {r['gpus']} | {r['kv_gib']} | {num(r['time_us'], '.1f')} | "
            f"{num(r['p10_us'], '.1f')}-{num(r['p90_us'], '.1f')} | {num(r['local_us'], '.1f')} | "
            f"{num(r['comm_merge_us'], '.1f')} | {num(r['host_us'], '.1f')} | {num(r.get('speedup'), '.2f')} | "
            f"{num(r.get('efficiency'), '.2f')} | {num(r.get('rel_diff'), '.1e')} | "
            f"{num(r.get('lse_max_diff'), '.1e')} | "
            + ("reference" if r["gpus"] == 1 else
               {True: "yes", False: "**NO**", "": "n/a"}[r.get("equal", "")]
               + ("" if all(r.get(k, True) for k in ("deterministic", "same_on_ranks", "gather_equals_all_gather"))
                  else " (**not bitwise reproducible**)"))
            + " |")
    (out / "context_parallel.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    sys.exit(main())
