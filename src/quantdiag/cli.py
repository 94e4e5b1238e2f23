"""The command line: parses options into a RunConfig and makes one library call per command.

User errors print one line on stderr and exit with code 2; an interrupted run exits with 130 and
resumes from its finished stages when the same command runs again.
"""

from __future__ import annotations

import contextlib
import errno
import json
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from typer._click.exceptions import (
    UsageError,  # typer 0.29 vendors click: these are its errors
)
from typer.core import TyperGroup

from quantdiag.analysis.amplify import DEFAULT_ALPHAS
from quantdiag.analysis.causal import CAUSAL_ANALYSES, KINDS
from quantdiag.analysis.repairs import KURTOSIS_BUDGET
from quantdiag.config import ANALYSES, PRESETS, RUN_FOLDERS, RunConfig
from quantdiag.errors import QuantdiagError
from quantdiag.quant.eora import DEFAULT_RANK
from quantdiag.state import RunResult

ANALYSES_HELP = f"analyses beyond recall and lens, comma-separated: {', '.join(ANALYSES)}, or none"
PROMPTS_HELP = "prompts per subset for the causal analyses (default: from the preset)"
BITS_HELP = "bit widths that get the causal analyses (default: all of --bits)"
STREAMS_HELP = f"what patching and ablation write, comma-separated: {', '.join(KINDS)} (residual, MLP output, attention output)"
REPAIR_BITS_HELP = "bit widths that get the repair table (default: all of --bits)"
PROTECT_HELP = "blocks kept at 8-bit by early protection (default: from the domino test, else layers / 16)"
BUDGET_HELP = "average bits allowed by kurtosis protection"
ALPHAS_HELP = "amplification strengths to choose from on the dev split, comma-separated"
RANK_HELP = "rank of the EoRA compensation"
SENSITIVITY_BITS_HELP = "bit widths that get the sensitivity maps (default: all of --bits)"
WINDOW_HELP = "layers patched together for MLP and attention outputs (ROME's window)"
FORCE_HELP = "write into --out even if it holds files that are not a quantdiag run's"
#: Errors of the machine, not of quantdiag: a full disk or quota, a folder one may not write.
ENVIRONMENT_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS)
T = TypeVar("T")


class OneLineErrors(TyperGroup):
    """Options click rejects (not a number, unknown, missing) are one line too, like quantdiag's own errors."""

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except UsageError as error:
            print(f"quantdiag: error: {error.format_message()}", file=sys.stderr)
            raise typer.Exit(2) from None


app = typer.Typer(
    cls=OneLineErrors, add_completion=False, no_args_is_help=True, help="Diagnose why a quantized LLM fails."
)


@app.callback()
def main() -> None:
    """quantdiag: Signal Degradation or Computation Collapse?"""


