"""From evidence to a verdict (docs/verdict.md): the paper's three questions, each answered once
from its signatures; the mechanism question decides Degradation or Collapse (Section 4), accuracy
decides Healthy, and agreement across the questions sets the confidence."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from quantdiag.verdict.evidence import Measured, cka_diagonal, subset_key
from quantdiag.verdict.thresholds import (
    BY_NAME,
    CONFIDENCE_LEVELS,
    DECISIVE,
    HEALTHY_RETENTION,
    LENS_GAP,
    LENS_SURFACED,
    LOW_CAP,
    LOW_RETENTION,
    MECHANISM,
    MECHANISM_PARTS,
    QUESTION_COMMANDS,
    QUESTION_TITLES,
    QUESTIONS,
    UNANSWERED,
)

HEALTHY, DEGRADATION, COLLAPSE, INCONCLUSIVE = "healthy", "degradation", "collapse", "inconclusive"
TITLES = {
    HEALTHY: "Healthy",
    DEGRADATION: "Signal Degradation",
    COLLAPSE: "Computation Collapse",
    INCONCLUSIVE: "Inconclusive",
}
#: A question's answers: the computation (or signal, or repairability) holds, or it does not.
INTACT, BROKEN, UNCLEAR, NOT_MEASURED = "intact", "broken", "unclear", "not measured"


@dataclass(frozen=True)
class Answer:
    """One question's answer, the mean signed margin of its voting signatures (+ intact) and
    which signatures were measured for it."""

    question: str
    answer: str
    score: float | None
    signatures: tuple[str, ...]


@dataclass(frozen=True)
class Decision:
    """A verdict, its confidence (``None`` for Inconclusive) and, for Inconclusive, why."""

    label: str
    confidence: float | None
    reason: str | None = None


def answer(question: str, measured: list[Measured]) -> Answer:
    """Intact if the voting signatures' score (``_score``) is positive, broken if negative;
    unclear if none votes (every interval straddles its line); not measured without signatures."""
    mine = [m for m in measured if BY_NAME[m.name].question == question]
    voting = [m for m in mine if m.vote is not None]
    names = tuple(m.name for m in mine)
    if not mine:
        return Answer(question, NOT_MEASURED, None, names)
    if not voting:
        return Answer(question, UNCLEAR, None, names)
    score = round(_score(question, voting), 6)
    return Answer(question, INTACT if score > 0 else BROKEN if score < 0 else UNCLEAR, score, names)


def _score(question: str, voting: list[Measured]) -> float:
    """The mean margin of the voting signatures; for the mechanism, the lower of its two parts'
    means (``MECHANISM_PARTS``: components and representations, each where any votes)."""
    if question != MECHANISM:
        return float(np.mean([m.margin for m in voting]))
    parts = [[m.margin for m in voting if m.name in names] for names in MECHANISM_PARTS.values()]
    return min(float(np.mean(margins)) for margins in parts if margins)


def answers(measured: list[Measured]) -> dict[str, Answer]:
    return {question: answer(question, measured) for question in QUESTIONS}


def decide(retention: float, measured: list[Measured], prompts: int | None) -> Decision:
    """The verdict from the accuracy kept (a share of the reference's), the answers, and the
    size of the subset the evidence was read on (``None``: too few prompts)."""
    if prompts is None:
        return Decision(INCONCLUSIVE, None, "too few prompts")
    by_question = answers(measured)
    mechanism = by_question[MECHANISM].answer
    repaired = _repair_works(measured)
    if mechanism != BROKEN and retention >= HEALTHY_RETENTION:
        return Decision(HEALTHY, _confidence(by_question, INTACT))
    if mechanism == BROKEN:
        if repaired:
            return Decision(INCONCLUSIVE, None, "repair works")
        return Decision(COLLAPSE, _confidence(by_question, BROKEN))
    if mechanism == INTACT:
        confidence = _confidence(by_question, INTACT)
        if retention < LOW_RETENTION and not repaired:
            confidence = min(confidence, LOW_CAP)
        return Decision(DEGRADATION, confidence)
    return Decision(INCONCLUSIVE, None, "mechanism " + mechanism)


def _repair_works(measured: list[Measured]) -> bool:
    """Whether a training-free repair cleared its line (outside its interval)."""
    return any(m.name == "repairs" and m.vote == INTACT for m in measured)


def _confidence(by_question: dict[str, Answer], expected: str) -> float:
    """Mean agreement of the three answers with the verdict's: 1 agreeing, 0 disagreeing,
    ``UNANSWERED`` unclear or not measured."""

    def agreement(found: Answer) -> float:
        if found.answer in (UNCLEAR, NOT_MEASURED):
            return UNANSWERED
        return 1.0 if found.answer == expected else 0.0

    return round(float(np.mean([agreement(found) for found in by_question.values()])), 3)


def confidence_level(confidence: float | None) -> str | None:
    """ "high", "medium" or "low" (``CONFIDENCE_LEVELS``); ``None`` for Inconclusive."""
    if confidence is None:
        return None
    return next(level for bound, level in CONFIDENCE_LEVELS if confidence >= bound)


def question_rows(measured: list[Measured]) -> list[dict]:
    """Each question as results.json and the cards show it: answer, score, signatures, and the
    command that measures it when nothing did."""
    return [
        {
            "question": found.question,
            "title": QUESTION_TITLES[found.question],
            "answer": found.answer,
            "score": found.score,
            "signatures": list(found.signatures),
            "command": QUESTION_COMMANDS[found.question] if found.answer == NOT_MEASURED else None,
        }
        for found in answers(measured).values()
    ]


def signature_rows(measured: list[Measured]) -> list[dict]:
    """Each signature as the report and results.json show it: value, interval, reference, the
    noise floor, the line it was judged against (and the one before the floor moved it), vote."""
    return [
        {
            "name": m.name,
            "question": BY_NAME[m.name].question,
            "title": BY_NAME[m.name].title,
            "measure": BY_NAME[m.name].measure,
            "value": m.value,
            "interval": None if m.interval is None else list(m.interval),
            "reference": m.reference,
            "floor": m.floor,
            "threshold": m.threshold,
            "base_threshold": BY_NAME[m.name].threshold,
            "collapse_when": BY_NAME[m.name].collapse_when,
            "vote": m.vote or "none",
        }
        for m in measured
    ]


def decisive(label: str, measured: list[Measured]) -> list[str]:
    """The signatures that voted with the verdict, furthest from their lines first."""
    if label == INCONCLUSIVE:
        return []
    side = COLLAPSE if label == COLLAPSE else INTACT
    agreeing = sorted((m for m in measured if m.vote == side), key=lambda m: abs(m.margin), reverse=True)
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
