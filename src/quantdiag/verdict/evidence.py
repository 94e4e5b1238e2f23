"""The evidence of docs/verdict.md, read off results.json: each signature's value for one compared
model, with the reference's, on the subset where the damage shows (the model's Failure subset;
its Robust subset when it fails nothing). Pure functions of the results, so a verdict can be
recomputed, or checked by hand, from results.json alone."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from quantdiag.analysis.effects import hotspot
from quantdiag.analysis.similarity import CKA_MIN_PROMPTS
from quantdiag.verdict.thresholds import COPY_DEPTH, EARLY_DIVISOR


@dataclass(frozen=True)
class Measured:
    """A signature's value for the compared model and for the reference (``None``: not defined
    for the reference, e.g. the error of a model against itself)."""

    name: str
    value: float
    reference: float | None


#: A reader: (results, setting, subset key) -> (value, reference value), or None if not measured.
Reader = Callable[[dict, dict, str], tuple[float, float | None] | None]


def subset_key(results: dict, setting: dict) -> str | None:
    """``{method}:failure``, or ``{method}:robust`` when the Failure subset is empty."""
    counts = results["subsets"].get(setting["method"])
    if not counts or not counts["failure"] + counts["robust"]:
        return None
    return f"{setting['method']}:{'failure' if counts['failure'] else 'robust'}"


def measure(results: dict, setting: dict) -> list[Measured]:
    """Every signature the run measured for ``setting``, in the order of ``READERS``."""
    key = subset_key(results, setting)
    if key is None:
        return []
    measured = []
    for name, read in READERS.items():
        pair = read(results, setting, key)
        if pair is not None and np.isfinite(pair[0]):
            measured.append(
                Measured(name, round(float(pair[0]), 6), None if pair[1] is None else round(float(pair[1]), 6))
            )
    return measured


def _mean(values: list) -> float:
    array = np.array(values, dtype=float)
    return float(np.nanmean(array)) if np.isfinite(array).any() else float("nan")


def _lens_rank(results: dict, setting: dict, key: str):
    """Best median rank of the answer over the layers, as a share of the vocabulary."""
    curve, reference = setting["lens"].get(key), results["settings"][0]["lens"].get(key)
    if curve is None:
        return None
    vocabulary = results["model"]["vocab_size"]
    return min(curve["median_rank"]) / vocabulary, None if reference is None else min(
        reference["median_rank"]
    ) / vocabulary


def _patching(results: dict, setting: dict, key: str):
    """Strongest restoration by the reference's residual stream at one (layer, token group); the
    last token's last quarter of layers is left out (it copies the reference's output)."""
    resid = ((setting.get("causal") or {}).get(key, {}).get("patching") or {}).get("resid")
    if resid is None:
        return None
    spot = hotspot(np.array(resid["restoration"], dtype=float), skip_last_from=COPY_DEPTH)
    return None if spot is None else (spot.value, None)


def cka_diagonal(summary: dict) -> np.ndarray:
    """Per layer, the CKA of the reference's layer with the model's same layer (residual stream,
    last subject token), from one subset's representations summary."""
    return np.diag(np.array(summary["cka"]["resid"]["subject"], dtype=float))


def _cka(results: dict, setting: dict, key: str):
    """Mean CKA diagonal, on subsets of at least ``CKA_MIN_PROMPTS`` prompts (below, CKA means nothing)."""
    summary = (setting.get("representations") or {}).get(key)
    method, subset = key.split(":")
    if summary is None or results["subsets"][method][subset] < CKA_MIN_PROMPTS:
        return None
    reference = (results["settings"][0].get("representations") or {}).get(key)
    return cka_diagonal(summary).mean(), None if reference is None else cka_diagonal(reference).mean()


def _subspace(curve: str, reference: float | None) -> Reader:
    """Mean over layers of a subspace curve above chance, (s - k/d) / (1 - k/d): two random
    k-dimensional subspaces of a d-dimensional space overlap k/d."""

    def read(results: dict, setting: dict, key: str):
        subspaces = ((setting.get("representations") or {}).get(key) or {}).get("subspaces")
        if subspaces is None:
            return None
        chance = np.array(subspaces["subject"]["k"], dtype=float) / results["model"]["hidden_size"]
        above = (np.array(subspaces["subject"][curve], dtype=float) - chance) / (1 - chance)
        return _mean(above.tolist()), reference

    return read


def _component(metric: str, reference: float) -> Reader:
    def read(results: dict, setting: dict, key: str):
        curves = (setting.get("components") or {}).get(key)
        return None if curves is None or metric not in curves else (_mean(curves[metric]), reference)

    return read


def _early_damage(results: dict, setting: dict, key: str):
    """Domino accuracy after the first L/8 blocks, on the Robust and Failure prompts together."""
    sensitivity = setting.get("sensitivity")
    if sensitivity is None:
        return None
    blocks = max(1, results["model"]["n_layers"] // EARLY_DIVISOR)
    counts = results["subsets"][setting["method"]]
    curves = sensitivity["domino"]
    kept = sum(counts[name] * curves[name][blocks - 1] for name in curves)
    return kept / sum(counts[name] for name in curves), 1.0


def _repairs(results: dict, setting: dict, key: str):
    """Best Failure-subset accuracy of the repairs (the baseline row is no repair)."""
    rows = (setting.get("repairs") or {}).get("rows")
    accuracies = [row["failure"] for row in rows or () if row["repair"] != "baseline" and row["failure"] is not None]
    return (max(accuracies), 1.0) if accuracies else None


READERS: dict[str, Reader] = {
    "lens_rank": _lens_rank,
    "patching": _patching,
    "cka_diagonal": _cka,
    "activation_subspace": _subspace("activation", 1.0),
    "error_alignment": _subspace("error", None),
    "sign_flip": _component("sign_flip", 0.0),
    "jaccard": _component("jaccard", 1.0),
    "value_cosine": _component("value_cosine", 1.0),
    "early_damage": _early_damage,
    "repairs": _repairs,
}
