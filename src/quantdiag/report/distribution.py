"""The report's distribution section (docs/methods.md, Distribution damage): the per-position KLD
from the reference of every setting as a histogram on a log axis, and a reading with the statistics
llama.cpp reports."""

from __future__ import annotations

from collections.abc import Iterator

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter

from quantdiag.report.plots import Section


def distribution_sections(results: dict) -> Iterator[Section]:
    """One figure when the run measured the distribution damage."""
    settings = [s for s in results["settings"][1:] if s.get("distribution")]
    if settings:
        yield ("distribution", "Next-token distribution damage", kld_histograms(results, settings), _reading(settings))


def kld_histograms(results: dict, settings: list[dict]) -> Figure:
    """Share of positions per KLD bin, one step line per setting; positions below the lowest edge
    (the same distribution as the reference's, to float precision) join the first bin, those above the last."""
    edges = np.array(results["distribution"]["histogram_edges"])
    fig, ax = plt.subplots(figsize=(7, 3.6), layout="constrained")
    used = np.zeros(len(edges) - 1, dtype=bool)
    for setting in settings:
        summary = setting["distribution"]
        counts = np.array(summary["kld_histogram"], dtype=float) / summary["positions"]
        shares = np.concatenate([[counts[0] + counts[1]], counts[2:-2], [counts[-2] + counts[-1]]])
        ax.stairs(shares, edges, label=f"{setting['label']} (mean {summary['kld_mean']:.3g})")
        used |= shares > 0
    bins = np.flatnonzero(used)
    ax.set_xscale("log")
    ax.set_xlim(edges[max(bins[0] - 2, 0)], edges[min(bins[-1] + 3, len(edges) - 1)])
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("KL divergence from the reference per position (nats)")
    ax.set_ylabel("share of positions")
    ax.legend(fontsize=8)
    return fig


def _reading(settings: list[dict]) -> str:
    def line(setting: dict) -> str:
        d = setting["distribution"]
        return (
            f"{setting['label']}: mean KLD {d['kld_mean']:.4g} (median {d['kld_median']:.3g}, "
            f"99.9% {d['kld_p999']:.3g}), "
            f"same top token {d['top_token_agreement']:.1%}, perplexity x{d['perplexity_ratio']:.3f}"
        )

    return "; ".join(line(setting) for setting in settings) + "."
