import numpy as np
import pytest
import torch

from quantdiag.analysis.forward import length_batches, score_prompts, target_scores
from quantdiag.analysis.lens import lens_curves
from quantdiag.data.facts import load_pararel, tokenize


def _prompts(loaded, per_relation=6):
    facts = load_pararel(["P19", "P36", "P37"], per_relation, seed=0)
    return [tokenize(loaded.tokenizer, fact, i) for i, fact in enumerate(facts)]


def test_logit_lens_at_the_last_layer_equals_the_model_output(family_model):
    prompts = _prompts(family_model)
    scores = score_prompts(family_model, prompts, batch_size=5, lens_rows=np.ones(len(prompts), dtype=bool))
    np.testing.assert_allclose(scores.lens_prob[:, -1], scores.target_prob, rtol=1e-4, atol=1e-7)
    np.testing.assert_array_equal(scores.lens_rank[:, -1], scores.target_rank)


def test_engine_equals_one_forward_per_prompt(family_model):
    prompts = _prompts(family_model)
    scores = score_prompts(family_model, prompts, batch_size=4)
    for i, prompt in enumerate(prompts):
        with torch.no_grad():
            logits = family_model.model(torch.tensor([prompt.ids])).logits[0, -1]
        prob, rank = target_scores(logits, torch.tensor(prompt.target))
        assert scores.predicted[i] == logits.argmax().item()
        assert scores.target_prob[i] == pytest.approx(prob.item(), rel=1e-4, abs=1e-7)
        assert scores.target_rank[i] == rank.item()


def test_lens_only_for_asked_rows(llama):
    prompts = _prompts(llama)
    rows = np.zeros(len(prompts), dtype=bool)
    rows[::3] = True
    scores = score_prompts(llama, prompts, lens_rows=rows)
    assert np.isfinite(scores.lens_prob[rows]).all()
    assert np.isnan(scores.lens_prob[~rows]).all()
    assert lens_curves(scores, np.flatnonzero(rows))["mean_prob"] == pytest.approx(
        np.mean(scores.lens_prob[rows], axis=0).tolist()
    )
    assert lens_curves(scores, np.array([], dtype=int)) is None


def test_length_batches_cover_every_prompt_once_with_one_length_each(llama):
    prompts = _prompts(llama, per_relation=20)
    batches = length_batches(prompts, batch_size=7)
    assert sorted(i for b in batches for i in b) == list(range(len(prompts)))
    assert all(len(b) <= 7 and len({len(prompts[i].ids) for i in b}) == 1 for b in batches)


def test_target_rank_counts_strictly_larger_logits():
    logits = torch.tensor([[0.1, 3.0, 2.0, 3.0]])
    prob, rank = target_scores(logits, torch.tensor([2]))
    assert rank.item() == 3
    assert prob.item() == pytest.approx(torch.softmax(logits, -1)[0, 2].item())
