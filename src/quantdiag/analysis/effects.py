"""Causal effects from the patching engine's per-token grids (docs/methods.md, Causal tracing): grouped heatmaps of
restoration (patching) and of the drop of p(target) (ablation), their hotspots, and the
per-token view of one prompt.

Restoration of a cell is computed from subset means, ``(mean p_patched - mean p_Q) /
(mean p_R - mean p_Q)``: per-prompt ratios explode where ``p_R`` and ``p_Q`` are close. It is left
undefined (NaN) where the means differ by less than ``MIN_GAP`` of ``mean p_R``: there is little
to restore and the ratio is noise (typically on the Robust subset).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from quantdiag.analysis.positions import GROUPS, group_means

_TINY = 1e-9
MIN_GAP = 0.2


def grouped(grid: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Per-prompt grids (prompts x layers x tokens, NaN padding; at least one prompt) ->
    prompts x layers x groups."""
    return np.stack([group_means(g[:, row >= 0], row[row >= 0]) for g, row in zip(grid, groups)])


def mean_over_prompts(cells: np.ndarray) -> np.ndarray:
    """Mean over prompts (axis 0) ignoring NaN; NaN where no prompt has a value."""
    counts = (~np.isnan(cells)).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.nansum(cells, axis=0) / counts


def _masked_mean(values: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Mean of per-prompt ``values`` over the prompts that have each group (groups,)."""
    counts = present.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (values[:, None] * present).sum(axis=0) / counts


def _grouped_mean(grid: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean p(target) per (layer, group) over the prompts, and which prompts have each group
    (prompts x groups)."""
    cells = grouped(grid, groups)
    return mean_over_prompts(cells), ~np.isnan(cells[:, 0, :])


def restoration(
    grid: np.ndarray, groups: np.ndarray, p_model: np.ndarray, p_reference: np.ndarray
) -> dict[str, np.ndarray]:
    """Patching heatmaps (layers x groups): mean p(target) after patching and restoration."""
    mean_prob, present = _grouped_mean(grid, groups)
    base, top = _masked_mean(p_model, present), _masked_mean(p_reference, present)
    gap = np.where(np.abs(top - base) >= MIN_GAP * np.abs(top) + _TINY, top - base, np.nan)
    return {"mean_prob": mean_prob, "restoration": (mean_prob - base) / gap}


def drop(grid: np.ndarray, groups: np.ndarray, p_model: np.ndarray) -> dict[str, np.ndarray]:
    """Ablation heatmaps (layers x groups): mean drop of p(target), and that drop as a share of
    the clean p(target) (comparable across models whose answers are less likely)."""
    mean_prob, present = _grouped_mean(grid, groups)
    base = _masked_mean(p_model, present)
    absolute = base - mean_prob
    return {"drop": absolute, "relative_drop": absolute / np.where(base > _TINY, base, np.nan)}


@dataclass(frozen=True)
class Hotspot:
    """The strongest cell of a grouped heatmap, and how concentrated the effect is."""

    layer: int
    group: str
    value: float
    concentration: float


def hotspot(cells: np.ndarray, skip_last_from: float = 1.0) -> Hotspot | None:
    """Argmax cell of a (layers x groups) heatmap. ``concentration`` is the share of the total
    positive effect held by the top 5% of cells: near 1 for a sharp hotspot, low when diffuse.
    The last token is skipped from the layer at fraction ``skip_last_from`` of the depth on:
    residual patching there copies the reference's output (0.75), and every model needs its last
    token's updates (0.0: ablation readings look away from it)."""
    values = np.array(cells, dtype=float)
    values[int(skip_last_from * len(values)) :, GROUPS.index("last")] = np.nan
    if np.all(np.isnan(values)):
        return None
    layer, group = np.unravel_index(np.nanargmax(values), values.shape)
    positive = np.sort(np.clip(values[~np.isnan(values)], 0, None))[::-1]
    top = max(1, int(round(0.05 * positive.size)))
    concentration = float(positive[:top].sum() / positive.sum()) if positive.sum() > 0 else 0.0
    return Hotspot(int(layer), GROUPS[group], float(values[layer, group]), concentration)


def early_last_subject(cells: np.ndarray) -> float:
    """Mean of a (layers x groups) heatmap at the last subject token over the first half of the
    layers: where the paper finds the 4-bit model's repairable signal."""
    column = np.asarray(cells, dtype=float)[: len(cells) // 2, GROUPS.index("last subject")]
    return float(np.nanmean(column)) if not np.all(np.isnan(column)) else float("nan")


def per_token_restoration(grid: np.ndarray, p_model: float, p_reference: float) -> np.ndarray:
    """One prompt's restoration per (layer, token); NaN if ``p_R`` and ``p_Q`` are too close."""
    gap = p_reference - p_model
    return (grid - p_model) / gap if abs(gap) >= MIN_GAP * abs(p_reference) + _TINY else np.full_like(grid, np.nan)


def subset_summary(arrays: dict[str, np.ndarray], subset: str) -> dict:
    """``results.json``'s causal entry of one subset: clean probabilities, and per kind the
    grouped heatmaps (layers x groups, ``None`` where a group is absent or undefined)."""
    groups, p_model, p_reference = (arrays[f"{subset}/{name}"] for name in ("groups", "p_model", "p_reference"))
    summary: dict = {
        "prompts": len(p_model),
        "p_model": float(p_model.mean()),
        "p_reference": float(p_reference.mean()),
    }
    for analysis in ("patching", "ablation"):
        prefix = f"{subset}/{analysis}/"
        for key in sorted(k for k in arrays if k.startswith(prefix)):
            maps = (
                restoration(arrays[key], groups, p_model, p_reference)
                if analysis == "patching"
                else drop(arrays[key], groups, p_model)
            )
            summary.setdefault(analysis, {})[key.removeprefix(prefix)] = {
                name: as_json(cells) for name, cells in maps.items()
            }
    return summary


def as_json(values: np.ndarray) -> list:
    """Nested lists of floats rounded to 6 digits, ``None`` for NaN (JSON has no NaN)."""
    return [as_json(row) if np.ndim(row) else (None if np.isnan(row) else round(float(row), 6)) for row in values]


def from_json(values: list) -> np.ndarray:
    """Inverse of :func:`as_json`."""
    return np.array(values, dtype=float)
