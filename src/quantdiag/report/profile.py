"""The report's appendix of a profiled run (``--profile``): where the run's time and memory went,
stage by stage (docs/performance.md)."""

from __future__ import annotations

from collections.abc import Iterator

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from quantdiag.report.plots import Section

COMPUTED_COLOR = "#3182bd"
CACHED_COLOR = "#bdbdbd"


def profile_sections(results: dict) -> Iterator[Section]:
    """One figure of wall time per stage kind, when the run was profiled."""
    profile = results.get("profile")
    if profile and profile["stages"]:
        yield ("profile", "Appendix: where the run's time went", stage_times(profile), profile_reading(profile))


def stage_totals(profile: dict) -> dict[str, dict[str, float]]:
    """Stage kind -> wall seconds computed and read from caches, and its highest peak memory, in run order."""
    totals: dict[str, dict[str, float]] = {}
    for cost in profile["stages"]:
        total = totals.setdefault(cost["stage"], {"computed": 0.0, "cached": 0.0, "peak_rss_gib": 0.0})
        total["cached" if cost["cached"] else "computed"] += cost["wall_s"]
        total["peak_rss_gib"] = max(total["peak_rss_gib"], cost["peak_rss_gib"])
    return totals


def stage_times(profile: dict) -> Figure:
    """Horizontal bars, one per stage kind: seconds computed, then seconds spent reading caches."""
    totals = stage_totals(profile)
    names = list(totals)
    fig, ax = plt.subplots(figsize=(6.4, 1.2 + 0.35 * len(names)), layout="constrained")
    computed = [totals[name]["computed"] for name in names]
    cached = [totals[name]["cached"] for name in names]
    ax.barh(names, computed, color=COMPUTED_COLOR, label="computed")
    ax.barh(names, cached, left=computed, color=CACHED_COLOR, label="read from cache")
    for row, name in enumerate(names):
        ax.annotate(
            f" {totals[name]['peak_rss_gib']:.1f} GiB",
            (computed[row] + cached[row], row),
            va="center",
            fontsize=8,
        )
    ax.invert_yaxis()
    ax.set_xlabel("wall time (s); label: peak resident memory")
    ax.set_title(f"Stages of the run (total {profile['total_s']:.0f} s)")
    ax.legend(loc="lower right", fontsize=8)
    return fig


def profile_reading(profile: dict) -> str:
    """The run's total, its costliest stage kind and share, and its peak memory."""
    totals = stage_totals(profile)
    costliest = max(totals, key=lambda name: totals[name]["computed"] + totals[name]["cached"])
    seconds = totals[costliest]["computed"] + totals[costliest]["cached"]
    peak = max(profile["stages"], key=lambda cost: cost["peak_rss_gib"])
    return (
        f"The run took {profile['total_s']:.0f} s; {costliest} took the most, {seconds:.0f} s "
        f"({100 * seconds / profile['total_s']:.0f}%). Peak resident memory {peak['peak_rss_gib']:.1f} GiB "
        f"(in {peak['stage']})."
    )
