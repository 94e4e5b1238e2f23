"""The cost model's counts against the models themselves: a block's linear weights as built by
transformers, and the operations of a stage worked out by hand on a small shape."""

from __future__ import annotations

import pytest
import torch

from quantdiag.analysis.robustness import ANSWER_TOKENS
from quantdiag.cost_model import ModelShape, RunSizes, stage_flops

from conftest import FAMILIES, tiny_model


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_block_params_are_the_blocks_linear_weights(family):
    """Every linear of block 0 as transformers builds it; of routed experts only the active ones
    (``num_experts_per_tok`` of ``num_experts``) run for a token."""
    loaded = tiny_model(family, layers=2)
    config = loaded.model.config
    shape = ModelShape.from_config(config)
    linears = {
        name: m.weight.numel() for name, m in loaded.adapter.blocks[0].named_modules() if isinstance(m, torch.nn.Linear)
    }
    experts = sum(size for name, size in linears.items() if ".experts." in name)
    active = experts * getattr(config, "num_experts_per_tok", 0) / (getattr(config, "num_experts", 0) or 1)
    assert shape.block_params == sum(linears.values()) - experts + active
    assert (shape.layers, shape.hidden, shape.vocab) == (2, 64, 512)


def test_eval_and_causal_operations_by_hand():
    shape = ModelShape(layers=2, hidden=4, intermediate=8, block_params=100, vocab=10)
    run = RunSizes(
        facts=3,
        robustness=2,
        tokens=4,
        settings=1,
        gptq=0,
        calibration_tokens=0,
        causal=1,
        patch_prompts=1,
        subsets=2,
        streams=1,
        subset_prompts=0,
        sensitivity=0,
        repairs=0,
    )
    flops = stage_flops(shape, run)
    forward = 4 * 2 * 200 + 80  # 4 tokens x 2 blocks x 2 x 100 weights, one position unembedded (2 x 4 x 10)
    lens = 2 * 80
    answer = forward + ANSWER_TOKENS * (2 * 200 + 80)  # each answer token: 2 blocks and the head, one position
    assert flops["eval"] == 2 * (3 * (forward + lens) + 2 * answer)
    # per prompt and stream: a patch at layer l reruns blocks l+1.. (1 block for l = 0, none for l = 1) on
    # tokens t.. (4 + 3 + 2 + 1 tokens), and each of the 2 x 4 patches unembeds one position
    patched = 1 * 10 * 200 + 2 * 4 * 80
    assert flops["causal"] == (2 * 1 + 1) * 2 * patched
