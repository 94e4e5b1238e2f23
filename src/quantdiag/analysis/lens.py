"""Logit-lens curves (docs/methods.md, Logit lens): per layer, the mean probability and the median rank of the
answer at the last token, over a subset of prompts. The per-prompt lens comes from the
evaluation engine (``forward.score_prompts``)."""

from __future__ import annotations

import numpy as np

from quantdiag.analysis.forward import Scores

#: The mean answer probability at which the signal counts as present at a layer.
SIGNAL_PROB = 0.1


def lens_curves(scores: Scores, rows: np.ndarray) -> dict[str, list[float]] | None:
    """Mean ``p_l(y)`` and median rank per layer over ``rows``; ``None`` for an empty subset."""
    if scores.lens_prob is None or len(rows) == 0:
        return None
    prob, rank = scores.lens_prob[rows], scores.lens_rank[rows]
    return {"mean_prob": np.nanmean(prob, axis=0).tolist(), "median_rank": np.median(rank, axis=0).tolist()}


def signal_layer(curve: dict[str, list[float]], threshold: float = SIGNAL_PROB) -> int | None:
    """First layer whose mean answer probability reaches ``threshold`` (where the signal appears)."""
    above = [layer for layer, p in enumerate(curve["mean_prob"]) if p >= threshold]
    return above[0] if above else None
