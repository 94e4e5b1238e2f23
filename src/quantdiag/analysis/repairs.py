"""Mechanism-aware repairs (docs/methods.md, Repairs), each a PrecisionPlan over the WeightBank (plus the
amplified read-out), evaluated on the Failure subset's test split and on the Robust subset:
the paper's Table 1 for one setting.

- early protection: the first m blocks at 8-bit;
- kurtosis protection: the highest-kurtosis weight matrices at 8-bit within an average-bits budget;
- peak-signal amplification on top of early protection (alpha chosen on the dev split);
- EoRA rank-r compensation, on the setting and on the early-protected plan.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np
import torch

from quantdiag.analysis.amplify import amplified_correct, best_alpha, dev_test_split
from quantdiag.analysis.effects import as_json
from quantdiag.analysis.sensitivity import correct_under
from quantdiag.config import RepairOptions
from quantdiag.data.facts import Prompt
from quantdiag.model.load import LoadedModel
from quantdiag.quant.bank import WeightBank
from quantdiag.quant.checkpoint import ComparedSpec
from quantdiag.quant.plans import blocks_plan
from quantdiag.quant.spec import REFERENCE, PrecisionPlan, QuantSpec, Rule, Setting, compensated
from quantdiag.verdict.thresholds import EARLY_DIVISOR

#: Fewer Failure prompts than this and a setting gets no repairs (no dev split to tune on and test
#: split to score).
MIN_FAILURE = 2
#: Protected blocks and matrices get the method's setting at this width.
PROTECT_BITS = 8
#: Without a domino test, early protection keeps L / this blocks, rounded: the paper's 2 of 32
#: (half of the early blocks, ``EARLY_DIVISOR``).
PAPER_PROTECT_DIVISOR = 16


def repairable(spec: ComparedSpec, groups: Mapping[str, Mapping[str, np.ndarray]]) -> bool:
    """Whether ``spec`` gets the repair table: its method's Failure subset (``groups``: method ->
    subset -> rows) has at least ``MIN_FAILURE`` prompts."""
    return len(groups.get(spec.method, {}).get("failure", [])) >= MIN_FAILURE


def protect_setting(spec: ComparedSpec) -> Setting:
    """The setting protected weights of ``spec`` get: its method's ``PROTECT_BITS``-bit one;
    the reference for a checkpoint, which has no other widths."""
    return replace(spec, bits=PROTECT_BITS) if isinstance(spec, QuantSpec) else REFERENCE


def protected_blocks(layers: int, onset: int | None, given: int | None) -> int:
    """m: as given; else the blocks up to the domino test's damage onset
    (``sensitivity.damage_onset``), at most the early blocks (L // EARLY_DIVISOR); without a
    domino test L / PAPER_PROTECT_DIVISOR rounded; at least 1."""
    if given is not None:
        return given
    if onset is not None:
        return max(1, min(onset + 1, layers // EARLY_DIVISOR))
    return max(1, round(layers / PAPER_PROTECT_DIVISOR))


def repair_reads(setting: Setting, protect: Setting, options: RepairOptions) -> list[Setting]:
    """The weight settings the table reads: ``setting`` (the baseline), ``protect`` where a tried
    repair protects, and the EoRA compensations the tried repairs add (they depend on the
    calibration even when the setting does not)."""
    tried = set(options.tried)
    reads = [setting]
    if tried - {"eora"}:
        reads.append(protect)
    if tried & {"eora", "early+eora"}:
        reads.append(compensated(setting, options.rank))
    if "early+eora" in tried:
        reads.append(compensated(protect, options.rank))
    return list(dict.fromkeys(reads))


def excess_kurtosis(weight: torch.Tensor) -> float:
    """Fourth standardised moment minus 3 of a weight matrix's entries (heavy tails: outliers)."""
    values = weight.double().flatten()
    centred = values - values.mean()
    return float((centred**4).mean() / (centred**2).mean() ** 2 - 3)


def kurtosis_plan(bank: WeightBank, setting: Setting, protect: Setting, budget: float) -> PrecisionPlan:
    """``setting`` everywhere, then the reference's highest-kurtosis linears at ``protect``, one
    by one, while the average bits stay within ``budget``."""
    bank.apply(PrecisionPlan.uniform(REFERENCE))
    ranked = sorted(bank.modules, key=lambda name: excess_kurtosis(bank.modules[name].weight), reverse=True)
    plan = PrecisionPlan.uniform(setting)
    for name in ranked:
        candidate = PrecisionPlan(setting, (*plan.rules, Rule(protect, pattern=f"^{re.escape(name)}$")))
        if bank.average_bits(candidate) > budget:
            break
        plan = candidate
    return plan


def repair_plans(
    bank: WeightBank, setting: Setting, protect: Setting, blocks: int, options: RepairOptions
) -> dict[str, PrecisionPlan]:
    """The no-repair baseline and each tried repair's plan (``early+amplify`` is early protection's,
    read out amplified)."""
    early = blocks_plan(protect, 0, blocks, default=setting)
    makers = {
        "eora": lambda: PrecisionPlan.uniform(setting).compensated(options.rank),
        "early": lambda: early,
        "kurtosis": lambda: kurtosis_plan(bank, setting, protect, options.budget),
        "early+amplify": lambda: early,
        "early+eora": lambda: early.compensated(options.rank),
    }
    return {"baseline": PrecisionPlan.uniform(setting)} | {name: makers[name]() for name in options.tried}


def repair_arrays(
    loaded: LoadedModel,
    bank: WeightBank,
    setting: Setting,
    protect: Setting,
    failure: Sequence[Prompt],
    robust: Sequence[Prompt],
    blocks: int,
    options: RepairOptions,
    batch_size: int,
) -> dict[str, np.ndarray]:
    """Per repair (the baseline and ``options.tried``, in ``repairs``), correctness on the Failure
    test split (``<repair>/failure``) and on the Robust subset (``<repair>/robust``), and ``bits``
    (average bits per repair); ``test`` (the test split's indices into ``failure``), ``blocks`` (m)
    and, with amplification, ``alpha`` (chosen) and ``dev_accuracy`` (per alpha)."""
    dev, test = dev_test_split(len(failure), options.seed)
    plans = repair_plans(bank, setting, protect, blocks, options)
    tested = [failure[i] for i in test]
    out: dict[str, np.ndarray] = {}
    for name, plan in plans.items():
        if name == "early+amplify":
            continue
        out[f"{name}/failure"] = correct_under(loaded, bank, plan, tested, batch_size)
        out[f"{name}/robust"] = correct_under(loaded, bank, plan, robust, batch_size)
    if "early+amplify" in plans:
        bank.apply(plans["early+amplify"])
        amplified = amplified_correct(loaded, failure, options.alphas, batch_size)
        chosen = best_alpha(amplified[:, dev])
        alpha = options.alphas[chosen]
        out["early+amplify/failure"] = amplified[chosen, test]
        out["early+amplify/robust"] = amplified_correct(loaded, robust, [alpha], batch_size)[0]
        out |= {"alpha": np.array(alpha), "dev_accuracy": amplified[:, dev].mean(-1)}
    bank.apply(PrecisionPlan.uniform(REFERENCE))
    return out | {
        "repairs": np.array(list(plans)),
        "bits": np.array([bank.average_bits(plan) for plan in plans.values()]),
        "test": test,
        "blocks": np.array(blocks),
    }


def repair_summary(arrays: dict[str, np.ndarray]) -> dict:
    """The repair table for results.json: per repair its average bits and accuracy on the Failure
    test split and the Robust subset (``None`` where empty); m and, with amplification, the
    chosen alpha and the dev accuracy per alpha (else ``None``)."""

    def accuracy(correct: np.ndarray) -> float | None:
        return round(float(correct.mean()), 6) if len(correct) else None

    amplified = "alpha" in arrays
    return {
        "blocks": int(arrays["blocks"]),
        "alpha": float(arrays["alpha"]) if amplified else None,
        "dev_accuracy": as_json(arrays["dev_accuracy"]) if amplified else None,
        "test_prompts": len(arrays["test"]),
        "rows": [
            {
                "repair": str(name),
                "average_bits": round(float(bits), 4),
                "failure": accuracy(arrays[f"{name}/failure"]),
                "robust": accuracy(arrays[f"{name}/robust"]),
            }
            for name, bits in zip(arrays["repairs"], arrays["bits"])
        ],
    }
