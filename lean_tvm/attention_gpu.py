"""Decode attention on the stream-K primitive, CUDA form: per-warp tensor-core steps, a CTA-wide
state only at piece ends.

One output tile is (sequence b, KV head h) with the G = Hq / Hkv query heads of its group; the
running state per query head is the online softmax (m, l, acc) in the log2 domain
(``softmax.py``). A warp's step over 16 KV rows:

  S^T[kv, head] = K[kv, :] . Q^T        mma.m16n8k16, A = K from shared memory (ldmatrix),
                                        B = Q^T held in registers for the whole tile
  P^T fragment from S^T's accumulator   movmatrix.trans: the C layout of S^T becomes the B
                                        layout of P^T without a trip through shared memory
  O^T[d, head] += V^T[d, kv] . P^T      mma.m16n8k16, A = V^T by ldmatrix.trans

With the heads on the mma's N side (8 wide) the G heads of a GQA group fill it for G <= 8 with
no padding to 16 rows, and the accumulator is D/16 * 4 registers per lane. K and V reach
shared memory by cp.async (16-byte chunks, XOR-swizzled so ldmatrix is conflict-free), each
warp running its own pipeline over its 16-row slice of every block: no CTA barrier per block.
"""

from __future__ import annotations

from types import SimpleNamespace

import tvm
from tvm.script import tirx as T

from . import kv_fp8, streamk
from . import signature as sig
from .softmax import FLT_MAX, LOG2E, LSE_NATURAL, NEG_INF, LseConvention
from .spec import TRACE_EVENTS, AttentionSpec, GpuKnobs
from .tiles import paged_buffers, started_lens

MMA = {
    "float16": "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32",
    "bfloat16": "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32",
}
# Slots of the loader's int64 address registers ``gaddr`` (and of the per-lane offsets ``goff``).
K_ROW, V_ROW, K_TILE, V_TILE = range(4)


