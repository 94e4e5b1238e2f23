"""The report's causal section (docs/methods.md, Causal tracing): per method and subset, grouped heatmaps of
cross-model patching (restoration) and zero ablation (share of p(answer) lost) side by side for
the reference and each setting, a one-line reading under each heatmap, and the per-token view of
one prompt."""

from __future__ import annotations

from collections.abc import Iterator

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from quantdiag.analysis.effects import early_last_subject, from_json, hotspot
from quantdiag.analysis.positions import GROUPS
from quantdiag.report.plots import Section
from quantdiag.report.readings import empty_subset, ran
from quantdiag.verdict.thresholds import COPY_DEPTH

KIND_LABELS = {"resid": "residual", "mlp": "MLP output", "attn": "attention output"}
#: analysis -> (metric in results.json, colour-bar label, its definition, colormap, value range)
METRICS = {
    "patching": ("restoration", "restoration", "(p_patched - p_Q) / (p_R - p_Q)", "Purples", (0.0, 1.0)),
    "ablation": ("relative_drop", "share of p(answer) lost", "", "RdBu_r", (-1.0, 1.0)),
}
#: The per-token view draws at most the prompt's last this many tokens (a row each).
MAX_TOKENS = 48


def causal_sections(results: dict) -> Iterator[Section]:
    """(id, title, figure, readings) of every causal figure the results have data for, drawn one
    at a time as they are asked for; a line for each empty subset."""
    for method in results["subsets"]:
        for subset in ("failure", "robust"):
            if ran(results, *METRICS) and not results["subsets"][method][subset]:
                title = f"Causal effects, {method.upper()}, {subset.capitalize()} subset"
                yield (f"causal-{method}-{subset}", title, None, empty_subset(results, method, subset))
            for analysis in METRICS:
                drawn = heatmaps(results, method, subset, analysis)
                if drawn:
                    title = (
                        f"{'Cross-model patching' if analysis == 'patching' else 'Zero ablation'}, "
                        f"{method.upper()}, {subset.capitalize()} subset"
                    )
                    yield (f"causal-{analysis}-{method}-{subset}", title, *drawn)
        drawn = token_view(results, method)
        if drawn:
            yield (f"causal-tokens-{method}", f"Patching one prompt token by token, {method.upper()}", *drawn)


def _columns(results: dict, key: str, analysis: str) -> list[dict]:
    """Settings (reference first) with ``analysis`` data for subset ``key``."""
    return [s for s in results["settings"] if analysis in s.get("causal", {}).get(key, {})]


def heatmaps(results: dict, method: str, subset: str, analysis: str) -> tuple[Figure, list[str]] | None:
    """Rows: patched stream (residual, MLP, attention); columns: settings; cells: layers x token
    groups. ``None`` when the run has no such data."""
    key = f"{method}:{subset}"
    columns = [s for s in _columns(results, key, analysis) if s["method"] in (None, method)]
    if not columns:
        return None
    metric, label, definition, cmap, (low, high) = METRICS[analysis]
    kinds = [kind for kind in KIND_LABELS if kind in columns[0]["causal"][key][analysis]]
    fig, axes = plt.subplots(
        len(kinds),
        len(columns),
        figsize=(1.2 + 3.0 * len(columns), 0.9 + 2.1 * len(kinds)),
        squeeze=False,
        sharex=True,
        sharey=True,
        layout="constrained",
    )
    readings = []
    for row, kind in enumerate(kinds):
        for col, setting in enumerate(columns):
            cells = from_json(setting["causal"][key][analysis][kind][metric])
            ax = axes[row, col]
            image = ax.imshow(
                np.clip(cells.T, low, high), aspect="auto", cmap=cmap, vmin=low, vmax=high, interpolation="nearest"
            )
            ax.set_title(f"{setting['label']} · {KIND_LABELS[kind]}", fontsize=9)
            ax.set_yticks(range(len(GROUPS)), GROUPS, fontsize=8)
            if row == len(kinds) - 1:
                ax.set_xlabel("layer")
            readings.append(_reading(setting["label"], kind, analysis, cells))
    fig.colorbar(image, ax=axes, label=label, shrink=0.8)
    prompts = columns[-1]["causal"][key]["prompts"]
    fig.suptitle(f"{subset.capitalize()} subset ({prompts} prompts), {method.upper()}: {label} {definition}".rstrip())
    return fig, readings


def _reading(label: str, kind: str, analysis: str, cells: np.ndarray) -> str:
    """Where the hotspot is and how strong, in one line."""
    skip_last_from = 0.0 if analysis == "ablation" else COPY_DEPTH if kind == "resid" else 1.0
    spot = hotspot(cells, skip_last_from)
    if spot is None:
        return (
            f"{label}, {KIND_LABELS[kind]}: undefined (this model gives the answer nearly the reference's probability)."
        )
    where = f"{spot.group} token, layer {spot.layer}"
    if analysis == "patching":
        early = early_last_subject(cells)
        return (
            f"{label}, {KIND_LABELS[kind]}: strongest at the {where} ({spot.value:.0%} restored); "
            f"last subject token in the first half of the layers: {early:.0%} on average."
        )
    return (
        f"{label}, {KIND_LABELS[kind]}: away from the last token, the largest drop is at the {where} "
        f"({spot.value:.0%} of p(answer) lost); "
        f"the top 5% of cells hold {spot.concentration:.0%} of the effect."
    )


def token_view(results: dict, method: str) -> tuple[Figure, list[str]] | None:
    """Residual patching of the first sampled prompt of the Failure subset (else Robust), per
    token and layer, one panel per setting; only the last ``MAX_TOKENS`` tokens of a long prompt."""
    for subset in ("failure", "robust"):
        key = f"{method}:{subset}"
        columns = [
            s for s in _columns(results, key, "patching") if s["method"] == method and "example" in s["causal"][key]
        ]
        if columns:
            break
    else:
        return None
    example = columns[0]["causal"][key]["example"]
    tokens = example["tokens"][-MAX_TOKENS:]
    fig, axes = plt.subplots(
        1,
        len(columns),
        figsize=(1.6 + 3.2 * len(columns), 1.2 + 0.28 * len(tokens)),
        squeeze=False,
        sharey=True,
        layout="constrained",
    )
    for ax, setting in zip(axes[0], columns):
        grid = from_json(setting["causal"][key]["example"]["restoration"])[:, -len(tokens) :]
        image = ax.imshow(np.clip(grid.T, 0, 1), aspect="auto", cmap="Purples", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(setting["label"], fontsize=9)
        ax.set_yticks(range(len(tokens)), [repr(token) for token in tokens], fontsize=8)
        ax.set_xlabel("layer")
    fig.colorbar(image, ax=axes, label="restoration", shrink=0.8)
    fig.suptitle(f"Residual patching per token, {subset.capitalize()} subset, {method.upper()}")
    text, total = "".join(tokens), len(example["tokens"])
    prompt = f"Prompt {text!r}"
    if total > len(tokens):
        prompt = f"Prompt {'…' + text!r} (only its last {len(tokens)} of {total} tokens drawn)"
    return fig, [f"{prompt}, answer {example['target']!r}: each cell patches one token's residual at one layer."]
