"""Sensitivity maps (METHODS 6): plans, the prefix-reusing sweeps and signal injection at every k
against plain forwards of the plan each k names, and the summaries."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from quantdiag.analysis.forward import score_prompts
from quantdiag.analysis.sensitivity import (
    block_sweeps,
    correct_under,
    damage_onset,
    half_damage_block,
    injection_arrays,
    sensitivity_arrays,
    sensitivity_summary,
)
from quantdiag.data.facts import load_pararel, tokenize
from quantdiag.quant.bank import WeightBank
from quantdiag.quant.plans import COMPONENT_GROUPS, blocks_plan, component_plan
from quantdiag.quant.spec import REFERENCE, PrecisionPlan, QuantSpec

from conftest import tiny_model

LOW, HIGH = QuantSpec("rtn", 2, 32, True), QuantSpec("rtn", 8, 32, True)


def _setup(loaded, count: int = 10):
    """A bank with 2- and 8-bit RTN, and prompts whose targets are the reference's own answers
    (so the reference scores 100% and quantized settings lose some)."""
    bank = WeightBank(loaded)
    for spec in (LOW, HIGH):
        bank.ensure(spec)
    prompts = [
        tokenize(loaded.tokenizer, fact, i) for i, fact in enumerate(load_pararel(["P19", "P36"], count // 2, 0))
    ]
    bank.apply(PrecisionPlan.uniform(REFERENCE))
    answers = score_prompts(loaded, prompts, 4).predicted
    return bank, [dataclasses.replace(p, target=int(a)) for p, a in zip(prompts, answers)]


def test_plans_assign_the_blocks_and_components_they_name(llama):
    bank = WeightBank(llama)
    single = bank.assignment(blocks_plan(LOW, 1, 2))
    assert {name for name, s in single.items() if s == LOW} == {n for n in bank.modules if bank.layers[n] == 1}
    injected = bank.assignment(blocks_plan(HIGH, 0, 2, default=LOW))
    assert all((s == HIGH) == (bank.layers[n] < 2) and s in (HIGH, LOW) for n, s in injected.items())
    for group, kinds in COMPONENT_GROUPS.items():
        chosen = {n for n, s in bank.assignment(component_plan(llama.adapter.arch, LOW, group)).items() if s == LOW}
        assert chosen == {n for n in bank.modules if llama.adapter.linear_kind(n)[1] in kinds}, group


def test_a_plan_quantizing_nothing_is_the_reference(llama):
    bank, prompts = _setup(llama)
    assert correct_under(llama, bank, blocks_plan(LOW, 0, 0), prompts, 4).all()


@torch.no_grad()
def _plain_forwards(model: torch.nn.Module, prompts) -> tuple[np.ndarray, torch.Tensor]:
    """One full forward per prompt: whether the argmax is the target, and the last token's output
    of every decoder layer (prompts x layers x d), read by forward hooks."""
    last = []

    def record(_module, _args, output):
        last.append((output[0] if isinstance(output, tuple) else output)[0, -1])

    handles = [block.register_forward_hook(record) for block in model.model.layers]
    try:
        answers = [model(input_ids=torch.tensor([p.ids])).logits[0, -1].argmax().item() for p in prompts]
    finally:
        for handle in handles:
            handle.remove()
    correct = np.array([answer == p.target for answer, p in zip(answers, prompts)])
    return correct, torch.stack(last).view(len(prompts), len(model.model.layers), -1)


def _apply(bank: WeightBank, plan: PrecisionPlan, by_layer: list[str]) -> None:
    """Apply ``plan`` and check that every linear of block l holds the setting ``by_layer[l]``."""
    bank.apply(plan)
    assert bank.current == {name: by_layer[bank.layers[name]] for name in bank.modules}


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen3"])
def test_block_sweeps_equal_plain_forwards_of_each_plan(family):
    loaded = tiny_model(family)
    bank, prompts = _setup(loaded)
    layers = loaded.adapter.n_layers
    swept = block_sweeps(loaded, bank, LOW, prompts, 4, layers)
    domino, single = swept["domino"], swept["single"]
    plain = {"domino": [], "single": []}
    for k in range(layers):
        _apply(bank, blocks_plan(LOW, 0, k + 1), [LOW] * (k + 1) + [REFERENCE] * (layers - k - 1))  # 0..k
        plain["domino"].append(_plain_forwards(loaded.model, prompts)[0])
        _apply(bank, blocks_plan(LOW, k, k + 1), [REFERENCE] * k + [LOW] + [REFERENCE] * (layers - k - 1))
        plain["single"].append(_plain_forwards(loaded.model, prompts)[0])
    np.testing.assert_array_equal(domino, plain["domino"])
    np.testing.assert_array_equal(single, plain["single"])
    np.testing.assert_array_equal(swept["whole"], plain["domino"][-1])  # every block at 2-bit
    assert not domino[-1].all()  # the 2-bit model loses answers: the comparison means something


def test_an_early_sweep_is_the_full_one_cut_at_its_steps(llama):
    """The quick preset's sweep: the domino test for k < steps only, the same numbers as the full
    sweep's first rows, no single-block test, and the whole 2-bit model's correctness."""
    bank, prompts = _setup(llama)
    full = block_sweeps(llama, bank, LOW, prompts, 4, llama.adapter.n_layers)
    early = block_sweeps(llama, bank, LOW, prompts, 4, 2, single=False)
    assert set(early) == {"domino", "whole"} and early["domino"].shape == (2, len(prompts))
    np.testing.assert_array_equal(early["domino"], full["domino"][:2])
    np.testing.assert_array_equal(early["whole"], full["whole"])


def test_injection_at_every_k_equals_its_plan(llama):
    """k = 0..L: blocks below k at the high setting, the rest at 2-bit; accuracy and the mean
    cosine of every block's last-token output with the reference's."""
    bank, prompts = _setup(llama)
    highs = [REFERENCE, HIGH]
    arrays = injection_arrays(llama, bank, LOW, highs, prompts, 4)
    layers = llama.adapter.n_layers
    assert arrays["cosine"].shape == (len(highs), layers + 1, layers)
    bank.apply(PrecisionPlan.uniform(REFERENCE))
    _, reference = _plain_forwards(llama.model, prompts)
    for h, high in enumerate(highs):
        cosines = []
        for k in range(layers + 1):
            _apply(bank, blocks_plan(high, 0, k, default=LOW), [high] * k + [LOW] * (layers - k))
            correct, last = _plain_forwards(llama.model, prompts)
            cosines.append(F.cosine_similarity(last, reference, dim=-1).mean(0).numpy())
            assert arrays["accuracy"][h, k] == correct.mean(), (high, k)
        np.testing.assert_allclose(arrays["cosine"][h], cosines, atol=1e-5, err_msg=high)
        assert np.abs(np.diff(cosines, axis=0)).max(axis=1).min() > 1e-3  # every extra block moves the curve
    np.testing.assert_allclose(arrays["cosine"][0, -1], 1, rtol=1e-5)  # every block at the reference
    assert arrays["accuracy"][0, -1] == 1 and arrays["accuracy"][0, 0] < 1


def test_sensitivity_arrays_cover_every_test(llama):
    bank, prompts = _setup(llama)
    arrays = sensitivity_arrays(llama, bank, LOW, prompts, 4)
    assert arrays["domino"].shape == arrays["single"].shape == (4, len(prompts))
    np.testing.assert_array_equal(arrays["component/all"], arrays["domino"][-1])  # every linear, every block
    assert set(bank.current.values()) == {REFERENCE}
    early = sensitivity_arrays(llama, bank, LOW, prompts, 4, "early")  # 4 layers: 1 early block (L // 8)
    assert set(early) == {"domino", "whole"} and early["domino"].shape == (1, len(prompts))


def test_half_damage_block_and_summary():
    assert half_damage_block(np.array([1.0, 0.9, 0.5, 0.2, 0.0]), 0.0) == 2  # loss 1: first k at <= 1 - 1 / 2
    # loss 1 - 0.25 = 0.75 from the reference's 1 (not from block 0's 0.75): first k at <= 1 - 0.375
    assert half_damage_block(np.array([0.75, 0.625, 0.5, 0.25]), 0.25) == 1
    assert half_damage_block(np.array([1.0, 1.0]), 1.0) is None
    assert half_damage_block(np.array([1.0, 0.9]), 0.0) is None  # half lost beyond the two swept blocks
    correct = np.array([[1, 1, 0, 1], [0, 1, 0, 0]], dtype=bool)  # 2 layers x 4 prompts
    arrays = {
        "domino": correct,
        "single": correct,
        "whole": correct[1],
        "component/v": correct[1],
        "failure": np.array([0, 0, 1, 1]),
    }
    summary = sensitivity_summary(arrays)
    assert summary["domino"] == {"robust": [1.0, 0.5], "failure": [0.5, 0.0]}
    assert summary["components"] == {"v": {"robust": 0.5, "failure": 0.0}}
    assert summary["half_damage_block"] == 1 and summary["swept_blocks"] == 2
    early = sensitivity_summary({"domino": correct[:1], "whole": correct[1], "failure": arrays["failure"]})
    assert (early["single"], early["components"], early["half_damage_block"]) == (None, None, None)
    assert early["whole"] == {"robust": 0.5, "failure": 0.0}


def test_the_damage_onset_is_no_earlier_than_an_unfinished_sweep():
    """Half of the loss not reached within the swept blocks: the onset is where the sweep
    stopped, so early protection covers every swept block."""
    whole = np.array([0, 0, 0, 0], dtype=bool)
    assert damage_onset({"domino": np.ones((3, 4), dtype=bool), "whole": whole}) == 3
    assert damage_onset({"domino": np.array([[1, 1, 1, 1], [0, 0, 1, 1]], dtype=bool), "whole": whole}) == 1
    assert damage_onset({"domino": np.ones((3, 4), dtype=bool), "whole": ~whole}) is None
