"""Causal tracing of one setting on the prompts of each subset (docs/methods.md, Causal tracing): cross-model patching
(the reference's values written into the setting) and zero ablation (within the setting).

The reference is traced first and the setting's weights are swapped in once, so the bank swaps
weights twice per setting whatever the number of prompts and sweeps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from quantdiag.analysis.forward import length_batches
from quantdiag.analysis.patching import MAX_TOKENS, Sweep, Trace, sweep_probs, trace
from quantdiag.analysis.positions import token_groups
from quantdiag.config import CAUSAL_ANALYSES, KINDS
from quantdiag.data.facts import Prompt
from quantdiag.model.load import LoadedModel
from quantdiag.model.stack import trace_stack
from quantdiag.quant.bank import WeightBank
from quantdiag.quant.spec import REFERENCE, PrecisionPlan, Setting


@dataclass(frozen=True)
class CausalPlan:
    """Which causal analyses to run, on which streams, with which MLP/attention window."""

    analyses: tuple[str, ...] = CAUSAL_ANALYSES
    kinds: tuple[str, ...] = KINDS
    window: int = 1
    max_tokens: int = MAX_TOKENS

    def sweeps(self, setting: Setting) -> list[tuple[str, Sweep]]:
        """(analysis, sweep) pairs; patching the reference into itself is skipped (a no-op)."""
        wanted = [a for a in self.analyses if not (a == "patching" and setting == REFERENCE)]
        return [(analysis, Sweep(kind, self.window)) for analysis in wanted for kind in self.kinds]


@dataclass
class _Batch:
    rows: list[int]
    ids: torch.Tensor
    targets: torch.Tensor


def causal_arrays(
    loaded: LoadedModel,
    bank: WeightBank,
    setting: Setting,
    subsets: dict[str, Sequence[Prompt]],
    plan: CausalPlan,
    batch_size: int,
) -> dict[str, np.ndarray]:
    """Per subset: ``{subset}/groups`` (prompts x tokens, -1 padding), ``{subset}/p_model`` and
    ``{subset}/p_reference`` (clean p(target)), and ``{subset}/{analysis}/{kind}`` (prompts x
    layers x tokens, p(target) after the intervention, NaN padding)."""
    batches = {name: _batches(loaded, prompts, batch_size) for name, prompts in subsets.items()}
    sweeps = plan.sweeps(setting)
    bank.apply(PrecisionPlan.uniform(REFERENCE))
    references = {
        name: [trace(loaded.adapter, b.ids, b.targets, plan.kinds) for b in items] for name, items in batches.items()
    }
    bank.apply(PrecisionPlan.uniform(setting))
    arrays: dict[str, np.ndarray] = {}
    progress = tqdm(
        total=sum(len(items) for items in batches.values()) * len(sweeps),
        desc=f"causal {setting.label}",
        unit="sweep",
        leave=False,
    )
    with progress:
        for name, prompts in subsets.items():
            arrays |= _subset_arrays(
                loaded, name, prompts, batches[name], references[name], setting, sweeps, plan, progress
            )
    return arrays


def _subset_arrays(
    loaded: LoadedModel,
    name: str,
    prompts: Sequence[Prompt],
    batches: list[_Batch],
    references: list[Trace],
    setting: Setting,
    sweeps: list[tuple[str, Sweep]],
    plan: CausalPlan,
    progress: tqdm,
) -> dict[str, np.ndarray]:
    """One subset's arrays (see :func:`causal_arrays`)."""
    n_layers, width = loaded.adapter.n_layers, max((len(p.ids) for p in prompts), default=0)
    out = {
        f"{name}/{analysis}/{sweep.kind}": np.full((len(prompts), n_layers, width), np.nan)
        for analysis, sweep in sweeps
    }
    out[f"{name}/groups"] = np.full((len(prompts), width), -1, dtype=np.int64)
    out[f"{name}/p_model"], out[f"{name}/p_reference"] = np.empty(len(prompts)), np.empty(len(prompts))
    for batch, reference in zip(batches, references):
        own = reference if setting == REFERENCE else trace(loaded.adapter, batch.ids, batch.targets, plan.kinds)
        kwargs = trace_stack(loaded.adapter, batch.ids[:1], all_states=False).kwargs
        length = batch.ids.shape[1]
        for analysis, sweep in sweeps:
            values = reference.values(sweep.kind) if analysis == "patching" else own.ablation_values(sweep.kind)
            grid = sweep_probs(loaded.adapter, own, kwargs, batch.targets, sweep, values, plan.max_tokens)
            out[f"{name}/{analysis}/{sweep.kind}"][batch.rows, :, :length] = grid.float().cpu().numpy()
            progress.update()
        out[f"{name}/p_model"][batch.rows] = own.prob.float().cpu().numpy()
        out[f"{name}/p_reference"][batch.rows] = reference.prob.float().cpu().numpy()
        for row in batch.rows:
            out[f"{name}/groups"][row, :length] = token_groups(prompts[row].subject, length)
    return out


def _batches(loaded: LoadedModel, prompts: Sequence[Prompt], batch_size: int) -> list[_Batch]:
    """Equal-length batches of ``prompts`` on the model's device."""
    device = loaded.device
    return [
        _Batch(
            rows,
            torch.tensor([prompts[i].ids for i in rows], device=device),
            torch.tensor([prompts[i].target for i in rows], device=device),
        )
        for rows in length_batches(prompts, batch_size)
    ]
