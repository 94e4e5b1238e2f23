"""Repairs (METHODS 7): excess kurtosis, m, and every row of the repair table on a tiny model
against its plan built by hand, applied through the WeightBank and scored by a plain forward loop."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import torch

from quantdiag.analysis.amplify import dev_test_split
from quantdiag.analysis.forward import score_prompts
from quantdiag.analysis.repairs import (
    RepairOptions,
    excess_kurtosis,
    kurtosis_plan,
    protected_blocks,
    repair_arrays,
    repair_reads,
    repair_summary,
)
from quantdiag.config import TRIED_REPAIRS
from quantdiag.data.facts import Prompt, load_pararel, tokenize
from quantdiag.model.load import LoadedModel
from quantdiag.quant.bank import WeightBank
from quantdiag.quant.calib import Calibration
from quantdiag.quant.spec import REFERENCE, Compensated, PrecisionPlan, QuantSpec, Rule, Setting, compensated
from test_amplify import confident, hand_amplified

LOW, EIGHT = QuantSpec("rtn", 3, 32, True), QuantSpec("rtn", 8, 32, True)
#: EoRA rank, kurtosis budget, alphas and split seed where, on this tiny model, the rows tell the
#: plans apart and the dev split, the test split and all Failure prompts do not all prefer one alpha.
RANK, BUDGET, ALPHAS, SEED = 8, 3.5, (0.0, 0.5, 2.0), 3


@pytest.fixture
def setup(llama):
    confident(llama)
    tokens = torch.randint(1, 500, (4, 32), generator=torch.Generator().manual_seed(0))
    calibration = Calibration(tokens, "random tokens")
    bank = WeightBank(llama, calibration)
    for spec in (LOW, EIGHT):
        bank.ensure(spec)
    facts = load_pararel(["P19", "P36", "P37", "P103"], 6, 0)
    prompts = [tokenize(llama.tokenizer, fact, i) for i, fact in enumerate(facts)]
    answers = score_prompts(llama, prompts, 4).predicted  # the reference's own answers: it scores 100%
    return bank, [dataclasses.replace(p, target=int(a)) for p, a in zip(prompts, answers)]


def _layer(name: str) -> int:
    return int(re.search(r"\.layers\.(\d+)\.", name).group(1))


def _plan(assignment: dict[str, str]) -> PrecisionPlan:
    """A plan naming every linear's setting: nothing of quantdiag's plan builders is used."""
    rules = (Rule(setting, pattern=f"^{re.escape(name)}$") for name, setting in assignment.items())
    return PrecisionPlan(REFERENCE, tuple(rules))


def _bits(bank: WeightBank, assignment: dict[str, Setting]) -> float:
    """Parameter-weighted mean bits: 3 or 8 a weight, plus 16 a factor number for rank-r EoRA."""
    nominal = {LOW: 3, EIGHT: 8}
    weights = bits = 0.0
    for name, setting in assignment.items():
        out_features, in_features = bank.modules[name].weight.shape
        corrected = isinstance(setting, Compensated)
        weights += out_features * in_features
        bits += nominal[setting.base if corrected else setting] * out_features * in_features
        bits += 16 * RANK * (out_features + in_features) if corrected else 0
    return bits / weights


def _kurtosis(weight: np.ndarray) -> float:
    centred = weight - weight.mean()
    return float(np.mean(centred**4) / np.mean(centred**2) ** 2 - 3)


def _hand_plans(bank: WeightBank, weights: dict[str, np.ndarray], blocks: int) -> dict[str, dict[str, str]]:
    """Each repair's setting per linear, from the definitions (METHODS 7)."""
    names = list(bank.modules)
    low, eight = LOW, EIGHT
    early = {name: eight if _layer(name) < blocks else low for name in names}
    kurtosis = dict.fromkeys(names, low)
    for name in sorted(names, key=lambda n: _kurtosis(weights[n]), reverse=True):
        if _bits(bank, kurtosis | {name: eight}) > BUDGET:
            break
        kurtosis[name] = eight
    return {
        "baseline": dict.fromkeys(names, low),
        "eora": dict.fromkeys(names, compensated(low, RANK)),
        "early": early,
        "kurtosis": kurtosis,
        "early+amplify": early,
        "early+eora": {name: compensated(setting, RANK) for name, setting in early.items()},
    }


