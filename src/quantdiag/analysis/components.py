"""Component diagnostics (docs/methods.md, Components): is attention still focused, does the FFN still retrieve the
same memories? Per prompt and layer, at the last subject token ``s`` (and the last token for
entropy), for the reference and each setting; only scalars per prompt and layer are kept.

Attention probabilities need eager attention: this pass alone switches to it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from quantdiag.analysis.effects import as_json, mean_over_prompts
from quantdiag.analysis.forward import length_batches
from quantdiag.data.facts import Prompt
from quantdiag.model.load import LoadedModel
from quantdiag.model.probes import capture, eager_attention
from quantdiag.quant.bank import WeightBank
from quantdiag.quant.spec import REFERENCE, PrecisionPlan, Setting

#: Metrics of every model, and metrics of a compared model against the reference.
OWN_METRICS = ("entropy_subject", "entropy_last")
PAIR_METRICS = ("focus_divergence", "sign_flip", "jaccard", "value_cosine")
TOP_SHARE = 0.01
#: The FFN sites read; routed experts have no single gate or intermediate (their sign flips and Jaccard are NaN).
FFN_SITES = {"gate": "mlp.gate_pre", "act": "mlp.act", "mlp_out": "mlp_out"}
#: Bytes of reference activations the component pass holds before it runs the settings on them
#: (SmolLM2: about 0.46 MB a prompt, so about 580 prompts a chunk); it bounds the pass's extra memory.
REFERENCE_BUDGET = 2**28


def normalized_entropy(rows: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Entropy of attention rows (..., positions) divided by ``log(visible)``, in [0, 1]; NaN
    where a single position is visible (nothing to spread over)."""
    entropy = -torch.special.xlogy(rows, rows).sum(-1)
    scale = torch.log(visible.to(rows.dtype))
    return torch.where(visible > 1, entropy / scale.clamp_min(1e-12), torch.full_like(entropy, float("nan")))


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence of distributions over the last axis, log base 2, in [0, 1]."""
    m = (p + q) / 2
    kl = lambda a: (torch.special.xlogy(a, a) - torch.special.xlogy(a, m)).sum(-1)  # noqa: E731
    return ((kl(p) + kl(q)) / (2 * np.log(2))).clamp(0, 1)


def sign_flip_rate(gate: torch.Tensor, reference_gate: torch.Tensor) -> torch.Tensor:
    """Share of gate pre-activations whose sign differs from the reference's (last axis)."""
    return (torch.sign(gate) != torch.sign(reference_gate)).float().mean(-1)


def top_jaccard(values: torch.Tensor, reference_values: torch.Tensor, share: float = TOP_SHARE) -> torch.Tensor:
    """Jaccard index of the top ``share`` of neurons by magnitude in both (last axis)."""
    k = max(1, round(share * values.shape[-1]))

    def top(x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x, dtype=torch.bool).scatter(-1, x.abs().topk(k, dim=-1).indices, True)

    common = (top(values) & top(reference_values)).sum(-1).float()
    return common / (2 * k - common)


