"""Sensitivity maps (METHODS 6): plans, the prefix-reusing sweeps against full forwards, signal
injection's end points, and the summaries."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from conftest import tiny_model
from quantdiag.analysis.forward import score_prompts
from quantdiag.analysis.sensitivity import (
    block_sweeps,
    correct_under,
    half_damage_block,
    injection_arrays,
    sensitivity_arrays,
    sensitivity_summary,
)
from quantdiag.data.facts import load_pararel, tokenize
from quantdiag.quant.bank import WeightBank
from quantdiag.quant.plans import COMPONENT_GROUPS, blocks_plan, component_plan
from quantdiag.quant.spec import REFERENCE, PrecisionPlan, QuantSpec

LOW, HIGH = QuantSpec("rtn", 2, 32, True), QuantSpec("rtn", 8, 32, True)


def _setup(loaded, count: int = 10):
    """A bank with 2- and 8-bit RTN, and prompts whose targets are the reference's own answers
    (so the reference scores 100% and quantized settings lose some)."""
    bank = WeightBank(loaded)
    for spec in (LOW, HIGH):
        bank.ensure(spec)
    prompts = [tokenize(loaded.tokenizer, fact, i) for i, fact in enumerate(load_pararel(["P19", "P36"], count // 2, 0))]
    bank.apply(PrecisionPlan.uniform(REFERENCE))
    answers = score_prompts(loaded, prompts, 4).predicted
    return bank, [dataclasses.replace(p, target=int(a)) for p, a in zip(prompts, answers)]


def test_plans_assign_the_blocks_and_components_they_name(llama):
    bank = WeightBank(llama)
    single = bank.assignment(blocks_plan(LOW.key, 1, 2))
    assert {name for name, s in single.items() if s == LOW.key} == {n for n in bank.modules if bank.layers[n] == 1}
    injected = bank.assignment(blocks_plan(HIGH.key, 0, 2, default=LOW.key))
    assert all((s == HIGH.key) == (bank.layers[n] < 2) and s in (HIGH.key, LOW.key) for n, s in injected.items())
    for group, kinds in COMPONENT_GROUPS.items():
        chosen = {n for n, s in bank.assignment(component_plan(llama.adapter.arch, LOW.key, group)).items() if s == LOW.key}
        assert chosen == {n for n in bank.modules if llama.adapter.linear_kind(n)[1] in kinds}, group


def test_a_plan_quantizing_nothing_is_the_reference(llama):
    bank, prompts = _setup(llama)
    assert correct_under(llama, bank, blocks_plan(LOW.key, 0, 0), prompts, 4).all()


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen3"])
def test_block_sweeps_equal_full_forwards_of_each_plan(family):
    loaded = tiny_model(family)
    bank, prompts = _setup(loaded)
    domino, single = block_sweeps(loaded, bank, LOW.key, prompts, 4)
    layers = loaded.adapter.n_layers
    assert not domino[-1].all()  # the 2-bit model loses answers: the comparison means something
    full_domino = np.stack([correct_under(loaded, bank, blocks_plan(LOW.key, 0, k + 1), prompts, 4) for k in range(layers)])
    full_single = np.stack([correct_under(loaded, bank, blocks_plan(LOW.key, k, k + 1), prompts, 4) for k in range(layers)])
    np.testing.assert_array_equal(domino, full_domino)
    np.testing.assert_array_equal(single, full_single)


def test_sensitivity_arrays_cover_every_test(llama):
    bank, prompts = _setup(llama)
    arrays = sensitivity_arrays(llama, bank, LOW.key, prompts, 4)
    assert arrays["domino"].shape == arrays["single"].shape == (4, len(prompts))
    np.testing.assert_array_equal(arrays["component/all"], arrays["domino"][-1])  # every linear, every block
    assert set(bank.current.values()) == {REFERENCE}


def test_injection_end_points_are_the_low_and_high_models(llama):
    bank, prompts = _setup(llama)
    arrays = injection_arrays(llama, bank, LOW.key, [REFERENCE, HIGH.key], prompts, 4)
    layers = llama.adapter.n_layers
    assert arrays["cosine"].shape == (2, layers + 1, layers)
    np.testing.assert_allclose(arrays["cosine"][0, -1], 1, rtol=1e-5)  # every block at the reference
    assert arrays["accuracy"][0, -1] == 1
    np.testing.assert_allclose(arrays["cosine"][0, 0], arrays["cosine"][1, 0])  # k = 0: the 2-bit model either way
    assert arrays["accuracy"][0, 0] == correct_under(llama, bank, PrecisionPlan.uniform(LOW.key), prompts, 4).mean()
    assert arrays["cosine"][0, 0, -1] < 0.999


def test_half_damage_block_and_summary():
    assert half_damage_block(np.array([1.0, 0.9, 0.5, 0.2, 0.0])) == 2
    assert half_damage_block(np.array([1.0, 1.0])) is None
    correct = np.array([[1, 1, 0, 1], [0, 1, 0, 0]], dtype=bool)  # 2 layers x 4 prompts
    arrays = {"domino": correct, "single": correct, "component/v": correct[1], "failure": np.array([0, 0, 1, 1])}
    summary = sensitivity_summary(arrays)
    assert summary["domino"] == {"robust": [1.0, 0.5], "failure": [0.5, 0.0]}
    assert summary["components"] == {"v": {"robust": 0.5, "failure": 0.0}}
    assert summary["half_damage_block"] == 1
