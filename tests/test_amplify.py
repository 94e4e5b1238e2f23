"""Peak-signal amplification (METHODS 7): the amplified prediction against a hand computation of
the logit lens, its entropies, the peak layer and the combination; the dev/test split and the
choice of alpha."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import pytest
import torch

from quantdiag.analysis.amplify import amplified_correct, best_alpha, dev_test_split
from quantdiag.data.facts import Prompt, load_pararel, tokenize
from quantdiag.model.load import LoadedModel

from conftest import tiny_model

ALPHAS = (0.0, 0.5, 2.0, 9.0)
#: Factor on the tiny models' unembedding: lens logits of a few units, far from uniform, where
#: logits and probabilities rank sums differently and Gemma2's softcap (30) bites.
UNEMBED_SCALE = 60.0


def confident(loaded: LoadedModel) -> LoadedModel:
    """The model with its unembedding scaled by ``UNEMBED_SCALE`` (a copy: Gemma2's tied input
    embeddings stay as they are)."""
    head = loaded.model.lm_head
    head.weight = torch.nn.Parameter(head.weight * UNEMBED_SCALE, requires_grad=False)
    return loaded


@torch.inference_mode()
def lens_logits(model: torch.nn.Module, ids: Sequence[int]) -> torch.Tensor:
    """Logit lens at the last token by hand (layers x vocab, float64): each block's output, caught
    by the test's own hooks, through the final norm and the unembedding (and Gemma2's softcap)."""
    outputs: list[torch.Tensor] = []
    handles = [
        block.register_forward_hook(lambda _m, _a, out: outputs.append(out[0] if isinstance(out, tuple) else out))
        for block in model.model.layers
    ]
    try:
        model(input_ids=torch.tensor([ids]))
    finally:
        for handle in handles:
            handle.remove()
    logits = model.lm_head(model.model.norm(torch.stack([out[0, -1] for out in outputs]))).double()
    cap = getattr(model.config, "final_logit_softcapping", None)
    return cap * torch.tanh(logits / cap) if cap else logits


def hand_amplified(
    loaded: LoadedModel, prompts: Sequence[Prompt], alphas: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Per prompt l* = the lens layer of lowest entropy (the first among ties) and the predictions
    argmax(z_{L-1} + alpha z_{l*}) per alpha: (alphas x prompts predictions, peak per prompt)."""
    predicted = np.zeros((len(alphas), len(prompts)), dtype=np.int64)
    peaks = np.zeros(len(prompts), dtype=np.int64)
    for i, prompt in enumerate(prompts):
        z = lens_logits(loaded.model, prompt.ids)
        logp = torch.log_softmax(z, -1)
        entropy = -(logp.exp() * logp).sum(-1)
        peaks[i] = int(np.argmin(entropy.numpy()))
        for a, alpha in enumerate(alphas):
            predicted[a, i] = int((z[-1] + alpha * z[peaks[i]]).argmax())
    return predicted, peaks


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_amplified_predictions_equal_a_hand_computation(family):
    """With the targets set to the hand prediction at the largest alpha, each alpha's correctness
    is whether its hand prediction agrees with that one (batched by length, batch 4 of 12)."""
    loaded = confident(tiny_model(family))
    prompts = [tokenize(loaded.tokenizer, fact, i) for i, fact in enumerate(load_pararel(["P19", "P36", "P37"], 4, 0))]
    predicted, peaks = hand_amplified(loaded, prompts, ALPHAS)
    assert len(set(peaks)) > 1 and (peaks != loaded.adapter.n_layers - 1).any()  # the peak is not always the output
    targeted = [dataclasses.replace(p, target=int(t)) for p, t in zip(prompts, predicted[-1])]
    expected = predicted == predicted[-1]
    assert not expected[0].all()  # amplification changes some answers
    np.testing.assert_array_equal(amplified_correct(loaded, targeted, ALPHAS, batch_size=4), expected)


def test_dev_and_test_splits_are_disjoint_halves():
    dev, test = dev_test_split(11, seed=3)
    assert not set(dev) & set(test) and sorted([*dev, *test]) == list(range(11)) and (len(dev), len(test)) == (5, 6)
    assert best_alpha(np.array([[1, 0], [1, 1], [1, 1]], dtype=bool)) == 1  # the smallest of the best
