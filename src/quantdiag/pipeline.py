"""``quantdiag run`` as one library call: quantize every setting once, evaluate recall and the
logit lens of the reference and each setting, trace causal effects (patching, ablation) on
samples of the subsets, measure components and representations, write results, arrays, figures
and the report."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, replace
from functools import cache, partial
from pathlib import Path

import numpy as np

from quantdiag.analysis.causal import CAUSAL_ANALYSES, CausalPlan, causal_arrays
from quantdiag.analysis.components import component_arrays
from quantdiag.analysis.distribution import distribution_arrays, held_out_text
from quantdiag.analysis.forward import Scores, score_prompts
from quantdiag.analysis.known import known_relations, probe_accuracy
from quantdiag.analysis.recall import subsets
from quantdiag.analysis.repairs import protect_setting, protected_blocks, repair_arrays, repair_reads, repairable
from quantdiag.analysis.representations import representation_arrays
from quantdiag.analysis.robustness import Paraphrase, paraphrase_ids, robustness_correct
from quantdiag.analysis.sensitivity import damage_onset, injection_arrays, injection_settings, sensitivity_arrays
from quantdiag.analysis.tasks import TASK_FIELDS, task_model, task_prompts, task_scores
from quantdiag.config import PROBE_FACTS, RunConfig
from quantdiag.data.facts import Fact, Prompt, robustness_texts, tokenize
from quantdiag.errors import QuantdiagError
from quantdiag.model.load import LoadedModel, load_reference, resolve_device
from quantdiag.profiling import Profiler
from quantdiag.quant.bank import WeightBank
from quantdiag.quant.calib import load_calibration
from quantdiag.quant.checkpoint import ComparedSpec
from quantdiag.quant.spec import REFERENCE, Compensated, PrecisionPlan, QuantSpec, Setting, compensated
from quantdiag.report.html import write_report
from quantdiag.resolve import causal_specs, load_facts, repair_specs, resolve, sensitivity_specs
from quantdiag.results import build_results
from quantdiag.runs import RunDir, save_arrays
from quantdiag.state import Analyses, Evaluated, Groups, PromptSet, RunContext, RunResult, SubsetArrays
from quantdiag.storage import cache_key, cache_root, sweep_leftovers


def run(config: RunConfig) -> RunResult:
    """Run the diagnosis described by ``config``; returns the report's path and the results."""
    resolved = resolve(config)
    config, specs = resolved.config, resolved.specs
    sweep_leftovers(cache_root())
    profiler = Profiler(config.profile, resolve_device(config.device))
    with profiler.stage("load"):
        loaded = load_reference(config.model, config.device, config.dtype, config.trust_remote_code)
    run_dir = RunDir(Path(config.out), profiler)
    run_dir.write_json("config.json", config.to_json())  # a run folder from now on: a rerun resumes it
    facts, probe = resolved.facts, None
    if facts is None:
        probe = relation_probe(run_dir, loaded, config)
        facts = load_facts(replace(config, relations=known_relations(probe)))
    prompts = build_prompts(loaded, facts, config, probe)
    facts = prompts.facts
    calibration = None
    if any(setting.reads_calibration for setting in [*specs, *_repair_reads(config, specs)]):
        with profiler.stage("calibration"):
            calibration = load_calibration(loaded, config.calib, config.calib_samples, config.calib_length, config.seed)
    bank = WeightBank(loaded, calibration)
    for spec in specs:
        ensure(bank, spec, profiler)
    context = RunContext(run_dir, loaded, bank, prompts, config, specs)
    reference = evaluate(context, REFERENCE, np.ones(len(facts), dtype=bool))
    evaluated = [evaluate(context, spec, reference.scores.correct) for spec in specs]
    groups = method_subsets(reference, evaluated, config.subset_bits)
    causal = causal_effects(context, groups)
    components = component_effects(context, reference) if "components" in config.analyses else {}
    representations = representation_effects(context, groups)
    sensitivity, injection = sensitivity_effects(context, groups)
    repairs = repair_effects(context, groups, sensitivity)
    distribution = distribution_effects(context) if "distribution" in config.analyses else {}
    tasks = task_effects(context) if config.tasks else {}
    bank.apply(PrecisionPlan.uniform(REFERENCE))
    analyses = Analyses(causal, components, representations, sensitivity, injection, repairs, distribution, tasks)
    results = build_results(context, reference, evaluated, groups, analyses)
    run_dir.write_json("results.json", results)
    arrays = _arrays(reference, evaluated, facts, analyses)
    save_arrays(run_dir.path / "arrays.npz", arrays)
    write_report(run_dir, results)
    return RunResult(run_dir.report, results)


