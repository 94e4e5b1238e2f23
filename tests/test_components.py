"""Component metrics (METHODS 4): hand-worked values, and the pass on tiny models recomputed from
activations captured with the test's own hooks on the Hugging Face modules."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from quantdiag.analysis import components
from quantdiag.analysis.components import (
    OWN_METRICS,
    PAIR_METRICS,
    component_arrays,
    js_divergence,
    normalized_entropy,
    sign_flip_rate,
    top_jaccard,
)
from quantdiag.analysis.forward import length_batches
from quantdiag.data.facts import load_pararel, tokenize
from quantdiag.model.load import LoadedModel, weights_fingerprint
from quantdiag.model.probes import eager_attention
from quantdiag.quant.bank import WeightBank
from quantdiag.quant.spec import REFERENCE, PrecisionPlan, QuantSpec, Setting

from conftest import tiny_model

#: Factor on the query and key weights of the tiny models: attention logits grow by its square.
SHARPEN = 6.0


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_js_divergence_in_bits_at_hand_worked_points():
    """JS((1,0),(0,1)) = 1 bit; JS((1,0),(.5,.5)) = (log2(4/3) + (log2(2/3) + 1) / 2) / 2 = 0.3113."""
    assert js_divergence(_t(1, 0), _t(0, 1)).item() == pytest.approx(1.0, abs=1e-12)
    assert js_divergence(_t(1, 0), _t(0.5, 0.5)).item() == pytest.approx(0.311278, abs=1e-6)
    assert js_divergence(_t(0.5, 0.5), _t(1, 0)).item() == pytest.approx(0.311278, abs=1e-6)
    assert js_divergence(_t(0.2, 0.3, 0.5), _t(0.2, 0.3, 0.5)).item() == pytest.approx(0.0, abs=1e-12)


def test_normalized_entropy_divides_by_the_visible_positions():
    """(.5, .5, 0, 0, 0, 0) with 4 visible: log 2 / log 4 = 0.5; (.25, .25, .5) with 3: 1.5 log 2 / log 3."""
    rows = torch.stack([_t(0.5, 0.5, 0, 0, 0, 0), _t(0.25, 0.25, 0.5, 0, 0, 0)])
    entropy = normalized_entropy(rows, torch.tensor([4, 3]))
    torch.testing.assert_close(entropy, _t(0.5, 1.5 * np.log(2) / np.log(3)))
    assert torch.isnan(normalized_entropy(_t(1, 0, 0), torch.tensor(1)))


def test_sign_flip_rate_is_the_share_of_flipped_neurons():
    reference = _t(1, -2, 3, -4, 5, -6)
    assert sign_flip_rate(reference * _t(-1, -1, -1, 1, 1, 1), reference).item() == pytest.approx(0.5)
    assert sign_flip_rate(reference * _t(1, 1, 1, 1, 1, -1), reference).item() == pytest.approx(1 / 6)


def test_top_jaccard_ranks_neurons_by_magnitude():
    """300 neurons, top 1% = 3. The reference's largest is a large negative neuron: {0, 299, 298}
    against {299, 298, 297} share two of four."""
    values = torch.arange(1.0, 301.0)
    reference = values.clone()
    reference[0] = -1000.0
    assert top_jaccard(values, values).item() == 1.0
    assert top_jaccard(values, reference).item() == pytest.approx(0.5)
    swapped = values.clone()
    swapped[-1] = 0  # {297, 298, 299} vs {298, 299, 300} (1-based): two of four
    assert top_jaccard(swapped, values).item() == pytest.approx(0.5)


def _hooked_forward(model: torch.nn.Module, ids: tuple[int, ...]) -> dict[str, list[np.ndarray]]:
    """One unbatched forward with forward hooks on the HF modules of every layer: attention weights
    (heads x T x T), gate_proj output, down_proj input and the MLP's residual update (Gemma2: after
    its post-feedforward norm), each (T x width)."""
    store: dict[str, list[np.ndarray]] = {"attn": [], "gate": [], "act": [], "mlp_out": []}

    def keep(name: str, value: torch.Tensor) -> None:
        store[name].append(value[0].double().numpy())

    gemma = model.config.model_type == "gemma2"
    handles = []
    for block in model.model.layers:
        update = block.post_feedforward_layernorm if gemma else block.mlp
        handles += [
            block.self_attn.register_forward_hook(lambda _m, _a, out: keep("attn", out[1])),
            block.mlp.gate_proj.register_forward_hook(lambda _m, _a, out: keep("gate", out)),
            block.mlp.down_proj.register_forward_pre_hook(lambda _m, args: keep("act", args[0])),
            update.register_forward_hook(lambda _m, _a, out: keep("mlp_out", out)),
        ]
    try:
        model(input_ids=torch.tensor([ids]))
    finally:
        for handle in handles:
            handle.remove()
    return store


def _entropy(rows: np.ndarray, visible: int) -> float:
    """Mean over heads of -sum a log a / log(visible) over the first ``visible`` positions."""
    if visible == 1:
        return float("nan")
    return float(np.mean([-np.sum(a[a > 0] * np.log(a[a > 0])) / np.log(visible) for a in rows[:, :visible]]))


def _js_bits(p: np.ndarray, q: np.ndarray) -> float:
    """Mean over rows (heads) of the Jensen-Shannon divergence in bits."""

    def kl(a: np.ndarray, m: np.ndarray) -> float:
        return float(np.sum(a[a > 0] * np.log2(a[a > 0] / m[a > 0])))

    return float(np.mean([(kl(a, (a + b) / 2) + kl(b, (a + b) / 2)) / 2 for a, b in zip(p, q)]))


def _hand_metrics(acts: dict, ref: dict, s: int) -> dict[str, float]:
    """The six metrics of one layer's activations ``acts`` against ``ref`` at token ``s``."""
    k = max(1, round(0.01 * acts["act"].shape[-1]))
    top, top_ref = (set(np.argsort(-np.abs(a["act"][s]))[:k]) for a in (acts, ref))
    out, out_ref = acts["mlp_out"][s], ref["mlp_out"][s]
    return {
        "entropy_subject": _entropy(acts["attn"][:, s], s + 1),
        "entropy_last": _entropy(acts["attn"][:, -1], acts["attn"].shape[-1]),
        "focus_divergence": _js_bits(acts["attn"][:, s], ref["attn"][:, s]),
        "sign_flip": float(np.mean(np.sign(acts["gate"][s]) != np.sign(ref["gate"][s]))),
        "jaccard": len(top & top_ref) / len(top | top_ref),
        "value_cosine": float(out @ out_ref / np.linalg.norm(out) / np.linalg.norm(out_ref)),
    }


