"""EoRA (docs/methods.md, Repairs): a training-free rank-r compensation of each linear's quantization error,
``W_q + B A``, fitted where the calibration activations live: the error is projected into the
eigenspace of the input covariance ``C = X^T X`` before its truncated SVD, so the rank is spent
on the directions the inputs use.

Covariances come from the reference model, block by block on the calibration set (as GPTQ's
Hessians do); every requested setting is compensated in the same pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from quantdiag.model.arch import Adapter
from quantdiag.model.stack import BlockInputs, run_block_batches
from quantdiag.quant.spec import Setting

#: Eigenvalues below this share of the largest are floored (directions the inputs never use).
_FLOOR = 1e-7
#: The truncated SVD is randomized (Halko et al. 2011, ``torch.svd_lowrank``) with this many extra
#: columns and power iterations, seeded: its weighted error stays within ``RANDOMIZED_TOLERANCE``
#: of the exact SVD's (docs/methods.md, Repairs; measured at most 0.19% on SmolLM2's RTN 2- and
#: 4-bit errors), at a fraction of its cost. Matrices too small for it get the exact SVD.
OVERSAMPLE = 16
POWER_ITERATIONS = 4
RANDOMIZED_TOLERANCE = 0.005


def eora_factors(delta: torch.Tensor, covariance: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``B`` (out x r) and ``A`` (r x in) such that ``B A`` is the rank-r approximation of the
    error ``delta`` that is best on inputs with second moment ``covariance``:
    ``C = Q diag(lam) Q^T``, ``U_r S_r V_r^T = svd_r(delta Q diag(sqrt(lam)))``, ``B = U_r S_r``,
    ``A = V_r^T diag(1/sqrt(lam)) Q^T`` (float32: LAPACK's float64 SVD is many times slower on
    a CPU and rank-r compensation needs no more precision)."""
    return _factors(delta, *_eigenbasis(covariance), rank)


def _eigenbasis(covariance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``sqrt(lam)`` (floored) and ``Q`` of ``covariance``: shared by every setting's error."""
    normalised = covariance / covariance.diagonal().mean().clamp_min(1e-30)  # scale-free, well inside float32's range
    eigenvalues, basis = torch.linalg.eigh(normalised.float())
    return eigenvalues.clamp_min(_FLOOR * eigenvalues.max().clamp_min(1e-30)).sqrt(), basis


def _factors(
    delta: torch.Tensor, scale: torch.Tensor, basis: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    u, s, v = _truncated_svd(delta.float() @ basis * scale, rank)
    return u * s, (v.T / scale) @ basis.T


def _truncated_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``U_r, S_r, V_r`` of ``matrix``: randomized (seeded, the caller's random state untouched)
    unless ``rank + OVERSAMPLE`` reaches its smaller side."""
    if rank + OVERSAMPLE >= min(matrix.shape):
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank].T
    on_gpu = matrix.is_cuda
    generator = torch.cuda.default_generators[matrix.device.index] if on_gpu else torch.random.default_generator
    with torch.random.fork_rng(devices=[matrix.device] if on_gpu else []):
        generator.manual_seed(0)
        u, s, v = torch.svd_lowrank(matrix, q=rank + OVERSAMPLE, niter=POWER_ITERATIONS)
    return u[:, :rank], s[:rank], v[:, :rank]


@torch.no_grad()
def eora_blocks(
    adapter: Adapter,
    inputs: BlockInputs,
    settings: Sequence[Setting],
    rank: int,
    quantized: Callable[[Setting, str], torch.Tensor],
) -> Iterator[dict[Setting, dict[str, torch.Tensor]]]:
    """Per setting, the compensated weight ``W_q + B A`` (CPU, model dtype) of each linear of a
    block, yielded a block at a time, from the covariances of the calibration ``inputs``. The
    model must hold the reference weights; ``quantized(setting, name)`` gives ``W_q``."""
    hidden, kwargs = inputs.hidden, inputs.kwargs
    for layer, block in enumerate(tqdm(adapter.blocks, desc=f"EoRA rank {rank}", unit="block")):
        out: dict[Setting, dict[str, torch.Tensor]] = {setting: {} for setting in settings}
        linears = {path: block.get_submodule(path) for _, path in adapter.arch.linears}
        # The true-sequential groups (q/k/v, o, gate/up, down) are the linears sharing an input.
        covariances = _input_covariances(
            block, hidden, kwargs[layer], {group: linears[group[0]] for group in adapter.arch.sequential}
        )
        for group, covariance in covariances.items():
            scale, basis = _eigenbasis(covariance)
            for path in group:
                name, linear = adapter.linear_name(layer, path), linears[path]
                for setting in settings:
                    weight = quantized(setting, name).to(linear.weight.device, torch.float32)
                    b, a = _factors(linear.weight.float() - weight, scale, basis, rank)
                    out[setting][name] = (weight + b @ a).to(linear.weight.dtype).cpu()
        hidden = run_block_batches(block, hidden, kwargs[layer])
        yield out


def _input_covariances(block: nn.Module, hidden: list[torch.Tensor], kwargs: list[dict], linears: dict) -> dict:
    """``X^T X`` (float64) of each given linear's inputs over every calibration batch."""
    sums = {
        key: torch.zeros(m.in_features, m.in_features, dtype=torch.float64, device=m.weight.device)
        for key, m in linears.items()
    }

    def accumulate(key):
        def hook(_module, args):
            rows = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[key] += rows.T @ rows

        return hook

    handles = [module.register_forward_pre_hook(accumulate(key)) for key, module in linears.items()]
    try:
        run_block_batches(block, hidden, kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return sums
