"""The report's representation section (docs/methods.md, Representations): per method, on the Failure subset, layer x
layer CKA heatmaps side by side (the reference against itself, then each setting against the
reference) at the last subject token and the last token, and per-layer curves of the CKA
diagonal and the residual stream's subspace similarities, each with a one-line reading (CKA only
over 3 prompts or more)."""

from __future__ import annotations

from collections.abc import Iterator

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from quantdiag.analysis.effects import from_json
from quantdiag.analysis.representations import interval_position
from quantdiag.analysis.similarity import CKA_MIN_PROMPTS
from quantdiag.report.causal import KIND_LABELS
from quantdiag.report.plots import BITS_COLORS, REFERENCE_COLOR, Section
from quantdiag.report.readings import empty_subset, ran

POSITION_LABELS = {"subject": "last subject token", "last": "last token"}
POSITION_STYLES = {"subject": "-", "last": "--"}
#: Linear CKA over n prompts: undefined for 1 (a centred Gram matrix of zeros), 1 for any two
#: models for 2 (both centred Gram matrices are multiples of [[1, -1], [-1, 1]]).


def representation_sections(results: dict) -> Iterator[Section]:
    """(id, title, figure, readings) per method and position with CKA data, then the curves; a
    line instead where the Failure subset is empty or too small for CKA. Then the same for the
    ``--representations-on`` task's prompts, at the last token."""
    for method in results["subsets"]:
        key = f"{method}:failure"
        columns = [
            s for s in results["settings"] if s["method"] in (None, method) and key in s.get("representations", {})
        ]
        prompts = results["subsets"][method]["failure"]
        if len(columns) < 2:
            if ran(results, "representations") and not prompts:
                title = f"Representation similarity per layer, {method.upper()}, Failure subset (0 prompts)"
                yield (f"subspaces-{method}", title, None, empty_subset(results, method, "failure"))
            continue
        yield from _subset_sections(columns, key, method, f"{method.upper()}, Failure subset ({prompts} prompts)")
    for key in _task_subsets(results):
        columns = [s for s in results["settings"] if key in s.get("representations", {})]
        prompts = columns[0]["representations"][key]["prompts"]
        yield from _subset_sections(
            columns, key, key.replace(":", "-"), f"{key} ({prompts} prompts, lm-eval's contexts)"
        )


def _task_subsets(results: dict) -> list[str]:
    """The task subsets the reference's representations were measured on (``--representations-on``)."""
    return [key for key in results["settings"][0].get("representations") or {} if key.startswith("task:")]


def _subset_sections(columns: list[dict], key: str, anchor: str, what: str) -> Iterator[Section]:
    """The CKA heatmaps at each position read (or why not, under ``CKA_MIN_PROMPTS``) and the
    per-layer curves of one subset ``key``, the reference and each setting in ``columns``."""
    prompts = columns[0]["representations"][key]["prompts"]
    with_cka = prompts >= CKA_MIN_PROMPTS
    if with_cka:
        for position in _positions(columns, key):
            title = f"CKA at the {POSITION_LABELS[position]}, {what}"
            yield (f"cka-{anchor}-{position}", title, *cka_heatmaps(columns, key, position))
    else:
        yield (f"cka-{anchor}", f"CKA, {what}", None, _too_few(prompts))
    yield (
        f"subspaces-{anchor}",
        f"Representation similarity per layer, {what}",
        *similarity_curves(columns, key, with_cka),
    )


def _positions(columns: list[dict], key: str) -> list[str]:
    """The token positions ``key`` was measured at (a task's prompts: the last token only)."""
    return list(columns[0]["representations"][key]["cka"]["resid"])


def _too_few(prompts: int) -> str:
    return (
        f"Not drawn: debiased linear CKA over {prompts} prompt{'s' * (prompts != 1)} is undefined; "
        f"it needs at least {CKA_MIN_PROMPTS}."
    )


def _cka(setting: dict, key: str, stream: str, position: str) -> np.ndarray:
    return from_json(setting["representations"][key]["cka"][stream][position])


