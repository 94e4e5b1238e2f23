"""``results.json``: the documented, machine-readable summary of a run (docs/results.md)."""

from __future__ import annotations

import numpy as np

from quantdiag.analysis.causal import CAUSAL_ANALYSES
from quantdiag.analysis.components import PAIR_METRICS, component_curves
from quantdiag.analysis.distribution import BINS_PER_DECADE, COARSE, HELD_OUT_SEED, KLD_EDGES, distribution_summary
from quantdiag.analysis.effects import as_json, per_token_restoration, subset_summary
from quantdiag.analysis.known import known_relations
from quantdiag.analysis.lens import lens_curves
from quantdiag.analysis.positions import GROUPS
from quantdiag.analysis.recall import recall_summary
from quantdiag.analysis.repairs import repair_summary
from quantdiag.analysis.representations import POSITIONS, STREAMS, SUBSPACE_STREAM, representation_summary
from quantdiag.analysis.sensitivity import injection_summary, sensitivity_summary
from quantdiag.analysis.similarity import ENERGY
from quantdiag.config import MIN_KNOWN_ACCURACY, PROBE_FACTS, RunConfig
from quantdiag.model.load import DEFAULT_MODEL
from quantdiag.quant.spec import REFERENCE, PrecisionPlan, QuantSpec
from quantdiag.state import Analyses, Evaluated, Groups, PromptSet, RunContext, SubsetArrays
from quantdiag.verdict import rules, verdict_of

SCHEMA_VERSION = 2
REFERENCE_NOTE_SMOLLM2 = (
    "The built-in SmolLM2-135M-Instruct ships as a Q4_1 GGUF file: its reference ('full precision') "
    "model is those Q4_1 weights dequantized to float."
)
MOE_NOTE = (
    "A mixture of experts has no single gate or intermediate: its gate sign-flip rate and retrieval Jaccard "
    "are not measured (docs/methods.md, Components)."
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
    context: RunContext, reference: Evaluated, evaluated: list[Evaluated], groups: Groups, analyses: Analyses
) -> dict:
    """Assemble the summary of the reference and the ``evaluated`` settings, with ``groups`` their
    methods' subsets; ``docs/results.md`` documents every field."""
    config = context.config
    settings = [_setting(context, item, groups, analyses) for item in [reference, *evaluated]]
    results = {
        "schema_version": SCHEMA_VERSION,
        "model": _model(context),
        "config": config.to_json(),
        "facts": _facts(context.prompts),
        "calibration": None if context.bank.calibration is None else context.bank.calibration.describe(),
        "subsets": _subsets(config, evaluated, groups),
        "causal": _causal_options(config) if analyses.causal else None,
        "representations": {
            "streams": list(STREAMS),
            "positions": list(POSITIONS),
            "subspace_stream": SUBSPACE_STREAM,
            "energy": ENERGY,
        }
        if analyses.representations
        else None,
        "injection": {method: injection_summary(values) for method, values in analyses.injection.items()} or None,
        "repairs": {
            "rank": config.eora_rank,
            "budget": config.kurtosis_budget,
            "alphas": list(config.repair_options().alphas),
            "repairs": ["baseline", *config.repair_options().tried],
        }
        if analyses.repairs
        else None,
        "distribution": _distribution_text(config) if analyses.distribution else None,
        "tasks": list(analyses.tasks.get(REFERENCE, {})) or None,
        "settings": settings,
        "notes": _notes(context, evaluated),
        "verdict_rules": rules(),
        "profile": context.run_dir.profiler.to_json(),
    }
    for setting in settings[1:]:
        setting["verdict"] = verdict_of(results, setting)
    return results


def _model(context: RunContext) -> dict:
    """The reference model: its name, where it came from, its shape and weights' fingerprint."""
    loaded = context.loaded
    return {
        "name": loaded.name,
        "source": context.config.model,
        "family": loaded.adapter.arch.family,
        "n_layers": loaded.adapter.n_layers,
        "hidden_size": loaded.model.config.hidden_size,
        "vocab_size": loaded.model.config.vocab_size,
        "fingerprint": loaded.fingerprint,
    }


