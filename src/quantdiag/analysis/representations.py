"""Representation diagnostics (docs/methods.md, Representations): is the compared model's representation space still
the reference's? Layer x layer linear CKA of the residual stream, attention and MLP outputs at
the last subject token and the last token; activation- and error-subspace similarity of the
residual stream per layer.

Each model's rows are spilled to disk as they are captured and the statistics are computed from
there block by block (``similarity``), so memory does not grow with the number of prompts.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from quantdiag.analysis.effects import as_json
from quantdiag.analysis.forward import length_batches
from quantdiag.analysis.patching import KIND_SITES
from quantdiag.analysis.resample import MIN_PROMPTS, halves, spread
from quantdiag.analysis.similarity import (
    above_chance,
    centre_grams,
    cka_matrix,
    gram_cka,
    gram_subspace_similarity,
    subspace_stats,
)
from quantdiag.analysis.spill import LayerRows
from quantdiag.data.facts import Prompt
from quantdiag.model.load import LoadedModel
from quantdiag.model.probes import capture
from quantdiag.quant.bank import WeightBank
from quantdiag.quant.spec import REFERENCE, PrecisionPlan, Setting

STREAMS = tuple(KIND_SITES)
POSITIONS = ("subject", "last")
#: The stream whose subspaces are measured (docs/methods.md, Representations: the activation matrix of the layer).
SUBSPACE_STREAM = "resid"
SUBSPACE_METRICS = ("activation", "error", "k")
#: The position whose layer-mean statistics get intervals over prompts (the verdict's, docs/verdict.md).
INTERVAL_POSITION = "subject"
#: Those statistics: the mean CKA diagonal and the mean subspace similarities above chance.
INTERVAL_METRICS = ("cka", "activation", "error")
#: Halves are cut from the Gram matrices and decomposed together, about this many numbers a
#: cut matrix (five of them, float64: 32 MiB each).
HALF_BATCH_NUMBERS = 2**22


@torch.inference_mode()
def representation_arrays(
    loaded: LoadedModel,
    bank: WeightBank,
    setting: Setting,
    subset_prompts: Mapping[str, Sequence[Prompt]],
    batch_size: int,
    workdir: Path | None = None,
    positions: tuple[str, ...] = POSITIONS,
) -> dict[str, np.ndarray]:
    """Per subset, ``{subset}/{stream}/{position}/cka`` (layers x layers, reference layer i vs
    ``setting``'s layer j) and ``{subset}/resid/{position}/{activation,error,k}`` (per layer), at
    each of ``positions`` (a task's prompts have no subject: the last token only). For the
    reference itself only its own CKA matrix. Spills go to a temporary folder in ``workdir`` and
    are removed; every subset is spilled under one setting before the weights are swapped to the
    other (two swaps, not two a subset)."""
    with tempfile.TemporaryDirectory(prefix="spill-", dir=workdir) as folder:
        spills = {
            name: {
                subset: _spill(loaded, bank, model, prompts, batch_size, Path(folder) / name / str(index), positions)
                for index, (subset, prompts) in enumerate(subset_prompts.items())
            }
            for name, model in (("reference", REFERENCE), ("compared", setting))
            if name == "reference" or setting != REFERENCE
        }
        compared = spills.get("compared", spills["reference"])
        out = {
            f"{subset}/{key}": value
            for subset, reference in spills["reference"].items()
            for key, value in _compare(reference, compared[subset], loaded.device).items()
        }
    bank.apply(PrecisionPlan.uniform(REFERENCE))
    return out


def _spill(
    loaded: LoadedModel,
    bank: WeightBank,
    setting: Setting,
    prompts: Sequence[Prompt],
    batch_size: int,
    folder: Path,
    positions: tuple[str, ...],
) -> dict[tuple[str, str], LayerRows]:
    """Every stream's rows at each of ``positions`` for ``setting``, in prompt order, on disk."""
    adapter = loaded.adapter
    width = loaded.model.config.hidden_size
    spilled = {(s, p): LayerRows(folder / f"{s}-{p}", adapter.n_layers, width) for s in STREAMS for p in positions}
    sites = {
        stream: [f"blocks.{layer}.{site}" for layer in range(adapter.n_layers)] for stream, site in KIND_SITES.items()
    }
    bank.apply(PrecisionPlan.uniform(setting))
    # Rows go to disk in batch order; it is the same for every model, so rows stay aligned.
    for batch in tqdm(
        length_batches(prompts, batch_size), desc=f"representations {setting.label}", unit="batch", leave=False
    ):
        ids = torch.tensor([prompts[i].ids for i in batch], device=loaded.device)
        at = {  # the token of each position in each row (a batch's prompts have one length)
            "subject": torch.tensor([prompts[i].last_subject for i in batch], device=loaded.device),
            "last": torch.full((len(batch),), ids.shape[1] - 1, device=loaded.device),
        }
        rows = torch.arange(len(batch), device=loaded.device)
        with capture(
            adapter,
            sum(sites.values(), []),
            select=lambda t, rows=rows, at=at: torch.stack([t[rows, at[p]] for p in positions], 1),
        ) as store:
            loaded.model(input_ids=ids, use_cache=False, logits_to_keep=1)
        for stream, names in sites.items():
            every = torch.stack([store[name].float().cpu() for name in names], 2).numpy()  # batch, position, layer, d
            for index, position in enumerate(positions):
                spilled[(stream, position)].append(every[:, index])
    return spilled


def _compare(
    reference: dict[tuple[str, str], LayerRows], compared: dict[tuple[str, str], LayerRows], device: torch.device
) -> dict[str, np.ndarray]:
    """CKA matrices of every stream and position; subspace curves of the residual stream unless
    the reference is compared with itself."""
    out = {f"{s}/{p}/cka": cka_matrix(reference[(s, p)], compared[(s, p)], device) for s, p in reference}
    if compared is reference:
        return out
    positions = [p for s, p in reference if s == SUBSPACE_STREAM]
    for position in positions:
        x, y = reference[(SUBSPACE_STREAM, position)], compared[(SUBSPACE_STREAM, position)]
        per_layer = np.array([subspace_stats(x, y, layer, device) for layer in range(x.layers)])
        for index, metric in enumerate(SUBSPACE_METRICS):
            out[f"{SUBSPACE_STREAM}/{position}/{metric}"] = per_layer[:, index]
    where = interval_position(positions)
    x, y = reference[(SUBSPACE_STREAM, where)], compared[(SUBSPACE_STREAM, where)]
    prefix = f"{SUBSPACE_STREAM}/{where}/"
    centres = {"cka": float(np.diag(out[prefix + "cka"]).mean())}
    for metric in ("activation", "error"):
        centres[metric] = float(np.mean(above_chance(out[prefix + metric], out[prefix + "k"], x.width)))
    for metric, bounds in layer_mean_intervals(x, y, out[prefix + "k"], centres).items():
        out[f"{prefix}{metric}_interval"] = np.array(bounds or (np.nan, np.nan))
    return out


def interval_position(positions: Sequence[str]) -> str:
    """Where the layer means get intervals: ``INTERVAL_POSITION`` where it was read, else the only position."""
    return INTERVAL_POSITION if INTERVAL_POSITION in positions else positions[-1]


def layer_mean_intervals(
    x: LayerRows, y: LayerRows, k: np.ndarray, centres: dict[str, float]
) -> dict[str, tuple[float, float] | None]:
    """Half-sampling intervals (``resample``) of the layer means the verdict reads: the CKA
    diagonal, and the activation and error subspace similarities above chance (k per layer
    fixed to the whole subset's, at most a half's rank m - 1), each moved onto the whole
    subset's value in ``centres``. Each half's statistics are recomputed from its own rows,
    through the Gram matrices of all rows cut to the half's (``HALF_BATCH_NUMBERS`` bound the batch)."""
    n = x.count
    if n < MIN_PROMPTS:
        return dict.fromkeys(INTERVAL_METRICS)
    picks = torch.from_numpy(halves(n))
    per_half = {metric: np.zeros(len(picks)) for metric in INTERVAL_METRICS}
    for layer in range(x.layers):
        xs, ys = (torch.from_numpy(rows.block(layer, 0, n)).double() for rows in (x, y))
        grams = {"xx": xs @ xs.T, "yy": ys @ ys.T, "xy": xs @ ys.T}
        grams["ee"] = grams["yy"] - grams["xy"] - grams["xy"].T + grams["xx"]  # the error e = y - x
        grams["xe"] = grams["xy"] - grams["xx"]
        size = min(int(k[layer]), picks.shape[1] - 1)
        batch = max(1, HALF_BATCH_NUMBERS // picks.shape[1] ** 2)
        for start in range(0, len(picks), batch):
            rows = picks[start : start + batch]
            cut = {name: centre_grams(gram[rows[:, :, None], rows[:, None, :]]) for name, gram in grams.items()}
            chosen = slice(start, start + len(rows))
            per_half["cka"][chosen] += gram_cka(cut["xx"], cut["yy"]).numpy() / x.layers
            for metric, own, cross in (("activation", "yy", "xy"), ("error", "ee", "xe")):
                similarity = gram_subspace_similarity(cut["xx"], cut[own], cut[cross], size).numpy()
                per_half[metric][chosen] += above_chance(similarity, int(k[layer]), x.width) / x.layers
    return {metric: spread(values, centres[metric]) for metric, values in per_half.items()}


def representation_summary(arrays: Mapping[str, np.ndarray], subset: str) -> dict:
    """The results.json view of one subset: its number of prompts (``{subset}/rows``), CKA matrices
    per stream and position read, the residual stream's subspace curves per position, and the
    intervals of their layer means at ``interval_position`` (``None`` for the reference; an
    interval is ``None`` with too few prompts)."""
    positions = [p for p in POSITIONS if f"{subset}/{SUBSPACE_STREAM}/{p}/cka" in arrays]
    cka = {stream: {p: as_json(arrays[f"{subset}/{stream}/{p}/cka"]) for p in positions} for stream in STREAMS}
    prompts = len(arrays[f"{subset}/rows"])
    if f"{subset}/{SUBSPACE_STREAM}/{positions[0]}/k" not in arrays:
        return {"prompts": prompts, "cka": cka, "subspaces": None, "intervals": None}
    subspaces = {
        p: {
            "activation": as_json(arrays[f"{subset}/{SUBSPACE_STREAM}/{p}/activation"]),
            "error": as_json(arrays[f"{subset}/{SUBSPACE_STREAM}/{p}/error"]),
            "k": arrays[f"{subset}/{SUBSPACE_STREAM}/{p}/k"].astype(int).tolist(),
        }
        for p in positions
    }
    where = interval_position(positions)
    intervals = {
        metric: None if np.isnan(bounds).any() else bounds.tolist()
        for metric in INTERVAL_METRICS
        for bounds in [arrays[f"{subset}/{SUBSPACE_STREAM}/{where}/{metric}_interval"]]
    }
    return {"prompts": prompts, "cka": cka, "subspaces": subspaces, "intervals": intervals}