@torch.inference_mode()
def _plain_correct(model: torch.nn.Module, prompts: list[Prompt]) -> np.ndarray:
    """One unbatched forward a prompt: is the greedy next token the target?"""
    return np.array([int(model(input_ids=torch.tensor([p.ids])).logits[0, -1].argmax()) == p.target for p in prompts])


def test_excess_kurtosis_and_protected_blocks():
    """(0, 0, 0, 1): m2 = 3/16, m4 = 21/256, m4 / m2^2 - 3 = -2/3; (1, -1, 1, -1): -2."""
    assert excess_kurtosis(torch.tensor([[0.0, 0.0], [0.0, 1.0]])) == pytest.approx(-2 / 3)
    assert excess_kurtosis(torch.tensor([[1.0, -1.0], [1.0, -1.0]])) == pytest.approx(-2.0)
    assert protected_blocks(32, None, None) == 2 and protected_blocks(30, None, None) == 2
    assert protected_blocks(32, 0, None) == 1 and protected_blocks(32, 20, None) == 4
    assert protected_blocks(32, 20, 7) == 7


def test_kurtosis_protection_stops_at_the_first_linear_over_the_budget(llama):
    """Outliers make layer 1's k_proj (2048 weights) the heaviest tail, layer 0's gate_proj (8192)
    the next and layer 2's v_proj (2048) the third. At 4-bit with a budget of 4.2 bits, k fits
    (4 + 4 * 2048 / 147456 = 4.056), the gate does not (4.278): protection stops there, and v,
    which would fit, stays at 4-bit."""
    heavy = {
        "model.layers.1.self_attn.k_proj": 60.0,
        "model.layers.0.mlp.gate_proj": 50.0,
        "model.layers.2.self_attn.v_proj": 30.0,
    }
    modules = dict(llama.model.named_modules())
    for name, size in heavy.items():
        weight = modules[name].weight
        weight[0, 0] = size * weight.std()
    bank = WeightBank(llama)
    four = QuantSpec("rtn", 4, 32, True)
    bank.ensure(four)
    ranked = sorted(bank.modules, key=lambda n: _kurtosis(bank.modules[n].weight.double().numpy()), reverse=True)
    assert ranked[:3] == list(heavy)
    plan = kurtosis_plan(bank, four, EIGHT, budget=4.2)
    protected = {name for name, setting in bank.assignment(plan).items() if setting != four}
    assert protected == {"model.layers.1.self_attn.k_proj"}


def _crafted(loaded: LoadedModel, failure: list[Prompt], dev: np.ndarray) -> tuple[list[Prompt], np.ndarray]:
    """Failure prompts whose targets are the hand-amplified answers (model as it is) at alpha 0.5 on
    dev and at alpha 2 elsewhere: dev prefers 0.5, test 2. Also the amplified answers (alphas x
    prompts)."""
    amplified, _ = hand_amplified(loaded, failure, ALPHAS)
    targets = np.where(np.isin(np.arange(len(failure)), dev), amplified[1], amplified[2])
    return [dataclasses.replace(p, target=int(t)) for p, t in zip(failure, targets)], amplified


def _row_by_hand(
    loaded: LoadedModel, name: str, tested: list[Prompt], robust: list[Prompt], alpha: float
) -> tuple[np.ndarray, np.ndarray]:
    """Correctness on ``tested`` and ``robust`` of the model as it is: a plain loop, or for the
    amplified row the hand lens computation with ``alpha``."""
    if name != "early+amplify":
        return _plain_correct(loaded.model, tested), _plain_correct(loaded.model, robust)
    answers = (hand_amplified(loaded, group, [alpha])[0][0] for group in (tested, robust))
    return tuple(a == [p.target for p in group] for a, group in zip(answers, (tested, robust)))


