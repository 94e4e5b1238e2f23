"""Applying a PrecisionPlan is cheap next to a forward pass.

On SmolLM2: the time of one ``WeightBank.apply(plan)`` as a fraction of one evaluation pass over
200 ParaRel prompts (goal < 5%), for the worst case (every linear changes: reference to uniform
RTN 4-bit and back) and for the typical sensitivity step (the domino test's next block).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from collections.abc import Callable

import torch

from quantdiag.analysis.forward import score_prompts
from quantdiag.data.facts import load_pararel, pararel_relations, tokenize
from quantdiag.model.load import load_reference
from quantdiag.quant.bank import WeightBank
from quantdiag.quant.plans import blocks_plan
from quantdiag.quant.spec import REFERENCE, PrecisionPlan, QuantSpec


def median_seconds(action: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    loaded = load_reference("smollm2", device=args.device, dtype="float32")
    spec = QuantSpec("rtn", 4, 128, True)
    bank = WeightBank(loaded)
    bank.ensure(spec)
    relations = pararel_relations()
    facts = load_pararel(relations, 2 * -(-args.prompts // len(relations)), seed=0)[: args.prompts]
    prompts = [tokenize(loaded.tokenizer, fact, index) for index, fact in enumerate(facts)]

    evaluation = median_seconds(lambda: score_prompts(loaded, prompts, 64), 3)
    back_and_forth = itertools.cycle([PrecisionPlan.uniform(spec), PrecisionPlan.uniform(REFERENCE)])
    swap_all = median_seconds(lambda: bank.apply(next(back_and_forth)), 6)
    layers = loaded.adapter.n_layers
    dominos = iter([blocks_plan(spec, 0, k + 1) for k in range(layers)])
    domino_step = median_seconds(lambda: bank.apply(next(dominos)), layers)

    print(f"evaluation pass, {len(prompts)} prompts: {evaluation:.2f} s (device {loaded.device})")
    print(
        f"apply, every linear changes: {swap_all * 1000:.0f} ms = {swap_all / evaluation:.1%} of the pass (goal < 5%)"
    )
    print(
        f"apply, one domino step (one block): {domino_step * 1000:.1f} ms = {domino_step / evaluation:.2%} of the pass"
    )


if __name__ == "__main__":
    main()
