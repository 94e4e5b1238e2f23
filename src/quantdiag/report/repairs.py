"""The report's repair section (docs/methods.md, Repairs): per method, the paper's Table 1 as an annotated
heatmap (repairs x settings; accuracy and average bits in each cell) on the Failure test split
and the Robust subset, with a one-line reading per setting."""

from __future__ import annotations

from collections.abc import Iterator

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from quantdiag.analysis.repair_names import REPAIR_NAMES
from quantdiag.analysis.repairs import MIN_FAILURE
from quantdiag.report.plots import Section
from quantdiag.report.readings import ran

LABELS = {name: "baseline" if name == "baseline" else f"+ {words}" for name, words in REPAIR_NAMES.items()}


def repair_sections(results: dict) -> Iterator[Section]:
    """One repair table per method with repair results; a line instead where its Failure subset
    is too small to split."""
    for method in results["subsets"]:
        settings = [s for s in results["settings"] if s["method"] == method and s.get("repairs")]
        failure = results["subsets"][method]["failure"]
        if settings:
            yield (f"repairs-{method}", f"Repairs, {method.upper()}", *repair_table(settings))
        elif ran(results, "repairs") and failure < MIN_FAILURE:
            reason = (
                f"Not run: the repairs need {MIN_FAILURE} Failure prompts or more (a dev split to tune on, "
                f"a test split to score); this subset has {failure}."
            )
            yield (f"repairs-{method}", f"Repairs, {method.upper()}", None, reason)


def repair_table(settings: list[dict]) -> tuple[Figure, list[str]]:
    """Left: accuracy on the Failure subset's test split; right: on the Robust subset."""
    repairs = [row["repair"] for row in settings[0]["repairs"]["rows"]]
    fig, axes = plt.subplots(1, 2, figsize=(5 + 2.6 * len(settings), 1.4 + 0.5 * len(repairs)), layout="constrained")
    for ax, subset in zip(axes, ("failure", "robust")):
        values = np.array(
            [[_row(s, r)[subset] if _row(s, r)[subset] is not None else np.nan for s in settings] for r in repairs],
            dtype=float,
        )
        image = ax.imshow(100 * values, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
        for (i, j), value in np.ndenumerate(values):
            bits = _row(settings[j], repairs[i])["average_bits"]
            ax.text(
                j,
                i,
                f"{'–' if np.isnan(value) else f'{value:.0%}'}\n{bits:.2f} bits",
                ha="center",
                va="center",
                fontsize=7.5,
            )
        ax.set_xticks(range(len(settings)), [s["label"] for s in settings], fontsize=8)
        ax.set_yticks(range(len(repairs)), [LABELS[r] for r in repairs], fontsize=8)
        prompts = settings[0]["repairs"]["test_prompts"] if subset == "failure" else None
        ax.set_title(
            "Failure subset, test split" + (f" ({prompts} prompts)" if prompts else "")
            if subset == "failure"
            else "Robust subset",
            fontsize=10,
        )
    fig.colorbar(image, ax=axes, label="accuracy (%)", shrink=0.8)
    fig.suptitle("Training-free repairs: accuracy and average bits (reference: 100% on both subsets)")
    return fig, [_reading(setting) for setting in settings]


def _row(setting: dict, repair: str) -> dict:
    return next(row for row in setting["repairs"]["rows"] if row["repair"] == repair)


def _reading(setting: dict) -> str:
    """The best repair on the Failure test split, with its cost; the paper expects 4-bit to be
    recoverable and 2-bit not."""
    table = setting["repairs"]
    rows = [row for row in table["rows"] if row["failure"] is not None]
    baseline = _row(setting, "baseline")
    best = max(rows, key=lambda row: (row["failure"], -row["average_bits"]))
    robust = "" if best["robust"] is None else f", Robust {best['robust']:.0%}"
    start = f"{setting['label']}: baseline {baseline['failure']:.0%} on the Failure test split"
    alpha = "" if table["alpha"] is None else f", alpha = {table['alpha']:g}"
    chosen = f"(m = {table['blocks']} blocks{alpha})"
    if best["failure"] <= baseline["failure"]:
        return f"{start}; no repair does better {chosen}."
    repair = f"{LABELS[best['repair']]} {best['failure']:.0%}{robust}"
    return f"{start}; best {repair} at {best['average_bits']:.2f} bits {chosen}."
