"""Intervals over prompts by half-sampling: the statistic recomputed on random halves of the
prompts, drawn without replacement (docs/verdict.md, Intervals).

A mean over half of n prompts drawn without replacement varies as much as the mean over all n
varies between samples of the population (the finite-population correction (n - m) / (n - 1)
is 1/2 at m = n / 2), so the spread of the halves is an interval for the full sample's value
with no rescaling; and no prompt repeats, which keeps U-statistics such as the debiased CKA
defined (a bootstrap's duplicated prompts would bias them upward).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

#: Random halves drawn per interval.
DRAWS = 200
#: The interval's coverage: the 5th to the 95th percentile of the halves.
COVERAGE = 0.9
#: Fewer prompts than this and no interval is given (halves of 3 prompts say nothing).
MIN_PROMPTS = 8


def halves(n: int, seed: int = 0, draws: int = DRAWS) -> np.ndarray:
    """(draws, n // 2) sorted row indices, each row a random half of range(n), seeded."""
    generator = np.random.default_rng(seed)
    return np.sort(np.stack([generator.permutation(n)[: n // 2] for _ in range(draws)]), axis=1)


def interval(statistic: Callable[[np.ndarray], float], n: int, seed: int = 0) -> tuple[float, float] | None:
    """The ``COVERAGE`` interval of ``statistic(rows)`` over random halves of ``n`` prompts;
    ``None`` below ``MIN_PROMPTS`` prompts."""
    if n < MIN_PROMPTS:
        return None
    return spread([statistic(rows) for rows in halves(n, seed)])


def spread(values: list[float] | np.ndarray, centre: float | None = None) -> tuple[float, float] | None:
    """The central ``COVERAGE`` of a statistic's values on the halves; ``None`` where any is
    undefined. With ``centre`` (the whole sample's value), the halves' spread is moved onto it:
    for statistics that depend on the number of rows (a subspace of k directions from n / 2 < k
    rows has at most n / 2), the halves' level is biased, their spread is not."""
    values = np.asarray(values, dtype=float)
    if not np.isfinite(values).all():
        return None
    tail = (1 - COVERAGE) / 2
    low, high = np.quantile(values, [tail, 1 - tail])
    shift = 0.0 if centre is None else centre - float(values.mean())
    return round(float(low + shift), 6), round(float(high + shift), 6)


def mean_interval(values: np.ndarray, seed: int = 0) -> tuple[float, float] | None:
    """``interval`` of the mean of per-prompt ``values`` (NaNs left out)."""
    values = np.asarray(values, dtype=float)
    return interval(lambda rows: float(np.nanmean(values[rows])), len(values), seed)


def share_interval(share: float, n: int, seed: int = 0) -> tuple[float, float] | None:
    """``mean_interval`` of a share of n yes-or-no outcomes, from the share alone (the halves of
    a 0/1 vector depend only on how many ones it holds)."""
    ones = int(round(share * n))
    return mean_interval(np.arange(n) < ones, seed)
