"""GPTQ through GPTQModel's GPTQ solver, driven block by block on cached block inputs.

quantdiag keeps dequantized weights (the WeightBank swaps them into one model), so it uses
GPTQModel's per-layer solver (Hessian accumulation, error compensation, grid search) and skips its
packing and checkpoint writing. Blocks run in order on the calibration set: each block is
calibrated on the outputs of the already-quantized blocks before it, and within a block the
linears follow the adapter's true-sequential groups (q/k/v, o, gate/up, down), as GPTQModel does.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from quantdiag.model.arch import Adapter
from quantdiag.model.stack import BlockInputs, run_block_batches
from quantdiag.quant.spec import QuantSpec


class _StopForward(Exception):
    """Raised by a hook when the rest of a forward is not needed."""


@torch.no_grad()
def gptq_blocks(adapter: Adapter, inputs: BlockInputs, spec: QuantSpec) -> Iterator[dict[str, torch.Tensor]]:
    """GPTQ-quantize every block linear, calibrated on ``inputs`` (``stack.calibration_inputs``),
    and yield each block's dequantized weights (CPU, model dtype) as soon as it is done, so only
    one block's are held.

    At every yield, as after the last, the model holds its own weights.
    """
    solver_class, config_class = _gptqmodel()
    hidden, block_kwargs = inputs.hidden, inputs.kwargs
    for layer, block in enumerate(tqdm(adapter.blocks, desc=f"GPTQ {spec.bits}-bit", unit="block")):
        result: dict[str, torch.Tensor] = {}
        linears = {path: block.get_submodule(path) for _, path in adapter.arch.linears}
        originals = {path: module.weight.detach().clone() for path, module in linears.items()}
        for group in adapter.arch.sequential:
            solvers = {path: _solver(solver_class, config_class, linears[path], spec) for path in group}
            _feed(block, hidden, block_kwargs[layer], linears, solvers)
            for path, solver in solvers.items():
                quantized = solver.quantize()[0].to(linears[path].weight.dtype)
                linears[path].weight.copy_(quantized)
                result[adapter.linear_name(layer, path)] = quantized.cpu()
        hidden = run_block_batches(block, hidden, block_kwargs[layer])
        for path, weight in originals.items():
            linears[path].weight.copy_(weight)
        yield result


def _gptqmodel():
    """Import GPTQModel lazily: it is slow to import and refuses to start on a small CPU box
    unless told how many CPU workers to use."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(os.cpu_count() or 1))
    from gptqmodel import QuantizeConfig
    from gptqmodel.quantization.gptq import GPTQ

    return GPTQ, QuantizeConfig


def _solver(solver_class, config_class, linear: nn.Linear, spec: QuantSpec):
    group_size = spec.group_for(linear.in_features)
    config = config_class(bits=spec.bits, group_size=group_size, sym=spec.sym, desc_act=False, offload_to_disk=False)
    solver = solver_class(linear, config)
    solver.quantizer.configure(perchannel=True)
    return solver


def _feed(
    block: nn.Module, hidden: list[torch.Tensor], kwargs: list[dict], linears: dict[str, nn.Linear], solvers: dict
) -> None:
    """Run the block on every batch, sending each solver its linear's inputs; a forward stops as
    soon as every linear of the group has run (the rest of the block is not needed)."""
    fed: set[str] = set()

    def hook(path: str):
        def add(_module, args, out):
            solvers[path].add_batch(args[0], out)
            fed.add(path)
            if len(fed) == len(solvers):
                raise _StopForward

        return add

    handles = [linears[path].register_forward_hook(hook(path)) for path in solvers]
    try:
        for states, extra in zip(hidden, kwargs):
            fed.clear()
            try:
                block(states, **extra)
            except _StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()
