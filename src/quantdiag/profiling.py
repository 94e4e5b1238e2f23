"""What each stage of a run costs (``--profile``): wall time, CPU time, device time and peak
memory, written to ``results.json`` and the report's appendix so that every speed claim is
measured (docs/performance.md)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import psutil
import torch

GIB = 2**30
#: How often the memory sampler reads the process's resident set size.
SAMPLE_SECONDS = 0.02


@dataclass(frozen=True)
class StageCost:
    """One stage's cost. ``subject``: what it ran on (a setting's key, a method), if any;
    ``cpu_s``: CPU time of every thread of the process; ``device_s``: wall time between the
    stage's first and last CUDA events (``None`` on CPU); ``peak_rss_gib``: the highest resident
    memory sampled during the stage; ``cached``: read from the stage or weight cache, not computed."""

    stage: str
    subject: str | None
    wall_s: float
    cpu_s: float
    device_s: float | None
    peak_rss_gib: float
    peak_device_gib: float | None
    cached: bool


class Profiler:
    """Times stages one after another (stages do not nest); disabled, it costs nothing."""

    def __init__(self, enabled: bool, device: str = "cpu"):
        self.enabled = enabled
        self.cuda = enabled and device == "cuda"
        self.stages: list[StageCost] = []
        self._process = psutil.Process()
        self._started = time.perf_counter()

    @contextmanager
    def stage(self, name: str, subject: str | None = None) -> Iterator[dict]:
        """Measure the ``with`` body as stage ``name`` of ``subject``; the body may set
        ``["cached"] = True`` (it read a finished result instead of computing one)."""
        marks = {"cached": False}
        if not self.enabled:
            yield marks
            return
        sampler = _PeakSampler(self._process)
        start, cpu, events = time.perf_counter(), time.process_time(), self._cuda_start()
        try:
            yield marks
        finally:
            device_s, peak_device = self._cuda_stop(events)
            wall, cpu_s = time.perf_counter() - start, time.process_time() - cpu
            peak = sampler.stop() / GIB
            cost = StageCost(name, subject, wall, cpu_s, device_s, peak, peak_device, marks["cached"])
            self.stages.append(cost)

    def to_json(self) -> dict | None:
        """``{"total_s", "stages": [StageCost...]}``, the total from the profiler's creation; ``None`` if disabled."""
        if not self.enabled:
            return None
        return {"total_s": time.perf_counter() - self._started, "stages": [asdict(s) for s in self.stages]}

    def _cuda_start(self) -> torch.cuda.Event | None:
        if not self.cuda:
            return None
        torch.cuda.reset_peak_memory_stats()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _cuda_stop(self, start: torch.cuda.Event | None) -> tuple[float | None, float | None]:
        if start is None:
            return None, None
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000, torch.cuda.max_memory_allocated() / GIB


class _PeakSampler:
    """The highest resident set size of ``process`` seen by a background thread until ``stop``."""

    def __init__(self, process: psutil.Process):
        self._process = process
        self._peak = process.memory_info().rss
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._done.wait(SAMPLE_SECONDS):
            self._peak = max(self._peak, self._process.memory_info().rss)

    def stop(self) -> int:
        self._done.set()
        self._thread.join()
        return max(self._peak, self._process.memory_info().rss)
