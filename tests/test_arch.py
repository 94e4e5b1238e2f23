import pytest
import torch
import torch.nn.functional as F
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


def _rms_norm(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Gemma2's RMSNorm by hand: ``x / rms(x) * (1 + w)``."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + module.eps) * (1 + module.weight)


#: Each family's MLP activation (Gemma2: GeGLU with tanh GELU; the others: SwiGLU).
_ACT = {"gemma2": lambda g: F.gelu(g, approximate="tanh")}


def test_mlp_sites_hold_the_gate_the_intermediate_and_the_output(family_model):
    """gate_pre == W_gate x, act == act(gate_pre) * W_up x and mlp_out == W_down act (Gemma2: after
    its post-feedforward norm), from the HF modules' weights and the MLP's input captured by a hook."""
    adapter, family = family_model.adapter, family_model.model.config.model_type
    layer = adapter.n_layers - 1
    block = adapter.blocks[layer]
    inputs = {}
    handle = block.mlp.register_forward_pre_hook(lambda _module, args: inputs.update(x=args[0]))
    sites = [f"blocks.{layer}.{s}" for s in ("mlp.gate_pre", "mlp.act", "mlp_out")]
    try:
        with capture(adapter, sites) as acts:
            family_model.model(torch.tensor([[1, 2, 3, 4]]))
    finally:
        handle.remove()
    gate, act, out = (acts[site] for site in sites)
    torch.testing.assert_close(gate, F.linear(inputs["x"], block.mlp.gate_proj.weight))
    expected = _ACT.get(family, F.silu)(gate) * F.linear(inputs["x"], block.mlp.up_proj.weight)
    torch.testing.assert_close(act, expected)
    down = F.linear(act, block.mlp.down_proj.weight)
    torch.testing.assert_close(out, _rms_norm(block.post_feedforward_layernorm, down) if family == "gemma2" else down)


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
