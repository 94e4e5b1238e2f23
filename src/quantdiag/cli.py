"""The command line: parses options into a RunConfig and makes one library call per command.

User errors print one line on stderr and exit with code 2; an interrupted run exits with 130 and
resumes from its finished stages when the same command runs again.
"""

from __future__ import annotations

import contextlib
import errno
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from typer._click.exceptions import (
    UsageError,  # typer 0.29 vendors click: these are its errors
)
from typer.core import TyperGroup

from quantdiag.config import CAUSAL_ANALYSES, RUN_FOLDERS, TRIED_REPAIRS, RunConfig
from quantdiag.errors import QuantdiagError
from quantdiag.options import DECLARED, Options
from quantdiag.storage import remove

if TYPE_CHECKING:  # the state module imports torch: --help must not
    from quantdiag.state import RunResult

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


def _guard(call: Callable[[], T], out: Path) -> T:
    """Turn user and environment errors into one line on stderr and exit code 2, leaving nothing
    of this command's in ``out``; any other error stays a traceback and leaves ``out`` as it is."""
    try:
        with _removed_on_error(out):
            return call()
    except (QuantdiagError, OSError) as error:
        if not _reported(error):
            raise
        message = error if isinstance(error, QuantdiagError) else f"{error.filename or out}: {error.strerror}"
        print(f"quantdiag: error: {message}", file=sys.stderr)
    except KeyboardInterrupt:
        print("quantdiag: interrupted; run the same command again to resume", file=sys.stderr)
        raise typer.Exit(130) from None
    raise typer.Exit(2)


def _reported(error: Exception) -> bool:
    """Whether ``error`` is the user's or the machine's (one line, exit 2), not quantdiag's bug."""
    return isinstance(error, QuantdiagError) or isinstance(error, OSError) and error.errno in ENVIRONMENT_ERRORS


@contextlib.contextmanager
def _removed_on_error(out: Path) -> Iterator[None]:
    """On a user or environment error, remove what was created under ``out`` meanwhile (``out``
    itself if it did not exist, and the parents made for it while they are empty); what was
    there stays."""
    top = _topmost_missing(out)
    before = set() if top else _run_entries(out)
    try:
        yield
    except (QuantdiagError, OSError) as error:
        if _reported(error):
            _remove_created(out, top, before)
        raise


def _remove_created(out: Path, top: Path | None, before: set[Path]) -> None:
    """Remove ``out`` (it was made from ``top`` down) or the entries it gained since ``before``."""
    for path in [out] if top else sorted(_run_entries(out) - before):
        remove(path)
    parent = out.absolute().parent
    while top and parent.is_relative_to(top) and parent.exists() and not any(parent.iterdir()):
        parent.rmdir()  # made for ``out`` and still empty: no other run writes there
        parent = parent.parent


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


RUN = Options(name for name in DECLARED if name != "compare")
DIAGNOSE = Options(
    (
        *("compare", "model", "facts_per_relation", "facts_file", "relations", "calib", "calib_samples"),
        *("calib_length", "out", "device", "dtype", "preset", "batch_size", "seed", "trust_remote_code", "analyses"),
        *("force", "profile"),
    ),
    renamed={"model": "reference"},
    defaults={"out": "runs/diagnose"},
)
PATCH = Options(
    ("analyses", "patch_prompts", "causal_bits", "streams", "window"),
    keep=True,
    defaults={"analyses": ",".join(CAUSAL_ANALYSES)},
)
SENSITIVITY = Options(("sensitivity_bits", "sweeps"), keep=True, defaults={"sweeps": "full"})
REPAIR = Options(
    ("repair_bits", "repairs", "protect_blocks", "kurtosis_budget", "alphas", "eora_rank"),
    keep=True,
    defaults={"repairs": ",".join(TRIED_REPAIRS)},
)
JSON_HELP = "print the verdicts as JSON on stdout (progress stays on stderr)"
RunDir = Annotated[str, typer.Argument(help="an existing run directory (made by quantdiag run)")]


@app.command()
@RUN
def run(**values: Any) -> None:
    """Quantize a model, measure its factual recall, logit lens, causal effects, components,
    representations and sensitivity, try the repairs, judge each setting, and write a report."""

    def call():
        from quantdiag.pipeline import run as run_pipeline

        return run_pipeline(RunConfig(**RUN.config_fields(values)))

    _show_report(call, Path(values["out"]))


@app.command()
@DIAGNOSE
def diagnose(
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
    **values: Any,
) -> None:
    """Judge checkpoints against a reference: Healthy, Signal Degradation, Computation Collapse
    or Inconclusive, with the evidence and a report. Exit code (the worst verdict): 0 healthy,
    3 degradation, 4 collapse, 5 inconclusive; 2 for a usage error."""

    def call():
        from quantdiag.diagnose import diagnose as diagnose_models

        config = RunConfig(methods=(), bits=(), **DIAGNOSE.config_fields(values))
        if not as_json:
            return diagnose_models(config)
        with contextlib.redirect_stdout(sys.stderr):
            return diagnose_models(config)

    diagnosis = _guard(call, Path(values["out"]))
    if as_json:
        print(json.dumps(diagnosis.to_json(), indent=2))
    else:
        for model in diagnosis.models:
            verdict = model["verdict"]
            confidence = (
                ""
                if verdict["confidence"] is None
                else f" ({verdict['confidence_level']} confidence, {verdict['confidence']:.2f})"
            )
            print(f"{model['label']}: {verdict['title']}{confidence}. {verdict['recommendation']['text']}")
        print(f"report: {diagnosis.report.resolve()}")
    raise typer.Exit(diagnosis.exit_code)


@app.command()
@PATCH
def patch(run_dir: RunDir, **values: Any) -> None:
    """Add analyses (default: cross-model patching and zero ablation) to a finished run's own,
    reusing its results."""
    _rerun(run_dir, PATCH, values)


@app.command()
@SENSITIVITY
def sensitivity(run_dir: RunDir, **values: Any) -> None:
    """Add the sensitivity maps (domino, single blocks, components, signal injection) to a
    finished run, reusing its results."""
    _rerun(run_dir, SENSITIVITY, values, ("sensitivity",))


@app.command()
@REPAIR
def repair(run_dir: RunDir, **values: Any) -> None:
    """Add the repair table (early and kurtosis protection, peak-signal amplification, EoRA) to
    a finished run, reusing its results."""
    _rerun(run_dir, REPAIR, values, ("repairs",))


def _rerun(run_dir: str, options: Options, values: dict[str, Any], analyses: tuple[str, ...] = ()) -> None:
    """Run again on ``run_dir`` adding ``analyses`` (and those of ``--analyses``) with the options given."""

    def call():
        from quantdiag.pipeline import rerun

        changes = options.config_fields(values)
        return rerun(Path(run_dir), analyses=(*analyses, *(changes.pop("analyses", None) or ())), **changes)

    _show_report(call, Path(run_dir))
