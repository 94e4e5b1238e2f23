"""EoRA (METHODS 7): the factor formula, and compensated settings in the WeightBank."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantdiag.quant.bank import WeightBank
from quantdiag.quant.calib import Calibration
from quantdiag.quant.eora import eora_factors
from quantdiag.quant.spec import REFERENCE, PrecisionPlan, QuantSpec, Rule, average_bits, eora_key, split_eora

TWO = QuantSpec("rtn", 2, 32, True)


def test_full_rank_with_identity_covariance_recovers_the_error_exactly():
    delta = torch.randn(12, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    b, a = eora_factors(delta, torch.eye(9, dtype=torch.float64), rank=9)
    torch.testing.assert_close(b @ a, delta.float(), rtol=1e-4, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**16), st.integers(1, 5))
def test_eora_beats_plain_svd_on_the_activations_it_was_fitted_to(seed, rank):
    generator = torch.Generator().manual_seed(seed)
    delta = torch.randn(10, 8, generator=generator, dtype=torch.float64)
    inputs = torch.randn(50, 8, generator=generator, dtype=torch.float64) * torch.logspace(0, 2, 8, dtype=torch.float64)
    b, a = eora_factors(delta, inputs.T @ inputs, rank)
    u, s, vh = torch.linalg.svd(delta)
    plain = (u[:, :rank] * s[:rank]) @ vh[:rank]
    assert torch.linalg.norm((delta - b.double() @ a.double()) @ inputs.T) <= torch.linalg.norm((delta - plain) @ inputs.T) * (1 + 1e-4)


def test_eora_keys_plans_and_average_bits():
    key = eora_key(TWO.key, 32)
    assert split_eora(key) == (TWO.key, 32) and split_eora(TWO.key) == (TWO.key, 0)
    plan = PrecisionPlan(TWO.key, (Rule(REFERENCE, layers=(0, 1)),)).compensated(32)
    assert plan.default == key and plan.rules[0].setting == REFERENCE
    shapes = {"a": (64, 64)}
    assert average_bits({"a": key}, shapes) == pytest.approx(2 + 16 * 32 * 128 / 64**2)


def test_compensated_setting_is_closer_to_the_reference(llama):
    calibration = Calibration(torch.randint(1, 500, (4, 32), generator=torch.Generator().manual_seed(0)), "random tokens")
    bank = WeightBank(llama, calibration)
    bank.ensure(TWO)
    bank.ensure_eora([TWO.key], rank=8)
    key = eora_key(TWO.key, 8)
    assert bank.has(key) and bank.path(key).name.endswith(f"calib{calibration.digest}.safetensors")
    ids = calibration.ids[:2]
    outputs = {}
    for setting in (REFERENCE, TWO.key, key):
        bank.apply(PrecisionPlan.uniform(setting))
        outputs[setting] = llama.model(input_ids=ids).logits
    assert set(bank.current.values()) == {key}
    error = {s: torch.linalg.norm(outputs[s] - outputs[REFERENCE]) for s in (TWO.key, key)}
    assert error[key] < error[TWO.key]
