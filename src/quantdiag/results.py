"""``results.json``: the documented, machine-readable summary of a run (docs/results.md)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from quantdiag.analysis.causal import CAUSAL_ANALYSES
from quantdiag.analysis.components import component_curves
from quantdiag.analysis.effects import as_json, per_token_restoration, subset_summary
from quantdiag.analysis.lens import lens_curves
from quantdiag.analysis.positions import GROUPS
from quantdiag.analysis.recall import recall_summary
from quantdiag.analysis.repairs import REPAIRS, repair_summary
from quantdiag.analysis.representations import POSITIONS, STREAMS, SUBSPACE_STREAM, representation_summary
from quantdiag.analysis.sensitivity import injection_summary, sensitivity_summary
from quantdiag.analysis.similarity import ENERGY
from quantdiag.config import RunConfig
from quantdiag.data.facts import Fact
from quantdiag.model.load import DEFAULT_MODEL, LoadedModel
from quantdiag.quant.bank import WeightBank
from quantdiag.quant.calib import Calibration
from quantdiag.quant.spec import REFERENCE, REFERENCE_BITS, PrecisionPlan, QuantSpec
from quantdiag.verdict import rules, verdict_of

if TYPE_CHECKING:
    from quantdiag.pipeline import Analyses, Evaluated, PromptSet

SCHEMA_VERSION = 2
REFERENCE_NOTE_SMOLLM2 = (
    "The built-in SmolLM2-135M-Instruct ships as a Q4_1 GGUF file: its reference ('full precision') "
    "model is those Q4_1 weights dequantized to float."
)
CHECKPOINT_NOTE = (
    "A checkpoint is compared through its block linears, swapped into the reference model: its "
    "embeddings, norms and output head are the reference's."
)
DROPPED_NOTE = (
    "Facts not scored: {count} (no token of the object carries a letter or digit; the answer target "
    "is the object's first token that does)."
)
SWAP_NOTE = (
    "Each setting is quantized once and cached; every compared model is the reference model with "
    "the dequantized weights of that setting swapped into its linear layers (no re-quantization)."
)


def build_results(
    config: RunConfig,
    loaded: LoadedModel,
    facts: list[Fact],
    prompts: PromptSet,
    reference: Evaluated,
    evaluated: list[Evaluated],
    bank: WeightBank,
    calibration: Calibration | None,
    method_subsets: dict[str, dict[str, np.ndarray]],
    analyses: Analyses,
) -> dict:
    """Assemble the summary; ``docs/results.md`` documents every field."""
    causal, components, representations = analyses.causal, analyses.components, analyses.representations
    fact_of_robustness = prompts.fact_of_robustness
    settings = [_setting(reference, facts, loaded, fact_of_robustness, method_subsets, bank)]
    settings += [_setting(item, facts, loaded, fact_of_robustness, method_subsets, bank) for item in evaluated]
    for setting in settings:
        if setting["key"] in causal:
            setting["causal"] = _causal(causal[setting["key"]], prompts, loaded)
        if components:
            setting["components"] = {
                f"{m}:{name}": component_curves(components, setting["key"], rows)
                for m, named in method_subsets.items()
                if setting["method"] in (None, m)
                for name, rows in named.items()
            }
        if setting["key"] in representations:
            arrays = representations[setting["key"]]
            subsets = sorted({key.split("/")[0] for key in arrays})
            setting["representations"] = {subset: representation_summary(arrays, subset) for subset in subsets}
        if setting["key"] in analyses.sensitivity:
            setting["sensitivity"] = sensitivity_summary(analyses.sensitivity[setting["key"]])
        if setting["key"] in analyses.repairs:
            setting["repairs"] = repair_summary(analyses.repairs[setting["key"]])
    results = {
        "schema_version": SCHEMA_VERSION,
        "model": {
            "name": loaded.name,
            "source": config.model,
            "family": loaded.adapter.arch.family,
            "n_layers": loaded.adapter.n_layers,
            "hidden_size": loaded.model.config.hidden_size,
            "vocab_size": loaded.model.config.vocab_size,
            "fingerprint": loaded.fingerprint,
        },
        "config": config.to_json(),
        "facts": {
            "count": len(facts),
            "relations": sorted({fact.relation for fact in facts}),
            "robustness_prompts": len(fact_of_robustness),
            "robustness_facts": int(len(np.unique(fact_of_robustness))),
        },
        "calibration": None if calibration is None else calibration.describe(),
        "subsets": {
            method: {
                "defined_by": next(item.spec.label for item in evaluated if item.spec.method == method and item.spec.defines_subsets(config.subset_bits)),
                **{name: len(rows) for name, rows in groups.items()},
            }
            for method, groups in method_subsets.items()
        },
        "causal": {
            "analyses": [a for a in config.analyses if a in CAUSAL_ANALYSES],
            "streams": list(config.streams),
            "window": config.window,
            "prompts_per_subset": config.patch_prompts,
            "positions": list(GROUPS),
        }
        if causal
        else None,
        "representations": {"streams": list(STREAMS), "positions": list(POSITIONS), "subspace_stream": SUBSPACE_STREAM, "energy": ENERGY}
        if representations
        else None,
        "injection": {method: injection_summary(values) for method, values in analyses.injection.items()} or None,
        "repairs": {"rank": config.eora_rank, "budget": config.kurtosis_budget, "alphas": list(config.repair_options().alphas), "repairs": list(REPAIRS)}
        if analyses.repairs
        else None,
        "settings": settings,
        "notes": _notes(config, evaluated, bank, prompts.dropped),
        "verdict_rules": rules(),
    }
    for setting in settings[1:]:
        setting["verdict"] = verdict_of(results, setting)
    return results


def _setting(
    item: Evaluated,
    facts: list[Fact],
    loaded: LoadedModel,
    fact_of_robustness: np.ndarray,
    method_subsets: dict[str, dict[str, np.ndarray]],
    bank: WeightBank,
) -> dict:
    spec = item.spec
    if spec is None:
        lens_groups = {"all": np.arange(len(facts))}
        lens_groups |= {f"{m}:{name}": rows for m, groups in method_subsets.items() for name, rows in groups.items()}
    else:
        lens_groups = {f"{spec.method}:{name}": rows for name, rows in method_subsets.get(spec.method, {}).items()}
    return {
        "key": item.setting,
        "label": "Reference" if spec is None else spec.label,
        "method": None if spec is None else spec.method,
        "bits": REFERENCE_BITS if spec is None else spec.bits,
        "average_bits": bank.average_bits(PrecisionPlan.uniform(item.setting)),
        "recall": recall_summary(facts, item.scores, loaded.tokenizer, item.robustness, fact_of_robustness),
        "lens": {name: lens_curves(item.scores, rows) for name, rows in lens_groups.items()},
    }


def _causal(arrays: dict[str, np.ndarray], prompts: PromptSet, loaded: LoadedModel) -> dict:
    """Per subset: the grouped heatmaps, and the per-token view of the subset's first prompt."""
    out = {}
    for subset in sorted({key.split("/")[0] for key in arrays}):
        out[subset] = subset_summary(arrays, subset)
        if f"{subset}/patching/resid" in arrays:
            prompt = prompts.primary[int(arrays[f"{subset}/rows"][0])]
            length = len(prompt.ids)
            grid = arrays[f"{subset}/patching/resid"][0, :, :length]
            p_model, p_reference = arrays[f"{subset}/p_model"][0], arrays[f"{subset}/p_reference"][0]
            out[subset]["example"] = {
                "tokens": [loaded.tokenizer.decode([token]) for token in prompt.ids],
                "target": loaded.tokenizer.decode([prompt.target]),
                "restoration": as_json(per_token_restoration(grid, p_model, p_reference)),
            }
    return out


def _notes(config: RunConfig, evaluated: list[Evaluated], bank: WeightBank, dropped: int) -> list[str]:
    notes = [SWAP_NOTE] + ([CHECKPOINT_NOTE] if config.compare else [])
    if dropped:
        notes.append(DROPPED_NOTE.format(count=dropped))
    if config.model == DEFAULT_MODEL:
        notes.insert(0, REFERENCE_NOTE_SMOLLM2)
    quantized = [item.spec for item in evaluated if isinstance(item.spec, QuantSpec)]
    if quantized:
        fallbacks = bank.group_size_fallbacks(quantized[0])
        notes += [
            f"Group size {config.group_size} does not divide input width {width}: those linears use group size {used}."
            for width, used in fallbacks.items()
        ]
    return notes
