"""Cross-model patching: quantdiag's engine vs the naive loop, in the same run.

The full residual grid (every layer x every token) of 20 ParaRel prompts of SmolLM2, with the
reference's states patched into the RTN 4-bit model (the method does not change the cost). The
naive loop runs one full Hugging Face forward per (prompt, layer, token), hooks writing the patch;
the engine resumes each patch from the patched layer, stacks patches into batches and unembeds
the last position only, and runs each patch from its token on with the clean keys and values of
the tokens before it. Prints both times, the ratio, the largest difference in p(target) and the
peak memory of each path, then the engine's time without the key-value reuse (the same engine
running every token of every patch) and that speed-up alone.
"""

from __future__ import annotations

import argparse
import time
from functools import partial
from unittest import mock

import numpy as np
import torch

from _memory import peak_memory
from quantdiag.analysis.causal import CausalPlan, causal_arrays
from quantdiag.analysis.patching import Sweep, naive_sweep_probs, sweep_probs, trace
from quantdiag.data.facts import load_pararel, tokenize
from quantdiag.model.load import load_reference
from quantdiag.quant.bank import WeightBank
from quantdiag.quant.spec import REFERENCE, PrecisionPlan, QuantSpec, Setting

RELATIONS = ["P103", "P37", "P1412", "P178"]


def naive(loaded, bank: WeightBank, setting: Setting, prompts) -> np.ndarray:
    """The baseline grid: reference traced per prompt, then one forward per patch."""
    width = max(len(p.ids) for p in prompts)
    out = np.full((len(prompts), loaded.adapter.n_layers, width), np.nan)
    pairs = []
    bank.apply(PrecisionPlan.uniform(REFERENCE))
    for prompt in prompts:
        ids, target = (
            torch.tensor([prompt.ids], device=loaded.device),
            torch.tensor([prompt.target], device=loaded.device),
        )
        pairs.append((ids, target, trace(loaded.adapter, ids, target, ("resid",)).values("resid")))
    bank.apply(PrecisionPlan.uniform(setting))
    for row, (ids, target, values) in enumerate(pairs):
        out[row, :, : ids.shape[1]] = naive_sweep_probs(loaded.adapter, ids, target, Sweep("resid"), values).numpy()[0]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    torch.manual_seed(0)
    loaded = load_reference("smollm2", device=args.device, dtype="float32")
    spec = QuantSpec("rtn", 4, 128, True)
    bank = WeightBank(loaded)
    bank.ensure(spec)
    facts = load_pararel(RELATIONS, -(-args.prompts // len(RELATIONS)), seed=0)[: args.prompts]
    prompts = [tokenize(loaded.tokenizer, fact, index) for index, fact in enumerate(facts)]
    plan = CausalPlan(analyses=("patching",), kinds=("resid",))
    causal_arrays(loaded, bank, spec, {"warm-up": prompts[:2]}, plan, batch_size=64)

    with peak_memory(loaded.device) as engine_peak:
        start = time.perf_counter()
        engine = causal_arrays(loaded, bank, spec, {"bench": prompts}, plan, batch_size=64)["bench/patching/resid"]
        engine_s = time.perf_counter() - start
    with mock.patch("quantdiag.analysis.causal.sweep_probs", partial(sweep_probs, reuse=False)):
        start = time.perf_counter()
        every_token = causal_arrays(loaded, bank, spec, {"bench": prompts}, plan, batch_size=64)["bench/patching/resid"]
        every_token_s = time.perf_counter() - start
    with peak_memory(loaded.device) as naive_peak:
        start = time.perf_counter()
        baseline = naive(loaded, bank, spec, prompts)
        naive_s = time.perf_counter() - start

    tokens = [len(p.ids) for p in prompts]
    print(
        f"{len(prompts)} prompts, {np.mean(tokens):.1f} tokens each, {loaded.adapter.n_layers} layers, device "
        f"{loaded.device}"
    )
    print(f"patches: {sum(tokens) * loaded.adapter.n_layers} (residual, every layer x token)")
    print(f"naive loop (one full forward per patch): {naive_s:.1f} s, peak memory +{naive_peak():.0f} MiB")
    print(f"quantdiag engine: {engine_s:.1f} s, peak memory +{engine_peak():.0f} MiB")
    print(f"speed-up: {naive_s / engine_s:.2f}x (goal >= 3x)")
    print(f"max |p_engine - p_naive|: {np.nanmax(np.abs(engine - baseline)):.2e} (goal < 1e-4)")
    print(
        f"without key-value reuse: {every_token_s:.1f} s; the reuse alone: {every_token_s / engine_s:.2f}x, "
        f"max |difference| {np.nanmax(np.abs(engine - every_token)):.2e}"
    )


if __name__ == "__main__":
    main()
