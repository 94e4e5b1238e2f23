"""The robustness answers (docs/methods.md, Recall): ``robustness.greedy_answers``, which runs the
paraphrases' shared opening once and continues every batch from its cached keys and values,
against plain left-padded ``generate`` calls on whole prompts, on the built-in SmolLM2 (chat
template) and the quick preset's paraphrases of the demo relations.

Prints each route's time, the speed-up, and how many answers differ (0 expected).
"""

from __future__ import annotations

import time

import torch

from quantdiag.analysis.robustness import FirstLineDone, answer_config, greedy_answers
from quantdiag.config import RunConfig
from quantdiag.data.facts import load_pararel
from quantdiag.model.load import load_reference
from quantdiag.pipeline import build_prompts

RELATIONS = ["P103", "P37", "P1412", "P178", "P407", "P176"]
BATCH = 64


@torch.inference_mode()
def plain_answers(loaded, paraphrases) -> list[str]:
    """Whole prompts, left-padded, one ``generate`` a batch, the same stopping rule."""
    tokenizer, model, config = loaded.tokenizer, loaded.model, answer_config(loaded)
    pad = config.pad_token_id
    order = sorted(range(len(paraphrases)), key=lambda i: len(paraphrases[i].ids))
    answers = [""] * len(paraphrases)
    for start in range(0, len(order), BATCH):
        batch = order[start : start + BATCH]
        width = max(len(paraphrases[i].ids) for i in batch)
        ids = torch.tensor([(pad,) * (width - len(paraphrases[i].ids)) + paraphrases[i].ids for i in batch])
        mask = (torch.arange(width) >= width - torch.tensor([len(paraphrases[i].ids) for i in batch])[:, None]).long()
        stop = [FirstLineDone(tokenizer, width)]
        out = model.generate(ids, config, stopping_criteria=stop, attention_mask=mask)
        for i, row in zip(batch, tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)):
            answers[i] = row
    return answers


def main() -> None:
    torch.set_num_threads(2)
    loaded = load_reference("smollm2", "cpu", "auto", False)
    quick = RunConfig(robustness_facts=30, max_paraphrases=2)
    paraphrases = build_prompts(loaded, load_pararel(RELATIONS, 20, 0), quick).robustness
    routes = {
        "plain": lambda: plain_answers(loaded, paraphrases),
        "shared prefix": lambda: greedy_answers(loaded, paraphrases, BATCH),
    }
    timings, results = {}, {}
    for name, route in routes.items():
        start = time.perf_counter()
        results[name] = route()
        timings[name] = time.perf_counter() - start
        print(f"{name:14s} {timings[name]:6.2f} s ({len(paraphrases)} paraphrases)")
    print(f"speed-up: {timings['plain'] / timings['shared prefix']:.2f}x")
    print(f"answers that differ: {sum(a != b for a, b in zip(results['plain'], results['shared prefix']))}")


if __name__ == "__main__":
    main()