def _repair_reads(config: RunConfig, specs: list[ComparedSpec]) -> list[Setting]:
    """Every setting the repair tables may read (before the subsets decide which settings get one)."""
    options = config.repair_options()
    return [s for spec in repair_specs(config, specs) for s in repair_reads(spec, protect_setting(spec), options)]


def ensure(bank: WeightBank, spec: ComparedSpec, profiler: Profiler) -> None:
    """``bank.ensure(spec)``, profiled as stage ``quantize`` of the setting."""
    with profiler.stage("quantize", spec.key) as marks:
        marks["cached"] = bank.has(spec)
        bank.ensure(spec)


def rerun(run_dir: Path, analyses: tuple[str, ...] = (), **changes) -> RunResult:
    """Run again on an existing run directory adding ``analyses`` to its own, with some options
    changed (``None``: keep): finished stages are reused, so only new work is computed.
    ``quantdiag patch``."""
    saved = run_dir / "config.json"
    if not saved.is_file():
        raise QuantdiagError(f"{run_dir} is not a quantdiag run directory (no config.json)")
    config = RunConfig.from_json(json.loads(saved.read_text()))
    changes = {k: v for k, v in changes.items() if v is not None}
    merged = tuple(dict.fromkeys((*(config.analyses or ()), *analyses)))
    return run(replace(config, out=str(run_dir), analyses=merged, **changes))


def relation_probe(run_dir: RunDir, loaded: LoadedModel, config: RunConfig) -> dict[str, float]:
    """The reference's accuracy per ParaRel relation on the probe facts (``known.probe_accuracy``):
    what a run that names no relations chooses them by; a resumable stage."""
    key = cache_key(loaded.fingerprint, loaded.device.type, PROBE_FACTS, config.seed)

    def compute() -> dict[str, np.ndarray]:
        accuracy = probe_accuracy(loaded, config.seed, config.batch_size)
        return {"relations": np.array(list(accuracy)), "accuracy": np.array(list(accuracy.values()))}

    arrays = run_dir.cached("relations", key, compute)
    return dict(zip(arrays["relations"].tolist(), arrays["accuracy"].tolist()))


def build_prompts(
    loaded: LoadedModel, facts: list[Fact], config: RunConfig, probe: dict[str, float] | None = None
) -> PromptSet:
    """Tokenize the primary prompt of every fact, dropping those without a target, and the
    instruction-wrapped paraphrases of a seeded sample of ``config.robustness_facts`` of the rest;
    ``probe``: the relation probe the facts were chosen by, if any."""
    tokenizer = loaded.tokenizer
    tokenized = [(fact, tokenize(tokenizer, fact, 0)) for fact in facts]
    kept = [(fact, prompt) for fact, prompt in tokenized if prompt is not None]
    if not kept:
        raise QuantdiagError(f"none of the {len(facts)} facts can be scored: no object has a letter or digit")
    primary = [replace(prompt, fact=index) for index, (_, prompt) in enumerate(kept)]
    scored = [fact for fact, _ in kept]
    order = np.random.default_rng(config.seed).permutation(len(scored))
    sample = sorted(order[: config.robustness_facts].tolist())
    robustness = [
        Paraphrase(index, paraphrase_ids(tokenizer, text))
        for index in sample
        for text in robustness_texts(scored[index], config.max_paraphrases)
    ]
    return PromptSet(primary, robustness, scored, len(facts) - len(scored), probe)


def evaluate(context: RunContext, setting: Setting, lens_rows: np.ndarray) -> Evaluated:
    """Scores of one uniform setting, from the stage cache if finished."""
    loaded, bank, prompts, batch_size = context.loaded, context.bank, context.prompts, context.config.batch_size

    def compute() -> dict[str, np.ndarray]:
        bank.apply(PrecisionPlan.uniform(setting))
        main = score_prompts(loaded, prompts.primary, batch_size, lens_rows, desc=f"recall {setting.label}")
        desc = f"robustness {setting.label}"
        answered = robustness_correct(loaded, prompts.robustness, prompts.facts, batch_size, desc)
        return {**main.arrays(), "robustness/correct": answered}

    key = context.stage_key(setting, lens_rows.tobytes().hex())
    arrays = context.run_dir.cached("eval", key, compute, setting.key)
    return Evaluated(setting, Scores.from_arrays(arrays), arrays["robustness/correct"])


def method_subsets(reference: Evaluated, evaluated: list[Evaluated], bits: int) -> Groups:
    """Per method, the rows of its Robust and Failure subsets (defined by its ``bits`` setting; a
    checkpoint's by itself)."""
    return {
        item.setting.method: subsets(reference.scores.correct, item.scores.correct)
        for item in evaluated
        if item.setting.defines_subsets(bits)
    }


