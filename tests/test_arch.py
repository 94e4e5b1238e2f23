import pytest
import torch
import transformers

from quantdiag.errors import QuantdiagError
from quantdiag.model.arch import Adapter
from quantdiag.model.probes import capture


def _sites(layer: int) -> list[str]:
    return [f"blocks.{layer}.{s}" for s in ("resid_post", "attn_out", "mlp_out", "mlp.gate_pre", "mlp.act")]


def test_block_update_is_attention_plus_mlp_output(family_model):
    """resid_post[l] - resid_post[l-1] == attn_out[l] + mlp_out[l]: the adapter points at the
    tensors that really enter the residual stream (Gemma2's post-norms included)."""
    adapter = family_model.adapter
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    sites = [s for layer in range(adapter.n_layers) for s in _sites(layer)]
    with capture(adapter, sites) as acts:
        family_model.model(ids)
    for layer in range(1, adapter.n_layers):
        update = acts[f"blocks.{layer}.resid_post"] - acts[f"blocks.{layer - 1}.resid_post"]
        torch.testing.assert_close(update, acts[f"blocks.{layer}.attn_out"] + acts[f"blocks.{layer}.mlp_out"])


def test_resid_post_matches_hidden_states(family_model):
    ids = torch.tensor([[3, 1, 4, 1, 5, 9]])
    out = family_model.model(ids, output_hidden_states=True)
    sites = [f"blocks.{layer}.resid_post" for layer in range(family_model.adapter.n_layers - 1)]
    with capture(family_model.adapter, sites) as acts:
        family_model.model(ids)
    for layer, site in enumerate(sites):
        torch.testing.assert_close(acts[site], out.hidden_states[layer + 1])


def test_mlp_sites_have_gate_and_intermediate_shapes(family_model):
    with capture(family_model.adapter, ["blocks.0.mlp.gate_pre", "blocks.0.mlp.act"]) as acts:
        family_model.model(torch.tensor([[1, 2, 3]]))
    assert acts["blocks.0.mlp.gate_pre"].shape == (1, 3, 128)
    assert acts["blocks.0.mlp.act"].shape == (1, 3, 128)


def test_attention_probabilities_under_eager_attention(family_model):
    family_model.model.config._attn_implementation = "eager"
    with capture(family_model.adapter, ["blocks.1.attn_probs"]) as acts:
        family_model.model(torch.tensor([[1, 2, 3, 4]]))
    probs = acts["blocks.1.attn_probs"]
    assert probs.shape == (1, 4, 4, 4)
    torch.testing.assert_close(probs.sum(-1), torch.ones(1, 4, 4))


def test_linear_names_round_trip(family_model):
    adapter = family_model.adapter
    names = adapter.linear_names()
    assert len(names) == adapter.n_layers * 7  # q, k, v, o, gate, up, down
    modules = dict(family_model.model.named_modules())
    for name in names:
        assert isinstance(modules[name], torch.nn.Linear)
        assert adapter.linear_name(*adapter.linear_kind(name)) == name


@pytest.mark.parametrize("site", ["blocks.99.resid_post", "blocks.0.nonsense", "resid_post"])
def test_unknown_site_is_a_clear_error(llama, site):
    with pytest.raises(QuantdiagError):
        llama.adapter.site(site)


def test_unsupported_architecture_is_a_clear_error():
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(QuantdiagError, match="not supported"):
        Adapter(model)
