"""Peak memory of a block of code, shared by the benchmarks."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import psutil
import torch


@contextmanager
def peak_memory(device: torch.device) -> Iterator[Callable[[], float]]:
    """Peak memory above the starting level, in MiB: CUDA allocations on a GPU, else the
    process's resident set sampled every 5 ms."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        yield lambda: (torch.cuda.max_memory_allocated() - base) / 2**20
        return
    process, peak, stop = psutil.Process(), [0], threading.Event()
    base = process.memory_info().rss

    def sample() -> None:
        while not stop.wait(0.005):
            peak[0] = max(peak[0], process.memory_info().rss - base)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield lambda: peak[0] / 2**20
    finally:
        stop.set()
        sampler.join()
