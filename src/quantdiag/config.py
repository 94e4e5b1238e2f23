"""Run configuration: what to quantize, which facts, which device; presets fill the sizes.

A leaf module (no torch, no file access): each field the command line sets declares its option
here, help text and default together (``option``); ``quantdiag.resolve`` reads what the fields
name (checkpoints, facts, the output folder) once per run.

``quick`` is for tests and a first look (minutes on a laptop CPU for SmolLM2): recall, the logit
lens, the component and representation metrics, the domino test over the early blocks and early
protection (the cheapest repair), so that each of the verdict's three questions is answered, by the
same definitions as in ``full`` (docs/verdict.md); ``full`` is the default diagnosis, adding
cross-model patching, zero ablation, the sensitivity maps over every block and every repair. The
calibration set defaults to 16 x 256 tokens, enough for small models on a CPU; for a paper-scale
run on a GPU add ``--facts all --calib-samples 128 --calib-length 2048``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from quantdiag.analysis.repair_names import REPAIRS
from quantdiag.errors import QuantdiagError

#: The built-in model (SmolLM2-135M, GGUF).
DEFAULT_MODEL = "smollm2"
#: quantdiag's own quantization methods.
METHODS = ("rtn", "gptq", "awq")
#: The methods a run quantizes with unless ``--methods`` says otherwise (AWQ is asked for by name).
DEFAULT_METHODS = ("rtn", "gptq")
#: The causal analyses, and the streams they write (residual, MLP output, attention output).
CAUSAL_ANALYSES = ("patching", "ablation")
KINDS = ("resid", "mlp", "attn")
#: Average bits allowed by kurtosis protection.
KURTOSIS_BUDGET = 4.1
#: Amplification strengths chosen among on the dev split.
DEFAULT_ALPHAS = (0.0, 0.5, 1.0, 2.0, 3.0, 5.0, 7.0, 9.0)
#: Rank of the EoRA compensation.
DEFAULT_RANK = 32
#: Without --relations a run keeps the relations on which the reference answers at least
#: MIN_KNOWN_ACCURACY of PROBE_FACTS seeded facts (``analysis.known``; on Gemma 3 270M the probe keeps
#: exactly the Makefile's demo relations, docs/verdict.md).
PROBE_FACTS = 20
MIN_KNOWN_ACCURACY = 0.1
#: How far the sensitivity maps sweep: the domino test over the early blocks only (what the verdict
#: reads, docs/verdict.md), or the domino and single-block tests over every block and the component groups.
SWEEPS = ("early", "full")
#: The repairs a run can try (the table's first row, no repair, always comes with them).
TRIED_REPAIRS = REPAIRS[1:]
#: Optional analyses beyond recall and the logit lens.
ANALYSES = (*CAUSAL_ANALYSES, "components", "representations", "sensitivity", "repairs", "distribution")
PRESETS: dict[str, dict] = {
    "quick": {
        "facts_per_relation": 20,
        "robustness_facts": 30,  # two paraphrases each: one batch of answers a setting
        "max_paraphrases": 2,
        "analyses": ("components", "representations", "sensitivity", "repairs"),
        "patch_prompts": 4,
        "sweeps": "early",
        "repairs": ("early",),
    },
    "full": {
        "facts_per_relation": 15,
        "robustness_facts": 60,
        "max_paraphrases": 3,
        "analyses": ANALYSES,
        "patch_prompts": 8,
        "sweeps": "full",
        "repairs": TRIED_REPAIRS,
    },
}
#: What a run folder holds: ``out`` may be one (a rerun resumes) and, unless forced, nothing else.
RUN_FILES = ("config.json", "results.json", "arrays.npz", "report.html")
RUN_FOLDERS = ("figures", "stages")
#: Options that must be positive when given.
POSITIVE = (
    *("facts_per_relation", "robustness_facts", "calib_samples", "calib_length", "batch_size", "patch_prompts"),
    *("window", "protect_blocks", "eora_rank", "task_limit"),
)


def option(default: Any, help: str, name: str | None = None) -> Any:
    """A field the command line sets with ``--name`` (default: the field's name): its default and
    help text, declared once for every command that offers it."""
    return field(default=default, metadata={"help": help, "name": name})


@dataclass(frozen=True)
class RepairOptions:
    """``blocks``: m for early protection (``None``: from the domino test, else L / 16);
    ``budget``: average bits of kurtosis protection; ``alphas``: amplification grid; ``rank``:
    EoRA rank; ``seed``: the dev/test split; ``tried``: the repairs, in the table's order."""

    tried: tuple[str, ...]
    blocks: int | None
    budget: float
    alphas: tuple[float, ...]
    rank: int
    seed: int


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a run; saved as ``config.json`` in the run directory."""

    out: str = option("runs/latest", "run directory")
    model: str = option(DEFAULT_MODEL, "HF repo id or folder, a .gguf file, or built in: 'smollm2', 'gemma3-270m'")
    methods: tuple[str, ...] = option(DEFAULT_METHODS, "quantization methods, comma-separated: rtn, gptq, awq")
    compare: tuple[str, ...] = option(
        (), "a checkpoint to judge: GPTQ or AWQ folder, .gguf file or float folder (repeat for more)"
    )
    bits: tuple[int, ...] = option((8, 4, 3, 2), "weight bit widths, comma-separated, each 2..8")
    group_size: int = option(128, "quantization group size (falls back where it does not divide)")
    sym: bool = option(True, "asymmetric quantization (zero point per group)", "asym")
    preset: str = option("full", f"sizes: {', '.join(PRESETS)}")
    facts_per_relation: int | None = option(None, "facts per relation, or 'all' (default: from the preset)", "facts")
    facts_file: str | None = option(None, "JSONL of your own facts: subject, object, template")
    relations: tuple[str, ...] | None = option(
        None,
        "ParaRel relation ids, comma-separated (default: those the reference knows: at least "
        f"{MIN_KNOWN_ACCURACY:.0%} of {PROBE_FACTS} probe facts)",
    )
    robustness_facts: int | None = None
    max_paraphrases: int | None = None
    calib: str | None = option(None, "calibration text or JSONL file (default: model-generated)")
    calib_samples: int = option(16, "calibration sequences")
    calib_length: int = option(256, "tokens per calibration sequence")
    text: str | None = option(
        None, "held-out text or JSONL file for the KL divergence and perplexity (default: model-generated, held out)"
    )
    tasks: tuple[str, ...] = option(
        (),
        "lm-evaluation-harness tasks to score every setting on, comma-separated: the shipped quantdiag_languages "
        "and quantdiag_arithmetic, any lm-eval task name or a task YAML file (needs lm-eval: the extra tasks)",
    )
    task_limit: int | None = option(None, "items a task at most (default: all)")
    representations_on: str | None = option(
        None,
        "an lm-eval task (as --tasks takes them) whose prompts the representation similarities are also measured "
        "on, at the last token, every setting against the reference (the paper's Appendix E); --task-limit items",
    )
    subset_bits: int = 4
    analyses: tuple[str, ...] | None = option(
        None, f"analyses beyond recall and lens, comma-separated: {', '.join(ANALYSES)}, or none"
    )
    patch_prompts: int | None = option(None, "prompts per subset for the causal analyses (default: from the preset)")
    causal_bits: tuple[int, ...] | None = option(
        None, "bit widths that get the causal analyses (default: all of --bits)"
    )
    sensitivity_bits: tuple[int, ...] | None = option(
        None, "bit widths that get the sensitivity maps (default: all of --bits)"
    )
    sweeps: str | None = option(
        None,
        "sensitivity sweeps: early (the domino test over the early blocks, what the verdict reads) or full "
        "(domino and single-block tests over every block, component groups) (default: from the preset)",
    )
    repair_bits: tuple[int, ...] | None = option(None, "bit widths that get the repair table (default: all of --bits)")
    repairs: tuple[str, ...] | None = option(
        None, f"repairs to try, comma-separated: {', '.join(TRIED_REPAIRS)} (default: from the preset)"
    )
    protect_blocks: int | None = option(
        None, "blocks kept at 8-bit by early protection (default: from the domino test, else layers / 16)"
    )
    kurtosis_budget: float = option(KURTOSIS_BUDGET, "average bits allowed by kurtosis protection", "budget")
    alphas: tuple[float, ...] = option(
        DEFAULT_ALPHAS, "amplification strengths to choose from on the dev split, comma-separated"
    )
    eora_rank: int = option(DEFAULT_RANK, "rank of the EoRA compensation", "rank")
    streams: tuple[str, ...] = option(
        KINDS,
        f"what patching and ablation write, comma-separated: {', '.join(KINDS)} (residual, MLP output, attention "
        "output)",
    )
    window: int = option(1, "layers patched together for MLP and attention outputs (ROME's window)")
    batch_size: int = option(64, "prompts per forward pass")
    device: str = option("auto", "cpu, cuda or auto")
    dtype: str = option("auto", "auto, float32, bfloat16 or float16")
    trust_remote_code: bool = option(False, "allow the model's own code")
    seed: int = option(0, "seed of fact sampling and calibration text")
    all_facts: bool = False  # set by --facts all
    force: bool = option(False, "write into --out even if it holds files that are not a quantdiag run's")
    profile: bool = option(
        False, "record each stage's wall, CPU and device time and peak memory (results.json, report)"
    )

    def checked(self) -> RunConfig:
        """Fill unset sizes from the preset and check every value that needs no file; raises
        QuantdiagError."""
        if self.preset not in PRESETS:
            raise QuantdiagError(f"unknown preset '{self.preset}' (choose from {', '.join(PRESETS)})")
        filled = {k: v for k, v in PRESETS[self.preset].items() if getattr(self, k) is None}
        config = replace(self, **filled)
        config._check_methods()
        for name in POSITIVE:
            if getattr(config, name) is not None and getattr(config, name) <= 0:
                raise QuantdiagError(f"{name.replace('_', '-')} must be positive")
        if config.methods and config.subset_bits not in config.bits:
            raise QuantdiagError(
                f"the subsets need {config.subset_bits}-bit settings: add {config.subset_bits} to --bits"
            )
        unknown = [a for a in config.analyses if a not in ANALYSES]
        if unknown:
            raise QuantdiagError(f"unknown analysis {', '.join(unknown)} (choose from {', '.join(ANALYSES)}, or none)")
        if config.sweeps not in SWEEPS:
            raise QuantdiagError(f"unknown sweeps '{config.sweeps}' (choose from {', '.join(SWEEPS)})")
        unknown = [r for r in config.repairs if r not in TRIED_REPAIRS]
        if unknown or not config.repairs:
            raise QuantdiagError(
                f"unknown repair {', '.join(unknown) or '(none)'} (choose from {', '.join(TRIED_REPAIRS)})"
            )
        unknown = [k for k in config.streams if k not in KINDS]
        if unknown or not config.streams:
            raise QuantdiagError(f"unknown stream {', '.join(unknown) or '(none)'} (choose from {', '.join(KINDS)})")
        for option_name in ("causal_bits", "sensitivity_bits", "repair_bits"):
            missing = sorted(set(getattr(config, option_name) or ()) - set(config.bits))
            if missing:
                raise QuantdiagError(
                    f"--{option_name.replace('_', '-')} {', '.join(map(str, missing))} not among --bits"
                )
        if not config.alphas or any(a < 0 for a in config.alphas):
            raise QuantdiagError("--alphas must be non-negative numbers")
        return config

    def _check_methods(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not (self.methods or self.compare):
            raise QuantdiagError(f"unknown method {', '.join(unknown) or '(none)'} (choose from {', '.join(METHODS)})")
        if self.methods and not self.bits:
            raise QuantdiagError("no bit widths given")

    def repair_options(self) -> RepairOptions:
        tried = tuple(r for r in TRIED_REPAIRS if r in self.repairs)
        return RepairOptions(
            tried, self.protect_blocks, self.kurtosis_budget, tuple(sorted(self.alphas)), self.eora_rank, self.seed
        )

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> RunConfig:
        """Inverse of :meth:`to_json` (JSON lists back to tuples); unknown keys are an error."""
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise QuantdiagError(f"config.json has unknown options: {', '.join(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
