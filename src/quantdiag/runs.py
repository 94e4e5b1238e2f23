"""The run directory: config, results, arrays, figures and report, plus a stage cache so that an
interrupted run resumes from what it finished. Every file is written atomically."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np

from quantdiag.profiling import Profiler
from quantdiag.storage import atomic_file, load_or_build, scratch_dir, sweep_leftovers, write_json

Arrays = dict[str, np.ndarray]


class RunDir:
    """``config.json``, ``results.json``, ``arrays.npz``, ``figures/``, ``report.html`` and
    ``stages/`` (finished pieces of work, named by a hash of their inputs). Opening it sweeps
    away what killed runs left in it."""

    def __init__(self, path: Path, profiler: Profiler | None = None):
        self.path = path
        self.profiler = profiler or Profiler(enabled=False)
        self.figures = path / "figures"
        self.stages = path / "stages"
        self.figures.mkdir(parents=True, exist_ok=True)
        self.stages.mkdir(parents=True, exist_ok=True)
        sweep_leftovers(path)

    @property
    def report(self) -> Path:
        return self.path / "report.html"

    def cached(self, stage: str, key: str, compute: Callable[[], Arrays], subject: str | None = None) -> Arrays:
        """The arrays of ``stage`` (of ``subject``: a setting's key, a method) with inputs ``key``:
        loaded if finished (and readable), else computed and saved before they are returned; profiled."""
        name = stage if subject is None else f"{stage}-{subject}"
        with self.profiler.stage(stage, subject) as marks:
            marks["cached"] = True

            def build(tmp: Path) -> Arrays:
                marks["cached"] = False
                arrays = compute()
                _save(tmp, arrays)
                return arrays

            return load_or_build(self.stages / f"{name}-{key}.npz", _load, build)

    def scratch(self) -> AbstractContextManager[Path]:
        """A temporary folder for one stage's spills, removed afterwards (or swept if killed)."""
        return scratch_dir(self.stages)

    def write_json(self, name: str, data: dict) -> None:
        write_json(self.path / name, data)


def save_arrays(path: Path, arrays: Arrays) -> None:
    """``np.savez_compressed``, atomically."""
    with atomic_file(path) as tmp:
        _save(tmp, arrays)


def _save(path: Path, arrays: Arrays) -> None:
    with path.open("wb") as handle:
        np.savez_compressed(handle, **arrays)


def _load(path: Path) -> Arrays:
    """Every array of an ``.npz`` (each member's CRC is checked as it is read)."""
    with np.load(path) as stored:
        return dict(stored)
