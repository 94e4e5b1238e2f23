"""Distribution damage: quantdiag's streamed KLD / perplexity pass against a plain loop that keeps
every position's KLD, on SmolLM2 at RTN 4-bit, and its peak memory for 4 and 16 windows of held-out
text, each in a fresh process (flat: the pass keeps sums and a histogram, not the positions).

Prints tokens/s of both, the largest difference in mean KLD and perplexity, and the two peaks.
"""

from __future__ import annotations

import math
import subprocess
import sys
import time

import torch

from _memory import peak_memory
from quantdiag.analysis.distribution import distribution_arrays, distribution_summary, held_out_text
from quantdiag.model.load import load_reference
from quantdiag.quant.bank import WeightBank
from quantdiag.quant.spec import REFERENCE, PrecisionPlan, QuantSpec

WINDOWS, LENGTH, SPEC = 4, 128, QuantSpec("rtn", 4)


def _setup(windows: int):
    loaded = load_reference("smollm2", device="cpu")
    bank = WeightBank(loaded)
    bank.ensure(SPEC)
    return loaded, bank, held_out_text(loaded, None, None, windows, LENGTH, 0).ids


@torch.inference_mode()
def plain_loop(loaded, bank, windows: torch.Tensor) -> tuple[float, float]:
    """Per window: the reference's and the setting's full distributions, every position's KLD kept;
    mean KLD and the setting's perplexity."""
    klds, nlls = [], []
    for window in windows:
        bank.apply(PrecisionPlan.uniform(REFERENCE))
        p = torch.log_softmax(loaded.model(window[None]).logits[0, :-1].double(), -1)
        bank.apply(PrecisionPlan.uniform(SPEC))
        q = torch.log_softmax(loaded.model(window[None]).logits[0, :-1].double(), -1)
        klds.append((p.exp() * (p - q)).sum(-1))
        nlls.append(-q.gather(-1, window[1:, None]).squeeze(-1))
    bank.apply(PrecisionPlan.uniform(REFERENCE))
    return float(torch.cat(klds).mean()), math.exp(float(torch.cat(nlls).mean()))


def memory(windows: int) -> None:
    """Peak memory of the streamed pass over ``windows`` windows (run in its own process)."""
    loaded, bank, ids = _setup(windows)
    with peak_memory(loaded.device) as peak:
        distribution_arrays(loaded, bank, [SPEC], ids)
    print(f"{peak():.0f}")


def main() -> None:
    loaded, bank, ids = _setup(WINDOWS)
    tokens = WINDOWS * (LENGTH - 1)
    start = time.perf_counter()
    plain_kld, plain_ppl = plain_loop(loaded, bank, ids)
    plain_s = time.perf_counter() - start
    start = time.perf_counter()
    arrays = distribution_arrays(loaded, bank, [REFERENCE, SPEC], ids)
    streamed_s = time.perf_counter() - start
    summary = distribution_summary(arrays[SPEC], arrays[REFERENCE])
    print(f"windows: {WINDOWS} x {LENGTH} tokens, {SPEC.label}")
    print(
        f"plain loop: {tokens / plain_s:.0f} positions/s; quantdiag (its reference row too): {tokens / streamed_s:.0f}"
    )
    print(f"mean KLD {summary['kld_mean']:.6g} vs {plain_kld:.6g}")
    print(f"perplexity {summary['perplexity']:.6g} vs {plain_ppl:.6g}")
    peaks = [
        subprocess.run([sys.executable, __file__, str(n)], capture_output=True, text=True, check=True) for n in (8, 32)
    ]
    print("peak memory, 4 and 16 windows: " + ", ".join(f"{p.stdout.split()[-1]} MiB" for p in peaks))


if __name__ == "__main__":
    if len(sys.argv) > 1:
        memory(int(sys.argv[1]))
    else:
        main()