def test_repair_table_rows_equal_their_plans_scored_by_hand(llama, setup):
    """Every row (per prompt, accuracy, bits) equals its hand-built plan applied through the bank and
    scored by hand on exactly the test split and the Robust prompts; alpha is chosen on dev alone."""
    bank, prompts = setup
    weights = {name: module.weight.double().numpy().copy() for name, module in bank.modules.items()}
    bank.ensure_eora([LOW, EIGHT], rank=RANK)
    dev, test = dev_test_split(12, SEED)
    assert not set(dev) & set(test) and sorted([*dev, *test]) == list(range(12))
    plans = _hand_plans(bank, weights, blocks=1)
    bank.apply(_plan(plans["early"]))
    failure, amplified = _crafted(llama, prompts[:12], dev)
    robust = prompts[12:]
    targets = np.array([p.target for p in failure])
    dev_accuracy = (amplified[:, dev] == targets[dev]).mean(-1)
    alpha = ALPHAS[int(np.argmax(dev_accuracy))]
    test_accuracy = (amplified[:, test] == targets[test]).mean(-1)
    all_accuracy = (amplified == targets).mean(-1)
    assert alpha == 0.5 and ALPHAS[int(np.argmax(test_accuracy))] == ALPHAS[int(np.argmax(all_accuracy))] == 2.0

    options = RepairOptions(tried=TRIED_REPAIRS, blocks=None, budget=BUDGET, alphas=ALPHAS, rank=RANK, seed=SEED)
    arrays = repair_arrays(llama, bank, LOW, EIGHT, failure, robust, 1, options, 4)
    assert set(bank.current.values()) == {REFERENCE}
    summary = repair_summary(arrays)
    np.testing.assert_array_equal(arrays["test"], test)
    expected = {}
    for name, assignment in plans.items():
        bank.apply(_plan(assignment))
        tested, kept = _row_by_hand(llama, name, [failure[i] for i in test], robust, alpha)
        np.testing.assert_array_equal(arrays[f"{name}/failure"], tested, err_msg=name)
        np.testing.assert_array_equal(arrays[f"{name}/robust"], kept, err_msg=name)
        accuracy = {"failure": tested.mean(), "robust": kept.mean(), "average_bits": _bits(bank, assignment)}
        expected[name] = pytest.approx(accuracy, abs=1e-4)  # the table rounds to 6 and 4 decimals
    bank.apply(PrecisionPlan.uniform(REFERENCE))
    table = {row["repair"]: {k: v for k, v in row.items() if k != "repair"} for row in summary["rows"]}
    assert table == expected
    assert len({tuple(row.values())[1:] for row in summary["rows"]}) == 6  # no two rows alike: a mix-up shows
    assert (summary["alpha"], summary["test_prompts"], summary["blocks"]) == (alpha, 6, 1)
    np.testing.assert_allclose(summary["dev_accuracy"], dev_accuracy, atol=1e-6)
    early = dataclasses.replace(options, tried=("early",))  # the quick preset's one repair
    cheap = repair_summary(repair_arrays(llama, bank, LOW, EIGHT, failure, robust, 1, early, 4))
    assert [row["repair"] for row in cheap["rows"]] == ["baseline", "early"] and cheap["alpha"] is None
    assert {row["repair"]: row for row in cheap["rows"]}["early"] == {"repair": "early", **table["early"]}


def test_a_table_reads_only_what_its_repairs_use():
    """The stage key and the bank's work follow the tried repairs: early protection reads the
    protecting setting and no EoRA; EoRA alone reads no protecting setting."""
    options = RepairOptions(tried=("early",), blocks=None, budget=BUDGET, alphas=ALPHAS, rank=RANK, seed=SEED)
    assert repair_reads(LOW, EIGHT, options) == [LOW, EIGHT]
    assert repair_reads(LOW, EIGHT, dataclasses.replace(options, tried=("eora",))) == [LOW, compensated(LOW, RANK)]
    every = dataclasses.replace(options, tried=TRIED_REPAIRS)
    assert repair_reads(LOW, EIGHT, every) == [LOW, EIGHT, compensated(LOW, RANK), compensated(EIGHT, RANK)]
