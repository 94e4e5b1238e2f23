"""Token positions grouped as in ROME's causal tracing (docs/methods.md, Causal tracing), so heatmaps of prompts of
different lengths can be averaged: each token gets exactly one group."""

from __future__ import annotations

import numpy as np

#: Row order of every grouped heatmap. "before subject" holds template words before ``[X]``.
GROUPS = (
    "before subject",
    "first subject",
    "middle subject",
    "last subject",
    "first after",
    "further",
    "last",
)
LAST_SUBJECT = GROUPS.index("last subject")


def token_groups(subject: tuple[int, int], length: int) -> np.ndarray:
    """The group index of each token of a prompt whose subject spans tokens [start, end).

    Where roles coincide the more specific one wins: the last token, then the last subject token,
    then the first subject token.
    """
    start, end = subject
    groups = np.full(length, GROUPS.index("further"), dtype=np.int64)
    groups[:start] = GROUPS.index("before subject")
    groups[start:end] = GROUPS.index("middle subject")
    groups[start] = GROUPS.index("first subject")
    if end < length:
        groups[end] = GROUPS.index("first after")
    groups[end - 1] = LAST_SUBJECT
    groups[length - 1] = GROUPS.index("last")
    return groups


def group_means(grid: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Per-prompt grid (layers x tokens) -> (layers x groups): the mean over each group's tokens,
    NaN for groups the prompt does not have."""
    out = np.full((grid.shape[0], len(GROUPS)), np.nan)
    for group in np.unique(groups):
        out[:, group] = grid[:, groups == group].mean(axis=1)
    return out
