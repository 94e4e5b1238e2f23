"""Component pass: weights swapped once a setting a chunk of batches, against once a setting a batch.

SmolLM2, RTN at 8, 4 and 2 bits, 400 ParaRel prompts in batches of 64. The plain baseline is the
same pass with room for one batch of reference activations (``REFERENCE_BUDGET`` of 1 byte), which
swaps every linear (settings + 1) times a batch. Prints both times, the number of swaps, the
speed-up, and checks that every metric is identical.
"""

from __future__ import annotations

import time

import numpy as np

from quantdiag.analysis import components
from quantdiag.analysis.components import component_arrays
from quantdiag.data.facts import load_pararel, pararel_relations, tokenize
from quantdiag.model.load import load_reference
from quantdiag.quant.bank import WeightBank
from quantdiag.quant.spec import PrecisionPlan, QuantSpec

PROMPTS, BATCH = 400, 64


def timed(loaded, bank, specs, prompts) -> tuple[dict, float, int]:
    """The pass's arrays, seconds, and how many times it changed the model's uniform setting."""
    applied = [None]
    apply = bank.apply
    bank.apply = lambda plan: (applied.append(plan.default), apply(plan))[1]
    start = time.perf_counter()
    arrays = component_arrays(loaded, bank, specs, prompts, BATCH)
    seconds = time.perf_counter() - start
    bank.apply = apply
    return arrays, seconds, sum(a != b for a, b in zip(applied[1:], applied[2:]))


def main() -> None:
    loaded = load_reference("smollm2", device="cpu", dtype="float32")
    specs = [QuantSpec("rtn", bits, 128, True) for bits in (8, 4, 2)]
    bank = WeightBank(loaded)
    for spec in specs:
        bank.ensure(spec)
        bank.apply(PrecisionPlan.uniform(spec))  # its file read once before either timing
    facts = load_pararel(pararel_relations(), 2 * -(-PROMPTS // 39), seed=0)[:PROMPTS]
    prompts = [tokenize(loaded.tokenizer, fact, index) for index, fact in enumerate(facts)]
    chunked, fast, few = timed(loaded, bank, specs, prompts)
    budget, components.REFERENCE_BUDGET = components.REFERENCE_BUDGET, 1
    batched, slow, many = timed(loaded, bank, specs, prompts)
    components.REFERENCE_BUDGET = budget
    assert all(np.array_equal(chunked[key], batched[key], equal_nan=True) for key in chunked)
    print(f"a swap a batch: {slow:.1f} s, {many} swaps; a swap a chunk: {fast:.1f} s, {few} swaps (identical metrics)")
    print(f"speed-up: {slow / fast:.2f}x")


if __name__ == "__main__":
    main()
