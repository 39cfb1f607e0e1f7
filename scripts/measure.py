"""Measuring a piece of code: peak memory (host RSS sampled, CUDA max allocated), wall time with
device synchronisation, FLOPs and the device's matmul rate. Used by ``scripts/benchmark.py``; a
module of its own so the benchmark itself reads as configs → measurements → table."""
from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import resource
import sys
import threading
import time
from collections.abc import Callable

import torch

# ----------------------------------------------------------------------------------------------
# Memory


def current_rss() -> int:
    """Resident set size of this process in bytes (Linux /proc; elsewhere the peak so far)."""
    try:
        with open('/proc/self/statm') as f:
            return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
    except (OSError, ValueError, IndexError):
        return max_rss()


def max_rss() -> int:
    """Peak resident set size of the process so far, in bytes (ru_maxrss is KiB on Linux)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == 'darwin' else peak * 1024


def release_memory() -> None:
    """Collect garbage, empty the CUDA cache and hand freed heap back to the OS (glibc malloc_trim)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL('libc.so.6').malloc_trim(0)


class MemoryMeter:
    """Peak memory of a region: host RSS above the starting level (sampled) and CUDA max allocated."""

    def __init__(self, device: torch.device, interval_s: float = 0.002) -> None:
        self.device, self.interval_s = device, interval_s
        self.base = self.peak = self.gpu_base = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> MemoryMeter:
        release_memory()
        if self.device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(self.device)
            self.gpu_base = torch.cuda.memory_allocated(self.device)
        self.base = self.peak = current_rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, current_rss())
            time.sleep(self.interval_s)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, current_rss())

    @property
    def host_increase(self) -> int:
        return self.peak - self.base

    def gpu_peak(self) -> int | None:
        """CUDA max allocated since entry, above what was allocated at entry."""
        if self.device.type != 'cuda':
            return None
        return torch.cuda.max_memory_allocated(self.device) - self.gpu_base


# ----------------------------------------------------------------------------------------------
# Timing


def synchronize(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def warm_up(fn: Callable[[int], object], device: torch.device, warmup: int) -> None:
    """``warmup`` untimed calls ``fn(0) … fn(warmup - 1)``."""
    for i in range(warmup):
        fn(i)
    synchronize(device)


def time_calls(fn: Callable[[int], object], device: torch.device, iters: int, start: int = 0) -> list[float]:
    """Seconds of each of the calls ``fn(start) … fn(start + iters - 1)``."""
    times = []
    for i in range(start, start + iters):
        synchronize(device)
        begin = time.perf_counter()
        fn(i)
        synchronize(device)
        times.append(time.perf_counter() - begin)
    return times


def count_flops(fn: Callable[[], object]) -> float:
    """FLOPs of one call as counted by FlopCounterMode (matmuls and convolutions, fwd + bwd)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def matmul_rate(device: torch.device, seconds: float = 1.0) -> tuple[float, str]:
    """Measured dense matmul FLOP/s: bf16 on a GPU, fp32 on a CPU."""
    dtype, n = (torch.bfloat16, 8192) if device.type == 'cuda' else (torch.float32, 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        torch.matmul(a, b)
    synchronize(device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(10):
            torch.matmul(a, b)
        count += 10
        synchronize(device)
    elapsed = time.perf_counter() - start
    return 2.0 * n ** 3 * count / elapsed, str(dtype).replace('torch.', '')
