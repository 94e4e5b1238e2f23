"""The resolving step of a run, once, before any work: check the configuration, read what it
names (the compared checkpoints, the facts) and check the output folder; the stages then use
what it returns instead of reading again."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

from quantdiag.analysis.tasks import checked_tasks
from quantdiag.config import CAUSAL_ANALYSES, DEFAULT_MODEL, RUN_FILES, RUN_FOLDERS, RunConfig
from quantdiag.data.facts import Fact, load_pararel, load_user_facts
from quantdiag.errors import QuantdiagError
from quantdiag.quant.checkpoint import CheckpointSpec, ComparedSpec, inspect_checkpoint
from quantdiag.quant.spec import QuantSpec

#: A run file's temporary twin (``storage.atomic_file``), left behind if a run was killed mid-write.
_RUN_TEMPORARY = re.compile(r"^\.(config\.json|results\.json|arrays\.npz|report\.html)\..+\.tmp$")
#: Fields every saved run configuration holds (an empty ``{}`` would parse as a RunConfig too).
_RUN_CONFIG_KEYS = {"out", "model", "methods", "bits", "preset"}


@dataclass(frozen=True)
class Resolved:
    """A checked configuration (paths absolute), its compared settings and its facts (``None``
    when the run chooses its relations by the reference's accuracy, ``chooses_relations``)."""

    config: RunConfig
    specs: list[ComparedSpec]
    facts: list[Fact] | None


def resolve(config: RunConfig) -> Resolved:
    """Fill and check ``config``, inspect its checkpoints, load its facts and check that its
    output folder can be written; raises QuantdiagError."""
    config = config.checked()
    config = replace(config, tasks=checked_tasks(config.tasks))
    if config.representations_on:
        (task,) = checked_tasks((config.representations_on,))
        config = replace(config, representations_on=task)
    specs = compared_specs(config)
    facts = None if chooses_relations(config) else load_facts(config)
    check_writable(Path(config.out), config.force)
    return Resolved(absolute(config), specs, facts)


def compared_specs(config: RunConfig) -> list[ComparedSpec]:
    """Every compared setting: each (method, bits), methods first, then the checkpoints."""
    quantized = [
        QuantSpec(method, bits, config.group_size, config.sym) for method in config.methods for bits in config.bits
    ]
    checkpoints = [inspect_checkpoint(path) for path in config.compare]
    names = [spec.method for spec in checkpoints]
    clash = sorted({name for name in names if names.count(name) > 1 or name in config.methods})
    if clash:
        raise QuantdiagError(
            f"two compared models would share the name {clash[0]}: rename a checkpoint's file or folder"
        )
    return quantized + checkpoints


def chooses_relations(config: RunConfig) -> bool:
    """Whether the run names neither relations nor a facts file: it keeps the relations the
    reference knows (``analysis.known``), once the model is loaded."""
    return config.relations is None and not config.facts_file


def load_facts(config: RunConfig) -> list[Fact]:
    """The user's facts file, or the seeded ParaRel sample."""
    if config.facts_file:
        return load_user_facts(Path(config.facts_file))
    per_relation = None if config.all_facts else config.facts_per_relation
    return load_pararel(list(config.relations) if config.relations else None, per_relation, config.seed)


def causal_specs(config: RunConfig, specs: list[ComparedSpec]) -> list[ComparedSpec]:
    """The settings that get the causal analyses (all of them unless ``causal_bits``)."""
    causal = any(a in CAUSAL_ANALYSES for a in config.analyses)
    return with_bits(specs, config.causal_bits) if causal else []


def sensitivity_specs(config: RunConfig, specs: list[ComparedSpec]) -> list[ComparedSpec]:
    """The settings that get the sensitivity maps (all of them unless ``sensitivity_bits``)."""
    return with_bits(specs, config.sensitivity_bits) if "sensitivity" in config.analyses else []


def repair_specs(config: RunConfig, specs: list[ComparedSpec]) -> list[ComparedSpec]:
    """The settings that get the repair table (all of them unless ``repair_bits``)."""
    return with_bits(specs, config.repair_bits) if "repairs" in config.analyses else []


def with_bits(specs: list[ComparedSpec], chosen: tuple[int, ...] | None) -> list[ComparedSpec]:
    """The settings with ``chosen`` bits (all if ``None``), and every checkpoint."""
    return [spec for spec in specs if chosen is None or isinstance(spec, CheckpointSpec) or spec.bits in chosen]


def absolute(config: RunConfig) -> RunConfig:
    """The same run with every path absolute (the model when it is a file or folder), so that
    ``config.json`` means the same files from any working folder."""
    is_path = config.model != DEFAULT_MODEL and Path(config.model).expanduser().exists()
    model = _absolute(config.model) if is_path else config.model
    return replace(
        config,
        out=_absolute(config.out),
        model=model,
        facts_file=config.facts_file and _absolute(config.facts_file),
        calib=config.calib and _absolute(config.calib),
        text=config.text and _absolute(config.text),
        compare=tuple(_absolute(path) for path in config.compare),
    )


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
    """What in ``out`` a quantdiag run does not write, by name (folders with a slash); without a
    run's config.json, every entry but a killed write's temporary file is foreign."""
    own = _is_run_entry if _is_run_config(out / "config.json") else lambda entry: _RUN_TEMPORARY.match(entry.name)
    return sorted(_describe(entry) for entry in out.iterdir() if not own(entry))


def _describe(entry: Path) -> str:
    if entry.name == "config.json" and entry.is_file():
        return "config.json (not a quantdiag run's)"
    return entry.name + ("/" if entry.is_dir() else "")


def _is_run_entry(entry: Path) -> bool:
    """Whether ``entry`` is one of a run's own files or folders (in a folder whose config.json is a run's)."""
    if entry.name in RUN_FOLDERS:
        return entry.is_dir()
    return entry.is_file() and (entry.name in RUN_FILES or _RUN_TEMPORARY.match(entry.name) is not None)


def _is_run_config(file: Path) -> bool:
    """Whether ``file`` is a saved RunConfig: it parses as one and names what every run saves."""
    try:
        data = json.loads(file.read_text())
        RunConfig.from_json(data)
    except (OSError, ValueError, TypeError, AttributeError, QuantdiagError):
        return False
    return _RUN_CONFIG_KEYS <= data.keys()
