"""The report's opening: one card per compared model (verdict, confidence, accuracy against the
reference, the subset the evidence rests on, the answers to the three questions, the signatures
that decided it, the recommendation) and the table of every signature with its value, interval,
the reference's value, the line it was judged against with the noise floor, and the vote."""

from __future__ import annotations

from quantdiag.verdict.thresholds import BY_NAME, SIGNATURES


def format_value(name: str, value: float | None) -> str:
    """Rank shares as percentages, everything else with two decimals; "–" where undefined."""
    if value is None:
        return "–"
    return f"{100 * value:.2g}%" if name == "lens_rank" else f"{value:.2f}"


def _where(verdict: dict) -> str | None:
    block, source = verdict["first_damaged_block"], verdict["damage_evidence"]
    if block is None or verdict["verdict"] == "healthy":
        return None
    return f"block {block} ({source})"


def _subset(verdict: dict) -> str:
    """Which subset the evidence rests on, and both subsets' sizes."""
    subset = verdict["subset"]
    sizes = f"Robust {subset['robust']}, Failure {subset['failure']}"
    if subset["name"] is None:
        return f"too few prompts ({sizes})"
    return f"{subset['name'].capitalize()}, {subset['prompts']} prompts ({sizes})"


def _question_line(row: dict) -> str:
    score = "" if row["score"] is None else f" ({row['score']:+.2f})"
    command = f": {row['command']}" if row["command"] else ""
    return f"{row['title']} {row['answer']}{score}{command}"


def verdict_cards(results: dict) -> list[dict]:
    """The cards, in the order of the settings."""
    cards = []
    for setting in results["settings"][1:]:
        verdict = setting["verdict"]
        by_name = {row["name"]: row for row in verdict["signatures"]}
        cards.append(
            {
                "label": setting["label"],
                "verdict": verdict["verdict"],
                "title": verdict["title"],
                "confidence": "–"
                if verdict["confidence"] is None
                else f"{verdict['confidence_level']} ({verdict['confidence']:.2f})",
                "accuracy": (
                    f"{verdict['accuracy']:.1%} vs {verdict['reference_accuracy']:.1%} "
                    f"({verdict['retention']:.0%} kept)"
                ),
                "tasks": _task_lines(setting, results["settings"][0]),
                "bits": f"{setting['average_bits']:.2f}",
                "where": _where(verdict),
                "subset": _subset(verdict),
                "questions": [_question_line(row) for row in verdict["questions"]],
                "decisive": [_decisive_line(by_name[name]) for name in verdict["decisive"]],
                "recommendation": verdict["recommendation"]["text"],
            }
        )
    return cards


def _task_lines(setting: dict, reference: dict) -> list[dict]:
    """Each lm-eval task's score beside the reference's, as the card shows ParaRel accuracy."""
    tasks, reference_tasks = setting.get("tasks") or {}, reference.get("tasks") or {}
    return [
        {"task": task, "score": f"{row['value']:.1%} vs {reference_tasks[task]['value']:.1%} ({row['items']} items)"}
        for task, row in tasks.items()
    ]


def _decisive_line(row: dict) -> str:
    side = BY_NAME[row["name"]].collapse_side
    return (
        f"{row['title']}: {format_value(row['name'], row['value'])} (collapse if {side} "
        f"{format_value(row['name'], row['threshold'])})"
    )


def cell_text(row: dict) -> str:
    """A signature's value with its interval, and the line it was judged against when the noise
    floor moved it (with the floor's value)."""
    name = row["name"]
    text = format_value(name, row["value"])
    if row["interval"] is not None:
        low, high = row["interval"]
        text += f" [{format_value(name, low)}, {format_value(name, high)}]"
    if row["floor"] is not None:
        text += f"; line {format_value(name, row['threshold'])} (floor {format_value(name, row['floor'])})"
    return text


def signature_table(results: dict) -> dict:
    """Rows: signatures any model measured; columns: question, threshold, reference, then each
    model with its value, interval, floor-moved line and vote."""
    settings = results["settings"][1:]
    measured = [{row["name"]: row for row in s["verdict"]["signatures"]} for s in settings]
    rows = []
    for signature in SIGNATURES:
        cells = [by_name.get(signature.name) for by_name in measured]
        if not any(cells):
            continue
        reference = next((cell["reference"] for cell in cells if cell), None)
        rows.append(
            {
                "title": signature.title,
                "question": signature.question,
                "measure": signature.measure,
                "threshold": f"{signature.collapse_side} {format_value(signature.name, signature.threshold)}",
                "reference": format_value(signature.name, reference),
                "cells": [
                    {"text": "not measured", "vote": "none"}
                    if cell is None
                    else {"text": cell_text(cell), "vote": cell["vote"]}
                    for cell in cells
                ],
            }
        )
    floors = [s["verdict"]["noise_floor"] for s in settings]
    return {"labels": [s["label"] for s in settings], "rows": rows, "floors": floors}
