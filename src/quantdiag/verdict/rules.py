"""From evidence to a verdict (docs/verdict.md): each measured signature votes Collapse or intact; a
two-thirds majority decides, accuracy decides Healthy, and too little evidence is Inconclusive.
docs/verdict.md says the same in plain words."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from quantdiag.verdict.evidence import Measured, cka_diagonal, subset_key
from quantdiag.verdict.thresholds import (
    BY_NAME,
    CONFIDENCE_LEVELS,
    DECISIVE,
    FULL_EVIDENCE,
    HEALTHY_RETENTION,
    LENS_GAP,
    LENS_SURFACED,
    MAJORITY,
    MIN_SIGNATURES,
)

HEALTHY, DEGRADATION, COLLAPSE, INCONCLUSIVE = "healthy", "degradation", "collapse", "inconclusive"
TITLES = {
    HEALTHY: "Healthy",
    DEGRADATION: "Signal Degradation",
    COLLAPSE: "Computation Collapse",
    INCONCLUSIVE: "Inconclusive",
}


@dataclass(frozen=True)
class Decision:
    """A verdict and its confidence."""

    label: str
    confidence: float | None  # None for Inconclusive


def decide(retention: float, measured: list[Measured]) -> Decision:
    """The verdict from the accuracy kept (a share of the reference's) and the votes."""
    collapse = sum(BY_NAME[m.name].votes_collapse(m.value) for m in measured)
    total = len(measured)
    intact = total - collapse
    if total >= MIN_SIGNATURES and collapse / total >= MAJORITY:
        return Decision(COLLAPSE, _confidence(collapse, total))
    if retention >= HEALTHY_RETENTION:  # accuracy counts as one more intact vote
        return Decision(HEALTHY, _confidence(intact + 1, total + 1))
    if total >= MIN_SIGNATURES and intact / total >= MAJORITY:
        return Decision(DEGRADATION, _confidence(intact, total))
    return Decision(INCONCLUSIVE, None)


def _confidence(agreeing: int, total: int) -> float:
    """The agreeing share, scaled down when fewer than ``FULL_EVIDENCE`` votes were cast."""
    return round(agreeing / total * min(1.0, total / FULL_EVIDENCE), 3)


def confidence_level(confidence: float | None) -> str | None:
    """ "high", "medium" or "low" (``CONFIDENCE_LEVELS``); ``None`` for Inconclusive."""
    if confidence is None:
        return None
    return next(level for bound, level in CONFIDENCE_LEVELS if confidence >= bound)


def signature_rows(measured: list[Measured]) -> list[dict]:
    """Each signature as the report and results.json show it: value, reference, threshold, vote."""
    return [
        {
            "name": m.name,
            "title": BY_NAME[m.name].title,
            "measure": BY_NAME[m.name].measure,
            "value": m.value,
            "reference": m.reference,
            "threshold": BY_NAME[m.name].threshold,
            "collapse_when": BY_NAME[m.name].collapse_when,
            "vote": COLLAPSE if BY_NAME[m.name].votes_collapse(m.value) else "intact",
        }
        for m in measured
    ]


def decisive(label: str, measured: list[Measured]) -> list[str]:
    """The signatures that voted with the verdict, furthest from their thresholds first."""
    if label == INCONCLUSIVE:
        return []
    agreeing = [m for m in measured if BY_NAME[m.name].votes_collapse(m.value) == (label == COLLAPSE)]
    agreeing.sort(key=lambda m: BY_NAME[m.name].margin(m.value), reverse=True)
    return [m.name for m in agreeing[:DECISIVE]]


def first_damaged_block(results: dict, setting: dict) -> tuple[int | None, str | None]:
    """Where the damage starts, and from which evidence: the domino test's half-damage block;
    else the first layer whose CKA with the reference's drops below the CKA threshold; else the
    first layer where the reference's answer has surfaced in the logit lens and the model's has
    not. ``(None, None)`` when no layer stands out."""
    half = (setting.get("sensitivity") or {}).get("half_damage_block")
    if half is not None:
        return half, "domino"
    key = subset_key(results, setting)
    if key is None:
        return None, None
    summary = (setting.get("representations") or {}).get(key)
    if summary is not None:
        below = np.flatnonzero(cka_diagonal(summary) < BY_NAME["cka_diagonal"].threshold)
        return (int(below[0]), "cka") if len(below) else (None, None)
    curve, reference = setting["lens"].get(key), results["settings"][0]["lens"].get(key)
    if curve is None or reference is None:
        return None, None
    model_rank, reference_rank = np.array(curve["median_rank"]), np.array(reference["median_rank"])
    lost = np.flatnonzero((reference_rank <= LENS_SURFACED) & (model_rank > LENS_GAP * reference_rank))
    return (int(lost[0]), "lens") if len(lost) else (None, None)
