"""Run configuration: what to quantize, which facts, which device; presets fill the sizes.

``quick`` is for tests and a first look (minutes on a laptop CPU for SmolLM2): recall, the logit
lens, and the component and representation metrics, enough for a verdict; ``full`` is the default
diagnosis, adding cross-model patching, zero ablation, the sensitivity maps and the repairs. The
calibration set defaults to 16 x 256 tokens, enough for small models on a CPU; for a paper-scale
run on a GPU add ``--facts all --calib-samples 128 --calib-length 2048``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from quantdiag.analysis.amplify import DEFAULT_ALPHAS
from quantdiag.analysis.causal import CAUSAL_ANALYSES, KINDS
from quantdiag.analysis.repairs import KURTOSIS_BUDGET, RepairOptions
from quantdiag.data.facts import Fact, load_pararel, load_user_facts
from quantdiag.errors import QuantdiagError
from quantdiag.model.load import DEFAULT_MODEL
from quantdiag.quant.checkpoint import CheckpointSpec, ComparedSpec, inspect_checkpoint
from quantdiag.quant.eora import DEFAULT_RANK
from quantdiag.quant.spec import METHODS, QuantSpec

#: Optional analyses beyond recall and the logit lens.
ANALYSES = (*CAUSAL_ANALYSES, "components", "representations", "sensitivity", "repairs")
PRESETS: dict[str, dict] = {
    "quick": {"facts_per_relation": 6, "robustness_facts": 40, "max_paraphrases": 2, "analyses": ("components", "representations"), "patch_prompts": 4},
    "full": {"facts_per_relation": 15, "robustness_facts": 60, "max_paraphrases": 3, "analyses": ANALYSES, "patch_prompts": 8},
}
#: What a run folder holds: ``out`` may be one (a rerun resumes) and, unless forced, nothing else.
RUN_FILES = ("config.json", "results.json", "arrays.npz", "report.html")
RUN_FOLDERS = ("figures", "stages")
#: A run file's temporary twin (``storage.atomic_file``), left behind if a run was killed mid-write.
_RUN_TEMPORARY = re.compile(r"^\.(config\.json|results\.json|arrays\.npz|report\.html)\..+\.tmp$")


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a run; saved as ``config.json`` in the run directory."""

    out: str = "runs/latest"
    model: str = DEFAULT_MODEL
    methods: tuple[str, ...] = ("rtn", "gptq")
    compare: tuple[str, ...] = ()
    bits: tuple[int, ...] = (8, 4, 3, 2)
    group_size: int = 128
    sym: bool = True
    preset: str = "full"
    facts_per_relation: int | None = None
    facts_file: str | None = None
    relations: tuple[str, ...] | None = None
    robustness_facts: int | None = None
    max_paraphrases: int | None = None
    calib: str | None = None
    calib_samples: int = 16
    calib_length: int = 256
    subset_bits: int = 4
    analyses: tuple[str, ...] | None = None
    patch_prompts: int | None = None
    causal_bits: tuple[int, ...] | None = None
    sensitivity_bits: tuple[int, ...] | None = None
    repair_bits: tuple[int, ...] | None = None
    protect_blocks: int | None = None
    kurtosis_budget: float = KURTOSIS_BUDGET
    alphas: tuple[float, ...] = DEFAULT_ALPHAS
    eora_rank: int = DEFAULT_RANK
    streams: tuple[str, ...] = KINDS
    window: int = 1
    batch_size: int = 64
    device: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False
    seed: int = 0
    all_facts: bool = False
    force: bool = False  # write into an output folder that holds something other than a run

    def resolved(self) -> RunConfig:
        """Fill unset sizes from the preset and check every value; raises QuantdiagError."""
        if self.preset not in PRESETS:
            raise QuantdiagError(f"unknown preset '{self.preset}' (choose from {', '.join(PRESETS)})")
        filled = {k: v for k, v in PRESETS[self.preset].items() if getattr(self, k) is None}
        config = replace(self, **filled)
        config.specs()
        for name in ("facts_per_relation", "robustness_facts", "calib_samples", "calib_length", "batch_size", "patch_prompts", "window", "protect_blocks", "eora_rank"):
            if getattr(config, name) is not None and getattr(config, name) <= 0:
                raise QuantdiagError(f"{name.replace('_', '-')} must be positive")
        if config.methods and config.subset_bits not in config.bits:
            raise QuantdiagError(f"the subsets need {config.subset_bits}-bit settings: add {config.subset_bits} to --bits")
        unknown = [a for a in config.analyses if a not in ANALYSES]
        if unknown:
            raise QuantdiagError(f"unknown analysis {', '.join(unknown)} (choose from {', '.join(ANALYSES)}, or none)")
        unknown = [k for k in config.streams if k not in KINDS]
        if unknown or not config.streams:
            raise QuantdiagError(f"unknown stream {', '.join(unknown) or '(none)'} (choose from {', '.join(KINDS)})")
        for option in ("causal_bits", "sensitivity_bits", "repair_bits"):
            missing = sorted(set(getattr(config, option) or ()) - set(config.bits))
            if missing:
                raise QuantdiagError(f"--{option.replace('_', '-')} {', '.join(map(str, missing))} not among --bits")
        if not config.alphas or any(a < 0 for a in config.alphas):
            raise QuantdiagError("--alphas must be non-negative numbers")
        config.facts()
        check_writable(Path(config.out), config.force)
        return config.absolute()

    def absolute(self) -> RunConfig:
        """The same run with every path absolute (the model when it is a file or folder), so that
        ``config.json`` means the same files from any working folder."""
        is_path = self.model != DEFAULT_MODEL and Path(self.model).expanduser().exists()
        model = _absolute(self.model) if is_path else self.model
        return replace(
            self,
            out=_absolute(self.out),
            model=model,
            facts_file=self.facts_file and _absolute(self.facts_file),
            calib=self.calib and _absolute(self.calib),
            compare=tuple(_absolute(path) for path in self.compare),
        )

    def specs(self) -> list[ComparedSpec]:
        """Every compared setting: each (method, bits), methods first, then the checkpoints."""
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not (self.methods or self.compare):
            raise QuantdiagError(f"unknown method {', '.join(unknown) or '(none)'} (choose from {', '.join(METHODS)})")
        if self.methods and not self.bits:
            raise QuantdiagError("no bit widths given")
        quantized = [QuantSpec(method, bits, self.group_size, self.sym) for method in self.methods for bits in self.bits]
        checkpoints = [inspect_checkpoint(path) for path in self.compare]
        names = [spec.method for spec in checkpoints]
        clash = sorted({name for name in names if names.count(name) > 1 or name in self.methods})
        if clash:
            raise QuantdiagError(f"two compared models would share the name {clash[0]}: rename a checkpoint's file or folder")
        return quantized + checkpoints

    def facts(self) -> list[Fact]:
        """The user's facts file, or the seeded ParaRel sample."""
        if self.facts_file:
            return load_user_facts(Path(self.facts_file))
        per_relation = None if self.all_facts else self.facts_per_relation
        return load_pararel(list(self.relations) if self.relations else None, per_relation, self.seed)

    def causal_specs(self) -> list[ComparedSpec]:
        """The settings that get the causal analyses (all of them unless ``causal_bits``)."""
        causal = any(a in CAUSAL_ANALYSES for a in self.analyses)
        return self._specs_with_bits(self.causal_bits) if causal else []

    def sensitivity_specs(self) -> list[ComparedSpec]:
        """The settings that get the sensitivity maps (all of them unless ``sensitivity_bits``)."""
        return self._specs_with_bits(self.sensitivity_bits) if "sensitivity" in self.analyses else []

    def repair_specs(self) -> list[ComparedSpec]:
        """The settings that get the repair table (all of them unless ``repair_bits``)."""
        return self._specs_with_bits(self.repair_bits) if "repairs" in self.analyses else []

    def repair_options(self) -> RepairOptions:
        return RepairOptions(self.protect_blocks, self.kurtosis_budget, tuple(sorted(self.alphas)), self.eora_rank, self.seed)

    def _specs_with_bits(self, chosen: tuple[int, ...] | None) -> list[ComparedSpec]:
        """The settings with ``chosen`` bits (all if ``None``), and every checkpoint."""
        return [spec for spec in self.specs() if chosen is None or isinstance(spec, CheckpointSpec) or spec.bits in chosen]

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> RunConfig:
        """Inverse of :meth:`to_json` (JSON lists back to tuples); unknown keys are an error."""
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise QuantdiagError(f"config.json has unknown options: {', '.join(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def _absolute(path: str) -> str:
    """``path`` with ``~`` expanded, made absolute and normalised (symbolic links kept)."""
    return os.path.abspath(os.path.expanduser(path))


def check_writable(out: Path, force: bool = False) -> None:
    """Fail early, before any work, if ``out`` cannot be created or written, or (unless ``force``)
    holds anything but a quantdiag run: a model's folder, or ``.`` inside one, is never overwritten."""
    existing = out
    while not existing.exists():
        existing = existing.parent
    if out.exists() and not out.is_dir():
        raise QuantdiagError(f"output path {out} exists and is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise QuantdiagError(f"output folder {out} is not writable")
    foreign = [] if force or not out.is_dir() else _foreign_entries(out)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise QuantdiagError(
            f"output folder {out} holds {shown}: not a quantdiag run; choose another --out, or pass --force"
        )


def _foreign_entries(out: Path) -> list[str]:
    """What in ``out`` a quantdiag run does not write, by name (folders with a slash)."""
    return sorted(_describe(entry) for entry in out.iterdir() if not _is_run_entry(entry))


def _describe(entry: Path) -> str:
    if entry.name == "config.json" and entry.is_file():
        return "config.json (not a quantdiag run's)"
    return entry.name + ("/" if entry.is_dir() else "")


def _is_run_entry(entry: Path) -> bool:
    """Whether ``entry`` is one of a run's own files or folders (its config.json a RunConfig's)."""
    if entry.name in RUN_FOLDERS:
        return entry.is_dir()
    if not entry.is_file():
        return False
    if entry.name == "config.json":
        return _is_run_config(entry)
    return entry.name in RUN_FILES or _RUN_TEMPORARY.match(entry.name) is not None


def _is_run_config(file: Path) -> bool:
    """Whether ``file`` parses as a saved RunConfig."""
    try:
        RunConfig.from_json(json.loads(file.read_text()))
    except (ValueError, TypeError, AttributeError, QuantdiagError):
        return False
    return True
