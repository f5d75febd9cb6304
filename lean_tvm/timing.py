"""Honest GPU timing: device time of one call with a cold L2, and host time per call.

Before each timed call a 256 MB buffer is *read* (a write would leave dirty lines that drain
into the timed call), then the GPU is kept busy a little longer (``torch.cuda._sleep``) so the
host's launch path is not inside the timed interval; CUDA events bracket the call itself. The
clocks are warmed up by >= 100 ms of matrix products first.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable

import torch

FLUSH_BYTES = 256 * 1024 * 1024
SLEEP_CYCLES = 200_000  # ~100 us at 1.98 GHz: longer than our host launch path


@dataclasses.dataclass(frozen=True)
class Stats:
    median: float  # microseconds
    p10: float
    p90: float
    n: int

    @staticmethod
    def of(samples: list[float]) -> Stats:
        s = sorted(samples)
        return Stats(statistics.median(s), s[len(s) // 10], s[-1 - len(s) // 10], len(s))


class Timer:
    def __init__(self, device: torch.device, flush_bytes: int = FLUSH_BYTES):
        self.device = device
        self.flush = torch.ones(flush_bytes // 4, device=device, dtype=torch.float32)

    def warm_clocks(self, ms: float = 150.0) -> None:
        a = torch.randn(4096, 4096, device=self.device, dtype=torch.float16)
        t0 = time.perf_counter()
        while (time.perf_counter() - t0) * 1e3 < ms:
            for _ in range(10):
                a @ a
            torch.cuda.synchronize(self.device)

    def device_time(self, fn: Callable[[], object], reps: int = 30, warmup: int = 3) -> Stats:
        for _ in range(warmup):
            fn()
        samples = []
        for _ in range(reps):
            self.flush.sum()
            torch.cuda._sleep(SLEEP_CYCLES)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) * 1e3)
        return Stats.of(samples)

    def host_time(self, fn: Callable[[], object], reps: int = 1000) -> float:
        """Wall time per call from Python (us), calls queued back to back."""
        for _ in range(10):
            fn()
        torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        per_call = (time.perf_counter() - t0) / reps * 1e6
        torch.cuda.synchronize(self.device)
        return per_call


def gpu_clocks(device: torch.device) -> dict:
    """Current SM / memory clocks through NVML when available (for the result files)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        return {"sm_mhz": pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM),
                "mem_mhz": pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_MEM)}
    except Exception:  # noqa: BLE001 - clocks are informative only
        return {}