def cka_heatmaps(columns: list[dict], key: str, position: str) -> tuple[Figure, list[str]]:
    """Rows: residual, attention and MLP output; columns: the reference against itself, then each
    setting against the reference; cell (i, j): CKA of reference layer i with layer j."""
    fig, axes = plt.subplots(
        len(KIND_LABELS), len(columns), figsize=(1.4 + 2.6 * len(columns), 7.4), squeeze=False, layout="constrained"
    )
    for row, (stream, label) in enumerate(KIND_LABELS.items()):
        for col, setting in enumerate(columns):
            ax = axes[row, col]
            image = ax.imshow(
                _cka(setting, key, stream, position),
                cmap="magma",
                vmin=0,
                vmax=1,
                origin="lower",
                interpolation="nearest",
            )
            ax.set_title(f"{setting['label']} · {label}", fontsize=9)
            ax.set_xlabel(f"{'reference' if setting['method'] is None else 'compared'} layer j", fontsize=8)
            ax.set_ylabel("reference layer i", fontsize=8)
    fig.colorbar(image, ax=axes, label="linear CKA", shrink=0.8)
    fig.suptitle(f"Layer x layer linear CKA at the {POSITION_LABELS[position]}")
    return fig, [_cka_reading(setting, key, position) for setting in columns]


def _cka_reading(setting: dict, key: str, position: str) -> str:
    if setting["method"] is None:
        return "Reference against itself: the block structure of a model whose layers work (diagonal 1 by definition)."
    diagonals = {stream: np.diag(_cka(setting, key, stream, position)) for stream in KIND_LABELS}
    means = ", ".join(f"{KIND_LABELS[s]} {np.nanmean(d):.2f}" for s, d in diagonals.items())
    residual = diagonals["resid"]
    if np.isnan(residual).all():
        return f"{setting['label']}: mean CKA diagonal {means}; residual undefined at every layer."
    low = int(np.nanargmin(residual))
    return f"{setting['label']}: mean CKA diagonal {means}; residual lowest at layer {low} ({residual[low]:.2f})."


def similarity_curves(columns: list[dict], key: str, with_cka: bool = True) -> tuple[Figure, list[str]]:
    """Top (``with_cka``): the CKA diagonal (reference layer l vs compared layer l) per stream;
    bottom: the residual stream's activation-subspace similarity, error-subspace alignment and k."""
    compared = [s for s in columns if s["method"] is not None]
    styles = {position: POSITION_STYLES[position] for position in _positions(columns, key)}
    rows = 1 + with_cka
    fig, axes = plt.subplots(rows, 3, figsize=(13, 0.6 + 3.0 * rows), layout="constrained", sharex=True, squeeze=False)
    for ax, (stream, label) in zip(axes[0] if with_cka else (), KIND_LABELS.items()):
        for setting in compared:
            for position, style in styles.items():
                ax.plot(np.diag(_cka(setting, key, stream, position)), ls=style, color=BITS_COLORS.get(setting["bits"]))
        ax.set_title(f"CKA diagonal, {label}", fontsize=10)
        ax.set_ylim(-0.02, 1.02)
    panels = {
        "activation": "activation-subspace similarity (residual)",
        "error": "error-subspace alignment (residual)",
        "k": "k: directions holding 90% of energy",
    }
    for ax, (metric, title) in zip(axes[-1], panels.items()):
        for setting in compared if metric != "k" else compared[:1]:
            for position, style in styles.items():
                curve = np.array(setting["representations"][key]["subspaces"][position][metric], dtype=float)
                ax.plot(curve, ls=style, color=REFERENCE_COLOR if metric == "k" else BITS_COLORS.get(setting["bits"]))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("layer")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=BITS_COLORS.get(s["bits"]), label=s["label"]) for s in compared]
    handles += [plt.Line2D([], [], color="grey", ls=style, label=POSITION_LABELS[p]) for p, style in styles.items()]
    fig.legend(handles=handles, loc="outside right upper", fontsize=8)
    fig.suptitle("Is the representation space still the reference's? (1 = same)")
    return fig, [_subspace_reading(setting, key, with_cka) for setting in compared]


def _subspace_reading(setting: dict, key: str, with_cka: bool) -> str:
    """Layer means at the last subject token (a task's: the last token); the paper's error
    alignment: ~0.3 at 4-bit (noise-like), ~0.8 at 2-bit (the error attacks the signal)."""
    subspaces = setting["representations"][key]["subspaces"]
    position = interval_position(list(subspaces))
    activation, error = (np.nanmean(np.array(subspaces[position][m], dtype=float)) for m in ("activation", "error"))
    cka = f"CKA diagonal {np.nanmean(np.diag(_cka(setting, key, 'resid', position))):.2f}, " if with_cka else ""
    return (
        f"{setting['label']}, {POSITION_LABELS[position]}, mean over layers: {cka}activation subspace "
        f"{activation:.2f}, error alignment {error:.2f} (paper: error alignment ~0.3 at 4-bit, ~0.8 at 2-bit)."
    )
