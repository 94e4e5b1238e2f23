"""Recall evaluation throughput: quantdiag's engine vs a plain loop of Hugging Face forwards.

Same 1,000 ParaRel prompts of SmolLM2, same model. The baseline pads batches of 64 (right
padding, attention mask) and computes full logits; the engine buckets by length and unembeds the
last position only. Prints both times, the speed-up ratio and whether predictions are identical.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from quantdiag.analysis.forward import score_prompts
from quantdiag.data.facts import load_pararel, tokenize
from quantdiag.model.load import load_reference

PROMPTS = 1000
BATCH = 64


@torch.inference_mode()
def plain_loop(loaded, prompts) -> np.ndarray:
    """The baseline: padded batches, full logits, prediction at each prompt's last real token."""
    pad = loaded.tokenizer.pad_token_id or 0
    predicted = []
    for start in range(0, len(prompts), BATCH):
        batch = prompts[start : start + BATCH]
        width = max(len(p.ids) for p in batch)
        ids = torch.tensor([list(p.ids) + [pad] * (width - len(p.ids)) for p in batch])
        mask = torch.tensor([[1] * len(p.ids) + [0] * (width - len(p.ids)) for p in batch])
        logits = loaded.model(input_ids=ids, attention_mask=mask).logits
        last = mask.sum(1) - 1
        predicted.append(logits[torch.arange(len(batch)), last].argmax(-1))
    return torch.cat(predicted).numpy()


def main() -> None:
    torch.manual_seed(0)
    loaded = load_reference("smollm2", device="cpu")
    facts = load_pararel(None, None, seed=0)
    chosen = np.random.default_rng(0).choice(len(facts), PROMPTS, replace=False)
    prompts = [tokenize(loaded.tokenizer, facts[i], n) for n, i in enumerate(chosen)]
    score_prompts(loaded, prompts[:BATCH], BATCH)  # warm-up, both paths share it
    start = time.perf_counter()
    baseline = plain_loop(loaded, prompts)
    baseline_s = time.perf_counter() - start
    start = time.perf_counter()
    engine = score_prompts(loaded, prompts, BATCH).predicted
    engine_s = time.perf_counter() - start
    print(f"prompts: {PROMPTS}, tokens per prompt: {np.mean([len(p.ids) for p in prompts]):.1f}")
    print(f"plain HF loop (batch {BATCH}, full logits): {baseline_s:.2f} s")
    print(f"quantdiag engine (length buckets, last-position logits): {engine_s:.2f} s")
    print(f"speed-up: {baseline_s / engine_s:.2f}x (goal >= 1.5x)")
    print(f"identical predictions: {bool((baseline == engine).all())} ({int((baseline != engine).sum())} differ)")


if __name__ == "__main__":
    main()
