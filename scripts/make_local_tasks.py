"""Write the two local lm-evaluation-harness tasks shipped in ``quantdiag/data/tasks`` (seeded, so
a rerun writes the same files): a four-way multiple-choice task on ParaRel's official-language
facts (P37) and a short arithmetic generation task. Run from the repository root."""

from __future__ import annotations

import json
import random
from pathlib import Path

from quantdiag.data.facts import load_pararel

TASKS = Path("src/quantdiag/data/tasks")
ITEMS = 120


def languages() -> list[dict]:
    """Which language is official in the subject: its object and three other languages of P37."""
    facts = load_pararel(["P37"], None, 0)
    pool = sorted({fact.object for fact in facts})
    rng = random.Random(0)
    rows = []
    for fact in rng.sample(facts, ITEMS):
        choices = rng.sample([language for language in pool if language != fact.object], 3) + [fact.object]
        rng.shuffle(choices)
        rows.append({"subject": fact.subject, "choices": choices, "answer": choices.index(fact.object)})
    return rows


def arithmetic() -> list[dict]:
    """Sums and differences of two whole numbers below 50 (differences not negative)."""
    rng = random.Random(1)
    rows = []
    for index in range(ITEMS):
        a, b = sorted((rng.randint(1, 49), rng.randint(1, 49)), reverse=index % 2 == 1)
        operator, value = ("+", a + b) if index % 2 == 0 else ("-", a - b)
        rows.append({"question": f"What is {a} {operator} {b}?", "answer": str(value)})
    return rows


def main() -> None:
    for name, rows in (("quantdiag_languages", languages()), ("quantdiag_arithmetic", arithmetic())):
        with (TASKS / f"{name}.jsonl").open("w") as out:
            out.writelines(json.dumps(row) + "\n" for row in rows)


if __name__ == "__main__":
    main()
