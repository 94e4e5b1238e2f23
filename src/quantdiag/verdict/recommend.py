"""What to do about a verdict, from what this run measured: the cheapest repair that worked for
Signal Degradation; for Computation Collapse, that training-free compensation failed (with the
numbers) and where more bits or retraining are needed."""

from __future__ import annotations

from quantdiag.analysis.repair_names import REPAIR_NAMES
from quantdiag.verdict.rules import COLLAPSE, DEGRADATION, HEALTHY, Decision
from quantdiag.verdict.thresholds import INJECTION_RECOVERY, MIN_SUBSET, QUESTION_COMMANDS, REPAIR_GAIN

RETRAIN = "retraining-based methods (QAT, or fine-tuning the quantized model)"
#: What an Inconclusive verdict asks for, by its reason (``rules.decide``).
INCONCLUSIVE_TEXT = {
    "too few prompts": (
        f"Too few prompts: the subset the evidence is read on needs {MIN_SUBSET}. Rerun with more facts "
        "(--facts 30, or --facts all) or more of the relations the reference knows (--relations)."
    ),
    "repair works": (
        "The early computation reads broken, yet a training-free repair works, which a collapse rules out: "
        "look at the signature table, and rerun with more facts to narrow the intervals."
    ),
    "mechanism not measured": f"The mechanism was not measured: {QUESTION_COMMANDS['mechanism']}.",
    "mechanism unclear": (
        "Every mechanism signature's interval straddles its line: rerun with more facts (--facts 30, or --facts "
        "all) to narrow them."
    ),
}


def repair_outcomes(results: dict, setting: dict) -> list[dict]:
    """Each repair row with ``gain``: its accuracy on the facts the reference knows (Robust and
    Failure subsets weighted by size, Failure from its test split) minus the baseline's."""
    rows = (setting.get("repairs") or {}).get("rows") or []
    counts = results["subsets"].get(setting["method"], {})
    if not rows or rows[0]["failure"] is None:
        return []

    def known(row: dict) -> float:
        robust = 0.0 if row["robust"] is None else row["robust"] * counts["robust"]
        return (row["failure"] * counts["failure"] + robust) / (counts["failure"] + counts["robust"])

    baseline = known(rows[0])
    return [row | {"gain": round(known(row) - baseline, 6)} for row in rows]


def injection_blocks(results: dict, setting: dict) -> int | None:
    """The fewest leading blocks that, at reference precision over this setting, bring back
    ``INJECTION_RECOVERY`` of its Failure subset (signal injection); ``None`` without injection
    for this setting, the layer count if only the whole model does."""
    injection = (results.get("injection") or {}).get(setting["method"])
    if injection is None or injection["low"] != setting["key"]:
        return None
    accuracy = injection["accuracy"][injection["highs"].index("reference")]
    return next((k for k, value in enumerate(accuracy) if value >= INJECTION_RECOVERY), len(accuracy) - 1)


def recommend(results: dict, setting: dict, decision: Decision, retention: float, block: int | None) -> dict:
    """``action`` (use, repair, retrain or investigate), ``text`` for people, and the chosen or
    best ``repair`` row when repairs ran."""
    label = decision.label
    outcomes = [row for row in repair_outcomes(results, setting) if row["repair"] != "baseline"]
    if label == HEALTHY:
        text = (
            f"Use it: it keeps {retention:.0%} of the reference's accuracy at {setting['average_bits']:.2f} "
            "average bits."
        )
        return {"action": "use", "text": text, "repair": None}
    if label == DEGRADATION:
        return _degradation(outcomes)
    if label == COLLAPSE:
        return _collapse(results, setting, outcomes, block)
    return {"action": "investigate", "text": INCONCLUSIVE_TEXT[decision.reason], "repair": None}


def _degradation(outcomes: list[dict]) -> dict:
    """The cheapest repair that worked; else the best one tried; else: try the repairs."""
    worked = sorted((row for row in outcomes if row["gain"] >= REPAIR_GAIN), key=lambda row: row["average_bits"])
    if worked:
        row = worked[0]
        text = (
            f"Apply {REPAIR_NAMES[row['repair']]}: the cheapest repair that worked here. At {row['average_bits']:.2f} "
            "average "
            f"bits it brings back {row['failure']:.0%} of the Failure subset ({100 * row['gain']:+.1f} pts on the "
            "facts the reference knows)."
        )
        return {"action": "repair", "text": text, "repair": row}
    if outcomes:
        best = max(outcomes, key=lambda row: row["gain"])
        text = (
            f"No training-free repair tried here gained {REPAIR_GAIN:.0%} (best: {REPAIR_NAMES[best['repair']]}, "
            f"{100 * best['gain']:+.1f} pts). The computation still works: try more bits or a stronger quantizer."
        )
        return {"action": "repair", "text": text, "repair": best}
    text = (
        "The computation still works, so targeted, training-free repairs should help: quantdiag repair RUN finds "
        "the cheapest."
    )
    return {"action": "repair", "text": text, "repair": None}


def _collapse(results: dict, setting: dict, outcomes: list[dict], block: int | None) -> dict:
    """That training-free repairs failed (the best one's numbers), and what is needed instead."""
    if outcomes:
        best = max(outcomes, key=lambda row: (row["failure"], -row["average_bits"]))
        failed = (
            f"Training-free compensation failed here: the best repair ({REPAIR_NAMES[best['repair']]}, "
            f"{best['average_bits']:.2f} bits) brings back {best['failure']:.0%} of the Failure subset."
        )
    else:
        best, failed = (
            None,
            "Training-free repairs were not tried in this run; they fail on collapsed models in the paper.",
        )
    return {
        "action": "retrain",
        "text": f"{failed} Use {RETRAIN}, or {_more_bits(results, setting, block)}.",
        "repair": best,
    }


def _more_bits(results: dict, setting: dict, block: int | None) -> str:
    """Where more bits are needed: the blocks signal injection names, else up to the first
    damaged block."""
    needed = injection_blocks(results, setting)
    if not needed:
        return (
            "more bits in the early blocks"
            if block is None
            else f"more bits in {_leading(block)}, where the damage starts"
        )
    if needed < results["model"]["n_layers"]:
        return (
            f"more bits in {_leading(needed - 1)} (at reference precision they bring back {INJECTION_RECOVERY:.0%} "
            "of the Failure subset)"
        )
    return "more bits throughout: no shorter run of leading blocks at reference precision brought the answers back"


def _leading(last: int) -> str:
    """Blocks 0..last in words: "block 0" alone, else "blocks 0-<last>"."""
    return "block 0" if last == 0 else f"blocks 0-{last}"
