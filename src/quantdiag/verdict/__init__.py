"""The verdict (docs/verdict.md): Healthy, Signal Degradation, Computation Collapse or Inconclusive for
every compared model, with its evidence and a recommendation, computed from results.json."""

from __future__ import annotations

from dataclasses import asdict

from quantdiag.verdict.evidence import measure
from quantdiag.verdict.recommend import recommend
from quantdiag.verdict.rules import TITLES, confidence_level, decide, decisive, first_damaged_block, signature_rows
from quantdiag.verdict.thresholds import (
    CONFIDENCE_LEVELS,
    FULL_EVIDENCE,
    HEALTHY_RETENTION,
    MAJORITY,
    MIN_SIGNATURES,
    SIGNATURES,
)


def verdict_of(results: dict, setting: dict) -> dict:
    """One compared model's verdict, with every signature, the deciding ones, where the damage
    starts and what to do; ``docs/results.md`` documents the fields."""
    reference = results["settings"][0]["recall"]["accuracy"]
    accuracy = setting["recall"]["accuracy"]
    retention = accuracy / reference if reference else 0.0
    measured = measure(results, setting)
    decision = decide(retention, measured)
    block, source = first_damaged_block(results, setting)
    return {
        "verdict": decision.label,
        "title": TITLES[decision.label],
        "confidence": decision.confidence,
        "confidence_level": confidence_level(decision.confidence),
        "accuracy": accuracy,
        "reference_accuracy": reference,
        "retention": round(retention, 6),
        "signatures": signature_rows(measured),
        "decisive": decisive(decision.label, measured),
        "first_damaged_block": block,
        "damage_evidence": source,
        "recommendation": recommend(results, setting, decision.label, retention, block),
    }


def rules() -> dict:
    """The thresholds and rules a verdict was made with, saved beside the verdicts."""
    return {
        "signatures": [asdict(signature) for signature in SIGNATURES],
        "healthy_retention": HEALTHY_RETENTION,
        "majority": round(MAJORITY, 6),
        "min_signatures": MIN_SIGNATURES,
        "full_evidence": FULL_EVIDENCE,
        "confidence_levels": {level: bound for bound, level in CONFIDENCE_LEVELS},
    }
