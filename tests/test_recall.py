"""Factual recall (METHODS 1) on hand-made scores: the Robust and Failure subsets, the rank
histogram's inclusive buckets and every field of the recall summary, each worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from quantdiag.analysis.forward import Scores
from quantdiag.analysis.recall import rank_histogram, recall_summary, subsets, top_predictions
from quantdiag.data.facts import Fact

#: Token id -> text, for the most frequent predictions.
WORDS = {3: " the", 5: " Paris", 7: ".", 9: " French"}


class _Words:
    """A tokenizer that only decodes the ids of ``WORDS``."""

    def decode(self, ids: list[int]) -> str:
        return WORDS[ids[0]]


def test_subsets_need_the_reference_right():
    """Robust: both right; Failure: the reference right and the 4-bit model wrong. A fact the
    reference gets wrong is in neither, whatever the 4-bit model does."""
    reference = np.array([True, True, True, False, False, True])
    quantized = np.array([True, False, True, True, False, False])
    split = subsets(reference, quantized)
    assert split["robust"].tolist() == [0, 2]
    assert split["failure"].tolist() == [1, 5]


def test_rank_histogram_buckets_include_both_bounds():
    """Buckets 1, 2-5, 6-10, 11-100, 101-1000, >1000 (METHODS 1), each bound in its own bucket."""
    ranks = np.array([1, 1, 2, 5, 6, 10, 11, 100, 101, 1000, 1001, 49152])
    assert rank_histogram(ranks) == {"1": 2, "2-5": 2, "6-10": 2, "11-100": 2, "101-1000": 2, ">1000": 2}


def _facts() -> list[Fact]:
    speaks = [Fact("P37", f"s{i}", "o", "[X] speaks [Y]") for i in range(3)]
    return speaks + [Fact("P103", f"t{i}", "o", "[X] is [Y]") for i in range(3)]


def test_recall_summary_by_hand():
    """Six prompts, three of each relation; correct where the prediction is the target."""
    scores = Scores(
        targets=np.array([3, 5, 5, 9, 3, 9]),
        predicted=np.array([3, 3, 5, 5, 3, 7]),  # correct: T F T | F T F
        target_prob=np.array([0.9, 0.2, 0.6, 0.1, 0.5, 0.1]),
        target_rank=np.array([1, 4, 1, 30, 1, 2000]),
    )
    # Paraphrases: fact 0 three times (2 right), fact 1 once (right), fact 2 twice (none right).
    robust = np.array([True, True, False, True, False, False])
    summary = recall_summary(_facts(), scores, _Words(), robust, np.array([0, 0, 0, 1, 2, 2]))
    assert summary["accuracy"] == pytest.approx(3 / 6)
    # Mean over facts of each fact's paraphrase accuracy: (2/3 + 1 + 0) / 3, not 3 of 6 prompts.
    assert summary["robustness_accuracy"] == pytest.approx(5 / 9)
    assert summary["mean_target_prob"] == pytest.approx(2.4 / 6)
    assert summary["median_rank"] == 2.5  # ranks sorted: 1 1 1 4 30 2000, median of every prompt
    assert summary["rank_histogram"] == {"1": 3, "2-5": 1, "6-10": 0, "11-100": 1, "101-1000": 0, ">1000": 1}
    assert summary["per_relation"] == {"P103": pytest.approx(1 / 3), "P37": pytest.approx(2 / 3)}
    # " the" three times, " Paris" twice, "." once: most frequent first, as shares of the prompts.
    assert summary["top_predictions"] == [(" the", 3 / 6), (" Paris", 2 / 6), (".", 1 / 6)]
    assert top_predictions(scores.predicted, _Words(), k=2) == [(" the", 3 / 6), (" Paris", 2 / 6)]  # still of 6


def test_no_paraphrases_no_robustness_accuracy():
    scores = Scores(np.array([5]), np.array([5]), np.array([0.9]), np.array([1]))
    summary = recall_summary(_facts()[:1], scores, _Words(), np.array([], dtype=bool), np.array([], dtype=int))
    assert summary["robustness_accuracy"] is None and summary["accuracy"] == 1.0
