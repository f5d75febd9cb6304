"""The benchmark's shapes and the bytes each must move (pure: no GPU, no TVM).

A shape is one decode step: a query token per sequence against ``lens[b]`` cached K/V rows.
``full_grid`` is the whole suite, ``quick_grid`` the few shapes that tell the story in a minute.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence

import numpy as np

K, M = 1024, 1024 * 1024
HEADS = ((32, 8), (64, 8), (32, 32), (8, 1))  # every context length and batch of the full grid
ODD_HEADS = ((28, 4), (40, 8))  # GQA groups 7 and 5 (Qwen2-7B's 28/4, 40/8) on a subset
KV_CAP_BYTES = 40e9
PAGE_SIZE = 16  # the paged peers' page size
ELEM_SIZE = {"float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1}
SHORT_DTYPE = {"float16": "fp16", "bfloat16": "bf16", "float8_e4m3fn": "e4m3", "float8_e5m2": "e5m2"}
FP8_SCALES = (0.5, 2.0)  # the fp8 rows' k_scale, v_scale (powers of two: the dequantised values are exact in 16 bits)


@dataclasses.dataclass(frozen=True)
class Shape:
    """One decode step: ``q_len`` query tokens per sequence against ``lens[b]`` cached K/V rows, in
    a dense cache or (``page_size`` > 0) in pages of a pool read through a block table."""

    name: str
    lens: tuple[int, ...]
    hq: int
    hkv: int
    head_dim: int
    dtype: str = "float16"
    ragged: bool = False
    page_size: int = 0  # 0: a dense cache
    q_len: int = 1
    kv_dtype: str | None = None  # an fp8 cache (K/V stored in it, scaled by FP8_SCALES); None: ``dtype``

    @property
    def batch(self) -> int:
        return len(self.lens)

    @property
    def max_len(self) -> int:
        return max(self.lens)

    @property
    def total_len(self) -> int:
        return sum(self.lens)

    @property
    def kv_bytes(self) -> int:
        return kv_bytes(self.lens, self.hkv, self.head_dim, ELEM_SIZE[self.kv_dtype or self.dtype])

    @property
    def move_bytes(self) -> int:
        return move_bytes(self.lens, self.hq, self.hkv, self.head_dim, ELEM_SIZE[self.dtype], self.q_len,
                          ELEM_SIZE[self.kv_dtype or self.dtype])

    @property
    def serving(self) -> bool:
        """Paged, several tokens or an fp8 cache: the paged form's row (its own systems)."""
        return self.page_size > 0 or self.q_len > 1 or self.kv_dtype is not None

    @property
    def alloc_len(self) -> int:
        """Rows per sequence in the contiguous cache: the longest length rounded up to a page, so
        that every sequence's last (partial) page can be copied whole into the paged cache."""
        page = max(PAGE_SIZE, self.page_size)
        return -(-self.max_len // page) * page


def kv_bytes(lens: Iterable[int], hkv: int, head_dim: int, elem_size: int) -> int:
    """K and V rows that decode must read: each sequence's own length, never the padding."""
    return 2 * sum(lens) * hkv * head_dim * elem_size


def move_bytes(lens: Sequence[int], hq: int, hkv: int, head_dim: int, elem_size: int, q_len: int = 1,
               kv_elem_size: int | None = None) -> int:
    """Bytes that must move: the K+V read (``kv_elem_size`` bytes an element: 1 for an fp8 cache),
    the query read and the output write."""
    return (kv_bytes(lens, hkv, head_dim, kv_elem_size or elem_size)
            + 2 * len(lens) * q_len * hq * head_dim * elem_size)


def fmt_len(n: int) -> str:
    return f"{n // K}k" if n >= K and n % K == 0 else str(n)


def uniform(batch: int, length: int, hq: int, hkv: int, d: int = 128, dtype: str = "float16") -> Shape:
    name = f"B{batch} {hq}/{hkv} D{d} {SHORT_DTYPE[dtype]} L{fmt_len(length)}"
    return Shape(name, (length,) * batch, hq, hkv, d, dtype)


def ragged(desc: str, lens: Sequence[int], hq: int = 32, hkv: int = 8, d: int = 128, dtype: str = "float16") -> Shape:
    name = f"ragged {desc} {hq}/{hkv} D{d} {SHORT_DTYPE[dtype]}"
    return Shape(name, tuple(int(x) for x in lens), hq, hkv, d, dtype, ragged=True)


def ragged_shapes(seed: int = 0, long_lens: Sequence[int] = (128 * K, 256 * K)) -> list[Shape]:
    """Mixed batches, where splitting by work (stream-K) and splitting by tile part ways."""
    def rng(tag: int):  # one stream per shape: a shape's lengths do not depend on the others
        return np.random.default_rng((seed, tag))

    out = [ragged(f"1x{fmt_len(n)}+15x1k-4k", [n, *rng(n).integers(K, 4 * K + 1, 15)]) for n in long_lens]
    out.append(ragged("4x32k+28x1k", [32 * K] * 4 + [K] * 28))
    out.append(ragged("48x1-16k", rng(48).integers(1, 16 * K + 1, 48)))
    out.append(ragged("2x64k+30x512", [64 * K] * 2 + [512] * 30, hq=64, hkv=8))
    return out


def full_grid(cap_bytes: float = KV_CAP_BYTES, seed: int = 0) -> list[Shape]:
    """fp16 D128 over every head layout (B=1 at 1k..512k, B=8..64 at 2k..16k, many short
    sequences at B64/B128 L1k); the odd GQA groups on a subset; fp16 D64/D256 and bf16 D128 on a
    subset (32/8 and 64/8, five shapes each); the ragged batches. Rows whose K+V bytes exceed
    ``cap_bytes`` are left out (they, plus the peers' copies, must fit)."""
    shapes = []
    for hq, hkv in HEADS:
        shapes += [uniform(1, 1 << p, hq, hkv) for p in range(10, 20)]
        shapes += [uniform(b, n, hq, hkv) for b in (8, 16, 32, 64) for n in (2 * K, 4 * K, 8 * K, 16 * K)]
        shapes += [uniform(b, K, hq, hkv) for b in (64, 128)]
    for hq, hkv in ODD_HEADS:
        shapes += [uniform(1, n, hq, hkv) for n in (4 * K, 16 * K, 64 * K)]
        shapes += [uniform(4, 12 * K, hq, hkv), uniform(32, 4 * K, hq, hkv)]
    for dtype, d in (("float16", 64), ("float16", 256), ("bfloat16", 128)):
        for hq, hkv in HEADS[:2]:
            shapes += [uniform(1, n, hq, hkv, d, dtype) for n in (4 * K, 32 * K, 256 * K)]
            shapes += [uniform(8, 4 * K, hq, hkv, d, dtype), uniform(32, 16 * K, hq, hkv, d, dtype)]
    shapes += ragged_shapes(seed)
    return [s for s in shapes if s.kv_bytes <= cap_bytes]


def quick_grid(cap_bytes: float = KV_CAP_BYTES, seed: int = 0) -> list[Shape]:
    """The shapes that show the story in a couple of minutes: the fixed cost at B=1, long
    contexts, many short sequences, one KV head, an odd group, bf16, and two ragged batches (the
    full grid has the other head dims)."""
    shapes = [uniform(1, n, 32, 8) for n in (4 * K, 16 * K, 64 * K, 256 * K)]
    shapes += [uniform(8, 4 * K, 32, 8), uniform(32, 2 * K, 32, 8), uniform(128, K, 32, 8)]
    shapes += [uniform(1, 32 * K, 8, 1), uniform(4, 12 * K, 28, 4)]
    shapes += [uniform(1, 16 * K, 32, 8, 128, "bfloat16")]
    shapes += [s for s in ragged_shapes(seed, long_lens=(128 * K,)) if s.name.split()[1] in ("1x128k+15x1k-4k",
                                                                                           "2x64k+30x512")]
    return [s for s in shapes if s.kv_bytes <= cap_bytes]


def served(shape: Shape, page_size: int = 0, q_len: int = 1) -> Shape:
    """``shape`` in a paged cache and/or with several query tokens (its name says which)."""
    name = shape.name + (f" p{page_size}" if page_size else "") + (f" Sq{q_len}" if q_len > 1 else "")
    return dataclasses.replace(shape, name=name, page_size=page_size, q_len=q_len)


def serving_grid(cap_bytes: float = KV_CAP_BYTES, seed: int = 0) -> list[Shape]:
    """What serving engines run: paged caches (pages of 1, 16 and 64 rows; fp16, 32/8 x 128 and the
    ragged batches) and Sq = 2, 4, 8 new tokens per sequence (speculative decoding) over pages of 16."""
    base = [uniform(1, n, 32, 8) for n in (4 * K, 64 * K)]
    base += [uniform(8, 4 * K, 32, 8), uniform(32, 2 * K, 32, 8), uniform(128, K, 32, 8)]
    base += [s for s in ragged_shapes(seed, long_lens=(128 * K,)) if s.name.split()[1] in ("1x128k+15x1k-4k",
                                                                                        "2x64k+30x512")]
    shapes = [served(s, page) for page in (16, 1, 64) for s in base]
    tokens = [uniform(1, 16 * K, 32, 8), uniform(1, 64 * K, 32, 8), uniform(8, 8 * K, 32, 8), uniform(32, 4 * K, 32, 8)]
    shapes += [served(s, 16, q) for q in (2, 4, 8) for s in tokens]
    return [s for s in shapes if s.kv_bytes <= cap_bytes]


def quantized(shape: Shape, kv_dtype: str = "float8_e4m3fn") -> Shape:
    """``shape`` over an fp8 cache (its name says which)."""
    return dataclasses.replace(shape, name=f"{shape.name} kv-{SHORT_DTYPE[kv_dtype]}", kv_dtype=kv_dtype)


def fp8_grid(cap_bytes: float = KV_CAP_BYTES, seed: int = 0) -> list[Shape]:
    """The quick grid's shapes over an e4m3 cache, dense, and a subset in pages of 16 (the peers'
    fp8 decode reads pages)."""
    base = quick_grid(cap_bytes, seed)
    paged = ("B1 32/8 D128 fp16 L64k", "B8 32/8 D128 fp16 L4k", "B32 32/8 D128 fp16 L2k",
             "ragged 1x128k+15x1k-4k 32/8 D128 fp16")
    shapes = [quantized(s) for s in base] + [served(quantized(s), 16) for s in base if s.name in paged]
    return [s for s in shapes if s.kv_bytes <= cap_bytes]


def select_shapes(shapes: list[Shape], pattern: str | None) -> list[Shape]:
    return [s for s in shapes if not pattern or re.search(pattern, s.name)]