def _facts(prompts: PromptSet) -> dict:
    """How many facts were scored, their prompts' mean length, of which relations, and the
    robustness prompts' counts."""
    fact_of_robustness = prompts.fact_of_robustness
    return {
        "count": len(prompts.facts),
        "mean_tokens": float(np.mean([len(prompt.ids) for prompt in prompts.primary])),
        "relations": sorted({fact.relation for fact in prompts.facts}),
        "probe": prompts.probe,
        "robustness_prompts": len(fact_of_robustness),
        "robustness_facts": int(len(np.unique(fact_of_robustness))),
    }


def _subsets(config: RunConfig, evaluated: list[Evaluated], groups: Groups) -> dict:
    """Per method: the setting that defines its subsets, and each subset's size."""
    definers = [item.setting for item in evaluated if item.setting.defines_subsets(config.subset_bits)]
    return {
        method: {
            "defined_by": next(spec.label for spec in definers if spec.method == method),
            **{name: len(rows) for name, rows in named.items()},
        }
        for method, named in groups.items()
    }


def _distribution_text(config: RunConfig) -> dict:
    """The held-out text the distribution statistics were measured on, and the KLD histogram's bin edges."""
    return {
        "text": config.text or f"generated by the reference model (seed {config.seed} + {HELD_OUT_SEED}), held out",
        "histogram_edges": KLD_EDGES[:: BINS_PER_DECADE // COARSE].tolist(),
    }


def _causal_options(config: RunConfig) -> dict:
    """What the causal analyses ran with."""
    return {
        "analyses": [a for a in config.analyses if a in CAUSAL_ANALYSES],
        "streams": list(config.streams),
        "window": config.window,
        "prompts_per_subset": config.patch_prompts,
        "positions": list(GROUPS),
    }


def _setting(context: RunContext, item: Evaluated, groups: Groups, analyses: Analyses) -> dict:
    """One setting's recall and lens, then the summary of each analysis that ran on it."""
    setting, compared = _scores(context, item, groups), item.setting
    if compared in analyses.causal:
        setting["causal"] = _causal(context, analyses.causal[compared])
    if analyses.components:
        setting["components"] = {
            f"{m}:{name}": component_curves(analyses.components, compared, rows)
            for m, named in groups.items()
            if setting["method"] in (None, m)
            for name, rows in named.items()
        }
    if compared in analyses.representations:
        staged = analyses.representations[compared]
        setting["representations"] = {
            subset: representation_summary(staged.arrays, subset) for subset in sorted(staged.subsets)
        }
    if compared in analyses.sensitivity:
        setting["sensitivity"] = sensitivity_summary(analyses.sensitivity[compared])
    if compared in analyses.repairs:
        setting["repairs"] = repair_summary(analyses.repairs[compared])
    if compared != REFERENCE:
        setting["prompt_values"] = _prompt_values(context, item, groups, analyses)
    if compared in analyses.distribution:
        reference = analyses.distribution[REFERENCE]
        setting["distribution"] = distribution_summary(analyses.distribution[compared], reference)
    if compared in analyses.tasks:
        setting["tasks"] = analyses.tasks[compared]
    return setting


def _prompt_values(context: RunContext, item: Evaluated, groups: Groups, analyses: Analyses) -> dict:
    """Per subset of the setting's method, the per-prompt values the verdict's intervals are
    drawn from (docs/verdict.md, Intervals): each prompt's lens ranks and component metrics
    against the reference, per layer."""
    out = {}
    method = item.setting.method
    for name, rows in groups.get(method, {}).items():
        values: dict = {}
        if item.scores.lens_rank is not None and len(rows):
            values["lens_rank"] = item.scores.lens_rank[rows].astype(int).tolist()
        if analyses.components and len(rows):
            at = np.searchsorted(analyses.components["rows"], rows)
            for metric in PAIR_METRICS:
                values[metric] = as_json(analyses.components[f"{item.setting.key}/{metric}"][at])
        out[f"{method}:{name}"] = values
    return out


def _scores(context: RunContext, item: Evaluated, groups: Groups) -> dict:
    """A setting's name, widths, recall and lens curves (the reference's on every subset too)."""
    setting, facts = item.setting, context.prompts.facts
    if setting == REFERENCE:
        lens_groups = {"all": np.arange(len(facts))}
        lens_groups |= {f"{m}:{name}": rows for m, named in groups.items() for name, rows in named.items()}
    else:
        lens_groups = {f"{setting.method}:{name}": rows for name, rows in groups.get(setting.method, {}).items()}
    tokenizer, fact_of_robustness = context.loaded.tokenizer, context.prompts.fact_of_robustness
    return {
        "key": setting.key,
        "label": setting.label,
        "method": setting.method,
        "bits": setting.bits,
        "average_bits": context.bank.average_bits(PrecisionPlan.uniform(setting)),
        "recall": recall_summary(facts, item.scores, tokenizer, item.robustness, fact_of_robustness),
        "lens": {name: lens_curves(item.scores, rows) for name, rows in lens_groups.items()},
    }


def _causal(context: RunContext, staged: SubsetArrays) -> dict:
    """Per subset: the grouped heatmaps, and the per-token view of the subset's first prompt."""
    prompts, tokenizer, arrays = context.prompts, context.loaded.tokenizer, staged.arrays
    out = {}
    for subset in sorted(staged.subsets):
        out[subset] = subset_summary(arrays, subset)
        if f"{subset}/patching/resid" in arrays:
            prompt = prompts.primary[int(arrays[f"{subset}/rows"][0])]
            length = len(prompt.ids)
            grid = arrays[f"{subset}/patching/resid"][0, :, :length]
            p_model, p_reference = arrays[f"{subset}/p_model"][0], arrays[f"{subset}/p_reference"][0]
            out[subset]["example"] = {
                "tokens": [tokenizer.decode([token]) for token in prompt.ids],
                "target": tokenizer.decode([prompt.target]),
                "restoration": as_json(per_token_restoration(grid, p_model, p_reference)),
            }
    return out


def _notes(context: RunContext, evaluated: list[Evaluated]) -> list[str]:
    """How the settings were compared, which facts were dropped, and group-size fallbacks."""
    config, bank, dropped = context.config, context.bank, context.prompts.dropped
    notes = [SWAP_NOTE] + ([CHECKPOINT_NOTE] if config.compare else [])
    if dropped:
        notes.append(DROPPED_NOTE.format(count=dropped))
    if context.prompts.probe is not None:
        notes.append(_probe_note(context.prompts.probe))
    if config.model == DEFAULT_MODEL:
        notes.insert(0, REFERENCE_NOTE_SMOLLM2)
    if bank is not None and bank.adapter.arch.routed:
        notes.append(MOE_NOTE)
    quantized = [item.setting for item in evaluated if isinstance(item.setting, QuantSpec)]
    if quantized:
        fallbacks = bank.group_size_fallbacks(quantized[0])
        notes += [
            f"Group size {config.group_size} does not divide input width {width}: those linears use group size {used}."
            for width, used in fallbacks.items()
        ]
    return notes


def _probe_note(probe: dict[str, float]) -> str:
    """Which relations the run kept, and the reference's accuracy that chose them."""
    kept = known_relations(probe)
    if len(kept) == len(probe) and all(accuracy < MIN_KNOWN_ACCURACY for accuracy in probe.values()):
        return (
            f"The reference answers under {MIN_KNOWN_ACCURACY:.0%} of the {PROBE_FACTS} probe facts of every relation: "
            "all relations kept; name the ones it should know with --relations."
        )
    shown = ", ".join(f"{relation} {probe[relation]:.0%}" for relation in kept)
    return (
        f"Relations chosen by the reference's accuracy on {PROBE_FACTS} probe facts each "
        f"(at least {MIN_KNOWN_ACCURACY:.0%}; --relations names others): {shown}."
    )
