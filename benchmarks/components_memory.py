"""Component and representation diagnostics: peak memory does not grow with the number of prompts.

For 200 and then 2,000 ParaRel prompts of SmolLM2, each in a fresh process: the component pass
(reference, RTN 4-bit and 2-bit) and the representation pass (RTN 2-bit against the reference:
CKA matrices of three streams at two positions, residual subspaces). Prints each process's peak
resident memory (RSS), its growth during the passes, the ratio of the two peaks (goal <= 1.2x),
and what keeping the activations whole would have needed instead.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import psutil
import torch

from _memory import peak_memory
from quantdiag.analysis.components import component_arrays
from quantdiag.analysis.representations import POSITIONS, STREAMS, representation_arrays
from quantdiag.data.facts import load_pararel, pararel_relations, tokenize
from quantdiag.model.load import load_reference
from quantdiag.quant.bank import WeightBank
from quantdiag.quant.spec import REFERENCE, PrecisionPlan, QuantSpec

SIZES = (200, 2000)
BATCH = 64


def measure(count: int) -> dict:
    """Run both passes on ``count`` prompts; memory is the process's RSS."""
    loaded = load_reference("smollm2", device="cpu", dtype="float32")
    specs = [QuantSpec("rtn", bits, 128, True) for bits in (4, 2)]
    bank = WeightBank(loaded)
    for spec in specs:
        bank.ensure(spec)
        bank.apply(PrecisionPlan.uniform(spec))  # the bank's weights are resident before the base level
    bank.apply(PrecisionPlan.uniform(REFERENCE))
    relations = pararel_relations()
    facts = load_pararel(relations, 2 * -(-count // len(relations)), seed=0)[:count]
    prompts = [tokenize(loaded.tokenizer, fact, index) for index, fact in enumerate(facts)]
    base = psutil.Process().memory_info().rss / 2**20
    start = time.perf_counter()
    with peak_memory(torch.device("cpu")) as growth:
        component_arrays(loaded, bank, list(specs), prompts, BATCH)
        representation_arrays(loaded, bank, specs[-1], {"all": prompts}, BATCH)
    whole = (
        2
        * len(prompts)
        * loaded.adapter.n_layers
        * loaded.model.config.hidden_size
        * len(STREAMS)
        * len(POSITIONS)
        * 4
        / 2**20
    )
    return {
        "prompts": len(prompts),
        "base": base,
        "growth": growth(),
        "seconds": time.perf_counter() - start,
        "whole": whole,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child)))
        return
    rows = []
    for count in SIZES:
        out = subprocess.run(
            [sys.executable, __file__, "--child", str(count)], check=True, capture_output=True, text=True
        ).stdout
        row = json.loads(out.splitlines()[-1])
        rows.append(row)
        print(
            f"{row['prompts']:>5} prompts: peak RSS {row['base'] + row['growth']:.0f} MiB "
            f"(+{row['growth']:.0f} MiB during the passes, {row['seconds']:.0f} s); "
            f"whole activations would need {row['whole']:.0f} MiB"
        )
    small, large = (row["base"] + row["growth"] for row in rows)
    print(f"peak RSS ratio {SIZES[1]} / {SIZES[0]} prompts: {large / small:.2f}x (goal <= 1.2x)")


if __name__ == "__main__":
    main()
