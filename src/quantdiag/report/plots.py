"""Figures of the report, one function a figure, each taking ``results.json`` data and returning
a matplotlib Figure with title, axis labels (and units) and a legend."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from quantdiag.analysis.recall import RANK_BUCKETS  # noqa: E402

REFERENCE_COLOR = "#222222"
BITS_COLORS = {8: "#2b8cbe", 6: "#41b6c4", 5: "#7fcdbb", 4: "#fdae61", 3: "#f46d43", 2: "#d73027", 7: "#3690c0"}
METHOD_MARKERS = {"rtn": "s", "gptq": "o", "awq": "^"}
#: The relation heatmap draws at most this many relations (a row each).
MAX_RELATIONS = 40
#: A report section: id, title, figure (``None``: the reading says why there is none), and its
#: reading (one line, or one per panel).
Section = tuple[str, str, Figure | None, str | list[str]]


def _reference(results: dict) -> dict:
    return results["settings"][0]


def _by_method(results: dict) -> dict[str, list[dict]]:
    methods: dict[str, list[dict]] = {}
    for setting in results["settings"][1:]:
        methods.setdefault(setting["method"], []).append(setting)
    return methods


def performance_cliff(results: dict) -> Figure:
    """Accuracy (primary template, solid) and robustness accuracy (paraphrases, dashed) vs bits."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0), layout="constrained")
    reference = _reference(results)["recall"]
    ax.axhline(100 * reference["accuracy"], color=REFERENCE_COLOR, lw=1, label="reference (accuracy)")
    if reference["robustness_accuracy"] is not None:
        ax.axhline(
            100 * reference["robustness_accuracy"], color=REFERENCE_COLOR, lw=1, ls="--", label="reference (robustness)"
        )
    for method, settings in _by_method(results).items():
        bits = [s["bits"] for s in settings]
        marker = METHOD_MARKERS.get(method, "o")
        line = ax.plot(
            bits, [100 * s["recall"]["accuracy"] for s in settings], marker=marker, label=f"{method.upper()} accuracy"
        )
        robust = [s["recall"]["robustness_accuracy"] for s in settings]
        if None not in robust:
            ax.plot(
                bits,
                [100 * r for r in robust],
                marker=marker,
                ls="--",
                color=line[0].get_color(),
                label=f"{method.upper()} robustness",
            )
    ax.set(xlabel="weight bits", ylabel="accuracy (%)", title="Performance cliff: factual recall vs bits")
    ax.invert_xaxis()
    ax.set_xticks(sorted({s["bits"] for s in results["settings"][1:]}))
    ax.margins(y=0.12)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def rank_histograms(results: dict) -> Figure:
    """Share of facts per rank bucket of the correct answer, one panel per method."""
    methods = _by_method(results)
    fig, axes = plt.subplots(1, len(methods), figsize=(5.2 * len(methods), 3.8), layout="constrained", squeeze=False)
    labels = [label for label, _, _ in RANK_BUCKETS]
    for ax, (method, settings) in zip(axes[0], methods.items()):
        rows = [_reference(results), *settings]
        width = 0.8 / len(rows)
        for i, setting in enumerate(rows):
            counts = np.array([setting["recall"]["rank_histogram"][label] for label in labels], dtype=float)
            color = REFERENCE_COLOR if setting["method"] is None else BITS_COLORS.get(setting["bits"])
            ax.bar(
                np.arange(len(labels)) + i * width,
                100 * counts / counts.sum(),
                width,
                label=setting["label"],
                color=color,
            )
        ax.set_xticks(np.arange(len(labels)) + 0.4 - width / 2, labels)
        ax.set(xlabel="rank of the correct answer", ylabel="facts (%)", title=f"Answer rank, {method.upper()}")
        ax.legend(fontsize=8)
    return fig


def lens_curves(results: dict, method: str) -> Figure:
    """Logit lens on the Robust and Failure subsets: mean p(answer) and median rank per layer."""
    reference = _reference(results)
    settings = _by_method(results)[method]
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.4), layout="constrained", sharex=True)
    for row, subset in enumerate(("robust", "failure")):
        key = f"{method}:{subset}"
        count = results["subsets"][method][subset]
        for setting in [reference, *settings]:
            curve = setting["lens"].get(key)
            if curve is None:
                continue
            color = REFERENCE_COLOR if setting["method"] is None else BITS_COLORS.get(setting["bits"])
            layers = np.arange(len(curve["mean_prob"]))
            axes[row, 0].plot(layers, curve["mean_prob"], color=color, label=setting["label"])
            axes[row, 1].plot(layers, curve["median_rank"], color=color, label=setting["label"])
        axes[row, 0].set(ylabel="mean p(answer)", title=f"{subset.capitalize()} subset (n={count}): answer probability")
        axes[row, 1].set(ylabel="median rank (log)", yscale="log", title=f"{subset.capitalize()} subset: answer rank")
        for ax in axes[row]:
            ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("layer")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if handles:
        axes[0, 0].legend(handles, labels, fontsize=8)
    fig.suptitle(
        f"Logit lens at the last token, {method.upper()} (subsets by {results['subsets'][method]['defined_by']})"
    )
    return fig


def relation_heatmap(results: dict) -> tuple[Figure, str]:
    """Accuracy per relation (rows) and setting (columns); of many relations only the
    ``MAX_RELATIONS`` where a compared setting loses the most against the reference."""
    settings = results["settings"]
    accuracy = {r: [s["recall"]["per_relation"][r] for s in settings] for r in settings[0]["recall"]["per_relation"]}
    relations = list(accuracy)
    if len(relations) > MAX_RELATIONS:
        loss = {r: max((accuracy[r][0] - a for a in accuracy[r][1:]), default=0.0) for r in relations}
        relations = sorted(relations, key=lambda r: -loss[r])[:MAX_RELATIONS]
    grid = np.array([accuracy[r] for r in relations])
    # Room for the tick labels: relation names beside the rows, setting labels at 45 degrees below.
    names, labels = max(map(len, relations)), max(len(s["label"]) for s in settings)
    size = (1.0 + 0.75 * len(settings) + 0.075 * names, 1.2 + 0.24 * len(relations) + 0.055 * labels)
    fig, ax = plt.subplots(figsize=size, layout="constrained")
    image = ax.imshow(100 * grid, aspect="auto", cmap="viridis", vmin=0, vmax=100)
    ax.set_xticks(range(len(settings)), [s["label"] for s in settings], rotation=45, ha="right")
    ax.set_yticks(range(len(relations)), relations)
    ax.set(title="Accuracy per relation", xlabel="setting", ylabel="relation")
    fig.colorbar(image, ax=ax, label="accuracy (%)")
    if len(relations) == len(accuracy):
        return fig, ""
    return fig, (
        f"Only {len(relations)} of the {len(accuracy)} relations are drawn: those where a compared setting loses "
        "the most accuracy against the reference, largest loss first."
    )
