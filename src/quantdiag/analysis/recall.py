"""Factual recall (docs/methods.md, Recall): accuracy, robustness accuracy, per-relation accuracy, the rank of
the answer, the most frequent predictions, and the Robust / Failure subsets."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
from transformers import PreTrainedTokenizerBase

from quantdiag.analysis.forward import Scores
from quantdiag.data.facts import Fact

#: Histogram buckets of the answer's rank (inclusive bounds).
RANK_BUCKETS = (
    ("1", 1, 1),
    ("2-5", 2, 5),
    ("6-10", 6, 10),
    ("11-100", 11, 100),
    ("101-1000", 101, 1000),
    (">1000", 1001, None),
)


def rank_histogram(ranks: np.ndarray) -> dict[str, int]:
    """Count of answers per rank bucket."""
    return {
        label: int(((ranks >= low) & (ranks <= (high if high is not None else np.iinfo(np.int64).max))).sum())
        for label, low, high in RANK_BUCKETS
    }


def top_predictions(predicted: np.ndarray, tokenizer: PreTrainedTokenizerBase, k: int = 8) -> list[tuple[str, float]]:
    """The ``k`` most frequent predicted tokens with their share of prompts (2-bit collapses to
    "the", "." ...)."""
    counts = Counter(predicted.tolist()).most_common(k)
    return [(tokenizer.decode([token]), count / len(predicted)) for token, count in counts]


def per_relation_accuracy(facts: Sequence[Fact], correct: np.ndarray) -> dict[str, float]:
    relations = np.array([fact.relation for fact in facts])
    return {relation: float(correct[relations == relation].mean()) for relation in sorted(set(relations))}


def robustness_accuracy(correct: np.ndarray, fact_of_prompt: np.ndarray) -> float | None:
    """Mean over facts of the accuracy over that fact's paraphrases; ``None`` without paraphrases."""
    per_fact = [correct[fact_of_prompt == fact].mean() for fact in np.unique(fact_of_prompt)]
    return float(np.mean(per_fact)) if per_fact else None


def recall_summary(
    facts: Sequence[Fact],
    scores: Scores,
    tokenizer: PreTrainedTokenizerBase,
    robustness_correct: np.ndarray,
    fact_of_paraphrase: np.ndarray,
) -> dict:
    """Everything the report says about one model's recall."""
    correct = scores.correct
    return {
        "accuracy": float(correct.mean()),
        "robustness_accuracy": robustness_accuracy(robustness_correct, fact_of_paraphrase),
        "mean_target_prob": float(scores.target_prob.mean()),
        "median_rank": float(np.median(scores.target_rank)),
        "rank_histogram": rank_histogram(scores.target_rank),
        "top_predictions": top_predictions(scores.predicted, tokenizer),
        "per_relation": per_relation_accuracy(facts, correct),
    }


def subsets(reference_correct: np.ndarray, quantized_correct: np.ndarray) -> dict[str, np.ndarray]:
    """Robust = reference and 4-bit correct; Failure = reference correct, 4-bit wrong (indices)."""
    return {
        "robust": np.flatnonzero(reference_correct & quantized_correct),
        "failure": np.flatnonzero(reference_correct & ~quantized_correct),
    }
