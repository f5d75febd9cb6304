"""Honest GPU timing: device time of one call with a cold L2, and host time per call.

Before each timed call a 256 MB buffer is *read* (a write would leave dirty lines that drain
into the timed call), then the GPU is kept busy a little longer (``torch.cuda._sleep``) so the
host's launch path is not inside the timed interval; CUDA events bracket the call itself. The
clocks are warmed up by >= 100 ms of matrix products first. Systems that are compared are timed
in interleaved rounds (:func:`interleaved`): a slow minute of a noisy GPU then hits every system
alike instead of picking the winner.
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
        return Stats.of(self.device_samples(fn, reps, warmup))

    def device_samples(self, fn: Callable[[], object], reps: int = 30, warmup: int = 3) -> list[float]:
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
        return samples

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


_CAPTURE_STREAM: dict[str, torch.cuda.Stream] = {}


def capture_graph(fn: Callable[[], object], device: torch.device, warmups: int = 1) -> torch.cuda.CUDAGraph:
    """``fn`` warmed up and captured into a CUDA graph on one side stream per device (the lean
    workspace, cached per stream, is then allocated once for every capture)."""
    if str(device) not in _CAPTURE_STREAM:
        _CAPTURE_STREAM[str(device)] = torch.cuda.Stream(device)
    stream = _CAPTURE_STREAM[str(device)]
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(warmups):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        fn()
    return graph


@dataclasses.dataclass(frozen=True)
class RoundStats:
    """A system's device time over interleaved rounds (microseconds)."""

    median: float  # the median of the rounds' medians
    p10: float  # of every call
    p90: float
    round_lo: float  # the fastest and slowest round's median
    round_hi: float
    n: int  # calls timed


def interleaved(timer: Timer, systems: dict[str, tuple[Callable[[], object], Callable]], rounds: int,
                reps: int) -> dict[str, RoundStats]:
    """Time every system ``reps`` calls per round, the systems in turn (the order rotating each
    round), ``rounds`` times. ``systems``: name -> (the call, a context-manager factory it runs in)."""
    names = list(systems)
    samples: dict[str, list[float]] = {n: [] for n in names}
    medians: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn, context = systems[name]
            with context():
                got = timer.device_samples(fn, reps, warmup=1)
            samples[name] += got
            medians[name].append(statistics.median(got))
    out = {}
    for name in names:
        all_calls = Stats.of(samples[name])
        out[name] = RoundStats(statistics.median(medians[name]), all_calls.p10, all_calls.p90, min(medians[name]),
                               max(medians[name]), all_calls.n)
    return out


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
