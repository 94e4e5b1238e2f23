"""Repairs (METHODS 7): kurtosis protection, m, and the repair table on a
tiny model."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from quantdiag.analysis.forward import score_prompts
from quantdiag.analysis.repairs import REPAIRS, RepairOptions, excess_kurtosis, kurtosis_plan, protected_blocks, repair_arrays, repair_summary
from quantdiag.data.facts import load_pararel, tokenize
from quantdiag.quant.bank import WeightBank
from quantdiag.quant.calib import Calibration
from quantdiag.quant.spec import REFERENCE, PrecisionPlan, QuantSpec, eora_key

FOUR, EIGHT = QuantSpec("rtn", 4, 32, True), QuantSpec("rtn", 8, 32, True)


@pytest.fixture
def setup(llama):
    calibration = Calibration(torch.randint(1, 500, (4, 32), generator=torch.Generator().manual_seed(0)), "random tokens")
    bank = WeightBank(llama, calibration)
    for spec in (FOUR, EIGHT):
        bank.ensure(spec)
    prompts = [tokenize(llama.tokenizer, fact, i) for i, fact in enumerate(load_pararel(["P19", "P36"], 6, 0))]
    answers = score_prompts(llama, prompts, 4).predicted  # the reference's own answers: it scores 100%
    return bank, [dataclasses.replace(p, target=int(a)) for p, a in zip(prompts, answers)]


def test_kurtosis_protection_respects_its_budget_and_takes_the_heaviest_tails(llama, setup):
    bank, _ = setup
    plan = kurtosis_plan(bank, FOUR.key, EIGHT.key, budget=4.5)
    assert 4.0 < bank.average_bits(plan) <= 4.5
    protected = [name for name, s in bank.assignment(plan).items() if s == EIGHT.key]
    ranked = sorted(bank.modules, key=lambda name: excess_kurtosis(bank.modules[name].weight), reverse=True)
    assert set(protected) == set(ranked[: len(protected)])  # the heaviest tails first
    assert kurtosis_plan(bank, EIGHT.key, EIGHT.key, budget=4.1) == PrecisionPlan.uniform(EIGHT.key)  # already above the budget


def test_excess_kurtosis_and_protected_blocks():
    generator = torch.Generator().manual_seed(0)
    assert abs(excess_kurtosis(torch.randn(200, 200, generator=generator))) < 0.1
    assert excess_kurtosis(torch.distributions.StudentT(3.0).sample((200, 200))) > 1
    assert protected_blocks(32, None, None) == 2 and protected_blocks(30, None, None) == 2 and protected_blocks(32, 0, None) == 1
    assert protected_blocks(32, 20, None) == 4 and protected_blocks(32, 20, 7) == 7


def test_repair_table_on_a_tiny_model(llama, setup):
    bank, prompts = setup
    bank.ensure_eora([FOUR.key, EIGHT.key], rank=4)
    options = RepairOptions(blocks=None, budget=4.1, alphas=(0.0, 1.0, 3.0), rank=4, seed=0)
    arrays = repair_arrays(llama, bank, FOUR.key, EIGHT.key, prompts[:8], prompts[8:], 1, options, 4)
    assert set(bank.current.values()) == {REFERENCE}
    summary = repair_summary(arrays)
    assert [row["repair"] for row in summary["rows"]] == list(REPAIRS)
    bits = {row["repair"]: row["average_bits"] for row in summary["rows"]}
    assert bits["baseline"] == 4 and bits["early"] == pytest.approx(4 + 4 / 4)  # 1 of 4 blocks at 8-bit
    assert bits["eora"] > 4 and bits["early+eora"] > bits["early"]
    assert summary["alpha"] in options.alphas and summary["test_prompts"] == 4 and summary["blocks"] == 1
    assert bank.has(eora_key(FOUR.key, 4))
