"""fp8 K/V in TIR: widening fp8 pairs to fp16 pairs in CUDA (for the tensor cores) and decoding one
fp8 byte to float32 on the CPU.

The CUDA kernel keeps fp8 bytes in shared memory and reads them with the 16-bit ldmatrix, so a lane
holds four bytes of one row (K) or two bytes of each of two rows (V, transposed); the helpers below
turn such a word into the fp16x2 mma operands (``cvt.rn.f16x2.e4m3x2`` / ``e5m2x2``, sm_89+):

  ``lo``/``hi``    bytes (0, 1) / (2, 3): consecutive elements of one row (K's head dim)
  ``even``/``odd`` bytes (0, 2) / (1, 3): one column of two rows (V^T's two KV rows)

Every fp8 value is exact in fp16, so the widening loses nothing; bf16 queries are rounded to fp16
once per tile (exact for |q| in [2^-14, 65504]).
"""

from __future__ import annotations

from tvm.script import tirx as T

_CVT = {"float8_e4m3fn": "e4m3x2", "float8_e5m2": "e5m2x2"}
_TAG = {"float8_e4m3fn": "e4m3", "float8_e5m2": "e5m2"}
# Which 16 bits of the (permuted) word are converted: (prmt selector or None, shift).
_PAIRS = {"lo": (None, 0), "hi": (None, 16), "even": (0x3120, 0), "odd": (0x3120, 16)}


def _pair_source(name: str, kv_dtype: str, which: str) -> str:
    select, shift = _PAIRS[which]
    permute = (f'  asm("prmt.b32 %0, %1, 0, {select:#x};" : "=r"(w) : "r"(w));\n' if select is not None else "")
    return (f"__device__ __forceinline__ unsigned {name}(unsigned w) {{\n{permute}"
            f"  unsigned r; unsigned short s = (unsigned short)(w >> {shift});\n"
            f'  asm("cvt.rn.f16x2.{_CVT[kv_dtype]} %0, %1;" : "=r"(r) : "h"(s));\n  return r;\n}}\n')


def widen_pair(kv_dtype: str, which: str, word):
    """The fp16x2 word of two fp8 elements of the 32-bit ``word`` (see the module docstring)."""
    name = f"lean_{_TAG[kv_dtype]}_{which}"
    return T.cuda.func_call(name, word, source_code=_pair_source(name, kv_dtype, which), return_type="uint32")


_BF16_TO_F16 = """__device__ __forceinline__ unsigned lean_bf16x2_to_f16x2(unsigned w) {
  unsigned r; float lo = __uint_as_float(w << 16), hi = __uint_as_float(w & 0xFFFF0000u);
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}
"""


def bf16_pair_to_f16(word):
    """Two bf16 values of a 32-bit word as fp16x2 (round to nearest)."""
    return T.cuda.func_call("lean_bf16x2_to_f16x2", word, source_code=_BF16_TO_F16, return_type="uint32")


def decode(kv_dtype: str, byte):
    """float32 of one fp8 byte (a uint8 TIR expression), bit-exact: e5m2 is the top byte of an fp16;
    e4m3fn has no infinities, 0x7F/0xFF is NaN and exponent 0 holds subnormals (m x 2^-9)."""
    b = T.Cast("uint32", byte)
    if kv_dtype == "float8_e5m2":
        return T.Cast("float32", T.reinterpret("float16", T.Cast("uint16", T.shift_left(b, T.uint32(8)))))
    sign = T.shift_right(b, T.uint32(7))
    exp = T.bitwise_and(T.shift_right(b, T.uint32(3)), T.uint32(15))
    man = T.bitwise_and(b, T.uint32(7))
    normal = T.reinterpret("float32", T.bitwise_or(T.bitwise_or(T.shift_left(sign, T.uint32(31)),
                                                                T.shift_left(exp + T.uint32(120), T.uint32(23))),
                                                   T.shift_left(man, T.uint32(20))))
    subnormal = T.Cast("float32", man) * T.float32(2.0 ** -9) * (T.float32(1) - T.float32(2) * T.Cast("float32", sign))
    nan = T.reinterpret("float32", T.uint32(0x7FC00000))
    return T.Select(T.bitwise_and(b, T.uint32(0x7F)) == T.uint32(0x7F), nan,
                    T.Select(exp == T.uint32(0), subnormal, normal))