def gpu_operator(spec: AttentionSpec, knobs: GpuKnobs, paged: bool = False) -> tuple[streamk.GpuOperator, dict]:
    """The macros (see ``streamk.GpuOperator``) and the fragment sizes the kernel allocates.
    ``paged``: the paged form's tiles, query rows, causal limits and K/V addressing
    (``attention_cpu.TileLayout``; :func:`make_gpu_paged_kernel`)."""
    GM, D, dt = spec.max_group, spec.head_dim, spec.dtype
    RW, NWARP, S, NT = knobs.rows_per_warp, knobs.num_warps, knobs.stages, 32 * knobs.num_warps
    FP8 = spec.kv_dtype is not None  # fp8 K/V: bytes in the ring, widened to fp16 in registers
    KS = D // 16  # k-steps of Q.K^T; d-tiles of the output
    NM = RW // 16  # 16-row kv tiles per warp step
    NN = GM // 8  # 8-wide head tiles
    EPC = 16 // spec.kv_bytes  # K/V elements per 16-byte chunk
    CH = D // EPC  # 16-byte chunks per row
    CPL = RW * CH // 32  # chunks per lane per matrix
    RPU = 32 // CH  # rows one warp-wide cp.async covers
    E = (GM * D + 4 * NT - 1) // (4 * NT)  # CTA-state quads (4 consecutive d of a head) per thread
    CU = 8  # partials merged per unrolled step: their loads are in flight together
    RW_LOG2 = RW.bit_length() - 1
    NO_ROWS = 1 << 30  # a causal offset that hides every row
    mma = MMA[spec.mma_dtype]
    full = T.uint32(0xFFFFFFFF)
    ninf = T.float32(NEG_INF)

    def swizzle(c, r):
        """Where chunk c of row r sits in its row: XOR-swizzled so that the 8 rows one ldmatrix
        reads hit distinct banks (fp8 rows of 4 chunks, D = 64, pair up in a 128-byte line)."""
        if CH >= 8:
            return T.bitwise_xor(c, T.bitwise_and(r, 7))
        return T.bitwise_xor(c, T.bitwise_and(T.shift_right(r, 1), 3))

    def ring(warp, stage, kv, r, c):
        """Element offset of 16-byte chunk c of row r in the ring."""
        return ((((warp * S + stage) * 2 + kv) * RW + r) * D) + swizzle(c, r) * EPC

    def q_col(t, j):
        """Head-dim offset (in a 16-wide k-step) of the lane's Q^T word j. The fp8 K fragment holds
        four consecutive d of a row (a 16-bit ldmatrix of bytes), so its k order, which Q^T must
        share, is d = 4t + {0, 1} (k = 2t + {0, 1}) and 4t + {2, 3} (k = 2t + 8 + {0, 1})."""
        return t * 4 + 2 * j if FP8 else t * 2 + 8 * j

    def q_word(word):
        """A Q^T word as the mma operand: bf16 queries meet fp8 K/V in fp16."""
        return kv_fp8.bf16_pair_to_f16(word) if FP8 and dt == "bfloat16" else word

    def acc_d(kk, g, i):
        """Head-dim index of accumulator element i of d-tile kk for the lane's row g. The fp8 V^T
        fragment (a transposing 16-bit ldmatrix of bytes) gives a lane the even and the odd d of a
        byte pair: d-tiles 2c and 2c + 1 hold d = 32c + 2g (+ 16) and that + 1."""
        if FP8:
            return T.truncdiv(kk, 2) * 32 + 2 * g + T.truncmod(kk, 2) + 16 * T.truncdiv(i, 2)
        return kk * 16 + g + 8 * T.truncdiv(i, 2)

    @T.macro
    def begin_tile(bufs, b, h):
        """Reset the warp's state; Q^T fragments (b0 = Q[g, 16kk + 2t + {0,1}], b1 = the same
        + 8) read as 32-bit words: q's strides are even (the caller ensures it)."""
        g, t = T.meta_var(T.truncdiv(bufs.lane, 4)), T.meta_var(T.truncmod(bufs.lane, 4))
        for nn in T.unroll(NN):
            for j in T.unroll(2):
                bufs.mrow[nn * 2 + j] = ninf
                bufs.lrow[nn * 2 + j] = T.float32(0)
            # Heads past G (padding of the 8-wide tile) read head G - 1 and are masked to zero: a
            # load under a branch would make the warp wait for it before the K/V prefetch.
            head = T.meta_var(h * bufs.G + T.min(nn * 8 + g, bufs.G - 1))
            row = T.meta_var(T.Cast("int64", b) * bufs.sqb + T.Cast("int64", head) * bufs.sqh)
            keep = T.meta_var(T.Select(nn * 8 + g < bufs.G, T.uint32(0xFFFFFFFF), T.uint32(0)))
            for kk in T.unroll(KS):
                for j in T.unroll(2):
                    col = T.meta_var(kk * 16 + q_col(t, j) if FP8 else kk * 16 + t * 2 + 8 * j)
                    bufs.qw[(nn * KS + kk) * 2 + j] = T.bitwise_and(
                        q_word(bufs.QW[T.truncdiv(row + T.Cast("int64", col), 2)]), keep)
                for e in T.unroll(4):
                    bufs.acc[(nn * KS + kk) * 4 + e] = T.float32(0)
        if FP8:  # K's scale folds into the tile's softmax scale (a dense tile is one KV head)
            bufs.slog2[0] = bufs.scale_base * bufs.KSC[h]

    @T.macro
    def setup(bufs):
        """Per-lane loader constants, hoisted out of the walk: where each of the lane's 16-byte
        chunks sits in a stage (XOR-swizzled) and in a block of rows (global)."""
        lane = T.meta_var(bufs.lane)
        for u in T.unroll(CPL):
            r = T.meta_var(u * RPU + T.truncdiv(lane, CH))
            bufs.soff[u] = r * D + swizzle(T.truncmod(lane, CH), r) * EPC
        col = T.meta_var(T.Cast("int64", T.truncmod(lane, CH) * EPC))  # the chunk's first element in its row
        bufs.goff[K_ROW] = T.Cast("int64", T.truncdiv(lane, CH)) * bufs.skl + col
        bufs.goff[V_ROW] = T.Cast("int64", T.truncdiv(lane, CH)) * bufs.svl + col

    @T.macro
    def load(bufs, stage, b, h, row0, n):
        """cp.async this warp's RW rows of the block; rows past the length are zero-filled
        (src-size 0, from an address the cache's addressing says is always valid)."""
        rbase = T.meta_var(row0 + bufs.warp * RW)
        # Rows from the lane's first, in a register: n may live in shared memory, and every
        # cp.async (an asm with a memory clobber) would make nvcc load it again, one shared-memory
        # round trip before each copy (SASS: 16 per step).
        bufs.left[0] = n - rbase - T.truncdiv(bufs.lane, CH)
        bufs.rows(bufs, b, h, rbase)
        sbase = T.meta_var((bufs.warp * S + stage) * 2 * RW * D)
        for u in T.unroll(CPL):
            ok = T.meta_var(u * RPU < bufs.left[0])
            pick = T.meta_var(T.Cast("int64", ok))  # the address by arithmetic, not a branch per chunk
            k_src = T.meta_var(bufs.gaddr[K_ROW] + T.Cast("int64", u * RPU) * bufs.skl)
            v_src = T.meta_var(bufs.gaddr[V_ROW] + T.Cast("int64", u * RPU) * bufs.svl)
            T.ptx["cp.async.cg.shared.global"](
                T.address_of(bufs.RING[sbase + bufs.soff[u]]),
                T.address_of(bufs.KF[bufs.gaddr[K_TILE] + pick * (k_src - bufs.gaddr[K_TILE])]),
                16, T.Select(ok, T.uint32(16), T.uint32(0)))
            T.ptx["cp.async.cg.shared.global"](
                T.address_of(bufs.RING[sbase + RW * D + bufs.soff[u]]),
                T.address_of(bufs.VF[bufs.gaddr[V_TILE] + pick * (v_src - bufs.gaddr[V_TILE])]),
                16, T.Select(ok, T.uint32(16), T.uint32(0)))

    @T.macro
    def mma_into(c, x, a, b0, b1):
        """c[x:x + 4] += A B: one m16n8k16 tensor-core step, A in the 4 registers of ``a``."""
        T.ptx[mma](c[x], c[x + 1], c[x + 2], c[x + 3], a[0], a[1], a[2], a[3], b0, b1, c[x], c[x + 1], c[x + 2],
                   c[x + 3])

    @T.macro
    def qk_fp8(bufs, stage, mt):
        """S^T of kv tile mt from fp8 K: one ldmatrix.x4 of bytes covers 32 d (two k-steps): words
        r0, r1 = rows g, g + 8 at d 4t..4t+3, r2, r3 the same 16 d on; lo/hi widen their pairs."""
        lane, warp = T.meta_var(bufs.lane), T.meta_var(bufs.warp)
        for c in T.unroll(KS // 2):
            T.ptx.ldmatrix.sync.aligned.m8n8.x4.shared.b16(
                bufs.fr[0], bufs.fr[1], bufs.fr[2], bufs.fr[3],
                T.address_of(bufs.RING[ring(warp, stage, 0, mt * 16 + T.truncmod(lane, 16),
                                            c * 2 + T.truncdiv(lane, 16))]))
            for p in T.unroll(2):
                bufs.af[0] = kv_fp8.widen_pair(spec.kv_dtype, "lo", bufs.fr[2 * p])
                bufs.af[1] = kv_fp8.widen_pair(spec.kv_dtype, "lo", bufs.fr[2 * p + 1])
                bufs.af[2] = kv_fp8.widen_pair(spec.kv_dtype, "hi", bufs.fr[2 * p])
                bufs.af[3] = kv_fp8.widen_pair(spec.kv_dtype, "hi", bufs.fr[2 * p + 1])
                for nn in T.unroll(NN):
                    x = T.meta_var((mt * NN + nn) * 4)
                    kk = T.meta_var(c * 2 + p)
                    mma_into(bufs.sc, x, bufs.af, bufs.qw[(nn * KS + kk) * 2], bufs.qw[(nn * KS + kk) * 2 + 1])

    @T.macro
    def pv_half(bufs, mt, c, p, which):
        """The mma of d-tile 2c + p: A = the ``which`` ("even"/"odd") byte of each pair."""
        for q in T.unroll(4):
            bufs.af[q] = kv_fp8.widen_pair(spec.kv_dtype, which, bufs.fr[q])
        for nn in T.unroll(NN):
            x = T.meta_var((nn * KS + c * 2 + p) * 4)
            mma_into(bufs.acc, x, bufs.af, bufs.pb[(mt * NN + nn) * 2], bufs.pb[(mt * NN + nn) * 2 + 1])

    @T.macro
    def pv_fp8(bufs, stage, mt):
        """O^T += V^T P^T from fp8 V: a transposing ldmatrix.x4 of byte pairs gives lane (g, t) rows
        2t, 2t + 1 (and + 8) at d 32c + 2g, + 1 (and + 16); the even and odd bytes are two d-tiles."""
        lane, warp = T.meta_var(bufs.lane), T.meta_var(bufs.warp)
        for c in T.unroll(KS // 2):
            T.ptx.ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16(
                bufs.fr[0], bufs.fr[1], bufs.fr[2], bufs.fr[3],
                T.address_of(bufs.RING[ring(warp, stage, 1, mt * 16 + T.truncmod(lane, 8) + 8 * T.truncdiv(lane, 16),
                                            c * 2 + T.truncmod(T.truncdiv(lane, 8), 2))]))
            pv_half(bufs, mt, c, 0, "even")
            pv_half(bufs, mt, c, 1, "odd")

    @T.macro
    def compute(bufs, stage, b, h, row0, n):
        lane, warp = T.meta_var(bufs.lane), T.meta_var(bufs.warp)
        g = T.meta_var(T.truncdiv(lane, 4))
        # S^T = K Q^T: A = K rows (ldmatrix), B = Q^T fragments in registers.
        for mt in T.unroll(NM):
            for nn in T.unroll(NN):
                for i in T.unroll(4):
                    bufs.sc[(mt * NN + nn) * 4 + i] = T.float32(0)
            if FP8:
                qk_fp8(bufs, stage, mt)
            else:
                for kk in T.unroll(KS):
                    T.ptx.ldmatrix.sync.aligned.m8n8.x4.shared.b16(
                        bufs.af[0], bufs.af[1], bufs.af[2], bufs.af[3],
                        T.address_of(bufs.RING[ring(warp, stage, 0, mt * 16 + T.truncmod(lane, 16),
                                                    kk * 2 + T.truncdiv(lane, 16))]))
                    for nn in T.unroll(NN):
                        x = T.meta_var((mt * NN + nn) * 4)
                        mma_into(bufs.sc, x, bufs.af, bufs.qw[(nn * KS + kk) * 2], bufs.qw[(nn * KS + kk) * 2 + 1])
        # Mask rows past the length (by min, not a branch: see merge_some), scale into log2. The
        # paged form's query i sees Sq - 1 - i rows fewer (qoff of the lane's columns 2t, 2t + 1).
        for mt in T.unroll(NM):
            for nn in T.unroll(NN):
                for i in T.unroll(4):
                    row = T.meta_var(row0 + warp * RW + mt * 16 + g + 8 * T.truncdiv(i, 2))
                    limit = T.meta_var(n - bufs.qoff[nn * 2 + T.truncmod(i, 2)] if paged else n)
                    bufs.sc[(mt * NN + nn) * 4 + i] = T.min(bufs.sc[(mt * NN + nn) * 4 + i] * bufs.scale_log2,
                                                            T.Select(row < limit, -ninf, ninf))
        # Online softmax per head column (this lane's heads 2t, 2t+1 of each head tile).
        for nn in T.unroll(NN):
            for j in T.unroll(2):
                bufs.m_new[0] = ninf
                for mt in T.unroll(NM):
                    for i2 in T.unroll(2):
                        bufs.m_new[0] = T.max(bufs.m_new[0], bufs.sc[(mt * NN + nn) * 4 + j + 2 * i2])
                for o in T.unroll(3):
                    bufs.shfl[0] = T.tvm_warp_shuffle_xor(full, bufs.m_new[0], 4 << o, 32, 32)
                    bufs.m_new[0] = T.max(bufs.m_new[0], bufs.shfl[0])
                bufs.m_new[0] = T.max(bufs.m_new[0], bufs.mrow[nn * 2 + j])
                bufs.m_safe[0] = T.max(bufs.m_new[0], T.float32(-FLT_MAX))  # finite: exp2(-inf - it) = 0
                bufs.alpha[0] = T.exp2(bufs.mrow[nn * 2 + j] - bufs.m_safe[0])  # rescale of the old state
                bufs.mrow[nn * 2 + j] = bufs.m_new[0]
                bufs.lrow[nn * 2 + j] = bufs.lrow[nn * 2 + j] * bufs.alpha[0]
                if bufs.alpha[0] != T.float32(1):  # lazy: past the first blocks the max rarely moves
                    for kk in T.unroll(KS):
                        for i2 in T.unroll(2):
                            x = T.meta_var((nn * KS + kk) * 4 + j + 2 * i2)
                            bufs.acc[x] = bufs.acc[x] * bufs.alpha[0]
                for mt in T.unroll(NM):
                    for i2 in T.unroll(2):
                        x = T.meta_var((mt * NN + nn) * 4 + j + 2 * i2)
                        bufs.sc[x] = T.exp2(bufs.sc[x] - bufs.m_safe[0])
                        bufs.lrow[nn * 2 + j] = bufs.lrow[nn * 2 + j] + bufs.sc[x]
        # P^T as the B operand: pack to 16 bits, transpose each 8x8 with movmatrix.
        for x in T.unroll(NM * NN * 4):
            bufs.ph[x] = T.Cast(dt, bufs.sc[x])
        for x in T.unroll(NM * NN * 2):
            T.ptx.movmatrix.sync.aligned.m8n8.trans.b16(bufs.pb[x], bufs.pw[x])
        # O^T += V^T P^T: A = V^T by ldmatrix.trans.
        for mt in T.unroll(NM):
            if FP8:
                pv_fp8(bufs, stage, mt)
            else:
                for kk in T.unroll(KS):
                    T.ptx.ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16(
                        bufs.af[0], bufs.af[1], bufs.af[2], bufs.af[3],
                        T.address_of(bufs.RING[ring(warp, stage, 1,
                                                    mt * 16 + T.truncmod(lane, 8) + 8 * T.truncdiv(lane, 16),
                                                    kk * 2 + T.truncmod(T.truncdiv(lane, 8), 2))]))
                    for nn in T.unroll(NN):
                        x = T.meta_var((nn * KS + kk) * 4)
                        mma_into(bufs.acc, x, bufs.af, bufs.pb[(mt * NN + nn) * 2], bufs.pb[(mt * NN + nn) * 2 + 1])

    @T.macro
    def combine(bufs):
        """Warp states -> shared memory -> per-thread elements (head, d) of the CTA's state."""
        lane, warp, tx = T.meta_var(bufs.lane), T.meta_var(bufs.warp), T.meta_var(bufs.tx)
        g, t = T.meta_var(T.truncdiv(lane, 4)), T.meta_var(T.truncmod(lane, 4))
        for x in T.unroll(NN * 2):
            for o in T.unroll(3):
                bufs.shfl[0] = T.tvm_warp_shuffle_xor(full, bufs.lrow[x], 4 << o, 32, 32)
                bufs.lrow[x] = bufs.lrow[x] + bufs.shfl[0]
        for nn in T.unroll(NN):
            for j in T.unroll(2):
                head = T.meta_var(nn * 8 + 2 * t + j)
                if g == 0 and head < bufs.G:
                    bufs.MW[warp * bufs.G + head] = bufs.mrow[nn * 2 + j]
                    bufs.LW[warp * bufs.G + head] = bufs.lrow[nn * 2 + j]
            for kk in T.unroll(KS):
                for i in T.unroll(4):
                    head = T.meta_var(nn * 8 + 2 * t + T.truncmod(i, 2))
                    if head < bufs.G:
                        d = T.meta_var(acc_d(kk, g, i))
                        bufs.ACCW[(warp * bufs.G + head) * D + d] = bufs.acc[(nn * KS + kk) * 4 + i]
        T.tvm_storage_sync("shared")
        # One barrier: every thread rescales the warps of its quad's head itself (NWARP exp2s),
        # rather than G threads doing it for all between two barriers.
        for e in T.unroll(E):
            x = T.meta_var((e * NT + tx) * 4)  # first element (head x // D, d x % D) of the quad
            hw = T.meta_var(T.truncdiv(x, D))
            if x < bufs.G * D:
                bufs.m_new[0] = ninf
                for w in T.unroll(NWARP):
                    bufs.m_new[0] = T.max(bufs.m_new[0], bufs.MW[w * bufs.G + hw])
                bufs.el[e] = T.float32(0)
                for j in T.unroll(4):
                    bufs.eo[e * 4 + j] = T.float32(0)
                if paged:  # a query row may see no key in this piece (causal): no exp2(-inf - -inf)
                    bufs.m_safe[0] = T.max(bufs.m_new[0], T.float32(-FLT_MAX))
                for w in T.unroll(NWARP):
                    top = T.meta_var(bufs.m_safe[0] if paged else bufs.m_new[0])
                    bufs.beta[0] = T.exp2(bufs.MW[w * bufs.G + hw] - top)  # warp w's weight
                    bufs.el[e] = bufs.el[e] + bufs.LW[w * bufs.G + hw] * bufs.beta[0]
                    for j in T.unroll(4):
                        bufs.eo[e * 4 + j] = bufs.eo[e * 4 + j] + bufs.ACCW[w * bufs.G * D + x + j] * bufs.beta[0]
                bufs.em[e] = bufs.m_new[0]

    @T.macro
    def publish(bufs, slot):
        for e in T.unroll(E):
            x = T.meta_var((e * NT + bufs.tx) * 4)
            if x < bufs.G * D:
                for j in T.vectorized(4):
                    bufs.WSO[slot, T.truncdiv(x, D), T.truncmod(x, D) + j] = bufs.eo[e * 4 + j]
                if T.truncmod(x, D) == 0:
                    bufs.WSML[slot, 0, T.truncdiv(x, D)] = bufs.em[e]
                    bufs.WSML[slot, 1, T.truncdiv(x, D)] = bufs.el[e]

    @T.macro
    def fold(bufs, e, m, l, w, w0):
        """(em, el, eo)[e] <- their merge with the state (m, l, w[w0:w0 + 4]); either may be empty
        (m = -inf: the rescale is taken against 0 so no inf - inf appears)."""
        bufs.m_new[0] = T.max(bufs.em[e], m)
        bufs.m_safe[0] = T.max(bufs.m_new[0], T.float32(-FLT_MAX))  # finite: exp2(-inf - it) = 0
        bufs.beta[0] = T.exp2(m - bufs.m_safe[0])
        bufs.alpha[0] = T.exp2(bufs.em[e] - bufs.m_safe[0])
        bufs.el[e] = bufs.el[e] * bufs.alpha[0] + l * bufs.beta[0]
        for j in T.unroll(4):
            bufs.eo[e * 4 + j] = bufs.eo[e * 4 + j] * bufs.alpha[0] + w[w0 + j] * bufs.beta[0]
        bufs.em[e] = bufs.m_new[0]

    @T.macro
    def merge_some(bufs, e, x, top, n, valid, groups, grp):
        """Fold partials i = grp, grp + groups, ... (< n) into state e, CU at a time: their loads
        issue together and unconditionally (from a clamped, always-valid slot), and invalid ones
        are masked after the load by min/max (which drop NaN), never by a Select: TVM turns a
        Select over a loaded value into a branch, and ptxas then waits for each load in turn.
        The CU partials are folded as one batch against their common maximum, not one after
        another: with a chain of pairwise folds ptxas issued each load just before its fold, so
        every partial cost an L2 round trip (SASS under ncu; a one-tile batch merged 47 partials
        in 7 us)."""
        hh = T.meta_var(T.truncdiv(x, D))
        for i0 in range(T.truncdiv(n + CU * groups - 1, CU * groups)):
            for u in T.unroll(CU):
                idx = T.meta_var((i0 * CU + u) * groups + grp)
                slot = T.meta_var(T.max(top - idx, 0))
                bufs.ok[u] = T.Cast("int32", idx < n) * valid[T.min(idx, NT - 1)]
                bufs.mc[u] = bufs.WSML[slot, 0, hh]
                bufs.lc[u] = bufs.WSML[slot, 1, hh]
                for j in T.vectorized(4):
                    bufs.w4[u * 4 + j] = bufs.WSO[slot, hh, T.truncmod(x, D) + j]
            for u in T.unroll(CU):
                # hi = +inf for a valid partial, -inf otherwise: no branch
                hi = T.meta_var(T.Cast("float32", 1 - 2 * bufs.ok[u]) * ninf)
                bufs.mc[u] = T.min(bufs.mc[u], hi)
                bufs.lc[u] = T.min(T.max(bufs.lc[u], T.float32(0)), T.max(hi, T.float32(0)))
                for j in T.unroll(4):
                    bufs.w4[u * 4 + j] = T.max(T.min(bufs.w4[u * 4 + j], T.max(hi, T.float32(0))),
                                               T.min(-hi, T.float32(0)))
            # The batch maximum needs every m: all CU loads are issued before any use.
            bufs.m_new[0] = bufs.em[e]
            for u in T.unroll(CU):
                bufs.m_new[0] = T.max(bufs.m_new[0], bufs.mc[u])
            bufs.m_safe[0] = T.max(bufs.m_new[0], T.float32(-FLT_MAX))  # finite: exp2(-inf - it) = 0
            bufs.alpha[0] = T.exp2(bufs.em[e] - bufs.m_safe[0])
            bufs.el[e] = bufs.el[e] * bufs.alpha[0]
            for j in T.unroll(4):
                bufs.eo[e * 4 + j] = bufs.eo[e * 4 + j] * bufs.alpha[0]
            for u in T.unroll(CU):
                bufs.mc[u] = T.exp2(bufs.mc[u] - bufs.m_safe[0])
                bufs.el[e] = bufs.el[e] + bufs.lc[u] * bufs.mc[u]
                for j in T.unroll(4):
                    bufs.eo[e * 4 + j] = bufs.eo[e * 4 + j] + bufs.w4[u * 4 + j] * bufs.mc[u]
            bufs.em[e] = bufs.m_new[0]

    @T.macro
    def merge_partials(bufs, top, n, valid):
        """Fold the partials of slots top - i (valid[i] != 0, i < n) into the CTA's state. When the
        tile's G * D / 4 quads leave threads idle (few heads: G = 1 has 32 quads for 256 threads)
        the threads form ``groups`` copies of the quads, each group folds every groups-th partial,
        and group 0 folds the others' results from shared memory: a one-tile batch with ~130
        partials takes a few L2 round trips instead of ~17."""
        if E == 1:
            quads = T.meta_var(T.truncdiv(bufs.G * D, 4))
            groups = T.meta_var(T.max(T.truncdiv(NT, quads), 1))
            grp = T.meta_var(T.truncdiv(bufs.tx, quads))
            x = T.meta_var(T.truncmod(bufs.tx, quads) * 4)
            if grp < groups:
                if grp > 0:  # helpers start empty; group 0 holds the reducer's own state
                    bufs.em[0] = ninf
                    bufs.el[0] = T.float32(0)
                    for j in T.unroll(4):
                        bufs.eo[j] = T.float32(0)
                merge_some(bufs, 0, x, top, n, valid, groups, grp)
            if groups > 1:
                # Group states through the (now free) warp-state area: o, then m and l.
                T.tvm_storage_sync("shared")
                if grp < groups and grp > 0:
                    for j in T.vectorized(4):
                        bufs.ACCW[bufs.tx * 4 + j] = bufs.eo[j]
                    bufs.ACCW[NT * 4 + bufs.tx] = bufs.em[0]
                    bufs.ACCW[NT * 5 + bufs.tx] = bufs.el[0]
                T.tvm_storage_sync("shared")
                if grp == 0:
                    for g in range(groups - 1):
                        t = T.meta_var((g + 1) * quads + bufs.tx)
                        fold(bufs, 0, bufs.ACCW[NT * 4 + t], bufs.ACCW[NT * 5 + t], bufs.ACCW, t * 4)
        else:
            for e in T.unroll(E):
                x = T.meta_var((e * NT + bufs.tx) * 4)
                if x < bufs.G * D:
                    merge_some(bufs, e, x, top, n, valid, 1, 0)

    @T.macro
    def write_output(bufs, b, h):
        for e in T.unroll(E):
            x = T.meta_var((e * NT + bufs.tx) * 4)
            if x < bufs.G * D:
                for j in T.unroll(4):
                    o = T.meta_var(bufs.eo[e * 4 + j] / bufs.el[e])
                    bufs.O[b, h * bufs.G + T.truncdiv(x, D), T.truncmod(x, D) + j] = T.Cast(
                        dt, o * bufs.VSC[h] if FP8 else o)  # V's scale
                if T.truncmod(x, D) == 0:
                    bufs.LSE[b, h * bufs.G + T.truncdiv(x, D)] = (bufs.em[e] + T.log2(bufs.el[e])) * T.float32(
                        bufs.lse_unit)

    @T.macro
    def write_empty(bufs, b):
        for k in range(T.truncdiv(bufs.HQ * D + NT - 1, NT)):
            if k * NT + bufs.tx < bufs.HQ * D:
                bufs.O[b, T.truncdiv(k * NT + bufs.tx, D), T.truncmod(k * NT + bufs.tx, D)] = T.Cast(dt, T.float32(0))
                if T.truncmod(k * NT + bufs.tx, D) == 0:
                    bufs.LSE[b, T.truncdiv(k * NT + bufs.tx, D)] = T.float32(bufs.lse_empty)

    @T.macro
    def begin_paged_tile(bufs, b, h):
        """:func:`begin_tile` for the paged form: the lane's query row nn * 8 + g of the tile maps to
        its (token, head) (``TileLayout``); rows past the tile's are masked to zero; and the causal
        offset of the lane's accumulator columns 2t, 2t + 1."""
        lay = T.meta_var(bufs.layout)
        g, t = T.meta_var(T.truncdiv(bufs.lane, 4)), T.meta_var(T.truncmod(bufs.lane, 4))
        for nn in T.unroll(NN):
            for j in T.unroll(2):
                bufs.mrow[nn * 2 + j] = ninf
                bufs.lrow[nn * 2 + j] = T.float32(0)
                col = T.meta_var(nn * 8 + 2 * t + j)
                bufs.qoff[nn * 2 + j] = T.Select(T.And(col < bufs.G, lay.valid(h, col)),
                                                 lay.SQ - 1 - lay.token(h, col), NO_ROWS)
            r = T.meta_var(T.min(nn * 8 + g, bufs.G - 1))
            row = T.meta_var(T.Cast("int64", b) * bufs.sqb + T.Cast("int64", lay.token(h, r)) * bufs.sqs
                             + T.Cast("int64", lay.head(h, r)) * bufs.sqh)
            keep = T.meta_var(T.Select(T.And(nn * 8 + g < bufs.G, lay.valid(h, nn * 8 + g)), T.uint32(0xFFFFFFFF),
                                       T.uint32(0)))
            for kk in T.unroll(KS):
                for j in T.unroll(2):
                    bufs.qw[(nn * KS + kk) * 2 + j] = T.bitwise_and(
                        q_word(bufs.QW[T.truncdiv(row + T.Cast("int64", kk * 16 + q_col(t, j)), 2)]), keep)
                for e in T.unroll(4):
                    bufs.acc[(nn * KS + kk) * 4 + e] = T.float32(0)
        if FP8:  # K's scale folds into the tile's softmax scale
            bufs.slog2[0] = bufs.scale_base * bufs.KSC[lay.kv_head(h)]

    @T.macro
    def setup_paged(bufs):
        """:func:`setup` for the paged form: the lane's chunk offsets in a stage, and the element
        offset of its 16-byte chunk within a row (the row's address comes from the block table)."""
        lane = T.meta_var(bufs.lane)
        for u in T.unroll(CPL):
            r = T.meta_var(u * RPU + T.truncdiv(lane, CH))
            bufs.soff[u] = r * D + swizzle(T.truncmod(lane, CH), r) * EPC
        bufs.goff[K_ROW] = T.Cast("int64", T.truncmod(lane, CH) * EPC)

    @T.macro
    def prefetch_paged(bufs, b, h, row0, n):
        """Read the block table entries (and the start row) that :func:`load_paged` of block
        (b, h, row0) needs, into registers, a step ahead: the copies then issue without waiting
        for the table. Pages of at least a warp's rows hold all of them (no leftpad with real
        pages): one entry per warp; smaller pages: one per chunk of the lane."""
        rbase = T.meta_var(row0 + bufs.warp * RW)
        first = T.meta_var(rbase + T.truncdiv(bufs.lane, CH))
        bufs.lpr[0] = bufs.LP[b]
        if bufs.PSL >= RW_LOG2:
            at = T.meta_var(T.min(rbase, n - 1) + bufs.lpr[0])
            bufs.pg[0] = bufs.TBF[T.Cast("int64", b) * bufs.stb + T.Cast("int64", T.shift_right(at, bufs.PSL))]
        else:
            for u in T.unroll(CPL):
                at = T.meta_var(T.min(first + u * RPU, n - 1) + bufs.lpr[0])
                bufs.pg[u] = bufs.TBF[T.Cast("int64", b) * bufs.stb + T.Cast("int64", T.shift_right(at, bufs.PSL))]

    @T.macro
    def load_paged(bufs, stage, b, h, row0, n):
        """:func:`load` through the block table: row ``leftpad + r`` of sequence b is slot ``% page``
        of page ``block_table[b, // page]`` (read ahead by :func:`prefetch_paged`). Rows past the
        length are zero-filled from the last valid row's address."""
        lay = T.meta_var(bufs.layout)
        rbase = T.meta_var(row0 + bufs.warp * RW)
        bufs.left[0] = n - rbase - T.truncdiv(bufs.lane, CH)
        bufs.last[0] = n - 1
        first = T.meta_var(rbase + T.truncdiv(bufs.lane, CH))
        kvh = T.meta_var(T.Cast("int64", lay.kv_head(h)))
        mask = T.meta_var(T.shift_left(1, bufs.PSL) - 1)
        sbase = T.meta_var((bufs.warp * S + stage) * 2 * RW * D)
        if bufs.PSL >= RW_LOG2:
            bufs.gaddr[K_TILE] = T.Cast("int64", bufs.pg[0]) * bufs.skp + kvh * bufs.skh + bufs.goff[K_ROW]
            bufs.gaddr[V_TILE] = T.Cast("int64", bufs.pg[0]) * bufs.svp + kvh * bufs.svh + bufs.goff[K_ROW]
            for u in T.unroll(CPL):
                ok = T.meta_var(u * RPU < bufs.left[0])
                slot = T.meta_var(T.Cast("int64", T.bitwise_and(T.min(first + u * RPU, bufs.last[0]) + bufs.lpr[0],
                                                                mask)))
                T.ptx["cp.async.cg.shared.global"](
                    T.address_of(bufs.RING[sbase + bufs.soff[u]]),
                    T.address_of(bufs.KF[bufs.gaddr[K_TILE] + slot * bufs.skr]),
                    16, T.Select(ok, T.uint32(16), T.uint32(0)))
                T.ptx["cp.async.cg.shared.global"](
                    T.address_of(bufs.RING[sbase + RW * D + bufs.soff[u]]),
                    T.address_of(bufs.VF[bufs.gaddr[V_TILE] + slot * bufs.svr]),
                    16, T.Select(ok, T.uint32(16), T.uint32(0)))
        else:
            for u in T.unroll(CPL):
                ok = T.meta_var(u * RPU < bufs.left[0])
                page = T.meta_var(T.Cast("int64", bufs.pg[u]))
                slot = T.meta_var(T.Cast("int64", T.bitwise_and(T.min(first + u * RPU, bufs.last[0]) + bufs.lpr[0],
                                                                mask)))
                T.ptx["cp.async.cg.shared.global"](
                    T.address_of(bufs.RING[sbase + bufs.soff[u]]),
                    T.address_of(bufs.KF[page * bufs.skp + kvh * bufs.skh + slot * bufs.skr + bufs.goff[K_ROW]]),
                    16, T.Select(ok, T.uint32(16), T.uint32(0)))
                T.ptx["cp.async.cg.shared.global"](
                    T.address_of(bufs.RING[sbase + RW * D + bufs.soff[u]]),
                    T.address_of(bufs.VF[page * bufs.svp + kvh * bufs.svh + slot * bufs.svr + bufs.goff[K_ROW]]),
                    16, T.Select(ok, T.uint32(16), T.uint32(0)))

    @T.macro
    def write_paged_output(bufs, b, h):
        """The tile's rows to their (token, head) of o [B, Sq, Hq, D] and lse [B, Sq, Hq]; a row that
        saw no key (a sequence shorter than Sq) gets o = 0 and the empty lse."""
        lay = T.meta_var(bufs.layout)
        for e in T.unroll(E):
            x = T.meta_var((e * NT + bufs.tx) * 4)
            r = T.meta_var(T.truncdiv(x, D))
            if x < bufs.G * D and lay.valid(h, r):
                seen = T.meta_var(bufs.el[e] > T.float32(0))
                for j in T.unroll(4):
                    o = T.meta_var(bufs.eo[e * 4 + j] / T.max(bufs.el[e], T.float32(1e-30)))
                    bufs.O[b, lay.token(h, r), lay.head(h, r), T.truncmod(x, D) + j] = T.Cast(dt, T.Select(
                        seen, o * bufs.VSC[lay.kv_head(h)] if FP8 else o, T.float32(0)))  # V's scale
                if T.truncmod(x, D) == 0:
                    bufs.LSE[b, lay.token(h, r), lay.head(h, r)] = T.Select(
                        seen, (bufs.em[e] + T.log2(bufs.el[e])) * T.float32(bufs.lse_unit), T.float32(bufs.lse_empty))

    @T.macro
    def write_paged_empty(bufs, b):
        lay = T.meta_var(bufs.layout)
        for k in range(T.truncdiv(lay.SQ * bufs.HQ * D + NT - 1, NT)):
            x = T.meta_var(k * NT + bufs.tx)
            if x < lay.SQ * bufs.HQ * D:
                tok, rest = T.meta_var(T.truncdiv(x, bufs.HQ * D)), T.meta_var(T.truncmod(x, bufs.HQ * D))
                bufs.O[b, tok, T.truncdiv(rest, D), T.truncmod(rest, D)] = T.Cast(dt, T.float32(0))
                if T.truncmod(rest, D) == 0:
                    bufs.LSE[b, tok, T.truncdiv(rest, D)] = T.float32(bufs.lse_empty)

    if paged:
        op = streamk.GpuOperator(setup=setup_paged, begin_tile=begin_paged_tile, load=load_paged, compute=compute,
                                 combine=combine, publish=publish, merge_partials=merge_partials,
                                 write_output=write_paged_output, write_empty=write_paged_empty,
                                 prefetch=prefetch_paged)
    else:
        op = streamk.GpuOperator(setup=setup, begin_tile=begin_tile, load=load, compute=compute, combine=combine,
                                 publish=publish, merge_partials=merge_partials, write_output=write_output,
                                 write_empty=write_empty)
    return op, dict(KS=KS, NM=NM, NN=NN, E=E, CU=CU, CPL=CPL)


@T.macro
def dense_rows(bufs, b, h, rbase):
    """K/V as strided [B, Hkv, L, D] tensors: gaddr[K_ROW], gaddr[V_ROW] = the lane's first K and V
    chunks of rows rbase.. of tile (b, h); gaddr[K_TILE], gaddr[V_TILE] = row 0 of the tile (always
    valid: the zero-fill source)."""
    bufs.gaddr[K_TILE] = T.Cast("int64", b) * bufs.skb + T.Cast("int64", h) * bufs.skh
    bufs.gaddr[V_TILE] = T.Cast("int64", b) * bufs.svb + T.Cast("int64", h) * bufs.svh
    bufs.gaddr[K_ROW] = bufs.gaddr[K_TILE] + T.Cast("int64", rbase) * bufs.skl + bufs.goff[K_ROW]
    bufs.gaddr[V_ROW] = bufs.gaddr[V_TILE] + T.Cast("int64", rbase) * bufs.svl + bufs.goff[V_ROW]


def gpu_kernel_macro(spec: AttentionSpec, knobs: GpuKnobs, lse: LseConvention = LSE_NATURAL, paged: bool = False):
    """The persistent kernel's body for any K/V addressing. ``src`` holds the inputs: QW (q as
    32-bit words) with its strides; KF, VF (flat K and V) with theirs; SL (lengths, indexable), B,
    HQ, HKV, LMAX (int32); ROWS (query rows of a tile) and TILES (tiles per sequence); the dense
    form's ``rows`` (a macro like :func:`dense_rows`) and any buffers it reads, or the paged
    form's block table TBF, leftpad LP, page-size log2 PSL and ``layout``."""
    GM, D = spec.max_group, spec.head_dim
    cfg = knobs.streamk_config()
    NWARP, NT = knobs.num_warps, cfg.num_threads
    op, sizes = gpu_operator(spec, knobs, paged)
    KS, NM, NN, E, CU = (sizes[k] for k in ("KS", "NM", "NN", "E", "CU"))
    walk = streamk.gpu_walk(cfg)
    fp8 = spec.kv_dtype is not None
    ring_elems = NWARP * knobs.stages * 2 * knobs.rows_per_warp * D * spec.kv_bytes // 2  # 16-bit words

    @T.macro
    def kernel(src, O, LSE, WSO, WSML, FLAGS, softmax_scale, num_workers, num_splits, grid, TRACE):
        bx = T.launch_thread("blockIdx.x", grid)
        tx = T.launch_thread("threadIdx.x", NT)
        # One dynamic shared pool (16-bit words, one type for every kernel of the library): the
        # K/V ring, then the warps' states for the merge (fp32).
        ring = T.alloc_buffer((ring_elems + NWARP * GM * D * 2,), "uint16", scope="shared.dyn")
        accw = T.decl_buffer((NWARP * GM * D,), "float32", data=ring.data, elem_offset=ring_elems // 2,
                             scope="shared.dyn")
        ring8 = T.meta_var(T.decl_buffer((ring_elems * 2,), "uint8", data=ring.data, scope="shared.dyn") if fp8
                           else None)  # an fp8 ring, addressed in bytes
        mw = T.alloc_buffer((NWARP * GM,), "float32", scope="shared")  # the warps' m per head
        lw = T.alloc_buffer((NWARP * GM,), "float32", scope="shared")  # ... and l
        cum = T.alloc_buffer((cfg.max_batch + 1,), "int32", scope="shared")
        lens = T.alloc_buffer((cfg.max_batch,), "int32", scope="shared")
        wsum = T.alloc_buffer((NWARP,), "int32", scope="shared")
        valid = T.alloc_buffer((NT,), "int32", scope="shared")
        srch = T.alloc_buffer((2,), "int32", scope="local")
        seen = T.alloc_buffer((1,), "int32", scope="local")
        qr = T.alloc_buffer((streamk.qr_len(cfg),), "int32", scope="local")
        left = T.alloc_buffer((1,), "int32", scope="local")  # rows of the block left from the lane's first
        qw = T.alloc_buffer((NN * KS * 2,), "uint32", scope="local")  # Q^T fragments (mma B operand)
        soff = T.alloc_buffer((sizes["CPL"],), "int32", scope="local")  # the lane's chunks in a ring stage
        goff = T.alloc_buffer((2,), "int64", scope="local")  # ... and in a block of K, V rows
        gaddr = T.alloc_buffer((4,), "int64", scope="local")  # K_ROW, V_ROW, K_TILE, V_TILE
        acc = T.alloc_buffer((NN * KS * 4,), "float32", scope="local")  # O^T accumulator
        mrow = T.alloc_buffer((NN * 2,), "float32", scope="local")  # running max of the lane's heads
        lrow = T.alloc_buffer((NN * 2,), "float32", scope="local")  # running sum
        sc = T.alloc_buffer((NM * NN * 4,), "float32", scope="local")  # S^T of one step
        ph = T.alloc_buffer((NM * NN * 4,), spec.mma_dtype, scope="local")  # P^T, 16-bit
        pw = T.decl_buffer((NM * NN * 2,), "uint32", data=ph.data, scope="local")
        pb = T.alloc_buffer((NM * NN * 2,), "uint32", scope="local")  # P^T as the mma B operand
        af = T.alloc_buffer((4,), "uint32", scope="local")  # an A fragment (K or V^T)
        m_new = T.alloc_buffer((1,), "float32", scope="local")  # a state's new maximum
        m_safe = T.alloc_buffer((1,), "float32", scope="local")  # ... made finite
        alpha = T.alloc_buffer((1,), "float32", scope="local")  # rescale of the state being folded into
        beta = T.alloc_buffer((1,), "float32", scope="local")  # weight of the state folded in
        shfl = T.alloc_buffer((1,), "float32", scope="local")  # a warp shuffle's result
        eo = T.alloc_buffer((E * 4,), "float32", scope="local")  # the CTA state's quads (4 d of a head)
        em = T.alloc_buffer((E,), "float32", scope="local")
        el = T.alloc_buffer((E,), "float32", scope="local")
        w4 = T.alloc_buffer((CU * 4,), "float32", scope="local")  # a batch of partials being merged
        mc = T.alloc_buffer((CU,), "float32", scope="local")
        lc = T.alloc_buffer((CU,), "float32", scope="local")
        ok = T.alloc_buffer((CU,), "int32", scope="local")
        qoff = T.meta_var(T.alloc_buffer((NN * 2,), "int32", scope="local") if paged else None)  # causal offsets
        last = T.meta_var(T.alloc_buffer((1,), "int32", scope="local") if paged else None)  # the last valid row
        pg = T.meta_var(T.alloc_buffer((sizes["CPL"],), "int32", scope="local") if paged else None)  # next pages
        lpr = T.meta_var(T.alloc_buffer((1,), "int32", scope="local") if paged else None)  # next block's leftpad
        fr = T.meta_var(T.alloc_buffer((4,), "uint32", scope="local") if fp8 else None)  # fp8 bytes (ldmatrix)
        slog2 = T.meta_var(T.alloc_buffer((1,), "float32", scope="local") if fp8 else None)  # the tile's scale
        lane, warp = T.meta_var(T.truncmod(tx, 32)), T.meta_var(T.truncdiv(tx, 32))
        ctx = T.meta_var(streamk.WalkContext(
            SL=src.SL, LENS=lens, B=src.B, H=src.TILES, LMAX=src.LMAX, CUM=cum, NW=num_workers, SPLITS=num_splits,
            srch=srch, QR=qr, FLAGS=FLAGS, seen=seen, WSUM=wsum, VALID=valid, tx=tx, lane=lane, warp=warp, bx=bx,
            grid=grid, TRACE=TRACE))
        bufs = T.meta_var(SimpleNamespace(
            **vars(src), O=O, LSE=LSE, WSO=WSO, WSML=WSML, G=src.ROWS, soff=soff, goff=goff,
            gaddr=gaddr, left=left, RING=ring8 if fp8 else ring, ACCW=accw, fr=fr, slog2=slog2, MW=mw, LW=lw, qw=qw,
            acc=acc, mrow=mrow,
            lrow=lrow, sc=sc, ph=ph, pw=pw, pb=pb, af=af, m_new=m_new, m_safe=m_safe, alpha=alpha, beta=beta,
            shfl=shfl, eo=eo, em=em, el=el, w4=w4, mc=mc, lc=lc, ok=ok, qoff=qoff, last=last, pg=pg, lpr=lpr, tx=tx,
            lane=lane,
            warp=warp, scale_base=softmax_scale * T.float32(LOG2E),
            scale_log2=slog2[0] if fp8 else softmax_scale * T.float32(LOG2E), lse_unit=lse.unit, lse_empty=lse.empty))
        walk(ctx, op, bufs)

    return kernel


def dense_kernel_body(spec: AttentionSpec, knobs: GpuKnobs):
    """The kernel's body macro over strided [B, Hkv, L, D] K/V, taking the parameters of
    ``sig.ATTENTION_PARAMS`` by name and ``trace_buf`` (None: no trace): every form of the dense
    kernel (this module's, the stream-K rule's) is ``sig.prim_func`` of it. An fp8 spec takes the
    caches as bytes and ``k_scale``, ``v_scale`` (fp32 [Hkv], any stride; ``sig.ATTENTION_FP8_PARAMS``)."""
    GM, D, dt = spec.max_group, spec.head_dim, spec.dtype
    fp8 = spec.kv_dtype is not None
    kv_dt = "uint8" if fp8 else dt
    kernel = gpu_kernel_macro(spec, knobs)
    one, two, d64, g64 = (tvm.tirx.const(x, "int64") for x in (1, 2, D, GM))
    n_events = len(TRACE_EVENTS)

    @T.macro
    def body(q, k, v, seq_lens, o, lse, ws_o, ws_ml, flags, softmax_scale, num_workers, num_splits, grid,
             trace_buf, k_scale=None, v_scale=None):
        B, HQ, HKV, LMAX, WSN = T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
        sqb, sqh, skb, skh, skl = T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
        svb, svh, svl = T.int64(), T.int64(), T.int64()
        Q = T.match_buffer(q, (B, HQ, d64), dt, strides=(sqb, sqh, one))
        K = T.match_buffer(k, (B, HKV, LMAX, d64), kv_dt, strides=(skb, skh, skl, one))
        V = T.match_buffer(v, (B, HKV, LMAX, d64), kv_dt, strides=(svb, svh, svl, one))
        SL = T.match_buffer(seq_lens, (B,), "int32")
        KSC = T.meta_var(T.match_buffer(k_scale, (HKV,), "float32", strides=(T.int64(),)) if fp8 else None)
        VSC = T.meta_var(T.match_buffer(v_scale, (HKV,), "float32", strides=(T.int64(),)) if fp8 else None)
        O = T.match_buffer(o, (B, HQ, d64), dt)
        LSE = T.match_buffer(lse, (B, HQ), "float32")
        WSO = T.match_buffer(ws_o, (WSN, g64, d64), "float32")
        WSML = T.match_buffer(ws_ml, (WSN, two, g64), "float32")
        FLAGS = T.match_buffer(flags, (WSN,), "int32")
        TRACE = T.meta_var(T.match_buffer(trace_buf, (grid, n_events), "uint64") if trace_buf is not None else None)
        # Flat views for address arithmetic done once per step (Q as 32-bit words).
        KF = T.decl_buffer((skb * B,), kv_dt, data=K.data)
        VF = T.decl_buffer((svb * B,), kv_dt, data=V.data)
        QW = T.decl_buffer((sqb * B,), "uint32", data=Q.data)
        src = T.meta_var(SimpleNamespace(
            QW=QW, KF=KF, VF=VF, KSC=KSC, VSC=VSC, sqb=sqb, sqh=sqh, skb=skb, skh=skh, skl=skl, svb=svb, svh=svh,
            svl=svl, SL=SL,
            B=T.Cast("int32", B), HQ=T.Cast("int32", HQ), HKV=T.Cast("int32", HKV), LMAX=T.Cast("int32", LMAX),
            ROWS=T.truncdiv(T.Cast("int32", HQ), T.Cast("int32", HKV)), TILES=T.Cast("int32", HKV), rows=dense_rows))
        kernel(src, O, LSE, WSO, WSML, FLAGS, softmax_scale, num_workers, num_splits, grid, TRACE)

    return body


def make_gpu_kernel(spec: AttentionSpec, knobs: GpuKnobs | None = None, name: str | None = None,
                    trace: bool = False, dps: bool = False):
    """The persistent CUDA kernel over strided [B, Hkv, L, D] K/V: grid = ``grid`` CTAs walking
    ``num_workers`` planned ranges. An fp8 spec (``spec.kv_dtype``): the caches as bytes and the
    scales after the lengths (``sig.ATTENTION_FP8_PARAMS``), one token per sequence.

    ``trace=True`` builds the debug variant with one more argument, ``trace: uint64[grid,
    len(spec.TRACE_EVENTS)]``, filled with %globaltimer stamps of each CTA's phases.
    ``dps=True`` puts the outputs (o, lse) last, after the scalars, as Relax's call_tir wants."""
    body = dense_kernel_body(spec, knobs or GpuKnobs())
    base = sig.ATTENTION_FP8_PARAMS if spec.kv_dtype else sig.ATTENTION_PARAMS
    params = list(sig.outputs_last(base, sig.ATTENTION_OUTPUTS) if dps else base)
    if trace:
        params.append(sig.Param("trace_buf"))
    scales = ["k_scale", "v_scale"] if spec.kv_dtype else []
    return sig.prim_func(name or spec.name, params, body,
                         ["q", "k", "v", "seq_lens", "o", "lse", "ws_o", "ws_ml", "flags", "softmax_scale",
                          "num_workers", "num_splits", "grid", "trace_buf" if trace else None, *scales],
                         {"tirx.noalias": True, "tirx.is_scheduled": True})


def make_gpu_paged_kernel(spec: AttentionSpec, knobs: GpuKnobs | None = None, name: str | None = None):
    """The paged form's persistent CUDA kernel (``attention_cpu.make_cpu_paged_kernel`` has the
    contract): q [B, Sq, Hq, D]; k, v page pools [P, Hkv, page, D] (any strides with a contiguous
    head dim: views of [P, page, Hkv, D] pools or of one combined K/V tensor); block_table int32
    [B, pages]; seq_lens, leftpad int32 [B]; o [B, Sq, Hq, D]; lse [B, Sq, Hq]. A dense cache is
    one page per sequence: table[b, 0] = b, page_size_log2 = 30. An fp8 spec (``spec.kv_dtype``)
    takes the pools as bytes and fp32 [Hkv] scales k_scale, v_scale after leftpad
    (``sig.PAGED_FP8_PARAMS``): K's folds into the softmax scale, V's into the output."""
    fp8 = spec.kv_dtype is not None
    kv_dt = "uint8" if fp8 else spec.dtype
    kernel = gpu_kernel_macro(spec, knobs or GpuKnobs(), paged=True)

    @T.macro
    def body(q, k, v, block_table, seq_lens, leftpad, k_scale, v_scale, o, lse, ws_o, ws_ml, flags, softmax_scale,
             cache_len, page_size_log2, num_workers, num_splits, grid):
        f = T.meta_var(paged_buffers(spec, q, k, v, block_table, seq_lens, leftpad, k_scale, v_scale, o, lse, ws_o,
                                     ws_ml, flags))
        KF = T.decl_buffer((f.skp * f.P,), kv_dt, data=f.K.data)
        VF = T.decl_buffer((f.svp * f.P,), kv_dt, data=f.V.data)
        QW = T.decl_buffer((f.sqb * f.B,), "uint32", data=f.Q.data)
        TBF = T.decl_buffer((f.stb * f.B,), "int32", data=f.TABLE.data)
        src = T.meta_var(SimpleNamespace(
            QW=QW, KF=KF, VF=VF, TBF=TBF, LP=f.LP, KSC=f.KSC, VSC=f.VSC, sqb=f.sqb, sqs=f.sqs, sqh=f.sqh, skp=f.skp,
            skh=f.skh, skr=f.skr, svp=f.svp, svh=f.svh, svr=f.svr, stb=f.stb, PSL=page_size_log2,
            SL=started_lens(f.SL, f.LP, cache_len), B=T.Cast("int32", f.B), HQ=f.hq, HKV=f.hkv, LMAX=cache_len,
            ROWS=f.rows, TILES=f.hkv * f.lay.C, layout=f.lay))
        kernel(src, f.O, f.LSE, f.WSO, f.WSML, f.FLAGS, softmax_scale, num_workers, num_splits, grid, None)

    params = sig.PAGED_FP8_PARAMS if fp8 else sig.PAGED_PARAMS
    args = [p.name if fp8 or p.name not in ("k_scale", "v_scale") else None for p in sig.PAGED_FP8_PARAMS]
    return sig.prim_func(name or spec.name + "_paged", params, body, args,
                         {"tirx.noalias": True, "tirx.is_scheduled": True})
