"""The benchmark's yardstick: a streaming read of N bytes at the HBM limit, in TIR.

Every thread keeps ``unroll`` independent 16-byte loads in flight over a grid-stride loop; the
sum is written so the loads cannot be dropped. Decode attention must read the KV cache once, so
its time is judged against this kernel reading the same bytes in the same run.
"""

from __future__ import annotations

from tvm.script import tirx as T

THREADS, UNROLL = 512, 2
NAME = "stream_read"


def make_stream_read():
    @T.prim_func(s_tir=True)
    def stream_read(x: T.handle, out: T.handle, grid: T.int32):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        n = T.int64()  # rows of 8 x 16-bit = 16 bytes
        X = T.match_buffer(x, (n, T.int64(8)), "float16")
        O = T.match_buffer(out, (T.int64(1 << 20),), "float32")  # one partial sum per thread
        bx = T.launch_thread("blockIdx.x", grid)
        tx = T.launch_thread("threadIdx.x", THREADS)
        acc = T.alloc_buffer((8,), "float32", scope="local")
        v = T.alloc_buffer((UNROLL, 8), "float16", scope="local")
        for i in T.unroll(8):
            acc[i] = T.float32(0)
        stride = T.meta_var(T.Cast("int64", grid) * (THREADS * UNROLL))
        for it in range(T.Cast("int32", (n + stride - 1) // stride)):
            for u in T.unroll(UNROLL):  # all loads first: UNROLL x 16 B in flight per thread
                row = T.meta_var(T.Cast("int64", it) * stride + T.Cast("int64", (u * grid + bx) * THREADS + tx))
                if row < n:
                    for i in T.vectorized(8):
                        v[u, i] = X[row, i]
                else:
                    for i in T.vectorized(8):
                        v[u, i] = T.float16(0)
            for u in T.unroll(UNROLL):
                for i in T.unroll(8):
                    acc[i] = acc[i] + T.Cast("float32", v[u, i])
        total = T.meta_var(acc[0] + acc[1] + acc[2] + acc[3] + acc[4] + acc[5] + acc[6] + acc[7])
        O[T.truncmod(bx * THREADS + tx, 1 << 20)] = total

    return stream_read.with_attr("global_symbol", NAME)