def _sharpened(family: str) -> LoadedModel:
    """A tiny random model with peaked attention (queries and keys scaled up) and random norm
    gains, so that entropies, divergences and cosines lie well inside their ranges."""
    loaded = tiny_model(family)
    generator = torch.Generator().manual_seed(1)
    for name, parameter in loaded.model.named_parameters():
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            parameter.mul_(SHARPEN)
        elif "norm" in name:
            parameter.copy_(torch.rand(parameter.shape, generator=generator) + 0.5)
    return dataclasses.replace(loaded, fingerprint=weights_fingerprint(loaded.adapter))


def _by_hand(loaded: LoadedModel, bank: WeightBank, setting: Setting, prompts: list) -> dict[str, np.ndarray]:
    """``{metric}`` (prompts x layers) of ``setting`` against the reference, prompt by prompt."""
    captured = {}
    with eager_attention(loaded.model), torch.inference_mode():
        for name in (REFERENCE, setting):
            bank.apply(PrecisionPlan.uniform(name))
            captured[name] = [_hooked_forward(loaded.model, p.ids) for p in prompts]
    bank.apply(PrecisionPlan.uniform(REFERENCE))

    def at(run: dict[str, list[np.ndarray]], layer: int) -> dict[str, np.ndarray]:
        return {key: values[layer] for key, values in run.items()}

    layers = range(loaded.adapter.n_layers)
    runs = zip(prompts, captured[setting], captured[REFERENCE])
    table = [
        [_hand_metrics(at(run, layer), at(ref, layer), p.last_subject) for layer in layers] for p, run, ref in runs
    ]
    return {m: np.array([[cell[m] for cell in row] for row in table]) for m in OWN_METRICS + PAIR_METRICS}


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_component_pass_equals_a_hand_computation(family):
    """Every metric per prompt and layer, batched by length (batch 3 of 8 prompts), equals the hand
    computation from unbatched forwards: the reference against itself exactly (cosine 1, no flips,
    Jaccard 1, divergence 0), and 3-bit RTN at its own interior values."""
    loaded = _sharpened(family)
    bank = WeightBank(loaded)
    three = QuantSpec("rtn", 3, 32, True)
    bank.ensure(three)
    prompts = [tokenize(loaded.tokenizer, fact, i) for i, fact in enumerate(load_pararel(["P19", "P36"], 4, 0))]
    attention = loaded.model.config._attn_implementation
    arrays = component_arrays(loaded, bank, [REFERENCE, three], prompts, batch_size=3)
    assert loaded.model.config._attn_implementation == attention
    assert set(arrays) == {f"{s.key}/{m}" for s in (REFERENCE, three) for m in OWN_METRICS + PAIR_METRICS}
    identical = {"focus_divergence": 0.0, "sign_flip": 0.0, "jaccard": 1.0, "value_cosine": 1.0}
    for metric, value in identical.items():
        np.testing.assert_allclose(arrays[f"{REFERENCE.key}/{metric}"], value, atol=1e-6)
    hand = {setting: _by_hand(loaded, bank, setting, prompts) for setting in (REFERENCE, three)}
    for setting, metrics in hand.items():
        for metric, expected in metrics.items():
            key = f"{setting.key}/{metric}"
            np.testing.assert_allclose(arrays[key], expected, atol=1e-6, err_msg=key)
    quantized = hand[three]  # interior values, so that a wrong reading shows
    assert quantized["focus_divergence"].min() > 1e-3 and 0 < quantized["sign_flip"].mean() < 0.5
    assert 0 < quantized["jaccard"].mean() < 1 and quantized["value_cosine"].max() < 0.99


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_eager_attention_is_switched_back(llama, attn):
    llama.model.set_attn_implementation(attn)
    with eager_attention(llama.model):
        assert llama.model.config._attn_implementation == "eager"
    assert llama.model.config._attn_implementation == attn


