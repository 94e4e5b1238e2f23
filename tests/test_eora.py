"""EoRA (METHODS 7): the factors reach the Eckart-Young optimum of the covariance-weighted error, the
bank stores W_q + B A for each linear's own inputs, and compensated settings' keys and plans."""

from __future__ import annotations

import pytest
import torch

from quantdiag.quant.bank import WeightBank
from quantdiag.quant.calib import Calibration
from quantdiag.quant.eora import RANDOMIZED_TOLERANCE, eora_factors
from quantdiag.quant.rtn import rtn_dequantized
from quantdiag.quant.spec import REFERENCE, PrecisionPlan, QuantSpec, Rule, average_bits, compensated

from conftest import tiny_model

TWO = QuantSpec("rtn", 2, 32, True)


def _weighted_error(error: torch.Tensor, covariance: torch.Tensor) -> torch.Tensor:
    """sqrt(tr(E C E^T)): the output error's norm over inputs with second moment C."""
    return torch.trace(error @ covariance @ error.T).sqrt()


def _best_fit(delta: torch.Tensor, covariance: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Eckart-Young with C = L L^T (Cholesky, float64): the best rank-r M minimises ||(delta - M) L||_F, so
    M = svd_r(delta L) L^-1, and the error left is the root of the squared singular values beyond r."""
    lower = torch.linalg.cholesky(covariance)
    u, s, vh = torch.linalg.svd(delta @ lower, full_matrices=False)
    fit = torch.linalg.solve_triangular(lower, (u[:, :rank] * s[:rank]) @ vh[:rank], upper=False, left=False)
    return fit, s[rank:].pow(2).sum().sqrt()


@pytest.mark.parametrize("rank", [1, 3, 5])
@pytest.mark.parametrize(("rows", "cols", "seed"), [(12, 8, 0), (6, 10, 1)])
def test_eora_reaches_the_eckart_young_optimum(rows, cols, seed, rank):
    """A random rotation of eigenvalues over six decades: ill-conditioned, far from the identity."""
    generator = torch.Generator().manual_seed(seed)
    rotation, _ = torch.linalg.qr(torch.randn(cols, cols, generator=generator, dtype=torch.float64))
    covariance = (rotation * torch.logspace(-3, 3, cols, dtype=torch.float64)) @ rotation.T
    delta = torch.randn(rows, cols, generator=generator, dtype=torch.float64)
    b, a = eora_factors(delta, covariance, rank)
    error = _weighted_error(delta - b.double() @ a.double(), covariance)
    assert error.item() == pytest.approx(_best_fit(delta, covariance, rank)[1].item(), rel=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_the_randomized_svd_stays_within_its_tolerance_of_the_optimum(seed):
    """A 192 x 128 RTN 2-bit error (nearly white) under a covariance over two decades: a slowly
    decaying weighted spectrum, the hard case for a randomized SVD; rank 16 + 16 < 128, so it is
    randomized. The error left must be within RANDOMIZED_TOLERANCE above the Eckart-Young optimum,
    and the caller's random state must be as it was."""
    generator = torch.Generator().manual_seed(seed)
    rotation, _ = torch.linalg.qr(torch.randn(128, 128, generator=generator, dtype=torch.float64))
    covariance = (rotation * torch.logspace(-1, 1, 128, dtype=torch.float64)) @ rotation.T
    weight = torch.randn(192, 128, generator=generator)
    delta = (weight - rtn_dequantized(weight, 2, 32)).double()
    state = torch.random.get_rng_state()
    b, a = eora_factors(delta, covariance, 16)
    assert torch.equal(torch.random.get_rng_state(), state)
    optimum = _best_fit(delta, covariance, 16)[1].item()
    error = _weighted_error(delta - b.double() @ a.double(), covariance).item()
    assert optimum * (1 - 1e-6) <= error <= optimum * (1 + RANDOMIZED_TOLERANCE)


def test_eora_keys_plans_and_average_bits():
    corrected = compensated(TWO, 32)
    assert corrected.key == "rtn-w2-g32-sym+eora32" and corrected.bits == 2 and corrected.reads_calibration
    assert compensated(REFERENCE, 32) == REFERENCE
    plan = PrecisionPlan(TWO, (Rule(REFERENCE, layers=(0, 1)),)).compensated(32)
    assert plan.default == corrected and plan.rules[0].setting == REFERENCE
    shapes = {"a": (64, 64)}
    assert average_bits({"a": corrected}, shapes) == pytest.approx(2 + 16 * 32 * 128 / 64**2)


def test_the_bank_stores_w_q_plus_the_best_fit_on_each_linears_calibration_inputs():
    """Each linear's inputs on the calibration tokens come from a hook on the reference model; the bank's
    compensated weight must be rtn's W_q plus the Eckart-Young fit of W - W_q under their covariance."""
    loaded = tiny_model("llama", layers=2)
    ids = torch.randint(1, 500, (8, 32), generator=torch.Generator().manual_seed(0))
    calibration = Calibration(ids, "random tokens")
    modules = dict(loaded.model.named_modules())
    names = loaded.adapter.linear_names()
    covariances = dict.fromkeys(names, 0)

    def accumulate(name):
        def hook(_module, args):
            rows = args[0].reshape(-1, args[0].shape[-1]).double()
            covariances[name] = covariances[name] + rows.T @ rows

        return hook

    handles = [modules[name].register_forward_pre_hook(accumulate(name)) for name in names]
    loaded.model(calibration.ids)
    for handle in handles:
        handle.remove()
    reference = {name: modules[name].weight.detach().clone() for name in names}
    bank = WeightBank(loaded, calibration)
    bank.ensure(TWO)
    bank.ensure_eora([TWO], rank=8)
    key = compensated(TWO, 8)
    assert bank.path(key).name.endswith(f"calib{calibration.digest}")
    bank.apply(PrecisionPlan.uniform(key))
    for name in names:
        quantized = rtn_dequantized(reference[name], TWO.bits, TWO.group_size).double()
        delta = reference[name].double() - quantized
        left = _weighted_error(delta - (modules[name].weight.double() - quantized), covariances[name]).item()
        optimum = _best_fit(delta, covariances[name], 8)[1].item()
        assert optimum * (1 - 1e-5) <= left <= optimum * (1 + RANDOMIZED_TOLERANCE), name
