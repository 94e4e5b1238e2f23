"""``quantdiag run`` as one library call: quantize every setting once, evaluate recall and the
logit lens of the reference and each setting, write results, arrays, figures and the report."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from quantdiag.analysis.forward import Scores, score_prompts
from quantdiag.config import RunConfig
from quantdiag.data.facts import Fact, Prompt, robustness_texts, tokenize
from quantdiag.model.load import LoadedModel, load_reference
from quantdiag.quant.bank import WeightBank
from quantdiag.quant.calib import load_calibration
from quantdiag.quant.spec import REFERENCE, PrecisionPlan, QuantSpec
from quantdiag.report.html import write_report
from quantdiag.results import build_results
from quantdiag.runs import RunDir, save_arrays
from quantdiag.storage import content_hash


@dataclass
class PromptSet:
    """Primary prompts (one per fact) and robustness prompts (paraphrases of a sample of facts)."""

    primary: list[Prompt]
    robustness: list[Prompt]

    @property
    def fact_of_robustness(self) -> np.ndarray:
        return np.array([p.fact for p in self.robustness], dtype=np.int64)

    @cached_property
    def digest(self) -> str:
        """Hash of every prompt's ids and target: part of each evaluation stage's cache key."""
        blob = repr([(p.ids, p.target) for p in self.primary + self.robustness]).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


@dataclass
class Evaluated:
    """One model setting's scores on the primary and robustness prompts."""

    setting: str
    spec: QuantSpec | None
    scores: Scores
    robustness: Scores


def run(config: RunConfig) -> Path:
    """Run the diagnosis described by ``config``; returns the report's path."""
    config = config.resolved()
    loaded = load_reference(config.model, config.device, config.dtype, config.trust_remote_code)
    facts = config.facts()
    prompts = build_prompts(loaded, facts, config)
    specs = config.specs()
    needs_calibration = any(spec.method == "gptq" for spec in specs)
    calibration = (
        load_calibration(loaded, config.calib, config.calib_samples, config.calib_length, config.seed)
        if needs_calibration
        else None
    )
    bank = WeightBank(loaded, calibration)
    for spec in specs:
        bank.ensure(spec)
    run_dir = RunDir(Path(config.out))
    run_dir.write_json("config.json", config.to_json())
    reference = evaluate(run_dir, loaded, bank, prompts, None, config.batch_size, np.ones(len(facts), dtype=bool))
    evaluated = [
        evaluate(run_dir, loaded, bank, prompts, spec, config.batch_size, reference.scores.correct) for spec in specs
    ]
    bank.apply(PrecisionPlan.uniform(REFERENCE))
    results = build_results(config, loaded, facts, prompts.fact_of_robustness, reference, evaluated, bank, calibration)
    run_dir.write_json("results.json", results)
    save_arrays(run_dir.path / "arrays.npz", _arrays(reference, evaluated, facts))
    write_report(run_dir, results)
    return run_dir.report


def build_prompts(loaded: LoadedModel, facts: list[Fact], config: RunConfig) -> PromptSet:
    """Tokenize the primary prompt of every fact, and the robustness paraphrases of a seeded
    sample of ``config.robustness_facts`` facts."""
    tokenizer = loaded.tokenizer
    primary = [tokenize(tokenizer, fact, index) for index, fact in enumerate(facts)]
    order = np.random.default_rng(config.seed).permutation(len(facts))
    sample = sorted(order[: config.robustness_facts].tolist())
    robustness = [
        tokenize(tokenizer, facts[index], index, text)
        for index in sample
        for text in robustness_texts(facts[index], config.max_paraphrases)
    ]
    return PromptSet(primary, robustness)


def evaluate(
    run_dir: RunDir,
    loaded: LoadedModel,
    bank: WeightBank,
    prompts: PromptSet,
    spec: QuantSpec | None,
    batch_size: int,
    lens_rows: np.ndarray,
) -> Evaluated:
    """Scores of one uniform setting (``None``: the reference), from the stage cache if finished."""
    setting = REFERENCE if spec is None else spec.key
    key = content_hash(loaded.fingerprint, bank.path(setting).name, prompts.digest, lens_rows.tobytes().hex())

    def compute() -> dict[str, np.ndarray]:
        bank.apply(PrecisionPlan.uniform(setting))
        label = "reference" if spec is None else spec.label
        main = score_prompts(loaded, prompts.primary, batch_size, lens_rows, desc=f"recall {label}")
        robust = score_prompts(loaded, prompts.robustness, batch_size, desc=f"robustness {label}")
        return {**main.arrays(), **robust.arrays("robustness/")}

    arrays = run_dir.cached(f"eval-{setting}", key, compute)
    return Evaluated(setting, spec, Scores.from_arrays(arrays), Scores.from_arrays(arrays, "robustness/"))


def _arrays(reference: Evaluated, evaluated: list[Evaluated], facts: list[Fact]) -> dict[str, np.ndarray]:
    """Per-prompt arrays of every setting, ``{setting}/{field}``, plus each prompt's relation."""
    arrays = {"relation": np.array([fact.relation for fact in facts])}
    for item in [reference, *evaluated]:
        arrays.update(item.scores.arrays(f"{item.setting}/"))
        arrays.update(item.robustness.arrays(f"{item.setting}/robustness/"))
    return arrays
