"""The ParaRel relations the reference knows (docs/verdict.md, Enough prompts): a run that names no
relations keeps those on which the reference answers at least ``MIN_KNOWN_ACCURACY`` of a seeded probe
sample, so that its subsets hold facts the reference knows instead of prompts it answers " the"."""

from __future__ import annotations

from quantdiag.analysis.forward import score_prompts
from quantdiag.analysis.recall import per_relation_accuracy
from quantdiag.config import MIN_KNOWN_ACCURACY, PROBE_FACTS
from quantdiag.data.facts import load_pararel, tokenize
from quantdiag.model.load import LoadedModel


def probe_accuracy(loaded: LoadedModel, seed: int, batch_size: int) -> dict[str, float]:
    """The reference's accuracy on ``PROBE_FACTS`` seeded facts of every ParaRel relation (the
    model as loaded: the reference)."""
    facts = load_pararel(None, PROBE_FACTS, seed)
    prompts = [prompt for i, fact in enumerate(facts) if (prompt := tokenize(loaded.tokenizer, fact, i)) is not None]
    correct = score_prompts(loaded, prompts, batch_size, desc="known relations").correct
    return per_relation_accuracy([facts[prompt.fact] for prompt in prompts], correct)


def known_relations(accuracy: dict[str, float]) -> tuple[str, ...]:
    """The relations at or above ``MIN_KNOWN_ACCURACY``, best known first (ties by id); all of them, in
    id order, when the reference knows none."""
    known = sorted((r for r, a in accuracy.items() if a >= MIN_KNOWN_ACCURACY), key=lambda r: (-accuracy[r], r))
    return tuple(known) or tuple(sorted(accuracy))
