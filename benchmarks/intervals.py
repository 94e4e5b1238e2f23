"""The representation intervals' half-sampling (docs/verdict.md, Intervals): the batched Gram-matrix
route of ``representations.layer_mean_intervals`` against one SVD a half, the plain computation it
replaces, on random rows of SmolLM2's width and depth (40 prompts: halves of 20), one thread.

Prints each route's time, the speed-up, and the largest difference of the intervals.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from quantdiag.analysis.representations import layer_mean_intervals
from quantdiag.analysis.resample import halves, spread
from quantdiag.analysis.similarity import above_chance, debiased_cka
from quantdiag.analysis.spill import LayerRows

PROMPTS, LAYERS, WIDTH, K = 40, 30, 576, 12
CENTRES = {"cka": 0.9, "activation": 0.5, "error": 0.1}


def one_svd_a_half(x: np.ndarray, y: np.ndarray) -> dict[str, tuple[float, float] | None]:
    """Every half's CKA diagonal and subspace similarities from its own rows' SVDs."""
    per_half = {metric: [] for metric in CENTRES}
    for rows in halves(len(x)):
        sums = dict.fromkeys(CENTRES, 0.0)
        for layer in range(LAYERS):
            xs, ys = (torch.from_numpy(v[rows, layer]).double() for v in (x, y))
            bases = {
                name: torch.linalg.svd(v - v.mean(0), full_matrices=False)[2][:K].T
                for name, v in (("x", xs), ("activation", ys), ("error", ys - xs))
            }
            sums["cka"] += debiased_cka(xs.numpy(), ys.numpy()) / LAYERS
            for metric in ("activation", "error"):
                similarity = float(torch.linalg.matrix_norm(bases["x"].T @ bases[metric]) ** 2 / K)
                sums[metric] += float(above_chance(similarity, K, WIDTH)) / LAYERS
        for metric in per_half:
            per_half[metric].append(sums[metric])
    return {metric: spread(values, CENTRES[metric]) for metric, values in per_half.items()}


def main() -> None:
    torch.set_num_threads(1)
    generator = np.random.default_rng(0)
    x = generator.normal(size=(PROMPTS, LAYERS, WIDTH)).astype(np.float32)
    y = x + 0.3 * generator.normal(size=x.shape).astype(np.float32)
    with tempfile.TemporaryDirectory() as folder:
        spilled = [LayerRows(Path(folder) / name, LAYERS, WIDTH) for name in ("x", "y")]
        for rows, values in zip(spilled, (x, y)):
            rows.append(values)
        start = time.perf_counter()
        batched = layer_mean_intervals(*spilled, np.full(LAYERS, K), CENTRES)
        fast = time.perf_counter() - start
    start = time.perf_counter()
    plain = one_svd_a_half(x, y)
    slow = time.perf_counter() - start
    difference = max(abs(a - b) for metric in CENTRES for a, b in zip(batched[metric], plain[metric]))
    print(f"one SVD a half: {slow:.2f} s; batched Gram matrices: {fast:.2f} s; speed-up {slow / fast:.1f}x")
    print(f"largest interval difference: {difference:.1e}")


if __name__ == "__main__":
    main()