def causal_effects(context: RunContext, groups: Groups) -> dict[Setting, SubsetArrays]:
    """Setting -> causal arrays (``causal.causal_arrays``) on a seeded sample of
    ``patch_prompts`` prompts of each non-empty subset, ``{method}:{subset}``; the reference gets
    every method's subsets. Each setting is a resumable stage."""
    config = context.config
    order = np.random.default_rng(config.seed).permutation(len(context.prompts.primary))
    chosen = _named_subsets(groups, lambda rows: np.sort(order[np.isin(order, rows)][: config.patch_prompts]))
    plan = CausalPlan(tuple(a for a in config.analyses if a in CAUSAL_ANALYSES), config.streams, config.window)

    def analysis(setting: Setting, subset_prompts: dict[str, list[Prompt]]) -> dict[str, np.ndarray]:
        return causal_arrays(context.loaded, context.bank, setting, subset_prompts, plan, config.batch_size)

    specs = [spec for spec in causal_specs(config, context.specs) if plan.sweeps(spec)]
    return _subset_stages(context, chosen, specs, "causal", analysis, bool(plan.sweeps(REFERENCE)), (asdict(plan),))


def _named_subsets(groups: Groups, pick: Callable[[np.ndarray], np.ndarray] = lambda rows: rows) -> Groups:
    """Method -> ``{method}:{subset}`` -> the rows ``pick`` keeps of each non-empty subset."""
    return {
        method: {f"{method}:{name}": pick(rows) for name, rows in named.items() if len(rows)}
        for method, named in groups.items()
    }


def component_effects(context: RunContext, reference: Evaluated) -> dict[str, np.ndarray]:
    """Component metrics (``components.component_arrays``) of every setting on the facts the
    reference recalls (the Robust and Failure subsets are among them), plus ``rows``: which."""
    rows = np.flatnonzero(reference.scores.correct)
    settings = list(context.specs)
    prompts = [context.prompts.primary[i] for i in rows]
    compute = partial(component_arrays, context.loaded, context.bank, settings, prompts, context.config.batch_size)
    return context.run_dir.cached("components", context.stage_key(settings, rows.tolist()), compute) | {"rows": rows}


def representation_effects(context: RunContext, groups: Groups) -> dict[Setting, SubsetArrays]:
    """Setting -> representation arrays (``representations.representation_arrays``) on every
    prompt of each non-empty subset of its method (the analysis ``representations``; the reference
    gets its own CKA on every method's subsets), and with ``--representations-on`` on the task's
    prompts (``task_representation_effects``). Each setting is a resumable stage."""
    effects = {}
    if "representations" in context.config.analyses:

        def analysis(setting: Setting, subset_prompts: dict[str, list[Prompt]]) -> dict[str, np.ndarray]:
            with context.run_dir.scratch() as folder:
                batch_size = context.config.batch_size
                return representation_arrays(context.loaded, context.bank, setting, subset_prompts, batch_size, folder)

        effects = _subset_stages(context, _named_subsets(groups), context.specs, "representations", analysis)
    if context.config.representations_on:
        for setting, staged in task_representation_effects(context).items():
            known = effects.get(setting, SubsetArrays([], {}))
            effects[setting] = SubsetArrays(known.subsets + staged.subsets, known.arrays | staged.arrays)
    return effects


def task_representation_effects(context: RunContext) -> dict[Setting, SubsetArrays]:
    """Setting -> representation arrays at the last token of the ``--representations-on`` task's
    prompts (``tasks.task_prompts``, ``--task-limit`` items), subset ``task:{name}``, every setting
    against the reference (Appendix E's view); each setting a resumable stage."""
    config, loaded = context.config, context.loaded
    task = config.representations_on
    subset = f"task:{Path(task).stem if Path(task).suffix in ('.yaml', '.yml') else task}"
    prompts = cache(lambda: {subset: task_prompts(loaded, task, config.task_limit)})  # lm-eval only if not cached

    def compute(setting: Setting) -> dict[str, np.ndarray]:
        with context.run_dir.scratch() as folder:
            arrays = representation_arrays(
                loaded, context.bank, setting, prompts(), config.batch_size, folder, positions=("last",)
            )
        return arrays | {f"{subset}/rows": np.arange(len(prompts()[subset]))}  # the items, in the task's order

    effects = {}
    for setting in [REFERENCE, *context.specs]:
        key = context.stage_key(setting, task, config.task_limit)
        arrays = context.run_dir.cached("task-representations", key, partial(compute, setting), setting.key)
        effects[setting] = SubsetArrays([subset], arrays)
    return effects


