"""The patching engine on tiny random models of every family: the METHODS 3 invariants, and
equality with the naive loop (one forward per patch)."""

from __future__ import annotations

import pytest
import torch

from quantdiag.analysis.patching import (
    MAX_TOKENS,
    Sweep,
    _chunks,
    naive_sweep_probs,
    suffix_kwargs,
    sweep_probs,
    trace,
)
from quantdiag.model.probes import replace
from quantdiag.model.stack import run_block, trace_stack

LENGTH = 6


def _inputs(loaded):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 500, (3, LENGTH), generator=generator)
    return ids, torch.randint(0, 512, (3,), generator=generator)


def _quantize_roughly(loaded) -> None:
    """Stand-in for a quantized model: every block linear perturbed in place."""
    generator = torch.Generator().manual_seed(2)
    for name in loaded.adapter.linear_names():
        weight = loaded.model.get_submodule(name).weight
        weight.add_(0.1 * weight.std() * torch.randn(weight.shape, generator=generator))


@pytest.fixture
def pair(family_model):
    """(adapter, ids, targets, reference trace, compared trace, one-row kwargs); the model is
    left as the compared model."""
    adapter = family_model.adapter
    ids, targets = _inputs(family_model)
    reference = trace(adapter, ids, targets)
    _quantize_roughly(family_model)
    compared = trace(adapter, ids, targets)
    kwargs = trace_stack(adapter, ids[:1], all_states=False).kwargs
    return adapter, ids, targets, reference, compared, kwargs


SWEEPS = [Sweep("resid"), Sweep("mlp"), Sweep("attn"), Sweep("mlp", window=3)]


@pytest.mark.parametrize("sweep", SWEEPS, ids=lambda s: f"{s.kind}-w{s.window}")
def test_engine_equals_naive_loop(pair, sweep):
    adapter, ids, targets, reference, compared, kwargs = pair
    for values in (reference.values(sweep.kind), compared.ablation_values(sweep.kind)):
        engine = sweep_probs(adapter, compared, kwargs, targets, sweep, values)
        naive = naive_sweep_probs(adapter, ids, targets, sweep, values)
        assert (engine - naive).abs().max() < 1e-4
        # the interventions do something, so equality is not trivial
        assert (engine - compared.prob[:, None, None]).abs().max() > 1e-6


def test_every_family_reuses_the_clean_keys_and_values_before_the_patched_token(pair):
    """Each token's patches run from that token on (one block call per token): the engine's
    speed-up applies to every family, not only where the naive-loop equality is checked."""
    adapter, _, _, _, compared, kwargs = pair
    starts = [start for _, _, start in _chunks(adapter, compared, kwargs, MAX_TOKENS)]
    assert starts == list(range(LENGTH))
    assert [start for _, _, start in _chunks(adapter, compared, kwargs, MAX_TOKENS, reuse=False)] == [0]


def test_block_arguments_it_cannot_slice_run_over_all_tokens():
    rotary = (torch.ones(1, 5, 4), torch.zeros(1, 5, 4))
    kwargs = {"attention_mask": None, "position_embeddings": rotary, "position_ids": torch.arange(5)[None]}
    sliced = suffix_kwargs(kwargs, 2, 5, "sdpa")
    expected_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(sliced["attention_mask"][0, 0], expected_mask)
    assert sliced["position_embeddings"][0].shape == (1, 3, 4) and sliced["position_ids"].tolist() == [[2, 3, 4]]
    assert suffix_kwargs(kwargs | {"token_type_ids": torch.zeros(1, 5)}, 2, 5, "sdpa") is None
    assert suffix_kwargs(kwargs, 2, 5, "eager") is None  # an eager forward always has its mask
    assert suffix_kwargs(kwargs, 2, 5, "flash_attention_2") is None


def test_reusing_keys_and_values_equals_running_every_token(pair):
    adapter, _, targets, reference, compared, kwargs = pair
    for sweep in (Sweep("resid"), Sweep("mlp", 3)):
        values = reference.values(sweep.kind)
        reused = sweep_probs(adapter, compared, kwargs, targets, sweep, values)
        every = sweep_probs(adapter, compared, kwargs, targets, sweep, values, reuse=False)
        torch.testing.assert_close(reused, every, atol=1e-6, rtol=1e-5)


def test_chunking_does_not_change_results(pair):
    adapter, _, targets, reference, compared, kwargs = pair
    whole = sweep_probs(adapter, compared, kwargs, targets, Sweep("attn", 3), reference.values("attn"))
    pieces = sweep_probs(adapter, compared, kwargs, targets, Sweep("attn", 3), reference.values("attn"), max_tokens=1)
    torch.testing.assert_close(whole, pieces)


@pytest.mark.parametrize("kind", ["resid", "mlp", "attn"])
def test_patching_the_reference_into_itself_changes_nothing(family_model, kind):
    adapter = family_model.adapter
    ids, targets = _inputs(family_model)
    reference = trace(adapter, ids, targets)
    kwargs = trace_stack(adapter, ids[:1], all_states=False).kwargs
    grid = sweep_probs(adapter, reference, kwargs, targets, Sweep(kind), reference.values(kind))
    torch.testing.assert_close(grid, reference.prob[:, None, None].expand_as(grid), atol=1e-6, rtol=1e-5)


def test_reference_last_layer_residual_gives_reference_logits(pair):
    adapter, ids, targets, reference, compared, kwargs = pair
    last = adapter.n_layers - 1
    with torch.no_grad():
        reference_logits = adapter.logits(reference.stack.states[-1])
        with replace(adapter, {f"blocks.{last}.resid_post": reference.stack.states[-1]}):
            patched_logits = adapter.model(input_ids=ids).logits
    torch.testing.assert_close(patched_logits, reference_logits, atol=1e-5, rtol=1e-5)
    grid = sweep_probs(adapter, compared, kwargs, targets, Sweep("resid"), reference.values("resid"))
    torch.testing.assert_close(grid[:, last, -1], reference.prob, atol=1e-6, rtol=1e-5)


def test_ablating_nothing_is_the_identity(family_model):
    """Writing a model's own h_l back (no update removed) changes nothing, and so does resuming
    the blocks from the cached input of block 0; removing an update does change p."""
    adapter = family_model.adapter
    ids, targets = _inputs(family_model)
    own = trace(adapter, ids, targets)
    kwargs = trace_stack(adapter, ids[:1], all_states=False).kwargs
    nothing = sweep_probs(adapter, own, kwargs, targets, Sweep("resid"), own.values("resid"))
    torch.testing.assert_close(nothing, own.prob[:, None, None].expand_as(nothing), atol=1e-6, rtol=1e-5)
    hidden = own.stack.states[0]
    with torch.no_grad():
        for layer in range(adapter.n_layers):
            hidden = run_block(adapter.blocks[layer], hidden, kwargs[layer])
    torch.testing.assert_close(hidden, own.stack.states[-1], atol=1e-5, rtol=1e-5)
    ablated = sweep_probs(adapter, own, kwargs, targets, Sweep("resid"), own.ablation_values("resid"))
    assert (ablated - nothing).abs().max() > 1e-6


def test_sweep_windows_follow_rome():
    assert list(Sweep("mlp", 3).layers(0, 4)) == [0, 1]
    assert list(Sweep("mlp", 3).layers(2, 4)) == [1, 2, 3]
    assert list(Sweep("attn", 4).layers(3, 4)) == [1, 2, 3]
    assert list(Sweep("resid", 5).layers(2, 4)) == [2]
    assert Sweep("resid").start(2, 4) == 3 and Sweep("mlp", 3).start(2, 4) == 1
