"""The report's sensitivity section (docs/methods.md, Sensitivity): per method, the domino and single-block curves,
the component table and signal injection, each with a one-line reading per setting."""

from __future__ import annotations

from collections.abc import Iterator

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from quantdiag.analysis.effects import from_json
from quantdiag.report.plots import BITS_COLORS, Section

SUBSETS = ("robust", "failure")
TESTS = {"domino": "blocks 0..k quantized", "single": "block k alone quantized"}


def sensitivity_sections(results: dict) -> Iterator[Section]:
    """Curves and component table per method with sensitivity data, then its signal injection."""
    for method in results["subsets"]:
        settings = [s for s in results["settings"] if s["method"] == method and s.get("sensitivity")]
        if settings:
            yield (f"sensitivity-{method}", f"Where the damage starts, {method.upper()}", *sensitivity_curves(settings))
            mapped = [s for s in settings if s["sensitivity"]["components"]]
            if mapped:
                yield (
                    f"components-table-{method}",
                    f"Quantizing one component, {method.upper()}",
                    *component_table(mapped),
                )
        injection = (results.get("injection") or {}).get(method)
        if injection:
            labels = {s["key"]: s["label"] for s in results["settings"]}
            yield (
                f"injection-{method}",
                f"Signal injection into {labels[injection['low']]}",
                *injection_figure(injection, labels),
            )


def sensitivity_curves(settings: list[dict]) -> tuple[Figure, list[str]]:
    """Rows: the domino and (when swept) single-block tests; columns: Robust and Failure accuracy;
    a curve per bit width, over the blocks swept."""
    tests = {test: what for test, what in TESTS.items() if any(s["sensitivity"][test] for s in settings)}
    fig, axes = plt.subplots(
        len(tests), 2, figsize=(11, 3.3 * len(tests)), layout="constrained", sharex=True, sharey=True, squeeze=False
    )
    for row, (test, what) in enumerate(tests.items()):
        for col, subset in enumerate(SUBSETS):
            ax = axes[row, col]
            for setting in settings:
                curve = (setting["sensitivity"][test] or {}).get(subset)
                if curve is not None:
                    ax.plot(
                        100 * np.array(curve, dtype=float),
                        marker=".",
                        color=BITS_COLORS.get(setting["bits"]),
                        label=setting["label"],
                    )
            ax.set_title(f"{subset.capitalize()} subset: {what}", fontsize=10)
            ax.set_ylim(-3, 103)
            ax.grid(alpha=0.3)
        axes[row, 0].set_ylabel("accuracy (%)")
    for ax in axes[-1]:
        ax.set_xlabel("block k")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # an early sweep has a few blocks
    max(axes.flat, key=lambda ax: len(ax.get_lines())).legend(fontsize=8)
    fig.suptitle("Accuracy with some blocks quantized, the rest at reference precision (reference: 100%)")
    return fig, [_domino_reading(setting) for setting in settings]


def _domino_reading(setting: dict) -> str:
    """The half-damage block, and the Robust accuracy with the first blocks quantized (the
    paper's Table 2)."""
    summary = setting["sensitivity"]
    block, swept = summary["half_damage_block"], summary["swept_blocks"]
    onset = "no accuracy lost" if block is None else f"half of the accuracy lost by block {block}"
    if block is None and any(accuracy < 1 for accuracy in summary["whole"].values()):
        onset = (
            f"less than half of the accuracy lost by block {swept - 1} "
            "(the early blocks; `quantdiag sensitivity` sweeps them all)"
        )
    robust = summary["domino"].get("robust")
    if robust is None:
        return f"{setting['label']}: {onset}."
    first = ", ".join(f"0..{k}: {robust[k]:.0%}" for k in range(min(3, len(robust))))
    return f"{setting['label']}: {onset}; Robust accuracy with blocks {first} quantized."


