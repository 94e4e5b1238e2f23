"""The run directory: config, results, arrays, figures and report, plus a stage cache so that an
interrupted run resumes from what it finished. Every file is written atomically."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from quantdiag.storage import atomic_file, write_json

Arrays = dict[str, np.ndarray]


class RunDir:
    """``config.json``, ``results.json``, ``arrays.npz``, ``figures/``, ``report.html`` and
    ``stages/`` (finished pieces of work, named by a hash of their inputs)."""

    def __init__(self, path: Path):
        self.path = path
        self.figures = path / "figures"
        self.stages = path / "stages"
        self.figures.mkdir(parents=True, exist_ok=True)
        self.stages.mkdir(parents=True, exist_ok=True)

    @property
    def report(self) -> Path:
        return self.path / "report.html"

    def cached(self, name: str, key: str, compute: Callable[[], Arrays]) -> Arrays:
        """The arrays of stage ``name`` with inputs ``key``: loaded if finished, else computed and
        saved before they are returned."""
        target = self.stages / f"{name}-{key}.npz"
        if target.is_file():
            with np.load(target) as stored:
                return dict(stored)
        arrays = compute()
        save_arrays(target, arrays)
        return arrays

    def write_json(self, name: str, data: dict) -> None:
        write_json(self.path / name, data)


def save_arrays(path: Path, arrays: Arrays) -> None:
    """``np.savez_compressed``, atomically."""
    with atomic_file(path) as tmp, tmp.open("wb") as handle:
        np.savez_compressed(handle, **arrays)