def test_the_component_pass_swaps_weights_once_a_setting_a_chunk(monkeypatch):
    """The reference's activations are held for as many batches as the budget allows, then each
    setting runs on them: with room for every batch the weights change (settings + 1) times in all,
    with room for one batch (settings + 1) times a batch; the metrics are the same either way."""
    loaded = _sharpened("llama")
    bank = WeightBank(loaded)
    specs = [QuantSpec("rtn", bits, 32, True) for bits in (3, 2)]
    for spec in specs:
        bank.ensure(spec)
    prompts = [tokenize(loaded.tokenizer, fact, i) for i, fact in enumerate(load_pararel(["P19", "P36"], 4, 0))]
    applied = [REFERENCE]  # the uniform settings asked for, in order
    apply = bank.apply
    monkeypatch.setattr(bank, "apply", lambda plan: (applied.append(plan.default), apply(plan))[1])

    def swaps() -> int:
        count = sum(a != b for a, b in zip(applied, applied[1:]))
        del applied[:-1]
        return count

    whole = component_arrays(loaded, bank, specs, prompts, batch_size=3)
    assert swaps() == len(specs) + 1
    monkeypatch.setattr(components, "REFERENCE_BUDGET", 1)
    batched = component_arrays(loaded, bank, specs, prompts, batch_size=3)
    assert swaps() == (len(specs) + 1) * len(length_batches(prompts, 3)) > len(specs) + 1
    for key, values in whole.items():
        np.testing.assert_array_equal(batched[key], values, err_msg=key)
