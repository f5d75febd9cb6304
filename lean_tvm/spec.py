"""What a compiled kernel is specialised for and the schedule's knobs: shared by the build half
(TVM) and the run half (tvm-ffi only), so it imports neither."""

from __future__ import annotations

import dataclasses

DTYPES = ("float16", "bfloat16")
LAYOUTS = ("bhld", "blhd")  # a KV cache as [B, Hkv, L, D] (SDPA, TVM) or [B, L, Hkv, D] (flash-attn, vLLM)
HEAD_DIMS = (64, 128, 256)
MAX_GROUPS = (8, 16)
# fp8 KV caches (the stored value times its scale is the real K/V); q and the output stay 16-bit.
KV_DTYPES = ("float8_e4m3fn", "float8_e5m2")
KV_TAGS = {"float8_e4m3fn": "e4m3", "float8_e5m2": "e5m2"}
GEMV_ROWS = 16  # output rows per tile of the split-K GEMV
# The device function a kernel calls before its first memory access when it may be launched
# programmatically (streamk.AFTER_PREVIOUS_GRID; build.programmatic_launch finds it by this name).
PROGRAMMATIC_MARK = "lean_after_previous_grid"
# Phases the debug build stamps with %globaltimer (thread 0 of each CTA; later pieces overwrite).
TRACE_EVENTS = ("start", "planned", "tile_begun", "prefetch_issued", "first_step_done", "piece_end",
                "combined", "flags_acquired", "merged", "published", "done")


@dataclasses.dataclass(frozen=True)
class StreamKConfig:
    """Compile-time shape of the persistent walk (the tuned knobs live in ``schedules/``)."""

    block_size: int  # reduction rows (KV rows) per block: the plan's unit of work
    num_threads: int = 128  # per CTA (GPU)
    stages: int = 4  # cp.async pipeline depth, per warp (GPU)
    max_batch: int = 1024  # sequences the device plan holds in shared memory (GPU)
    tile_cost: int = 0  # stream-K: a tile's fixed work, in 1/plan.BLOCK_COST blocks (plan.stream_k_edges)

    @property
    def num_warps(self) -> int:
        return self.num_threads // 32


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """What a compiled kernel is specialised for; batch, heads and lengths stay symbolic."""

    dtype: str
    head_dim: int
    max_group: int = 8  # serves every G = Hq / Hkv up to this (8: one mma N tile, 16: two)
    kv_dtype: str | None = None  # None: K/V in ``dtype``; one of KV_DTYPES: an fp8 cache with scales

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {DTYPES}, got {self.dtype!r}")
        if self.head_dim not in HEAD_DIMS:
            raise ValueError(f"head_dim: expected one of {HEAD_DIMS}, got {self.head_dim}")
        if self.max_group not in MAX_GROUPS:
            raise ValueError(f"max_group: expected one of {MAX_GROUPS}, got {self.max_group}")
        if self.kv_dtype is not None and self.kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype: expected None or one of {KV_DTYPES}, got {self.kv_dtype!r}")

    @property
    def name(self) -> str:
        kv = f"_kv_{KV_TAGS[self.kv_dtype]}" if self.kv_dtype else ""
        return f"lean_attention_{self.dtype}_d{self.head_dim}_g{self.max_group}{kv}"

    @property
    def kv_bytes(self) -> int:
        """Bytes per stored K/V element."""
        return 1 if self.kv_dtype else 2

    @property
    def mma_dtype(self) -> str:
        """The tensor-core operand type: fp8 K/V widen to fp16 (exactly), whatever q's dtype."""
        return "float16" if self.kv_dtype else self.dtype


@dataclasses.dataclass(frozen=True)
class GpuKnobs:
    """The schedule's tunables (``schedules/<arch>.json`` holds the chosen ones)."""

    rows_per_warp: int = 16  # KV rows a warp folds per step (a multiple of 16)
    num_warps: int = 4
    stages: int = 4  # cp.async pipeline depth per warp
    ctas_per_sm: int = 1
    max_batch: int = 1024
    tile_cost: int = 0  # stream-K: what starting and finishing a tile costs, in quarter blocks

    @property
    def block_size(self) -> int:
        return self.rows_per_warp * self.num_warps

    @property
    def tag(self) -> str:
        tag = f"rw{self.rows_per_warp}_w{self.num_warps}_s{self.stages}_c{self.ctas_per_sm}"
        return tag + (f"_t{self.tile_cost}" if self.tile_cost else "")

    def streamk_config(self) -> StreamKConfig:
        return StreamKConfig(block_size=self.block_size, num_threads=32 * self.num_warps,
                             stages=self.stages, max_batch=self.max_batch, tile_cost=self.tile_cost)

    def ring_bytes(self, spec: AttentionSpec) -> int:
        """Dynamic shared memory: the K and V stages of every warp, then the warps' fp32 states."""
        ring = self.num_warps * self.stages * 2 * self.rows_per_warp * spec.head_dim * spec.kv_bytes
        return ring + self.num_warps * spec.max_group * spec.head_dim * 4

    def static_smem_bytes(self, spec: AttentionSpec) -> int:
        per_head = 2 * self.num_warps * spec.max_group  # the warps' m and l
        return (per_head + 2 * self.max_batch + 1 + self.num_warps + 32 * self.num_warps) * 4

    def smem_bytes(self, spec: AttentionSpec) -> int:
        return self.ring_bytes(spec) + self.static_smem_bytes(spec)