def component_table(settings: list[dict]) -> tuple[Figure, list[str]]:
    """The paper's Table 5 as annotated heatmaps: component groups x settings, per subset."""
    groups = list(settings[0]["sensitivity"]["components"])
    fig, axes = plt.subplots(
        1, 2, figsize=(4 + 2.2 * len(settings), 0.9 + 0.42 * len(groups)), layout="constrained", squeeze=False
    )
    for ax, subset in zip(axes[0], SUBSETS):
        values = np.array(
            [[s["sensitivity"]["components"][g].get(subset, np.nan) for s in settings] for g in groups], dtype=float
        )
        image = ax.imshow(100 * values, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
        for (i, j), value in np.ndenumerate(values):
            ax.text(j, i, "–" if np.isnan(value) else f"{value:.0%}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(settings)), [s["label"] for s in settings], fontsize=8)
        ax.set_yticks(range(len(groups)), groups, fontsize=8)
        ax.set_title(f"{subset.capitalize()} subset", fontsize=10)
    fig.colorbar(image, ax=axes, label="accuracy (%)", shrink=0.8)
    fig.suptitle("One component group quantized in every block, the rest at reference precision")
    return fig, [_component_reading(setting) for setting in settings]


def _component_reading(setting: dict) -> str:
    """The group whose quantization alone costs the most (mean of the accuracies of the subsets
    measured: Robust and Failure, or the one that is not empty)."""
    groups = setting["sensitivity"]["components"]
    accuracy = {g: np.mean(list(v.values())) for g, v in groups.items() if v}
    worst = min((g for g in accuracy if g != "all"), key=accuracy.get)
    measured = [subset.capitalize() for subset in SUBSETS if subset in groups["all"]]
    over = "mean of the Robust and Failure accuracies"
    if len(measured) == 1:
        over = f"{measured[0]} accuracy (the other subset is empty)"
    every = f"every linear: {accuracy['all']:.0%}"
    if accuracy[worst] >= 1.0:
        return f"{setting['label']}: no group alone costs accuracy ({every}), {over}."
    return f"{setting['label']}: the most damaging group is {worst} ({accuracy[worst]:.0%}; {every}), {over}."


def injection_figure(injection: dict, labels: dict[str, str]) -> tuple[Figure, list[str]]:
    """Per high setting: cosine of the last token's residual with the reference's (rows: k, the
    number of leading blocks at high precision; columns: layer); last panel: accuracy vs k."""
    highs = injection["highs"]
    cosine, accuracy = from_json(injection["cosine"]), from_json(injection["accuracy"])
    fig, axes = plt.subplots(
        1, len(highs) + 1, figsize=(3.6 * (len(highs) + 1), 3.8), layout="constrained", squeeze=False
    )
    for ax, high, grid in zip(axes[0], highs, cosine):
        image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=1, origin="lower", aspect="auto")
        ax.set_title(f"blocks < k at {labels[high]}", fontsize=10)
        ax.set_xlabel("layer")
        ax.set_ylabel("k")
    fig.colorbar(image, ax=axes[0, : len(highs)], label="cosine with reference, last token", shrink=0.8)
    ax = axes[0, -1]
    for high, curve in zip(highs, accuracy):
        ax.plot(100 * curve, marker=".", label=labels[high])
    ax.set(
        xlabel="k (leading blocks at high precision)",
        ylabel="accuracy (%)",
        title="Failure-subset accuracy",
        ylim=(-3, 103),
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(f"Signal injection: the rest at {labels[injection['low']]}")
    return fig, [_injection_reading(labels[h], c, a) for h, c, a in zip(highs, cosine, accuracy)]


def _injection_reading(label: str, cosine: np.ndarray, accuracy: np.ndarray) -> str:
    half = np.flatnonzero(accuracy >= accuracy[-1] / 2)
    reach = (
        f"reaches half of its ceiling ({accuracy[-1]:.0%}) at k = {half[0]}"
        if accuracy[-1] > 0 and len(half)
        else "stays at 0"
    )
    return (
        f"From {label}: last-layer cosine {cosine[0, -1]:.2f} at k = 0, {cosine[-1, -1]:.2f} with every block "
        f"high; accuracy {reach}."
    )
