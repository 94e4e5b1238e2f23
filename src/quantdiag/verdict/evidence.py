"""The evidence of docs/verdict.md, read off results.json: each signature's value for one compared
model, with the reference's, its interval over prompts and the noise floor's value, on the subset
where the damage shows (the model's Failure subset; its Robust subset when the Failure subset is
too small). Pure functions of the results, so a verdict can be recomputed, or checked by hand,
from results.json alone."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from quantdiag.analysis.effects import early_last_subject
from quantdiag.analysis.resample import interval, mean_interval, share_interval
from quantdiag.analysis.similarity import CKA_MIN_PROMPTS, above_chance
from quantdiag.verdict.thresholds import BY_NAME, FLOOR_BITS, MIN_SUBSET, early_blocks, floor_shift


@dataclass(frozen=True)
class Measured:
    """A signature's value for the compared model, the reference's (``None``: not defined for the
    reference), its interval over prompts (``None``: none measured), the noise floor's value
    (``None``: no floor) and the line it is judged against (the threshold moved by the floor)."""

    name: str
    value: float
    reference: float | None
    interval: tuple[float, float] | None = None
    floor: float | None = None

    @property
    def threshold(self) -> float:
        signature = BY_NAME[self.name]
        return round(signature.threshold + floor_shift(signature, self.floor), 6)

    @property
    def vote(self) -> str | None:
        """ "collapse" or "intact"; ``None`` when the interval straddles the line (no vote)."""
        signature = BY_NAME[self.name]
        if self.interval is not None and min(self.interval) <= self.threshold <= max(self.interval):
            return None
        return "collapse" if signature.votes_collapse(self.value, self.threshold) else "intact"

    @property
    def margin(self) -> float:
        """Signed distance past the line (+ intact), ``Signature.margin``."""
        return BY_NAME[self.name].margin(self.value, self.threshold)


#: (value, reference value, interval), or None if not measured.
Reading = tuple[float, float | None, tuple[float, float] | None]
Reader = Callable[[dict, dict, str], Reading | None]


def subset_key(results: dict, setting: dict) -> str | None:
    """``{method}:failure``, or ``{method}:robust`` when the Failure subset holds fewer than
    ``MIN_SUBSET`` prompts; ``None`` when neither holds that many."""
    counts = results["subsets"].get(setting["method"])
    if not counts:
        return None
    name = next((name for name in ("failure", "robust") if counts[name] >= MIN_SUBSET), None)
    return None if name is None else f"{setting['method']}:{name}"


def floor_setting(results: dict, setting: dict) -> dict | None:
    """The noise floor's setting: the run's own quantization of ``setting``'s method at
    ``FLOOR_BITS`` or more (the most bits first); ``None`` when the run has none."""
    candidates = [
        s
        for s in results["settings"][1:]
        if s["method"] == setting["method"] and s.get("bits", 0) >= FLOOR_BITS and not s["key"].startswith("ckpt")
    ]
    return max(candidates, key=lambda s: s["bits"], default=None)


def measure(results: dict, setting: dict) -> list[Measured]:
    """Every signature the run measured for ``setting``, in the order of ``READERS``, with the
    noise floor's value where the floor setting measured it too."""
    key = subset_key(results, setting)
    if key is None:
        return []
    floor = floor_setting(results, setting)
    measured = []
    for name, read in READERS.items():
        reading = read(results, setting, key)
        if reading is None or not np.isfinite(reading[0]):
            continue
        floor_reading = None if floor is None else read(results, floor, key)
        value, reference, bounds = reading
        measured.append(
            Measured(
                name,
                round(float(value), 6),
                None if reference is None else round(float(reference), 6),
                None if bounds is None else (round(float(bounds[0]), 6), round(float(bounds[1]), 6)),
                None if floor_reading is None else round(float(floor_reading[0]), 6),
            )
        )
    return measured


def _prompt_values(setting: dict, key: str) -> dict:
    return (setting.get("prompt_values") or {}).get(key) or {}


def _lens_rank(results: dict, setting: dict, key: str) -> Reading | None:
    """Best median rank of the answer over the layers, as a share of the vocabulary."""
    curve, reference = setting["lens"].get(key), results["settings"][0]["lens"].get(key)
    if curve is None:
        return None
    vocabulary = results["model"]["vocab_size"]
    ranks = _prompt_values(setting, key).get("lens_rank")
    bounds = None
    if ranks is not None:
        ranks = np.array(ranks, dtype=float)
        bounds = interval(lambda rows: float(np.median(ranks[rows], axis=0).min() / vocabulary), len(ranks))
    share = None if reference is None else min(reference["median_rank"]) / vocabulary
    return min(curve["median_rank"]) / vocabulary, share, bounds