def _activations(loaded: LoadedModel, ids: torch.Tensor, subject: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per layer (stacked on axis 1): attention rows (heads x positions) at ``s`` and at the last
    token, gate pre-activations, SwiGLU intermediate and MLP output at ``s``. Only those rows
    are kept from each forward."""
    layers = range(loaded.adapter.n_layers)
    rows = torch.arange(len(ids), device=ids.device)
    ffn = {name: site for name, site in FFN_SITES.items() if loaded.adapter.has_site(site)}

    def attention_rows(probs: torch.Tensor) -> torch.Tensor:
        return torch.stack([probs[rows, :, subject], probs[:, :, -1]], 1)

    with (
        capture(loaded.adapter, [f"blocks.{layer}.attn_probs" for layer in layers], select=attention_rows) as attention,
        capture(
            loaded.adapter,
            [f"blocks.{layer}.{site}" for layer in layers for site in ffn.values()],
            select=lambda t: t[rows, subject],
        ) as at_subject,
    ):
        loaded.model(input_ids=ids, use_cache=False, logits_to_keep=1)

    def stacked(store: dict[str, torch.Tensor], site: str) -> torch.Tensor:
        return torch.stack([store[f"blocks.{layer}.{site}"].float() for layer in layers], 1)

    both = stacked(attention, "attn_probs")
    return {
        "attn_subject": both[:, :, 0],
        "attn_last": both[:, :, 1],
        **{name: stacked(at_subject, site) for name, site in ffn.items()},
    }


def _own(acts: dict[str, torch.Tensor], subject: torch.Tensor, length: int) -> dict[str, torch.Tensor]:
    visible = (subject + 1)[:, None, None]
    return {
        "entropy_subject": normalized_entropy(acts["attn_subject"], visible).mean(-1),
        "entropy_last": normalized_entropy(acts["attn_last"], torch.tensor(length)).mean(-1),
    }


def _pair(acts: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    cosine = F.cosine_similarity(acts["mlp_out"], ref["mlp_out"], dim=-1)
    undefined = torch.full_like(cosine, float("nan"))
    return {
        "focus_divergence": js_divergence(acts["attn_subject"], ref["attn_subject"]).mean(-1),
        "sign_flip": sign_flip_rate(acts["gate"], ref["gate"]) if "gate" in acts else undefined,
        "jaccard": top_jaccard(acts["act"], ref["act"]) if "act" in acts else undefined,
        "value_cosine": cosine,
    }


@torch.inference_mode()
def component_arrays(
    loaded: LoadedModel, bank: WeightBank, settings: Sequence[Setting], prompts: Sequence[Prompt], batch_size: int
) -> dict[str, np.ndarray]:
    """``{setting}/{metric}`` (prompts x layers) for the reference and each of ``settings``:
    entropies for every model, the comparisons with the reference for the settings. The
    reference runs on batches until their activations fill ``REFERENCE_BUDGET``; then each
    setting runs on those batches. Weights are swapped once a setting a chunk, not a batch, and
    memory stays bounded by the budget, whatever the number of prompts."""
    n, layers = len(prompts), loaded.adapter.n_layers
    out = {f"{REFERENCE.key}/{m}": np.full((n, layers), np.nan) for m in OWN_METRICS}
    out |= {f"{s.key}/{m}": np.full((n, layers), np.nan) for s in settings for m in OWN_METRICS + PAIR_METRICS}
    held: list[tuple[list[int], torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]] = []
    batches = length_batches(prompts, batch_size)
    progress = tqdm(total=len(batches) * (len(settings) + 1), desc="components", unit="batch", leave=False)
    with eager_attention(loaded.model), progress:
        for batch in batches:
            ids = torch.tensor([prompts[i].ids for i in batch], device=loaded.device)
            subject = torch.tensor([prompts[i].last_subject for i in batch], device=loaded.device)
            bank.apply(PrecisionPlan.uniform(REFERENCE))
            reference = _activations(loaded, ids, subject)
            for name, values in _own(reference, subject, ids.shape[1]).items():
                out[f"{REFERENCE.key}/{name}"][batch] = values.cpu().numpy()
            held.append((batch, ids, subject, reference))
            progress.update()
            if sum(_bytes(acts) for *_, acts in held) >= REFERENCE_BUDGET:
                _compare_settings(loaded, bank, settings, held, out, progress)
                held = []
        _compare_settings(loaded, bank, settings, held, out, progress)
    bank.apply(PrecisionPlan.uniform(REFERENCE))
    return out


def _bytes(acts: dict[str, torch.Tensor]) -> int:
    return sum(values.nbytes for values in acts.values())


def _compare_settings(
    loaded: LoadedModel,
    bank: WeightBank,
    settings: Sequence[Setting],
    held: list[tuple[list[int], torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]],
    out: dict[str, np.ndarray],
    progress: tqdm,
) -> None:
    """Each setting's metrics on the ``held`` batches (rows, ids, subject positions, the
    reference's activations), one setting at a time."""
    for setting in settings if held else ():
        bank.apply(PrecisionPlan.uniform(setting))
        for batch, ids, subject, reference in held:
            acts = _activations(loaded, ids, subject)
            for name, values in (_own(acts, subject, ids.shape[1]) | _pair(acts, reference)).items():
                out[f"{setting.key}/{name}"][batch] = values.cpu().numpy()
            progress.update()


def component_curves(arrays: dict[str, np.ndarray], setting: Setting, rows: np.ndarray) -> dict[str, list] | None:
    """Per metric of ``setting``, the mean per layer over the prompts ``rows`` (indices into the
    run's facts; ``arrays["rows"]`` says which facts the arrays hold); ``None`` if empty."""
    if len(rows) == 0:
        return None
    at = np.searchsorted(arrays["rows"], rows)
    return {
        key.removeprefix(f"{setting.key}/"): as_json(mean_over_prompts(arrays[key][at]))
        for key in arrays
        if key.startswith(f"{setting.key}/")
    }