def _subset_stages(
    context: RunContext,
    chosen: Groups,
    specs: list[ComparedSpec],
    stage: str,
    analysis: Callable[[Setting, dict[str, list[Prompt]]], dict[str, np.ndarray]],
    with_reference: bool = True,
    key_parts: tuple = (),
) -> dict[Setting, SubsetArrays]:
    """Setting -> ``analysis(setting, {subset: prompts})`` plus ``{subset}/rows``, each setting a
    resumable stage ``{stage}-{setting key}``: the reference (if ``with_reference``) on every
    subset in ``chosen`` (method -> subset name -> fact rows), each of ``specs`` on its own method's."""
    every = {name: rows for named in chosen.values() for name, rows in named.items()}
    targets = [(spec, chosen.get(spec.method, {})) for spec in specs]
    effects = {}
    for setting, named in [(REFERENCE, every)] * with_reference + targets:
        if not named:
            continue
        rows = {name: picked.tolist() for name, picked in named.items()}
        subset_prompts = {name: [context.prompts.primary[i] for i in picked] for name, picked in rows.items()}
        arrays = context.run_dir.cached(
            stage, context.stage_key(setting, rows, *key_parts), partial(analysis, setting, subset_prompts), setting.key
        )
        with_rows = arrays | {f"{name}/rows": np.array(picked) for name, picked in rows.items()}
        effects[setting] = SubsetArrays(list(rows), with_rows)
    return effects


def sensitivity_effects(
    context: RunContext, groups: Groups
) -> tuple[dict[Setting, dict[str, np.ndarray]], dict[str, dict[str, np.ndarray]]]:
    """Setting -> sensitivity arrays (``sensitivity.sensitivity_arrays``) on its method's Robust
    and Failure prompts, with ``rows`` and the ``failure`` mask; method -> signal injection into
    its low setting from the reference and its higher ones (``sensitivity.injection_settings``),
    on its Failure prompts (when the run has the sensitivity maps over every block, ``--sweeps full``).
    Each is a resumable stage."""
    loaded, bank, config, primary = context.loaded, context.bank, context.config, context.prompts.primary
    effects, injection = {}, {}
    for spec in sensitivity_specs(config, context.specs):
        named = groups.get(spec.method)
        rows = np.sort(np.concatenate([named["robust"], named["failure"]])) if named else np.array([], dtype=int)
        if not len(rows):
            continue
        prompts = [primary[i] for i in rows]
        compute = partial(sensitivity_arrays, loaded, bank, spec, prompts, config.batch_size, config.sweeps)
        key = context.stage_key(spec, rows.tolist(), config.sweeps)
        arrays = context.run_dir.cached("sensitivity", key, compute, spec.key)
        effects[spec] = arrays | {"rows": rows, "failure": np.isin(rows, named["failure"])}
    for method, named in groups.items():
        mapped = "sensitivity" in config.analyses and config.sweeps == "full"
        chosen = injection_settings(method, context.specs) if mapped else None
        if chosen is None or not len(named["failure"]):
            continue
        low, highs = chosen
        key = context.stage_key([low, *highs], named["failure"].tolist())
        failure = [primary[i] for i in named["failure"]]
        compute = partial(injection_arrays, loaded, bank, low, highs, failure, config.batch_size)
        arrays = context.run_dir.cached("injection", key, compute, method)
        injection[method] = arrays | {"low": np.array(low.key), "highs": np.array([high.key for high in highs])}
    return effects, injection


