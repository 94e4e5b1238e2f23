"""The report's component section (docs/methods.md, Components): per method, attention and FFN metrics per layer on
the Failure subset, reference and every setting together, with a one-line reading."""

from __future__ import annotations

from collections.abc import Iterator

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from quantdiag.report.plots import BITS_COLORS, REFERENCE_COLOR, Section
from quantdiag.report.readings import empty_subset, ran

PANELS = {
    "entropy_subject": "attention entropy at the last subject token",
    "entropy_last": "attention entropy at the last token",
    "focus_divergence": "focus divergence (JSD vs reference) at s",
    "sign_flip": "gate sign-flip rate at s",
    "jaccard": "top-1% neuron Jaccard vs reference at s",
    "value_cosine": "MLP output cosine vs reference at s",
}


def component_sections(results: dict) -> Iterator[Section]:
    """(id, title, figure, reading) per method whose settings have component curves; a line
    instead where its Failure subset is empty."""
    for method in results["subsets"]:
        key, title = f"{method}:failure", f"Components, {method.upper()}, Failure subset"
        rows = [
            s for s in results["settings"] if s["method"] in (None, method) and (s.get("components") or {}).get(key)
        ]
        if len(rows) > 1:
            yield (f"components-{method}", title, _figure(rows, key), _reading(rows, key))
        elif ran(results, "components") and not results["subsets"][method]["failure"]:
            yield (f"components-{method}", title, None, empty_subset(results, method, "failure"))


def _figure(settings: list[dict], key: str) -> Figure:
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.4), layout="constrained", sharex=True)
    for ax, (metric, title) in zip(axes.flat, PANELS.items()):
        for setting in settings:
            curve = setting["components"][key].get(metric)
            if curve is None:
                continue
            style = (
                {"color": REFERENCE_COLOR, "ls": "--", "zorder": 3}
                if setting["method"] is None
                else {"color": BITS_COLORS.get(setting["bits"])}
            )
            ax.plot(np.array(curve, dtype=float), label=setting["label"], **style)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("layer")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"Attention and FFN components per layer ({key.split(':')[0].upper()} Failure subset)")
    return fig


def _reading(settings: list[dict], key: str) -> str:
    """Layer means of the FFN metrics per setting: the paper's 2-bit signature is SFR > 30%,
    Jaccard near 0.1 and value cosine near 0."""

    def mean(setting: dict, metric: str) -> float:
        return float(np.nanmean(np.array(setting["components"][key][metric], dtype=float)))

    parts = [
        f"{s['label']}: sign flips {mean(s, 'sign_flip'):.0%}, Jaccard {mean(s, 'jaccard'):.2f}, value cosine "
        f"{mean(s, 'value_cosine'):.2f}"
        for s in settings
        if s["method"] is not None
    ]
    return (
        "Mean over layers. "
        + "; ".join(parts)
        + " (paper's 2-bit signature: sign flips > 30%, Jaccard ~0.1, cosine ~0)."
    )