def _numbers(text: str, what: str, kind: Callable[[str], T]) -> tuple[T, ...]:
    """Comma-separated ``kind`` values (int or float)."""
    try:
        return tuple(kind(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise QuantdiagError(f"{what} must be comma-separated {'integers' if kind is int else 'numbers'}, not '{text}'") from None


def _count(text: str, what: str) -> int:
    if not text.isdigit():
        raise QuantdiagError(f"{what} must be a positive number or 'all', not '{text}'")
    return int(text)


def _names(text: str | None) -> tuple[str, ...] | None:
    return None if text is None else tuple(part.strip() for part in text.split(",") if part.strip())


def _analyses(text: str | None) -> tuple[str, ...] | None:
    """``--analyses``: names, or 'none' for recall and lens only."""
    return () if text == "none" else _names(text)


def _guard(call: Callable[[], T], out: Path) -> T:
    """Turn user and environment errors into one line on stderr and exit code 2, leaving nothing
    of this command's in ``out``."""
    try:
        with _removed_on_error(out):
            return call()
    except QuantdiagError as error:
        print(f"quantdiag: error: {error}", file=sys.stderr)
    except OSError as error:
        if error.errno not in ENVIRONMENT_ERRORS:
            raise
        print(f"quantdiag: error: {error.filename or out}: {error.strerror}", file=sys.stderr)
    except KeyboardInterrupt:
        print("quantdiag: interrupted; run the same command again to resume", file=sys.stderr)
        raise typer.Exit(130) from None
    raise typer.Exit(2)


@contextlib.contextmanager
def _removed_on_error(out: Path) -> Iterator[None]:
    """On a user or environment error, remove what was created under ``out`` meanwhile (``out``
    itself, and the parents made for it, if it did not exist); what was there stays."""
    top = _topmost_missing(out)
    before = set() if top else _run_entries(out)
    try:
        yield
    except (QuantdiagError, OSError):
        created = [top] if top else sorted(_run_entries(out) - before)
        for path in created:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            elif path.exists() or path.is_symlink():
                path.unlink()
        raise


def _run_entries(out: Path) -> set[Path]:
    """What is in ``out`` where a run writes: its top level, and everything in its own folders."""
    if not out.is_dir():
        return set()
    inside = (path for name in RUN_FOLDERS if (out / name).is_dir() for path in (out / name).rglob("*"))
    return set(out.iterdir()) | set(inside)


def _topmost_missing(out: Path) -> Path | None:
    """The highest of ``out`` and its parents that does not exist (``None``: ``out`` exists)."""
    missing, path = None, out.absolute()
    while not path.exists():
        missing, path = path, path.parent
    return missing


def _show_report(call: Callable[[], RunResult], out: Path) -> None:
    """Run a command that writes a report and print where the report is."""
    print(f"report: {_guard(call, out).report.resolve()}")


def _bits(text: str | None, option: str) -> tuple[int, ...] | None:
    return None if text is None else _numbers(text, option, int)


Model = Annotated[str, typer.Option(help="HF repo id or folder, a .gguf file, or 'smollm2' (built in)")]
Facts = Annotated[str | None, typer.Option(help="facts per relation, or 'all' (default: from the preset)")]
FactsFile = Annotated[str | None, typer.Option(help="JSONL of your own facts: subject, object, template")]
Relations = Annotated[str | None, typer.Option(help="ParaRel relation ids, comma-separated (default: all 39)")]
Calib = Annotated[str | None, typer.Option(help="calibration text or JSONL file (default: model-generated)")]
CalibSamples = Annotated[int, typer.Option(help="calibration sequences")]
CalibLength = Annotated[int, typer.Option(help="tokens per calibration sequence")]
Out = Annotated[str, typer.Option(help="run directory")]
Device = Annotated[str, typer.Option(help="cpu, cuda or auto")]
Dtype = Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16")]
Preset = Annotated[str, typer.Option(help=f"sizes: {', '.join(PRESETS)}")]
BatchSize = Annotated[int, typer.Option(help="prompts per forward pass")]
Seed = Annotated[int, typer.Option(help="seed of fact sampling and calibration text")]
TrustRemoteCode = Annotated[bool, typer.Option("--trust-remote-code", help="allow the model's own code")]
Analyses = Annotated[str | None, typer.Option(help=ANALYSES_HELP)]
Force = Annotated[bool, typer.Option("--force", help=FORCE_HELP)]


def _shared(facts: str | None, facts_file: str | None, relations: str | None, analyses: str | None) -> dict:
    """RunConfig fields from the options ``run`` and ``diagnose`` share that need parsing."""
    all_facts = facts == "all"
    return {
        "facts_per_relation": None if facts is None or all_facts else _count(facts, "--facts"),
        "all_facts": all_facts,
        "facts_file": facts_file,
        "relations": _names(relations),
        "analyses": _analyses(analyses),
    }


@app.command()
def run(
    model: Model = "smollm2",
    methods: Annotated[str, typer.Option(help="quantization methods, comma-separated: rtn, gptq")] = "rtn,gptq",
    bits: Annotated[str, typer.Option(help="weight bit widths, comma-separated, each 2..8")] = "8,4,3,2",
    group_size: Annotated[int, typer.Option(help="quantization group size (falls back where it does not divide)")] = 128,
    asym: Annotated[bool, typer.Option("--asym", help="asymmetric quantization (zero point per group)")] = False,
    facts: Facts = None,
    facts_file: FactsFile = None,
    relations: Relations = None,
    calib: Calib = None,
    calib_samples: CalibSamples = 16,
    calib_length: CalibLength = 256,
    out: Out = "runs/latest",
    device: Device = "auto",
    dtype: Dtype = "auto",
    preset: Preset = "full",
    batch_size: BatchSize = 64,
    seed: Seed = 0,
    trust_remote_code: TrustRemoteCode = False,
    analyses: Analyses = None,
    patch_prompts: Annotated[int | None, typer.Option(help=PROMPTS_HELP)] = None,
    causal_bits: Annotated[str | None, typer.Option(help=BITS_HELP)] = None,
    sensitivity_bits: Annotated[str | None, typer.Option(help=SENSITIVITY_BITS_HELP)] = None,
    repair_bits: Annotated[str | None, typer.Option(help=REPAIR_BITS_HELP)] = None,
    protect_blocks: Annotated[int | None, typer.Option(help=PROTECT_HELP)] = None,
    budget: Annotated[float, typer.Option(help=BUDGET_HELP)] = KURTOSIS_BUDGET,
    alphas: Annotated[str, typer.Option(help=ALPHAS_HELP)] = ",".join(map(str, DEFAULT_ALPHAS)),
    rank: Annotated[int, typer.Option(help=RANK_HELP)] = DEFAULT_RANK,
    streams: Annotated[str, typer.Option(help=STREAMS_HELP)] = ",".join(KINDS),
    window: Annotated[int, typer.Option(help=WINDOW_HELP)] = 1,
    force: Force = False,
) -> None:
    """Quantize a model, measure its factual recall, logit lens, causal effects, components,
    representations and sensitivity, try the repairs, judge each setting, and write a report."""

    def call():
        from quantdiag.pipeline import run as run_pipeline

        config = RunConfig(
            out=out,
            model=model,
            methods=_names(methods) or (),
            bits=_numbers(bits, "--bits", int),
            group_size=group_size,
            sym=not asym,
            preset=preset,
            calib=calib,
            calib_samples=calib_samples,
            calib_length=calib_length,
            batch_size=batch_size,
            device=device,
            dtype=dtype,
            seed=seed,
            trust_remote_code=trust_remote_code,
            patch_prompts=patch_prompts,
            causal_bits=_bits(causal_bits, "--causal-bits"),
            sensitivity_bits=_bits(sensitivity_bits, "--sensitivity-bits"),
            repair_bits=_bits(repair_bits, "--repair-bits"),
            protect_blocks=protect_blocks,
            kurtosis_budget=budget,
            alphas=_numbers(alphas, "--alphas", float),
            eora_rank=rank,
            streams=_names(streams) or (),
            window=window,
            force=force,
            **_shared(facts, facts_file, relations, analyses),
        )
        return run_pipeline(config)

    _show_report(call, Path(out))


@app.command()
def diagnose(
    compare: Annotated[list[str], typer.Option(help="a checkpoint to judge: GPTQ or AWQ folder, .gguf file or float folder (repeat for more)")],
    reference: Model = "smollm2",
    facts: Facts = None,
    facts_file: FactsFile = None,
    relations: Relations = None,
    calib: Calib = None,
    calib_samples: CalibSamples = 16,
    calib_length: CalibLength = 256,
    out: Out = "runs/diagnose",
    device: Device = "auto",
    dtype: Dtype = "auto",
    preset: Preset = "full",
    batch_size: BatchSize = 64,
    seed: Seed = 0,
    trust_remote_code: TrustRemoteCode = False,
    analyses: Analyses = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the verdicts as JSON on stdout (progress stays on stderr)")] = False,
    force: Force = False,
) -> None:
    """Judge checkpoints against a reference: Healthy, Signal Degradation, Computation Collapse
    or Inconclusive, with the evidence and a report. Exit code (the worst verdict): 0 healthy,
    3 degradation, 4 collapse, 5 inconclusive; 2 for a usage error."""

    def call():
        from quantdiag.diagnose import diagnose as diagnose_models

        config = RunConfig(
            out=out,
            model=reference,
            methods=(),
            bits=(),
            compare=tuple(compare),
            preset=preset,
            calib=calib,
            calib_samples=calib_samples,
            calib_length=calib_length,
            batch_size=batch_size,
            device=device,
            dtype=dtype,
            seed=seed,
            trust_remote_code=trust_remote_code,
            force=force,
            **_shared(facts, facts_file, relations, analyses),
        )
        if not as_json:
            return diagnose_models(config)
        with contextlib.redirect_stdout(sys.stderr):
            return diagnose_models(config)

    diagnosis = _guard(call, Path(out))
    if as_json:
        print(json.dumps(diagnosis.to_json(), indent=2))
    else:
        for model in diagnosis.models:
            verdict = model["verdict"]
            confidence = "" if verdict["confidence"] is None else f" ({verdict['confidence_level']} confidence, {verdict['confidence']:.2f})"
            print(f"{model['label']}: {verdict['title']}{confidence}. {verdict['recommendation']['text']}")
        print(f"report: {diagnosis.report.resolve()}")
    raise typer.Exit(diagnosis.exit_code)


@app.command()
def patch(
    run_dir: Annotated[str, typer.Argument(help="an existing run directory (made by quantdiag run)")],
    analyses: Annotated[str, typer.Option(help=ANALYSES_HELP)] = ",".join(CAUSAL_ANALYSES),
    patch_prompts: Annotated[int | None, typer.Option(help=PROMPTS_HELP)] = None,
    causal_bits: Annotated[str | None, typer.Option(help=BITS_HELP)] = None,
    streams: Annotated[str | None, typer.Option(help=STREAMS_HELP)] = None,
    window: Annotated[int | None, typer.Option(help=WINDOW_HELP)] = None,
) -> None:
    """Add analyses (default: cross-model patching and zero ablation) to a finished run's own,
    reusing its results."""

    def call():
        from quantdiag.pipeline import rerun

        return rerun(
            Path(run_dir),
            analyses=_analyses(analyses) or (),
            patch_prompts=patch_prompts,
            causal_bits=_bits(causal_bits, "--causal-bits"),
            streams=_names(streams),
            window=window,
        )

    _show_report(call, Path(run_dir))


@app.command()
def sensitivity(
    run_dir: Annotated[str, typer.Argument(help="an existing run directory (made by quantdiag run)")],
    sensitivity_bits: Annotated[str | None, typer.Option(help=SENSITIVITY_BITS_HELP)] = None,
) -> None:
    """Add the sensitivity maps (domino, single blocks, components, signal injection) to a
    finished run, reusing its results."""

    def call():
        from quantdiag.pipeline import rerun

        return rerun(Path(run_dir), analyses=("sensitivity",), sensitivity_bits=_bits(sensitivity_bits, "--sensitivity-bits"))

    _show_report(call, Path(run_dir))


@app.command()
def repair(
    run_dir: Annotated[str, typer.Argument(help="an existing run directory (made by quantdiag run)")],
    repair_bits: Annotated[str | None, typer.Option(help=REPAIR_BITS_HELP)] = None,
    protect_blocks: Annotated[int | None, typer.Option(help=PROTECT_HELP)] = None,
    budget: Annotated[float | None, typer.Option(help=BUDGET_HELP)] = None,
    alphas: Annotated[str | None, typer.Option(help=ALPHAS_HELP)] = None,
    rank: Annotated[int | None, typer.Option(help=RANK_HELP)] = None,
) -> None:
    """Add the repair table (early and kurtosis protection, peak-signal amplification, EoRA) to
    a finished run, reusing its results."""

    def call():
        from quantdiag.pipeline import rerun

        return rerun(
            Path(run_dir),
            analyses=("repairs",),
            repair_bits=_bits(repair_bits, "--repair-bits"),
            protect_blocks=protect_blocks,
            kurtosis_budget=budget,
            alphas=None if alphas is None else _numbers(alphas, "--alphas", float),
            eora_rank=rank,
        )

    _show_report(call, Path(run_dir))