def repair_effects(
    context: RunContext, groups: Groups, sensitivity: dict[Setting, dict[str, np.ndarray]]
) -> dict[Setting, dict[str, np.ndarray]]:
    """Setting -> repair table (``repairs.repair_arrays``) on its method's Failure and Robust
    prompts (of settings ``repairs.repairable``), protecting with ``repairs.protect_setting``
    (quantized if the run has none); m from the setting's domino test when the run has one. Each
    setting is a resumable stage."""
    loaded, bank, config = context.loaded, context.bank, context.config
    options = config.repair_options()
    specs = [spec for spec in repair_specs(config, context.specs) if repairable(spec, groups)]
    reads = {spec: repair_reads(spec, protect_setting(spec), options) for spec in specs}
    needed = list(dict.fromkeys(setting for settings in reads.values() for setting in settings))
    profiler = context.run_dir.profiler
    for setting in needed:
        if isinstance(setting, QuantSpec) and setting not in context.specs:  # the run's own are in the bank
            ensure(bank, setting, profiler)
    corrected = [setting.base for setting in needed if isinstance(setting, Compensated)]
    if corrected:
        with profiler.stage("eora", f"rank {options.rank}") as marks:
            marks["cached"] = all(bank.has(compensated(s, options.rank)) for s in corrected)
            bank.ensure_eora(corrected, options.rank)
    tables = {}
    for spec in specs:
        named, protect = groups[spec.method], protect_setting(spec)
        onset = damage_onset(sensitivity[spec]) if spec in sensitivity else None
        blocks = protected_blocks(loaded.adapter.n_layers, onset, options.blocks)
        rows = {name: named[name].tolist() for name in ("failure", "robust")}
        key = context.stage_key(reads[spec], rows, asdict(options), blocks)
        failure, robust = ([context.prompts.primary[i] for i in rows[name]] for name in ("failure", "robust"))
        compute = partial(
            repair_arrays, loaded, bank, spec, protect, failure, robust, blocks, options, config.batch_size
        )
        tables[spec] = context.run_dir.cached("repairs", key, compute, spec.key)
    return tables


def task_effects(context: RunContext) -> dict[Setting, dict[str, dict]]:
    """Each setting's (the reference's too) scores on ``config.tasks`` through lm-eval
    (``tasks.task_scores``): a resumable stage a setting. lm-eval's model wrapper is built only
    if a stage is not cached (a resumed run reads every score without it)."""
    config = context.config
    model = cache(partial(task_model, context.loaded, config.batch_size))
    scores = {}
    for setting in [REFERENCE, *context.specs]:
        compute = partial(_task_arrays, context.bank, model, setting, config)
        key = context.stage_key(setting, config.tasks, config.task_limit)
        arrays = context.run_dir.cached("tasks", key, compute, setting.key)
        tasks = enumerate(arrays["task"])
        scores[setting] = {str(task): {field: arrays[field][i].item() for field in TASK_FIELDS} for i, task in tasks}
    return scores


def _task_arrays(bank: WeightBank, model: Callable, setting: Setting, config: RunConfig) -> dict[str, np.ndarray]:
    """One setting's task scores as arrays, what the stage cache holds: ``task`` and each field;
    ``model()`` gives lm-eval's wrapper around the bank's model."""
    bank.apply(PrecisionPlan.uniform(setting))
    measured = task_scores(model(), config.tasks, config.task_limit)
    arrays = {field: np.array([row[field] for row in measured.values()]) for field in TASK_FIELDS}
    return arrays | {"task": np.array(list(measured))}


def distribution_effects(context: RunContext) -> dict[Setting, dict[str, np.ndarray]]:
    """KL divergence from the reference, top-token agreement and perplexity of the reference and
    every setting on the held-out text (``--text``, else model-generated): one resumable stage."""
    config, bank = context.config, context.bank
    text = held_out_text(
        context.loaded, config.text, bank.calibration, config.calib_samples, config.calib_length, config.seed
    )
    settings = [REFERENCE, *context.specs]

    def compute() -> dict[str, np.ndarray]:
        arrays = distribution_arrays(context.loaded, bank, settings, text.ids)
        return {f"{setting.key}/{name}": value for setting, values in arrays.items() for name, value in values.items()}

    flat = context.run_dir.cached("distribution", context.stage_key(settings, text.digest), compute)
    prefixes = {setting: f"{setting.key}/" for setting in settings}
    return {
        setting: {name.removeprefix(prefix): value for name, value in flat.items() if name.startswith(prefix)}
        for setting, prefix in prefixes.items()
    }


def _arrays(
    reference: Evaluated, evaluated: list[Evaluated], facts: list[Fact], analyses: Analyses
) -> dict[str, np.ndarray]:
    """Per-prompt arrays of every setting, ``{setting}/{field}``; per setting the arrays of each
    analysis, ``{setting}/{analysis}/...``; ``components/...``, ``injection/{method}/...``; and
    each prompt's relation."""
    arrays = {"relation": np.array([fact.relation for fact in facts])}
    for item in [reference, *evaluated]:
        arrays.update(item.scores.arrays(f"{item.setting.key}/"))
        arrays[f"{item.setting.key}/robustness/correct"] = item.robustness
    for analysis, by_setting in analyses.per_setting().items():
        for setting, values in by_setting.items():
            arrays.update({f"{setting.key}/{analysis}/{key}": value for key, value in values.items()})
    arrays.update({f"components/{key}": value for key, value in analyses.components.items()})
    for method, values in analyses.injection.items():
        arrays.update({f"injection/{method}/{key}": value for key, value in values.items()})
    return arrays
