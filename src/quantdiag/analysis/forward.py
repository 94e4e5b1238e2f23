"""The evaluation engine: next-token scores of many prompts, fast.

Prompts are bucketed by exact token length, so no batch carries padding (and results equal
unpadded forwards); only the last position goes through the unembedding (``logits_to_keep=1``);
target probabilities and ranks are computed on the device and copied back once.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from quantdiag.data.facts import Prompt
from quantdiag.model.load import LoadedModel
from quantdiag.model.probes import capture


@dataclass
class Scores:
    """Per-prompt results of one model. Lens arrays are (prompts x layers), NaN where the lens
    was not asked for."""

    targets: np.ndarray
    predicted: np.ndarray
    target_prob: np.ndarray
    target_rank: np.ndarray
    lens_prob: np.ndarray | None = None
    lens_rank: np.ndarray | None = None

    @property
    def correct(self) -> np.ndarray:
        return self.predicted == self.targets

    def arrays(self, prefix: str = "") -> dict[str, np.ndarray]:
        """The non-empty fields, for ``np.savez``."""
        return {prefix + k: v for k, v in vars(self).items() if v is not None}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], prefix: str = "") -> Scores:
        return cls(
            **{
                k.removeprefix(prefix): v
                for k, v in arrays.items()
                if k.startswith(prefix) and "/" not in k.removeprefix(prefix)
            }
        )


def target_scores(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Probability and rank (1 = top) of ``targets`` under ``logits`` (..., vocab)."""
    logits = logits.float()
    target_logit = logits.gather(-1, targets.unsqueeze(-1))
    prob = torch.softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    rank = (logits > target_logit).sum(-1) + 1
    return prob, rank


def length_batches(prompts: Sequence[Prompt], batch_size: int) -> list[list[int]]:
    """Indices of prompts grouped by token length, cut into batches of at most ``batch_size``."""
    by_length: dict[int, list[int]] = defaultdict(list)
    for index, prompt in enumerate(prompts):
        by_length[len(prompt.ids)].append(index)
    return [
        group[i : i + batch_size] for _, group in sorted(by_length.items()) for i in range(0, len(group), batch_size)
    ]


@torch.inference_mode()
def score_prompts(
    loaded: LoadedModel,
    prompts: Sequence[Prompt],
    batch_size: int = 64,
    lens_rows: np.ndarray | None = None,
    desc: str = "evaluating",
) -> Scores:
    """Greedy prediction, target probability and rank at the last token of every prompt; with
    ``lens_rows`` (a boolean mask over prompts) also the logit lens of those prompts."""
    n, layers, device = len(prompts), loaded.adapter.n_layers, loaded.device
    targets = torch.tensor([p.target for p in prompts], device=device)
    predicted = torch.empty(n, dtype=torch.long, device=device)
    prob = torch.empty(n, device=device)
    rank = torch.empty(n, dtype=torch.long, device=device)
    want_lens = lens_rows is not None
    lens_prob = torch.full((n, layers), float("nan"), device=device) if want_lens else None
    lens_rank = torch.zeros((n, layers), dtype=torch.long, device=device) if want_lens else None
    sites = [f"blocks.{layer}.resid_post" for layer in range(layers)] if want_lens else []
    for batch in tqdm(length_batches(prompts, batch_size), desc=desc, unit="batch", leave=False):
        index = torch.tensor(batch, device=device)
        ids = torch.tensor([prompts[i].ids for i in batch], device=device)
        with capture(loaded.adapter, sites, select=lambda t: t[:, -1]) as resid:
            logits = loaded.model(input_ids=ids, logits_to_keep=1, use_cache=False).logits[:, -1]
        predicted[index] = logits.argmax(-1)
        prob[index], rank[index] = target_scores(logits, targets[index])
        if want_lens:
            rows = index[torch.as_tensor(lens_rows[batch], device=device)]
            if len(rows):
                stacked = torch.stack([resid[s] for s in sites], dim=1)[lens_rows[batch]]
                lens_prob[rows], lens_rank[rows] = lens_scores(loaded, stacked, targets[rows])
    return Scores(
        targets.cpu().numpy(),
        predicted.cpu().numpy(),
        prob.cpu().numpy(),
        rank.cpu().numpy(),
        None if lens_prob is None else lens_prob.cpu().numpy(),
        None if lens_rank is None else lens_rank.cpu().numpy(),
    )


def lens_scores(loaded: LoadedModel, resid: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logit lens (docs/methods.md, Logit lens): target probability and rank of ``softmax(W_U norm_f(h_l))`` for
    residuals ``resid`` (prompts x layers x d), one layer at a time to bound memory."""
    probs, ranks = [], []
    for layer in range(resid.shape[1]):
        logits = loaded.adapter.logits(resid[:, layer].to(loaded.adapter.lm_head.weight.device))
        p, r = target_scores(logits, targets.to(logits.device))
        probs.append(p.to(resid.device))
        ranks.append(r.to(resid.device))
    return torch.stack(probs, dim=1), torch.stack(ranks, dim=1)
