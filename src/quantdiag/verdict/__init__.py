"""The verdict (docs/verdict.md): Healthy, Signal Degradation, Computation Collapse or Inconclusive for
every compared model, with its evidence and a recommendation, computed from results.json."""

from __future__ import annotations

from dataclasses import asdict

from quantdiag.analysis.resample import COVERAGE, DRAWS
from quantdiag.verdict.evidence import floor_setting, measure, subset_key
from quantdiag.verdict.recommend import recommend
from quantdiag.verdict.rules import (
    TITLES,
    confidence_level,
    decide,
    decisive,
    first_damaged_block,
    question_rows,
    signature_rows,
)
from quantdiag.verdict.thresholds import (
    CONFIDENCE_LEVELS,
    FLOOR_BITS,
    HEALTHY_RETENTION,
    LOW_CAP,
    LOW_RETENTION,
    MIN_SUBSET,
    SIGNATURES,
    UNANSWERED,
)


def verdict_of(results: dict, setting: dict) -> dict:
    """One compared model's verdict, with the three questions' answers, every signature, the
    deciding ones, the subset it rests on, where the damage starts and what to do;
    ``docs/results.md`` documents the fields."""
    reference = results["settings"][0]["recall"]["accuracy"]
    accuracy = setting["recall"]["accuracy"]
    retention = accuracy / reference if reference else 0.0
    measured = measure(results, setting)
    subset = evidence_subset(results, setting)
    decision = decide(retention, measured, subset["prompts"])
    block, source = first_damaged_block(results, setting)
    floor = floor_setting(results, setting)
    return {
        "verdict": decision.label,
        "title": TITLES[decision.label],
        "confidence": decision.confidence,
        "confidence_level": confidence_level(decision.confidence),
        "reason": decision.reason,
        "accuracy": accuracy,
        "reference_accuracy": reference,
        "retention": round(retention, 6),
        "subset": subset,
        "noise_floor": None if floor is None else floor["key"],
        "questions": question_rows(measured),
        "signatures": signature_rows(measured),
        "decisive": decisive(decision.label, measured),
        "first_damaged_block": block,
        "damage_evidence": source,
        "recommendation": recommend(results, setting, decision, retention, block),
    }


def evidence_subset(results: dict, setting: dict) -> dict:
    """The subset the evidence is read on (``name``, ``None`` when too small) and its
    ``prompts`` (``None`` then), with both subsets' sizes."""
    counts = results["subsets"].get(setting["method"]) or {"robust": 0, "failure": 0}
    key = subset_key(results, setting)
    name = None if key is None else key.split(":")[1]
    return {
        "name": name,
        "prompts": None if name is None else counts[name],
        "robust": counts["robust"],
        "failure": counts["failure"],
    }


def rules() -> dict:
    """The thresholds and rules a verdict was made with, saved beside the verdicts."""
    return {
        "signatures": [asdict(signature) for signature in SIGNATURES],
        "healthy_retention": HEALTHY_RETENTION,
        "low_retention": LOW_RETENTION,
        "low_cap": LOW_CAP,
        "min_subset": MIN_SUBSET,
        "unanswered": round(UNANSWERED, 6),
        "floor_bits": FLOOR_BITS,
        "interval": {"method": "half-sampling", "draws": DRAWS, "coverage": COVERAGE},
        "confidence_levels": {level: bound for bound, level in CONFIDENCE_LEVELS},
    }
