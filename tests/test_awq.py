"""AWQ (quant/awq.py) on tiny models: closer to the reference than RTN on the calibration text (the
method's promise), its scales those of AWQ's published search written out here as a plain loop on the
inputs the linear sees behind the already-quantized block, its weights on AWQ's grid once the scale is
multiplied back, and every analysis of a run on an AWQ setting."""

from __future__ import annotations

import json
from functools import cache

import pytest
import torch

from quantdiag.analysis.forward import score_prompts
from quantdiag.config import RunConfig
from quantdiag.data.facts import load_pararel, target_token, tokenize
from quantdiag.errors import QuantdiagError
from quantdiag.model.stack import calibration_inputs
from quantdiag.pipeline import run
from quantdiag.quant.awq import AwqBlock, _clipped, _processor, awq_blocks
from quantdiag.quant.rtn import rtn_dequantized
from quantdiag.quant.spec import QuantSpec

from conftest import FAMILIES, answer_in_words, save_model, tiny_model

GROUP, BATCH, BITS = 32, 4, 4
IDS = torch.randint(1, 500, (8, 32), generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def few_gptqmodel_workers(monkeypatch):
    monkeypatch.setenv("GPTQMODEL_CPU_WORKERS", "2")


@cache
def _awq(family: str = "llama"):
    """A tiny model's parameters before and after ``awq_blocks``, and its blocks joined into one."""
    loaded = tiny_model(family, layers=2)
    before = {name: p.detach().clone() for name, p in loaded.model.named_parameters()}
    inputs = calibration_inputs(loaded.adapter, IDS, BATCH)
    blocks = list(awq_blocks(loaded.adapter, inputs, QuantSpec("awq", BITS, GROUP)))
    weights = {name: weight for block in blocks for name, weight in block.weights.items()}
    scales = {name: scale for block in blocks for name, scale in block.scales.items()}
    after = {name: p.detach().clone() for name, p in loaded.model.named_parameters()}
    return before, after, AwqBlock(weights, scales)


def _logits_with(family: str, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """The tiny model's logits on the calibration tokens with ``weights`` loaded into its linears."""
    loaded = tiny_model(family, layers=2)
    modules = dict(loaded.model.named_modules())
    with torch.no_grad():
        for name, weight in weights.items():
            modules[name].weight.copy_(weight)
        return loaded.model(IDS).logits


DENSE = sorted(family for family in FAMILIES if family != "qwen3_moe")


def test_awq_refuses_routed_experts_with_one_line():
    with pytest.raises(QuantdiagError, match="routed experts"):
        _awq("qwen3_moe")


@pytest.mark.parametrize("family", DENSE)
def test_awq_is_closer_to_the_reference_than_rtn_on_the_calibration_text(family):
    """Mean squared logit error on the calibration tokens (measured here: AWQ 0.000191 against RTN's
    0.000231 on Llama; Gemma2 0.00124 against 0.00140)."""
    before, _, result = _awq(family)
    reference = _logits_with(family, {})
    rtn = {name: rtn_dequantized(before[f"{name}.weight"], BITS, GROUP) for name in result.weights}
    awq_error = (_logits_with(family, result.weights) - reference).pow(2).mean()
    rtn_error = (_logits_with(family, rtn) - reference).pow(2).mean()
    assert awq_error < rtn_error


def _awq_grid(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """AWQ's symmetric quantizer: per group, step max|w| / (2^(b-1) - 1), levels -2^(b-1)..2^(b-1) - 1."""
    groups = weight.reshape(-1, GROUP)
    step = groups.abs().amax(dim=1, keepdim=True).clamp(min=1e-5) / (2 ** (bits - 1) - 1)
    return (torch.clamp(torch.round(groups / step), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * step).reshape_as(weight)


def _published_search(weights: list[torch.Tensor], x: torch.Tensor, forward) -> torch.Tensor:
    """AWQ's scale search (Lin et al. 2024, with duo scaling): s = mean|x|^a / mean|w~|^(1-a) for a
    in 0, 1/20 .. 19/20, w~ each weight group divided by its max |w|, s normalised by sqrt(max s min s);
    the s whose Q(W s) / s gives ``forward`` the smallest mean squared error wins."""
    x_mean = x.abs().reshape(-1, x.shape[-1]).mean(dim=0)
    stacked = torch.cat(weights).abs()
    normalised = stacked.reshape(stacked.shape[0], -1, GROUP)
    w_mean = (normalised / (normalised.amax(dim=-1, keepdim=True) + 1e-6)).reshape_as(stacked).mean(dim=0)
    expected = forward(weights)
    losses, candidates = [], []
    for step in range(20):
        ratio = step / 20
        scale = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
        scale = scale / (scale.max() * scale.min()).sqrt()
        output = forward([_awq_grid(w * scale, BITS) / scale for w in weights])
        losses.append(float((output - expected).pow(2).mean()))
        candidates.append(scale)
    return candidates[min(range(20), key=losses.__getitem__)]


@pytest.mark.parametrize("kinds", [("down",), ("gate", "up")])
def test_awq_scales_are_the_published_search_on_the_inputs_behind_the_quantized_block(kinds):
    """Block 1's scales, searched on the inputs its linears see when block 0 holds AWQ weights:
    the MLP's output scores gate/up, down_proj's own output scores down."""
    _, _, result = _awq()
    loaded = tiny_model("llama", layers=2)
    mlp = loaded.model.model.layers[1].mlp
    seen = []
    first = mlp.get_submodule(f"{kinds[0]}_proj")
    handle = first.register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
    with torch.no_grad():
        _load_block0(loaded, result.weights)
        for start in range(0, len(IDS), BATCH):
            loaded.model(IDS[start : start + BATCH])
    handle.remove()
    x = torch.cat(seen)
    modules = [mlp.get_submodule(f"{kind}_proj") for kind in kinds]

    def forward(weights: list[torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            for module, weight in zip(modules, weights):
                module.weight.copy_(weight)
            return (mlp if len(kinds) > 1 else modules[0])(x)

    expected = _published_search([m.weight.detach().clone() for m in modules], x, forward)
    for kind in kinds:
        got = result.scales[f"model.layers.1.mlp.{kind}_proj"]
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def _load_block0(loaded, weights: dict[str, torch.Tensor]) -> None:
    modules = dict(loaded.model.named_modules())
    for name, weight in weights.items():
        if name.startswith("model.layers.0."):
            modules[name].weight.copy_(weight)


def test_awq_weights_times_their_scale_lie_on_awqs_grid():
    """W_eff * s = Q(clip(W s)): each group of each row is an integer multiple of the step of its
    largest |value|, in -2^(b-1)..2^(b-1) - 1 (the scale folded back into the weight, not into a norm)."""
    _, _, result = _awq()
    for name, weight in result.weights.items():
        scaled = weight * result.scales[name]
        torch.testing.assert_close(scaled, _awq_grid(scaled, BITS), rtol=0, atol=1e-5, msg=name)


def test_awq_scales_qkv_and_the_mlp_but_not_o_under_grouped_query_attention():
    """v_proj (32 outputs) cannot absorb a scale of o_proj's 64 inputs: o gets none, as in GPTQModel."""
    _, _, result = _awq()
    assert torch.equal(result.scales["model.layers.0.self_attn.o_proj"], torch.ones(64))
    for kind in ("self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj"):
        scale = result.scales[f"model.layers.0.{kind}"]
        assert not torch.equal(scale, torch.ones_like(scale)), kind


def test_awq_returns_every_linear_and_leaves_the_model_unchanged():
    before, after, result = _awq()
    linears = [name.removesuffix(".weight") for name in before if "layers" in name and "proj" in name]
    assert sorted(result.weights) == sorted(linears)
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_every_analysis_runs_on_an_awq_setting(tmp_path):
    """A full run with ``--methods awq`` on a tiny Llama that knows its facts: every analysis
    writes its results for the AWQ 4-bit setting."""
    folder = tmp_path / "reference"
    loaded = tiny_model("llama")
    answer_in_words(loaded)
    facts = load_pararel(["P19", "P36", "P103"], 20, 0)
    prompts = [tokenize(loaded.tokenizer, fact, i) for i, fact in enumerate(facts)]
    rows = []
    for fact, prompt, answer in zip(facts, prompts, score_prompts(loaded, prompts, 16).predicted):
        word = loaded.tokenizer.decode([int(answer)]).strip()
        if word and target_token(loaded.tokenizer, fact.text, list(prompt.ids), word) == int(answer):
            rows.append({"subject": fact.subject, "object": word, "template": fact.template, "relation": fact.relation})
    (tmp_path / "facts.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    save_model(loaded, folder)
    config = RunConfig(
        out=str(tmp_path / "run"),
        model=str(folder),
        methods=("awq",),
        bits=(4,),
        group_size=GROUP,
        preset="full",
        facts_file=str(tmp_path / "facts.jsonl"),
        device="cpu",
        calib_samples=4,
        calib_length=32,
        robustness_facts=2,
        max_paraphrases=1,
        patch_prompts=2,
    )
    results = run(config).results
    awq = next(setting for setting in results["settings"] if setting["label"] == "AWQ 4-bit")
    assert results["subsets"]["awq"]["failure"] > 0
    for subset in ("awq:failure", "awq:robust"):
        assert {"patching", "ablation"} <= set(awq["causal"][subset])
        assert awq["components"][subset]["sign_flip"] and awq["representations"][subset]
    assert awq["sensitivity"]["domino"] and [row["repair"] for row in awq["repairs"]["rows"]][0] == "baseline"


@pytest.mark.parametrize(("bits", "sym"), [(2, True), (3, True), (4, True), (4, False)])
def test_the_clip_search_chooses_gptqmodels_bounds(bits, sym):
    """quantdiag's clip search (outputs as matrix products) against GPTQModel's own
    ``_compute_best_clip`` (broadcast products, rows padded to its batch of 64 with zero rows):
    the same bound for every group, on 1,000 tokens (both keep every (tokens // 512)-th: all of them)."""
    generator = torch.Generator().manual_seed(bits)
    weight = torch.randn(96, 128, generator=generator) * torch.rand(96, 1, generator=generator)
    inputs = torch.randn(1000, 128, generator=generator) * torch.rand(128, generator=generator) * 3
    processor = _processor(None, QuantSpec("awq", bits, GROUP, sym), 128, 0)
    padded = torch.cat([weight, weight.new_zeros(32, 128)])
    bounds = processor._compute_best_clip(padded, inputs)[:96]
    groups = weight.reshape(96, -1, GROUP)
    expected = torch.clamp(groups, -bounds, bounds).reshape_as(weight)
    assert torch.equal(_clipped(processor, weight, inputs), expected)
    assert not torch.equal(expected, weight)  # the search clipped something
