"""What a run carries between its stages: the prompts, each setting's scores, the analyses'
arrays, the context every stage works with, and what ``run`` returns."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from quantdiag.analysis.forward import Scores
from quantdiag.analysis.robustness import Paraphrase
from quantdiag.config import RunConfig
from quantdiag.data.facts import Fact, Prompt
from quantdiag.model.load import LoadedModel
from quantdiag.quant.bank import WeightBank
from quantdiag.quant.checkpoint import ComparedSpec
from quantdiag.quant.spec import Setting
from quantdiag.runs import RunDir
from quantdiag.storage import cache_key

#: Method -> subset name -> fact rows.
Groups = dict[str, dict[str, np.ndarray]]


@dataclass
class PromptSet:
    """Primary prompts (one per scored fact) and robustness prompts (paraphrases of a sample of
    them); ``facts``: the scored facts, ``dropped``: how many had no target to score; ``probe``:
    the reference's accuracy per relation the relations were chosen by (``None``: named by the user)."""

    primary: list[Prompt]
    robustness: list[Paraphrase]
    facts: list[Fact]
    dropped: int
    probe: dict[str, float] | None = None

    @property
    def fact_of_robustness(self) -> np.ndarray:
        return np.array([p.fact for p in self.robustness], dtype=np.int64)

    @cached_property
    def digest(self) -> str:
        """Hash of every prompt's fact, ids, target and subject span (causal tracing, components
        and representations read it): part of every stage's cache key."""
        primary = [(p.fact, p.ids, p.target, p.subject) for p in self.primary]
        blob = repr(primary + [(p.fact, p.ids) for p in self.robustness]).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


@dataclass
class Evaluated:
    """One model setting's scores on the primary prompts and, per robustness paraphrase, whether
    its answer named the object: the reference's, or a compared setting's (a ``ComparedSpec``)."""

    setting: Setting
    scores: Scores
    robustness: np.ndarray


@dataclass
class SubsetArrays:
    """One setting's arrays of an analysis run subset by subset: ``{subset}/{name}`` in ``arrays``
    (as cached and saved) for each name in ``subsets``."""

    subsets: list[str]
    arrays: dict[str, np.ndarray]


@dataclass
class Analyses:
    """The arrays of the optional analyses; empty where an analysis did not run."""

    causal: dict[Setting, SubsetArrays]
    components: dict[str, np.ndarray]
    representations: dict[Setting, SubsetArrays]  # statistics per subset
    sensitivity: dict[Setting, dict[str, np.ndarray]]  # per-prompt correctness under plans
    injection: dict[str, dict[str, np.ndarray]]  # method -> signal injection into its 2-bit setting
    repairs: dict[Setting, dict[str, np.ndarray]]  # the repair table
    distribution: dict[Setting, dict[str, np.ndarray]] = field(default_factory=dict)  # KLD and perplexity sums
    tasks: dict[Setting, dict[str, dict]] = field(default_factory=dict)  # task -> metric, value, items

    def per_setting(self) -> dict[str, dict[Setting, dict[str, np.ndarray]]]:
        """Each per-setting analysis's arrays by its name (what ``arrays.npz`` holds)."""
        return {
            "causal": {setting: staged.arrays for setting, staged in self.causal.items()},
            "representations": {setting: staged.arrays for setting, staged in self.representations.items()},
            "sensitivity": self.sensitivity,
            "repairs": self.repairs,
            "distribution": self.distribution,
        }


@dataclass(frozen=True)
class RunContext:
    """What every stage of a run works with: where results go, the model, its weight bank, the
    prompts, the configuration and the compared settings (read once, ``resolve``)."""

    run_dir: RunDir
    loaded: LoadedModel
    bank: WeightBank
    prompts: PromptSet
    config: RunConfig
    specs: Sequence[ComparedSpec] = ()

    def stage_key(self, settings: Setting | list[Setting], *parts) -> str:
        """A stage's cache key: the code versions, the model, the device kind it runs on (a GPU's
        kernels round differently), the weight files of ``settings`` (with the calibration they
        depend on), the prompts and ``parts``."""
        names = (
            [self.bank.path(s).name for s in settings] if isinstance(settings, list) else self.bank.path(settings).name
        )
        return cache_key(self.loaded.fingerprint, self.loaded.device.type, names, self.prompts.digest, *parts)


@dataclass(frozen=True)
class RunResult:
    """What a run gives back: its report's path and ``results.json``'s content (verdicts included)."""

    report: Path
    results: dict

    @property
    def verdicts(self) -> list[dict]:
        """Per compared setting (every one but the reference): its key, label and verdict."""
        return [{"key": s["key"], "label": s["label"], "verdict": s["verdict"]} for s in self.results["settings"][1:]]
