"""The machine's own limits, measured in the same run as the figures set against them: memory bandwidth, the
matmul rate (the denominator of MFU), the host-to-device bus and device memory. A ratio to a limit measured
minutes apart on a shared machine would mix two different machines.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch


def sync(device: str) -> None:
    """Wait for a GPU's queued work (a CPU's is done when it returns)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def best_of(f: Callable[[], object], repeat: int = 3, device: str = "cpu") -> float:
    """Fastest wall time of `repeat` runs, the device synchronised after each: the machine's capability, least
    disturbed by neighbours. On a GPU one untimed run first (kernels, allocator)."""
    if device.startswith("cuda"):
        f()
        sync(device)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        f()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def memory_bandwidth(gib: float = 1.0) -> float:
    """GB/s of one streaming read (a sum over an array far larger than the caches)."""
    a = np.ones(int(gib * 2**30) // 4, dtype=np.float32)
    return a.nbytes / best_of(lambda: a.sum()) / 1e9


def matmul_size(device: str) -> int:
    """A matmul large enough to reach the device's rate: 4,096 on a CPU (seconds on 2 cores), 8,192 on a GPU."""
    return 8192 if device.startswith("cuda") else 4096


def matmul_rate(device: str = "cpu", dtype: str = "float32", n: int | None = None) -> float:
    """GFLOP/s of an n x n x n matmul in `dtype` on `device` (float32 at the precision pinned now, "highest" by
    default: true fp32, no TF32), the best of 3."""
    n = n or matmul_size(device)
    g = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(n, n, generator=g, device=device).to(getattr(torch, dtype)) for _ in range(2))
    a @ b  # warm up the BLAS threads, or cuBLAS's handle and kernel choice
    return 2 * n**3 / best_of(lambda: a @ b, device=device) / 1e9


def device_bandwidth(device: str, gib: float) -> tuple[float, float]:
    """(host-to-device GB/s from pinned memory, device memory GB/s of a copy: read + write)."""
    n = int(gib * 2**30) // 4
    host = torch.ones(n, pin_memory=device.startswith("cuda"))
    a, b = torch.ones(n, device=device), torch.empty(n, device=device)
    h2d = host.nbytes / best_of(lambda: a.copy_(host, non_blocking=True), device=device)
    mem = 2 * a.nbytes / best_of(lambda: b.copy_(a), device=device)
    return h2d / 1e9, mem / 1e9
