"""GPTQ (quant/gptq.py) against GPTQModel's own solver run directly on one linear, on the inputs
that linear sees when every linear before it is quantized (block-by-block, true-sequential)."""

from __future__ import annotations

import copy
import os
from functools import cache

import pytest
import torch

from quantdiag.model.stack import calibration_inputs
from quantdiag.quant.gptq import gptq_blocks
from quantdiag.quant.spec import QuantSpec

from conftest import tiny_model

TARGET = "model.layers.1.mlp.down_proj"  # the last linear GPTQ reaches: its inputs pass through every other
GROUP, BATCH = 32, 4
IDS = torch.randint(1, 500, (8, 32), generator=torch.Generator().manual_seed(0))


@cache
def _run(bits: int, sym: bool) -> tuple[dict, dict, dict]:
    """A tiny model's weights before and after ``gptq_blocks``, and every block it yielded."""
    loaded = tiny_model("llama", layers=2)
    before = {name: p.detach().clone() for name, p in loaded.model.named_parameters()}
    inputs = calibration_inputs(loaded.adapter, IDS, BATCH)
    result = {
        name: w
        for block in gptq_blocks(loaded.adapter, inputs, QuantSpec("gptq", bits, GROUP, sym))
        for name, w in block.items()
    }
    after = {name: p.detach().clone() for name, p in loaded.model.named_parameters()}
    return before, after, result


@cache
def _gptqmodel_target(bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQModel's solver on TARGET alone, fed the target's inputs captured by a hook on the model
    holding every other linear's GPTQ weights (the same batches): Q and per-column scale, zero."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # GPTQModel refuses to start on a small box without it
    from gptqmodel import QuantizeConfig
    from gptqmodel.quantization.gptq import GPTQ

    _, _, result = _run(bits, sym)
    loaded = tiny_model("llama", layers=2)
    modules = dict(loaded.model.named_modules())
    config = QuantizeConfig(bits=bits, group_size=GROUP, sym=sym, desc_act=False, offload_to_disk=False)
    solver = GPTQ(copy.deepcopy(modules[TARGET]), config)
    solver.quantizer.configure(perchannel=True)
    with torch.no_grad():
        for name, weight in result.items():
            if name != TARGET:
                modules[name].weight.copy_(weight)
        handle = modules[TARGET].register_forward_hook(lambda _m, args, out: solver.add_batch(args[0], out))
        for start in range(0, len(IDS), BATCH):
            loaded.model(IDS[start : start + BATCH])
        handle.remove()
    q, scale, zero, group_index, *_ = solver.quantize()
    return q, scale[:, group_index], zero[:, group_index]


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("bits", [4, 2])
def test_gptq_equals_gptqmodels_solver_on_the_last_linear(bits, sym):
    expected, _, _ = _gptqmodel_target(bits, sym)
    torch.testing.assert_close(_run(bits, sym)[2][TARGET], expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("bits", [4, 2])
def test_gptq_weights_lie_on_their_groups_grid(bits, sym):
    """Every value is scale * (q - zero) for an integer q in [0, 2^bits - 1], with the scale and zero
    GPTQModel's solver found for its group; so each group of each row holds at most 2^bits values."""
    _, scale, zero = _gptqmodel_target(bits, sym)
    weight = _run(bits, sym)[2][TARGET]
    levels = torch.round(weight / scale + zero).clamp(0, 2**bits - 1)
    torch.testing.assert_close(weight, scale * (levels - zero), rtol=0, atol=1e-6)
    groups = weight.reshape(-1, GROUP)
    assert max(len(torch.unique(group)) for group in groups) <= 2**bits


def test_gptq_returns_every_linear_and_leaves_the_model_unchanged():
    before, after, result = _run(4, True)
    assert set(result) == set(tiny_model("llama", layers=2).adapter.linear_names())
    for name, tensor in after.items():
        assert torch.equal(tensor, before[name]), name
