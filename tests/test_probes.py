import pytest
import torch

from quantdiag.model.probes import capture, replace, zero


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooks_are_removed_after_the_block(llama):
    before = _hook_count(llama.model)
    with capture(llama.adapter, ["blocks.0.resid_post", "blocks.1.mlp.act"]):
        assert _hook_count(llama.model) == before + 2
    assert _hook_count(llama.model) == before


def test_hooks_are_removed_on_error(llama):
    before = _hook_count(llama.model)
    with pytest.raises(RuntimeError), zero(llama.adapter, ["blocks.2.attn_out"]):
        raise RuntimeError("boom")
    assert _hook_count(llama.model) == before


def test_replacing_a_site_with_its_own_value_changes_nothing(llama):
    ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    with capture(llama.adapter, ["blocks.1.resid_post"]) as acts:
        clean = llama.model(ids).logits
    with replace(llama.adapter, {"blocks.1.resid_post": acts["blocks.1.resid_post"]}):
        patched = llama.model(ids).logits
    torch.testing.assert_close(patched, clean)


def test_zeroing_the_last_residual_gives_the_logits_of_a_zero_state(llama):
    ids = torch.tensor([[1, 2, 3]])
    last = llama.adapter.n_layers - 1
    with zero(llama.adapter, [f"blocks.{last}.resid_post"]):
        logits = llama.model(ids).logits
    expected = llama.adapter.logits(torch.zeros(1, 3, 64))
    torch.testing.assert_close(logits, expected)


def test_replacing_with_a_function_edits_the_stream(llama):
    ids = torch.tensor([[1, 2, 3]])
    clean = llama.model(ids).logits
    with replace(llama.adapter, {"blocks.0.mlp_out": lambda t: t * 0}):
        ablated = llama.model(ids).logits
    assert not torch.allclose(clean, ablated)