def _patching(results: dict, setting: dict, key: str) -> Reading | None:
    """Mean restoration by the reference's residual state at the last subject token over the
    first half of the layers (the paper's subject patching, ``early_last_subject``)."""
    resid = ((setting.get("causal") or {}).get(key, {}).get("patching") or {}).get("resid")
    if resid is None:
        return None
    return early_last_subject(np.array(resid["restoration"], dtype=float)), None, None


def cka_diagonal(summary: dict) -> np.ndarray:
    """Per layer, the CKA of the reference's layer with the model's same layer (residual stream,
    last subject token), from one subset's representations summary."""
    return np.diag(np.array(summary["cka"]["resid"]["subject"], dtype=float))


def _intervals(summary: dict) -> dict:
    return summary.get("intervals") or {}


def _cka(results: dict, setting: dict, key: str) -> Reading | None:
    """Mean CKA diagonal, on subsets of at least ``CKA_MIN_PROMPTS`` prompts."""
    summary = (setting.get("representations") or {}).get(key)
    method, subset = key.split(":")
    if summary is None or results["subsets"][method][subset] < CKA_MIN_PROMPTS:
        return None
    reference = (results["settings"][0].get("representations") or {}).get(key)
    value = cka_diagonal(summary).mean()
    return value, None if reference is None else cka_diagonal(reference).mean(), _intervals(summary).get("cka")


def _subspace(curve: str, reference: float | None) -> Reader:
    """Mean over layers of a subspace curve above chance (``similarity.above_chance``)."""

    def read(results: dict, setting: dict, key: str) -> Reading | None:
        summary = (setting.get("representations") or {}).get(key) or {}
        subspaces = summary.get("subspaces")
        if subspaces is None:
            return None
        above = above_chance(subspaces["subject"][curve], subspaces["subject"]["k"], results["model"]["hidden_size"])
        return float(np.nanmean(above)), reference, _intervals(summary).get(curve)

    return read


def _component(metric: str, reference: float, early: bool = False) -> Reader:
    """Mean over the layers (``early``: the early blocks only) of a component curve, its interval
    from the per-prompt means over the same layers."""

    def read(results: dict, setting: dict, key: str) -> Reading | None:
        curves = (setting.get("components") or {}).get(key)
        if curves is None or metric not in curves:
            return None
        layers = early_blocks(results["model"]["n_layers"]) if early else None
        values = np.array(curves[metric][:layers], dtype=float)
        if not np.isfinite(values).any():
            return None
        per_prompt = _prompt_values(setting, key).get(metric)
        bounds = None
        if per_prompt is not None:
            bounds = mean_interval(np.nanmean(np.array(per_prompt, dtype=float)[:, :layers], axis=1))
        return float(np.nanmean(values)), reference, bounds

    return read


def _early_damage(results: dict, setting: dict, key: str) -> Reading | None:
    """Domino accuracy after the early blocks, on the Robust and Failure prompts together."""
    sensitivity = setting.get("sensitivity")
    if sensitivity is None:
        return None
    blocks = early_blocks(results["model"]["n_layers"])
    counts = results["subsets"][setting["method"]]
    curves = sensitivity["domino"]
    prompts = sum(counts[name] for name in curves)
    kept = sum(counts[name] * curves[name][blocks - 1] for name in curves) / prompts
    return kept, 1.0, share_interval(kept, prompts)


def _repairs(results: dict, setting: dict, key: str) -> Reading | None:
    """Best Failure-subset accuracy of the repairs (the baseline row is no repair)."""
    table = setting.get("repairs") or {}
    accuracies = [
        row["failure"] for row in table.get("rows") or () if row["repair"] != "baseline" and row["failure"] is not None
    ]
    if not accuracies:
        return None
    best = max(accuracies)
    return best, 1.0, share_interval(best, table.get("test_prompts", 0))


READERS: dict[str, Reader] = {
    "lens_rank": _lens_rank,
    "patching": _patching,
    "cka_diagonal": _cka,
    "activation_subspace": _subspace("activation", 1.0),
    "error_alignment": _subspace("error", None),
    "sign_flip": _component("sign_flip", 0.0),
    "jaccard": _component("jaccard", 1.0),
    "value_cosine": _component("value_cosine", 1.0),
    "focus_divergence": _component("focus_divergence", 0.0, early=True),
    "early_damage": _early_damage,
    "repairs": _repairs,
}
