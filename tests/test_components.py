"""Component metrics (METHODS 4): properties with hypothesis, and the pass on tiny models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantdiag.analysis.components import (
    OWN_METRICS,
    PAIR_METRICS,
    component_arrays,
    js_divergence,
    normalized_entropy,
    sign_flip_rate,
    top_jaccard,
)
from quantdiag.data.facts import load_pararel, tokenize
from quantdiag.quant.bank import WeightBank
from quantdiag.quant.spec import REFERENCE, QuantSpec

rows = st.integers(1, 12).flatmap(
    lambda n: st.lists(st.lists(st.floats(0.0, 1.0), min_size=n, max_size=n).filter(lambda r: sum(r) > 1e-3), min_size=2, max_size=2)
)


def _distribution(values: list[float]) -> torch.Tensor:
    tensor = torch.tensor(values, dtype=torch.float64)
    return tensor / tensor.sum()


@settings(max_examples=60, deadline=None)
@given(rows)
def test_js_divergence_is_symmetric_bounded_and_zero_for_equal_rows(pair):
    p, q = (_distribution(r) for r in pair)
    assert 0.0 <= js_divergence(p, q) <= 1.0
    assert torch.isclose(js_divergence(p, q), js_divergence(q, p))
    assert js_divergence(p, p) < 1e-12


@settings(max_examples=60, deadline=None)
@given(rows)
def test_normalized_entropy_is_in_unit_interval_and_one_for_uniform_rows(pair):
    p = _distribution(pair[0])
    visible = torch.tensor(len(p))
    if len(p) == 1:
        assert torch.isnan(normalized_entropy(p, visible))
        return
    assert -1e-12 <= normalized_entropy(p, visible) <= 1 + 1e-12
    uniform = torch.full((len(p),), 1.0 / len(p), dtype=torch.float64)
    assert torch.isclose(normalized_entropy(uniform, visible), torch.tensor(1.0, dtype=torch.float64))


def test_sign_flips_and_jaccard_on_known_vectors():
    reference = torch.arange(1.0, 201.0)
    assert sign_flip_rate(reference, reference) == 0 and sign_flip_rate(-reference, reference) == 1
    assert top_jaccard(reference, reference) == 1  # top 2 of 200 neurons agree
    swapped = reference.clone()
    swapped[-1] = 0  # the top neuron drops out: {199, 200} vs {198, 199} share one of three
    assert torch.isclose(top_jaccard(swapped, reference), torch.tensor(1 / 3))


def test_component_pass_on_a_tiny_model(family_model):
    bank = WeightBank(family_model)
    specs = [QuantSpec("rtn", bits, 32, True) for bits in (8, 2)]
    for spec in specs:
        bank.ensure(spec)
    prompts = [tokenize(family_model.tokenizer, fact, i) for i, fact in enumerate(load_pararel(["P19"], 5, 0))]
    attention = family_model.model.config._attn_implementation
    arrays = component_arrays(family_model, bank, [s.key for s in specs], prompts, batch_size=4)
    assert family_model.model.config._attn_implementation == attention
    assert set(arrays) == {f"{REFERENCE}/{m}" for m in OWN_METRICS} | {f"{s.key}/{m}" for s in specs for m in OWN_METRICS + PAIR_METRICS}
    eight, two = (s.key for s in specs)
    assert np.nanmean(arrays[f"{eight}/value_cosine"]) > np.nanmean(arrays[f"{two}/value_cosine"])
    assert np.nanmean(arrays[f"{eight}/sign_flip"]) < np.nanmean(arrays[f"{two}/sign_flip"])
    assert arrays[f"{eight}/focus_divergence"].max() <= 1 and arrays[f"{eight}/jaccard"].min() >= 0


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_eager_attention_is_switched_back(llama, attn):
    from quantdiag.model.probes import eager_attention

    llama.model.set_attn_implementation(attn)
    with eager_attention(llama.model):
        assert llama.model.config._attn_implementation == "eager"
    assert llama.model.config._attn_implementation == attn
