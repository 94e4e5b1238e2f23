"""Peak-signal amplification (docs/methods.md, Repairs): a training-free read-out repair for Signal Degradation.

Per prompt, ``l*`` is the layer whose logit-lens distribution at the last token has the lowest
entropy (where the answer's signal peaks); the output logits become ``z = z_{L-1} + alpha z_{l*}``.
``alpha`` is chosen on a dev split of the Failure subset and reported on a disjoint test split.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from quantdiag.analysis.forward import length_batches
from quantdiag.data.facts import Prompt
from quantdiag.model.load import LoadedModel
from quantdiag.model.probes import capture


@torch.inference_mode()
def amplified_correct(
    loaded: LoadedModel, prompts: Sequence[Prompt], alphas: Sequence[float], batch_size: int
) -> np.ndarray:
    """Whether each prompt is answered correctly with each ``alpha`` (alphas x prompts), with
    the weights currently in the model. Lens logits are formed one layer at a time, keeping only
    the lowest-entropy layer's, so memory is one vocabulary row per prompt."""
    adapter, layers = loaded.adapter, loaded.adapter.n_layers
    correct = np.zeros((len(alphas), len(prompts)), dtype=bool)
    sites = [f"blocks.{layer}.resid_post" for layer in range(layers)]
    for batch in tqdm(length_batches(prompts, batch_size), desc="amplification", unit="batch", leave=False):
        ids = torch.tensor([prompts[i].ids for i in batch], device=loaded.device)
        with capture(adapter, sites, select=lambda t: t[:, -1]) as resid:
            loaded.model(input_ids=ids, logits_to_keep=1, use_cache=False)
        peak, lowest = None, None
        for site in sites:
            logits = adapter.logits(resid[site].to(adapter.lm_head.weight.device)).float()
            entropy = torch.distributions.Categorical(logits=logits).entropy()
            if peak is None:
                peak, lowest = logits, entropy
            else:
                better = entropy < lowest
                peak, lowest = torch.where(better[:, None], logits, peak), torch.minimum(entropy, lowest)
        final = logits  # the last layer's lens is the model's own output
        targets = torch.tensor([prompts[i].target for i in batch], device=final.device)
        for a, alpha in enumerate(alphas):
            correct[a, batch] = ((final + alpha * peak).argmax(-1) == targets).cpu().numpy()
    return correct


def dev_test_split(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded split of ``range(count)`` into two disjoint halves (dev, test), each sorted."""
    order = np.random.default_rng(seed).permutation(count)
    return np.sort(order[: count // 2]), np.sort(order[count // 2 :])


def best_alpha(dev_correct: np.ndarray) -> int:
    """Index of the alpha (rows of ``dev_correct``, in increasing order) with the best dev
    accuracy: the smallest among ties."""
    return int(np.argmax(dev_correct.mean(-1)))
