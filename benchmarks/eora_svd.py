"""EoRA's randomized truncated SVD against the exact SVD it replaces, on SmolLM2's real errors.

For every linear of blocks 0, 10 and 29, the RTN 2- and 4-bit error ``dW`` weighted by its input
covariance on model-made calibration tokens: the time of each SVD, and the weighted error each
leaves (randomized / exact, the documented bound is 1 + RANDOMIZED_TOLERANCE).
"""

from __future__ import annotations

import time

import torch

from quantdiag.model.load import load_reference
from quantdiag.quant.calib import load_calibration
from quantdiag.quant.eora import RANDOMIZED_TOLERANCE, _eigenbasis, _truncated_svd
from quantdiag.quant.rtn import rtn_dequantized
from quantdiag.quant.spec import QuantSpec

BLOCKS = (0, 10, 29)
RANK = 32


def covariances(loaded, names: list[str]) -> dict[str, torch.Tensor]:
    """``X^T X`` (float64) of each linear's inputs on the calibration tokens."""
    modules, sums = dict(loaded.model.named_modules()), dict.fromkeys(names, 0)

    def hook(name):
        def accumulate(_module, args):
            rows = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums[name] + rows.T @ rows

        return accumulate

    handles = [modules[name].register_forward_pre_hook(hook(name)) for name in names]
    with torch.inference_mode():
        loaded.model(load_calibration(loaded, None, 16, 256, 0).ids)
    for handle in handles:
        handle.remove()
    return sums


def timed(action):
    start = time.perf_counter()
    result = action()
    return result, time.perf_counter() - start


def main() -> None:
    torch.set_num_threads(2)
    loaded = load_reference("smollm2", "cpu", "float32", False)
    names = [loaded.adapter.linear_name(block, kind) for block in BLOCKS for kind, _ in loaded.adapter.arch.linears]
    weights = {name: module.weight.detach() for name, module in loaded.model.named_modules() if name in names}
    covariance = covariances(loaded, names)
    exact_s = randomized_s = worst = 0.0
    for bits in (2, 4):
        for name in names:
            spec = QuantSpec("rtn", bits)
            weight = weights[name]
            delta = (weight - rtn_dequantized(weight, bits, spec.group_for(weight.shape[1]))).float()
            scale, basis = _eigenbasis(covariance[name])
            target = delta @ basis * scale
            (_, singular, _), seconds = timed(lambda target=target: torch.linalg.svd(target, full_matrices=False))
            exact_s += seconds
            (u, s, v), seconds = timed(lambda target=target: _truncated_svd(target, RANK))
            randomized_s += seconds
            ratio = (target - (u * s) @ v.T).norm().item() / singular[RANK:].pow(2).sum().sqrt().item()
            worst = max(worst, ratio)
    print(f"{2 * len(names)} matrices, rank {RANK}: exact SVD {exact_s:.1f} s, randomized {randomized_s:.1f} s")
    print(f"speed-up {exact_s / randomized_s:.1f}x; worst error ratio {worst:.5f} (bound {1 + RANDOMIZED_TOLERANCE})")


if __name__ == "__main__":
    main()
