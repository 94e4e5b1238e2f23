"""One-line readings under each figure: what a reader should see in it, with the numbers."""

from __future__ import annotations

from quantdiag.analysis.lens import SIGNAL_PROB, signal_layer


def ran(results: dict, *analyses: str) -> bool:
    """Whether the run asked for any of ``analyses``."""
    return any(a in results["config"]["analyses"] for a in analyses)


def empty_subset(results: dict, method: str, subset: str) -> str:
    """Why ``method`` has nothing to show on its empty ``subset``."""
    defined_by = results["subsets"][method]["defined_by"]
    if subset == "failure":
        return f"The Failure subset is empty: {defined_by} recalls every fact the reference recalls."
    return f"The Robust subset is empty: {defined_by} recalls none of the facts the reference recalls."


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def summary_rows(results: dict) -> list[dict]:
    """The summary table: one row per setting, accuracy against the reference."""
    reference = results["settings"][0]["recall"]["accuracy"]
    rows = []
    for setting in results["settings"]:
        recall = setting["recall"]
        robustness = recall["robustness_accuracy"]
        rows.append(
            {
                "label": setting["label"],
                "average_bits": f"{setting['average_bits']:.2f}",
                "accuracy": _pct(recall["accuracy"]),
                "delta": "" if setting["method"] is None else f"{100 * (recall['accuracy'] - reference):+.1f} pts",
                "robustness": "n/a" if robustness is None else _pct(robustness),
                "median_rank": f"{recall['median_rank']:g}",
                "top": ", ".join(repr(token) for token, _ in recall["top_predictions"][:3]),
                **_distribution_cells(setting.get("distribution")),
                "tasks": [task_score(row) for row in (setting.get("tasks") or {}).values()],
            }
        )
    return rows


def task_score(row: dict) -> str:
    """A task's score as a percentage of its items (its metric is an accuracy or an exact match)."""
    return f"{_pct(row['value'])} of {row['items']}"


def _distribution_cells(distribution: dict | None) -> dict:
    """Mean KLD from the reference and the perplexity ratio, where the distribution analysis ran."""
    if distribution is None:
        return {}
    return {"kld": f"{distribution['kld_mean']:.4g}", "ppl_ratio": f"{distribution['perplexity_ratio']:.3f}"}


def cliff_reading(results: dict) -> str:
    reference = results["settings"][0]["recall"]["accuracy"]
    parts = [f"Reference {_pct(reference)}"]
    for setting in results["settings"][1:]:
        parts.append(f"{setting['label']} {_pct(setting['recall']['accuracy'])}")
    return "; ".join(parts) + "."


def rank_reading(results: dict) -> str:
    def beyond(setting: dict) -> str:
        hist = setting["recall"]["rank_histogram"]
        return _pct(hist[">1000"] / max(1, sum(hist.values())))

    reference = results["settings"][0]
    lowest = min(results["settings"][1:], key=lambda s: s["bits"])
    return (
        f"The answer ranks beyond 1000 for {beyond(reference)} of facts in the reference and "
        f"{beyond(lowest)} in {lowest['label']}: a rank drop keeps the answer near the top, a collapse loses it."
    )


def lens_reading(results: dict, method: str) -> str:
    """Where the answer's signal appears on the Failure subset, per setting."""
    key = f"{method}:failure"
    parts = []
    for setting in [results["settings"][0], *[s for s in results["settings"][1:] if s["method"] == method]]:
        curve = setting["lens"].get(key)
        if curve is None:
            continue
        layer = signal_layer(curve)
        peak = max(curve["mean_prob"])
        where = f"p>={SIGNAL_PROB:g} from layer {layer}" if layer is not None else f"never reaches p={SIGNAL_PROB:g}"
        parts.append(f"{setting['label']}: {where} (peak {peak:.2f}, final median rank {curve['median_rank'][-1]:g})")
    if not parts:
        return empty_subset(results, method, "failure")
    return "Failure subset: " + "; ".join(parts) + "."
